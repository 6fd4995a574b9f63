"""The workflow's steps, one function each, shared by Snakemake scripts and the CLI.

Each step takes the validated configuration and explicit paths, does one
thing, and writes its outputs atomically, so a step killed half way leaves
nothing that looks finished.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tilefusion import fs
from tilefusion.atomic import write_json_atomic
from tilefusion.config import DEMO_DATASET, config_digest, load_config, without_defaults
from tilefusion.errors import InputError
from tilefusion.plan import Plan, make_plan, post_transform_affine, read_plan, write_manifest
from tilefusion.readers.base import Dataset

__all__ = [
    "COMPLETION_FLAG",
    "assemble",
    "check_corrections",
    "check_output_path",
    "check_state_owner",
    "completion_flag",
    "corrections_paths",
    "demo_requested",
    "downsample",
    "downsample_memory_mb",
    "downsample_runtime_min",
    "estimate_flatfield",
    "estimate_intensity",
    "fuse",
    "fuse_memory_mb",
    "fuse_runtime_min",
    "load_dataset",
    "marker_path",
    "plan_for_run",
    "plan_from_config",
    "plan_settings_digest",
    "prepare",
    "protected_paths",
    "refresh_inputs_record",
    "repair_store",
    "run_logged",
    "state_name",
    "store_identity",
    "tile_corrections",
    "validate",
    "validate_memory_mb",
    "validate_runtime_min",
    "write_json",
    "write_plan",
]

log = logging.getLogger("tilefusion")

# Settings that change stored bytes: an output written with others is not resumed.
_IDENTITY_KEYS = ("dataset", "selection", "world_unit", "output", "fusion")
_NOT_IDENTITY = {
    "output": ("path", "overwrite", "max_size_tb"),
    "fusion": ("chunks_per_range", "read_block", "device"),
}


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically and durably (see :mod:`tilefusion.atomic`)."""
    write_json_atomic(path, data)


def state_name(config: Mapping[str, Any]) -> str:
    """The name of an output's workflow state folder (plan, markers, logs): its stem.

    ``results/fused.ome.zarr`` gives ``fused``; so two configurations that
    write two outputs in one working directory keep apart.
    """
    name = Path(str(config["output"]["path"])).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name or "fused"


def check_state_owner(path: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse a state folder (its inputs record at ``path``) kept for another output.

    Two outputs with the same stem in one working directory would share it.
    """
    try:
        recorded = json.loads(Path(path).read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        return
    wanted = str(config["output"]["path"])
    if recorded is not None and Path(recorded).resolve() != Path(wanted).resolve():
        raise InputError(
            wanted,
            "output.path",
            f"{Path(path).parent} holds the workflow state of the output {recorded}, "
            "which has the same name; give this output another file name",
        )


ENGINE_SEMANTICS = 2
"""Raised when the engine's output for the same settings changes (2: tile faces kept).

Part of the store identity, so that an output begun by an engine that
computed other values is not resumed with this one.
"""


def store_identity(config: Mapping[str, Any]) -> str:
    """Hash of every setting that changes the stored bytes (and the engine's semantics).

    Settings at their schema default are left out, so that a key added in a
    later version (at its default) does not disown outputs begun before it.
    """
    chosen: dict[str, Any] = {"engine": ENGINE_SEMANTICS}
    config = without_defaults(config)
    for key in _IDENTITY_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _NOT_IDENTITY.get(key, ())}
        chosen[key] = value
    return config_digest(chosen)


def plan_settings_digest(config: Mapping[str, Any]) -> str:
    """Hash of every setting the plan and the stored bytes depend on."""
    return config_digest(
        {"identity": store_identity(config), "ranges": config["fusion"]["chunks_per_range"]}
    )


def demo_requested(config: Mapping[str, Any], *, demo_path: str | None = None) -> bool:
    """Whether this run is to generate the bundled demo: ``demo`` set, at its own path.

    The bundled config sets ``demo``; merged with a user's config that names
    another dataset it must not make synthetic data at that path. The demo's
    path is ``demo_path``, by default :data:`tilefusion.config.DEMO_DATASET`
    (a workflow used as a module with a ``prefix`` has it under the prefix).
    """
    if not config.get("demo"):
        return False
    return Path(config["dataset"]).resolve() == Path(demo_path or DEMO_DATASET).resolve()


def _missing_dataset(config: Mapping[str, Any], demo_path: str | None) -> InputError:
    path = Path(config["dataset"])
    where = "" if path.is_absolute() else f" (resolved against the working directory {os.getcwd()})"
    hint = (
        f"; demo: true generates the bundled demo only at {demo_path or DEMO_DATASET}"
        if config.get("demo")
        else ""
    )
    return InputError(str(path), "dataset", f"file not found{where}{hint}")


def _one_value(what: str, values: set[int], source: str) -> None:
    if len(values) > 1:
        raise InputError(
            source,
            "selection",
            f"the selected views span {what}s {sorted(values)}: views of different {what}s "
            f"are never blended; select one (selection.{what}) and run once per {what}",
        )


def load_dataset(
    config: Mapping[str, Any], *, metadata_only: bool = True, demo_path: str | None = None
) -> Dataset:
    """Read the configured dataset and apply the selection.

    When the dataset file is missing and the demo is requested (see
    :func:`demo_requested`, which takes ``demo_path``), the demo's views are
    returned as the demo step will write them. The selection must name one
    timepoint and one channel.
    """
    from tilefusion.readers import read_dataset

    path = str(config["dataset"])
    if fs.exists(path):
        dataset = read_dataset(path)
    elif demo_requested(config, demo_path=demo_path):
        from tilefusion.demo import demo_dataset

        dataset = demo_dataset(path)
    else:
        raise _missing_dataset(config, demo_path)
    selection = dict(config.get("selection") or {})
    # One timepoint and channel per run: default to the first of each among
    # the views the rest of the selection names.
    if selection.get("timepoint") is None:
        candidates = dataset.select(**selection).views
        timepoints = sorted({v.timepoint for v in candidates})
        selection["timepoint"] = timepoints[0] if timepoints else None
    if selection.get("channel") is None and selection.get("setups") is None:
        candidates = dataset.select(**selection).views
        channels = sorted(
            {v.attributes["channel"] for v in candidates if "channel" in v.attributes}
        )
        selection["channel"] = channels[0] if channels else None
    selected = dataset.select(**selection)
    if not selected.views:
        raise InputError(path, "selection", f"no view matches {selection}")
    _one_value("timepoint", {v.timepoint for v in selected.views}, path)
    _one_value(
        "channel",
        {v.attributes["channel"] for v in selected.views if "channel" in v.attributes},
        path,
    )
    if not metadata_only:
        from tilefusion.readers import check_arrays

        selected = check_arrays(selected)
    return selected


def plan_from_config(
    config: Mapping[str, Any],
    *,
    source: str = "config",
    metadata_only: bool = True,
    use_stored_levels: bool = True,
    demo_path: str | None = None,
) -> Plan:
    """Plan the run a configuration describes (reads metadata only by default).

    ``use_stored_levels=False`` skips choosing each tile's stored pyramid
    level (which opens the tiles' containers): the grid and its ranges do
    not depend on it, so a job process that needs only those passes it.
    ``demo_path`` is where the demo is generated (see :func:`demo_requested`).
    """
    config = load_config(config, source=source)
    dataset = load_dataset(config, metadata_only=metadata_only, demo_path=demo_path)
    output = config["output"]
    fusion = config["fusion"]
    post = post_transform_affine(fusion["post_transforms"], source=source)
    plan = make_plan(
        dataset,
        resolution_zyx=output["resolution"],
        world_unit_zyx=config["world_unit"],
        post_transform=post,
        chunks_zyx=output["chunks"],
        shards_zyx=output["shards"] if output["format"] == "ome-zarr-0.5" else None,
        chunks_per_range=fusion["chunks_per_range"],
        pyramid_levels=output["pyramid_levels"],
        settings={"identity": store_identity(config)},
        use_stored_levels=use_stored_levels,
    )
    _check_output_size(plan, output, source=source)
    return plan


def _check_output_size(plan: Plan, output: Mapping[str, Any], *, source: str) -> None:
    """Refuse a level 0 larger than ``output.max_size_tb`` (uncompressed)."""
    import numpy as np

    declared = {t.dtype for t in plan.tiles if t.dtype}
    dtype = output["dtype"] if output["dtype"] != "same" else (declared or {"uint16"}).pop()
    size = math.prod(plan.shape_zyx) * np.dtype(dtype).itemsize
    if size > output["max_size_tb"] * 1e12:
        raise InputError(
            source,
            "output.max_size_tb",
            f"the output would be {size / 1e12:.3g} TB ({list(plan.shape_zyx)} voxels of "
            f"{dtype} at resolution {list(plan.resolution_zyx)}), above the limit of "
            f"{output['max_size_tb']} TB; check output.resolution, or raise the limit",
        )


def write_plan(config: Mapping[str, Any], *, plan_path: str, manifest_path: str) -> Plan:
    """The plan step: check the tiles against the metadata, write plan and manifest."""
    plan = plan_from_config(config, metadata_only=False)
    _write_plan_files(plan, plan_path=plan_path, manifest_path=manifest_path)
    return plan


def _write_plan_files(plan: Plan, *, plan_path: str, manifest_path: str) -> None:
    plan.write(plan_path)
    write_manifest(plan, manifest_path)
    level = plan.grid
    log.info(
        "planned %s: %d tiles, grid %s at %s %s, %d chunks of %s, %d ranges, %d levels",
        plan.dataset,
        len(plan.tiles),
        list(level.shape_zyx),
        list(level.scale_zyx),
        plan.unit,
        math.prod(math.ceil(s / c) for s, c in zip(level.shape_zyx, level.chunks_zyx)),
        list(level.chunks_zyx),
        level.n_ranges,
        len(plan.levels),
    )


def _output_dtype(config: Mapping[str, Any], plan: Plan) -> str:
    wanted = str(config["output"]["dtype"])
    if wanted != "same":
        kinds = sorted({t.dtype for t in plan.tiles if t.dtype})
        if len(kinds) > 1:
            log.warning("tiles differ in type %s: all are cast to output.dtype %s", kinds, wanted)
        return wanted
    declared = {t.dtype for t in plan.tiles if t.dtype}
    if not declared:
        from tilefusion.readers import open_array

        declared = {str(open_array(plan.tiles[0].source).dtype)}
    if len(declared) > 1:
        raise InputError(
            plan.dataset,
            "dtype",
            f"tiles differ in type {sorted(declared)}; set output.dtype to the one wanted",
        )
    return declared.pop()


def plan_for_run(
    config: Mapping[str, Any],
    *,
    main_process: bool = True,
    protected: Sequence[str] = (),
    demo_path: str | None = None,
) -> Plan:
    """The plan a workflow run is built on, after everything checked before any job.

    The main process also opens the tiles (metadata only) against the
    dataset's metadata, when the dataset exists (a demo still to be generated
    is checked by the plan step), and checks the output path (see
    :func:`check_output_path`; ``protected`` adds paths to keep, such as the
    config files). Job processes only need the plan's shape of ranges.
    """
    opens_tiles = main_process and fs.exists(str(config["dataset"]))
    plan = plan_from_config(
        config,
        metadata_only=not opens_tiles,
        use_stored_levels=main_process,
        demo_path=demo_path,
    )
    if main_process:
        check_output_path(config, plan=plan, protected=protected)
        check_corrections(config, plan)
    return plan


def _check_intensity_grid(fusion: Mapping[str, Any]) -> None:
    if fusion["intensity_model"] == "offset" and list(fusion["intensity_grid"]) != [1, 1, 1]:
        raise InputError(
            "config",
            "fusion.intensity_grid",
            "a gain grid needs intensity_model gain or gain_offset, not offset",
        )


def check_corrections(config: Mapping[str, Any], plan: Plan) -> None:
    """Refuse, before any job runs, corrections that cannot be made.

    A gain grid needs a gain (``fusion.intensity_grid`` with
    ``intensity_model: offset`` is refused). One profile fits tiles of one yx
    shape; profiles given as files (``fusion.flatfield.mode: files``) must
    exist and fit it (see :func:`tilefusion.flatfield.read_profile`).
    """
    _check_intensity_grid(config["fusion"])
    settings = config["fusion"]["flatfield"]
    if settings["mode"] == "off" or not plan.tiles:
        return
    shapes = sorted({tuple(t.shape_zyx[1:]) for t in plan.tiles})
    if len(shapes) != 1:
        raise InputError(
            plan.dataset,
            "fusion.flatfield",
            f"tiles differ in yx shape {[list(s) for s in shapes]}; one flatfield fits "
            "tiles of one shape (fuse each shape on its own, or set mode off)",
        )
    if settings["mode"] == "files":
        from tilefusion.flatfield import read_profile

        for key in ("flatfield", "darkfield"):
            if settings[key]:
                read_profile(
                    settings[key],
                    shape_yx=shapes[0],
                    field=f"fusion.flatfield.{key}",
                    positive=key == "flatfield",
                )


def protected_paths(
    config: Mapping[str, Any], plan: Plan | None = None, *, extra: Sequence[str] = ()
) -> list[str]:
    """What no output may hold: the dataset, its tiles, the working directory, ``extra``."""
    paths = [str(config["dataset"]), os.getcwd(), *extra]
    if plan is not None:
        paths.extend(t.source.path for t in plan.tiles if "://" not in t.source.path)
    return paths


def check_output_path(
    config: Mapping[str, Any], *, plan: Plan | None = None, protected: Sequence[str] = ()
) -> None:
    """Refuse, before any job runs, an output this configuration may not touch."""
    from tilefusion.store import check_owner

    check_owner(
        config["output"]["path"],
        identity=store_identity(config),
        overwrite=bool(config["output"]["overwrite"]),
        protected=protected_paths(config, plan, extra=protected),
    )


def prepare(config: Mapping[str, Any], *, plan_path: str, record_path: str) -> dict[str, Any]:
    """Create (or resume) the output store with every level's empty array."""
    from tilefusion.store import format_from_name, prepare_store

    config = load_config(config)
    plan = read_plan(plan_path)
    output = config["output"]
    dtype = _output_dtype(config, plan)
    try:
        outcome = prepare_store(
            plan,
            output["path"],
            ngff=format_from_name(output["format"]),
            dtype=dtype,
            codec=output["compression"]["codec"],
            level=output["compression"]["level"],
            identity=store_identity(config),
            overwrite=bool(output["overwrite"]),
            protected=protected_paths(config, plan),
        )
    except OSError as exc:  # a full disk, no permission: what was written resumes later
        raise InputError(
            output["path"], "output.path", f"cannot write ({exc.strerror or exc})"
        ) from None
    # A new or resumed output is not complete until validate says so again.
    fs.remove(completion_flag(output["path"]))
    log.info("output %s: %s (%s, %s)", output["path"], outcome, output["format"], dtype)
    record = {"store": _location(output["path"]), "outcome": outcome, "dtype": dtype}
    write_json(record_path, record)
    return record


def _location(path: str) -> str:
    """A path as records name it: a URL as given, a local path resolved."""
    return path if fs.is_url(path) else str(Path(path).resolve())


def refresh_inputs_record(
    path: str | Path, config: Mapping[str, Any], plan: Plan | None = None, *, write: bool = True
) -> bool:
    """Write the inputs' fingerprint to ``path`` when it changed; return whether it did.

    The workflow's plan rule takes this file as an input: rewritten after a
    tile changed, it is newer than the plan, so the plan and every job after
    it run again. The plan step refreshes it before writing the plan.
    ``plan`` (default: planned from the metadata) gives the tiles. With
    ``write=False`` nothing is written (a dry run).
    """
    from tilefusion.readers import inputs_fingerprint

    if plan is None:
        plan = plan_from_config(config)
    output = str(config["output"]["path"])
    record = {
        "dataset": str(config["dataset"]),
        "output": str(config["output"]["path"]),
        "fingerprint": inputs_fingerprint(
            str(config["dataset"]),
            [tile.source for tile in plan.tiles],
            exclude=[output, str(Path(output).with_name(f".{Path(output).name}.lock"))],
        ),
    }
    try:
        if json.loads(Path(path).read_text()) == record:
            return False
    except (OSError, ValueError):
        pass
    if write:
        write_json(path, record)
    return True


def plan_and_prepare(
    config: Mapping[str, Any],
    *,
    plan_path: str,
    manifest_path: str,
    record_path: str,
    inputs_record: str | None = None,
) -> dict[str, Any]:
    """The workflow's plan rule: :func:`write_plan`, then :func:`prepare` (one process).

    ``inputs_record`` (the inputs' fingerprint, see :func:`refresh_inputs_record`)
    is brought up to date first, so that it is older than the plan.
    """
    plan = plan_from_config(config, metadata_only=False)
    if inputs_record:
        refresh_inputs_record(inputs_record, config, plan)
    _write_plan_files(plan, plan_path=plan_path, manifest_path=manifest_path)
    from tilefusion.summary import estimate_run, format_estimate

    for line in format_estimate(estimate_run(plan, dtype=_output_dtype(config, plan))).split("\n"):
        log.info("%s", line.strip())
    return prepare(config, plan_path=plan_path, record_path=record_path)


def repair_store(config: Mapping[str, Any], plan: Plan, *, levels: Sequence[int] = ()) -> None:
    """Write again the output's damaged Zarr metadata (all of it, or only if ``levels`` need it).

    Jobs call it before they write, so a store whose metadata was lost or
    damaged is mended by the jobs that need it, without planning again (which
    would make every job after the plan run again).
    """
    from tilefusion.writer import layout_problem

    output = config["output"]
    root = str(output["path"])
    if levels and not any(layout_problem(fs.join(root, str(k))) for k in levels):
        return
    from tilefusion.store import format_from_name, repair_metadata

    written = repair_metadata(
        plan,
        root,
        ngff=format_from_name(output["format"]),
        dtype=_output_dtype(config, plan),
        codec=output["compression"]["codec"],
        level=output["compression"]["level"],
        identity=store_identity(config),
    )
    if written:
        log.warning("%s: wrote damaged or missing metadata again: %s", root, ", ".join(written))


def marker_path(markers_dir: str | Path, level: int, range_index: int) -> Path:
    """Where the marker of one job of one level lives."""
    return Path(markers_dir) / f"level{level}" / f"range{range_index}.json"


def fuse(
    config: Mapping[str, Any],
    *,
    plan_path: str,
    range_index: int,
    marker: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """Fuse one range of level 0, then write its marker.

    ``threads`` caps the CPU threads of the job (default: every CPU it may use).
    """
    from tilefusion.devices import claim_device, nvidia_driver_present
    from tilefusion.fuse import FusionOptions, fuse_range
    from tilefusion.kernel import warm_up_in_background

    config = load_config(config)
    fusion = config["fusion"]
    if fusion["device"] == "cpu" or not nvidia_driver_present():
        warm_up_in_background()
    plan = read_plan(plan_path)
    repair_store(config, plan, levels=[0])
    # A GPU no other job holds (released when the range is done), else the CPU.
    with claim_device(fusion["device"]) as device:
        log.info("range %d: device %s", range_index, device)
        options = FusionOptions(
            interpolation=fusion["interpolation"],
            blending=fusion["blending"],
            blend_range_zyx=fusion["blend_range"],
            blend_border_zyx=fusion["blend_border"],
            read_block_zyx=fusion["read_block"],
            device=device,
            threads=threads,
        )
        result = fuse_range(
            plan,
            range_index,
            store_path=config["output"]["path"],
            options=options,
        )
    result["device"] = device
    result["identity"] = plan.settings.get("identity")
    write_json(marker, result)
    stats = result["stats"]
    log.info(
        "range %d: %d objects, %d tiles, %.1f Mvoxel in %.2f s",
        range_index,
        len(result["objects"]),
        len(result["tiles"]),
        stats["voxels"] / 1e6,
        result["seconds"],
    )
    return result


def downsample(
    config: Mapping[str, Any],
    *,
    plan_path: str,
    level: int,
    range_index: int,
    marker: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build one range of one pyramid level from the level below (on ``threads`` threads)."""
    from tilefusion.pyramid import downsample_range

    config = load_config(config)
    plan = read_plan(plan_path)
    repair_store(config, plan, levels=[level - 1, level])
    result = downsample_range(
        plan,
        level,
        range_index,
        store_path=config["output"]["path"],
        threads=threads,
    )
    result["identity"] = plan.settings.get("identity")
    write_json(marker, result)
    return result


def assemble(
    config: Mapping[str, Any], *, plan_path: str, markers: Sequence[str], record_path: str
) -> dict[str, Any]:
    """Write the OME-NGFF metadata once every pixel job has finished."""
    import numpy as np

    from tilefusion.stats import merge_stats
    from tilefusion.store import format_from_name, open_level, write_ngff_metadata

    config = load_config(config)
    plan = read_plan(plan_path)
    output = config["output"]
    repair_store(config, plan)
    top = []
    for path in markers:
        try:
            marker = json.loads(Path(path).read_text())
            top.append((int(marker["level"]), marker.get("stats")))
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(
                str(path), "marker", "missing or unreadable; rerun its job (--force this file)"
            ) from None
    level0 = merge_stats([stats for level, stats in top if level == 0 and stats])
    dtype = np.dtype(open_level(output["path"], 0, mode="r").dtype)
    dtype_max = (
        float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else float(level0["max"])
    )
    name = Path(output["path"]).name.split(".")[0] or "fused"
    metadata = write_ngff_metadata(
        plan,
        output["path"],
        ngff=format_from_name(output["format"]),
        name=name,
        window=(float(level0["min"]), float(level0["max"])),
        dtype_max=dtype_max,
    )
    record = {"store": _location(output["path"]), "metadata": metadata}
    write_json(record_path, record)
    log.info(
        "OME-NGFF %s metadata written: %d levels, window %g-%g",
        output["format"],
        len(plan.levels),
        level0["min"],
        level0["max"],
    )
    return record


def rerun_command(
    bad_ranges: Sequence[Sequence[int]],
    *,
    markers_dir: str,
    target: str,
    also: Sequence[str] = (),
) -> str:
    """The command that reruns exactly the given ranges and steps (and what depends on them)."""
    forced = [*also, *(str(marker_path(markers_dir, lv, r)) for lv, r in bad_ranges)]
    return shlex.join(["snakemake", "--cores", "all", "--force", *forced, target])


COMPLETION_FLAG = ".tilefusion-complete.json"
"""File inside the output that validate writes last, when every check passed.

A host workflow's rule depends on it (``<output>/.tilefusion-complete.json``):
the output itself is a folder that many jobs write into, so it cannot be a
declared Snakemake output; the flag can. Viewers and Zarr readers ignore it.
"""


def completion_flag(output_path: str | Path) -> str:
    """Path of the completion flag of the output at ``output_path``."""
    return f"{str(output_path).rstrip('/')}/{COMPLETION_FLAG}"


def validate(
    config: Mapping[str, Any],
    *,
    plan_path: str,
    markers_dir: str,
    report_path: str,
    target: str = "",
    decode_all: bool = False,
    assemble_record: str | None = None,
    flag_path: str | None = None,
    seams_path: str | None = None,
    intensity_path: str | None = None,
    flatfield_path: str | None = None,
    darkfield_path: str | None = None,
) -> dict[str, Any]:
    """Check the output against every marker and the NGFF metadata; write the report.

    ``assemble_record`` is the output of the assemble step, forced in the
    rerun command when the Zarr or the OME-NGFF metadata is damaged (that step
    mends both). When every check passes, the completion flag is written
    (``flag_path``, by default :func:`completion_flag` of the output) last.
    With ``seams_path``, the seam metrics (:func:`tilefusion.seams.seam_metrics`;
    ``intensity_path``, ``flatfield_path`` and ``darkfield_path``: the
    corrections the fusion applied) of an output that passed are written there
    and their summary into the report (``seams``).

    Raises
    ------
    InputError
        When anything is missing or corrupt; the message holds the command
        that reruns the affected ranges only.
    """
    from tilefusion.store import format_from_name
    from tilefusion.validate import validate_output

    config = load_config(config)
    plan = read_plan(plan_path)
    markers = {
        (k, r): marker_path(markers_dir, k, r)
        for k, level in enumerate(plan.levels)
        for r in range(level.n_ranges)
    }
    report = validate_output(
        plan,
        store_path=config["output"]["path"],
        ngff=format_from_name(config["output"]["format"]),
        markers=markers,
        decode_all=decode_all,
    )
    # The assemble step mends damaged Zarr metadata and writes the NGFF metadata.
    also = []
    if (report["structure_damaged"] or report["metadata_problems"]) and assemble_record:
        also.append(assemble_record)
    if report["bad_ranges"] or also:
        report["rerun"] = rerun_command(
            report["bad_ranges"],
            markers_dir=markers_dir,
            target=target or report_path,
            also=also,
        )
    if seams_path and report["ok"]:
        report["seams"] = _seam_metrics(
            plan,
            config,
            seams_path=seams_path,
            intensity_path=intensity_path,
            profiles_paths=(flatfield_path, darkfield_path),
        )
    write_json(report_path, report)
    for line in report["warnings"]:
        log.warning("%s", line)
    if not report["ok"]:
        for line in report["problems"]:
            log.error("%s", line)
        hint = f"; rerun with: {report['rerun']}" if report.get("rerun") else ""
        first = report["problems"][0]
        raise InputError(
            config["output"]["path"],
            "validation",
            f"{len(report['problems'])} problem(s), first: {first}{hint}",
        )
    # No paths or times: the same data give the same bytes, wherever they are.
    flag = {"ok": True, "identity": plan.settings.get("identity"), "levels": len(plan.levels)}
    write_json(flag_path or completion_flag(config["output"]["path"]), flag)
    log.info("validated: %s", config["output"]["path"])
    return report


def corrections_paths(
    config: Mapping[str, Any], results: str, *, every: bool = False
) -> dict[str, str]:
    """The correction files a run's fuse jobs read (none when no correction is on).

    ``results`` is the run's state folder; keys ``flatfield`` and
    ``darkfield`` (``fusion.flatfield.mode`` not ``off``) and ``intensity``
    (``fusion.intensity_matching``); ``every`` gives all three.
    """
    fusion = config["fusion"]
    out = {}
    if every or fusion["flatfield"]["mode"] != "off":
        out["flatfield"] = f"{results}/flatfield.npy"
        out["darkfield"] = f"{results}/darkfield.npy"
    if every or fusion["intensity_matching"]:
        out["intensity"] = f"{results}/intensity.json"
    return out


def tile_corrections(
    plan: Plan,
    *,
    intensity_path: str | None = None,
    flatfield_path: str | None = None,
    darkfield_path: str | None = None,
) -> dict[str, Any]:
    """Each tile's :class:`~tilefusion.corrections.TileCorrection` from the correction files.

    The flatfield step's profiles (one for every tile) and the intensity
    step's gain and offset per tile; a tile the intensity file does not name
    keeps gain 1 and offset 0. Empty when no file is given. The profile
    arrays are shared by all tiles, not copied.

    Raises
    ------
    InputError
        A profile that does not fit the tiles' yx shape, or an intensity file
        that is malformed (see :func:`tilefusion.intensity.read_intensity`).
    """
    import numpy as np

    from tilefusion.corrections import TileCorrection
    from tilefusion.intensity import TileIntensity, read_intensity

    if not (intensity_path or flatfield_path):
        return {}
    gains = read_intensity(intensity_path) if intensity_path else {}
    flat = dark = None
    if flatfield_path:
        from tilefusion.flatfield import read_profile

        shape_yx = plan.tiles[0].shape_zyx[1:]
        flat = read_profile(
            flatfield_path, shape_yx=shape_yx, field="fusion.flatfield", positive=True
        )
        if darkfield_path:
            dark = read_profile(darkfield_path, shape_yx=shape_yx, field="fusion.flatfield")
            if not dark.any():
                dark = None
    out = {}
    for tile in plan.tiles:
        found = gains.get(tile.name, TileIntensity())
        if flat is not None and tuple(tile.shape_zyx[1:]) != tuple(np.shape(flat)):
            raise InputError(
                str(flatfield_path),
                "fusion.flatfield",
                f"shape {list(np.shape(flat))} does not fit tile {tile.name} "
                f"({list(tile.shape_zyx[1:])} yx)",
            )
        out[tile.name] = TileCorrection(
            gain=found.gain, offset=found.offset, flatfield=flat, darkfield=dark
        )
    return out


def estimate_flatfield(
    config: Mapping[str, Any], *, plan_path: str, flatfield_path: str, darkfield_path: str
) -> dict[str, Any]:
    """The flatfield step: estimate the profiles, or check the given ones; write both ``.npy``."""
    import numpy as np

    from tilefusion import flatfield

    config = load_config(config)
    settings = config["fusion"]["flatfield"]
    plan = read_plan(plan_path)
    shapes = sorted({t.shape_zyx[1:] for t in plan.tiles})
    if settings["mode"] == "files":
        if len(shapes) != 1:
            raise InputError(
                settings["flatfield"],
                "fusion.flatfield.flatfield",
                f"tiles differ in yx shape {shapes}; one profile fits tiles of one shape",
            )
        shape_yx = shapes[0]
        flat = flatfield.read_profile(
            settings["flatfield"],
            shape_yx=shape_yx,
            field="fusion.flatfield.flatfield",
            positive=True,
        )
        dark = (
            flatfield.read_profile(
                settings["darkfield"], shape_yx=shape_yx, field="fusion.flatfield.darkfield"
            )
            if settings["darkfield"]
            else np.zeros(shape_yx, dtype=np.float32)
        )
    else:
        planes, shape_yx = flatfield.sample_planes(plan, max_planes=settings["planes"])
        try:
            flat, dark = flatfield.estimate_profiles(
                planes, shape_yx=shape_yx, darkfield=settings["estimate_darkfield"]
            )
        except ValueError as exc:
            raise InputError(plan.dataset, "fusion.flatfield", str(exc)) from None
    flatfield.write_profiles(flatfield_path, darkfield_path, flat, dark)
    summary = {
        "mode": settings["mode"],
        "shape_yx": list(shape_yx),
        "flatfield_range": [float(flat.min()), float(flat.max())],
        "darkfield_mean": float(dark.mean()),
    }
    log.info("flatfield: %s", summary)
    return summary


def estimate_intensity(
    config: Mapping[str, Any],
    *,
    plan_path: str,
    output: str,
    flatfield_path: str | None = None,
    darkfield_path: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The intensity step: per-tile gain and offset from the overlaps, as JSON.

    With the flatfield step's profiles, pairs are fitted on flatfield-corrected
    values (the fusion applies the flatfield first).
    """
    import numpy as np

    from tilefusion.intensity import match_intensities, write_intensity

    config = load_config(config)
    plan = read_plan(plan_path)
    profiles = None
    if flatfield_path:
        flat = np.load(flatfield_path)
        dark = np.load(darkfield_path) if darkfield_path else np.zeros_like(flat)
        profiles = (flat, dark)
    fusion = config["fusion"]
    _check_intensity_grid(fusion)
    document = match_intensities(
        plan,
        model=fusion["intensity_model"],
        threads=threads,
        profiles=profiles,
        grid_zyx=fusion["intensity_grid"],
    )
    write_intensity(output, document)
    return document


def _seam_metrics(
    plan: Plan,
    config: Mapping[str, Any],
    *,
    seams_path: str,
    intensity_path: str | None,
    profiles_paths: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Write the seam metrics of a validated output; return their summary."""
    import numpy as np

    from tilefusion.intensity import read_intensity
    from tilefusion.seams import seam_metrics

    corrections = read_intensity(intensity_path) if intensity_path else None
    flat_path, dark_path = profiles_paths
    profiles = None
    if flat_path:
        flat = np.load(flat_path)
        profiles = (flat, np.load(dark_path) if dark_path else np.zeros_like(flat))
    try:
        metrics = seam_metrics(
            plan,
            store_path=config["output"]["path"],
            corrections=corrections,
            profiles=profiles,
        )
    except (InputError, OSError, ValueError) as exc:
        # A QC measure that cannot be taken (tiles moved since the fusion)
        # does not fail a validated output.
        log.warning("seam metrics not computed: %s", exc)
        metrics = {"pairs": [], "summary": {"error": str(exc)}}
    write_json(seams_path, metrics)
    summary = dict(metrics["summary"])
    log.info("seams: %s", summary)
    return summary


def fuse_memory_mb(plan: Plan, *, attempt: int = 1) -> int:
    """Memory a fuse job asks for: its working set, doubled on each retry.

    The working set is one shard in the output type and as float32, plus
    the tile crops of one chunk (at most ``read_block`` voxels per tile), plus
    1.2 GB for the interpreter, torch and numba: a cold numba compile (the
    first job on a node, an empty cache) alone peaks near 600 MB.
    """
    level = plan.grid
    shard_voxels = math.prod(level.shards_zyx)
    shard_bytes = shard_voxels * (2 + 4)
    working = 1200 * 2**20 + 2 * shard_bytes
    return int(math.ceil(working / 2**20) * 2 ** (attempt - 1))


def fuse_runtime_min(plan: Plan, *, attempt: int = 1) -> int:
    """Minutes a fuse job asks for, at a pessimistic 2 Mvoxel/s, doubled on each retry."""
    voxels = plan.grid.max_range_voxels()
    return int(max(10, math.ceil(voxels / 2e6 / 60 * 3)) * 2 ** (attempt - 1))


def downsample_memory_mb(plan: Plan, level: int, *, threads: int = 4, attempt: int = 1) -> int:
    """Memory a downsample job of ``level`` asks for, doubled on each retry.

    Each thread holds a shard of the level below (its factor times the shard)
    in the stored type and as float32, and the shard it writes.
    """
    shard = math.prod(plan.levels[level].shards_zyx)
    below = shard * math.prod(plan.levels[level].factor_zyx)
    working = 400 * 2**20 + max(threads, 1) * (below * (2 + 4) + shard * 2)
    return int(math.ceil(working / 2**20) * 2 ** (attempt - 1))


def downsample_runtime_min(plan: Plan, level: int, *, attempt: int = 1) -> int:
    """Minutes a downsample job asks for, at a pessimistic 5 Mvoxel/s read."""
    grid = plan.levels[level]
    voxels = grid.max_range_voxels() * math.prod(grid.factor_zyx)
    return int(max(10, math.ceil(voxels / 5e6 / 60)) * 2 ** (attempt - 1))


def validate_memory_mb(plan: Plan, *, threads: int = 4, attempt: int = 1) -> int:
    """Memory validate asks for: one stored object per hashing thread, and the interpreter."""
    biggest = math.prod(plan.grid.shards_zyx) * 8
    working = 500 * 2**20 + max(threads, 1) * biggest
    return int(math.ceil(working / 2**20) * 2 ** (attempt - 1))


def validate_runtime_min(plan: Plan, *, threads: int = 4, attempt: int = 1) -> int:
    """Minutes validate asks for: every stored byte hashed at a pessimistic 100 MB/s per thread."""
    stored = sum(math.prod(level.shape_zyx) for level in plan.levels) * 8
    minutes = stored / (100e6 * max(threads, 1)) / 60
    return int(max(10, math.ceil(minutes * 2)) * 2 ** (attempt - 1))


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_logged(log_path: str, step: Any, /, **kwargs: Any) -> Any:
    """Run a step from a Snakemake script, logging to the rule's log file.

    A user's mistake (:class:`InputError`) ends the job with its one-line
    message in the log and on stderr, not a traceback; bugs keep theirs.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return step(**kwargs)
    except InputError as error:
        log.error("tilefusion: error: %s", error)
        raise SystemExit(f"tilefusion: error: {error}") from None
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            log.exception("failed")
            raise
        # A full disk, a quota, a read-only or forbidden place: not a bug.
        line = f"{error.filename or ''}: {error.strerror}".lstrip(": ")
        log.error("tilefusion: error: %s", line)
        raise SystemExit(f"tilefusion: error: {line}") from None
    except Exception:
        log.exception("failed")
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
