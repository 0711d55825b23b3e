"""Single-process checks of the TensorFlow backend against ``core.reference`` (no horovodrun).

Horovod, where needed, runs as a world of one (``hvd.init()`` without a launcher).
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from ranger_hvd.core import OptionsError, make_options  # noqa: E402
from ranger_hvd.core.reference import ReferenceCompressor, select  # noqa: E402
from ranger_hvd.tensorflow import (DistributedGradientTape, Ranger, RangerCompressor,  # noqa: E402
                                   SharedCompressorError)
from ranger_hvd.tensorflow.selection import random_k_indices, seed_pair, topk_indices  # noqa: E402


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("n,k", [(7, 3), (1000, 10), (40000, 400), (40000, 9000), (70000, 1),
                                 (5000, 5000)])
def test_selection_equals_reference_with_ties(n, k):
    rng = np.random.default_rng(n + k)
    for x in (rng.integers(-3, 4, n).astype(np.float32),          # massive ties
              rng.standard_normal(n).astype(np.float32),
              np.zeros(n, np.float32)):
        got = topk_indices(tf.constant(x), k)
        assert got.dtype == tf.int32
        np.testing.assert_array_equal(got.numpy(), select(x, k))
        # k as a tensor (density warm-up) and inside tf.function take the same path.
        traced = tf.function(lambda a, kk: topk_indices(a, kk))(tf.constant(x), tf.constant(k))
        np.testing.assert_array_equal(traced.numpy(), select(x, k))


def test_selection_of_half_precision_and_sampling_fallback():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(50000).astype(np.float16)
    np.testing.assert_array_equal(topk_indices(tf.constant(x), 500).numpy(), select(x, 500))
    # A few huge entries make the sampled estimate miss: the exact fallback must still be right.
    y = np.zeros(50000, np.float32)
    y[rng.choice(50000, 30, replace=False)] = rng.standard_normal(30).astype(np.float32) + 10
    np.testing.assert_array_equal(topk_indices(tf.constant(y), 40).numpy(), select(y, 40))


@pytest.mark.parametrize("n,k", [(50001, 700), (65537, 1), (99991, 24000), (16389, 4000)])
def test_sampled_selection_with_ragged_sizes_and_dtypes(n, k):
    # Sizes that leave a tail after the column view and the strided sample; every float dtype.
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))
    for dtype in (tf.float32, tf.float16, tf.bfloat16, tf.float64):
        for x in (tf.constant(base, dtype), tf.constant(np.round(base), dtype)):  # rounded: ties
            want = select(tf.cast(x, tf.float64).numpy(), k)
            np.testing.assert_array_equal(topk_indices(x, k).numpy(), want)
    # Traced, with k a tensor (tracing is the slow part, so once).
    x = tf.constant(np.round(base), tf.float32)
    traced = tf.function(lambda a, kk: topk_indices(a, kk))(x, tf.constant(k))
    np.testing.assert_array_equal(traced.numpy(), select(x.numpy(), k))


def test_random_k_is_a_pure_function_of_the_seed():
    a = random_k_indices(1000, 50, seed_pair(12345, 3)).numpy()
    b = random_k_indices(1000, 50, seed_pair(12345, 3)).numpy()
    c = random_k_indices(1000, 50, seed_pair(12345, 4)).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
    # Sparse draws and the dense method (k >= n / 8), with k static or a tensor, eager or traced.
    traced = tf.function(lambda n, k, s: random_k_indices(n, k, s), reduce_retracing=True)
    for n, k in ((1000, 50), (1000, 125), (1000, 999), (200000, 2000), (37, 37)):
        seed = seed_pair(77, n + k)
        got = random_k_indices(n, k, seed).numpy()
        assert got.dtype == np.int32 and len(got) == k and np.all(np.diff(got) > 0)
        assert got[0] >= 0 and got[-1] < n
        np.testing.assert_array_equal(traced(n, tf.constant(k), seed).numpy(), got)


# ----------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("opts", [
    dict(density=0.01, momentum=0.0),
    dict(density=0.03, momentum=0.9),
    dict(density=0.03, momentum=0.9, momentum_masking=False),
    dict(density=0.01, momentum=0.5, warmup_steps=4, warmup_start_density=0.5),
    dict(density=0.05, clip_norm=3.0),
])
def test_error_feedback_equals_reference(opts):
    comp = RangerCompressor(min_elements=100, **opts)
    comp.world_size = 2  # clipping threshold clip_norm / sqrt(N)
    ref = ReferenceCompressor(3000, comp.options, world_size=2)
    var = tf.Variable(tf.zeros((60, 50)))
    step_fn = tf.function(comp.compress_variable)
    rng = np.random.default_rng(11)
    for t in range(8):
        g = rng.standard_normal((60, 50)).astype(np.float32)
        idx, vals = (comp.compress_variable if t % 2 else step_fn)(var, tf.constant(g))
        ridx, rvals = ref.step(g)
        np.testing.assert_array_equal(idx.numpy(), ridx)
        if opts.get("clip_norm"):  # the norm is summed in another order: last-bit differences
            np.testing.assert_allclose(vals.numpy(), rvals, rtol=1e-6)
            np.testing.assert_allclose(comp.residual_of(var).numpy().ravel(), ref.residual,
                                       rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(vals.numpy(), rvals)
            np.testing.assert_array_equal(comp.residual_of(var).numpy().ravel(), ref.residual)
            if ref.options.momentum > 0:
                np.testing.assert_array_equal(comp.slots[0].velocity.numpy(), ref.velocity)


@pytest.mark.parametrize("opts", [
    dict(density=0.01),
    dict(density=0.002, momentum=0.9),
    dict(density=0.002, momentum=0.9, momentum_masking=False),
    dict(density=0.01, warmup_steps=3, warmup_start_density=0.2),  # k is a tensor: warm-up
])
def test_large_tensors_take_the_compiled_cpu_pass_and_equal_reference(opts, monkeypatch):
    """Tensors large enough for a sampled threshold run ``cpu_path`` (one compiled pass through
    tf.numpy_function): same indices, values, residual and velocity bits as the reference, eagerly
    and traced, including a mostly-zero gradient (an embedding's) and a k that changes per step."""
    from ranger_hvd.core import cpu_scan, num_selected
    calls = []
    real = cpu_scan.accumulate_select
    checks = []
    monkeypatch.setattr(cpu_scan, "accumulate_select",
                        lambda *a, **kw: calls.append(a[2]) or checks.append(kw["check_finite"])
                        or real(*a, **kw))
    comp = RangerCompressor(min_elements=100, **opts)
    comp.world_size = 2
    shape = (250, 120)
    ref = ReferenceCompressor(30000, comp.options, world_size=2)
    var = tf.Variable(tf.zeros(shape))
    traced = tf.function(comp.compress_variable)
    rng = np.random.default_rng(4)
    for t in range(6):
        g = rng.standard_normal(shape).astype(np.float32)
        if t == 2:
            g[:, :] = 0
            g[7, :] = rng.standard_normal(120)  # one row of an embedding
        idx, vals = (traced if t % 2 else comp.compress_variable)(var, tf.constant(g))
        ridx, rvals = ref.step(g)
        np.testing.assert_array_equal(idx.numpy(), ridx)
        np.testing.assert_array_equal(vals.numpy(), rvals)
        np.testing.assert_array_equal(comp.residual_of(var).numpy().ravel(), ref.residual)
        if ref.options.momentum > 0:
            np.testing.assert_array_equal(comp.slots[0].velocity.numpy(), ref.velocity)
    assert len(calls) == 6, calls
    # g reaches the pass unchanged only without momentum: then the pass does the finiteness check.
    assert checks == [not opts.get("momentum")] * 6
    if opts.get("warmup_steps"):
        assert calls[0] > calls[-1] == num_selected(30000, 0.01), calls


def test_conservation_inside_one_rank():
    comp = RangerCompressor(density=0.02, min_elements=100)
    comp.world_size = 1
    var = tf.Variable(tf.zeros((50, 40)))
    rng = np.random.default_rng(5)
    sent = np.zeros(2000, np.float64)
    total = np.zeros(2000, np.float64)
    for _ in range(10):
        g = rng.standard_normal((50, 40)).astype(np.float32)
        total += g.ravel()
        idx, vals = comp.compress_variable(var, g)
        np.add.at(sent, idx.numpy(), vals.numpy())
    np.testing.assert_allclose(sent + comp.residual_of(var).numpy().ravel(), total, atol=1e-5)


def test_in_place_residual_update_is_safe():
    # The residual is updated in its own buffer: a residual read earlier must not change, a variable
    # in copy-on-read mode (after a sparse read) must still step exactly, and Keras 3 variables too.
    from ranger_hvd.core import ErrorFeedback
    from ranger_hvd.tensorflow.slots import OptimizerSlot
    from ranger_hvd.tensorflow.state import TFOps
    rng = np.random.default_rng(9)
    for momentum in (0.0, 0.9):
        comp = RangerCompressor(density=0.02, momentum=momentum, min_elements=100)
        comp.world_size = 1
        ref = ReferenceCompressor(40000, comp.options)
        var = tf.Variable(tf.zeros((200, 200)))
        traced = tf.function(comp.compress_variable)
        for t in range(6):
            held = comp.residual_of(var)
            snapshot = held.numpy().copy()
            if t == 3:
                comp.slots[0].residual.sparse_read([0, 5])  # switches it to copy-on-read mode
            g = rng.standard_normal((200, 200)).astype(np.float32)
            idx, vals = (traced if t % 2 else comp.compress_variable)(var, tf.constant(g))
            ridx, rvals = ref.step(g)
            np.testing.assert_array_equal(idx.numpy(), ridx)
            np.testing.assert_array_equal(vals.numpy(), rvals)
            np.testing.assert_array_equal(comp.residual_of(var).numpy().ravel(), ref.residual)
            np.testing.assert_array_equal(held.numpy(), snapshot)
        opts = make_options(density=0.05, momentum=momentum, min_elements=1)
        ref = ReferenceCompressor(3000, opts)
        res = keras.Variable(np.zeros((60, 50), np.float32))
        vel = keras.Variable(np.zeros((60, 50), np.float32)) if momentum else None
        # The Keras Ranger's layout: shaped Keras variables, stepped by the optimizer's iterations
        # (the last two steps taken back by an undo, eagerly and within one traced step).
        iterations = tf.Variable(0, dtype=tf.int64)
        slot = OptimizerSlot(0, "k", (60, 50), tf.float32, True, res, vel, iterations)
        engine = ErrorFeedback(opts, TFOps(opts, tf.Variable(tf.zeros([7], tf.int64))))

        def step(g, void):
            out = engine.sparse_step(slot, g, "k", (60, 50), 1)[:2]
            if void:  # the exchange found the step void: take back what was sent
                engine.undo(slot)
            return out

        traced = tf.function(step)
        for t in range(4):
            g = rng.standard_normal((60, 50)).astype(np.float32)
            idx, vals = (traced if t % 2 else step)(tf.constant(g), t >= 2)
            iterations.assign_add(1)
            ridx, rvals = ref.step(g)
            if t >= 2:
                ref.undo()
            np.testing.assert_array_equal(idx.numpy(), ridx)
            np.testing.assert_array_equal(vals.numpy(), rvals)
            np.testing.assert_array_equal(np.asarray(res.numpy()).ravel(), ref.residual)
            if momentum:
                np.testing.assert_array_equal(np.asarray(vel.numpy()).ravel(), ref.velocity)


# ----------------------------------------------------------------------------- cross-backend parity
def test_cross_backend_parity_with_torch_and_reference():
    torch = pytest.importorskip("torch")
    try:
        from ranger_hvd.torch import RangerCompressor as TorchCompressor
    except ImportError:
        pytest.skip("ranger_hvd.torch is not importable")
    for opts in (dict(density=0.01, momentum=0.0), dict(density=0.02, momentum=0.9),
                 dict(density=0.01, warmup_steps=3, warmup_start_density=0.25)):
        tf_comp = RangerCompressor(min_elements=100, **opts)
        tf_comp.world_size = 1
        th_comp = TorchCompressor(min_elements=100, **opts)
        th_comp.world_size = 1
        ref = ReferenceCompressor(4000, make_options(min_elements=100, **opts))
        var = tf.Variable(tf.zeros((80, 50)))
        rng = np.random.default_rng(21)
        for t in range(6):
            # Rounded values make ties common, so the tie rule is exercised too.
            g = np.round(rng.standard_normal((80, 50)), 1).astype(np.float32)
            tidx, tvals = tf_comp.compress_variable(var, tf.constant(g))
            pvals, pidx = th_comp.compress_sparse("w", torch.from_numpy(g.copy()))
            ridx, rvals = ref.step(g)
            np.testing.assert_array_equal(tidx.numpy(), ridx)
            np.testing.assert_array_equal(pidx.numpy(), ridx)
            np.testing.assert_array_equal(tvals.numpy(), rvals)
            np.testing.assert_array_equal(pvals.numpy(), rvals)
            tres = tf_comp.residual_of(var).numpy().ravel()
            pres = th_comp.state_dict()["tensors"]["w"]["residual"].numpy().ravel()
            np.testing.assert_array_equal(tres, ref.residual)
            np.testing.assert_array_equal(pres, ref.residual)


# ----------------------------------------------------------------------------- options, errors
@pytest.mark.parametrize("kwargs", [dict(density=0.0), dict(density=1.5), dict(momentum=-0.1),
                                    dict(momentum=1.0), dict(min_elements=0), dict(bogus=1),
                                    dict(value_dtype="int8"),
                                    dict(warmup_steps=5, warmup_start_density=0.001),
                                    dict(seed=3), dict(warmup_start_density=0.5),
                                    dict(selection="random", sample_fraction=0.1)])
def test_bad_options_raise_at_construction(kwargs):
    with pytest.raises(OptionsError):
        RangerCompressor(**kwargs)
    with pytest.raises((OptionsError, ValueError)):
        Ranger(**kwargs)


def test_the_tape_refuses_sparse_as_dense_false_which_it_would_ignore():
    with pytest.raises(ValueError, match="sparse_as_dense=False has no effect"):
        DistributedGradientTape(tf.GradientTape(), compression=RangerCompressor(),
                                sparse_as_dense=False)


def test_ranger_momentum_modes_and_their_refusals():
    with pytest.raises(ValueError, match="'global', 'dgc' or 'local'"):
        Ranger(momentum_mode="bogus")
    with pytest.raises(ValueError, match="momentum_mode chooses"):
        Ranger(momentum_mode="dgc", momentum_masking=False)
    with pytest.raises(ValueError, match="Nesterov"):
        Ranger(momentum_mode="local", nesterov=True)
    for mode, masking in (("dgc", True), ("local", False)):
        opt = Ranger(momentum=0.9, momentum_mode=mode)
        assert opt.options.momentum == 0.9 and opt.options.momentum_masking is masking
        config = opt.get_config()
        assert config["momentum_mode"] == mode and "momentum_masking" not in config
        assert Ranger.from_config(config).options == opt.options
    assert Ranger(momentum=0.9).options.momentum == 0.0      # global: the compressor has none


def test_ranger_accepts_lr_and_learning_rate():
    assert float(Ranger(lr=0.001).learning_rate) == pytest.approx(0.001)
    assert float(Ranger(learning_rate=0.2).learning_rate) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="disagree"):
        Ranger(lr=0.1, learning_rate=0.2)
    assert Ranger(momentum=0.9, density=0.1).get_config()["density"] == 0.1


def test_non_finite_gradient_names_the_variable_and_spares_the_residual():
    comp = RangerCompressor(density=0.1, min_elements=100, nonfinite="raise")
    comp.world_size = 1
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(40, name="wide")])
    kernel = model.layers[0].kernel
    comp.compress_variable(kernel, np.ones((30, 40), np.float32))
    before = comp.residual_of(kernel).numpy()
    bad = np.ones((30, 40), np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="wide/kernel"):
        comp.compress_variable(kernel, bad)
    np.testing.assert_array_equal(comp.residual_of(kernel).numpy(), before)
    # Through the tape (Horovod as a world of one), eager and inside its traced exchange.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.fill((2, 30), np.inf)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite gradient for variable"):
        DistributedGradientTape(tape, compression=RangerCompressor(
            min_elements=100, nonfinite="raise")).gradient(loss, model.trainable_variables)


def test_non_finite_gradient_on_the_compiled_pass_names_the_variable_and_spares_the_state():
    """A tensor large enough for the compiled pass: the check is counted inside that pass (no pass
    of its own), eagerly and traced, and the residual stays as it was (eagerly the step too; a
    traced step's counter does not wait for the check, as with TF's own check)."""
    comp = RangerCompressor(density=0.01, min_elements=100, nonfinite="raise")
    comp.world_size = 2
    var = tf.Variable(tf.zeros((200, 150)), name="big")
    rng = np.random.default_rng(8)
    comp.compress_variable(var, rng.standard_normal((200, 150)).astype(np.float32))
    before, step = comp.residual_of(var).numpy(), int(comp.slots[0].step.numpy())
    for bad in (np.nan, np.inf):
        g = rng.standard_normal((200, 150)).astype(np.float32)
        g[199, 149] = bad
        for run in (comp.compress_variable, tf.function(comp.compress_variable)):
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=r"non-finite gradient for variable 'big' .*1 of the "
                                     r"gradient's 30000 entries"):
                run(var, tf.constant(g))
            np.testing.assert_array_equal(comp.residual_of(var).numpy(), before)
            if run is comp.compress_variable:
                assert int(comp.slots[0].step.numpy()) == step


@pytest.mark.parametrize("shape,opts", [
    ((60, 50), dict(density=0.05)),
    ((60, 50), dict(density=0.05, momentum=0.9)),
    ((60, 50), dict(density=0.05, clip_norm=2.0)),
    ((300, 400), dict(density=0.01)),                  # the compiled pass, which checks itself
    ((300, 400), dict(density=0.01, momentum=0.5)),    # the compiled pass, told by the check
])
def test_non_finite_gradient_skips_the_step_as_the_reference_does(shape, opts):
    """nonfinite="skip" (the default): a NaN or Inf gradient leaves residual and velocity as they
    were and sends its non-finite entries first, then the lowest finite ones, raw; the next steps
    go on from the untouched state. Indices, values (NaN in place), residual and velocity equal
    core.reference's, eagerly and traced (where a tf.cond decides at run time)."""
    numel = int(np.prod(shape))
    for traced in (False, True):
        comp = RangerCompressor(min_elements=100, **opts)
        comp.world_size = 1
        ref = ReferenceCompressor(numel, comp.options)
        var = tf.Variable(tf.zeros(shape))
        run = tf.function(comp.compress_variable) if traced else comp.compress_variable
        rng = np.random.default_rng(1)
        for t in range(6):
            g = rng.standard_normal(shape).astype(np.float32)
            if t in (2, 4):
                g[3, 7], g[-1, -1] = (np.nan, np.inf) if t == 2 else (-np.inf, 1.0)
            idx, vals = run(var, tf.constant(g))
            ridx, rvals = ref.step(g)
            np.testing.assert_array_equal(idx.numpy(), ridx)
            np.testing.assert_array_equal(vals.numpy(), rvals)  # NaN where the reference has NaN
            np.testing.assert_array_equal(comp.slots[0].residual.numpy(), ref.residual)
            if ref.options.momentum:
                np.testing.assert_array_equal(comp.slots[0].velocity.numpy(), ref.velocity)
            if t in (2, 4):
                assert not np.all(np.isfinite(vals.numpy()))
        assert np.all(np.isfinite(ref.residual)) and int(comp.slots[0].step.numpy()) == 6


def linear_loss(variables, grads):
    """A loss whose gradient is exactly ``grads``, whatever the variables hold."""
    return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(v) * g) for v, g in zip(variables, grads)])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_void_step_is_undone_for_every_tensor_of_it(momentum):
    """Through ranger_hvd's tape (Horovod as a world of one), which sees the whole step: when one
    tensor's gradient holds NaN, the exchanged gradient shows it, and every other tensor of that
    step takes back what it sent (e[S] += values, u[S] restored: core.reference's undo), so its
    state is the reference's; the step after goes on normally. A large tensor takes the compiled
    pass, the bias travels dense. Eagerly (a traced exchange per step) and inside tf.function."""
    shapes = [(40, 30), (300, 400), (30,)]
    for traced in (False, True):
        variables = [tf.Variable(tf.zeros(s), name=f"v{i}") for i, s in enumerate(shapes)]
        comp = RangerCompressor(density=0.02, momentum=momentum, min_elements=100)
        refs = [ReferenceCompressor(int(np.prod(s)), comp.options) for s in shapes[:2]]

        def exchange(grads):
            with tf.GradientTape() as tape:
                loss = linear_loss(variables, grads)
            return DistributedGradientTape(tape, compression=comp).gradient(loss, variables)

        run = tf.function(exchange) if traced else exchange
        rng = np.random.default_rng(3)
        for t in range(5):
            grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            if t == 2:
                grads[0][5, 5] = np.nan
            out = [o.numpy() for o in run([tf.constant(g) for g in grads])]
            sent = [ref.step(g) for ref, g in zip(refs, grads)]
            if t == 2:
                refs[1].undo()  # the step is void: the finite tensor takes back its send
                assert np.isnan(out[0][5, 5]) and np.all(np.isfinite(out[1]))
            for i, (ref, (idx, vals)) in enumerate(zip(refs, sent)):
                want = np.zeros(ref.residual.size, np.float32)
                want[idx] = vals
                np.testing.assert_array_equal(out[i].ravel(), want)
                slot = comp.slot_for(variables[i])
                np.testing.assert_array_equal(slot.residual.numpy(), ref.residual)
                if momentum:
                    np.testing.assert_array_equal(slot.velocity.numpy(), ref.velocity)
        assert np.all(np.isfinite(comp.slot_for(variables[0]).residual.numpy()))


def test_horovod_hook_takes_back_a_void_tensor_and_names_it_under_raise():
    """Horovod's hook sees one tensor at a time: a tensor whose exchange came back non-finite
    takes back what it sent (here its own gradient was NaN: its state stays the reference's).
    Under nonfinite="raise" the error names the variable as Horovod's caller named it, found on
    the call stack, not the compressor's slot ('tensor0')."""
    import horovod.tensorflow as hvd
    hvd.init()
    w = tf.Variable(tf.ones((40, 30)), name="wide_kernel")
    b = tf.Variable(tf.zeros((30,)), name="bias")
    comp = RangerCompressor(density=0.05, min_elements=100)
    ref = ReferenceCompressor(1200, comp.options)

    def hook(grads):  # what Horovod's allreduce does with a compressor, world of one
        return [comp.decompress(*comp.compress(g)) for g in grads]

    run = tf.function(hook)
    rng = np.random.default_rng(5)
    for t in range(4):
        g = rng.standard_normal((40, 30)).astype(np.float32)
        if t == 1:
            g[0, 3] = np.inf
        out = run([tf.constant(g), tf.ones((30,))])[0].numpy()
        idx, vals = ref.step(g)
        want = np.zeros(1200, np.float32)
        want[idx] = vals
        np.testing.assert_array_equal(out.ravel(), want)
        np.testing.assert_array_equal(comp.slots[0].residual.numpy(), ref.residual)
    strict = RangerCompressor(density=0.05, min_elements=100, nonfinite="raise")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((x @ w + b) ** 2)
        return hvd.DistributedGradientTape(tape, compression=strict).gradient(loss, [w, b])

    step(tf.ones((2, 40)))
    assert [s.label for s in strict.slots] == ["wide_kernel", "bias"]
    assert [s.tensor_name for s in strict.slots] == ["tensor0", "tensor1"]
    # Horovod as a world of one never runs its branch: drive slot 0 the way it would.
    run_strict = tf.function(lambda g: strict.decompress(*strict.compress(g)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="variable 'wide_kernel'"):
        run_strict(tf.fill((40, 30), np.nan))


def test_v1_graph_mode_keys_by_order_and_steps_in_order():
    """tf.compat.v1 graph mode (issue 30, cause 4): Horovod compresses each tensor in a tf.cond
    branch of the tf.Graph; the compressor counts them within that graph (not per branch, which
    reported 'shared by two models') and names them after Horovod's variables. A graph orders
    only what data links, so the step runs as a tf.function: session steps equal the reference
    (a read of the residual racing the add into it gave other numbers), a NaN step included."""
    import horovod.tensorflow as hvd
    hvd.init()
    with tf.Graph().as_default():
        w = tf.Variable(tf.ones((30, 20)), name="w")
        b = tf.Variable(tf.zeros((20,)), name="b")
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((tf.ones((4, 30)) @ w + b) ** 2)
        comp = RangerCompressor(density=0.1, min_elements=100)
        hvd.DistributedGradientTape(tape, compression=comp).gradient(loss, [w, b])
        assert [(s.label, s.shape) for s in comp.slots] == [("w", (30, 20)), ("b", (20,))]
        comp2 = RangerCompressor(density=0.05, min_elements=100, momentum=0.5)
        comp2.world_size = 1
        g_in = tf.compat.v1.placeholder(tf.float32, (40, 30))
        out = tf.cond(tf.constant(True), lambda: comp2.decompress(*comp2.compress(g_in)),
                      lambda: g_in)
        ref = ReferenceCompressor(1200, comp2.options)
        rng = np.random.default_rng(0)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for t in range(8):
                g = rng.standard_normal((40, 30)).astype(np.float32)
                if t == 3:
                    g[1, 1] = np.nan
                got = sess.run(out, {g_in: g})
                idx, vals = ref.step(g)
                want = np.zeros(1200, np.float32)
                want[idx] = vals
                np.testing.assert_array_equal(got.ravel(), want)
                np.testing.assert_array_equal(sess.run(comp2.slots[0].residual), ref.residual)
                np.testing.assert_array_equal(sess.run(comp2.slots[0].velocity), ref.velocity)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("ranks", [2, 3])
def test_decompress_through_the_compiled_scatter_gives_the_bits_of_tf_scatter(dtype, ranks,
                                                                             monkeypatch):
    """``exchange.finish`` on a large tensor adds the gathered pairs in the compiled loop: the same
    bits as TF's own scatter (2 ranks scale each value first, 3 ranks scale the sum), and a
    corrupt index is refused, naming it."""
    from ranger_hvd.tensorflow import cpu_path, exchange
    numel, k = 300 * 400, 1200
    rng = np.random.default_rng(9)
    idx = np.concatenate([np.sort(rng.choice(numel, k, replace=False)) for _ in range(ranks)])
    vals = rng.standard_normal(idx.size).astype(dtype.as_numpy_dtype)
    packed = exchange.pack_pairs(tf.constant(idx, tf.int32), tf.constant(vals), tf.float32)
    ctx = exchange.Context("topk", (300, 400), dtype, gathered=packed, k=k, world=ranks)
    token = tf.ones([1])  # an average: the sum scaled by 1/ranks
    assert cpu_path.scatter_usable(dtype, numel)
    fast = exchange.finish(token, ctx, "float32").numpy()
    monkeypatch.setattr(cpu_path, "scatter_usable", lambda *a: False)
    slow = exchange.finish(token, ctx, "float32").numpy()
    assert fast.shape == (300, 400) and fast.dtype == dtype.as_numpy_dtype
    np.testing.assert_array_equal(fast.view(np.uint8), slow.view(np.uint8))
    want = np.zeros(numel)
    np.add.at(want, idx, vals.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(fast.ravel(), want / ranks, rtol=1e-6)
    monkeypatch.undo()
    idx[5] = numel
    bad = exchange.Context("topk", (300, 400), dtype, k=k,
                           gathered=exchange.pack_pairs(tf.constant(idx, tf.int32), tf.constant(vals),
                                                            tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"index {numel}, outside a tensor"):
        exchange.finish(token, bad, "float32")


def test_compiled_scatter_is_stateless_so_it_does_not_serialize_the_exchange():
    """A stateful op in a traced function waits for every stateful op before it (Horovod's
    collectives included): decompress must not be one, or each tensor waits for the last one's
    exchange."""
    from ranger_hvd.tensorflow import cpu_path, exchange
    numel = 1 << 17
    packed = exchange.pack_pairs(tf.constant([3, 9], tf.int32), tf.constant([1.0, 2.0]), tf.float32)
    ctx = exchange.Context("topk", (numel,), tf.float32, gathered=packed, k=2)
    assert cpu_path.scatter_usable(tf.float32, numel)
    graph = tf.function(lambda t: exchange.finish(t, ctx, "float32")).get_concrete_function(
        tf.TensorSpec([1], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():  # the tf.cond branches
        ops |= {node.op for node in fn.definition.node_def}
    assert "PyFuncStateless" in ops and "PyFunc" not in ops, ops


def test_compiled_outputs_reuse_buffers_only_once_tensorflow_lets_go(monkeypatch):
    """Outputs of the compiled calls are rewritten in later steps only when no tensor uses them: a
    held output keeps its values however many calls follow; released ones are reused instead of
    a new buffer per call."""
    from ranger_hvd.tensorflow import cpu_path
    allocated = []
    real = cpu_path._aligned_empty
    monkeypatch.setattr(cpu_path, "_aligned_empty", lambda *a: allocated.append(a) or real(*a))
    numel = 1 << 17
    idx = tf.constant(np.arange(0, numel, 64, dtype=np.int32))
    scatter = tf.function(lambda v: cpu_path.scatter_add(idx, v, numel, tf.constant(1.0)))
    held = scatter(tf.fill([idx.shape[0]], 7.0))
    for t in range(6):
        out = scatter(tf.fill([idx.shape[0]], float(t)))
        assert float(tf.reduce_max(out)) == t and float(tf.reduce_sum(out)) == t * idx.shape[0]
        del out
    np.testing.assert_array_equal(held.numpy()[::64], 7.0)
    assert float(tf.reduce_sum(held)) == 7.0 * idx.shape[0]
    assert len(allocated) <= 2, len(allocated)  # 7 calls: the held buffer and one reused


def test_tape_bytes_in_one_process():
    comp = RangerCompressor(density=0.01, min_elements=1000, value_dtype="bfloat16")
    model = keras.Sequential([keras.Input((100,)), keras.layers.Dense(50)])
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(tf.ones((4, 100))) ** 2)
        DistributedGradientTape(tape, compression=comp).gradient(loss, model.trainable_variables)
    s = comp.stats()
    # k = 50 of 5000, bf16 values and int32 indices (this tape sends no token); the bias dense
    assert s["bytes_sent"] == 3 * (50 * (2 + 4) + 50 * 4)
    assert s["bytes_dense"] == 3 * 4 * (5000 + 50)
    assert s["steps"] == 3


# ----------------------------------------------------------------------------- (b) keying by order
def test_positional_keying_and_misuse_detection():
    comp = RangerCompressor(density=0.1, min_elements=100)
    comp.world_size = 1

    def hook(tensors):  # what Horovod does with a compressor: compress, (reduce), decompress
        return [comp.decompress(*comp.compress(t)) for t in tensors]

    model_a = [tf.zeros((30, 20)), tf.zeros((20,))]
    out = tf.function(hook)([t + 1.0 for t in model_a])
    assert [tuple(o.shape) for o in out] == [(30, 20), (20,)]
    assert [s.tensor_name for s in comp.slots] == ["tensor0", "tensor1"]
    tf.function(hook)([t + 2.0 for t in model_a])  # a retrace with the same layout reuses slots
    assert len(comp.slots) == 2 and int(comp.slots[0].step.numpy()) == 2
    # A differently shaped model handed the same compressor fails at trace time...
    with pytest.raises(SharedCompressorError, match="shared by two models"):
        tf.function(hook)([tf.ones((10, 10))])
    # ...and one whose tensors are a prefix of the first fails at run time (steps drift apart).
    tf.function(hook)([tf.ones((30, 20))])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of step"):
        tf.function(hook)([t + 3.0 for t in model_a])
    # A compressor serves one exchange mode.
    with pytest.raises(SharedCompressorError, match="already serves"):
        comp.compress_variable(tf.Variable(tf.zeros((30, 20))), tf.zeros((30, 20)))


# ----------------------------------------------------------------------------- (c) one process
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_ranger_in_one_process_steps_exactly_like_sgd(momentum):
    keras.utils.set_random_seed(4)
    m1 = keras.Sequential([keras.Input((12,)), keras.layers.Dense(40), keras.layers.Dense(3)])
    m2 = keras.models.clone_model(m1)
    m2.set_weights(m1.get_weights())
    x = np.random.default_rng(0).standard_normal((48, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 48)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    m1.compile(optimizer=Ranger(lr=0.05, momentum=momentum), loss=loss)
    m2.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=momentum), loss=loss)
    for m in (m1, m2):
        m.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_compressor_checkpoint_restores_state():
    comp = RangerCompressor(density=0.05, momentum=0.9, min_elements=100)
    comp.world_size = 1
    var = tf.Variable(tf.zeros((40, 30)))
    rng = np.random.default_rng(8)
    for _ in range(3):
        comp.compress_variable(var, rng.standard_normal((40, 30)).astype(np.float32))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = tf.train.Checkpoint(compressor=comp).save(f"{d}/ck")
        fresh = RangerCompressor(density=0.05, momentum=0.9, min_elements=100)
        fresh.world_size = 1
        fresh.build([var])
        tf.train.Checkpoint(compressor=fresh).restore(path).assert_existing_objects_matched()
    g = rng.standard_normal((40, 30)).astype(np.float32)
    a, b = comp.compress_variable(var, g), fresh.compress_variable(var, g)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    state = comp.state_dict()
    other = RangerCompressor(density=0.05, momentum=0.9, min_elements=100)
    other.build([var])
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.residual_of(var).numpy(), comp.residual_of(var).numpy())


def test_dense_tensor_keeps_local_momentum_in_its_own_shape():
    # a conv kernel below min_elements travels dense; with momentum it sends u = m*u + g
    comp = RangerCompressor(density=0.01, momentum=0.9)
    var = tf.Variable(tf.zeros([3, 3, 1, 16]))
    first = comp.compress_variable(var, tf.ones([3, 3, 1, 16]))
    second = comp.compress_variable(var, tf.ones([3, 3, 1, 16]))
    assert first[0] is None and second[0] is None
    assert second[1].shape == (3, 3, 1, 16)
    np.testing.assert_allclose(second[1].numpy(), np.full((3, 3, 1, 16), 1.9, np.float32), rtol=1e-6)


@pytest.mark.parametrize("k", [1000, 200, 3])
def test_selection_of_a_mostly_zero_tensor(k):
    # An embedding's gradient: a few rows non-zero, so the sampled threshold is 0. Exact all the same
    # (all non-zeros, then the lowest-indexed zeros when k exceeds them), eagerly and traced.
    g = np.zeros(400 * 250, np.float32)
    rng = np.random.default_rng(k)
    for row in (3, 77, 301):
        g[row * 250:(row + 1) * 250] = rng.standard_normal(250)
    g[77 * 250 + 5] = 0.0
    want = select(g, k)
    assert np.array_equal(topk_indices(tf.constant(g), k).numpy(), want)
    traced = tf.function(lambda x: topk_indices(x, tf.constant(k)))
    assert np.array_equal(traced(tf.constant(g)).numpy(), want)


@pytest.mark.parametrize("ranks,op", [(2, "average"), (3, "average"), (3, "sum")])
def test_batched_decompress_gives_the_bits_of_one_tensor_at_a_time(ranks, op):
    """``finish_topk_many`` (one call into Python for every large tensor) against ``finish`` with
    the token Horovod's hook reduces, tensor by tensor: a large fp32 and fp64 tensor through the
    compiled scatter, a small one through TF's, with 1/2 (exact) and 1/3 (scaled after the sum)."""
    from ranger_hvd.tensorflow import exchange
    rng = np.random.default_rng(ranks)
    contexts = []
    for shape, dtype, k in [((300, 400), tf.float32, 1200), ((70000,), tf.float64, 700),
                            ((40, 50), tf.float32, 20)]:
        numel = int(np.prod(shape))
        idx = np.concatenate([np.sort(rng.choice(numel, k, replace=False)) for _ in range(ranks)])
        vals = rng.standard_normal(idx.size).astype(np.float32)
        packed = exchange.pack_pairs(tf.constant(idx, tf.int32), tf.constant(vals), tf.float32)
        contexts.append(exchange.Context("topk", shape, dtype, gathered=packed, k=k))
    token = tf.ones([1]) if op == "average" else tf.fill([1], float(ranks))
    scale = 1.0 / ranks if op == "average" else 1.0
    batched = tf.function(lambda: exchange.finish_topk_many(contexts, "float32", scale))()
    for ctx, got in zip(contexts, batched):
        want = exchange.finish(token, ctx, "float32").numpy()
        assert got.shape == ctx.shape and got.dtype == ctx.dtype
        np.testing.assert_array_equal(got.numpy().view(np.uint8), want.view(np.uint8))
        assert np.count_nonzero(want) > 0


def test_batched_selection_gives_the_bits_of_one_tensor_at_a_time():
    """``accumulate_topk_many`` (one call into Python for every large tensor) leaves the residuals
    and picks the indices and values that ``accumulate_topk`` does tensor by tensor, k a tensor or
    an int; a NaN in the second gradient raises naming it and leaves every residual as it was."""
    from ranger_hvd.tensorflow import cpu_path
    rng = np.random.default_rng(5)
    sizes, ks = [100_000, 250_000, 70_000], [100, tf.constant(2500), 70]
    residuals = [tf.constant(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    grads = [tf.constant(rng.standard_normal(n).astype(np.float32)) for n in sizes]
    messages = [f"tensor {j}" for j in range(3)]
    many = tf.function(lambda: [(s.residual, s.values, i) for s, i in cpu_path.accumulate_topk_many(
        residuals, grads, ks, 0.01, messages)])()
    for j in range(3):
        one, idx = cpu_path.accumulate_topk(residuals[j], grads[j], ks[j], 0.01, messages[j])
        for got, want in zip(many[j], (one.residual, one.values, idx)):
            np.testing.assert_array_equal(got.numpy().view(np.uint8), want.numpy().view(np.uint8))
        acc = residuals[j].numpy() + grads[j].numpy()
        np.testing.assert_array_equal(many[j][2].numpy(), select(acc, int(ks[j])))
    poisoned = list(grads)
    poisoned[1] = tf.tensor_scatter_nd_update(grads[1], [[7]], [np.nan])
    before = [r.numpy().copy() for r in residuals]
    with pytest.raises(tf.errors.InvalidArgumentError, match="tensor 1"):
        tf.function(lambda: [s.residual for s, _ in cpu_path.accumulate_topk_many(
            residuals, poisoned, ks, 0.01, messages)])()
    for r, b in zip(residuals, before):
        np.testing.assert_array_equal(r.numpy(), b)


@pytest.mark.parametrize("batched", [False, True])
def test_reused_decompress_outputs_are_cleared_where_their_last_pairs_went(batched, monkeypatch):
    """Decompress outputs are cleared only where their previous pairs went: step after step, with
    index sets that change (and one payload refused for a bad index, after which that buffer is
    cleared whole), every output is exactly the scatter into zeros and no old entry survives."""
    from ranger_hvd.tensorflow import cpu_path, exchange
    numel, k = 1 << 17, 500
    rng = np.random.default_rng(11)
    ctx_spec = tf.TensorSpec([2 * k, 2], tf.int32)

    def one(packed):
        ctx = exchange.Context("topk", (numel,), tf.float32, gathered=packed, k=k)
        if batched:
            return exchange.finish_topk_many([ctx], "float32", 0.5)[0]
        return exchange.finish(tf.ones([1]), ctx, "float32")

    decompress = tf.function(one, input_signature=[ctx_spec])
    assert cpu_path.scatter_usable(tf.float32, numel)
    real = cpu_path._aligned_empty  # new buffers hold garbage, not the kernel's zero pages
    monkeypatch.setattr(cpu_path, "_aligned_empty", lambda *a: np.copyto(b := real(*a), np.nan) or b)
    held = []
    for step in range(8):
        idx = np.concatenate([np.sort(rng.choice(numel, k, replace=False)) for _ in range(2)])
        vals = rng.standard_normal(2 * k).astype(np.float32)
        if step == 4:
            bad = idx.copy()
            bad[k + 3] = numel  # the second rank's fourth pair: after some pairs were added
            with pytest.raises(tf.errors.InvalidArgumentError, match="outside a tensor"):
                decompress(exchange.pack_pairs(tf.constant(bad, tf.int32), tf.constant(vals), tf.float32))
        out = decompress(exchange.pack_pairs(tf.constant(idx, tf.int32), tf.constant(vals), tf.float32))
        want = np.zeros(numel, np.float32)
        np.add.at(want, idx, vals * np.float32(0.5))
        np.testing.assert_array_equal(out.numpy().view(np.uint8), want.view(np.uint8))
        if step == 2:
            held.append((out, want))  # held across later steps: its buffer is not reused
    for out, want in held:
        np.testing.assert_array_equal(out.numpy(), want)


def test_global_topk_is_accepted_and_a_misspelled_exchange_is_refused():
    comp = RangerCompressor(exchange="global_topk", min_elements=16)
    assert comp.options.exchange == "global_topk"
    assert Ranger(learning_rate=0.1, exchange="global_topk").options.exchange == "global_topk"
    for bad in ("globaltopk", "global-topk", "allreduce"):
        with pytest.raises(OptionsError, match="exchange"):
            RangerCompressor(exchange=bad)
        with pytest.raises(OptionsError, match="exchange"):
            Ranger(learning_rate=0.1, exchange=bad)
    with pytest.raises(OptionsError, match="global_topk"):   # random-k has no owners to sum
        RangerCompressor(exchange="global_topk", selection="random")


@pytest.mark.parametrize("options", [{}, {"value_dtype": "float16"},
                                     {"warmup_steps": 3, "warmup_start_density": 0.5},
                                     {"momentum": 0.9}],
                         ids=["fp32", "fp16-wire", "warmup", "dgc-momentum"])
def test_global_topk_on_one_process_equals_the_allgather(options):
    """A world of one, through ranger_hvd's tape (Horovod's tape skips its exchange on one rank):
    the owner of the one range keeps every pair (its budget is k), so the global exchange gives the
    allgather's gradients and residuals bit for bit, with fp16 on the wire, under warm-up (k a
    tensor) and with DGC momentum; its next ranges are [0, n) with weight |G|, kept in state_dict.
    Multi-rank: test_global_topk.py and test_compat.py."""
    import horovod.tensorflow as hvd

    hvd.init()
    results = {}
    for exchange_name in ("allgather", "global_topk"):
        w, b = tf.Variable(tf.zeros([60, 50]), name="w"), tf.Variable(tf.zeros([50]), name="b")
        comp = RangerCompressor(density=0.05, min_elements=100, exchange=exchange_name, **options)

        @tf.function
        def step(x):
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * x) + tf.reduce_sum(b * x[0])
            return DistributedGradientTape(t, compression=comp).gradient(loss, [w, b])

        outs = []
        for s in range(4):
            x = np.random.default_rng(s).standard_normal((60, 50)).astype(np.float32)
            outs.append([g.numpy() for g in step(tf.constant(x))])
        slot = comp.slots[0]
        results[exchange_name] = (outs, slot.residual.numpy(), comp.stats(), comp.state_dict(),
                                  None if slot.velocity is None else slot.velocity.numpy())
    (ag_out, ag_res, ag_stats, _, ag_u), (gl_out, gl_res, gl_stats, gl_state, gl_u) = (
        results["allgather"], results["global_topk"])
    for a, g in zip(ag_out, gl_out):
        for x, y in zip(a, g):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ag_res, gl_res)
    if ag_u is not None:
        np.testing.assert_array_equal(ag_u, gl_u)
    # nothing comes from other ranks but the bias's allreduce
    assert gl_stats["bytes_received"] == ag_stats["bytes_received"] > 0
    # the owner's kept rows are sent too: k pairs of (fp32 sum, int32 index) per step
    k_total = ag_stats["elements_selected"] - 4 * 50
    assert gl_stats["bytes_sent"] == ag_stats["bytes_sent"] + 8 * k_total
    bounds, weights = next(st for st in gl_state["slots"].values()
                           if st["residual"] is not None)["global_ranges"]
    assert list(bounds) == [0, 3000] and list(weights) == [150]   # k of the last step
