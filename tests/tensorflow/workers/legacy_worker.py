"""Horovod's own tape and Keras optimizer with tf-keras (run with TF_USE_LEGACY_KERAS=1), compressed by
a RangerCompressor: each rank's top-k travels in the compressor's own allgather, beside Horovod's
allreduce of a 1-element token."""

import os
import zlib

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
import horovod.tensorflow.keras as hvd_keras
from ranger_hvd.tensorflow import RangerCompressor
from tests.hvdrun import report

assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
hvd.init()
RANK = hvd.rank()
out = {"keras_module": tf.keras.__name__ if hasattr(tf.keras, "__name__") else str(tf.keras)}


def crc(arrays):
    return [zlib.crc32(np.ascontiguousarray(a).tobytes()) for a in arrays]


tf.random.set_seed(100 + RANK)  # different initial weights per rank; Horovod's broadcast fixes that
model = tf.keras.Sequential([tf.keras.layers.Dense(64, activation="relu", input_shape=(20,)),
                             tf.keras.layers.Dense(4)])
hvd.broadcast_variables(model.variables, root_rank=0)
opt = tf.keras.optimizers.SGD(0.05)
comp = RangerCompressor(density=0.05, min_elements=100, variables=model.trainable_variables)
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
rng = np.random.default_rng(RANK)
x = rng.standard_normal((64, 20)).astype(np.float32)
y = ((x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64))


@tf.function
def step(xb, yb):
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
    tape = hvd.DistributedGradientTape(tape, compression=comp)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss


losses = [float(step(x[i % 4 * 16:(i % 4 + 1) * 16], y[i % 4 * 16:(i % 4 + 1) * 16]))
          for i in range(12)]
out["tape_losses"] = losses
out["tape_crc"] = crc(model.get_weights())
out["tape_stats"] = comp.stats()
out["slot_names"] = [s.tensor_name for s in comp.slots]

# Horovod's Keras DistributedOptimizer (tf-keras) with model.fit, also compressed by Ranger.
tf.random.set_seed(200 + RANK)
m2 = tf.keras.Sequential([tf.keras.layers.Dense(64, activation="relu", input_shape=(20,)),
                          tf.keras.layers.Dense(4)])
# Keras fit traces Horovod's function where TensorFlow forbids new variables: register the layout.
comp2 = RangerCompressor(density=0.05, min_elements=100, variables=m2.trainable_variables)
m2.compile(optimizer=hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.2), compression=comp2),
           loss=loss_fn)
# Ten epochs of four steps: error feedback delays most of the update at d = 0.05, and the initial
# weights are not seeded (tf-keras), so fewer steps may not yet lower the loss.
hist = m2.fit(x, y, batch_size=16, epochs=10, verbose=0, shuffle=False,
              callbacks=[hvd_keras.callbacks.BroadcastGlobalVariablesCallback(0)])
out["fit_losses"] = [float(v) for v in hist.history["loss"]]
out["fit_crc"] = crc(m2.get_weights())
out["fit_stats"] = comp2.stats()
report(RANK, out)
