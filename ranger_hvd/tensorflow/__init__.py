"""ranger_hvd for TensorFlow: sparse top-k compression with error feedback on Horovod.

* :class:`RangerCompressor` - the compressor; hand it to our tape or to Horovod's own
  ``horovod.tensorflow.DistributedGradientTape(compression=...)`` / tf-keras ``DistributedOptimizer``.
  Either way each rank's top-k pairs travel through an allgather started inside ``compress`` (and
  Horovod's allreduce carries a 1-element token); ``selection="random"`` sends shared random
  coordinates through the allreduce instead.
* :class:`DistributedGradientTape` - Horovod's tape API, the same exchange batched per step (one
  allgather, one allreduce); works with Keras 3 variables.
* :class:`Ranger` - a Keras 3 optimizer (momentum SGD, DGC momentum correction) with the sparse exchange
  inside ``apply_gradients``; usable in ``model.compile``. :class:`LossScaleOptimizer` wraps it for
  ``mixed_float16`` (every rank skips an overflowed step alike).
* :func:`broadcast_variables`, :class:`BroadcastInitialWeights` - rank 0's weights everywhere, for
  Keras 3 variables.

``Ranger`` and the Keras callback import Keras 3 on first access, so Horovod-only code (tf-keras under
``TF_USE_LEGACY_KERAS=1``) does not pay for it.
"""

from .compressor import RangerCompressor, SharedCompressorError
from .tape import DistributedGradientTape

__all__ = ["RangerCompressor", "DistributedGradientTape", "Ranger", "LossScaleOptimizer",
           "BroadcastInitialWeights", "broadcast_variables", "SharedCompressorError"]


def __getattr__(name):
    if name in ("Ranger", "LossScaleOptimizer"):
        from . import optimizer

        return getattr(optimizer, name)
    if name in ("BroadcastInitialWeights", "broadcast_variables"):
        from . import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'ranger_hvd.tensorflow' has no attribute {name!r}")
