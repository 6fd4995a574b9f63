from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/fuse.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/validate.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
    localrule: True
