from tilefusion.steps import downsample, run_logged

run_logged(
    snakemake.log[0],
    downsample,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    level=int(snakemake.wildcards.level),
    range_index=int(snakemake.wildcards.range),
    marker=snakemake.output.marker,
    threads=snakemake.threads,
)
