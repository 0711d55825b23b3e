"""One process (horovodrun -np 1): Ranger is exactly SGD(momentum), DistributedOptimizer is exactly
the wrapped optimizer, and nothing is exchanged."""

from __future__ import annotations

import warnings

from common import digest, max_diff, params_of

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
    return params_of(model)


out = {}
# Ranger initialises Horovod itself.
warnings.simplefilter("error")  # no warning either
model = make_model()
ranger = Ranger(groups(model, 1e-3), lr=0.05, momentum=0.9, density=0.001)
out["initialised_by_ranger"] = hvd.is_initialized()
out["size"] = hvd.size()
ranger_params = run(model, ranger)
model = make_model()
ranger_dgc = Ranger(groups(model, 1e-3), lr=0.05, momentum=0.9, density=0.001, momentum_mode="dgc")
dgc_params = run(model, ranger_dgc)
out["ranger_dgc_stats"] = ranger_dgc.stats()
model = make_model()
local_params = run(model, Ranger(groups(model, 1e-3), lr=0.05, momentum=0.9, density=0.001,
                                 momentum_mode="local"))
out["ranger_local"] = digest(local_params)
refused = {}
for label, kwargs in {"mode": dict(momentum_mode="bogus"), "masking": dict(momentum_masking=False)}.items():
    try:
        Ranger(make_model().parameters(), lr=0.1, **kwargs)
        refused[label] = None
    except ValueError as exc:
        refused[label] = str(exc)
out["refused"] = refused
model = make_model()
sgd_params = run(model, torch.optim.SGD(groups(model, 1e-3), lr=0.05, momentum=0.9))
model = make_model()
other_wd_params = run(model, torch.optim.SGD(groups(model, 1e-2), lr=0.05, momentum=0.9))
out["ranger"], out["ranger_dgc"], out["sgd"] = digest(ranger_params), digest(dgc_params), digest(sgd_params)
out["ranger_vs_sgd_maxdiff"] = max_diff(ranger_params, sgd_params)
out["ranger_dgc_vs_sgd_maxdiff"] = max_diff(dgc_params, sgd_params)
out["ranger_vs_sgd_other_wd_maxdiff"] = max_diff(ranger_params, other_wd_params)
out["ranger_stats"] = ranger.stats()

model = make_model()
comp = RangerCompressor(density=0.01)
wrapped = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                               named_parameters=model.named_parameters(), compression=comp)
out["wrapped_class"] = type(wrapped).__name__
out["wrapped_is_adam"] = isinstance(wrapped, torch.optim.Adam)
wrapped_params = run(model, wrapped)
model = make_model()
adam_params = run(model, torch.optim.Adam(model.parameters(), lr=1e-3))
out["wrapped"], out["adam"] = digest(wrapped_params), digest(adam_params)
out["wrapped_vs_adam_maxdiff"] = max_diff(wrapped_params, adam_params)
out["wrapped_stats"] = comp.stats()
report(0, out)
