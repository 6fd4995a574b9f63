from tilefusion.steps import estimate_intensity, run_logged

run_logged(
    snakemake.log[0],
    estimate_intensity,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    output=snakemake.output.intensity,
    flatfield_path=snakemake.input.get("flatfield"),
    darkfield_path=snakemake.input.get("darkfield"),
    threads=snakemake.threads,
)
