rule fuse:
    input:
        unpack(get_fuse_corrections),
        plan=PLAN_JSON,
        store=STORE_RECORD,
    output:
        marker=f"{MARKERS}/level0/range{{range}}.json",
    log:
        f"{LOGS}/fuse/range{{range}}.log",
    benchmark:
        f"{BENCHMARKS}/fuse/range{{range}}.tsv"
    conda:
        get_fuse_env()
    threads: JOB_THREADS
    resources:
        mem_mb=get_fuse_mem_mb,
        runtime=get_fuse_runtime,
        gpu=get_fuse_gpus,
    script:
        "../scripts/fuse.py"
