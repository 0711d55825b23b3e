"""Mixed use across ranks: ``nan`` poisons one rank's gradient at step 1 (with ``nonfinite="raise"``
the job must end, naming the parameter); ``missing`` leaves one layer without a gradient on rank 1 (Horovod submits zeros for it,
and the ranks must still agree)."""

from __future__ import annotations

import sys

from common import digest

import torch
import horovod.torch as hvd

from ranger_hvd.torch import RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK = hvd.rank()
SCENARIO = sys.argv[1]

torch.manual_seed(0)
trunk, head = torch.nn.Linear(64, 32), torch.nn.Linear(32, 32)
params = list(trunk.named_parameters(prefix="trunk")) + list(head.named_parameters(prefix="head"))
# "nan" checks the fail-fast mode; the default (a void step for a loss scaler) is in compat tests
comp = RangerCompressor(density=0.1, min_elements=100,
                        nonfinite="raise" if SCENARIO == "nan" else "skip")
opt = hvd.DistributedOptimizer(torch.optim.SGD([p for _, p in params], lr=0.1),
                               named_parameters=params, compression=comp)
for step in range(4):
    g = torch.Generator().manual_seed(100 * RANK + step)
    x = torch.randn(4, 64, generator=g)
    if SCENARIO == "nan" and step == 1 and RANK == 1:
        x[0, 0] = float("nan")
    h = trunk(x)
    # rank 1 skips the head on odd steps: its head has no gradient there
    out = h if SCENARIO == "missing" and RANK == 1 and step % 2 else head(h)
    out.square().sum().backward()
    opt.step()
    opt.zero_grad()
report(RANK, {"params": digest(p for _, p in params), "stats": comp.stats()})
