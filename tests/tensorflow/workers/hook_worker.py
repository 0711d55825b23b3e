"""Horovod's own TF entry points with a RangerCompressor, on 2 or 3 ranks (tf-keras,
``TF_USE_LEGACY_KERAS=1``): at density 1 they equal uncompressed Horovod step after step, and at
density 0.01 Horovod's tape, Horovod's Keras optimizer and ranger_hvd's tape end with the same bits.
"""

import os

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
import horovod.tensorflow.keras as hvd_keras
from ranger_hvd.tensorflow import DistributedGradientTape, RangerCompressor
from tests.hvdrun import report

assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
STEPS = 6
out = {"rank": RANK, "size": SIZE}
# uncompressed Horovod's weights after each step, by label ("average", "sum", "keras"): kept for
# global_worker.py, which compares against the same runs in the same launch
PLAIN: dict = {}


def make_model():
    model = tf.keras.Sequential([tf.keras.layers.Dense(48, activation="tanh", input_shape=(32,)),
                                 tf.keras.layers.Dense(10)])
    # the same initial weights on every rank and in every run (tf-keras' seeding does not repeat)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(-0.3, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def data(step):
    rng = np.random.default_rng(1000 * RANK + step)  # different data on every rank
    return (tf.constant(rng.standard_normal((16, 32)).astype(np.float32)),
            tf.constant(rng.integers(0, 10, 16)))


loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tape_run(make_wrap, steps=STEPS):
    """A custom loop; ``make_wrap(model)`` returns the function that makes the distributed tape.
    Returns the weights after each step."""
    model, opt = make_model(), tf.keras.optimizers.SGD(0.1, momentum=0.5)
    wrap = make_wrap(model)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = wrap(tape).gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    trace = []
    for t in range(steps):
        step(*data(t))
        trace.append([w.copy() for w in model.get_weights()])
    return trace


def keras_run(density, steps=STEPS, compression_of=None):
    """Horovod's tf-keras DistributedOptimizer: compute_gradients allreduces, then apply.
    ``compression_of(model)``, when given, makes the compression instead of ``density``."""
    model = make_model()
    if compression_of is not None:
        compression = compression_of(model)
    else:
        compression = hvd.Compression.none if density is None else compressor(density, model)
    opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.5),
                                         compression=compression)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(opt.compute_gradients(loss, model.trainable_variables, tape=tape))

    trace = []
    for t in range(steps):
        step(*data(t))
        trace.append([w.copy() for w in model.get_weights()])
    return trace, compression


def diffs(a, b):
    return [max(float(np.max(np.abs(x - y))) for x, y in zip(p, q)) for p, q in zip(a, b)]


def compressor(density, model=None):
    """32x48 and 48x10 weights are compressed (min_elements 256); the biases travel dense. Horovod's
    tape and optimizer key state by position: Keras creates its own variables while TF traces the
    first step, so the layout is given up front (``variables=``)."""
    variables = None if model is None else model.trainable_variables
    return RangerCompressor(density=density, min_elements=256, variables=variables)


def run() -> dict:
    """Every check of this file; ``compat_legacy_worker`` runs it in its launch (one launch fewer)."""
    # density 1: Horovod's tape (Average, Sum, predivide 2) and Horovod's Keras optimizer
    for label, kwargs in {"average": {}, "sum": {"op": hvd.Sum},
                          "predivide": {"gradient_predivide_factor": 2.0}}.items():
        plain = PLAIN[label] = tape_run(lambda m: lambda t: hvd.DistributedGradientTape(t, **kwargs))

        def with_ranger(model):
            comp = compressor(1.0, model)
            return lambda t: hvd.DistributedGradientTape(t, compression=comp, **kwargs)

        ranger = tape_run(with_ranger)
        out[f"tape_d1_{label}"] = diffs(plain, ranger)
        out[f"tape_d1_{label}_moved"] = diffs(plain[:1], plain[-1:])[0]
    PLAIN["keras"] = keras_run(None)[0]
    out["keras_d1"] = diffs(PLAIN["keras"], keras_run(1.0)[0])

    # density 0.01: three entry points, one exchange
    comps = {}

    def hvd_tape_wrap(model):
        comps["hvd_tape"] = comp = compressor(0.01, model)
        return lambda t: hvd.DistributedGradientTape(t, compression=comp)

    def our_wrap(model):
        comps["ours"] = comp = compressor(0.01)
        return lambda t: DistributedGradientTape(t, compression=comp)

    hvd_tape = tape_run(hvd_tape_wrap, steps=20)
    keras_opt, keras_comp = keras_run(0.01, steps=20)
    ours = tape_run(our_wrap, steps=20)
    hvd_tape_comp, our_comp = comps["hvd_tape"], comps["ours"]
    out["d001_hvd_tape_vs_ours"] = diffs(hvd_tape[-1:], ours[-1:])[0]
    out["d001_keras_vs_ours"] = diffs(keras_opt[-1:], ours[-1:])[0]
    out["d001_moved"] = diffs(ours[:1], ours[-1:])[0]
    out["d001_stats"] = [hvd_tape_comp.stats(), keras_comp.stats(), our_comp.stats()]
    out["d001_weights_sum"] = float(sum(np.abs(w).sum() for w in ours[-1]))
    return out


if __name__ == "__main__":
    report(RANK, run())
