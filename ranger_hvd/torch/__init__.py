"""PyTorch backend of ranger_hvd.

* :class:`RangerCompressor` - sparse top-k compression with error feedback; pass it as
  ``compression=`` to Horovod's own ``hvd.DistributedOptimizer`` (real per-rank top-k through an
  allgather it starts itself), or to :func:`DistributedOptimizer`.
* :func:`DistributedOptimizer` - Horovod's optimizer, plus the compressor's state in ``state_dict()``.
* :func:`Ranger` - momentum SGD with the sparse exchange built in, in one line.
* ``ranger_hvd.torch.ddp`` - the same exchange as a ``DistributedDataParallel`` communication hook
  (``RangerHookState``, ``ranger_hook``), without Horovod.

The compressor and the selection functions import without Horovod; the two optimizers load
``horovod.torch`` on first use.
"""

from .compressor import RangerCompressor
from .selection import random_k_indices, topk_indices
from .state import NonFiniteGradientError

__all__ = ["RangerCompressor", "DistributedOptimizer", "Ranger", "NonFiniteGradientError",
           "topk_indices", "random_k_indices"]


def __getattr__(name):
    if name in ("DistributedOptimizer", "Ranger"):
        from . import optimizer
        return getattr(optimizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
