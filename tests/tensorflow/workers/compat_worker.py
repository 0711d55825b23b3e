"""The TensorFlow compatibility matrix, Keras 3 side (issue 30): one launch per rank count runs
every cell and reports.

Each cell drives T steps of the same known per-rank gradients (``matrix.py``) through one entry
point with SGD at lr 1. At density 1 a cell must equal Horovod's tape without compression; at
density 0.01 it must conserve: the sum over ranks of (every gradient - the final residual) / N
equals the sum of the applied averages. ``mixed`` cells train a float16 model under dynamic loss scaling with an
overflow injected on one rank.
"""

import zlib

import keras
import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
from ranger_hvd.tensorflow import (DistributedGradientTape, LossScaleOptimizer, Ranger,
                                   RangerCompressor)
from tests.hvdrun import report
from tests.tensorflow.workers.matrix import (RANK, SHAPES, SIZE, T, check, compressor, drive,
                                             grads_at, linear_loss, out)


# ----------------------------------------------------------------------------- Horovod's tape
def hvd_tape(traced, registered=False, groups=None):
    def run(density):
        variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
        comp = compressor(density, variables=variables if registered else None)
        kwargs = {"compression": comp} if comp is not None else {}

        def step(grads):
            with tf.GradientTape() as tape:
                loss = linear_loss(variables, grads)
            tape = hvd.DistributedGradientTape(tape, groups=groups, **kwargs)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(g)

        return drive(step, variables, comp, traced)
    return run


def hvd_tape_graph(density, **options):
    """tf.compat.v1 graph mode: Horovod compresses each tensor in a tf.cond of the tf.Graph."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
        holders = [tf.compat.v1.placeholder(tf.float32, s) for s in SHAPES]
        # as in Horovod's own graph test: the initializer runs before the compressor and the
        # tape exist, so the compressor's state must initialize itself
        sess.run(tf.compat.v1.global_variables_initializer())
        comp = compressor(density, **options)
        kwargs = {"compression": comp} if comp is not None else {}
        with tf.GradientTape() as tape:
            loss = linear_loss(variables, holders)
        grads = hvd.DistributedGradientTape(tape, **kwargs).gradient(loss, variables)
        train = tf.group([v.assign_sub(g) for v, g in zip(variables, grads)])
        for t in range(T):
            sess.run(train, dict(zip(holders, grads_at(t, RANK))))
        weights = sess.run(variables)
        residuals = [None if s.residual is None else sess.run(s.residual)
                     for s in comp.slots] if comp else [None] * 3
    return weights, residuals


# ----------------------------------------------------------------------------- ours: tape, Ranger
def our_tape(traced):
    def run(density):
        variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
        comp = compressor(density)

        def step(grads):
            with tf.GradientTape() as tape:
                loss = linear_loss(variables, grads)
            reduced = DistributedGradientTape(tape, compression=comp).gradient(loss, variables)
            for v, g in zip(variables, reduced):
                v.assign_sub(g)

        fn = tf.function(step) if traced else step
        for t in range(T):
            fn([tf.constant(g) for g in grads_at(t, RANK)])
        residuals = [None if not comp.slot_for(v).compressed else comp.residual_of(v).numpy()
                     for v in variables]
        return [v.numpy() for v in variables], residuals
    return run


def ranger(density, **options):
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in SHAPES]
    opt = Ranger(learning_rate=1.0, momentum=0.0, density=density, min_elements=100, **options)
    for t in range(T):
        opt.apply_gradients(zip([tf.constant(g) for g in grads_at(t, RANK)], variables))
    residuals = [None if r is None else keras.ops.convert_to_numpy(r) for r in opt.ranger_residuals]
    return [keras.ops.convert_to_numpy(v) for v in variables], residuals


plain = hvd_tape(True)(None)[0]  # Horovod without compression: what density 1 must give
check("hvd_tape_eager", hvd_tape(False), plain)
check("hvd_tape_function", hvd_tape(True), plain)
check("hvd_tape_variables", hvd_tape(True, registered=True), plain)
check("hvd_tape_groups", hvd_tape(True, groups=2), plain)
check("hvd_tape_graph", hvd_tape_graph, plain)
check("our_tape_eager", our_tape(False), plain)
check("our_tape_function", our_tape(True), plain)
check("ranger", ranger, plain)
# the global top-k exchange (issue 33) through the entry points the tf-keras launch does not run:
# Horovod's tape in v1 graph mode and Keras 3 Ranger (eagerly both tapes trace their exchange)
GLOBAL = {"exchange": "global_topk"}
check("hvd_tape_graph_global", lambda density: hvd_tape_graph(density, **GLOBAL), plain)
check("ranger_global", lambda density: ranger(density, **GLOBAL), plain)


# ----------------------------------------------------------------------------- mixed precision
def mixed(use_ranger, steps=6, overflow_at=2):
    """A float16 model under dynamic loss scaling; on the last rank the loss of step
    ``overflow_at`` is multiplied by a huge factor, so its float16 gradients overflow. Either our
    tape exchanges the scaled gradients for Keras's LossScaleOptimizer(SGD) (the exchange runs on
    every rank before the optimizer looks), or Ranger exchanges inside ranger_hvd's
    LossScaleOptimizer (which makes every rank skip alike)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(11)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="tanh"),
                                  keras.layers.Dense(4)])
        inner = (Ranger(learning_rate=0.05, momentum=0.0, density=0.05, min_elements=100)
                 if use_ranger else keras.optimizers.SGD(0.05))
        scaler = LossScaleOptimizer if use_ranger else keras.optimizers.LossScaleOptimizer
        opt = scaler(inner)
        comp = RangerCompressor(density=0.05, min_elements=100)
        rng = np.random.default_rng(100 + RANK)
        x = rng.standard_normal((16, 20)).astype(np.float32)
        y = (x[:, :4] > 0).astype(np.float32)
        kernel = model.layers[0].kernel
        log = {"scale": [], "loss": [], "residual_finite": []}

        def residual():
            if use_ranger:
                return keras.ops.convert_to_numpy(inner.ranger_residuals[0]) if inner.built \
                    else np.zeros(kernel.shape, np.float32)
            return comp.residual_of(kernel).numpy() if comp.slots else np.zeros(kernel.shape)

        for t in range(steps):
            boost = 1e30 if (t == overflow_at and RANK == SIZE - 1) else 1.0
            before = residual()
            with tf.GradientTape(persistent=True) as tape:
                loss = keras.ops.mean((keras.ops.cast(model(x), "float32") - y) ** 2)
                scaled = opt.scale_loss(loss * boost)
            local = tape.gradient(scaled, kernel).numpy()
            if use_ranger:
                grads = tape.gradient(scaled, model.trainable_variables)
            else:
                grads = DistributedGradientTape(tape, compression=comp).gradient(
                    scaled, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            after = residual()
            log["scale"].append(float(keras.ops.convert_to_numpy(opt.dynamic_scale)))
            log["loss"].append(float(loss))
            log["residual_finite"].append(bool(np.all(np.isfinite(after))))
            if t == overflow_at:
                # The overflowed rank's state stays as it was; the others take back what they
                # sent, keeping the step's (scaled) gradient in the residual: e + g. Under Ranger
                # nobody's state moves (no rank called it).
                log["void_residual_unchanged"] = bool(np.array_equal(before, after))
                log["void_residual_kept_gradient"] = bool(np.array_equal(
                    after, before + local.reshape(before.shape)))
                log["void_local_finite"] = bool(np.all(np.isfinite(local)))
        log["iterations"] = int(keras.ops.convert_to_numpy(opt.iterations))
        log["crc"] = zlib.crc32(b"".join(np.asarray(w).tobytes() for w in model.get_weights()))
        return log
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


out["mixed_tape"] = mixed(False)
out["mixed_ranger"] = mixed(True)
report(RANK, out)
