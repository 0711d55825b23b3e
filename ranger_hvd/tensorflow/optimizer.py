"""``Ranger``: a Keras 3 optimizer, momentum SGD whose gradients travel as sparse top-k.

The origin document's example runs with only its import changed::

    from ranger_hvd.tensorflow import Ranger
    optimizer = Ranger(lr=0.001, momentum=0.9)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

and so does ``model.compile(optimizer=Ranger(...)); model.fit(...)``.

With N > 1 ranks, each step of each variable (inside ``apply_gradients``):

* compressed variables (``core.is_compressed``): DGC momentum correction with factor masking,
  u = m*u + g, v = v + u, send the top-k of v, zero u and v where sent (m = 0: error feedback,
  acc = e + g); values and indices travel in one allgather, every rank scatter-adds them and
  divides by N; then  w = w - lr * (that average);
* small and 1-D variables: local momentum u = m*u + g, allreduce-average of u, w = w - lr * average,
  which is ordinary momentum SGD on the averaged gradient.

The momentum therefore lives in the compressor's state (optimizer variables ``*_ranger_residual`` and
``*_ranger_velocity``), not in a separate SGD momentum. With one process nothing is exchanged and
Ranger steps exactly like ``keras.optimizers.SGD(learning_rate, momentum)`` (the same formula with the
same order of operations, so the same bits): m = m*momentum - lr*g, w = w + m.

Horovod is initialised on construction if needed, and on the first step (``iterations == 0``) every
variable is first replaced by rank 0's value, so all ranks train the same model even if each built its
own random initialisation. The first step's gradients were computed on each rank's own weights; like
Horovod's broadcast callback (which broadcasts after the first batch) this only affects that step.
For ``model.fit`` use :class:`BroadcastInitialWeights` as well to start exactly from rank 0's weights.

State (residuals, velocities, the byte counters, ``iterations``) lives in optimizer variables, so it is
saved and restored by ``tf.train.Checkpoint(optimizer=opt)`` and by Keras saving.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ranger_hvd import core

from . import _hvd
from .compressor import (_COUNTERS, checked, count_dense, count_sparse, dense_exchange, dense_step,
                         safe_name, sparse_exchange, stats_dict, topk_step, variable_name)
from .selection import k_for_step

_OPTION_NAMES = set(core.RangerOptions.model_fields) - {"density", "momentum", "min_elements"}


class Ranger(keras.optimizers.Optimizer):
    """Momentum SGD with sparse top-k exchange over Horovod ranks.

    Args:
        learning_rate (or ``lr``, as in the origin document): float, schedule or callable.
        momentum: m in [0, 1); lives in the compressor (DGC momentum correction) when N > 1.
        density: fraction of each compressed tensor sent per step (default 0.01).
        min_elements: smaller tensors go dense (default 1024).
        root_rank: whose initial weights every rank adopts on the first step.
        broadcast_initial: set False to skip that broadcast.
        **kwargs: the other ``core.RangerOptions`` (``compress_1d``, ``warmup_steps``,
            ``warmup_start_density``, ``clip_norm``, ``value_dtype``, ``check_finite``,
            ``sample_fraction``, ``seed``) and Keras optimizer arguments (``weight_decay``,
            ``clipnorm``, ``name``, ...).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, learning_rate=None, momentum=0.0, density=0.01, min_elements=1024,
                 root_rank=0, broadcast_initial=True, lr=None, name=None, **kwargs):
        if lr is not None and learning_rate is not None and lr != learning_rate:
            raise ValueError(f"Ranger: lr={lr!r} and learning_rate={learning_rate!r} disagree; "
                             "give one of them")
        if learning_rate is None:
            learning_rate = 0.01 if lr is None else lr
        ranger_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
        options = core.make_options(density=density, momentum=momentum,
                                    min_elements=min_elements, **ranger_kwargs)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.options = options
        self.momentum = float(momentum)
        self.root_rank = int(root_rank)
        self.broadcast_initial = bool(broadcast_initial)
        hvd = _hvd.ensure_init()
        self.world_size = hvd.size()

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        distributed = self.world_size > 1
        self._ranger_names = [variable_name(v) for v in variables]
        self._ranger_compressed = [distributed and core.is_compressed(tuple(v.shape), self.options)
                                   for v in variables]
        self.ranger_residuals = [self.add_variable_from_reference(v, "ranger_residual") if c else None
                                 for v, c in zip(variables, self._ranger_compressed)]
        self.ranger_velocities = [self.add_variable_from_reference(v, "ranger_velocity")
                                  if self.momentum > 0 else None for v in variables]
        self.ranger_counters = self.add_variable(shape=(len(_COUNTERS),), dtype="int64",
                                                 name="ranger_counters")

    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        lr = tf.cast(learning_rate, variable.dtype)
        g = tf.cast(gradient, variable.dtype)
        velocity = self.ranger_velocities[i]
        if self.world_size == 1:
            # keras.optimizers.SGD's rule, operation for operation, so one process matches it exactly.
            g = checked(g, self._ranger_names[i], self.options)
            if velocity is None:
                self.assign_sub(variable, g * lr)
            else:
                self.assign(velocity, velocity * tf.cast(self.momentum, variable.dtype) - g * lr)
                self.assign_add(variable, velocity)
            return
        if self.broadcast_initial:
            self._adopt_root_value(variable, i)
        name = safe_name(f"{self.name}_{i}")
        vname = self._ranger_names[i]
        numel = core.numel_of(variable.shape)
        if self._ranger_compressed[i]:
            k = k_for_step(numel, self.options, self.iterations)
            idx, values = topk_step(g, self.ranger_residuals[i], velocity, k, self.options,
                                    self.world_size, vname)
            count_sparse(self.ranger_counters, numel, tf.size(idx), self.options.value_dtype)
            average = sparse_exchange(idx, values, numel, variable.dtype, f"RangerAllgather_{name}",
                                      average=True, world_size=self.world_size,
                                      value_dtype=self.options.value_dtype)
            average = tf.reshape(average, variable.shape)
        else:
            sent = dense_step(g, velocity, self.options, vname)
            count_dense(self.ranger_counters, numel, sent.dtype.size)
            average = dense_exchange(sent, f"RangerAllreduce_{name}", average=True)
        self.assign_sub(variable, average * lr)

    def _adopt_root_value(self, variable, i):
        """On the first step, replace the variable by the root rank's value (one broadcast)."""
        hvd = _hvd.module()
        first = tf.equal(tf.convert_to_tensor(self.iterations), 0)
        name = safe_name(f"RangerBroadcast_{self.name}_{i}")

        def adopt():
            variable.assign(hvd.broadcast(tf.convert_to_tensor(variable), self.root_rank,
                                          name=name, ignore_name_scope=True))
            return tf.constant(True)

        if tf.executing_eagerly():
            if bool(first):
                adopt()
        else:
            tf.cond(first, adopt, lambda: tf.constant(False))

    def stats(self) -> dict:
        """Cumulative bytes this rank handed to collectives, and what plain fp32 would have sent."""
        if not self.built:
            return stats_dict([0] * len(_COUNTERS), 0)
        return stats_dict(keras.ops.convert_to_numpy(self.ranger_counters),
                          int(keras.ops.convert_to_numpy(self.iterations)))

    def get_config(self):
        config = super().get_config()
        opts = self.options.model_dump()
        config.update({"momentum": opts.pop("momentum"), "density": opts.pop("density"),
                       "min_elements": opts.pop("min_elements"), "root_rank": self.root_rank,
                       "broadcast_initial": self.broadcast_initial, **opts})
        return config
