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


# Metadata work, seconds even for 10,000 tiles: it runs where Snakemake itself
# runs (no cluster queue), and creates the output store too.
rule plan:
    input:
        dataset=get_dataset(),
    output:
        plan=PLAN_JSON,
        manifest=MANIFEST_TSV,
        store=STORE_RECORD,
    log:
        "logs/tilefusion/plan.log",
    localrule: True
    conda:
        "../../envs/tilefusion.yaml"
    params:
        settings=get_plan_settings(),
    script:
        "../scripts/plan.py"
