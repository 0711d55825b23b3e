"""Single-process checks of the PyTorch compressor against the NumPy specification in core/reference.py.

No Horovod here: these run in milliseconds and pin down the math; tests/torch/test_horovod.py runs
the same code under real horovodrun.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from ranger_hvd import core
from ranger_hvd.core import OptionsError, cpu_scan, reference
from ranger_hvd.torch import NonFiniteGradientError, RangerCompressor, random_k_indices, topk_indices
from ranger_hvd.torch.selection import SelectionScratch, accumulate_topk

from ..core.inputs import selection_inputs


@pytest.mark.parametrize("use_scratch", [False, True])
def test_selection_equals_reference(use_scratch):
    rng = np.random.default_rng(0)
    scratch = SelectionScratch() if use_scratch else None
    for name, x in selection_inputs(rng):
        n = x.size
        ks = sorted({min(n, k) for k in (1, 2, max(1, n // 1000), max(1, n // 100),
                                          max(1, n // 10), n // 2 or 1, n, int(rng.integers(1, n + 1)))})
        for k in ks:
            got = topk_indices(torch.from_numpy(x), k, 0.01, scratch)
            assert got.dtype == torch.int32
            want = reference.select(x, k)
            assert np.array_equal(got.numpy(), want), f"{name}: n={n} k={k}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_topk_sums_in_place_and_selects_like_reference(dtype, monkeypatch):
    """The fused CPU pass: the residual becomes e + g bit for bit (one rounding in the tensor's
    precision, as torch's add), and the indices are the reference top-k of that sum."""
    assert cpu_scan.available(), "numba (a dependency of the torch extra) must import"
    screens = []
    real = cpu_scan.accumulate_and_screen
    monkeypatch.setattr(cpu_scan, "accumulate_and_screen",
                        lambda *a, **kw: screens.append(real(*a, **kw)) or screens[-1])
    rng = np.random.default_rng(11)
    scratch = SelectionScratch()
    for name, x in selection_inputs(rng):
        n = x.size
        for k in sorted({1, max(1, n // 1000), max(1, n // 100), max(1, n // 10)}):
            e = (rng.standard_normal(n) * 0.3).astype(dtype)
            g = x.astype(dtype)
            want_acc = e + g
            residual = torch.from_numpy(e.copy())
            got = accumulate_topk(residual, torch.from_numpy(g), k, 0.01, scratch)
            assert got.dtype == torch.int32
            assert np.array_equal(residual.numpy(), want_acc), f"{name}: n={n} k={k}"
            assert np.array_equal(got.numpy(), reference.select(want_acc, k)), f"{name}: n={n} k={k}"
    # Large sampled tensors went through the fused pass, including ones whose estimate failed
    # (fewer than k candidates, or more than its room) and fell back to the ordinary selection.
    assert len(screens) >= 20
    assert any(c > 0 for c in screens)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_topk_on_mostly_zero_sums_screens_for_the_non_zeros(dtype, monkeypatch):
    """An embedding's gradient touches a few rows, so the sampled estimate is 0: the fused pass then
    lists the sum's non-zero entries. Fewer than k: all of them, then the first zeros; more: the k
    largest; too many for the pass's room: the ordinary selection on the completed sum. Always the
    reference set and e + g bit for bit, subnormals and -0.0 included."""
    rows, width = 400, 128  # 51,200 entries; k = 512 at d = 0.01
    n = rows * width
    thresholds = []
    real = cpu_scan.accumulate_and_screen
    monkeypatch.setattr(cpu_scan, "accumulate_and_screen",
                        lambda *a, **kw: thresholds.append(a[2]) or real(*a, **kw))
    rng = np.random.default_rng(12)
    scratch = SelectionScratch()
    cases = {"two rows": (2, 0, 512), "two rows, k below them": (2, 0, 100),
             "rows in e and g": (3, 2, 512), "too many for the room": (0, 0, 512)}
    for name, (grad_rows, residual_rows, k) in cases.items():
        e = np.zeros((rows, width), dtype)
        g = np.zeros((rows, width), dtype)
        g[rng.choice(rows, grad_rows, replace=False)] = rng.standard_normal((grad_rows, width))
        e[rng.choice(rows, residual_rows, replace=False)] = rng.standard_normal((residual_rows, width))
        g[0, :2] = [-0.0, 0.0]
        g[-1, -1] = 1e-42 if dtype == np.float32 else 1e-310  # subnormal, last: zeros fill from the front
        e, g = e.ravel(), g.ravel()
        if name == "too many for the room":  # non-zero everywhere but where the sample looks
            g[:] = rng.standard_normal(n)
            g[::100] = 0
        want = e + g
        residual = torch.from_numpy(e.copy())
        thresholds.clear()
        got = accumulate_topk(residual, torch.from_numpy(g), k, 0.01, scratch)
        assert residual.numpy().tobytes() == want.tobytes(), name
        assert np.array_equal(got.numpy(), reference.select(want, k)), name
        assert thresholds == [cpu_scan.non_zero_threshold(dtype)], (name, thresholds)
        if (want != 0).sum() <= k:
            assert got[-1] == n - 1, f"{name}: the subnormal counts as non-zero"
    assert (want != 0).sum() > 4 * 512 + 64 * 100, "the last case overflows the room (4k + 64 * stride)"


def test_cpu_scan_counts_past_its_room():
    residual = np.array([0, 5, -1, 7, 0, -9, 2, 8], np.float32)
    grad = np.full(8, 0.5, np.float32)
    out = np.full(2, -1, np.int32)
    count = cpu_scan.accumulate_and_screen(residual, grad, 5.0, out)
    # |acc| >= 5 at 1 (5.5), 3 (7.5), 5 (8.5), 7 (8.5): four, of which the first two fit.
    assert count == 4 and out.tolist() == [1, 3]
    assert residual.tolist() == [0.5, 5.5, -0.5, 7.5, 0.5, -8.5, 2.5, 8.5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_selection_other_dtypes(dtype):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal(30_000).astype(np.float32)).to(dtype)
    for k in (1, 30, 300, 3000):
        want = reference.select(x.to(torch.float64).numpy(), k)
        assert np.array_equal(topk_indices(x, k, 0.01, SelectionScratch()).numpy(), want)


def test_selection_sample_fraction_does_not_change_result():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal(200_000).astype(np.float32))
    want = topk_indices(x, 200, 1.0)
    for frac in (0.001, 0.01, 0.1, 0.5):
        assert torch.equal(topk_indices(x, 200, frac), want)


def test_selection_rejects_bad_k():
    with pytest.raises(ValueError):
        topk_indices(torch.ones(10), 0)
    with pytest.raises(ValueError):
        topk_indices(torch.ones(10), 11)


def _assert_follows_reference(shape, steps, spike_every, spike, seed, **options):
    """Steps a compressor and core.reference side by side on the same gradients (every
    ``spike_every``-th one ``spike`` times larger): indices, values, residual and velocity bit for bit."""
    rng = np.random.default_rng(seed)
    comp = RangerCompressor(min_elements=1, **options)
    comp.world_size = 2
    n = math.prod(shape)
    ref = reference.ReferenceCompressor(n, comp.options, world_size=2)
    for step in range(steps):
        g = rng.standard_normal(n).astype(np.float32) * (spike if step % spike_every == 0 else 1.0)
        values, indices = comp.compress_sparse("w", torch.from_numpy(g.reshape(shape)))
        ref_idx, ref_values = ref.step(g)
        assert np.array_equal(indices.numpy(), ref_idx), step
        assert np.array_equal(values.numpy(), ref_values), step
        st = comp._state["w"]
        assert np.array_equal(st.residual.numpy(), ref.residual), step
        if comp.options.momentum:
            assert np.array_equal(st.velocity.numpy(), ref.velocity), step


# Momentum without DGC's masking needs momentum: with m = 0 the options refuse momentum_masking.
@pytest.mark.parametrize("momentum, extra", [
    (m, extra) for m in (0.0, 0.9)
    for extra in ({}, {"warmup_steps": 4, "warmup_start_density": 0.5}, {"clip_norm": 5.0})]
    + [(0.9, {"momentum_masking": False})])
def test_error_feedback_matches_reference_bitwise(momentum, extra):
    _assert_follows_reference((40, 50), 15, 5, 10.0, seed=3, density=0.03, momentum=momentum, **extra)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_error_feedback_matches_reference_on_sampled_tensors(momentum):
    """Tensors large enough for the sampled, fused CPU selection still follow the reference bit for
    bit over many steps, while the residual grows heavy tails."""
    _assert_follows_reference((300, 200), 12, 4, 5.0, seed=4, density=0.01, momentum=momentum)


def test_conservation_invariant_single_rank():
    """With m = 0, what was sent plus the residual is the sum of the gradients."""
    rng = np.random.default_rng(4)
    comp = RangerCompressor(density=0.01, min_elements=1)
    total_sent = torch.zeros(5000, dtype=torch.float64)
    total_grad = torch.zeros(5000, dtype=torch.float64)
    for _ in range(20):
        g = torch.from_numpy(rng.standard_normal(5000).astype(np.float32)).view(50, 100)
        values, indices = comp.compress_sparse("w", g)
        total_sent.index_add_(0, indices.long(), values.double())
        total_grad += g.view(-1).double()
    residual = comp._state["w"].residual.double()
    torch.testing.assert_close(total_sent + residual, total_grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value_dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_gradients_and_wire_values(grad_dtype, value_dtype):
    comp = RangerCompressor(density=0.1, min_elements=1, value_dtype=value_dtype)
    g = torch.randn(64, 32).to(grad_dtype)
    values, indices = comp.compress_sparse("w", g)
    assert comp._state["w"].residual.dtype == grad_dtype
    assert values.dtype == getattr(torch, value_dtype)
    assert indices.dtype == torch.int32 and values.numel() == indices.numel() == 205
    want = reference.select(g.to(torch.float64).numpy().reshape(-1), 205)
    assert np.array_equal(indices.numpy(), want)
    # What the allgather of one rank's payload delivers, combined as decompress does.
    from ranger_hvd.torch.compressor import pack_pairs
    out = torch.zeros(64 * 32, dtype=grad_dtype)
    comp.combine(pack_pairs(indices, values), 205, out)
    flat = out.view(-1)
    assert torch.equal(flat[indices.long()], values.to(grad_dtype))
    assert int((flat != 0).sum()) <= 205


@pytest.mark.parametrize("bad, option", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"density": -0.1}, "density"),
    ({"momentum": -0.1}, "momentum"), ({"momentum": 1.0}, "momentum"),
    ({"min_elements": 0}, "min_elements"), ({"value_dtype": "int8"}, "value_dtype"),
    ({"sample_fraction": 0.0}, "sample_fraction"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_options_raise_at_construction(bad, option):
    with pytest.raises(OptionsError, match=option):
        RangerCompressor(**bad)


def test_non_finite_gradient_names_parameter_and_keeps_residual():
    comp = RangerCompressor(density=0.1, min_elements=1, nonfinite="raise")
    comp.compress_sparse("layer1.weight", torch.ones(10, 10))
    before = comp._state["layer1.weight"].residual.clone()
    for bad in (float("nan"), float("inf"), float("-inf")):
        g = torch.ones(10, 10)
        g[3, 4] = bad
        with pytest.raises(NonFiniteGradientError, match="layer1.weight"):
            comp.compress_sparse("layer1.weight", g)
        assert torch.equal(comp._state["layer1.weight"].residual, before)
    # A finite gradient whose sum overflows is not mistaken for a non-finite one.
    comp.compress_sparse("layer1.weight", torch.full((10, 10), 3e38))
    unchecked = RangerCompressor(density=0.1, min_elements=1, check_finite=False)
    unchecked.compress_sparse("w", torch.full((10, 10), float("nan")))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_non_finite_step_leaves_state_and_undo_takes_back_the_send(momentum):
    """The default ``nonfinite="skip"``, against the reference: a non-finite gradient changes no
    state and sends its non-finite entries first; ``undo`` after a finite step restores e[S] and
    u[S] bit for bit, so the next steps go on exactly as the reference's."""
    opts = dict(density=0.1, min_elements=1, momentum=momentum)
    comp = RangerCompressor(**opts)
    ref = reference.ReferenceCompressor(120, core.make_options(**opts))
    rng = np.random.default_rng(7)
    for step in range(6):
        g = rng.standard_normal((10, 12)).astype(np.float32)
        if step == 2:
            g[3, 4], g[7, 1] = np.nan, -np.inf
        values, idx = comp.compress_sparse("w", torch.from_numpy(g))
        ridx, rvalues = ref.step(g)
        assert np.array_equal(idx.numpy(), ridx)
        assert np.array_equal(values.numpy(), rvalues, equal_nan=True)
        if step == 2:
            assert {3 * 12 + 4, 7 * 12 + 1} <= set(idx.tolist())
        if step in (1, 4):   # the exchange showed these steps void: every rank undoes its send
            comp.engine.undo(comp._state["w"])
            ref.undo()
            comp.engine.undo(comp._state["w"])   # a second undo does nothing
        st = comp._state["w"]
        assert np.array_equal(st.residual.numpy(), ref.residual)
        if momentum:
            assert np.array_equal(st.velocity.numpy(), ref.velocity)
    assert comp._state["w"].step == ref.step_count == 6


def test_decompress_passes_through_what_horovod_did_not_compress():
    """Horovod reduces sparse gradients itself and calls decompress(tensor, None)."""
    t = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))
    assert RangerCompressor().decompress(t, None) is t


def test_byte_accounting_formula():
    comp = RangerCompressor(density=0.01, min_elements=1000)
    comp.compress_sparse("a", torch.randn(100, 100))        # k = 100
    comp.compress_sparse("b", torch.randn(333, 7))          # k = ceil(23.31) = 24
    comp._stats.add(core.dense_counts(10, 4))        # a 10-element fp32 tensor sent dense
    s = comp.stats()
    # each top-k tensor: k * (value + int32 index) + the 4-byte token
    assert s["bytes_sent"] == (100 + 24) * (4 + 4) + 2 * 4 + 40
    assert s["bytes_dense"] == 4 * (10_000 + 2331 + 10)
    half = RangerCompressor(density=0.01, value_dtype="float16")
    half.compress_sparse("a", torch.randn(100, 100))
    assert half.stats()["bytes_sent"] == 100 * (2 + 4) + 4


def test_dense_rules_and_k():
    comp = RangerCompressor(density=0.07, min_elements=100)
    assert not comp.is_compressed((10, 9))        # too small
    assert not comp.is_compressed((1000,))        # 1-D goes dense by default
    assert comp.is_compressed((10, 10))
    assert RangerCompressor(compress_1d=True, min_elements=100).is_compressed((1000,))
    assert core.num_selected(100, 0.07) == 7       # the decimal density, not 7.000000000000001


# ---------------------------------------------------------------- Horovod's compress/decompress
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))


def _grads(model, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    model(torch.randn(8, 64)).square().sum().backward()


def test_horovod_interface_same_coordinates_on_every_rank():
    """Two compressors (two 'ranks') with different gradients choose the same coordinates."""
    ranks = [_model(), _model()]
    comps = [RangerCompressor(density=0.05, min_elements=100, named_parameters=m.named_parameters(),
                              selection="random") for m in ranks]
    for c in comps:
        c.world_size = 2
    for step in range(3):
        ctxs = []
        for r, (m, c) in enumerate(zip(ranks, comps)):
            _grads(m, 100 * step + r)
            w = m[0].weight
            values, ctx = c.compress(w.grad)
            assert values.numel() == math.ceil(0.05 * w.numel()) < w.numel()
            ctxs.append(ctx)
            seed = core.random_k_seed(0, "0.weight") * 2 ** 32 + step
            assert torch.equal(ctx.indices, random_k_indices(w.numel(), values.numel(), seed))
        assert torch.equal(ctxs[0].indices, ctxs[1].indices)
        assert not torch.equal(ctxs[0].indices, random_k_indices(2560, 128, 12345))


def test_horovod_interface_roundtrip_and_bytes():
    m = _model()
    comp = RangerCompressor(density=1.0, min_elements=100, named_parameters=m.named_parameters(),
                            selection="random")
    comp.world_size = 1
    _grads(m, 0)
    for p in m.parameters():
        sent, ctx = comp.compress(p.grad)
        assert torch.equal(comp.decompress(sent.clone(), ctx), p.grad)
    s = comp.stats()
    # d = 1 sends every value of the one compressed tensor (2560) without indices; the rest dense.
    assert s["bytes_sent"] == 4 * (2560 + 40 + 120 + 3)
    sparse = RangerCompressor(density=0.01, min_elements=100, named_parameters=m.named_parameters(),
                              selection="random")
    sparse.world_size = 1
    sent, ctx = sparse.compress(m[0].weight.grad)
    assert sparse.stats()["bytes_sent"] == 4 * 26 < 4 * 2560
    out = sparse.decompress(sent, ctx)
    assert out.shape == m[0].weight.shape and int((out != 0).sum()) <= 26


def test_decompress_reuses_one_zeroed_buffer_per_parameter():
    # The result becomes the parameter's .grad: one buffer per parameter, zeroed and refilled each
    # step, so nothing of the previous step's coordinates survives in it.
    m = _model()
    comp = RangerCompressor(density=0.01, min_elements=100, named_parameters=m.named_parameters(),
                            selection="random")
    comp.world_size = 1
    outs = []
    for step in range(3):
        _grads(m, step)
        sent, ctx = comp.compress(m[0].weight.grad)
        expected = torch.zeros(m[0].weight.numel())
        expected[ctx.indices.long()] = sent
        out = comp.decompress(sent.clone(), ctx)
        assert torch.equal(out.reshape(-1), expected), step
        outs.append(out)
    assert outs[0].data_ptr() == outs[1].data_ptr() == outs[2].data_ptr()
    assert comp.is_compressed(m[2].weight.shape)
    other = comp.decompress(*comp.compress(m[2].weight.grad))
    assert other.data_ptr() != outs[0].data_ptr()                 # each parameter has its own


def test_horovod_interface_unknown_tensor():
    m = _model()
    comp = RangerCompressor(named_parameters=m.named_parameters())
    _grads(m, 0)
    with pytest.raises(ValueError, match="cannot name"):
        comp.compress(torch.zeros(40, 64))
    with pytest.raises(ValueError, match="named_parameters"):
        RangerCompressor().compress(m[0].weight.grad)


def test_state_dict_round_trip_bitwise():
    rng = np.random.default_rng(5)
    grads = [torch.from_numpy(rng.standard_normal(3000).astype(np.float32)).view(30, 100)
             for _ in range(8)]
    straight = RangerCompressor(density=0.02, momentum=0.9, min_elements=1)
    first = RangerCompressor(density=0.02, momentum=0.9, min_elements=1)
    for g in grads[:4]:
        straight.compress_sparse("w", g)
        first.compress_sparse("w", g)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = RangerCompressor(density=0.02, momentum=0.9, min_elements=1)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.stats() == straight.stats()
    for g in grads[4:]:
        a = straight.compress_sparse("w", g)
        b = resumed.compress_sparse("w", g)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(straight._state["w"].residual, resumed._state["w"].residual)


def test_random_k_indices():
    for n, k in ((10, 10), (1000, 900), (10**6, 50), (10**6, 100_000)):
        a = random_k_indices(n, k, seed=7)
        assert a.numel() == k and torch.equal(a, torch.sort(a).values)
        assert int(torch.unique(a).numel()) == k and int(a.min()) >= 0 and int(a.max()) < n
        assert torch.equal(a, random_k_indices(n, k, seed=7))
    assert not torch.equal(random_k_indices(10**6, 50, 1), random_k_indices(10**6, 50, 2))


def test_selection_float64_keeps_full_precision():
    # Differences below float32 resolution must still order the entries.
    x = 1.0 + torch.arange(20_000, dtype=torch.float64) * 1e-12
    for scratch in (None, SelectionScratch()):
        assert np.array_equal(topk_indices(x, 50, 0.01, scratch).numpy(),
                              reference.select(x.numpy(), 50))


@pytest.mark.parametrize("k", [1000, 200, 3])
def test_selection_of_a_mostly_zero_tensor(k):
    # An embedding's gradient: a few rows non-zero. The sampled threshold is then 0; the selection
    # must still be exact (all non-zeros, then the lowest-indexed zeros, when k exceeds them).
    g = torch.zeros(400 * 250)
    for row in (3, 77, 301):
        g[row * 250:(row + 1) * 250] = torch.randn(250)
    g[77 * 250 + 5] = 0.0  # a zero inside a non-zero row
    for scratch in (None, SelectionScratch()):
        got = topk_indices(g, k, 0.01, scratch)
        assert np.array_equal(got.numpy(), reference.select(g.numpy(), k)), (k, scratch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_values_before_the_scatter_gives_the_bits_of_scaling_the_sum(dtype):
    """decompress scales each value by 1/N before the scatter-add when 1/N is a power of two: the
    result must be bit for bit what scaling the summed buffer afterwards gives (as Horovod's average
    of a dense tensor does), duplicate indices across ranks included."""
    from ranger_hvd.torch.compressor import pack_pairs
    comp = RangerCompressor(density=0.1, min_elements=1)
    gen = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(4):  # four ranks whose index sets overlap
        indices = torch.sort(torch.randperm(300, generator=gen)[:120]).values.to(torch.int32)
        rows.append(pack_pairs(indices, torch.randn(120, generator=gen)))
    for ranks, scale in ((2, 0.5), (4, 0.25)):
        part = torch.cat(rows[:ranks])
        later = comp.combine(part, 120, torch.zeros(300, dtype=dtype)).mul_(scale)
        early = comp.combine(part, 120, torch.zeros(300, dtype=dtype), scale)
        assert torch.equal(early.view(torch.int64 if dtype == torch.float64 else torch.int32),
                           later.view(torch.int64 if dtype == torch.float64 else torch.int32))
    # 1/3 does not commute with the sum's rounding (close, not always equal): decompress scales the
    # summed buffer for such factors
    three = torch.cat(rows[:3])
    third_later = comp.combine(three, 120, torch.zeros(300, dtype=dtype)).mul_(1 / 3)
    third_early = comp.combine(three, 120, torch.zeros(300, dtype=dtype), 1 / 3)
    torch.testing.assert_close(third_early, third_later)
