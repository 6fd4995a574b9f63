# Figures for `snakemake --report report.html`, made once the output is
# validated. The jobs' benchmark files are read where they exist (a rerun that
# skipped a job keeps its earlier file): a param, not an input.
rule report:
    input:
        plan=PLAN_JSON,
        qc_report=QC_REPORT,
        markers=get_all_markers(),
    output:
        layout_xy=report(
            f"{RESULTS}/report/layout_xy.svg",
            caption="../report/layout.rst",
            category="Tile layout",
            labels={"plane": "xy"},
        ),
        layout_xz=report(
            f"{RESULTS}/report/layout_xz.svg",
            caption="../report/layout.rst",
            category="Tile layout",
            labels={"plane": "xz"},
        ),
        mip_xy=report(
            f"{RESULTS}/report/mip_xy.png",
            caption="../report/mip.rst",
            category="Fused volume",
            labels={"projection": "xy (along z)"},
        ),
        mip_xz=report(
            f"{RESULTS}/report/mip_xz.png",
            caption="../report/mip.rst",
            category="Fused volume",
            labels={"projection": "xz (along y)"},
        ),
        mip_yz=report(
            f"{RESULTS}/report/mip_yz.png",
            caption="../report/mip.rst",
            category="Fused volume",
            labels={"projection": "yz (along x)"},
        ),
        timings_svg=report(
            f"{RESULTS}/report/timings.svg",
            caption="../report/timings.rst",
            category="Timings",
            labels={"view": "chart"},
        ),
        timings_tsv=report(
            f"{RESULTS}/report/timings.tsv",
            caption="../report/timings_table.rst",
            category="Timings",
            labels={"view": "table"},
        ),
        validation=report(
            f"{RESULTS}/report/validation.tsv",
            caption="../report/validation.rst",
            category="Validation",
            labels={"view": "table"},
        ),
        config=report(
            f"{RESULTS}/report/config.yaml",
            caption="../report/config.rst",
            category="Configuration",
            labels={"view": "file"},
        ),
    log:
        f"{LOGS}/report.log",
    localrule: True
    conda:
        "../../envs/tilefusion.yaml"
    params:
        # Where the jobs wrote them: under a module's prefix too (params are not moved).
        benchmarks=made_here(BENCHMARKS),
    script:
        "../scripts/report.py"
