import pytest

from tilefusion.config import load_config, read_config_file
from tilefusion.errors import InputError


def test_defaults_are_filled():
    config = load_config({"dataset": "d.xml"})
    assert config["output"]["format"] == "ome-zarr-0.5"
    assert config["output"]["compression"] == {"codec": "zstd", "level": 1}
    assert config["fusion"]["blending"] == "cosine"
    assert config["demo"] is False


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"dataset": "d.xml", "fusion": {"blendng": "max"}}, "fusion.blendng", "unknown key"),
        ({"dataset": "d.xml", "outptu": {}}, "outptu", "unknown key"),
        ({"dataset": "d.xml", "fusion": {"blending": "median"}}, "fusion.blending", "not one of"),
        (
            {"dataset": "d.xml", "output": {"chunks": [32, 64, 64], "shards": [64, 96, 128]}},
            "output.shards",
            "not a multiple",
        ),
        (
            {"dataset": "d.xml", "output": {"resolution": [1, 0, 1]}},
            "output.resolution",
            "positive",
        ),
        ({}, "(top level)", "'dataset' is a required property"),
    ],
)
def test_bad_config_names_the_key(raw, key, message):
    with pytest.raises(InputError, match=message) as info:
        load_config(raw, source="my.yaml")
    text = str(info.value)
    assert text.startswith("my.yaml: ") and key in text and "\n" not in text


def test_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(InputError, match="malformed YAML"):
        read_config_file(bad)
