"""``tilefusion`` command line: one subcommand per workflow rule.

Users' mistakes (:class:`~tilefusion.errors.InputError`) print one line and
exit with status 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilefusion import steps
from tilefusion.config import load_config, read_config_file
from tilefusion.errors import InputError

__all__ = ["main"]


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "config", None):
        return read_config_file(args.config)
    raise InputError("command line", "--config", "a config file is required")


def _cmd_demo(args: argparse.Namespace) -> None:
    from tilefusion.demo import write_demo

    dataset = write_demo(args.output)
    print(f"wrote {args.output} ({len(dataset.views)} tiles)")


def _cmd_plan(args: argparse.Namespace) -> None:
    if args.dataset:
        raw: dict[str, Any] = {"dataset": args.dataset}
        if args.config:
            raw = read_config_file(args.config)
            raw["dataset"] = args.dataset
        if args.resolution:
            raw.setdefault("output", {})["resolution"] = args.resolution
        config = load_config(raw, source="command line")
    else:
        config = _config(args)
        if args.resolution:
            config["output"]["resolution"] = args.resolution
    if args.metadata_only:
        plan = steps.plan_from_config(config, metadata_only=True)
        plan.write(args.output)
        if args.manifest:
            from tilefusion.plan import write_manifest

            write_manifest(plan, args.manifest)
    else:
        manifest = args.manifest or str(Path(args.output).with_suffix(".manifest.tsv"))
        plan = steps.write_plan(config, plan_path=args.output, manifest_path=manifest)
    summary = {k: v for k, v in plan.to_json().items() if k not in ("tiles", "levels", "settings")}
    print(json.dumps(summary))


def _cmd_prepare(args: argparse.Namespace) -> None:
    steps.prepare(_config(args), plan_path=args.plan, record_path=args.record)


def _cmd_fuse(args: argparse.Namespace) -> None:
    steps.fuse(_config(args), plan_path=args.plan, range_index=args.range, marker=args.marker)


def _cmd_downsample(args: argparse.Namespace) -> None:
    steps.downsample(
        _config(args),
        plan_path=args.plan,
        level=args.level,
        range_index=args.range,
        marker=args.marker,
    )


def _cmd_assemble(args: argparse.Namespace) -> None:
    steps.assemble(
        _config(args), plan_path=args.plan, markers=args.markers, record_path=args.record
    )


def _cmd_validate(args: argparse.Namespace) -> None:
    report = steps.validate(
        _config(args),
        plan_path=args.plan,
        markers_dir=args.markers_dir,
        report_path=args.report,
        decode_all=args.decode_all,
        seams_path=args.seams,
        intensity_path=args.intensity,
    )
    print(json.dumps({"ok": report["ok"], "levels": report["levels"]}))


def _cmd_flatfield(args: argparse.Namespace) -> None:
    summary = steps.estimate_flatfield(
        _config(args),
        plan_path=args.plan,
        flatfield_path=args.flatfield,
        darkfield_path=args.darkfield,
    )
    print(json.dumps(summary))


def _cmd_intensity(args: argparse.Namespace) -> None:
    document = steps.estimate_intensity(
        _config(args),
        plan_path=args.plan,
        output=args.output,
        flatfield_path=args.flatfield,
        darkfield_path=args.darkfield,
    )
    print(json.dumps({"tiles": document["tiles"], "pairs": len(document["pairs"])}))


def _cmd_transform_points(args: argparse.Namespace) -> None:
    from tilefusion.transforms import transform_points_in_zarr

    try:
        coordinates = json.loads(args.coordinates)
    except json.JSONDecodeError as exc:
        raise InputError("command line", "COORDINATES", f"not JSON: {exc.msg}") from None
    points = transform_points_in_zarr(args.zarr, args.source, args.target, coordinates)
    print(json.dumps({"coordinates": points}))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilefusion", description="Fuse tiled light-sheet acquisitions into OME-Zarr."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="write the synthetic demo dataset")
    p.add_argument("output", help="path of the BigStitcher XML to write")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plan", help="plan the output grid, chunks and ranges")
    p.add_argument("dataset", nargs="?", help="BigStitcher XML or tile manifest")
    p.add_argument("--config", help="config YAML (its dataset unless DATASET is given)")
    p.add_argument("--metadata-only", action="store_true", help="open no tile")
    p.add_argument("--resolution", nargs=3, type=float, metavar=("Z", "Y", "X"))
    p.add_argument("--output", required=True, help="plan JSON to write")
    p.add_argument("--manifest", help="manifest TSV to write")
    p.set_defaults(func=_cmd_plan)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="config YAML")
        p.add_argument("--plan", required=True, help="plan JSON from `tilefusion plan`")

    p = sub.add_parser("prepare", help="create (or resume) the output store")
    common(p)
    p.add_argument("--record", required=True, help="JSON record to write")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("fuse", help="fuse one range")
    common(p)
    p.add_argument("--range", type=int, required=True)
    p.add_argument("--marker", required=True, help="marker JSON to write when done")
    p.set_defaults(func=_cmd_fuse)

    p = sub.add_parser("downsample", help="build one range of one pyramid level")
    common(p)
    p.add_argument("--level", type=int, required=True)
    p.add_argument("--range", type=int, required=True)
    p.add_argument("--marker", required=True)
    p.set_defaults(func=_cmd_downsample)

    p = sub.add_parser("assemble", help="write the OME-NGFF metadata")
    common(p)
    p.add_argument("--record", required=True)
    p.add_argument("markers", nargs="+", help="every job's marker")
    p.set_defaults(func=_cmd_assemble)

    p = sub.add_parser("validate", help="check every stored object and the metadata")
    common(p)
    p.add_argument("--markers-dir", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--decode-all", action="store_true", help="decode every object, not one per job")
    p.add_argument("--seams", help="seam metrics JSON to write (summary in the report)")
    p.add_argument("--intensity", help="the intensity JSON the fusion applied")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("flatfield", help="estimate (or check) the flatfield and darkfield")
    common(p)
    p.add_argument("--flatfield", required=True, help="flatfield .npy to write")
    p.add_argument("--darkfield", required=True, help="darkfield .npy to write")
    p.set_defaults(func=_cmd_flatfield)

    p = sub.add_parser("intensity", help="per-tile gain and offset from the overlaps")
    common(p)
    p.add_argument("--output", required=True, help="intensity JSON to write")
    p.add_argument("--flatfield", help="flatfield .npy the fusion applies first")
    p.add_argument("--darkfield", help="darkfield .npy the fusion applies first")
    p.set_defaults(func=_cmd_intensity)

    p = sub.add_parser(
        "transform-points",
        help="map points between coordinate systems of an OME-Zarr 0.6 scene (RFC-5)",
    )
    p.add_argument("zarr", help="OME-Zarr group whose attributes hold ome.scene")
    p.add_argument("source", help="coordinate system of the points")
    p.add_argument("target", help="coordinate system to map them to")
    p.add_argument("coordinates", help="JSON list of points, e.g. [[1, 2], [3, 4]]")
    p.set_defaults(func=_cmd_transform_points)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        args.func(args)
    except InputError as exc:
        print(f"tilefusion: error: {exc}", file=sys.stderr)
        if args.command == "transform-points":
            # The RFC-5 conformance protocol reads an Error object from stdout.
            print(json.dumps({"message": str(exc)}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
