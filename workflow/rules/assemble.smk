rule downsample:
    input:
        plan=PLAN_JSON,
        store=STORE_RECORD,
        below=get_previous_level_markers,
    output:
        marker=f"{MARKERS}/level{{level}}/range{{range}}.json",
    log:
        f"{LOGS}/downsample/level{{level}}-range{{range}}.log",
    benchmark:
        f"{BENCHMARKS}/downsample/level{{level}}-range{{range}}.tsv"
    wildcard_constraints:
        level=r"[1-9]\d*",
    conda:
        "../../envs/tilefusion.yaml"
    threads: JOB_THREADS
    resources:
        mem_mb=get_downsample_mem_mb,
        runtime=get_downsample_runtime,
    script:
        "../scripts/downsample.py"


rule assemble:
    input:
        plan=PLAN_JSON,
        markers=get_all_markers(),
    output:
        record=ASSEMBLE_RECORD,
    log:
        f"{LOGS}/assemble.log",
    localrule: True
    conda:
        "../../envs/tilefusion.yaml"
    script:
        "../scripts/assemble.py"
