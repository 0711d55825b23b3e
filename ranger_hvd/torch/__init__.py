"""PyTorch backend of ranger_hvd.

* :class:`RangerCompressor` - sparse compression with error feedback; pass it as ``compression=`` to
  :func:`DistributedOptimizer` (per-rank top-k over an allgather) or to Horovod's own
  ``hvd.DistributedOptimizer`` (shared random-k inside Horovod's allreduce).
* :func:`DistributedOptimizer` - drop-in for ``horovod.torch.DistributedOptimizer``.
* :class:`Ranger` - momentum SGD with DGC momentum correction and the sparse exchange built in.

The compressor and the selection functions import without Horovod; the two optimizers load
``horovod.torch`` on first use.
"""

from .compressor import NonFiniteGradientError, RangerCompressor
from .selection import random_k_indices, topk_indices

__all__ = ["RangerCompressor", "DistributedOptimizer", "Ranger", "NonFiniteGradientError",
           "topk_indices", "random_k_indices"]


def __getattr__(name):
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name == "Ranger":
        from .ranger import Ranger
        return Ranger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
