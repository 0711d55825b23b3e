"""The digits MLP of tests/torch/workers/converge_scenario.py, in TensorFlow: Horovod's own tape,
dense against ``compression=RangerCompressor(density=0.01)``, SGD with momentum 0.9 after the exchange.

``main_worker.py`` calls :func:`run` at the end of its launch (starting TensorFlow is the slow part);
it also runs alone.
"""

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import horovod.tensorflow as hvd
from ranger_hvd.tensorflow import RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
STEPS = 300
digits = load_digits()
X_all = (digits.data / 16.0).astype(np.float32)
Y_all = digits.target.astype(np.int64)
X, Y = X_all[RANK::SIZE], Y_all[RANK::SIZE]


def make_variables():
    rng = np.random.default_rng(0)  # the same start on every rank
    return [tf.Variable(rng.uniform(-1 / 8, 1 / 8, (64, 128)).astype(np.float32)),
            tf.Variable(np.zeros(128, np.float32)),
            tf.Variable(rng.uniform(-1 / 128 ** 0.5, 1 / 128 ** 0.5, (128, 10)).astype(np.float32)),
            tf.Variable(np.zeros(10, np.float32))]


def logits(vs, x):
    return tf.nn.relu(x @ vs[0] + vs[1]) @ vs[2] + vs[3]


def full_loss(vs):
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(Y_all, logits(vs, X_all))))


def train(compression):
    vs = make_variables()
    velocity = [tf.Variable(tf.zeros_like(v)) for v in vs]

    @tf.function
    def step(x, y, lr):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits(vs, x)))
        grads = hvd.DistributedGradientTape(tape, compression=compression).gradient(loss, vs)
        for v, u, g in zip(vs, velocity, grads):
            u.assign(0.9 * u + g + 5e-4 * v)
            v.assign_sub(lr * u)

    rng = np.random.default_rng(RANK)
    for t in range(STEPS):
        idx = rng.integers(0, len(X), 64)
        step(tf.constant(X[idx]), tf.constant(Y[idx]), tf.constant(0.1 * (1 - t / STEPS)))
    return full_loss(vs), [v.numpy() for v in vs]


def run() -> dict:
    out = {"rank": RANK, "initial_loss": full_loss(make_variables())}
    out["dense"], _ = train(hvd.Compression.none)
    comp = RangerCompressor(density=0.01, min_elements=1024)
    out["ranger"], weights = train(comp)
    out["ranger_stats"] = comp.stats()
    out["ranger_digest"] = float(sum(float(np.abs(w).sum()) for w in weights))
    return out


if __name__ == "__main__":
    report(RANK, run())
