from pathlib import Path

from tilefusion.report import write_report_figures
from tilefusion.steps import run_logged

run_logged(
    snakemake.log[0],
    write_report_figures,
    out_dir=Path(snakemake.output.layout_xy).parent,
    plan_path=snakemake.input.plan,
    store_path=snakemake.config["output"]["path"],
    qc_report_path=snakemake.input.qc_report,
    marker_paths=list(snakemake.input.markers),
    benchmarks_dir=snakemake.params.benchmarks,
    config=snakemake.config,
)
