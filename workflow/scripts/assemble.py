from tilefusion.steps import assemble, run_logged

run_logged(
    snakemake.log[0],
    assemble,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    markers=list(snakemake.input.markers),
    record_path=snakemake.output.record,
)
