rule validate:
    input:
        unpack(get_validate_corrections),
        plan=PLAN_JSON,
        store=STORE_RECORD,
        assembled=ASSEMBLE_RECORD,
        markers=get_all_markers(),
    output:
        report=QC_REPORT,
        # Written last, when every check passed: what a host workflow depends on.
        complete=COMPLETE_FLAG,
        seams=SEAMS_JSON,
    log:
        f"{LOGS}/validate.log",
    conda:
        "../../envs/tilefusion.yaml"
    # Hashing every stored object dominates: a thread per core given.
    threads: JOB_THREADS
    resources:
        mem_mb=get_validate_mem_mb,
        runtime=get_validate_runtime,
    params:
        markers_dir=get_markers_dir,
    script:
        "../scripts/validate.py"
