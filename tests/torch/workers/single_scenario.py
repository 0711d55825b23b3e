"""One process (horovodrun -np 1): Ranger is exactly SGD(momentum), DistributedOptimizer is exactly
the wrapped optimizer, and nothing is exchanged."""

from __future__ import annotations

import warnings

from common import digest

import torch
import horovod.torch as hvd

from ranger_hvd.torch import DistributedOptimizer, Ranger, RangerCompressor
from tests.hvdrun import report


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.ReLU(), torch.nn.Linear(50, 5))


def groups(model, wd):
    # Two groups with their own learning rate and weight decay, as real code often has.
    return [{"params": model[0].parameters(), "weight_decay": wd},
            {"params": model[2].parameters(), "lr": 0.02}]


def run(model, opt, steps=12):
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 30, generator=g), torch.randint(0, 5, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return digest(model.parameters())


out = {}
# Ranger initialises Horovod itself.
warnings.simplefilter("error")  # no warning either
model = make_model()
ranger = Ranger(groups(model, 1e-3), lr=0.05, momentum=0.9, density=0.001)
out["initialised_by_ranger"] = hvd.is_initialized()
out["size"] = hvd.size()
out["ranger"] = run(model, ranger)
model = make_model()
ranger_dgc = Ranger(groups(model, 1e-3), lr=0.05, momentum=0.9, density=0.001, momentum_mode="dgc")
out["ranger_dgc"] = run(model, ranger_dgc)
out["ranger_dgc_stats"] = ranger_dgc.stats()
model = make_model()
out["sgd"] = run(model, torch.optim.SGD(groups(model, 1e-3), lr=0.05, momentum=0.9))
model = make_model()
out["sgd_other_wd"] = run(model, torch.optim.SGD(groups(model, 1e-2), lr=0.05, momentum=0.9))
out["ranger_stats"] = ranger.stats()

model = make_model()
comp = RangerCompressor(density=0.01)
wrapped = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                               named_parameters=model.named_parameters(), compression=comp)
out["wrapped_class"] = type(wrapped).__name__
out["wrapped_is_adam"] = isinstance(wrapped, torch.optim.Adam)
out["wrapped"] = run(model, wrapped)
model = make_model()
out["adam"] = run(model, torch.optim.Adam(model.parameters(), lr=1e-3))
out["wrapped_stats"] = comp.stats()
report(0, out)
