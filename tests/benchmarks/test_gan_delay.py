"""The GAN delay simulation's exchange: the product's reference rule for N simulated ranks."""

import sys

import numpy as np
import pytest
import torch

from ranger_hvd.core import make_options
from tests.launcher.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gan_delay  # noqa: E402


def _grads(ranks, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(ranks)]


def test_uncompressed_and_full_density_exchanges_are_the_plain_average():
    shapes = [(64, 32), (32,)]
    params = [torch.zeros(s) for s in shapes]
    grads = _grads(3, shapes)
    mean = [sum(g[j] for g in grads) / 3 for j in range(2)]
    for options, compress in ((make_options(density=0.01), False), (make_options(density=1.0), True)):
        out = gan_delay.SimulatedExchange(params, 3, options, compress)(grads)
        for got, want in zip(out, mean):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_compressed_exchange_sends_k_per_rank_and_loses_nothing():
    shapes = [(64, 32), (32,)]     # the 1-D bias travels dense
    params = [torch.zeros(s) for s in shapes]
    ex = gan_delay.SimulatedExchange(params, 2, make_options(density=0.01), True)
    total_in, total_out = torch.zeros(64, 32), torch.zeros(64, 32)
    for step in range(5):
        grads = _grads(2, shapes, seed=step)
        out = ex(grads)
        assert int((out[0] != 0).sum()) <= 2 * 21        # k = ceil(0.01 * 2048) = 21 per rank
        total_in += sum(g[0] for g in grads) / 2
        total_out += out[0]
    residual = sum(torch.from_numpy(ex.states[r][0].residual).view(64, 32) for r in range(2)) / 2
    np.testing.assert_allclose((total_out + residual).numpy(), total_in.numpy(), atol=1e-5)
    assert ex.states[0][1] is None


def test_an_unknown_choice_is_refused():
    with pytest.raises(SystemExit):
        gan_delay.main(["--compress", "both,critic"])
