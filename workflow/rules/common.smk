import os
import sys
from pathlib import Path

from tilefusion import steps
from tilefusion.config import DEMO_DATASET, load_config
from tilefusion.errors import InputError
from tilefusion.plan import read_plan, read_plan_grid, source_ranges
from tilefusion.report import REPORT_FILES
from tilefusion.summary import estimate_run, format_estimate

# Cores of each fuse and downsample job (Snakemake scales them down with --cores).
JOB_THREADS = 4


# Users' mistakes stop the run here, before any job, with one line naming the
# file and field; the plan is made from metadata only, so every fuse job is in
# the DAG (and in `snakemake -n`) from the start. Tiles and the output are
# checked once, by the main process, not again inside every job.
def use_engine_of_this_workflow():
    # Under --sdm conda the environments hold the engine's dependencies only;
    # the engine is this workflow's own src/, put first on the path that every
    # job's Python inherits, so that rules and engine are always one version.
    from snakemake.settings.types import DeploymentMethod

    rules = str(workflow.current_basedir.get_path_or_uri(secret_free=True))  # or a URL
    source = Path(rules).parent.parent / "src"
    methods = workflow.deployment_settings.deployment_method
    if DeploymentMethod.CONDA in methods and (source / "tilefusion").is_dir():
        paths = [
            str(source),
            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
        ]
        os.environ.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))


use_engine_of_this_workflow()


def made_here(path):
    # Where Snakemake puts a relative path of this workflow's rules: under the
    # module's prefix when a host workflow uses it as a module, else as given.
    return str(workflow.modifier.path_modifier.replace_prefix(str(path)))


try:
    config.update(load_config(config, source="config"))
    # The demo and the output are made by this workflow, so they follow a
    # module's prefix; a dataset of the user's is read where the user said.
    DEMO = steps.demo_requested(config)
    if DEMO:
        config["dataset"] = made_here(DEMO_DATASET)
    OUTPUT = str(config["output"]["path"])  # as a rule declares it
    config["output"]["path"] = made_here(OUTPUT)  # where the jobs write
    # Per output, so that two configurations in one working directory keep apart.
    STATE = steps.state_name(config)
    RESULTS = f"results/tilefusion/{STATE}"
    LOGS = f"logs/tilefusion/{STATE}"
    BENCHMARKS = f"benchmarks/tilefusion/{STATE}"
    PLAN_JSON = f"{RESULTS}/plan.json"
    MANIFEST_TSV = f"{RESULTS}/manifest.tsv"
    STORE_RECORD = f"{RESULTS}/store.json"
    ASSEMBLE_RECORD = f"{RESULTS}/assemble.json"
    QC_REPORT = f"{RESULTS}/qc_report.json"
    MARKERS = f"{RESULTS}/markers"
    INPUTS_RECORD = f"{RESULTS}/inputs.json"
    COMPLETE_FLAG = steps.completion_flag(OUTPUT)
    SEAMS_JSON = f"{RESULTS}/seams.json"
    # Flatfield and intensity files the fuse jobs read ({} when none is on).
    CORRECTIONS = steps.corrections_paths(config, RESULTS)
    if not workflow.is_main_process and Path(made_here(PLAN_JSON)).is_file():
        # A job (on a cluster node too) reads the plan its run made, instead of
        # planning the dataset again from its XML.
        PLAN = read_plan_grid(made_here(PLAN_JSON)) or read_plan(made_here(PLAN_JSON))
    else:
        PLAN = steps.plan_for_run(
            config,
            main_process=workflow.is_main_process,
            protected=[
                *map(str, workflow.configfiles),
                made_here(RESULTS),
                made_here(LOGS),
            ],
            demo_path=config["dataset"] if DEMO else None,
        )
    # Rewritten when a tile changed since the plan, so the plan reruns; a dry
    # run writes nothing (the inputs_record rule makes a missing one).
    if workflow.is_main_process:
        # The bill before any job is submitted (dry runs too).
        print(format_estimate(estimate_run(PLAN, threads=JOB_THREADS)), file=sys.stderr)
        steps.check_state_owner(made_here(INPUTS_RECORD), config)
        # At parse time only the output settings know of -n.
        dry_run = workflow.output_settings.dryrun
        changed = steps.refresh_inputs_record(
            made_here(INPUTS_RECORD), config, PLAN, write=not dry_run
        )
        if dry_run and changed and Path(made_here(INPUTS_RECORD)).exists():
            print(
                "tilefusion: the dataset or its tiles changed since they were "
                "planned: a run will plan and fuse again",
                file=sys.stderr,
            )
except InputError as error:
    sys.exit(f"tilefusion: error: {error}")


wildcard_constraints:
    range=r"\d+",
    level=r"\d+",


def get_final_output():
    # The report rule's figures: `snakemake --report` shows what a run made.
    return [
        QC_REPORT,
        COMPLETE_FLAG,
        *(f"{RESULTS}/report/{name}" for name in REPORT_FILES),
    ]


def get_plan_settings():
    # A changed setting reruns the plan, and so every job after it.
    return steps.plan_settings_digest(config)


def get_dataset():
    if DEMO:
        return DEMO_DATASET  # a relative path of ours: Snakemake adds the prefix
    # The user's file, never under a module's prefix.
    return local(config["dataset"])


def get_level_markers(level):
    count = PLAN.levels[level].n_ranges
    return [f"{MARKERS}/level{level}/range{r}.json" for r in range(count)]


def get_previous_level_markers(wildcards):
    # Only the jobs below whose objects this range reads: a graph linear in jobs.
    level = int(wildcards.level)
    ranges = source_ranges(PLAN, level, int(wildcards.range))
    return [f"{MARKERS}/level{level - 1}/range{r}.json" for r in ranges]


def get_all_markers():
    return [m for k in range(len(PLAN.levels)) for m in get_level_markers(k)]


def get_flatfield_files():
    # Profiles given as files: a changed file makes the flatfield step run again.
    settings = config["fusion"]["flatfield"]
    if settings["mode"] != "files":
        return []
    return [local(p) for p in (settings["flatfield"], settings["darkfield"]) if p]


def get_intensity_profiles(wildcards):
    # Matching fits flatfield-corrected values, as the fusion applies them.
    return {k: v for k, v in CORRECTIONS.items() if k in ("flatfield", "darkfield")}


def get_fuse_corrections(wildcards):
    return CORRECTIONS


def get_validate_corrections(wildcards):
    # The pairs' ratios after correction are measured as the fusion corrected.
    return CORRECTIONS


def get_markers_dir(wildcards, input):
    # markers/level{k}/range{r}.json -> markers
    return str(Path(input.markers[0]).parent.parent)


def get_fuse_mem_mb(wildcards, attempt):
    return steps.fuse_memory_mb(PLAN, attempt=attempt)


def get_fuse_runtime(wildcards, attempt):
    return steps.fuse_runtime_min(PLAN, attempt=attempt)


def get_downsample_mem_mb(wildcards, threads, attempt):
    return steps.downsample_memory_mb(
        PLAN, int(wildcards.level), threads=threads, attempt=attempt
    )


def get_downsample_runtime(wildcards, attempt):
    return steps.downsample_runtime_min(PLAN, int(wildcards.level), attempt=attempt)


def get_validate_mem_mb(wildcards, threads, attempt):
    return steps.validate_memory_mb(PLAN, threads=threads, attempt=attempt)


def get_validate_runtime(wildcards, threads, attempt):
    return steps.validate_runtime_min(PLAN, threads=threads, attempt=attempt)


def get_fuse_env():
    # A CUDA build of torch only where fusion.device asks for a GPU.
    if str(config["fusion"]["device"]).startswith("cuda"):
        return "../../envs/tilefusion-gpu.yaml"
    return "../../envs/tilefusion.yaml"


def get_fuse_gpus(wildcards):
    return 1 if str(config["fusion"]["device"]).startswith("cuda") else 0


def take_output_lock():
    # Only a run that executes jobs takes it (onstart): dry runs, --lint,
    # --summary or --unlock do not. Held until Snakemake exits, so no second
    # run (from another working directory) writes this output meanwhile.
    from tilefusion.store import lock_output  # zarr: not imported by every job's parse

    global OUTPUT_LOCK
    try:
        OUTPUT_LOCK = lock_output(config["output"]["path"])
    except InputError as error:
        sys.exit(f"tilefusion: error: {error}")


def cancel_rate_limiter_timers():
    # Snakemake's job rate limiter re-arms a non-daemon threading.Timer (1 s by
    # default) on every scheduling round; the interpreter waits for the last one
    # before it exits, a second added to every run. Once the run is over nothing
    # needs them. Only Snakemake's scheduler timers are touched.
    import threading

    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        if isinstance(thread, threading.Timer) and getattr(
            function, "__module__", ""
        ).startswith("snakemake.scheduling"):
            thread.cancel()


onstart:
    take_output_lock()


def point_at_the_output():
    print(
        f"tilefusion: done: {config['output']['path']} ({config['output']['format']}, "
        f"validated; QC report {made_here(QC_REPORT)}). Open it with napari "
        "(napari-ome-zarr), Neuroglancer or Fiji: see README, Viewing the output.",
        file=sys.stderr,
    )


onsuccess:
    point_at_the_output()
    cancel_rate_limiter_timers()


onerror:
    cancel_rate_limiter_timers()
