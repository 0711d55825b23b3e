"""The rule that lets a scatter-added average be scaled value by value (``core.scale_each_value``)."""
import numpy as np
import pytest

from ranger_hvd.core import scale_each_value


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 6, 8])
def test_scale_each_value_only_where_it_gives_the_bits_of_scaling_the_sum(dtype, ranks):
    """An average's 1/N may multiply each value before the scatter-add exactly when N is a power of
    two (float32/64); then the bits equal those of scaling the sum after it."""
    scale = 1.0 / ranks
    early = scale_each_value(scale, True)
    assert early == (ranks & (ranks - 1) == 0)
    assert scale_each_value(scale, False) == (ranks == 1)   # half precision: only a factor of 1
    rng = np.random.default_rng(ranks)
    idx = rng.integers(0, 50, 400)
    values = rng.standard_normal(400).astype(dtype)
    before, after = np.zeros(50, dtype), np.zeros(50, dtype)
    np.add.at(before, idx, values * dtype(scale))
    np.add.at(after, idx, values)
    after *= dtype(scale)
    assert np.array_equal(before, after) or not early
