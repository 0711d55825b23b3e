"""``Ranger``: a Keras 3 optimizer, momentum SGD whose gradients travel as sparse top-k.

The origin document's example runs with only its import changed::

    from ranger_hvd.tensorflow import Ranger
    optimizer = Ranger(lr=0.001, momentum=0.9)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

and so does ``model.compile(optimizer=Ranger(...)); model.fit(...)``.

With N > 1 ranks, each step (inside ``apply_gradients``) runs the exchange every TensorFlow entry
point shares (``exchange.py``), batched over the step's variables as ranger_hvd's tape batches it:
the error-feedback step of ``core.ErrorFeedback`` for each, every rank's top-k through one grouped
allgather (small and 1-D variables: one grouped allreduce), and every rank scatter-adds all ranks'
pairs and divides by N. Then the update, variable by variable:

* ``momentum_mode="global"`` (default): Keras SGD's momentum rule (and Nesterov) on the averaged
  sparse update, as PowerSGD and EF-SGD apply momentum after aggregation;
* ``momentum_mode="dgc"``: DGC's momentum correction lives in the compressor (u = m*u + g, v = v + u,
  send the top-k of v, zero u and v where sent) and the update is w = w - lr * average;
* ``momentum_mode="local"``: the same without DGC's factor masking (u is never zeroed): v is error
  feedback on each rank's momentum (Zheng et al. 2019).

With one process nothing is exchanged and Ranger steps exactly like ``keras.optimizers.SGD(
learning_rate, momentum, nesterov)`` (the same formula with the same order of operations, so the same
bits) in either mode.

Horovod is initialised on construction if needed, and on the first step (``iterations == 0``) every
variable is first replaced by rank 0's value, so all ranks train the same model even if each built its
own random initialisation. The first step's gradients were computed on each rank's own weights; like
Horovod's broadcast callback (which broadcasts after the first batch) this only affects that step.
For ``model.fit`` use :class:`BroadcastInitialWeights` as well to start exactly from rank 0's weights.

State (residuals, velocities, the byte counters, ``iterations``) lives in optimizer variables, so it is
saved and restored by ``tf.train.Checkpoint(optimizer=opt)`` and by Keras saving. The defaults are
those of ``ranger_hvd.torch.Ranger``: momentum 0.9, density 0.01, global momentum.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ranger_hvd import core

from . import _hvd, exchange
from .slots import OptimizerSlot, not_converted, safe_name, tf_options, variable_name
from .state import TFOps

# momentum_masking follows momentum_mode; the other options pass through
_OPTION_NAMES = (set(core.RangerOptions.model_fields)
                 - {"density", "momentum", "momentum_masking", "min_elements"})


class Ranger(keras.optimizers.Optimizer):
    """Momentum SGD with sparse top-k exchange over Horovod ranks.

    Args:
        learning_rate (or ``lr``, as in the origin document): float, schedule or callable.
        momentum: m in [0, 1).
        density: fraction of each compressed tensor sent per step.
        min_elements: smaller tensors go dense.
        momentum_mode: ``"global"`` (momentum on the averaged update), ``"dgc"`` (DGC momentum
            correction in the compressor) or ``"local"`` (momentum in the compressor, no masking).
        nesterov: Nesterov momentum (``"global"`` only).
        root_rank: whose initial weights every rank adopts on the first step.
        broadcast_initial: set False to skip that broadcast.
        **kwargs: the other ``core.RangerOptions`` (``selection``, ``compress_1d``,
            ``warmup_steps``, ``warmup_start_density``, ``clip_norm``, ``value_dtype``,
            ``check_finite``, ``sample_fraction``, ``seed``) and Keras optimizer arguments
            (``weight_decay``, ``clipnorm``, ``name``, ...).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, learning_rate=None, momentum=0.9, density=0.01, min_elements=1024,
                 momentum_mode="global", nesterov=False, root_rank=0, broadcast_initial=True,
                 lr=None, name=None, **kwargs):
        if lr is not None and learning_rate is not None and lr != learning_rate:
            raise ValueError(f"Ranger: lr={lr!r} and learning_rate={learning_rate!r} disagree; "
                             "give one of them")
        if learning_rate is None:
            learning_rate = 0.01 if lr is None else lr
        placement = core.compressor_momentum(momentum_mode, momentum, kwargs)
        if nesterov and momentum_mode != "global":
            raise ValueError(f"nesterov=True needs momentum_mode='global': momentum in the compressor "
                             f"({momentum_mode!r}) has no Nesterov form")
        ranger_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
        options = tf_options(density=density, min_elements=min_elements, **placement,
                                    **ranger_kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise core.OptionsError(f"invalid Ranger option: momentum must be in [0, 1) (got {momentum!r})")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.options = options
        self.momentum = float(momentum)
        self.momentum_mode = momentum_mode
        self.nesterov = bool(nesterov)
        self.root_rank = int(root_rank)
        self.broadcast_initial = bool(broadcast_initial)
        hvd = _hvd.ensure_init()
        self.world_size = hvd.size()

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        distributed = self.world_size > 1
        names = [variable_name(v) for v in variables]
        compressed = [distributed and core.is_compressed(tuple(v.shape), self.options)
                      for v in variables]
        self.ranger_residuals = [self.add_variable_from_reference(v, "ranger_residual") if c else None
                                 for v, c in zip(variables, compressed)]
        self.ranger_velocities = [self.add_variable_from_reference(v, "ranger_velocity")
                                  if self.momentum > 0 else None for v in variables]
        self.ranger_counters = self.add_variable(shape=(len(core.COUNTERS),), dtype="int64",
                                                 name="ranger_counters")
        self.ranger_received = self.add_variable(shape=(), dtype="int64", name="ranger_received")
        # the global exchange: each compressed variable's N+1 range bounds and N weights
        ranges = self.options.exchange == "global_topk"
        self.ranger_ranges = [
            (self.add_variable(shape=(self.world_size + 1,), dtype="int64",
                               name=f"ranger_gbounds_{i}"),
             self.add_variable(shape=(self.world_size,), dtype="int64", name=f"ranger_gweights_{i}"))
            if c and ranges else (None, None) for i, c in enumerate(compressed)]
        self._ranger_engine = core.ErrorFeedback(
            self.options, TFOps(self.options, self.ranger_counters, self.ranger_received))
        in_compressor = self.momentum_mode != "global"     # the velocity lives in the compressor
        self._ranger_slots = [
            OptimizerSlot(i, names[i], v.shape, v.dtype, compressed[i], self.ranger_residuals[i],
                          self.ranger_velocities[i] if in_compressor else None, self.iterations,
                          *self.ranger_ranges[i])
            for i, v in enumerate(variables)]

    def _sgd(self, variable, g, lr, velocity):
        """keras.optimizers.SGD's rule, operation for operation (so one process matches it exactly)."""
        if velocity is None:
            self.assign_sub(variable, g * lr)
            return
        m = tf.cast(self.momentum, variable.dtype)
        self.assign(velocity, velocity * m - g * lr)
        if self.nesterov:
            self.assign_add(variable, velocity * m - g * lr)
        else:
            self.assign_add(variable, velocity)

    @not_converted
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Keras hands the whole step's gradients here before its per-variable ``update_step``
        loop: with N > 1 ranks they are exchanged here, all at once (``exchange.step``: one
        grouped allreduce, one selection call, one grouped allgather), and ``update_step`` applies
        the averages."""
        if self.world_size > 1:
            indices = [self._get_variable_index(v) for v in trainable_variables]
            slots = [self._ranger_slots[i] for i in indices]
            grads = [tf.cast(g, v.dtype) for g, v in zip(grads, trainable_variables)]
            # the same on every rank: the optimizer's name and the first index and count
            tag = safe_name(f"{self.name}_{indices[0] if indices else 0}_{len(indices)}")
            grads = exchange.step(self._ranger_engine, slots, grads, self.world_size, tag)
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    @not_converted
    def update_step(self, gradient, variable, learning_rate):
        i = self._get_variable_index(variable)
        lr = tf.cast(learning_rate, variable.dtype)
        g = tf.cast(gradient, variable.dtype)
        velocity = self.ranger_velocities[i]
        if self.world_size == 1:
            slot = self._ranger_slots[i]
            strict = self.options.check_finite and self.options.nonfinite == "raise"
            g = self._ranger_engine.ops.ensure_finite(g, slot.tensor_name, slot) if strict else g
            self._sgd(variable, g, lr, velocity)
            return
        if self.broadcast_initial:
            self._adopt_root_value(variable, i)
        # g is already the average over ranks (_backend_update_step)
        if self.momentum_mode != "global":
            self.assign_sub(variable, g * lr)
        else:
            self._sgd(variable, g, lr, velocity)

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
            return {**core.stats_dict([0] * len(core.COUNTERS), 0), "bytes_received": 0}
        out = core.stats_dict(keras.ops.convert_to_numpy(self.ranger_counters),
                              int(keras.ops.convert_to_numpy(self.iterations)))
        out["bytes_received"] = int(keras.ops.convert_to_numpy(self.ranger_received))
        return out

    def get_config(self):
        config = super().get_config()
        opts = self.options.model_dump()
        opts.pop("momentum")
        opts.pop("momentum_masking")     # follows momentum_mode
        config.update({"momentum": self.momentum, "density": opts.pop("density"),
                       "min_elements": opts.pop("min_elements"), "root_rank": self.root_rank,
                       "broadcast_initial": self.broadcast_initial,
                       "momentum_mode": self.momentum_mode, "nesterov": self.nesterov, **opts})
        return config


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras 3's dynamic loss scaling for an optimizer that exchanges inside ``apply`` (``Ranger``).

    Keras's own skips the inner optimizer on a rank whose local gradients hold NaN or Inf, while
    the other ranks call it and wait in its collectives forever. Here the verdict is every rank's
    (one scalar allreduce per step): if any rank overflowed, every rank skips the step and lowers
    its scale, and no rank's compressor state is touched. Use it in place of Keras's, e.g.
    ``model.compile(optimizer=LossScaleOptimizer(Ranger(...)))`` under ``mixed_float16`` (Keras
    then does not wrap the optimizer again).
    """

    @not_converted
    def check_finite(self, grads):
        local = super().check_finite(grads)
        hvd = _hvd.ensure_init()
        if hvd.size() == 1:
            return local
        overflowed = hvd.allreduce(tf.cast(tf.logical_not(local), tf.float32), op=hvd.Sum,
                                   name=safe_name(f"RangerLossScale_{self.name}"),
                                   ignore_name_scope=True)
        return tf.equal(overflowed, 0.0)
