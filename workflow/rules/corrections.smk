# Intensity corrections estimated once per run, before the fuse jobs, which
# apply them (fusion.flatfield, fusion.intensity_matching). Both read the
# tiles (metadata and samples) and write small files: seconds to minutes.
CORRECTION_FILES = steps.corrections_paths(config, RESULTS, every=True)


rule flatfield:
    input:
        plan=PLAN_JSON,
        given=get_flatfield_files(),
    output:
        flatfield=CORRECTION_FILES["flatfield"],
        darkfield=CORRECTION_FILES["darkfield"],
    log:
        f"{LOGS}/flatfield.log",
    benchmark:
        f"{BENCHMARKS}/flatfield.tsv"
    conda:
        "../../envs/tilefusion.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/flatfield.py"


rule intensity:
    input:
        unpack(get_intensity_profiles),
        plan=PLAN_JSON,
    output:
        intensity=CORRECTION_FILES["intensity"],
    log:
        f"{LOGS}/intensity.log",
    benchmark:
        f"{BENCHMARKS}/intensity.tsv"
    conda:
        "../../envs/tilefusion.yaml"
    threads: 4
    resources:
        mem_mb=4000,
    script:
        "../scripts/intensity.py"
