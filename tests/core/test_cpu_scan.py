"""The compiled CPU selection (``core/cpu_scan.py``) against the NumPy specification."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_pass_counts_non_finite_gradient_entries_and_spares_the_residual(bad):
    n = 50_000
    rng = np.random.default_rng(5)
    e = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    e_before = e.copy()
    g[[3, 49_999]] = bad
    with pytest.raises(cpu_scan.NonFiniteGradient, match="2 of the gradient's 50000 entries"):
        cpu_scan.accumulate_select(e, g, 500, 0.01, np.empty(n, np.float32), check_finite=True)
    assert np.array_equal(e, e_before)
    # Unchecked, the call completes (its selection is then unspecified).
    assert cpu_scan.accumulate_select(e, g, 500, 0.01, np.empty(n, np.float32)).shape == (500,)
    # A residual that would take the sum in place cannot be spared: refused before any write.
    with pytest.raises(ValueError, match="not the residual"):
        cpu_scan.accumulate_select(e, g, 500, 0.01, e, check_finite=True)
    assert np.array_equal(e, e_before)
    # Largest finite values and subnormals are finite.
    g = np.full(n, np.finfo(np.float32).max, np.float32)
    g[::2] = 1e-42
    cpu_scan.accumulate_select(np.zeros(n, np.float32), g, 500, 0.01, np.empty(n, np.float32),
                               check_finite=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("factor", [1.0, 0.5, 0.25])
def test_scatter_add_sums_each_entry_in_pair_order(dtype, factor):
    """Bit for bit what adding the pairs one by one from +0.0 gives (``np.add.at`` is unbuffered,
    in pair order): repeated indices (3 ranks choosing overlapping entries), -0.0 values."""
    rng = np.random.default_rng(6)
    n = 30_000
    idx = np.concatenate([np.sort(rng.choice(n, 4000, replace=False)) for _ in range(3)])
    idx = idx.astype(np.int32)
    vals = (rng.standard_normal(idx.size) * np.exp(rng.uniform(-20, 20, idx.size))).astype(dtype)
    vals[::97] = -0.0
    out = np.full(n, np.nan, dtype)
    cpu_scan.scatter_add(idx, vals, factor, out)
    want = np.zeros(n, dtype)
    np.add.at(want, idx, vals * dtype(factor))
    assert want.dtype == out.dtype
    assert np.array_equal(out.view(np.uint8), want.view(np.uint8))  # bits, signs of zero included
    # An entry reached only by -0.0 holds +0.0 (+0.0 + -0.0), as after TF's scatter into zeros.
    out = np.full(8, np.nan, dtype)
    cpu_scan.scatter_add(np.array([4, 4], np.int32), np.array([-0.0, -0.0], dtype), factor, out)
    assert np.array_equal(out, np.zeros(8)) and not np.signbit(out).any()
    # zeroed=True trusts the caller's zeros and adds into them: the same bits; what it does not
    # clear stays (the NaN planted where no pair goes)
    out = np.zeros(n, dtype)
    out[1] = np.nan
    idx_free = idx[idx != 1]
    cpu_scan.scatter_add(idx_free, vals[idx != 1], factor, out, zeroed=True)
    want = np.zeros(n, dtype)
    np.add.at(want, idx_free, vals[idx != 1] * dtype(factor))
    want[1] = np.nan
    assert np.array_equal(out.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("index", [-1, 1000, 2 ** 31 - 1])
def test_scatter_add_refuses_an_index_outside_the_tensor(index):
    idx = np.array([0, 5, index, 7], np.int32)
    with pytest.raises(ValueError, match=f"pair 2 has index {index}, outside a tensor of 1000"):
        cpu_scan.scatter_add(idx, np.ones(4, np.float32), 1.0, np.empty(1000, np.float32))


@pytest.mark.parametrize("kernel", ["screen", "screen_sparse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 31, 4095, 4096, 12293])
@pytest.mark.parametrize("rate", [0.0, 0.002, 0.05, 0.4, 1.0])
def test_the_screen_lists_what_a_plain_scan_lists_within_its_room(kernel, dtype, n, rate):
    """Few hits, many, and a list that fills up: the same positions, count, NaN count and sums as
    NumPy, and nothing written past the list's room (a branch-free append writes each position
    before it knows whether to keep it), in place or into a separate buffer. Both forms of the loop
    (per entry, and in blocks of 32 with a partial block at the end) give the same."""
    rng = np.random.default_rng(n + int(rate * 1000))
    residual = rng.standard_normal(n).astype(dtype)
    grad = rng.standard_normal(n).astype(dtype)
    grad[n // 2] = np.nan
    if n > 1:
        grad[n - 1] = -np.inf  # listed: |-inf| passes any threshold
    acc_ref = residual + grad
    finite = np.abs(acc_ref[np.isfinite(acc_ref)])
    threshold = float(np.quantile(finite, 1 - rate)) if rate > 0 and finite.size else 1e9
    listed = np.flatnonzero(np.abs(acc_ref) >= threshold).astype(np.int32)
    for room in sorted({n, len(listed), max(len(listed) - 1, 0), len(listed) // 3, 0}):
        guard = np.full(room + 8, -7, dtype=np.int32)
        acc = np.empty_like(residual)
        count, non_finite = getattr(cpu_scan._kernels(), kernel)(residual, grad, threshold, guard[:room], acc)
        assert (count, non_finite) == (len(listed), min(n, 2))
        kept = min(room, count)
        np.testing.assert_array_equal(guard[:kept], listed[:kept])
        assert (guard[room:] == -7).all(), f"room {room}: wrote past the list"
        assert acc.tobytes() == acc_ref.tobytes()
        # in place (the sparse form then has a loop of its own)
        in_place = residual.copy()
        guard[:] = -7
        expected = 0 if kernel == "screen_sparse" else None  # what picks the form of the loop
        assert cpu_scan.accumulate_and_screen(in_place, grad, threshold, guard[:room], expected=expected) == len(listed)
        assert in_place.tobytes() == acc_ref.tobytes()
        np.testing.assert_array_equal(guard[:kept], listed[:kept])
        assert (guard[room:] == -7).all(), f"room {room}, in place: wrote past the list"


_pairs = st.lists(st.tuples(st.integers(0, 40), st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e-30, 3e38,
                                                                   -3e38, np.inf, -np.inf, np.nan])),
                  max_size=60)


@settings(max_examples=150, deadline=None)
@given(pairs=_pairs, dtype=st.sampled_from([np.float32, np.float64]))
def test_sum_runs_is_np_add_at_in_the_order_of_the_pairs(pairs, dtype):
    """A global top-k owner's sums: each distinct index once, its values added in the order they
    came from +0.0 (np.add.at's bits: signed zeros, overflow to Inf, NaN), and the count of sums
    that are not finite."""
    pairs.sort(key=lambda p: p[0])   # a stable sort: equal indices keep their arrival order
    indices = np.array([i for i, _ in pairs], np.int32)
    values = np.array([v for _, v in pairs], dtype)
    unique, sums, non_finite = cpu_scan.sum_runs(indices, values)
    want_unique, inverse = np.unique(indices, return_inverse=True)
    want = np.zeros(len(want_unique), dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        np.add.at(want, inverse, values)
    np.testing.assert_array_equal(unique, want_unique)
    assert sums.dtype == dtype and sums.tobytes() == want.tobytes()
    assert non_finite == int((~np.isfinite(want)).sum())


@settings(max_examples=150, deadline=None)
@given(a=st.lists(st.integers(-5, 60), max_size=50), b=st.lists(st.integers(-5, 60), max_size=50),
       dtypes=st.sampled_from([(np.int32, np.int32), (np.int64, np.int32), (np.int32, np.int64)]))
def test_sorted_member_is_isin(a, b, dtypes):
    a, b = np.sort(np.array(a, dtypes[0])), np.sort(np.array(b, dtypes[1]))
    found, count = cpu_scan.sorted_member(a, b)
    np.testing.assert_array_equal(found, np.isin(a, b))
    assert count == int(np.isin(a, b).sum())


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 7.0]), min_size=1, max_size=40),
       k=st.integers(1, 45))
def test_select_largest_is_the_reference_selection(values, k):
    """Ties everywhere: the k largest magnitudes, ties to the lower position, as reference.select."""
    x = np.array(values, np.float32)
    got = cpu_scan.select_largest(x, k)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.sort(reference.select(x, min(k, x.size))))
