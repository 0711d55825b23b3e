"""op=hvd.Adasum with the compressor (MPI: Horovod's Gloo build has no Adasum): a clear refusal."""

from __future__ import annotations

import common  # noqa: F401 - puts the repository on sys.path

import torch
import horovod.torch as hvd

from ranger_hvd.torch import RangerCompressor
from tests.hvdrun import report

hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(40, 40)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters(), op=hvd.Adasum,
                               compression=RangerCompressor(density=1.0, min_elements=10))
try:
    model(torch.randn(4, 40)).sum().backward()
    opt.step()
except ValueError as exc:
    report(hvd.rank(), {"error": str(exc)})
else:
    report(hvd.rank(), {"error": None})
