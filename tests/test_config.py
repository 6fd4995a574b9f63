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


def _schema_properties(node, path=""):
    """Every (dotted path, schema, inside a list item) of the config schema."""
    for key, sub in node.get("properties", {}).items():
        where = f"{path}.{key}" if path else key
        yield where, sub, "[]" in path
        yield from _schema_properties(sub, where)
    if isinstance(node.get("items"), dict):
        yield from _schema_properties(node["items"], f"{path}[]")


def test_every_schema_key_has_a_description_and_a_default():
    from tilefusion.config import schema

    missing = []
    for where, sub, in_list in _schema_properties(schema()):
        if "description" not in sub:
            missing.append(f"{where}: description")
        # Items of a list (one post-transform) have no default of their own.
        if not in_list and "default" not in sub:
            missing.append(f"{where}: default")
    assert not missing, missing


def test_a_key_at_its_default_leaves_the_store_identity_unchanged():
    from tilefusion.config import load_config, without_defaults
    from tilefusion.steps import store_identity

    given = {"dataset": "data/x.xml", "output": {"chunks": [32, 32, 32]}}
    full = load_config(given)
    assert without_defaults(full) == given
    # An added key at its default is invisible; any other value is not.
    assert store_identity(full) == store_identity(load_config({**given, "fusion": {}}))
    explicit = load_config({**given, "fusion": {"blending": full["fusion"]["blending"]}})
    assert store_identity(explicit) == store_identity(full)
    other = load_config({**given, "fusion": {"interpolation": "nearest"}})
    assert store_identity(other) != store_identity(full)
