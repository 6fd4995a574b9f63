from tilefusion.steps import run_logged, write_plan

run_logged(
    snakemake.log[0],
    write_plan,
    config=snakemake.config,
    plan_path=snakemake.output.plan,
    manifest_path=snakemake.output.manifest,
)
