rule validate:
    input:
        plan=PLAN_JSON,
        assembled=ASSEMBLE_RECORD,
        markers=get_all_markers(),
    output:
        report=QC_REPORT,
    params:
        markers_dir=MARKERS,
    log:
        "logs/tilefusion/validate.log",
    conda:
        "../../envs/tilefusion.yaml"
    script:
        "../scripts/validate.py"
