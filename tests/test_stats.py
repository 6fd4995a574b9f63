"""Pixel statistics: every dtype gives the masked definition's numbers."""

import numpy as np
import pytest

from tilefusion.stats import block_stats, merge_stats


def _reference(block):
    values = block[block != 0].astype(np.float64)
    return {
        "voxels": block.size,
        "covered": values.size,
        "min": values.min() if values.size else 0.0,
        "max": values.max() if values.size else 0.0,
        "sum": values.sum(),
    }


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "float32"])
@pytest.mark.parametrize("fill", ["random", "zeros", "extremes"])
def test_block_stats_match_the_masked_definition(dtype, fill):
    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1000.0
    block = rng.integers(0, 50, size=(5, 6, 7)).astype(dtype)
    if fill == "zeros":
        block[:] = 0
    elif fill == "extremes":
        block[0, 0, 0] = top
        block[1, 1, 1] = 1
    assert block_stats(block) == pytest.approx(_reference(block))


def test_merged_stats_equal_the_whole_blocks():
    rng = np.random.default_rng(4)
    block = rng.integers(0, 9, size=(6, 8, 8)).astype(np.uint16)
    block[:3] = 0
    parts = [block_stats(block[:3]), block_stats(block[3:])]
    assert merge_stats(parts) == pytest.approx(block_stats(block))
