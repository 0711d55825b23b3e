"""The TensorFlow compatibility matrix, tf-keras side (run with TF_USE_LEGACY_KERAS=1): Horovod's
Keras optimizer and partial tape with a RangerCompressor, one launch per rank count.

The cells of ``matrix.py`` (known gradients, SGD at lr 1): ``hvd.keras.DistributedOptimizer``
through ``minimize``, eagerly and traced, with and without ``variables=``, with gradient
aggregation (``backward_passes_per_step=2``) and with a local variable (``register_local_var``),
and ``hvd.PartialDistributedGradientTape`` with a local layer. Then ``model.fit``
(``jit_compile=False``) of a model with an Embedding under ``sparse_as_dense=True``, the optimizer
wrapped before the model exists and no ``variables=`` (issue 30, causes 2 and 3). Last, the checks
of ``hook_worker.py`` and ``global_worker.py`` (one launch for the three test files).
"""

import os
import zlib

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
import horovod.tensorflow.keras as hvd_keras
from tests.hvdrun import report
from tests.tensorflow.workers.matrix import (RANK, SHAPES, SIZE, check, compressor, drive, linear_loss,
                                             out)

assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
out["keras_module"] = tf.keras.__name__


def keras_minimize(traced, registered=False, passes=1, local=()):
    def run(density):
        variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
        comp = compressor(density, variables=variables if registered else None)
        kwargs = {"compression": comp} if comp is not None else {}
        opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(1.0),
                                             backward_passes_per_step=passes, **kwargs)
        for i in local:
            opt.register_local_var(variables[i])

        def step(grads):
            opt.minimize(lambda: linear_loss(variables, grads), variables)

        return drive(step, variables, comp, traced)
    return run


def partial_tape(density):
    """Horovod's partial tape: the last layer stays local (its gradient is this rank's, over N)."""
    zeros = {"kernel_initializer": "zeros"}
    model = tf.keras.Sequential([tf.keras.layers.Dense(30, input_shape=(40,), **zeros),
                                 tf.keras.layers.Dense(5, use_bias=False, **zeros)])
    variables = model.trainable_variables
    comp = compressor(density)
    kwargs = {"compression": comp} if comp is not None else {}

    def step(grads):
        with tf.GradientTape() as tape:
            loss = linear_loss(variables, grads)
        tape = hvd.PartialDistributedGradientTape(tape, local_layers=[model.layers[1]], **kwargs)
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(g)

    return drive(step, variables, comp)


plain = keras_minimize(True)(None)[0]
check("keras_minimize_eager", keras_minimize(False), plain)
check("keras_minimize_function", keras_minimize(True), plain)
check("keras_variables", keras_minimize(True, registered=True), plain)
aggregated, with_local = keras_minimize(False, passes=2), keras_minimize(True, local=(1,))
check("keras_aggregation", aggregated, aggregated(None)[0])
check("keras_local_var", with_local, with_local(None)[0], local=(1,))
check("partial_tape", partial_tape, partial_tape(None)[0], local=(2,))


# ----------------------------------------------------------------------------- model.fit
def fit(density, epochs=6):
    """Keras fit with jit_compile=False: the optimizer is wrapped before the model is built, the
    compressor gets no variables, and the Embedding's gradient is densified (sparse_as_dense)."""
    comp = compressor(density)
    kwargs = {"compression": comp} if comp is not None else {}
    opt = hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.5), sparse_as_dense=True,
                                         **kwargs)
    model = tf.keras.Sequential([tf.keras.layers.Embedding(50, 8, input_length=4),
                                 tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(32, activation="tanh"),
                                 tf.keras.layers.Dense(3)])
    model.compile(optimizer=opt, jit_compile=False,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    init = np.random.default_rng(7)  # the same initial weights on every rank and in every run
    model.set_weights([init.standard_normal(w.shape).astype(np.float32) * 0.3
                       for w in model.get_weights()])
    rng = np.random.default_rng(RANK)
    x = rng.integers(0, 50, (64, 4))
    y = (x[:, 0] % 3).astype(np.int64)
    hist = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return model, comp, [float(v) for v in hist.history["loss"]]


model, comp, losses = fit(0.05)
out["fit"] = {
    "losses": losses,
    "crc": zlib.crc32(b"".join(w.tobytes() for w in model.get_weights())),
    "slots": [[s.label, list(s.shape)] for s in comp.slots],
    "stats": comp.stats(),
}
from tests.tensorflow.workers import hook_worker  # noqa: E402 - after the matrix, in the same job

out.update(hook_worker.run())
from tests.tensorflow.workers import global_worker  # noqa: E402 - reuses hook_worker's plain runs

out.update(global_worker.run(full=SIZE == 2))
report(RANK, out)
