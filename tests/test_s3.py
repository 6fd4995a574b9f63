"""Tiles read from and output written to ``s3://``, against a local S3 server (moto).

The engine runs step by step (plan, prepare, fuse, pyramid, assemble,
validate) with the dataset's XML and tiles in a bucket and the output in the
bucket too; every stored object must have the bytes of a run that writes the
same output to a local folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from pipeline import run_pipeline, stored_bytes

from tilefusion import fs, steps
from tilefusion.config import load_config
from tilefusion.demo import DemoSpec, write_demo
from tilefusion.errors import InputError
from tilefusion.readers import ArraySource, open_array, read_dataset
from tilefusion.readers.arrays import write_n5_array
from tilefusion.store import IDENTITY_FILE, check_owner, lock_output

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")

BUCKET = "tilefusion-test"
SPEC = DemoSpec(tiles_yx=(1, 2), tile_shape_zyx=(16, 40, 40))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        # Instances made before (other endpoints, no credentials) must not be reused.
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = s3fs.S3FileSystem()
        bucket.mkdir(BUCKET)
        try:
            yield bucket
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def s3_dataset(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The small demo written locally and uploaded: (local XML, its URL)."""
    folder = tmp_path_factory.mktemp("s3demo")
    write_demo(folder / "dataset.xml", SPEC)
    s3.put(str(folder), f"{BUCKET}/demo", recursive=True)
    return folder / "dataset.xml", f"s3://{BUCKET}/demo/dataset.xml"


def _config(dataset: str, output: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "output": {
            "path": output,
            "chunks": [16, 16, 16],
            "shards": [32, 32, 32],
            "pyramid_levels": 2,
        },
        "fusion": {"chunks_per_range": 8},
    }


def _objects(s3: Any, url: str) -> dict[str, str]:
    """Every object under ``url`` with its SHA-256, keyed relative to it."""
    prefix = url.removeprefix("s3://").rstrip("/")
    return {
        key[len(prefix) + 1 :]: hashlib.sha256(s3.cat_file(key)).hexdigest()
        for key in sorted(s3.find(prefix))
    }


def test_tiles_and_output_on_s3_have_the_bytes_of_a_local_run(s3, s3_dataset, tmp_path):
    local_xml, url_xml = s3_dataset
    output = f"s3://{BUCKET}/out/fused.ome.zarr"
    # Same configuration (the dataset is part of the identity), output local.
    run_pipeline(_config(url_xml, str(tmp_path / "local" / "fused.ome.zarr")), tmp_path / "local")
    run_pipeline(_config(url_xml, output), tmp_path / "remote")

    expected = stored_bytes(tmp_path / "local" / "fused.ome.zarr")
    assert _objects(s3, output) == expected
    assert any(key.startswith("1/") for key in expected)  # the pyramid went there too
    # Tiles read from the bucket fuse to the pixels of tiles read from disk.
    run_pipeline(_config(str(local_xml), str(tmp_path / "disk" / "fused.ome.zarr")), tmp_path / "d")
    from_disk = stored_bytes(tmp_path / "disk" / "fused.ome.zarr")
    pixels = {k: v for k, v in expected.items() if k.startswith(("0/c/", "1/c/"))}
    assert pixels and pixels == {k: v for k, v in from_disk.items() if k in pixels}
    # Workflow state stays local.
    assert (tmp_path / "remote" / "results" / "tilefusion" / "qc_report.json").is_file()
    fused = zarr.open_array(fs.zarr_store(f"{output}/0"), mode="r")[:]
    local = zarr.open_array(str(tmp_path / "local" / "fused.ome.zarr" / "0"), mode="r")[:]
    np.testing.assert_array_equal(fused, local)


def test_an_s3_output_is_resumed_and_checked_for_its_owner(s3, s3_dataset, tmp_path):
    _, url_xml = s3_dataset
    output = f"s3://{BUCKET}/owner/fused.ome.zarr"
    config = load_config(_config(url_xml, output))
    identity = steps.store_identity(config)
    assert check_owner(output, identity=identity, overwrite=False) == "absent"
    run_pipeline(_config(url_xml, output), tmp_path)
    assert check_owner(output, identity=identity, overwrite=False) == "resume"
    with pytest.raises(InputError, match="another configuration"):
        check_owner(output, identity="other", overwrite=False)
    assert check_owner(output, identity="other", overwrite=True) == "replace"
    # Not ours: refused even with overwrite.
    s3.pipe_file(f"{BUCKET}/foreign/data.bin", b"x")
    with pytest.raises(InputError, match="not written by tilefusion"):
        check_owner(f"s3://{BUCKET}/foreign", identity=identity, overwrite=True)
    # Replacing empties the prefix, the identity record last, then writes anew.
    changed = _config(url_xml, output)
    changed["output"]["compression"] = {"codec": "gzip", "level": 1}
    run_pipeline(dict(changed, output=dict(changed["output"], overwrite=True)), tmp_path / "new")
    record = json.loads(s3.cat_file(f"{BUCKET}/owner/fused.ome.zarr/{IDENTITY_FILE}"))
    assert record["identity"] == steps.store_identity(load_config(changed))


def test_object_store_outputs_are_not_locked(s3, caplog):
    with caplog.at_level(logging.WARNING, logger="tilefusion"):
        lock = lock_output(f"s3://{BUCKET}/lock/fused.ome.zarr")
    lock.release()
    assert "not locked" in caplog.text
    assert not s3.exists(f"{BUCKET}/lock")


def test_n5_and_xml_at_urls(s3, tmp_path):
    data = np.arange(6 * 10 * 12, dtype=np.uint16).reshape(6, 10, 12)
    write_n5_array(tmp_path / "t.n5", "setup0/timepoint0/s0", data, block_size_zyx=(4, 4, 8))
    s3.put(str(tmp_path / "t.n5"), f"{BUCKET}/n5/t.n5", recursive=True)
    (tmp_path / "t.n5" / "setup0" / "timepoint0" / "s0" / "1" / "0" / "0").unlink()
    s3.rm_file(f"{BUCKET}/n5/t.n5/setup0/timepoint0/s0/1/0/0")
    remote = open_array(ArraySource("n5", f"s3://{BUCKET}/n5/t.n5", "setup0/timepoint0/s0"))
    local = open_array(ArraySource("n5", str(tmp_path / "t.n5"), "setup0/timepoint0/s0"))
    np.testing.assert_array_equal(
        remote.read((1, 2, 3), (6, 10, 12)), local.read((1, 2, 3), (6, 10, 12))
    )
    assert remote.absent_chunks == local.absent_chunks == {"1/0/0"}


def test_a_missing_tile_on_s3_is_one_line(s3, tmp_path):
    with pytest.raises(InputError, match=rf"s3://{BUCKET}/nothing.zarr: array: "):
        open_array(ArraySource("zarr", f"s3://{BUCKET}/nothing.zarr"))
    with pytest.raises(InputError, match="file not found"):
        read_dataset(f"s3://{BUCKET}/nothing.xml")
