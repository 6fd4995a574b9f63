from pathlib import Path

from snakemake.utils import min_version

min_version("9.20")


# A deployed workflow's own config/config.yaml (the catalog layout), else the
# bundled one; --configfile and a host's module config come on top of it.
if Path("config/config.yaml").exists():

    configfile: "config/config.yaml"

else:

    configfile: workflow.source_path("config/config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"


# Only when a correction is on (fusion.flatfield, fusion.intensity_matching).
if CORRECTIONS:

    include: "workflow/rules/corrections.smk"


include: "workflow/rules/fuse.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
    localrule: True
