rule validate:
    input:
        plan=PLAN_JSON,
        assembled=ASSEMBLE_RECORD,
        markers=get_all_markers(),
    output:
        report=QC_REPORT,
    log:
        "logs/tilefusion/validate.log",
    conda:
        "../../envs/tilefusion.yaml"
    params:
        markers_dir=get_markers_dir,
    script:
        "../scripts/validate.py"
