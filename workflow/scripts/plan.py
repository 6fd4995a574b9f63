from tilefusion.steps import plan_and_prepare, run_logged

run_logged(
    snakemake.log[0],
    plan_and_prepare,
    config=snakemake.config,
    plan_path=snakemake.output.plan,
    manifest_path=snakemake.output.manifest,
    record_path=snakemake.output.store,
    inputs_record=snakemake.input.inputs,
)
