"""A small classification problem (scikit-learn's digits, an MLP) trained dense and at density 0.01.

Each rank trains on its own shard with SGD (lr 0.1 decaying linearly to 0, momentum 0.9, weight decay
5e-4, batches of 64); the final loss is measured on the whole training set. Everything is seeded and
single-threaded, so the numbers are the same from run to run.
"""

from __future__ import annotations

import sys
import time

from common import digest, prefixed

import torch
import horovod.torch as hvd
from sklearn.datasets import load_digits

from ranger_hvd.torch import DistributedOptimizer, Ranger, RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
DENSITY = 0.01

digits = load_digits()
X_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y_all = torch.tensor(digits.target, dtype=torch.int64)
X, Y = X_all[RANK::SIZE], Y_all[RANK::SIZE]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def full_loss(model) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(X_all), Y_all))


def train(mode: str):
    model = make_model()
    named = prefixed(model, f"conv_{mode}")
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    comp = None
    if mode == "dense":
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), **sgd),
                                       named_parameters=named)
    elif mode == "a":
        comp = RangerCompressor(density=DENSITY, min_elements=1024)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), **sgd),
                                   named_parameters=named, compression=comp)
    elif mode == "b":
        # Existing Horovod code with one argument changed: real top-k by default.
        comp = RangerCompressor(density=DENSITY, min_elements=1024)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), **sgd),
                                       named_parameters=named, compression=comp)
    elif mode == "r":
        # Shared random-k. Momentum in the compressor: with random-k, momentum in the optimizer on
        # top of error feedback diverges at this learning rate.
        comp = RangerCompressor(density=DENSITY, momentum=0.9, min_elements=1024, selection="random")
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4),
                                       named_parameters=named, compression=comp)
    else:
        opt = Ranger(model.parameters(), density=DENSITY, min_elements=1024, named_parameters=named,
                     momentum_mode={"c": "global", "d": "dgc", "l": "local"}[mode], **sgd)
        comp = opt.compressor
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / STEPS)
    gen = torch.Generator().manual_seed(RANK)
    start = time.perf_counter()
    for _ in range(STEPS):
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    result = {"loss": full_loss(model), "seconds": time.perf_counter() - start,
              "params": digest(model.parameters())}
    if comp is not None:
        result["stats"] = comp.stats()
    return result


out = {"rank": RANK, "initial_loss": full_loss(make_model())}
for mode in ("dense", "a", "b", "c", "d", "l", "r"):
    out[mode] = train(mode)
report(RANK, out)
