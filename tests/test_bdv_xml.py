"""BigStitcher / BigDataViewer XML: conventions, loaders, errors, real files."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from tilefusion import geometry
from tilefusion.errors import InputError
from tilefusion.readers import ArraySource, check_arrays, open_array, read_dataset
from tilefusion.readers.arrays import write_n5_array
from tilefusion.readers.base import View
from tilefusion.readers.bdv_xml import (
    BdvViewSpec,
    normalize_unit,
    parse_integer_pattern,
    read_bdv_xml,
    write_bdv_xml,
)


def _shared_data() -> Path:
    env = os.environ.get("TILEFUSION_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


XMLS = _shared_data() / "bigstitcher-xml"
TILES = _shared_data() / "real-tiles"
needs_xmls = pytest.mark.skipif(not XMLS.is_dir(), reason="shared bigstitcher-xml not present")
needs_tiles = pytest.mark.skipif(not TILES.is_dir(), reason="shared real-tiles not present")

IDENTITY12 = "1 0 0 0 0 1 0 0 0 0 1 0"


def _xml(
    *,
    setups: str | None = None,
    timepoints: str = '<Timepoints type="range"><first>0</first><last>0</last></Timepoints>',
    missing: str = "",
    registrations: str | None = None,
    loader: str = '<ImageLoader format="bdv.n5"><n5 type="relative">d.n5</n5></ImageLoader>',
    base: str = ".",
) -> str:
    if setups is None:
        setups = _setup(0)
    if registrations is None:
        registrations = _registration(0, 0, ("calibration", "1 0 0 0 0 1 0 0 0 0 2 0"))
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<SpimData version="0.2">
  <BasePath type="relative">{base}</BasePath>
  <SequenceDescription>
    {loader}
    <ViewSetups>{setups}</ViewSetups>
    {timepoints}
    <MissingViews>{missing}</MissingViews>
  </SequenceDescription>
  <ViewRegistrations>{registrations}</ViewRegistrations>
</SpimData>"""


def _setup(
    sid: int, *, size: str = "30 20 10", voxel: str = "0.5 0.5 1.0", unit: str = "µm"
) -> str:
    return f"""<ViewSetup><id>{sid}</id><size>{size}</size>
      <voxelSize><unit>{unit}</unit><size>{voxel}</size></voxelSize>
      <attributes><illumination>0</illumination><channel>{sid % 2}</channel>
        <tile>{sid}</tile><angle>0</angle></attributes></ViewSetup>"""


def _registration(tp: int, sid: int, *chain: tuple[str, str]) -> str:
    transforms = "".join(
        f'<ViewTransform type="affine"><Name>{n}</Name><affine>{a}</affine></ViewTransform>'
        for n, a in chain
    )
    return f'<ViewRegistration timepoint="{tp}" setup="{sid}">{transforms}</ViewRegistration>'


def _write(tmp_path: Path, text: str, name: str = "dataset.xml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- conventions ------------------------------------------------------------------


def test_chain_last_listed_is_applied_first(tmp_path: Path) -> None:
    reg = _registration(
        0,
        0,
        ("translation", "1 0 0 10 0 1 0 20 0 0 1 30"),  # x += 10, y += 20, z += 30
        ("calibration", "1 0 0 0 0 1 0 0 0 0 2 0"),  # z *= 2
    )
    view = read_bdv_xml(_write(tmp_path, _xml(registrations=reg))).views[0]
    # Calibration first (z = 1 -> 2), then the translation (z -> 32).
    world = geometry.transform_points(view.model, [[1.0, 0.0, 0.0]])[0]
    np.testing.assert_allclose(world, [32.0, 20.0, 10.0])
    world = geometry.transform_points(view.model, [[0.0, 0.0, 1.0]])[0]
    np.testing.assert_allclose(world, [30.0, 20.0, 11.0])
    assert view.calibration_zyx == (2.0, 1.0, 1.0)


def test_xyz_sizes_become_zyx(tmp_path: Path) -> None:
    setups = _setup(0, size="30 20 10", voxel="0.25 0.5 2.0")
    view = read_bdv_xml(_write(tmp_path, _xml(setups=setups))).views[0]
    assert view.shape_zyx == (10, 20, 30)
    assert view.voxel_size_zyx == (2.0, 0.5, 0.25)
    assert view.attributes == {"illumination": 0, "channel": 0, "tile": 0, "angle": 0}


def test_affine_rows_are_xyz(tmp_path: Path) -> None:
    # x' = y (row 0 reads column 1): a voxel step along y moves the world x.
    reg = _registration(0, 0, ("swap", "0 1 0 0 1 0 0 0 0 0 1 0"))
    view = read_bdv_xml(_write(tmp_path, _xml(registrations=reg))).views[0]
    world = geometry.transform_points(view.model, [[0.0, 1.0, 0.0]])[0]
    np.testing.assert_allclose(world, [0.0, 0.0, 1.0])
    assert view.calibration_zyx is None


def test_calibration_needs_the_name_and_a_diagonal(tmp_path: Path) -> None:
    reg = _registration(
        0, 0, ("Calibration", "1 0 0 0 0 1 0 0 0 0 3 0"), ("other", "1 0 0 0 0 1 0 0 0 0 2 0")
    )
    view = read_bdv_xml(_write(tmp_path, _xml(registrations=reg))).views[0]
    assert view.calibration_zyx == (3.0, 1.0, 1.0)
    reg = _registration(0, 0, ("calibration", "1 0 0 5 0 1 0 0 0 0 3 0"))
    assert read_bdv_xml(_write(tmp_path, _xml(registrations=reg))).views[0].calibration_zyx is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("µm", "micrometer"),
        ("μm", "micrometer"),  # Greek mu, not the micro sign
        ("um", "micrometer"),
        ("micron", "micrometer"),
        ("micrometer", "micrometer"),
        ("nm", "nanometer"),
        ("mm", "millimeter"),
        ("cm", "centimeter"),
        ("px", "pixel"),
        ("parsec", "parsec"),
    ],
)
def test_unit_names(tmp_path: Path, given: str, expected: str) -> None:
    assert normalize_unit(given) == expected
    setups = _setup(0, unit=given)
    assert read_bdv_xml(_write(tmp_path, _xml(setups=setups))).unit == expected


def test_setups_with_different_units_are_refused(tmp_path: Path) -> None:
    setups = _setup(0, unit="µm") + _setup(1, unit="nm")
    regs = _registration(0, 0, ("a", IDENTITY12)) + _registration(0, 1, ("a", IDENTITY12))
    with pytest.raises(InputError, match=r"voxelSize/unit: setups use different units"):
        read_bdv_xml(_write(tmp_path, _xml(setups=setups, registrations=regs)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0-5", [0, 1, 2, 3, 4, 5]),
        ("1,3,5", [1, 3, 5]),
        ("0-10:2", [0, 2, 4, 6, 8, 10]),
        ("0, 1-3, 40-50:10", [0, 1, 2, 3, 40, 50]),
        (" 7 ", [7]),
    ],
)
def test_integer_pattern(text: str, expected: list[int]) -> None:
    assert parse_integer_pattern(text) == expected


@pytest.mark.parametrize("text", ["a", "1-", "0-4:0", "3:2"])
def test_bad_integer_pattern(text: str) -> None:
    with pytest.raises(ValueError):
        parse_integer_pattern(text)


@pytest.mark.parametrize(
    "timepoints",
    [
        '<Timepoints type="range"><first>2</first><last>4</last></Timepoints>',
        '<Timepoints type="pattern"><integerpattern>2-4</integerpattern></Timepoints>',
        '<Timepoints type="list"><Timepoint><id>4</id></Timepoint><Timepoint><id>2</id>'
        "</Timepoint><Timepoint><id>3</id></Timepoint></Timepoints>",
    ],
)
def test_timepoints_and_missing_views(tmp_path: Path, timepoints: str) -> None:
    setups = _setup(0) + _setup(1)
    regs = "".join(_registration(t, s, ("a", IDENTITY12)) for t in (2, 3, 4) for s in (0, 1))
    missing = '<MissingView timepoint="3" setup="1" />'
    xml = _xml(setups=setups, timepoints=timepoints, missing=missing, registrations=regs)
    ds = read_bdv_xml(_write(tmp_path, xml))
    assert [v.name for v in ds.views] == ["t2-s0", "t2-s1", "t3-s0", "t4-s0", "t4-s1"]
    assert [v.attributes["channel"] for v in ds.views] == [0, 1, 0, 0, 1]


# --- image loaders ----------------------------------------------------------------


def test_n5_and_hdf5_keys(tmp_path: Path) -> None:
    view = read_bdv_xml(_write(tmp_path, _xml())).views[0]
    assert view.source == ArraySource("n5", str(tmp_path / "d.n5"), "setup0/timepoint0/s0")
    loader = '<ImageLoader format="bdv.hdf5"><hdf5 type="absolute">/x/f.h5</hdf5></ImageLoader>'
    view = read_bdv_xml(_write(tmp_path, _xml(loader=loader))).views[0]
    assert view.source == ArraySource("hdf5", "/x/f.h5", "t00000/s00/0/cells")


def test_relative_paths_follow_base_path(tmp_path: Path) -> None:
    view = read_bdv_xml(_write(tmp_path, _xml(base="sub/dir"))).views[0]
    assert view.source.path == str(tmp_path / "sub" / "dir" / "d.n5")


def test_multimg_zarr_v1(tmp_path: Path) -> None:
    loader = """<ImageLoader format="bdv.multimg.zarr" version="1.0">
      <zarr type="relative">
          data.ome.zarr
      </zarr>
      <zgroups><zgroup setup="0" timepoint="0"><path>tile0.zarr</path></zgroup></zgroups>
    </ImageLoader>"""
    view = read_bdv_xml(_write(tmp_path, _xml(loader=loader))).views[0]
    assert view.source == ArraySource("zarr", str(tmp_path / "data.ome.zarr" / "tile0.zarr"))


def test_multimg_zarr_v3_and_s3(tmp_path: Path) -> None:
    loader = """<ImageLoader format="bdv.multimg.zarr" version="3.0">
      <zarr type="absolute">s3://bucket/data.ome.zarr</zarr>
      <zgroups><zgroup setup="0" tp="0" path="s0-t0.zarr" indicies="0 0" /></zgroups>
    </ImageLoader>"""
    view = read_bdv_xml(_write(tmp_path, _xml(loader=loader))).views[0]
    assert view.source == ArraySource("zarr", "s3://bucket/data.ome.zarr/s0-t0.zarr")
    loader = """<ImageLoader format="bdv.multimg.zarr" version="1.0">
      <s3bucket>aind</s3bucket><zarr type="absolute">exa/SPIM.ome.zarr</zarr>
      <zgroups><zgroup setup="0" timepoint="0"><path>t.zarr</path></zgroup></zgroups>
    </ImageLoader>"""
    view = read_bdv_xml(_write(tmp_path, _xml(loader=loader))).views[0]
    assert view.source.path == "s3://aind/exa/SPIM.ome.zarr/t.zarr"


def test_multimg_zarr_missing_zgroup(tmp_path: Path) -> None:
    loader = """<ImageLoader format="bdv.multimg.zarr" version="3.0">
      <zarr type="relative">.</zarr><zgroups /></ImageLoader>"""
    with pytest.raises(InputError, match="zgroups: no zgroup for timepoint=0 setup=0"):
        read_bdv_xml(_write(tmp_path, _xml(loader=loader)))


def test_multimg_zarr_nonzero_indices_refused(tmp_path: Path) -> None:
    loader = """<ImageLoader format="bdv.multimg.zarr" version="3.0"><zarr type="relative">.</zarr>
      <zgroups><zgroup setup="0" tp="0" path="a.zarr" indicies="0 1" /></zgroups></ImageLoader>"""
    with pytest.raises(InputError, match="indicies '0 1': only '0 0' is supported"):
        read_bdv_xml(_write(tmp_path, _xml(loader=loader)))


def test_filemap2_tiffs(tmp_path: Path) -> None:
    loader = """<ImageLoader format="spimreconstruction.filemap2"><files>
      <FileMapping view_setup="0" timepoint="0" series="0" channel="2">
        <file type="relative">a.tif</file></FileMapping></files></ImageLoader>"""
    view = read_bdv_xml(_write(tmp_path, _xml(loader=loader))).views[0]
    assert view.source == ArraySource("tiff", str(tmp_path / "a.tif"), "series=0,channel=2")


@pytest.mark.parametrize(
    ("loader", "name"),
    [
        (
            '<ImageLoader format="bdv.remote"><baseUrl>http://x/</baseUrl></ImageLoader>',
            "bdv.remote",
        ),
        ('<ImageLoader class="viewer.hdf5.Hdf5ImageLoader" />', "viewer.hdf5.Hdf5ImageLoader"),
        ("", "(no ImageLoader)"),
    ],
)
def test_other_loaders_keep_geometry_but_not_pixels(tmp_path: Path, loader: str, name: str) -> None:
    path = _write(tmp_path, _xml(loader=loader))
    view = read_bdv_xml(path).views[0]
    assert view.shape_zyx == (10, 20, 30)
    assert view.source == ArraySource("unsupported", str(path), name)
    with pytest.raises(InputError, match=r"dataset\.xml: ImageLoader: ") as info:
        open_array(view.source)
    assert repr(name) in str(info.value)


# --- errors -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.xml: file not found"):
        read_bdv_xml(tmp_path / "nope.xml")


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.95])
def test_truncated_xml(tmp_path: Path, cut: int) -> None:
    text = _xml()
    path = _write(tmp_path, text[: int(len(text) * cut)])
    with pytest.raises(InputError, match="XML: malformed or truncated XML"):
        read_bdv_xml(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {
                "registrations": '<ViewRegistration timepoint="0" setup="0">'
                '<ViewTransform type="generic"><affine>1</affine></ViewTransform>'
                "</ViewRegistration>"
            },
            r"ViewRegistration timepoint=0 setup=0 ViewTransform 0 \(unnamed\): type 'generic'",
        ),
        (
            {"registrations": _registration(0, 0, ("short", "1 0 0 0 0 1 0 0 0 0 1"))},
            r"ViewTransform 0 \(short\): expected 12 numbers, got 11",
        ),
        (
            {"registrations": _registration(0, 0, ("flat", "1 0 0 0 0 1 0 0 0 0 0 0"))},
            r"ViewRegistration timepoint=0 setup=0: affine is singular",
        ),
        (
            {"registrations": _registration(0, 0, ("bad", "1 0 0 0 0 1 0 0 0 0 x 0"))},
            r"ViewTransform 0 \(bad\): not 12 numbers",
        ),
        ({"registrations": ""}, r"ViewRegistration timepoint=0 setup=0: missing"),
        ({"setups": ""}, r"SequenceDescription/ViewSetups: no <ViewSetup>"),
        ({"setups": "<ViewSetup><id>0</id></ViewSetup>"}, r"ViewSetup id=0: has no <size>"),
        ({"setups": _setup(0, size="0 20 10")}, r"ViewSetup id=0 size: sizes must be positive"),
        ({"setups": _setup(0, voxel="1 1")}, r"ViewSetup id=0 voxelSize: expected 3 numbers"),
        ({"timepoints": ""}, r"Timepoints: missing <Timepoints>"),
        ({"missing": '<MissingView timepoint="0" setup="0" />'}, r"no view left"),
        (
            {"loader": '<ImageLoader format="spimreconstruction.filemap2"><files/></ImageLoader>'},
            r"ImageLoader format=spimreconstruction.filemap2 files: missing or empty <files>",
        ),
    ],
)
def test_bad_content_names_field(tmp_path: Path, kwargs: dict[str, str], match: str) -> None:
    path = _write(tmp_path, _xml(**kwargs))
    with pytest.raises(InputError, match=match) as info:
        read_bdv_xml(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_not_spimdata(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a SpimData XML"):
        read_bdv_xml(_write(tmp_path, "<Other />"))


# --- writer -----------------------------------------------------------------------


def _chain(k: int) -> list[tuple[str, np.ndarray]]:
    rotation = np.eye(4)
    c, s = np.cos(0.1 * k), np.sin(0.1 * k)
    rotation[1:3, 1:3] = [[c, -s], [s, c]]
    return [
        ("Translation to Nominal Grid", geometry.translation([0.0, 5.0 * k, 17.0 * k])),
        ("Rotation", rotation),
        ("calibration", geometry.scale([4.0, 1.0, 1.0])),
    ]


@pytest.mark.parametrize("loader", ["bdv.multimg.zarr", "bdv.n5", "bdv.hdf5"])
def test_write_read_roundtrip(tmp_path: Path, loader: str) -> None:
    shape = (6, 7, 8)
    pairs = []
    for t in (0, 3):
        for s in (0, 1, 2):
            if (t, s) == (3, 1):
                continue
            chain = _chain(s + t)
            data = np.full(shape, 10 * t + s, np.uint16)
            if loader == "bdv.multimg.zarr":
                path = tmp_path / f"s{s}-t{t}.zarr"
                zarr.create_array(str(path), data=data, chunks=(3, 4, 4))
                source = ArraySource("zarr", str(path))
            elif loader == "bdv.n5":
                key = f"setup{s}/timepoint{t}/s0"
                source = write_n5_array(tmp_path / "d.n5", key, data, block_size_zyx=(4, 4, 4))
            else:
                key = f"t{t:05d}/s{s:02d}/0/cells"
                with h5py.File(tmp_path / "d.h5", "a") as fh:
                    fh.create_dataset(key, data=data)
                source = ArraySource("hdf5", str(tmp_path / "d.h5"), key)
            view = View(
                setup=s,
                timepoint=t,
                shape_zyx=shape,
                voxel_size_zyx=(2.0, 0.5, 0.5),
                model=geometry.compose(*(a for _, a in chain)),
                source=source,
                attributes={"channel": s % 2, "tile": s},
                calibration_zyx=(4.0, 1.0, 1.0),
            )
            pairs.append((view, chain))
    xml = write_bdv_xml(tmp_path / "out.xml", pairs, unit="µm", loader=loader)
    ET.parse(xml)  # well-formed
    ds = read_dataset(xml)
    assert ds.unit == "micrometer"
    assert [v.name for v in ds.views] == ["t0-s0", "t0-s1", "t0-s2", "t3-s0", "t3-s2"]
    for (want, _), got in zip(pairs, ds.views, strict=True):
        np.testing.assert_allclose(got.model, want.model, rtol=0, atol=1e-12)
        assert got.shape_zyx == want.shape_zyx
        assert got.voxel_size_zyx == want.voxel_size_zyx
        assert got.attributes == want.attributes
        assert got.calibration_zyx == want.calibration_zyx
        assert open_array(got.source).read((0, 0, 0), (1, 1, 1)).item() == (
            10 * want.timepoint + want.setup
        )
    check_arrays(ds)
    # Paths inside the XML's folder are written relative to it.
    assert str(tmp_path) not in xml.read_text()


def test_writer_accepts_specs(tmp_path: Path) -> None:
    spec = BdvViewSpec(
        setup=4,
        timepoint=0,
        shape_zyx=(2, 3, 4),
        voxel_size_zyx=(1.0, 1.0, 1.0),
        chain=[("t", geometry.translation([1.0, 2.0, 3.0]))],
        location="tile.zarr",
    )
    ds = read_bdv_xml(write_bdv_xml(tmp_path / "a.xml", [spec]))
    assert ds.views[0].source == ArraySource("zarr", str(tmp_path / "tile.zarr"))
    np.testing.assert_array_equal(ds.views[0].model[:3, 3], [1.0, 2.0, 3.0])


def test_writer_checks_chain_against_model(tmp_path: Path) -> None:
    view = View(0, 0, (2, 2, 2), (1.0, 1.0, 1.0), np.eye(4), ArraySource("zarr", "a.zarr"))
    with pytest.raises(ValueError, match="does not compose"):
        write_bdv_xml(tmp_path / "a.xml", [(view, [("t", geometry.translation([1, 0, 0]))])])


def test_check_arrays_reports_shape_and_missing(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "t.zarr"), shape=(2, 3, 4), dtype="uint8")
    chain = [("id", np.eye(4))]
    view = View(0, 0, (2, 3, 5), (1.0, 1.0, 1.0), np.eye(4), ArraySource("zarr", ""))
    for path, match in [
        (tmp_path / "t.zarr", r"t\.zarr: view t0-s0 shape: array is \(2, 3, 4\)"),
        (tmp_path / "gone.zarr", r"gone\.zarr: array: "),
    ]:
        v = View(0, 0, view.shape_zyx, (1.0, 1.0, 1.0), np.eye(4), ArraySource("zarr", str(path)))
        xml = write_bdv_xml(tmp_path / "c.xml", [(v, chain)])
        with pytest.raises(InputError, match=match):
            check_arrays(read_bdv_xml(xml))


# --- real BigStitcher / BigDataViewer files ----------------------------------------

VALID = {
    # file: (views, unit, loader format of the first view)
    "Rhapso__pipelines_fusion_data__BL6-R12_stitching_all_channels.xml": (
        190,
        "micrometer",
        "zarr",
    ),
    "Rhapso__tests_XML_test_data__dataset.xml": (14, "micrometer", "tiff"),
    "Rhapso__tests_XML_test_data__dataset_interest_points.xml": (14, "micrometer", "tiff"),
    "Rhapso__tests_XML_test_data__dataset_no_tags.xml": (14, "micrometer", "tiff"),
    "bigdataviewer-biop-tools__mri-stack-multilevel.xml": (1, "centimeter", "hdf5"),
    "bigdataviewer-biop-tools__mri-stack-shiftedX.xml": (1, "centimeter", "hdf5"),
    "bigdataviewer-biop-tools__mri-stack-shiftedY.xml": (1, "centimeter", "hdf5"),
    "bigdataviewer-biop-tools__mri-stack.xml": (1, "centimeter", "hdf5"),
    "bigdataviewer-biop-tools__testremote.xml": (1514, "micrometer", "unsupported"),
    "mobie-io__src_test_resources__prospr-myosin-zarr.xml": (1, "micrometer", "unsupported"),
    "npy2bdv__kidney.xml": (3, "micrometer", "hdf5"),
    "npy2bdv__kidney_v1.xml": (3, "micrometer", "hdf5"),
    "platybrowser-project__data_0.6.3_images_local__sbem-6dpf-1-whole-segmented-cells.xml": (
        1,
        "micrometer",
        "hdf5",
    ),
    "platybrowser-project__data_1.0.1_images_remote__prospr-6dpf-1-whole-ache.xml": (
        1,
        "micrometer",
        "unsupported",
    ),
    "platybrowser-project__data_rawdata__sbem-6dpf-1-whole-raw.xml": (1, "micrometer", "n5"),
    "pydantic-bigstitcher__bigstitcher_1.xml": (15, "micrometer", "zarr"),
    "pydantic-bigstitcher__bigstitcher_2.xml": (15, "micrometer", "zarr"),
    "pydantic-bigstitcher__bigstitcher_4.xml": (147, "nanometer", "n5"),
    "pydantic-bigstitcher__bigstitcher_5.xml": (147, "nanometer", "n5"),
    "pydantic-bigstitcher__bigstitcher_6.xml": (16, "micrometer", "zarr"),
}

BROKEN = {
    "Rhapso__tests_XML_test_data__dataset_no_file_mapping.xml": "missing or empty <files>",
    "Rhapso__tests_XML_test_data__dataset_unequal_lengths.xml": (
        "no FileMapping for timepoint=30 setup=4"
    ),
    "pydantic-bigstitcher__bigstitcher_0.xml": "ViewRegistration timepoint=0 setup=1: missing",
    "pydantic-bigstitcher__bigstitcher_3.xml": "no <ViewSetup>",
    "spimdata__src_main_resources__example.xml": "ViewSetup id=0: has no <size>",
    "spimdata__src_main_resources__example_timepointpattern.xml": "sizes must be positive",
}


@needs_xmls
def test_every_shared_xml_is_classified() -> None:
    assert {p.name for p in XMLS.glob("*.xml")} == set(VALID) | set(BROKEN)


@needs_xmls
@pytest.mark.parametrize("name", sorted(VALID))
def test_real_valid_xml(name: str) -> None:
    views, unit, fmt = VALID[name]
    ds = read_dataset(XMLS / name)
    assert (len(ds.views), ds.unit, ds.views[0].source.format) == (views, unit, fmt)
    for v in ds.views:
        assert np.isfinite(v.model).all() and abs(np.linalg.det(v.model)) > 0
        assert min(v.shape_zyx) > 0


@needs_xmls
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_real_broken_xml(name: str) -> None:
    with pytest.raises(InputError, match=BROKEN[name]) as info:
        read_dataset(XMLS / name)
    assert str(info.value).startswith(str(XMLS / name))


@needs_xmls
@pytest.mark.parametrize(
    "name",
    [
        "bigdataviewer-biop-tools__testremote.xml",
        "Rhapso__pipelines_fusion_data__BL6-R12_stitching_all_channels.xml",
    ],
)
def test_large_xml_parses_fast(name: str) -> None:
    start = time.perf_counter()
    read_bdv_xml(XMLS / name)
    assert time.perf_counter() - start < 1.0


@needs_xmls
def test_real_chain_order_bigstitcher_1() -> None:
    """Model = T0 T1 T2 (XML order) computed independently in xyz."""
    name = "pydantic-bigstitcher__bigstitcher_1.xml"
    root = ET.parse(XMLS / name).getroot()
    reg = root.find("ViewRegistrations/ViewRegistration[@setup='4']")
    assert reg is not None
    xyz = np.eye(4)
    for vt in reg.findall("ViewTransform"):
        m = np.eye(4)
        m[:3] = np.array((vt.findtext("affine") or "").split(), float).reshape(3, 4)
        xyz = xyz @ m
    view = next(v for v in read_bdv_xml(XMLS / name).views if v.setup == 4)
    voxel_zyx = np.array([7.0, 11.0, 13.0])
    expected_xyz = (xyz @ np.append(voxel_zyx[::-1], 1.0))[:3]
    np.testing.assert_allclose(
        geometry.transform_points(view.model, [voxel_zyx])[0], expected_xyz[::-1]
    )
    assert view.shape_zyx == (28672, 10640, 14192)
    assert view.voxel_size_zyx == pytest.approx((1.0, 0.7479999743009398, 0.7480000148631624))


@needs_xmls
def test_real_kidney_calibration() -> None:
    ds = read_bdv_xml(XMLS / "npy2bdv__kidney.xml")
    assert ds.views[0].calibration_zyx == pytest.approx((2.43888, 1.0, 1.000262), rel=1e-6)
    assert ds.views[0].shape_zyx == (32, 172, 111)
    assert [v.attributes["channel"] for v in ds.views] == [0, 1, 2]


@needs_xmls
def test_real_rotation_rhapso() -> None:
    ds = read_bdv_xml(XMLS / "Rhapso__tests_XML_test_data__dataset.xml")
    assert sorted({v.timepoint for v in ds.views}) == [18, 30]
    view = next(v for v in ds.views if v.timepoint == 18 and v.setup == 1)
    assert view.attributes["angle"] == 45
    # Rotation about x by 45 degrees after calibration z *= 2.735686: one z step
    # moves world y by 0.7071 * 2.735686 and world z by the same.
    step = view.model[:3, :3] @ [1.0, 0.0, 0.0]
    np.testing.assert_allclose(step, [0.70710678 * 2.735686, 0.70710678 * 2.735686, 0.0])


@needs_xmls
def test_real_mri_shifted_x() -> None:
    base = read_bdv_xml(XMLS / "bigdataviewer-biop-tools__mri-stack.xml").views[0]
    shifted = read_bdv_xml(XMLS / "bigdataviewer-biop-tools__mri-stack-shiftedX.xml").views[0]
    np.testing.assert_allclose(shifted.model[:3, 3] - base.model[:3, 3], [0.0, 0.0, 50.0])
    np.testing.assert_allclose(np.diag(base.model)[:3], [10.0, 1.0, 1.0])


@needs_tiles
@pytest.mark.parametrize("name", ["kidney.xml", "kidney_v1.xml"])
def test_real_kidney_arrays_match_xml(name: str) -> None:
    ds = read_dataset(TILES / "npy2bdv_kidney" / name)
    check_arrays(ds)
    arr = open_array(ds.views[2].source)
    assert arr.dtype == np.uint16
    assert arr.read((0, 0, 0), (1, 2, 2)).shape == (1, 2, 2)


@needs_tiles
def test_real_mri_multilevel_arrays_match_xml() -> None:
    ds = read_dataset(TILES / "biop_mri_stack" / "mri-stack-multilevel.xml")
    check_arrays(ds)
    arr = open_array(ds.views[0].source)
    assert arr.read((0, 0, 0), arr.shape).max() <= 255
