"""Every array backend passes one contract (:class:`TileArrayContract`)."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numcodecs
import numpy as np
import pytest
import tifffile
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)

from tilefusion.errors import InputError
from tilefusion.readers import ArraySource, arrays, open_array
from tilefusion.readers.arrays import (
    ChunkCache,
    TileArray,
    _open_direct_zarr,
    _ZarrChunks,
    forget_memory_array,
    register_memory_array,
    write_n5_array,
)

SHAPE = (13, 17, 19)
CHUNKS = (4, 5, 6)
CROPS = [
    ((0, 0, 0), SHAPE),
    ((0, 0, 0), (1, 1, 1)),
    ((3, 4, 5), (9, 12, 13)),  # straddles chunk borders on every axis
    ((12, 16, 18), SHAPE),
    ((4, 5, 6), (8, 10, 12)),  # exactly one chunk
    ((2, 3, 4), (2, 9, 9)),  # empty along z
]


def _shared_data() -> Path:
    env = os.environ.get("TILEFUSION_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _pattern(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=SHAPE).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=SHAPE, endpoint=True, dtype=dtype)


class TileArrayContract:
    """What every backend guarantees; subclasses implement :meth:`make`."""

    dtypes: tuple[str, ...] = ("uint16", "float32", "uint8")

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        """Store ``data`` (zyx) with this backend; return its source."""
        raise NotImplementedError

    @pytest.fixture(params=["uint16", "float32", "uint8"])
    def stored(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> tuple[np.ndarray, TileArray]:
        if request.param not in self.dtypes:
            pytest.skip(f"{type(self).__name__} does not store {request.param}")
        data = _pattern(request.param)
        return data, open_array(self.make(data, tmp_path))

    def test_is_tile_array(self, stored: tuple[np.ndarray, TileArray]) -> None:
        assert isinstance(stored[1], TileArray)

    def test_shape_and_dtype(self, stored: tuple[np.ndarray, TileArray]) -> None:
        data, arr = stored
        assert arr.shape == SHAPE
        assert all(type(n) is int for n in arr.shape)
        assert arr.dtype == data.dtype

    @pytest.mark.parametrize(("lo", "hi"), CROPS)
    def test_crop(self, stored: tuple[np.ndarray, TileArray], lo: tuple, hi: tuple) -> None:
        data, arr = stored
        out = arr.read(lo, hi)
        assert type(out) is np.ndarray
        assert out.dtype == data.dtype
        expected = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        assert out.shape == expected.shape
        np.testing.assert_array_equal(out, expected)

    def test_crop_is_a_private_copy(self, stored: tuple[np.ndarray, TileArray]) -> None:
        data, arr = stored
        out = arr.read((0, 0, 0), (2, 2, 2))
        out[...] = 0
        np.testing.assert_array_equal(arr.read((0, 0, 0), (2, 2, 2)), data[:2, :2, :2])

    def test_nothing_absent_in_a_complete_array(self, stored: tuple[np.ndarray, TileArray]) -> None:
        arr = stored[1]
        assert arr.absent_chunks == frozenset()
        arr.read((0, 0, 0), SHAPE)
        assert arr.absent_chunks == frozenset()

    @pytest.mark.parametrize(
        ("lo", "hi"), [((0, 0, 0), (14, 17, 19)), ((-1, 0, 0), (2, 2, 2)), ((3, 0, 0), (2, 2, 2))]
    )
    def test_crop_outside_raises(
        self, stored: tuple[np.ndarray, TileArray], lo: tuple, hi: tuple
    ) -> None:
        with pytest.raises(ValueError, match="outside"):
            stored[1].read(lo, hi)


class TestMemory(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        name = f"contract-{tmp_path.name}"
        source = register_memory_array(name, data)
        return source

    def test_unknown_name(self) -> None:
        forget_memory_array("nope")
        with pytest.raises(InputError, match="nope: memory: no array registered"):
            open_array(ArraySource("memory", "nope"))


class TestZarrV2(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "tile.zarr"
        z = zarr.create_array(
            str(path), shape=data.shape, chunks=CHUNKS, dtype=data.dtype, zarr_format=2
        )
        z[...] = data
        return ArraySource("zarr", str(path))

    def test_reads_only_the_chunks_of_the_crop(self, tmp_path: Path) -> None:
        data = _pattern("uint16")
        source = self.make(data, tmp_path)
        (Path(source.path) / "3.3.3").write_bytes(b"not a chunk")  # last chunk
        arr = open_array(source)
        np.testing.assert_array_equal(arr.read((0, 0, 0), (4, 5, 6)), data[:4, :5, :6])
        with pytest.raises(InputError, match=r"tile\.zarr: array: cannot read crop"):
            arr.read((0, 0, 0), SHAPE)


class TestZarrV3(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "tile.zarr"
        z = zarr.create_array(
            str(path), shape=data.shape, chunks=CHUNKS, dtype=data.dtype, zarr_format=3
        )
        z[...] = data
        return ArraySource("zarr", str(path))


class TestOmeZarrGroup(TileArrayContract):
    """A 5D (t, c, z, y, x) OME-Zarr 0.4 multiscale image: level 0, t and c dropped."""

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "image.ome.zarr"
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "axes": [{"name": n} for n in "tczyx"],
                "datasets": [{"path": "s0"}, {"path": "s1"}],
            }
        ]
        level0 = group.create_array(
            "s0", shape=(1, 1, *data.shape), chunks=(1, 1, *CHUNKS), dtype=data.dtype
        )
        level0[0, 0] = data
        group.create_array("s1", shape=(1, 1, 2, 2, 2), dtype=data.dtype)
        return ArraySource("zarr", str(path))

    def test_non_singleton_channel_axis_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "multi.zarr"
        zarr.create_array(str(path), shape=(2, 4, 5, 6), dtype="uint8", zarr_format=3)
        with pytest.raises(InputError, match="more than 3 non-singleton axes"):
            open_array(ArraySource("zarr", str(path)))

    def test_group_without_level0(self, tmp_path: Path) -> None:
        zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
        with pytest.raises(InputError, match="no array '0'"):
            open_array(ArraySource("zarr", str(tmp_path / "g.zarr")))


class TestN5Gzip(TileArrayContract):
    compression = "gzip"

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        return write_n5_array(
            tmp_path / "data.n5",
            "setup0/timepoint0/s0",
            data,
            block_size_zyx=CHUNKS,
            compression=self.compression,
        )

    def test_layout_is_xyz_big_endian(self, tmp_path: Path) -> None:
        """The on-disk format N5 readers (BigDataViewer, n5-java) expect."""
        data = _pattern("uint16")
        source = self.make(data, tmp_path)
        folder = Path(source.path) / source.key
        attrs = json.loads((folder / "attributes.json").read_text())
        assert attrs["dimensions"] == [19, 17, 13]
        assert attrs["blockSize"] == [6, 5, 4]
        # Block x=1, y=2, z=3 is file 1/2/3 and holds zyx [12:13, 10:15, 6:12].
        raw = (folder / "1" / "2" / "3").read_bytes()
        mode, ndim, *dims = struct.unpack_from(">HH3I", raw)
        assert (mode, ndim, dims) == (0, 3, [6, 5, 1])
        body = raw[16:] if self.compression == "raw" else gzip.decompress(raw[16:])
        block = np.frombuffer(body, dtype=">u2").reshape(1, 5, 6)
        np.testing.assert_array_equal(block, data[12:13, 10:15, 6:12])

    def test_missing_block_reads_as_zeros(self, tmp_path: Path) -> None:
        data = _pattern("uint16")
        source = self.make(data, tmp_path)
        (Path(source.path) / source.key / "0" / "0" / "0").unlink()
        (Path(source.path) / source.key / "2" / "1" / "0").unlink()  # x=2, y=1, z=0
        arr = open_array(source)
        out = arr.read((0, 0, 0), (5, 6, 7))
        assert np.all(out[:4, :5, :6] == 0)
        np.testing.assert_array_equal(out[4:, :, :], data[4:5, :6, :7])
        assert arr.absent_chunks == {"0/0/0"}
        arr.read((0, 0, 0), SHAPE)
        arr.read((0, 0, 0), (1, 1, 1))
        assert arr.absent_chunks == {"0/0/0", "2/1/0"}

    def test_reads_only_the_blocks_of_the_crop(self, tmp_path: Path) -> None:
        data = _pattern("uint16")
        source = self.make(data, tmp_path)
        (Path(source.path) / source.key / "3" / "3" / "3").write_bytes(b"\x00")
        arr = open_array(source)
        np.testing.assert_array_equal(arr.read((0, 0, 0), (4, 5, 6)), data[:4, :5, :6])
        with pytest.raises(InputError, match="setup0/timepoint0/s0/3/3/3: corrupt N5 block"):
            arr.read((0, 0, 0), SHAPE)

    def test_bdv_setup_group_resolves_to_s0(self, tmp_path: Path) -> None:
        data = _pattern("uint8")
        source = self.make(data, tmp_path)
        (Path(source.path) / "setup0" / "timepoint0" / "attributes.json").write_text("{}")
        arr = open_array(ArraySource("n5", source.path, "setup0/timepoint0"))
        assert arr.shape == SHAPE

    def test_missing_dataset(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint8"), tmp_path)
        with pytest.raises(InputError, match=r"setup9.*N5 dataset not found"):
            open_array(ArraySource("n5", source.path, "setup9/timepoint0/s0"))

    def test_unknown_compression(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint8"), tmp_path)
        attrs_path = Path(source.path) / source.key / "attributes.json"
        attrs = json.loads(attrs_path.read_text())
        attrs["compression"] = {"type": "lz4"}
        attrs_path.write_text(json.dumps(attrs))
        with pytest.raises(InputError, match="compression: N5 compression 'lz4'"):
            open_array(source)


class TestN5Raw(TestN5Gzip):
    compression = "raw"


class TestN5Zstd(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        return write_n5_array(
            tmp_path / "d.n5", "s0", data, block_size_zyx=CHUNKS, compression="zstd"
        )


class TestHdf5(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "d.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("t00000/s00/0/cells", data=data, chunks=CHUNKS, compression="gzip")
            fh.create_group("s00").attrs["dataType"] = str(data.dtype)
        return ArraySource("hdf5", str(path), "t00000/s00/0/cells")

    def test_group_resolves_to_level0_cells(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint8"), tmp_path)
        assert open_array(ArraySource("hdf5", source.path, "t00000/s00")).shape == SHAPE

    def test_missing_dataset(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint8"), tmp_path)
        with pytest.raises(InputError, match=r"dataset 't00000/s01/0/cells': not found"):
            open_array(ArraySource("hdf5", source.path, "t00000/s01/0/cells"))


class TestHdf5LegacyInt16(TileArrayContract):
    """Old BigDataViewer files: uint16 pixels in an int16 dataset, no dataType."""

    dtypes = ("uint16",)

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "legacy.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("t00000/s00/0/cells", data=data.view(np.int16), chunks=CHUNKS)
            fh.create_group("s00")
        return ArraySource("hdf5", str(path), "t00000/s00/0/cells")

    def test_int16_outside_bdv_layout_stays_int16(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("volume", data=np.full((2, 3, 4), -5, np.int16))
        arr = open_array(ArraySource("hdf5", str(path), "volume"))
        assert arr.dtype == np.int16
        assert arr.read((0, 0, 0), (1, 1, 1)).item() == -5


class TestTiffMemmap(TileArrayContract):
    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "tile.tif"
        tifffile.imwrite(path, data)
        return ArraySource("tiff", str(path))

    def test_is_memory_mapped(self, tmp_path: Path) -> None:
        arr = open_array(self.make(_pattern("uint16"), tmp_path))
        assert isinstance(arr._backing, np.memmap)  # type: ignore[attr-defined]


class TestTiffCompressed(TileArrayContract):
    """Tiled, compressed TIFF: read through tifffile's Zarr store."""

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "tile.tif"
        tifffile.imwrite(path, data, compression="zlib", tile=(16, 16))
        return ArraySource("tiff", str(path))


class TestTiffChannel(TileArrayContract):
    """An ImageJ ZCYX hyperstack; the key selects the channel."""

    def make(self, data: np.ndarray, tmp_path: Path) -> ArraySource:
        path = tmp_path / "hyperstack.tif"
        stack = np.stack([np.zeros_like(data), data, np.ones_like(data)], axis=1)
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZCYX"})
        return ArraySource("tiff", str(path), "series=0,channel=1")

    def test_multichannel_without_channel_is_refused(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint16"), tmp_path)
        with pytest.raises(InputError, match="more than 3 non-singleton axes"):
            open_array(ArraySource("tiff", source.path))

    def test_channel_out_of_range(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint16"), tmp_path)
        with pytest.raises(InputError, match=r"channel 5 not in 0\.\.2"):
            open_array(ArraySource("tiff", source.path, "channel=5"))

    def test_bad_key(self, tmp_path: Path) -> None:
        source = self.make(_pattern("uint16"), tmp_path)
        with pytest.raises(InputError, match="TIFF key is 'series=S,channel=C'"):
            open_array(ArraySource("tiff", source.path, "page=2"))


def test_two_d_array_reads_as_one_plane() -> None:
    plane = np.arange(12, dtype=np.uint8).reshape(3, 4)
    arr = open_array(register_memory_array("plane", plane))
    assert arr.shape == (1, 3, 4)
    np.testing.assert_array_equal(arr.read((0, 1, 1), (1, 3, 3)), plane[np.newaxis, 1:3, 1:3])
    assert arr.read((1, 0, 0), (1, 3, 4)).shape == (0, 3, 4)


@pytest.mark.parametrize(
    ("fmt", "name", "match"),
    [
        ("zarr", "missing.zarr", "missing.zarr: array: "),
        ("n5", "missing.n5", "missing.n5: n5: N5 container not found"),
        ("hdf5", "missing.h5", "missing.h5: hdf5: HDF5 file not found"),
        ("tiff", "missing.tif", "missing.tif: tiff: TIFF file not found"),
    ],
)
def test_missing_file_is_an_input_error(tmp_path: Path, fmt: str, name: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_array(ArraySource(fmt, str(tmp_path / name)))  # type: ignore[arg-type]


def test_unsupported_loader_names_file_and_loader() -> None:
    with pytest.raises(InputError, match=r"a\.xml: ImageLoader: .*'bdv\.remote' cannot be read"):
        open_array(ArraySource("unsupported", "a.xml", "bdv.remote"))


# --- direct Zarr chunk reader ---------------------------------------------------

ZARR_SHAPE = (23, 29, 31)  # a multiple of no chunk or shard shape below
ZARR_CHUNKS = (4, 6, 8)
ZARR_SHARDS = (8, 12, 16)  # 2 x 2 x 2 inner chunks per shard
FILL = 7


def _v2(compressor: str | None, separator: str = ".", **extra: object) -> dict:
    codec = None if compressor is None else numcodecs.get_codec({"id": compressor})
    return {
        "zarr_format": 2,
        "compressors": codec,
        "chunk_key_encoding": {"name": "v2", "separator": separator},
        **extra,
    }


def _v3_codec(name: str | None) -> object:
    return {
        None: None,
        "zstd": ZstdCodec(level=1),
        "blosc": BloscCodec(cname="lz4", shuffle="bitshuffle"),
        "gzip": GzipCodec(level=1),
    }[name]


def _v3(compressor: str | None, **extra: object) -> dict:
    return {"zarr_format": 3, "compressors": _v3_codec(compressor), **extra}


def _sharded(compressor: str, location: str, *, crc: bool = True) -> dict:
    inner = [BytesCodec(), _v3_codec(compressor)]
    index = [BytesCodec(), Crc32cCodec()] if crc else [BytesCodec()]
    sharding = ShardingCodec(
        chunk_shape=ZARR_CHUNKS, codecs=inner, index_codecs=index, index_location=location
    )
    return {"zarr_format": 3, "serializer": sharding, "compressors": None, "chunks": ZARR_SHARDS}


# name -> create_array keywords; every one is read by the direct reader.
DIRECT_LAYOUTS: dict[str, dict] = {
    **{
        f"v2-{c or 'raw'}-{'dot' if s == '.' else 'slash'}": _v2(c, s)
        for c in ("zstd", "blosc", "gzip", "lz4", None)
        for s in (".", "/")
    },
    "v2-big-endian": _v2("zstd", dtype=">u2"),
    "v2-big-endian-float-nan": _v2("blosc", "/", dtype=">f4", fill_value=float("nan")),
    "v2-null-fill": _v2("zstd", fill_value=None),
    "v2-int8": _v2("lz4", dtype="i1"),
    **{f"v3-{c or 'raw'}": _v3(c) for c in ("zstd", "blosc", "gzip", None)},
    "v3-dot-keys": _v3("zstd", chunk_key_encoding={"name": "default", "separator": "."}),
    "v3-v2-keys": _v3("gzip", chunk_key_encoding={"name": "v2", "separator": "/"}),
    "v3-big-endian": _v3("zstd", serializer=BytesCodec(endian="big")),
    "v3-float32": _v3("blosc", dtype="f4", fill_value=float("nan")),
    **{
        f"v3-shard-{c}-{loc}": _sharded(c, loc)
        for c in ("zstd", "blosc", "gzip")
        for loc in ("end", "start")
    },
    "v3-shard-no-crc": _sharded("zstd", "end", crc=False),
    "v3-shard-no-crc-start": _sharded("gzip", "start", crc=False),
    "v3-shard-dot-keys": {
        **_sharded("zstd", "end"),
        "chunk_key_encoding": {"name": "default", "separator": "."},
    },
}


def _zarr_tile(tmp_path: Path, name: str, **keywords: object) -> tuple[Path, zarr.Array]:
    """A uint16 (unless told) zarr array of ZARR_SHAPE with some chunks never written.

    The first shard's box holds only the fill value (no chunk or shard file is
    written), one inner chunk of the next shard too (an empty index entry),
    and a slab at the far end is never assigned.
    """
    keywords = {"chunks": ZARR_CHUNKS, "dtype": "uint16", "fill_value": FILL, **keywords}
    path = tmp_path / f"{name}.zarr"
    z = zarr.create_array(str(path), shape=ZARR_SHAPE, **keywords)  # type: ignore[arg-type]
    dtype = np.dtype(z.dtype)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if dtype.kind == "f":
        data = rng.normal(size=ZARR_SHAPE).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=ZARR_SHAPE, endpoint=True).astype(dtype)
    fill = z.fill_value if z.fill_value is not None else 0
    data[:8, :12, :16] = fill
    data[8:12, 12:18, 16:24] = fill
    z[:20] = data[:20]
    return path, z


def _zarr_crops(rng: np.random.Generator) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    shape = np.array(ZARR_SHAPE)
    crops = [
        ((0, 0, 0), ZARR_SHAPE),
        ((0, 0, 0), (1, 1, 1)),
        (tuple(shape - 1), ZARR_SHAPE),  # last voxel, in a partial edge chunk
        ((19, 27, 29), ZARR_SHAPE),  # the never-written slab and the edge
        ((8, 12, 16), (12, 18, 24)),  # exactly the empty inner chunk
        ((3, 0, 0), (3, 29, 31)),  # empty along z
    ]
    for _ in range(25):
        lo = rng.integers(0, shape)
        hi = rng.integers(lo, shape, endpoint=True)
        crops.append((tuple(int(v) for v in lo), tuple(int(v) for v in hi)))
    for _ in range(8):
        lo = rng.integers(0, shape)
        crops.append((tuple(int(v) for v in lo), tuple(int(v) + 1 for v in lo)))
    return crops


def _assert_same(out: np.ndarray, expected: np.ndarray) -> None:
    """Equal bit for bit (NaN payloads included), with zarr-python's dtype."""
    assert type(out) is np.ndarray
    assert out.dtype == expected.dtype
    assert out.shape == expected.shape
    assert out.tobytes() == np.ascontiguousarray(expected).tobytes()


@pytest.mark.parametrize("layout", sorted(DIRECT_LAYOUTS))
def test_direct_zarr_reads_equal_zarr_python(tmp_path: Path, layout: str) -> None:
    path, z = _zarr_tile(tmp_path, layout, **DIRECT_LAYOUTS[layout])
    arr = open_array(ArraySource("zarr", str(path)))
    assert isinstance(arr._backing, _ZarrChunks)  # type: ignore[attr-defined]
    # Resolved from the JSON metadata, as zarr-python resolves it.
    _assert_same_reader(_open_direct_zarr(ArraySource("zarr", str(path))), _ZarrChunks.for_array(z))
    assert arr.shape == ZARR_SHAPE
    assert arr.dtype == z.dtype
    for lo, hi in _zarr_crops(np.random.default_rng(3)):
        expected = z[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        _assert_same(arr.read(lo, hi), expected)


@pytest.mark.parametrize("layout", sorted(DIRECT_LAYOUTS))
def test_direct_zarr_counts_absent_chunks_once(tmp_path: Path, layout: str) -> None:
    """8 chunks of the first shard's box, 1 inner chunk, 5 x 4 in the unwritten slab."""
    path, _ = _zarr_tile(tmp_path, layout, **DIRECT_LAYOUTS[layout])
    arr = open_array(ArraySource("zarr", str(path)))
    arr.read((0, 0, 16), (4, 6, 24))  # one written chunk
    assert arr.absent_chunks == frozenset()
    arr.read((8, 12, 16), (12, 18, 24))  # exactly the empty inner chunk
    (key,) = arr.absent_chunks
    # its key in the array's folder: chunk (2, 2, 2), or shard (1, 1, 1)'s first inner chunk
    assert key.replace(".", "/") in {"2/2/2", "c/2/2/2", "c/1/1/1[0,0,0]"}
    for _ in range(2):
        arr.read((0, 0, 0), ZARR_SHAPE)
    assert len(arr.absent_chunks) == 8 + 1 + 20


def test_direct_zarr_missing_shard_file_counts_its_inner_chunks(tmp_path: Path) -> None:
    path, z = _zarr_tile(tmp_path, "lost", **_sharded("zstd", "end"))
    (path / "c" / "1" / "1" / "1").unlink()  # z 8..16, y 12..24, x 16..31
    arr = open_array(ArraySource("zarr", str(path)))
    out = arr.read((8, 12, 20), (16, 13, 21))  # 2 of its inner chunks (z 8..12 and 12..16)
    assert (out == FILL).all()
    assert arr.absent_chunks == {"c/1/1/1[0,0,0]", "c/1/1/1[1,0,0]"}
    arr.read((8, 12, 16), (16, 24, 31))
    assert arr.absent_chunks == {
        f"c/1/1/1[{i},{j},{k}]" for i in (0, 1) for j in (0, 1) for k in (0, 1)
    }
    np.testing.assert_array_equal(arr.read((0, 0, 0), (8, 12, 16)), z[:8, :12, :16])


def test_direct_zarr_layouts_leave_chunks_unwritten(tmp_path: Path) -> None:
    """The fixtures above do exercise absent chunks, shards and inner chunks."""
    path, _ = _zarr_tile(tmp_path, "v2", **_v2("zstd"))
    assert not (path / "0.0.0").exists() and (path / "0.0.3").exists()
    assert not (path / "5.0.0").exists()  # never assigned
    path, _ = _zarr_tile(tmp_path, "shard", **_sharded("zstd", "end"))
    assert not (path / "c" / "0" / "0" / "0").exists()
    raw = (path / "c" / "1" / "1" / "1").read_bytes()
    index = np.frombuffer(raw[-(8 * 16 + 4) : -4], "<u8").reshape(2, 2, 2, 2)
    assert (index[0, 0, 0] == 2**64 - 1).all()
    assert (index[1, 1, 1] != 2**64 - 1).all()


@pytest.mark.parametrize(
    ("shape", "chunks", "template"),
    [
        ((1, 1, *ZARR_SHAPE), (1, 1, *ZARR_CHUNKS), (0, 0)),  # OME-Zarr t, c
        (ZARR_SHAPE[1:], ZARR_CHUNKS[1:], None),  # 2D: one z plane
    ],
    ids=["5d", "2d"],
)
@pytest.mark.parametrize("fmt", [2, 3])
def test_direct_zarr_drops_fixed_axes(
    tmp_path: Path, shape: tuple, chunks: tuple, template: tuple | None, fmt: int
) -> None:
    path = tmp_path / "nd.zarr"
    z = zarr.create_array(
        str(path), shape=shape, chunks=chunks, dtype="uint16", fill_value=FILL, zarr_format=fmt
    )
    z[..., :20] = np.random.default_rng(5).integers(0, 2**16, size=(*shape[:-1], 20))
    arr = open_array(ArraySource("zarr", str(path)))
    assert isinstance(arr._backing, _ZarrChunks)  # type: ignore[attr-defined]
    spatial = (1, *shape) if template is None else shape[len(template) :]
    assert arr.shape == spatial
    for lo, hi in [((0, 0, 0), spatial), ((0, 3, 17), (1, 20, 25)), ((0, 0, 30), (0, 5, 31))]:
        if template is None:
            expected = z[lo[1] : hi[1], lo[2] : hi[2]][np.newaxis][lo[0] : hi[0]]
        else:
            expected = z[(*template, slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))]
        _assert_same(arr.read(lo, hi), expected)


@pytest.mark.parametrize(
    "keywords",
    [
        {"zarr_format": 3, "filters": [TransposeCodec(order=(2, 1, 0))]},
        {"zarr_format": 3, "compressors": [ZstdCodec(), Crc32cCodec()]},
        {"zarr_format": 2, "filters": [numcodecs.Delta(dtype="u2")]},
        {"zarr_format": 2, "compressors": numcodecs.Zlib()},
        {"zarr_format": 2, "order": "F"},
    ],
    ids=["v3-transpose", "v3-crc32c", "v2-filters", "v2-zlib", "v2-fortran"],
)
def test_other_zarr_layouts_fall_back_to_zarr_python(tmp_path: Path, keywords: dict) -> None:
    path, z = _zarr_tile(tmp_path, "other", **keywords)
    arr = open_array(ArraySource("zarr", str(path)))
    assert isinstance(arr._backing, zarr.Array)  # type: ignore[attr-defined]
    lo, hi = (3, 5, 7), (21, 28, 30)
    _assert_same(arr.read(lo, hi), z[3:21, 5:28, 7:30])


def test_direct_zarr_concurrent_reads(tmp_path: Path) -> None:
    path, z = _zarr_tile(tmp_path, "threads", **_sharded("blosc", "end"))
    full = z[...]
    arr = open_array(ArraySource("zarr", str(path)))
    crops = _zarr_crops(np.random.default_rng(11)) * 4

    def read(crop: tuple) -> bool:
        (a, b, c), (d, e, f) = crop
        return np.array_equal(arr.read(*crop), full[a:d, b:e, c:f])

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(read, crops))
    alone = open_array(ArraySource("zarr", str(path)))
    for crop in crops:
        alone.read(*crop)
    assert arr.absent_chunks == alone.absent_chunks
    assert arr.absent_chunks  # the crops do meet absent chunks


def test_direct_zarr_damaged_shard_is_an_input_error(tmp_path: Path) -> None:
    path, z = _zarr_tile(tmp_path, "damaged", **_sharded("zstd", "end"))
    shard = path / "c" / "1" / "1" / "1"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(raw))
    arr = open_array(ArraySource("zarr", str(path)))
    np.testing.assert_array_equal(arr.read((0, 0, 0), (8, 12, 16)), z[:8, :12, :16])
    with pytest.raises(InputError, match=r"damaged\.zarr: array: cannot read crop.*checksum"):
        arr.read((8, 12, 16), (9, 13, 17))
    shard.write_bytes(bytes(raw[:40]))
    with pytest.raises(InputError, match="shorter than its index"):
        arr.read((8, 12, 16), (9, 13, 17))


def test_direct_zarr_truncated_inner_chunk_is_an_input_error(tmp_path: Path) -> None:
    path, _ = _zarr_tile(tmp_path, "cut", **_sharded("zstd", "start", crc=False))
    shard = path / "c" / "0" / "0" / "1"
    shard.write_bytes(shard.read_bytes()[:200])
    arr = open_array(ArraySource("zarr", str(path)))
    with pytest.raises(InputError, match=r"cannot read crop .*(truncated|corrupt)"):
        arr.read((0, 0, 16), (8, 12, 31))


def _assert_same_reader(got: _ZarrChunks | None, expected: _ZarrChunks | None) -> None:
    assert got is not None and expected is not None
    assert got._layout == expected._layout
    assert got._folder == expected._folder
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    fills = [np.array(r._fill, r.dtype).tobytes() for r in (got, expected)]
    assert fills[0] == fills[1]


@pytest.mark.parametrize(
    ("fmt", "dtype", "fill"),
    [
        (2, "bool", True),
        (3, "bool", False),
        (2, "<f8", float("inf")),
        (3, "float64", float("-inf")),
        (3, "float16", 0.5),
        (2, "<i4", -3),
        (3, "int64", -(2**62)),
        (3, "uint64", 2**64 - 1),
        (2, "|u1", None),
    ],
)
def test_local_zarr_metadata_equals_zarr_python(
    tmp_path: Path, fmt: int, dtype: str, fill: object
) -> None:
    path = tmp_path / "t.zarr"
    z = zarr.create_array(
        str(path), shape=(5, 6, 7), chunks=(2, 3, 4), dtype=dtype, fill_value=fill, zarr_format=fmt
    )
    z[:2] = np.ones((2, 6, 7), dtype)
    source = ArraySource("zarr", str(path))
    _assert_same_reader(_open_direct_zarr(source), _ZarrChunks.for_array(z))
    _assert_same(open_array(source).read((1, 0, 0), (5, 6, 7)), z[1:5])


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_local_zarr_defers_to_zarr_python(tmp_path: Path) -> None:
    """Consolidated groups, mixed formats, odd keys: zarr-python opens them (or says why not)."""
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    level0 = group.create_array("0", shape=(4, 5, 6), chunks=(2, 2, 2), dtype="uint8")
    level0[...] = 3
    zarr.consolidate_metadata(str(tmp_path / "c.zarr"))
    consolidated = ArraySource("zarr", str(tmp_path / "c.zarr"))
    assert _open_direct_zarr(consolidated) is None
    arr = open_array(consolidated)
    assert isinstance(arr._backing, _ZarrChunks)  # type: ignore[attr-defined]
    assert (arr.read((0, 0, 0), (4, 5, 6)) == 3).all()
    for key in ["0/../0", "./0"]:
        assert _open_direct_zarr(ArraySource("zarr", str(tmp_path / "c.zarr"), key)) is None
        with pytest.raises(InputError, match="cannot open as zarr"):
            open_array(ArraySource("zarr", str(tmp_path / "c.zarr"), key))
    assert _open_direct_zarr(ArraySource("zarr", "simplecache::s3://bucket/tile.zarr")) is None
    path, _ = _zarr_tile(tmp_path, "v3", zarr_format=3)
    (path / ".zarray").write_text("{}")
    assert _open_direct_zarr(ArraySource("zarr", str(path))) is None


def test_local_zarr_keys_are_normalised(tmp_path: Path) -> None:
    path, _ = _zarr_tile(tmp_path, "tile", zarr_format=3)
    for key in ["", "/", "//"]:
        assert open_array(ArraySource("zarr", str(path), key)).shape == ZARR_SHAPE
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("a/b", shape=(2, 3, 4), dtype="uint16", fill_value=9)
    for key in ["a/b", "/a//b/", "a\\b"]:
        arr = open_array(ArraySource("zarr", str(tmp_path / "g.zarr"), key))
        assert isinstance(arr._backing, _ZarrChunks)  # type: ignore[attr-defined]
        assert (arr.read((0, 0, 0), (2, 3, 4)) == 9).all()


def test_local_zarr_opens_without_importing_zarr_python(tmp_path: Path) -> None:
    """A fuse job opens and reads local tiles without paying zarr-python's import."""
    v3, z3 = _zarr_tile(tmp_path, "v3", **_sharded("zstd", "end"))
    ome = tmp_path / "image.ome.zarr"  # OME-Zarr 0.5: v3 group, multiscales under "ome"
    group = zarr.open_group(str(ome), mode="w", zarr_format=3)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"datasets": [{"path": "s0"}]}]}
    level0 = group.create_array("s0", shape=(1, 1, 9, 10, 11), chunks=(1, 1, 4, 4, 4), dtype="u2")
    level0[...] = np.arange(990, dtype="u2").reshape(level0.shape)
    v2 = tmp_path / "v2.zarr"  # a v2 plain group: its array "0"
    zarr.open_group(str(v2), mode="w", zarr_format=2).create_array(
        "0", shape=(6, 7, 8), chunks=(3, 3, 3), dtype="f4", fill_value=float("nan")
    )[:3] = 1.5
    cases = [
        (str(v3), z3[...]),
        (str(ome), level0[0, 0]),
        (str(v2), zarr.open_array(str(v2 / "0"))[...]),
    ]
    code = (
        "import hashlib, sys\n"
        "from tilefusion.readers import ArraySource, open_array\n"
        "for path in sys.argv[1:]:\n"
        "    arr = open_array(ArraySource('zarr', path))\n"
        "    print(hashlib.sha256(arr.read((0, 0, 0), arr.shape).tobytes()).hexdigest())\n"
        "print('zarr' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *(path for path, _ in cases)],
        capture_output=True,
        text=True,
        check=True,
    )
    *digests, imported = done.stdout.split()
    assert digests == [hashlib.sha256(data.tobytes()).hexdigest() for _, data in cases]
    assert imported == "False"


# --- decoded-chunk cache -----------------------------------------------------------

CACHED_LAYOUTS = ["v2-zstd-dot", "v3-raw", "v3-shard-zstd-end", "v3-shard-blosc-start"]


def _fuse_like_crops(shape: tuple[int, ...], step: tuple[int, ...]) -> list[tuple[tuple, tuple]]:
    """Crops at a stride of ``step``, one voxel wider, in C order: overlapping as in fuse jobs."""
    crops = []
    for lo in itertools.product(*(range(0, n, s) for n, s in zip(shape, step))):
        hi = tuple(min(a + s + 1, n) for a, s, n in zip(lo, step, shape))
        crops.append((lo, hi))
    return crops


def _chunk_bytes(layout: str) -> int:
    itemsize = np.dtype(DIRECT_LAYOUTS[layout].get("dtype", "uint16")).itemsize
    return itemsize * int(np.prod(ZARR_CHUNKS))


@pytest.mark.parametrize("layout", CACHED_LAYOUTS)
@pytest.mark.parametrize("chunks_kept", [0, 1, 3, None])
def test_cached_reads_equal_zarr_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, chunks_kept: int | None
) -> None:
    """Random overlapping crops, with caches that evict all the time, or never."""
    if chunks_kept is not None:
        monkeypatch.setattr(arrays, "_CHUNK_CACHE_BYTES", chunks_kept * _chunk_bytes(layout))
    path, z = _zarr_tile(tmp_path, layout, **DIRECT_LAYOUTS[layout])
    full = z[...]
    arr = open_array(ArraySource("zarr", str(path)))
    chunks: _ZarrChunks = arr._backing  # type: ignore[attr-defined]
    rng = np.random.default_rng(17)
    crops = _zarr_crops(rng) + _fuse_like_crops(ZARR_SHAPE, (4, 5, 7))
    for i in rng.permutation(len(crops * 2)):
        (a, b, c), (d, e, f) = (crops * 2)[i]
        _assert_same(arr.read((a, b, c), (d, e, f)), full[a:d, b:e, c:f])
        assert chunks.cache.nbytes <= chunks.cache.limit
    assert (chunks.cache.hits > 0) == (chunks_kept != 0)


@pytest.mark.parametrize("layout", CACHED_LAYOUTS)
def test_cache_decodes_overlapping_crops_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    path, _ = _zarr_tile(tmp_path, layout, **DIRECT_LAYOUTS[layout])
    source = ArraySource("zarr", str(path))
    whole = open_array(source)
    whole.read((0, 0, 0), ZARR_SHAPE)
    written = whole._backing.decodes  # type: ignore[attr-defined]  # each stored chunk once
    # Each crop reaches one voxel into the next chunk on every axis, as a
    # fuse job's crops do: uncached, most chunks decode up to 8 times.
    crops = _fuse_like_crops(ZARR_SHAPE, ZARR_CHUNKS)
    decodes = {}
    for kept in (0, 2**30):
        monkeypatch.setattr(arrays, "_CHUNK_CACHE_BYTES", kept)
        arr = open_array(source)
        for lo, hi in crops * 2:
            arr.read(lo, hi)
        decodes[kept] = arr._backing.decodes  # type: ignore[attr-defined]
    assert decodes[2**30] == written
    assert decodes[0] > 2 * 3 * written


@pytest.mark.parametrize("layout", CACHED_LAYOUTS)
@pytest.mark.parametrize("chunks_kept", [2, None])
def test_cached_concurrent_reads_equal_serial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, chunks_kept: int | None
) -> None:
    """Threads reading the same crops at once get serial reads' bytes; a chunk decodes once."""
    if chunks_kept is not None:
        monkeypatch.setattr(arrays, "_CHUNK_CACHE_BYTES", chunks_kept * _chunk_bytes(layout))
    path, _ = _zarr_tile(tmp_path, layout, **DIRECT_LAYOUTS[layout])
    source = ArraySource("zarr", str(path))
    crops = _fuse_like_crops(ZARR_SHAPE, (4, 5, 7)) + _zarr_crops(np.random.default_rng(5))
    serial_arr = open_array(source)
    serial = [serial_arr.read(lo, hi) for lo, hi in crops]
    arr = open_array(source)
    threads = 6
    start = threading.Barrier(threads)

    def read(seed: int) -> bool:
        order = np.random.default_rng(seed).permutation(len(crops))
        start.wait()  # all at once, to meet on the same chunks
        return all(np.array_equal(arr.read(*crops[i]), serial[i]) for i in order)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        assert all(pool.map(read, range(threads)))
    chunks: _ZarrChunks = arr._backing  # type: ignore[attr-defined]
    assert chunks.cache.nbytes <= chunks.cache.limit
    if chunks_kept is None:
        # Everything fits: threads that meet on a chunk wait for one decode.
        assert chunks.decodes == serial_arr._backing.decodes  # type: ignore[attr-defined]


@pytest.mark.parametrize("layout", CACHED_LAYOUTS)
def test_arrays_sharing_a_cache_keep_one_bound_and_their_own_chunks(
    tmp_path: Path, layout: str
) -> None:
    """Two tiles with the same chunk grid, one cache: each reads its own pixels."""
    first, z1 = _zarr_tile(tmp_path / "a", layout, **DIRECT_LAYOUTS[layout])
    second, z2 = _zarr_tile(tmp_path / "b", f"{layout}-other", **DIRECT_LAYOUTS[layout])
    assert not np.array_equal(z1[...], z2[...])
    shared = ChunkCache(5 * _chunk_bytes(layout))
    arrays_ = [
        open_array(ArraySource("zarr", str(path)), chunk_cache=shared) for path in (first, second)
    ]
    for arr in arrays_:
        assert arr._backing.cache is shared  # type: ignore[attr-defined]
    crops = _fuse_like_crops(ZARR_SHAPE, (4, 5, 7))
    for lo, hi in crops * 2:
        for arr, z in zip(arrays_, (z1, z2)):
            _assert_same(arr.read(lo, hi), z[tuple(slice(a, b) for a, b in zip(lo, hi))])
            assert shared.nbytes <= shared.limit
    assert shared.hits > 0


def test_cached_chunks_cannot_be_changed_through_reads(tmp_path: Path) -> None:
    path, z = _zarr_tile(tmp_path, "v3", **DIRECT_LAYOUTS["v3-zstd"])
    arr = open_array(ArraySource("zarr", str(path)))
    first = arr.read((12, 0, 0), (16, 6, 8))  # exactly one chunk, now cached
    assert first.flags.writeable
    first[...] = 0
    _assert_same(arr.read((12, 0, 0), (16, 6, 8)), z[12:16, 0:6, 0:8])
    cache: ChunkCache = arr._backing.cache  # type: ignore[attr-defined]
    assert cache.nbytes > 0
    assert not any(entry.flags.writeable for entry in cache._entries.values())


def test_chunk_cache_is_a_byte_bounded_lru() -> None:
    cache = ChunkCache(300)
    arrays_ = {k: np.full(100, i, np.uint8) for i, k in enumerate("abcd")}
    for key in "abc":
        cache.put(key, arrays_[key])
    assert cache.get_or_load("a", lambda: None) is arrays_["a"]  # now most recent
    cache.put("d", arrays_["d"])  # evicts "b", the least recently used
    assert list(cache._entries) == ["c", "a", "d"]
    assert cache.nbytes == 300
    cache.put("big", np.zeros(301, np.uint8))  # larger than the bound: not kept
    assert "big" not in cache._entries
    with pytest.raises(ValueError, match="read-only"):
        cache._entries["a"][0] = 1
    loads: list[str] = []

    def load() -> np.ndarray:
        loads.append("e")
        return np.zeros(10, np.uint8)

    assert cache.get_or_load("e", load) is cache.get_or_load("e", load)
    assert loads == ["e"]
    off = ChunkCache(0)
    off.put("a", arrays_["a"])
    assert off.nbytes == 0 and off.get_or_load("a", lambda: None) is None


# --- real data ------------------------------------------------------------------

KIDNEY = _shared_data() / "real-tiles" / "npy2bdv_kidney"
FUSED = _shared_data() / "real-tiles" / "aind-cloud-fusion_real_data" / "tests" / "real_data"


@pytest.mark.skipif(not KIDNEY.is_dir(), reason="shared real-tiles data not present")
@pytest.mark.parametrize("setup", [0, 1, 2])
def test_kidney_hdf5_equals_original_tiff(setup: int) -> None:
    """Legacy int16 BDV HDF5, reinterpreted as uint16, equals the source hyperstack."""
    h5 = open_array(ArraySource("hdf5", str(KIDNEY / "kidney.h5"), f"t00000/s{setup:02d}/0/cells"))
    tif_path = KIDNEY / "2020-10-08-VictorPuelles-KidneyMalaria.tif"
    tif = open_array(ArraySource("tiff", str(tif_path), f"channel={setup}"))
    assert h5.shape == tif.shape == (32, 172, 111)
    assert h5.dtype == tif.dtype == np.uint16
    expected = tifffile.imread(tif_path)[:, setup]
    np.testing.assert_array_equal(h5.read((0, 0, 0), h5.shape), expected)
    np.testing.assert_array_equal(
        tif.read((5, 20, 30), (17, 99, 101)), expected[5:17, 20:99, 30:101]
    )
    np.testing.assert_array_equal(
        h5.read((5, 20, 30), (17, 99, 101)), expected[5:17, 20:99, 30:101]
    )


@pytest.mark.skipif(not FUSED.is_dir(), reason="shared real-tiles data not present")
def test_real_zarr_v2_5d_blosc() -> None:
    arr = open_array(ArraySource("zarr", str(FUSED / "fused.zarr"), "0"))
    assert arr.shape == (100, 500, 1000)
    assert arr.dtype == np.uint16
    crop = arr.read((90, 95, 190), (100, 105, 210))  # straddles chunk borders
    full = zarr.open_array(str(FUSED / "fused.zarr" / "0"), mode="r")
    np.testing.assert_array_equal(crop, full[0, 0, 90:100, 95:105, 190:210])
    assert open_array(ArraySource("zarr", str(FUSED / "fused.zarr"))).shape == arr.shape
