from tilefusion.steps import fuse, run_logged

run_logged(
    snakemake.log[0],
    fuse,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    range_index=int(snakemake.wildcards.range),
    marker=snakemake.output.marker,
    threads=snakemake.threads,
)
