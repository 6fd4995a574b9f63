# Intensity corrections estimated once per run, before the fuse jobs, which
# apply them (fusion.flatfield, fusion.intensity_matching). Both read the
# tiles (metadata and samples) and write small files: seconds to minutes.
FLATFIELD_NPY = f"{RESULTS}/flatfield.npy"
DARKFIELD_NPY = f"{RESULTS}/darkfield.npy"
INTENSITY_JSON = f"{RESULTS}/intensity.json"


rule flatfield:
    input:
        plan=PLAN_JSON,
        given=get_flatfield_files(),
    output:
        flatfield=FLATFIELD_NPY,
        darkfield=DARKFIELD_NPY,
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
        intensity=INTENSITY_JSON,
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
