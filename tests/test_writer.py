"""The object writer: whatever it writes, zarr-python reads back exactly."""

import hashlib

import numpy as np
import pytest
import zarr

from tilefusion import geometry
from tilefusion.plan import make_plan, shard_box
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.store import FormatV04, FormatV05, prepare_store
from tilefusion.writer import LevelWriter, UnsupportedLayout

CODECS = ["zstd", "blosc-zstd", "blosc-lz4", "gzip", "none"]


def _plan(*, chunks=(8, 16, 16), shards=(16, 32, 32), shape=(37, 45, 70)):
    view = View(
        setup=0,
        timepoint=0,
        shape_zyx=shape,
        voxel_size_zyx=(1.0, 1.0, 1.0),
        model=geometry.translation([0.0, 0.0, 0.0]),
        source=ArraySource("memory", "unused"),
        calibration_zyx=(1.0, 1.0, 1.0),
    )
    return make_plan(
        Dataset("d.xml", "micrometer", (view,)),
        chunks_zyx=chunks,
        shards_zyx=shards,
        chunks_per_range=8,
    )


def _volume(shape, chunks, *, seed=0, dtype="uint16"):
    """Random data with some chunks left all zero (they must not be stored)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 60000, size=shape).astype(dtype)
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    for index in np.ndindex(*grid):
        if rng.random() < 0.3:
            data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))] = 0
    return data


def _write_all(writer, level, data):
    objects = {}
    for shard in np.ndindex(*level.shard_grid):
        lo, hi = shard_box(level, shard)
        block = data[tuple(slice(a, b) for a, b in zip(lo, hi))]
        objects.update(writer.write(shard, block))
    return objects


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("ngff", [FormatV04(), FormatV05()], ids=["0.4", "0.5"])
def test_zarr_reads_back_what_the_writer_wrote(tmp_path, ngff, codec):
    plan = _plan()
    level = plan.grid
    path = tmp_path / "out.zarr"
    prepare_store(plan, path, ngff=ngff, dtype="uint16", codec=codec, identity="t")
    writer = LevelWriter(path, 0, level)
    data = _volume(level.shape_zyx, level.chunks_zyx)
    objects = _write_all(writer, level, data)

    np.testing.assert_array_equal(zarr.open_array(str(path / "0"), mode="r")[:], data)
    for key, digest in objects.items():
        stored = path / key
        if digest is None:
            assert not stored.exists()
        else:
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    assert any(d is None for d in objects.values()) or ngff.sharding
    assert not list(path.rglob("*.partial"))


def test_sharded_object_leaves_out_empty_inner_chunks(tmp_path):
    plan = _plan()
    level = plan.grid
    path = tmp_path / "out.zarr"
    prepare_store(plan, path, ngff=FormatV05(), dtype="uint16", identity="t")
    writer = LevelWriter(path, 0, level)
    block = np.zeros(np.subtract(*shard_box(level, (0, 0, 0))[::-1]), dtype="uint16")
    block[0, 0, 0] = 7  # one inner chunk of eight holds data
    (digest,) = writer.write((0, 0, 0), block).values()
    assert digest is not None
    index_and_crc = 8 * 2 * 8 + 4
    stored = (path / "0" / "c" / "0" / "0" / "0").read_bytes()
    index = np.frombuffer(stored[-index_and_crc:-4], dtype="<u8").reshape(2, 2, 2, 2)
    assert (index[..., 1] != 2**64 - 1).sum() == 1
    assert zarr.open_array(str(path / "0"), mode="r")[0, 0, 0] == 7


@pytest.mark.parametrize("ngff", [FormatV04(), FormatV05()], ids=["0.4", "0.5"])
def test_an_empty_block_removes_a_stale_object(tmp_path, ngff):
    plan = _plan()
    level = plan.grid
    path = tmp_path / "out.zarr"
    prepare_store(plan, path, ngff=ngff, dtype="uint16", identity="t")
    writer = LevelWriter(path, 0, level)
    lo, hi = shard_box(level, (0, 0, 0))
    shape = tuple(b - a for a, b in zip(lo, hi))
    first = writer.write((0, 0, 0), np.full(shape, 5, dtype="uint16"))
    assert all(d is not None for d in first.values())
    again = writer.write((0, 0, 0), np.zeros(shape, dtype="uint16"))
    assert set(again) == set(first) and all(d is None for d in again.values())
    assert all(not (path / key).exists() for key in first)
    assert writer.write((0, 0, 0), None) == again
    assert not zarr.open_array(str(path / "0"), mode="r")[:].any()


def test_float_output_round_trips(tmp_path):
    plan = _plan()
    level = plan.grid
    path = tmp_path / "out.zarr"
    prepare_store(plan, path, ngff=FormatV05(), dtype="float32", identity="t")
    writer = LevelWriter(path, 0, level)
    data = _volume(level.shape_zyx, level.chunks_zyx, dtype="float32") / 7.0
    _write_all(writer, level, data.astype("float32"))
    np.testing.assert_array_equal(zarr.open_array(str(path / "0"), mode="r")[:], data)


def test_a_layout_it_cannot_encode_is_refused(tmp_path):
    plan = _plan()
    path = tmp_path / "out.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(
        name="0",
        shape=plan.grid.shape_zyx,
        chunks=plan.grid.chunks_zyx,
        dtype="uint16",
        filters=[zarr.codecs.TransposeCodec(order=(2, 1, 0))],
    )
    with pytest.raises(UnsupportedLayout, match=r"zarr\.json"):
        LevelWriter(path, 0, plan.grid)
