if config["demo"]:

    rule demo_dataset:
        output:
            get_dataset(),
        log:
            "logs/tilefusion/demo_dataset.log",
        conda:
            "../../envs/tilefusion.yaml"
        script:
            "../scripts/demo_dataset.py"


rule plan:
    input:
        dataset=get_dataset(),
    output:
        plan=PLAN_JSON,
        manifest=MANIFEST_TSV,
    log:
        "logs/tilefusion/plan.log",
    conda:
        "../../envs/tilefusion.yaml"
    params:
        settings=get_plan_settings(),
    script:
        "../scripts/plan.py"
