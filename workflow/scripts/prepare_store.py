from tilefusion.steps import prepare, run_logged

run_logged(
    snakemake.log[0],
    prepare,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    record_path=snakemake.output.record,
)
