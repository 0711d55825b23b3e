"""Making every rank start from the same weights, for Keras 3 variables.

Horovod's ``broadcast_variables`` and ``BroadcastGlobalVariablesCallback`` fail on Keras 3 variables
(they rely on ``.ref()`` and on tf-keras internals). These call Horovod's broadcast op on each
variable's value and assign the result, which works for tf.Variables and Keras 3 variables alike.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from . import _hvd
from .slots import safe_name


def broadcast_variables(variables, root_rank: int = 0, prefix: str = "ranger_bcast") -> None:
    """Sets every variable to its value on ``root_rank``; a no-op with one process.

    All ranks must pass the same variables in the same order (the i-th broadcast is named
    ``{prefix}_{i}`` on every rank). The broadcasts run as one traced function so Horovod can fuse them.
    """
    hvd = _hvd.ensure_init()
    variables = list(variables)
    if hvd.size() == 1 or not variables:
        return
    names = [safe_name(f"{prefix}_{i}") for i in range(len(variables))]

    @tf.function
    def adopt():
        for v, name in zip(variables, names):
            v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank, name=name,
                                   ignore_name_scope=True))

    adopt()


class BroadcastInitialWeights(keras.callbacks.Callback):
    """``model.fit(..., callbacks=[BroadcastInitialWeights()])``: rank ``root_rank``'s weights (and
    optimizer state, if the optimizer is built) everywhere before the first batch."""

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank
        self.done = False

    def on_train_begin(self, logs=None):
        if self.done:
            return
        variables = list(self.model.weights)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "built", False):
            variables += list(optimizer.variables)
        broadcast_variables(variables, self.root_rank, prefix="ranger_initial")
        self.done = True
