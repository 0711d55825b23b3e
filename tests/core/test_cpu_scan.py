"""The compiled CPU selection (``core/cpu_scan.py``) against the NumPy specification."""

import numpy as np
import pytest

from ranger_hvd.core import cpu_scan, reference, uses_sampling

from .inputs import selection_inputs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_select_is_the_reference_top_k_of_the_sum(dtype):
    """acc = e + g bit for bit (one rounding in the arrays' precision, e untouched), and exactly the
    reference set, on inputs built to defeat the sampled estimate (too high, too low, zero)."""
    assert cpu_scan.available(), "numba must import"
    rng = np.random.default_rng(3)
    checked = 0
    for name, x in selection_inputs(rng):
        n = x.size
        for k in sorted({1, max(1, n // 1000), max(1, n // 100), max(1, n // 10), max(1, n // 4)}):
            if not uses_sampling(n, k, 0.01):
                continue
            e = (rng.standard_normal(n) * 0.3).astype(dtype) if name != "zeros" else np.zeros(n, dtype)
            g = x.astype(dtype)
            e_before = e.copy()
            acc = np.full(n, np.nan, dtype)
            got = cpu_scan.accumulate_select(e, g, k, 0.01, acc)
            assert got.dtype == np.int32 and got.shape == (k,)
            assert np.array_equal(acc, e + g), f"{name}: n={n} k={k}"
            assert np.array_equal(e, e_before)
            assert np.array_equal(got, reference.select(e + g, k)), f"{name}: n={n} k={k}"
            checked += 1
    assert checked >= 25


def test_a_mostly_zero_sum_with_fewer_non_zeros_than_k_takes_the_first_zeros():
    n = 40_000
    g = np.zeros(n, np.float32)
    g[[5, 17_000, 39_999]] = [2.0, -3.0, 1e-42]  # the last one subnormal: still non-zero
    e = np.zeros(n, np.float32)
    e[17_000] = 3.0  # cancels: a zero in the sum
    acc = np.empty(n, np.float32)
    got = cpu_scan.accumulate_select(e, g, 200, 0.01, acc)
    want = reference.select(acc, 200)
    assert np.array_equal(got, want)
    # both non-zeros (the subnormal included), then the 198 lowest-indexed zeros
    assert got.tolist() == list(range(199)) + [39_999]  # 5 among them, 17000 (zero) not
