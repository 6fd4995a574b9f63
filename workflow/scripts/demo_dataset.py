from tilefusion.demo import write_demo
from tilefusion.steps import run_logged

run_logged(snakemake.log[0], write_demo, xml_path=snakemake.output[0])
