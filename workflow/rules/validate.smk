rule validate:
    input:
        plan=PLAN_JSON,
        store=STORE_RECORD,
        assembled=ASSEMBLE_RECORD,
        markers=get_all_markers(),
    output:
        report=QC_REPORT,
    log:
        f"{LOGS}/validate.log",
    conda:
        "../../envs/tilefusion.yaml"
    params:
        markers_dir=get_markers_dir,
    script:
        "../scripts/validate.py"
