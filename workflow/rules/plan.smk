if DEMO:

    rule demo_dataset:
        output:
            get_dataset(),
        log:
            f"{LOGS}/demo_dataset.log",
        # A few MB of synthetic tiles: not worth a cluster queue.
        localrule: True
        conda:
            "../../envs/tilefusion.yaml"
        script:
            "../scripts/demo_dataset.py"


rule inputs_record:
    output:
        INPUTS_RECORD,
    log:
        f"{LOGS}/inputs_record.log",
    localrule: True
    conda:
        "../../envs/tilefusion.yaml"
    script:
        "../scripts/inputs_record.py"


# Metadata work, seconds even for 10,000 tiles: it runs where Snakemake itself
# runs (no cluster queue), and creates the output store too.
rule plan:
    input:
        dataset=get_dataset(),
        inputs=INPUTS_RECORD,
    output:
        plan=PLAN_JSON,
        manifest=MANIFEST_TSV,
        store=STORE_RECORD,
    log:
        f"{LOGS}/plan.log",
    localrule: True
    conda:
        "../../envs/tilefusion.yaml"
    params:
        settings=get_plan_settings(),
    script:
        "../scripts/plan.py"
