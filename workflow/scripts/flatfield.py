from tilefusion.steps import estimate_flatfield, run_logged

run_logged(
    snakemake.log[0],
    estimate_flatfield,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    flatfield_path=snakemake.output.flatfield,
    darkfield_path=snakemake.output.darkfield,
)
