"""Helpers shared by the worker scripts (each runs once per rank under horovodrun)."""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

import torch  # noqa: E402

torch.set_num_threads(1)


def digest(tensors) -> str:
    """A short fingerprint of tensors' exact bits, to compare ranks and runs."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def prefixed(model, prefix: str):
    """named_parameters with a prefix, so that runs sharing a process never share collective names."""
    return [(f"{prefix}.{n}", p) for n, p in model.named_parameters()]


def small_mlp():
    """The 30-60-5 MLP of the global top-k and hierarchical scenarios, the same weights every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(30, 60), torch.nn.Tanh(), torch.nn.Linear(60, 5))


def rank_batch(rank: int, step: int):
    """A batch of 16 for ``small_mlp``, its own for each rank and step."""
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(16, 30, generator=g), torch.randn(16, 5, generator=g)


def drain_error(model, opt, batch, steps: int, tag: str) -> float:
    """The drain: 3 steps with gradients, then ``steps - 3`` with zero gradients through a Horovod
    optimizer whose learning rate is 0. Returns the largest relative difference, over the
    parameters, between the sum of every gradient the optimizer delivered and the average over
    ranks of every gradient computed: 0 when every gradient arrived once and none twice."""
    import horovod.torch as hvd

    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    delivered = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for step in range(steps):
        x, y = batch(step)
        scale = 1.0 if step < 3 else 0.0
        loss = scale * torch.nn.functional.mse_loss(model(x), y)
        for t, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
            t += g.double()
        (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.synchronize()
        for d, p in zip(delivered, model.parameters()):
            d += p.grad.double()
        with opt.skip_synchronize():
            opt.step()
        opt.zero_grad()
    worst = 0.0
    for j, (d, t) in enumerate(zip(delivered, total)):
        avg = hvd.allreduce(t, name=f"{tag}.total.{j}")
        worst = max(worst, float((d - avg).abs().max()) / (float(avg.abs().max()) or 1.0))
    return worst
