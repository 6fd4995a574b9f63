from pathlib import Path

import pytest

from tilefusion.demo import write_demo


@pytest.fixture(scope="session")
def demo_xml(tmp_path_factory) -> Path:
    """The bundled demo dataset, written once per test session."""
    path = tmp_path_factory.mktemp("demo") / "dataset.xml"
    write_demo(path)
    return path
