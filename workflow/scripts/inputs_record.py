from tilefusion.steps import refresh_inputs_record, run_logged

run_logged(
    snakemake.log[0],
    refresh_inputs_record,
    path=snakemake.output[0],
    config=snakemake.config,
)
