"""Read and write BigDataViewer / BigStitcher SpimData XML.

Conventions (BigStitcher's, kept exactly)
-----------------------------------------
- ``<affine>`` holds 12 numbers: a row-major 3x4 matrix acting on **xyz**;
  :func:`tilefusion.geometry.affine_from_bdv` turns it into a zyx 4x4.
- A view's model is ``T0 T1 ... Tn`` over its ``<ViewTransform>`` elements in
  XML order: the **last** listed is applied **first** to voxel coordinates.
- ``<size>`` and ``<voxelSize><size>`` are xyz; the model maps voxel indices
  (zyx, voxel centres) to world coordinates.
- Relative paths are relative to ``<BasePath>``, itself relative to the XML's
  folder.

Image loaders
-------------
``bdv.multimg.zarr`` (versions 1.0 and 3.0, optional ``<s3bucket>``),
``bdv.n5`` (key ``setup{S}/timepoint{T}/s0``), ``bdv.hdf5`` (key
``t{T:05d}/s{S:02d}/0/cells``) and ``spimreconstruction.filemap2`` (one TIFF
per view) give readable sources. Any other loader (``bdv.remote``,
``bdv.n5.s3``, ``ome.zarr.s3``, legacy ``viewer.hdf5.Hdf5ImageLoader``, none)
still yields the geometry, with an ``unsupported`` source whose opening fails
naming the file and the loader.

Sources name full resolution (level 0). The further levels a container
stores (BDV HDF5 ``s{S}/resolutions``, N5 ``downsamplingFactors``, OME-Zarr
multiscales) are not in the XML; :func:`tilefusion.readers.arrays.stored_levels`
reads them from the container when an output is coarser than the tiles (see
:func:`tilefusion.plan.make_plan`).

Validity
--------
Every view (setup x timepoint, less ``<MissingViews>``) must have a setup
``<size>`` and a ``<ViewRegistration>``, and a readable loader must locate its
pixels; otherwise :class:`~tilefusion.errors.InputError` names the view. An
unregistered view is an error, not skipped, since fusing it at an unknown
place (or silently without it) is wrong.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.geometry import affine_to_bdv, check_affine, compose
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.transforms import ParseContext, chain_calibration, parse_chain
from tilefusion.transforms import Sequence as Sequence_

__all__ = [
    "BdvViewSpec",
    "normalize_unit",
    "parse_integer_pattern",
    "read_bdv_xml",
    "write_bdv_xml",
]

_UNITS = {
    "µm": "micrometer",
    "μm": "micrometer",
    "um": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "micrometre": "micrometer",
    "micrometers": "micrometer",
    "nm": "nanometer",
    "nanometer": "nanometer",
    "nanometre": "nanometer",
    "nanometers": "nanometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "millimetre": "millimeter",
    "cm": "centimeter",
    "centimeter": "centimeter",
    "centimetre": "centimeter",
    "m": "meter",
    "meter": "meter",
    "metre": "meter",
    "pm": "picometer",
    "picometer": "picometer",
    "å": "angstrom",
    "angstrom": "angstrom",
    "px": "pixel",
    "pixel": "pixel",
    "pixels": "pixel",
}

_READABLE_LOADERS = ("bdv.multimg.zarr", "bdv.n5", "bdv.hdf5", "spimreconstruction.filemap2")
_TIFF_SUFFIXES = (".tif", ".tiff")


def normalize_unit(name: str) -> str:
    """Return the OME-NGFF name of a unit (``µm`` → ``micrometer``).

    Names it does not know are returned stripped but otherwise unchanged;
    pixel units (``px``) become ``"pixel"``.
    """
    key = name.strip()
    return _UNITS.get(key.lower(), _UNITS.get(key, key))


def parse_integer_pattern(text: str) -> list[int]:
    """Expand a BDV integer pattern: ``"0"``, ``"0-5"``, ``"1,3,5"``, ``"0-10:2"``.

    Raises
    ------
    ValueError
        If a part is not ``N``, ``A-B`` or ``A-B:STEP`` with ``STEP > 0``.
    """
    out: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        body, _, step_text = part.partition(":")
        step = int(step_text) if step_text else 1
        if step <= 0:
            raise ValueError(f"step must be positive in {part!r}")
        # A leading '-' is a negative number, not a range.
        dash = body.find("-", 1)
        if dash < 0:
            if step_text:
                raise ValueError(f"a step needs a range in {part!r}")
            out.append(int(body))
        else:
            first, last = int(body[:dash]), int(body[dash + 1 :])
            out.extend(range(first, last + 1, step))
    return out


# ---------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class _Setup:
    size_zyx: tuple[int, int, int] | None
    voxel_zyx: tuple[float, float, float]
    unit: str
    attributes: dict[str, int]


def read_bdv_xml(path: str | os.PathLike[str]) -> Dataset:
    """Read a BigDataViewer / BigStitcher XML into a :class:`Dataset`.

    Parameters
    ----------
    path : str or path-like
        The SpimData XML.

    Returns
    -------
    Dataset
        One view per (timepoint, setup) not listed as missing, in
        (timepoint, setup) order, unit normalised to an OME-NGFF name.

    Raises
    ------
    InputError
        The file is missing or malformed, a view lacks a size, registration
        or file, a transform is not an invertible affine, setups disagree on
        the unit, or no view is left.
    """
    src = str(path)
    xml_path = Path(path)
    root = _parse(xml_path, src)
    if root.tag != "SpimData":
        raise InputError(src, root.tag, "not a SpimData XML (root element must be <SpimData>)")
    base = _base_path(root, xml_path, src)
    seq = root.find("SequenceDescription")
    if seq is None:
        raise InputError(src, "SequenceDescription", "missing: the XML describes no views")
    setups = _parse_setups(seq, src)
    timepoints = _parse_timepoints(seq, src)
    missing = _parse_missing(seq, src)
    registrations = _parse_registrations(root, src)
    locate = _parse_loader(seq, base, src)

    units = {s.unit for s in setups.values()}
    if len(units) > 1:
        raise InputError(src, "voxelSize/unit", f"setups use different units: {sorted(units)}")
    unit = units.pop()

    views: list[View] = []
    for tp in timepoints:
        for sid in sorted(setups):
            if (tp, sid) in missing:
                continue
            setup = setups[sid]
            where = f"timepoint={tp} setup={sid}"
            if setup.size_zyx is None:
                raise InputError(
                    src,
                    f"ViewSetup id={sid}",
                    "has no <size> (legacy SpimData layouts with width/height/depth "
                    "are not supported; re-save the project in BigStitcher)",
                )
            reg = registrations.get((tp, sid))
            if reg is None:
                raise InputError(
                    src,
                    f"ViewRegistration {where}",
                    "missing: the view is not registered (add it or list it in <MissingViews>)",
                )
            model, calibration, chain = reg
            views.append(
                View(
                    setup=sid,
                    timepoint=tp,
                    shape_zyx=setup.size_zyx,
                    voxel_size_zyx=setup.voxel_zyx,
                    model=model,
                    source=locate(sid, tp),
                    attributes=dict(setup.attributes),
                    calibration_zyx=calibration,
                    transform=chain,
                )
            )
    if not views:
        raise InputError(src, "ViewSetups", "no view left after removing <MissingViews>")
    return Dataset(src, unit, tuple(views))


def _parse(xml_path: Path, src: str) -> ET.Element:
    try:
        if fs.is_url(src):
            return ET.fromstring(fs.read_bytes(src))
        return ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise InputError(src, "", "file not found") from None
    except ET.ParseError as exc:
        raise InputError(src, "XML", f"malformed or truncated XML: {exc}") from None
    except OSError as exc:
        raise InputError(src, "", f"cannot read: {exc.strerror or exc}") from None


def _text(elem: ET.Element | None) -> str:
    return (elem.text or "").strip() if elem is not None else ""


def _int(text: str | None, *, src: str, field: str) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        raise InputError(src, field, f"not an integer: {text!r}") from None


def _floats(text: str, count: int, *, src: str, field: str) -> list[float]:
    parts = text.split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise InputError(src, field, f"not {count} numbers: {text.strip()!r}") from None
    if len(values) != count:
        raise InputError(src, field, f"expected {count} numbers, got {len(values)}")
    return values


def _base_path(root: ET.Element, xml_path: Path, src: str) -> Path | str:
    """The folder relative paths start from: a URL (a string) for an XML at a URL."""
    elem = root.find("BasePath")
    text = _text(elem)
    if fs.is_url(src):
        absolute = elem is not None and elem.get("type", "relative") == "absolute"
        return text if absolute and text else fs.join(fs.parent(src), text)
    folder = xml_path.resolve().parent
    if not text:
        return folder
    if elem is not None and elem.get("type", "relative") == "absolute":
        return Path(text)
    return (folder / text).resolve()


def _parse_setups(seq: ET.Element, src: str) -> dict[int, _Setup]:
    setups: dict[int, _Setup] = {}
    elems = seq.findall("ViewSetups/ViewSetup")
    if not elems:
        raise InputError(
            src, "SequenceDescription/ViewSetups", "no <ViewSetup>: the XML describes no views"
        )
    for elem in elems:
        sid = _int(_text(elem.find("id")), src=src, field="ViewSetup/id")
        where = f"ViewSetup id={sid}"
        if sid in setups:
            raise InputError(src, where, "duplicate setup id")
        size = None
        size_text = _text(elem.find("size"))
        if size_text:
            xyz = _floats(size_text, 3, src=src, field=f"{where} size")
            if any(v != int(v) or v <= 0 for v in xyz):
                raise InputError(src, f"{where} size", f"sizes must be positive integers: {xyz}")
            size = (int(xyz[2]), int(xyz[1]), int(xyz[0]))
        voxel: tuple[float, float, float] = (1.0, 1.0, 1.0)
        unit = "pixel"
        vs = elem.find("voxelSize")
        if vs is not None:
            v = _floats(_text(vs.find("size")), 3, src=src, field=f"{where} voxelSize")
            if not all(np.isfinite(v)) or min(v) <= 0:
                raise InputError(src, f"{where} voxelSize", f"must be positive: {v}")
            voxel = (v[2], v[1], v[0])
            unit = normalize_unit(_text(vs.find("unit")) or "pixel")
        attributes = {
            child.tag: _int(child.text, src=src, field=f"{where} attributes/{child.tag}")
            for child in elem.findall("attributes/*")
        }
        setups[sid] = _Setup(size, voxel, unit, attributes)
    return setups


def _parse_timepoints(seq: ET.Element, src: str) -> list[int]:
    elem = seq.find("Timepoints")
    if elem is None:
        raise InputError(src, "Timepoints", "missing <Timepoints>")
    kind = elem.get("type", "")
    field = f"Timepoints type={kind!r}"
    if kind == "range":
        first = _int(_text(elem.find("first")), src=src, field=f"{field} first")
        last = _int(_text(elem.find("last")), src=src, field=f"{field} last")
        tps = list(range(first, last + 1))
    elif kind == "pattern":
        try:
            tps = parse_integer_pattern(_text(elem.find("integerpattern")))
        except ValueError as exc:
            raise InputError(src, f"{field} integerpattern", str(exc)) from None
    elif kind == "list":
        tps = [
            _int(_text(tp.find("id")), src=src, field=f"{field} Timepoint/id")
            for tp in elem.findall("Timepoint")
        ]
    else:
        raise InputError(src, field, "unknown type (expected range, pattern or list)")
    if not tps:
        raise InputError(src, field, "lists no timepoint")
    return sorted(set(tps))


def _parse_missing(seq: ET.Element, src: str) -> set[tuple[int, int]]:
    return {
        (
            _int(m.get("timepoint"), src=src, field="MissingView timepoint"),
            _int(m.get("setup"), src=src, field="MissingView setup"),
        )
        for m in seq.findall("MissingViews/MissingView")
    }


_Registration = tuple[NDArray[np.float64], tuple[float, float, float] | None, Sequence_]


def _parse_registrations(root: ET.Element, src: str) -> dict[tuple[int, int], _Registration]:
    out: dict[tuple[int, int], _Registration] = {}
    for reg in root.iterfind("ViewRegistrations/ViewRegistration"):
        tp = _int(reg.get("timepoint"), src=src, field="ViewRegistration timepoint")
        sid = _int(reg.get("setup"), src=src, field="ViewRegistration setup")
        where = f"ViewRegistration timepoint={tp} setup={sid}"
        if (tp, sid) in out:
            raise InputError(src, where, "listed twice")
        items: list[dict[str, object]] = []
        for k, vt in enumerate(reg.findall("ViewTransform")):
            name = _text(vt.find("Name"))
            field = f"{where} ViewTransform {k} ({name or 'unnamed'})"
            if vt.get("type", "affine") != "affine":
                raise InputError(
                    src, field, f"type {vt.get('type')!r} is not supported (only 'affine')"
                )
            numbers = _floats(_text(vt.find("affine")), 12, src=src, field=field)
            items.append({"affine": numbers, "name": name})
        # The same parser as tile manifests: each <ViewTransform> is an affine item.
        chain = parse_chain(items, ParseContext(src, f"{where} ViewTransform"))
        calibration = chain_calibration(chain)
        matrix = chain.as_affine()
        assert matrix is not None  # XML chains hold affines only
        model = check_affine(matrix, source=src, field=where)
        out[(tp, sid)] = (model, calibration, chain)
    return out


def _join(base: str, *parts: str) -> str:
    """Join path parts, keeping URIs (``s3://...``) as URIs."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def _loader_path(elem: ET.Element | None, base: Path | str, *, src: str, field: str) -> str:
    text = _text(elem)
    if elem is None or not text:
        raise InputError(src, field, "missing path")
    if "://" in text or elem.get("type", "relative") == "absolute":
        return text
    if isinstance(base, str):  # a URL
        return fs.join(base, text)
    return str((base / text).resolve())


def _parse_loader(seq: ET.Element, base: Path | str, src: str) -> Callable[[int, int], ArraySource]:
    elem = seq.find("ImageLoader")
    if elem is None:
        return lambda s, t: ArraySource("unsupported", src, "(no ImageLoader)")
    name = elem.get("format") or elem.get("class") or "(unnamed ImageLoader)"
    field = f"ImageLoader format={name}"
    if name == "bdv.n5":
        container = _loader_path(elem.find("n5"), base, src=src, field=f"{field} n5")
        return lambda s, t: ArraySource("n5", container, _fixed_key(name, s, t))
    if name == "bdv.hdf5":
        h5 = _loader_path(elem.find("hdf5"), base, src=src, field=f"{field} hdf5")
        return lambda s, t: ArraySource("hdf5", h5, _fixed_key(name, s, t))
    if name == "bdv.multimg.zarr":
        return _multimg_zarr(elem, base, src=src, field=field)
    if name == "spimreconstruction.filemap2":
        return _filemap(elem, base, src=src, field=field)
    return lambda s, t: ArraySource("unsupported", src, name)


def _multimg_zarr(
    elem: ET.Element, base: Path | str, *, src: str, field: str
) -> Callable[[int, int], ArraySource]:
    zarr_elem = elem.find("zarr")
    bucket = _text(elem.find("s3bucket"))
    if bucket:
        root = f"s3://{bucket}/{_text(zarr_elem).lstrip('/')}"
    else:
        root = _loader_path(zarr_elem, base, src=src, field=f"{field} zarr")
    groups: dict[tuple[int, int], str] = {}
    for zg in elem.iterfind("zgroups/zgroup"):
        sid = _int(zg.get("setup"), src=src, field=f"{field} zgroup setup")
        tp_text = zg.get("timepoint", zg.get("tp"))
        tp = _int(tp_text, src=src, field=f"{field} zgroup timepoint")
        where = f"{field} zgroup setup={sid} timepoint={tp}"
        rel = zg.get("path") or _text(zg.find("path"))
        if not rel:
            raise InputError(src, where, "has no path")
        indices = (zg.get("indicies") or zg.get("indices") or "").split()
        if any(v.strip() != "0" for v in indices):
            raise InputError(src, where, f"indicies {' '.join(indices)!r}: only '0 0' is supported")
        groups[(tp, sid)] = _join(root, rel)

    def locate(sid: int, tp: int) -> ArraySource:
        try:
            return ArraySource("zarr", groups[(tp, sid)])
        except KeyError:
            raise InputError(
                src, f"{field} zgroups", f"no zgroup for timepoint={tp} setup={sid}"
            ) from None

    return locate


def _filemap(
    elem: ET.Element, base: Path | str, *, src: str, field: str
) -> Callable[[int, int], ArraySource]:
    files_elem = elem.find("files")
    if files_elem is None or files_elem.find("FileMapping") is None:
        raise InputError(
            src, f"{field} files", "missing or empty <files>: no view has an image file"
        )
    files: dict[tuple[int, int], ArraySource] = {}
    for fm in files_elem.iterfind("FileMapping"):
        sid = _int(fm.get("view_setup"), src=src, field=f"{field} FileMapping view_setup")
        tp = _int(fm.get("timepoint"), src=src, field=f"{field} FileMapping timepoint")
        where = f"{field} FileMapping view_setup={sid} timepoint={tp}"
        path = _loader_path(fm.find("file"), base, src=src, field=where)
        series = _int(fm.get("series", "0"), src=src, field=f"{where} series")
        channel = _int(fm.get("channel", "0"), src=src, field=f"{where} channel")
        if path.lower().endswith(_TIFF_SUFFIXES):
            files[(tp, sid)] = ArraySource("tiff", path, f"series={series},channel={channel}")
        else:
            suffix = PurePosixPath(path).suffix or "(no extension)"
            files[(tp, sid)] = ArraySource(
                "unsupported", path, f"spimreconstruction.filemap2 {suffix} file"
            )

    def locate(sid: int, tp: int) -> ArraySource:
        try:
            return files[(tp, sid)]
        except KeyError:
            raise InputError(
                src, f"{field} files", f"no FileMapping for timepoint={tp} setup={sid}"
            ) from None

    return locate


# ---------------------------------------------------------------------------
# writing


Chain = Sequence[tuple[str, ArrayLike]]


@dataclass(frozen=True)
class BdvViewSpec:
    """One view to write with :func:`write_bdv_xml`.

    Attributes
    ----------
    setup, timepoint : int
        BDV ids.
    shape_zyx : tuple of int
        Array shape.
    voxel_size_zyx : tuple of float
        Physical voxel size.
    chain : sequence of (str, array_like of shape (4, 4))
        Named zyx affines in XML order (the last is applied first).
    location : str
        ``bdv.multimg.zarr``: the view's Zarr group (or array). ``bdv.n5`` and
        ``bdv.hdf5``: the container, the same for every view (pixels live at
        the loader's fixed keys). Relative to the XML's folder, or absolute.
    attributes : mapping of str to int
        ``channel``, ``illumination``, ``tile``, ``angle``.
    """

    setup: int
    timepoint: int
    shape_zyx: tuple[int, int, int]
    voxel_size_zyx: tuple[float, float, float]
    chain: Chain
    location: str
    attributes: Mapping[str, int] = field(default_factory=dict)


def write_bdv_xml(
    path: str | os.PathLike[str],
    views_with_chains: Iterable[BdvViewSpec | tuple[View, Chain]],
    *,
    unit: str = "micrometer",
    loader: str = "bdv.multimg.zarr",
) -> Path:
    """Write a SpimData XML that :func:`read_bdv_xml` reads back.

    Parameters
    ----------
    path : str or path-like
        The XML to write.
    views_with_chains : iterable of BdvViewSpec or (View, chain)
        The views. A ``(View, chain)`` pair takes setup, timepoint, shape,
        voxel size, attributes and location from the view (``source.path``,
        plus ``source.key`` for Zarr unless it is ``""`` or ``"0"``, the level
        :func:`~tilefusion.readers.arrays.open_array` picks anyway); its chain
        must compose to ``view.model``. A chain is ``(name, 4x4 zyx affine)``
        pairs in XML order (the last is applied first). Setups missing at
        some timepoint are written as ``<MissingViews>``.
    unit : str
        Voxel size unit, written as given.
    loader : {"bdv.multimg.zarr", "bdv.n5", "bdv.hdf5"}
        Image loader. ``bdv.multimg.zarr`` is written in version 3.0 style,
        one ``<zgroup>`` per view. ``bdv.n5`` and ``bdv.hdf5`` need every view
        in one container at the loader's fixed key
        (``setup{S}/timepoint{T}/s0``, ``t{T:05d}/s{S:02d}/0/cells``).
        Absolute locations inside the XML's folder are written relative to it.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        For an unknown loader, no views, duplicate views, a chain that does
        not compose to its view's model, a setup whose shape, voxel size or
        attributes change between timepoints, or locations the loader cannot
        express.
    """
    if loader not in ("bdv.multimg.zarr", "bdv.n5", "bdv.hdf5"):
        raise ValueError(f"unknown loader {loader!r}")
    specs = sorted(
        (_as_spec(v, loader) for v in views_with_chains), key=lambda v: (v.timepoint, v.setup)
    )
    if not specs:
        raise ValueError("write_bdv_xml needs at least one view")
    if len({(v.timepoint, v.setup) for v in specs}) != len(specs):
        raise ValueError("duplicate (timepoint, setup) views")
    setups: dict[int, BdvViewSpec] = {}
    for v in specs:
        first = setups.setdefault(v.setup, v)
        if (tuple(first.shape_zyx), tuple(first.voxel_size_zyx), dict(first.attributes)) != (
            tuple(v.shape_zyx),
            tuple(v.voxel_size_zyx),
            dict(v.attributes),
        ):
            raise ValueError(f"setup {v.setup} changes shape, voxel size or attributes")

    out = Path(path)
    folder = out.resolve().parent
    root = ET.Element("SpimData", version="0.2")
    ET.SubElement(root, "BasePath", type="relative").text = "."
    seq = ET.SubElement(root, "SequenceDescription")
    seq.append(_loader_element(specs, loader, folder))
    vs_elem = ET.SubElement(seq, "ViewSetups")
    for sid in sorted(setups):
        s = setups[sid]
        e = ET.SubElement(vs_elem, "ViewSetup")
        ET.SubElement(e, "id").text = str(sid)
        ET.SubElement(e, "name").text = f"setup {sid}"
        ET.SubElement(e, "size").text = " ".join(str(int(n)) for n in s.shape_zyx[::-1])
        vox = ET.SubElement(e, "voxelSize")
        ET.SubElement(vox, "unit").text = unit
        ET.SubElement(vox, "size").text = " ".join(repr(float(x)) for x in s.voxel_size_zyx[::-1])
        if s.attributes:
            attrs = ET.SubElement(e, "attributes")
            for k, val in s.attributes.items():
                ET.SubElement(attrs, k).text = str(int(val))
    tps = sorted({v.timepoint for v in specs})
    tp_elem = ET.SubElement(seq, "Timepoints", type="pattern")
    ET.SubElement(tp_elem, "integerpattern").text = ", ".join(str(t) for t in tps)
    present = {(v.timepoint, v.setup) for v in specs}
    missing = ET.SubElement(seq, "MissingViews")
    for t in tps:
        for sid in sorted(setups):
            if (t, sid) not in present:
                ET.SubElement(missing, "MissingView", timepoint=str(t), setup=str(sid))
    regs = ET.SubElement(root, "ViewRegistrations")
    for v in specs:
        reg = ET.SubElement(
            regs, "ViewRegistration", timepoint=str(v.timepoint), setup=str(v.setup)
        )
        for name, affine in v.chain:
            vt = ET.SubElement(reg, "ViewTransform", type="affine")
            ET.SubElement(vt, "Name").text = name
            numbers = affine_to_bdv(np.asarray(affine, dtype=np.float64))
            ET.SubElement(vt, "affine").text = " ".join(repr(x) for x in numbers)
    ET.indent(root)
    ET.ElementTree(root).write(out, encoding="UTF-8", xml_declaration=True)
    return out


def _as_spec(item: BdvViewSpec | tuple[View, Chain], loader: str) -> BdvViewSpec:
    if isinstance(item, BdvViewSpec):
        return item
    view, chain = item
    composed = compose(*(np.asarray(a, dtype=np.float64) for _, a in chain))
    if not np.allclose(composed, view.model, rtol=1e-9, atol=1e-9):
        raise ValueError(f"view {view.name}: the chain does not compose to the view's model")
    wanted = {"bdv.multimg.zarr": "zarr", "bdv.n5": "n5", "bdv.hdf5": "hdf5"}[loader]
    source = view.source
    if source.format != wanted:
        raise ValueError(f"view {view.name}: {loader} needs {wanted} sources, not {source.format}")
    location = source.path
    if loader == "bdv.multimg.zarr":
        if source.key.strip("/") not in ("", "0"):
            location = _join(location, source.key.strip("/"))
    elif source.key.strip("/") != _fixed_key(loader, view.setup, view.timepoint):
        raise ValueError(
            f"view {view.name}: {loader} stores it at "
            f"{_fixed_key(loader, view.setup, view.timepoint)!r}, not {source.key!r}"
        )
    return BdvViewSpec(
        setup=view.setup,
        timepoint=view.timepoint,
        shape_zyx=view.shape_zyx,
        voxel_size_zyx=view.voxel_size_zyx,
        chain=list(chain),
        location=location,
        attributes=dict(view.attributes),
    )


def _path_element(location: str, folder: Path) -> tuple[str, str]:
    """``(type, text)`` of a path element: relative when inside ``folder``."""
    if "://" in location:
        return "absolute", location
    target = Path(location)
    if not target.is_absolute():
        return "relative", target.as_posix()
    if target.resolve().is_relative_to(folder):
        return "relative", target.resolve().relative_to(folder).as_posix()
    return "absolute", str(target)


def _loader_element(specs: Sequence[BdvViewSpec], loader: str, folder: Path) -> ET.Element:
    elem = ET.Element("ImageLoader", format=loader)
    if loader == "bdv.multimg.zarr":
        elem.set("version", "3.0")
        ET.SubElement(elem, "zarr", type="relative").text = "."
        groups = ET.SubElement(elem, "zgroups")
        for v in specs:
            # A zgroup path joins the <zarr> base; absolute paths survive the join.
            _kind, text = _path_element(v.location, folder)
            ET.SubElement(
                groups,
                "zgroup",
                setup=str(v.setup),
                tp=str(v.timepoint),
                path=text,
                indicies="0 0",
            )
        return elem
    containers = {v.location for v in specs}
    if len(containers) != 1:
        raise ValueError(f"{loader} keeps every view in one container, got {sorted(containers)}")
    kind, text = _path_element(containers.pop(), folder)
    ET.SubElement(elem, "n5" if loader == "bdv.n5" else "hdf5", type=kind).text = text
    return elem


def _fixed_key(loader: str, setup: int, timepoint: int) -> str:
    if loader == "bdv.n5":
        return f"setup{setup}/timepoint{timepoint}/s0"
    return f"t{timepoint:05d}/s{setup:02d}/0/cells"
