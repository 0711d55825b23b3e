"""The GAN job's recipe (config section ``gan``): the R1 penalty on both backends against the closed form.

For D(x) = w2 . leaky(W1 x + b1) + b2 the input gradient of one sample is W1^T (s * w2), where s is the
leaky ReLU's slope (1 or 0.2) at each hidden unit, so the penalty gamma/2 * mean_i ||grad_x D(x_i)||^2 is
known in NumPy, and for a linear D (no hidden layer) it is gamma/2 * ||w||^2 with gradient gamma * w
whatever the batch. The jobs' own functions are tested, on the jobs' own layer types.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

GAMMA = 1.7
SLOPE = 0.2


def _two_layer(rng, n_in=6, hidden=5):
    return (rng.standard_normal((hidden, n_in)), rng.standard_normal(hidden), rng.standard_normal(hidden),
            rng.standard_normal())


def _expected_penalty(x, w1, b1, w2):
    pre = x @ w1.T + b1
    s = np.where(pre > 0, 1.0, SLOPE)
    grad_x = (s * w2) @ w1                      # (batch, n_in): row i is W1^T (s_i * w2)
    return GAMMA / 2 * np.mean(np.sum(grad_x ** 2, axis=1))


def test_torch_r1_penalty_closed_form_and_gradient():
    import torch

    from ranger_hvd.jobs.torch_jobs import r1_penalty

    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = _two_layer(rng)
    x = rng.standard_normal((9, 6))
    disc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LeakyReLU(SLOPE), torch.nn.Linear(5, 1)).double()
    with torch.no_grad():
        for p, v in zip(disc.parameters(), (w1, b1, w2[None, :], [b2])):
            p.copy_(torch.as_tensor(np.asarray(v)))
    real = torch.from_numpy(x).requires_grad_(True)
    penalty = r1_penalty(disc(real), real, GAMMA)
    assert penalty.item() == pytest.approx(_expected_penalty(x, w1, b1, w2), rel=1e-12)

    # linear D: the penalty is gamma/2 ||w||^2 for any batch, and its gradient reaches w as gamma * w
    lin = torch.nn.Linear(6, 1).double()
    real = torch.from_numpy(x).requires_grad_(True)
    r1_penalty(lin(real), real, GAMMA).backward()
    w = lin.weight.detach().numpy().ravel()
    assert lin.weight.grad.numpy().ravel() == pytest.approx(GAMMA * w, rel=1e-12)
    assert lin.bias.grad is None                 # the slope does not depend on the bias


def test_tensorflow_r1_penalty_closed_form_and_gradient():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from ranger_hvd.jobs.tf_jobs import r1_penalty

    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = _two_layer(rng)
    x = rng.standard_normal((9, 6))
    L = keras.layers
    disc = keras.Sequential([keras.Input((6,), dtype="float64"), L.Dense(5, dtype="float64"),
                             L.LeakyReLU(SLOPE, dtype="float64"), L.Dense(1, dtype="float64")])
    disc.set_weights([w1.T, b1, w2[:, None], np.array([b2])])    # Keras kernels are (in, out)
    real = tf.constant(x)
    penalty, d_real = r1_penalty(tf, disc, real, GAMMA)
    assert float(penalty) == pytest.approx(_expected_penalty(x, w1, b1, w2), rel=1e-9)   # oneDNN's order
    pre = x @ w1.T + b1
    d_expected = np.where(pre > 0, pre, SLOPE * pre) @ w2 + b2
    # (Keras' forward leaky ReLU rounds its slope to float32: 1e-8 off where a unit is negative)
    assert np.asarray(d_real).ravel() == pytest.approx(d_expected, rel=1e-6)   # D(real), for the BCE term

    lin = keras.Sequential([keras.Input((6,), dtype="float64"), L.Dense(1, dtype="float64")])
    with tf.GradientTape() as tape:
        penalty, _ = r1_penalty(tf, lin, real, GAMMA)
    kernel, bias = lin.trainable_variables
    g_kernel, g_bias = tape.gradient(penalty, [kernel, bias])
    assert np.asarray(g_kernel).ravel() == pytest.approx(GAMMA * np.asarray(kernel).ravel(), rel=1e-9)
    assert g_bias is None or not np.any(np.asarray(g_bias))
