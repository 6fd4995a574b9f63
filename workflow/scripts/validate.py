from tilefusion.steps import run_logged, validate

run_logged(
    snakemake.log[0],
    validate,
    config=snakemake.config,
    plan_path=snakemake.input.plan,
    markers_dir=snakemake.params.markers_dir,
    report_path=snakemake.output.report,
    assemble_record=snakemake.input.assembled,
    flag_path=snakemake.output.complete,
    seams_path=snakemake.output.seams,
    intensity_path=snakemake.input.get("intensity"),
    flatfield_path=snakemake.input.get("flatfield"),
    darkfield_path=snakemake.input.get("darkfield"),
)
