"""Checks Horovod's collectives on real ranks with PyTorch: allreduce, and allgather of unequal lengths."""
import horovod.torch as hvd
import torch

from tests.hvdrun import report

hvd.init()
rank, size = hvd.rank(), hvd.size()
summed = hvd.allreduce(torch.arange(6, dtype=torch.float32) * (rank + 1), op=hvd.Sum, name="sum")
averaged = hvd.allreduce(torch.full((3,), float(rank)), op=hvd.Average, name="avg")
# rank r contributes r + 1 rows holding the value r: first dimensions differ across ranks
gathered = hvd.allgather(torch.full((rank + 1, 2), rank, dtype=torch.int32), name="gather")
report(rank, {
    "size": size,
    "sum": summed.tolist(),
    "avg": averaged.tolist(),
    "gather": gathered.tolist(),
    "mpi": hvd.mpi_enabled(),
    "gloo": hvd.gloo_enabled(),
})
