"""The backend-neutral rules and the NumPy specification that both backends are tested against."""
import math

import numpy as np
import pytest

from ranger_hvd.core import (
    CompressionStats, OptionsError, clip_threshold, dense_counts, density_at, is_compressed,
    make_options, num_selected, random_k_seed, sparse_bytes, sparse_counts,
)
from ranger_hvd.core import reference
from ranger_hvd.core.reference import ReferenceCompressor, combine, select


@pytest.mark.parametrize("numel,density,k", [
    (100, 0.07, 7),          # float rounding would give 7.000000000000001 -> 8
    (1000, 0.001, 1),
    (1001, 0.001, 2),        # ceil
    (10, 0.0001, 1),         # never zero
    (5, 1.0, 5),
    (25_000_000, 0.001, 25_000),
    (3, 0.9, 3),
])
def test_num_selected(numel, density, k):
    assert num_selected(numel, density) == k


def test_num_selected_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        num_selected(0, 0.1)


def test_dense_rules():
    opts = make_options(min_elements=100)
    assert not is_compressed((99,), opts)
    assert not is_compressed((10, 9), opts)            # too small
    assert not is_compressed((1000,), opts)            # 1-D goes dense by default
    assert is_compressed((10, 10), opts)
    assert is_compressed((1000,), make_options(min_elements=100, compress_1d=True))


@pytest.mark.parametrize("bad,culprit", [
    ({"density": 0}, "density"), ({"density": 1.5}, "density"), ({"density": -0.1}, "density"),
    ({"momentum": -0.1}, "momentum"), ({"momentum": 1.0}, "momentum"),
    ({"min_elements": 0}, "min_elements"), ({"value_dtype": "int8"}, "value_dtype"),
    ({"clip_norm": 0}, "clip_norm"), ({"sample_fraction": 0}, "sample_fraction"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"densty": 0.1}, "densty"),
    ({"warmup_steps": 10, "warmup_start_density": 0.001, "density": 0.01}, "warmup_start_density"),
])
def test_bad_options_name_the_culprit(bad, culprit):
    with pytest.raises(OptionsError, match=culprit):
        make_options(**bad)


def test_warmup_schedule_is_geometric_and_ends_at_target():
    opts = make_options(density=0.001, warmup_steps=4, warmup_start_density=0.25)
    ds = [density_at(t, opts) for t in range(6)]
    assert ds[0] == 0.25 and ds[4] == 0.001 and ds[5] == 0.001
    ratios = [ds[i + 1] / ds[i] for i in range(3)]
    assert all(math.isclose(r, (0.001 / 0.25) ** 0.25) for r in ratios)
    assert density_at(0, make_options(density=0.01)) == 0.01  # off by default


def test_clip_threshold_scales_with_inverse_sqrt_workers():
    assert clip_threshold(make_options(), 4) is None
    assert clip_threshold(make_options(clip_norm=2.0), 4) == 1.0


def test_random_k_seed_is_stable_and_distinct():
    assert random_k_seed(0, "fc.weight") == random_k_seed(0, "fc.weight")
    seeds = {random_k_seed(s, n) for s in (0, 1) for n in ("a", "b", "fc.weight")}
    assert len(seeds) == 6
    # a fixed value: the seed must not depend on the process (Python's hash() would), and it fits
    # the 31 bits both backends' generators take
    assert random_k_seed(0, "w") == 1751015286 and random_k_seed(0, "w") < 2 ** 31


def test_byte_accounting():
    # top-k: values, int32 indices and the 4-byte token; random-k: values only
    assert sparse_bytes(10, "float32") == 84
    assert sparse_bytes(10, "float16") == 64
    assert sparse_bytes(10, "bfloat16", with_indices=False) == 20
    stats = CompressionStats()
    stats.add(sparse_counts(1000, 10, "float32"))
    stats.add(dense_counts(20, 4))
    assert stats.end_step() == 84 + 80
    d = stats.as_dict()
    assert d["bytes_sent"] == 164 and d["bytes_dense"] == 4080 and d["steps"] == 1
    clone = CompressionStats()
    clone.load(d)
    assert clone.as_dict() == d


def test_select_breaks_ties_toward_lower_index():
    acc = np.array([1.0, -3.0, 3.0, 2.0, 3.0, -3.0])
    assert select(acc, 2).tolist() == [1, 2]
    assert select(acc, 3).tolist() == [1, 2, 4]
    assert select(acc, 6).tolist() == list(range(6))
    assert select(np.zeros(5), 2).tolist() == [0, 1]


def test_reference_conserves_every_gradient_without_momentum():
    rng = np.random.default_rng(0)
    comp = ReferenceCompressor(500, make_options(density=0.01, min_elements=1))
    grads = [rng.standard_normal(500).astype(np.float32) for _ in range(30)]
    sent = np.zeros(500, np.float64)
    for g in grads:
        idx, values = comp.step(g)
        assert len(idx) == 5 and np.all(np.diff(idx) > 0)
        sent[idx] += values
    # everything sent plus what is still held back equals everything computed
    np.testing.assert_allclose(sent + comp.residual, np.sum(grads, axis=0), rtol=0, atol=1e-4)
    # draining: zero gradients until the residual is empty
    for _ in range(200):
        idx, values = comp.step(np.zeros(500, np.float32))
        sent[idx] += values
    assert not comp.residual.any()
    np.testing.assert_allclose(sent, np.sum(grads, axis=0), rtol=0, atol=1e-4)


def test_reference_momentum_correction_and_factor_masking():
    opts = make_options(density=0.5, momentum=0.9, min_elements=1)
    comp = ReferenceCompressor(4, opts)
    idx, values = comp.step(np.array([4.0, 1.0, -3.0, 0.5], np.float32))
    assert idx.tolist() == [0, 2] and values.tolist() == [4.0, -3.0]
    assert comp.velocity.tolist() == [0.0, 1.0, 0.0, 0.5]      # masked where sent
    assert comp.residual.tolist() == [0.0, 1.0, 0.0, 0.5]
    idx, values = comp.step(np.array([0.0, 1.0, 0.0, 0.0], np.float32))
    # u = 0.9*u + g = [0, 1.9, 0, 0.45]; v = v + u = [0, 2.9, 0, 0.95]
    assert idx.tolist() == [1, 3]
    np.testing.assert_allclose(values, [2.9, 0.95], rtol=1e-6)


def test_reference_momentum_without_masking_is_error_feedback_on_the_momentum():
    """momentum_masking=False: u runs on as plain momentum (never zeroed), and everything sent plus
    the residual equals the sum of every u: error feedback on the local momentum, nothing lost."""
    rng = np.random.default_rng(5)
    opts = make_options(density=0.02, momentum=0.9, momentum_masking=False, min_elements=1)
    comp = ReferenceCompressor(300, opts)
    u = np.zeros(300, np.float32)
    sent, total_u = np.zeros(300, np.float64), np.zeros(300, np.float64)
    for _ in range(40):
        g = rng.standard_normal(300).astype(np.float32)
        u = np.float32(0.9) * u + g
        total_u += u
        idx, values = comp.step(g)
        assert len(idx) == 6
        sent[idx] += values
        assert np.array_equal(comp.velocity, u)          # not masked where sent
        assert not comp.residual[idx].any()              # the residual gave up what it sent
    np.testing.assert_allclose(sent + comp.residual, total_u, rtol=0, atol=1e-3)
    # with masking (the default) the same gradients leave a different velocity
    masked = ReferenceCompressor(300, make_options(density=0.02, momentum=0.9, min_elements=1))
    rng = np.random.default_rng(5)
    for _ in range(40):
        masked.step(rng.standard_normal(300).astype(np.float32))
    assert not np.array_equal(masked.velocity, comp.velocity)


def test_momentum_masking_is_on_by_default():
    assert make_options().momentum_masking is True


def test_ranger_momentum_modes_place_the_momentum():
    from ranger_hvd.core import compressor_momentum
    # no momentum in the compressor: no masking option either (it would have no effect)
    assert compressor_momentum("global", 0.9, {}) == {"momentum": 0.0}
    assert compressor_momentum("local", 0.0, {}) == {"momentum": 0.0}
    make_options(**compressor_momentum("local", 0.0, {}))
    assert compressor_momentum("dgc", 0.9, {}) == {"momentum": 0.9, "momentum_masking": True}
    assert compressor_momentum("local", 0.9, {"min_elements": 4}) == {"momentum": 0.9,
                                                                      "momentum_masking": False}
    with pytest.raises(ValueError, match="'global', 'dgc' or 'local', got 'DGC'"):
        compressor_momentum("DGC", 0.9, {})
    with pytest.raises(ValueError, match="momentum_mode chooses"):
        compressor_momentum("dgc", 0.9, {"momentum_masking": False})


def test_density_one_without_momentum_sends_the_gradient():
    rng = np.random.default_rng(1)
    comp = ReferenceCompressor(64, make_options(density=1.0, min_elements=1))
    g = rng.standard_normal(64).astype(np.float32)
    idx, values = comp.step(g)
    assert idx.tolist() == list(range(64)) and np.array_equal(values, g)
    assert not comp.residual.any()


def test_combine_scatter_adds_and_averages():
    out = combine([(np.array([0, 2]), np.array([1.0, 2.0])), (np.array([2, 3]), np.array([4.0, 8.0]))], 5)
    assert out.tolist() == [0.5, 0.0, 3.0, 4.0, 0.0]


def test_local_clipping_bounds_the_norm():
    opts = make_options(density=1.0, min_elements=1, clip_norm=1.0)
    comp = ReferenceCompressor(3, opts, world_size=4)
    _, values = comp.step(np.array([3.0, 4.0, 0.0], np.float32))   # norm 5 > 1/sqrt(4)
    assert math.isclose(float(np.linalg.norm(values)), 0.5, rel_tol=1e-6)


class _ListOps:
    """core.TensorOps on NumPy arrays: runs the engine once more, outside any framework, so the
    engine itself is checked against core.reference (the backends are checked the same way)."""

    def __init__(self):
        self.counts = [0] * 7

    def flatten(self, g):
        return np.asarray(g, np.float32).reshape(-1).copy()

    nonfinite = "skip"

    def finite(self, g, name, state):
        if np.isfinite(g).all():
            return g, True
        if self.nonfinite == "raise":
            raise FloatingPointError(name)
        return g, False

    def select_non_finite(self, g, k):
        return reference.select_non_finite(g, k)

    def remember_sent(self, state, idx, values, u):
        state["sent"] = None if idx is None else (idx, values, None if u is None else u[idx].copy())

    def undo_sent(self, state):
        if state.get("sent") is not None:
            idx, values, u_sent = state.pop("sent")
            state["e"][idx] += values
            if u_sent is not None:
                state["u"][idx] = u_sent

    def clip(self, g, limit):
        norm = float(np.linalg.norm(g.astype(np.float64)))
        return g * np.float32(limit / norm) if norm > limit else g

    def momentum(self, state, g, m):
        state["u"] = np.float32(m) * state["u"] + g.reshape(-1)
        return state["u"]

    def accumulate(self, state, g):
        state["e"] = state["e"] + g
        return state["e"]

    def k_at(self, state, schedule):
        return schedule[min(state["step"], len(schedule) - 1)]

    def accumulate_topk(self, state, g, k, check_name):
        assert check_name is None   # no checks_in_selection: the engine checks first
        acc = self.accumulate(state, g)
        return acc, select(acc, k)

    def random_k(self, numel, k, base, state):
        return np.sort(np.random.default_rng([base, state["step"]]).choice(numel, k, replace=False))

    def gather(self, acc, idx):
        return acc[idx].copy()

    def keep_unsent(self, state, acc, u, idx, values):
        state["e"][idx] = 0
        if u is not None:
            state["u"][idx] = 0

    def advance(self, state):
        state["step"] += 1

    def count(self, inc):
        self.counts = [a + int(b) for a, b in zip(self.counts, inc)]


def _engine_and_reference(opts):
    """(options, ops, engine, a 600-entry state, the reference) of one tensor, world size 2."""
    from ranger_hvd.core import ErrorFeedback
    options = make_options(min_elements=10, **opts)
    ops = _ListOps()
    state = {"e": np.zeros(600, np.float32), "u": np.zeros(600, np.float32), "step": 0}
    return options, ops, ErrorFeedback(options, ops), state, ReferenceCompressor(600, options, world_size=2)


@pytest.mark.parametrize("opts", [dict(density=0.05), dict(density=0.05, momentum=0.9),
                                  dict(density=0.05, momentum=0.9, momentum_masking=False),
                                  dict(density=0.02, warmup_steps=3, clip_norm=5.0)])
def test_engine_equals_reference(opts):
    from ranger_hvd.core import sparse_counts
    options, ops, engine, state, ref = _engine_and_reference(opts)
    rng = np.random.default_rng(3)
    expected_counts = [0] * 7
    for _ in range(8):
        g = rng.standard_normal((20, 30)).astype(np.float32)
        idx, values, k = engine.sparse_step(state, g, "w", (20, 30), world_size=2)
        ridx, rvalues = ref.step(g)
        assert np.array_equal(idx, ridx) and np.array_equal(values, rvalues)
        assert np.array_equal(state["e"], ref.residual)
        if options.momentum:
            assert np.array_equal(state["u"], ref.velocity)
        expected_counts = [a + b for a, b in zip(expected_counts, sparse_counts(600, k, "float32"))]
    assert ops.counts == expected_counts and state["step"] == 8


@pytest.mark.parametrize("opts", [dict(density=0.05), dict(density=0.05, momentum=0.9),
                                  dict(density=0.02, warmup_steps=3, clip_norm=5.0),
                                  dict(density=0.05, selection="random")])
def test_batched_engine_steps_equal_one_tensor_at_a_time(opts):
    """``sparse_steps`` over three tensors of different sizes does what three ``sparse_step``
    calls do (and top-k what the reference does), through the batched selection where the backend
    has one; the counters get one record, without tokens when the exchange sends none."""
    from ranger_hvd.core import ErrorFeedback, sparse_counts
    options = make_options(min_elements=10, **opts)
    topk = options.selection == "topk"
    calls = []

    class BatchedOps(_ListOps):
        def accumulate_topk_many(self, states, gs, ks, checks):
            calls.append(len(states))
            return [self.accumulate_topk(*args) for args in zip(states, gs, ks, checks)]

    shapes = [(20, 30), (700,), (9, 50)]
    names = [f"w{j}" for j in range(3)]

    def fresh():
        return [{"e": np.zeros(int(np.prod(s)), np.float32), "u": np.zeros(int(np.prod(s)), np.float32),
                 "step": 0} for s in shapes]

    batched, single = BatchedOps(), _ListOps()
    engine, engine1 = ErrorFeedback(options, batched), ErrorFeedback(options, single)
    states, states1 = fresh(), fresh()
    refs = [ReferenceCompressor(int(np.prod(s)), options, world_size=2) for s in shapes]
    rng = np.random.default_rng(4)
    expected = [0] * 7
    for _ in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        out = engine.sparse_steps(states, grads, names, shapes, world_size=2, token=False)
        for j, ((idx, values, k), g, shape) in enumerate(zip(out, grads, shapes)):
            idx1, values1, k1 = engine1.sparse_step(states1[j], g, names[j], shape, world_size=2)
            assert np.array_equal(idx, idx1) and np.array_equal(values, values1) and k == k1
            assert np.array_equal(states[j]["e"], states1[j]["e"])
            if topk:
                ridx, rvalues = refs[j].step(g)
                assert np.array_equal(idx, ridx) and np.array_equal(values, rvalues)
            expected = [a + b for a, b in zip(expected, sparse_counts(
                int(np.prod(shape)), k, "float32", topk, with_token=False))]
    assert batched.counts == expected
    assert [s["step"] for s in states] == [6, 6, 6]
    assert calls == ([3] * 6 if topk else [])
    # one at a time with tokens, as Horovod's hook sends them: 4 bytes more per top-k tensor and step
    assert single.counts[0] == expected[0] + (6 * 3 * 4 if topk else 0)
    assert single.counts[1:] == expected[1:]


@pytest.mark.parametrize("opts", [dict(density=0.05), dict(density=0.05, momentum=0.9),
                                  dict(density=0.05, momentum=0.9, momentum_masking=False)])
def test_engine_void_steps_equal_reference(opts):
    """Non-finite gradients (nonfinite="skip") and undone steps: the engine does what the
    reference does, and a rank whose step was void keeps its state bit for bit."""
    options, ops, engine, state, ref = _engine_and_reference(opts)
    rng = np.random.default_rng(5)
    for step in range(8):
        g = rng.standard_normal((20, 30)).astype(np.float32)
        if step in (2, 5):
            g[1, 7] = np.inf if step == 2 else np.nan
        before = state["e"].copy(), state["u"].copy()
        idx, values, k = engine.sparse_step(state, g, "w", (20, 30), world_size=2)
        ridx, rvalues = ref.step(g)
        assert np.array_equal(idx, ridx) and np.array_equal(values, rvalues, equal_nan=True)
        if step in (2, 5):
            assert 37 in idx and not np.isfinite(values).all()
            assert np.array_equal(state["e"], before[0]) and np.array_equal(state["u"], before[1])
        if step in (2, 3, 6):   # the exchange was void: take the send back
            engine.undo(state)
            ref.undo()
        assert np.array_equal(state["e"], ref.residual)
        assert np.array_equal(state["u"], ref.velocity) or not options.momentum
    assert state["step"] == ref.step_count == 8


def test_reference_undo_keeps_every_gradient():
    """m = 0: with some steps undone, sent-and-applied plus the residual is still the sum of every
    gradient: an undone step's values went back to the residual, none was lost."""
    options = make_options(density=0.1, min_elements=1)
    ref = ReferenceCompressor(50, options)
    rng = np.random.default_rng(9)
    applied, total = np.zeros(50, np.float64), np.zeros(50, np.float64)
    for step in range(12):
        g = rng.standard_normal(50).astype(np.float32)
        total += g
        idx, values = ref.step(g)
        if step % 3 == 1:
            ref.undo()
        else:
            np.add.at(applied, idx, values.astype(np.float64))
    assert np.allclose(applied + ref.residual, total, atol=1e-5)


def test_select_non_finite_puts_non_finite_entries_first():
    g = np.array([1.0, np.nan, 3.0, np.inf, -np.inf, 0.5], np.float32)
    assert reference.select_non_finite(g, 2).tolist() == [1, 3]
    assert reference.select_non_finite(g, 4).tolist() == [0, 1, 3, 4]
    assert reference.select_non_finite(np.ones(4, np.float32), 2).tolist() == [0, 1]
