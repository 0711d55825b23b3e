"""TensorFlow's side of the error-feedback engine: per-tensor state and the tensor primitives.

``core.ErrorFeedback`` runs the step; :class:`TFOps` supplies it on TF tensors and variables. Every
primitive is plain TF ops on variables, so the step runs eagerly or inside a traced function alike.
State lives in variables: a :class:`Slot` of the compressor (flat ``tf.Variable``s and a step
counter), or the Keras ``Ranger``'s optimizer variables (shaped like the model variable, stepped by
the optimizer's ``iterations``).
"""

from __future__ import annotations

import re

import tensorflow as tf

from ranger_hvd import core

from . import cpu_path
from .selection import random_k_indices, seed_pair, topk_indices


def safe_name(name: str) -> str:
    """A name Horovod and TensorFlow accept for an op: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def variable_key(variable):
    """A hashable identity of a tf.Variable or a Keras 3 variable (keyed by its tf.Variable)."""
    if isinstance(variable, tf.Variable):
        return variable.ref()
    inner = getattr(variable, "value", None)  # Keras 3: the backing tf.Variable
    if isinstance(inner, tf.Variable):
        return inner.ref()
    raise TypeError(f"expected a tf.Variable or a Keras variable, got {type(variable).__name__}")


def variable_name(variable) -> str:
    """Keras 3 paths are unique within a model ("dense/kernel"); tf.Variable names may repeat."""
    return str(getattr(variable, "path", None) or variable.name).split(":")[0]


class Slot(tf.Module):
    """State of one tensor: residual e (or v), velocity u (with momentum) and a step counter."""

    own_step = True  # the compressor advances it; the Keras optimizer's slots use its iterations

    def __init__(self, index: int, name: str, shape, dtype, compressed: bool, momentum: float):
        super().__init__(name=f"slot{index}")
        self.index = index
        self.tensor_name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = tf.as_dtype(dtype)
        self.numel = core.numel_of(self.shape)
        self.compressed = compressed
        with tf.init_scope():  # created once, eagerly, even when first met inside a trace
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.residual = (tf.Variable(tf.zeros([self.numel], self.dtype), trainable=False,
                                         name="residual") if compressed else None)
            self.velocity = (tf.Variable(tf.zeros([self.numel], self.dtype), trainable=False,
                                         name="velocity") if momentum > 0 else None)


class OptimizerSlot:
    """The Keras ``Ranger``'s state of one variable: its optimizer variables and ``iterations``."""

    own_step = False

    def __init__(self, index: int, name: str, shape, dtype, compressed: bool, residual, velocity,
                 iterations):
        self.index, self.tensor_name, self.compressed = index, name, compressed
        self.shape = tuple(int(s) for s in shape)
        self.dtype = tf.as_dtype(dtype)
        self.numel = core.numel_of(self.shape)
        self.residual, self.velocity, self.step = residual, velocity, iterations


def _backing(variable):
    """The tf.Variable behind a tf.Variable or a Keras 3 variable (None if there is none)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    return inner if isinstance(inner, tf.Variable) else None


def _read_flat(variable) -> tf.Tensor:
    return tf.reshape(tf.convert_to_tensor(variable), [-1])


def _assign_flat(variable, flat: tf.Tensor):
    target = _backing(variable)
    target = variable if target is None else target
    return target.assign(tf.reshape(flat, target.shape))


def _zero_at(fresh: tf.Tensor, idx: tf.Tensor, after) -> tf.Tensor:
    """``fresh`` with ``fresh[idx] = 0``, written into its own buffer (no full-size copy).

    ``InplaceUpdate`` mutates its input, so ``fresh`` must be a buffer of this step that nothing else
    holds: u (a fresh product), or acc (a fresh sum, or the residual's own buffer, which its
    assign_add made exclusive or which a read in copy-on-read mode copied). It runs only once
    everything that reads ``fresh`` (``after``: the selection and the gathered values) is done.
    """
    with tf.control_dependencies(after):
        return tf.raw_ops.InplaceUpdate(x=fresh, i=idx, v=tf.zeros(tf.shape(idx), fresh.dtype))


def _non_finite_message(name: str) -> str:
    return (f"ranger_hvd: non-finite gradient for variable '{name}' (NaN or Inf); it would poison "
            f"the error-feedback residual")


class TFOps:
    """The primitives of ``core.TensorOps`` on TF tensors; bytes go to an int64 counter variable."""

    checks_in_selection = True  # the compiled pass counts NaN/Inf while it reads g

    def __init__(self, options: core.RangerOptions, counters):
        self.options = options
        self.counters = counters  # int64 [len(core.COUNTERS)]

    def finite(self, g: tf.Tensor, name: str, state):
        # TensorFlow still fails fast on a non-finite gradient (nonfinite="skip" is PyTorch-only
        # so far): the step never sees a non-finite g.
        return self.ensure_finite(g, name, state), True

    def remember_sent(self, state, indices, values, u) -> None:
        pass  # nothing to undo while TensorFlow fails fast

    def undo_sent(self, state) -> None:
        pass

    def flatten(self, grad) -> tf.Tensor:
        return tf.reshape(tf.convert_to_tensor(grad), [-1])

    def ensure_finite(self, g: tf.Tensor, name: str, state) -> tf.Tensor:
        # A sum is one streaming read and propagates NaN/Inf, several times cheaper than
        # check_numerics; only when it is not finite (an overflow of large finite values can also
        # cause that) does the exact elementwise check run and raise.
        return tf.cond(tf.math.is_finite(tf.reduce_sum(g)), lambda: tf.identity(g),
                       lambda: tf.debugging.check_numerics(g, _non_finite_message(name)))

    def clip(self, g: tf.Tensor, limit: float) -> tf.Tensor:
        norm = tf.norm(tf.cast(g, tf.float64))
        factor = tf.cast(limit / tf.maximum(norm, limit), g.dtype)
        return tf.where(norm > limit, g * factor, g)

    def momentum(self, state, g: tf.Tensor, m: float) -> tf.Tensor:
        # the velocity may be stored flat (compressor slots) or shaped (optimizer slots)
        u = tf.cast(m, g.dtype) * tf.reshape(tf.convert_to_tensor(state.velocity), tf.shape(g)) + g
        _assign_flat(state.velocity, tf.reshape(u, [-1]))
        return u

    def accumulate(self, state, flat: tf.Tensor) -> tf.Tensor:
        """acc = e + flat, formed in the residual's own buffer when a tf.Variable backs it (an
        in-place assign_add, then a read that aliases it); ``keep_unsent`` assigns the final value."""
        tfv = _backing(state.residual)
        if tfv is None:
            return _read_flat(state.residual) + flat
        tfv.assign_add(tf.reshape(flat, tfv.shape))
        return tf.reshape(tf.convert_to_tensor(tfv), [-1])

    def k_at(self, state, schedule: list[int]):
        if len(set(schedule)) == 1:
            return schedule[0]
        index = tf.minimum(tf.cast(state.step, tf.int32), len(schedule) - 1)
        return tf.gather(tf.constant(schedule, tf.int32), index)

    def topk(self, acc: tf.Tensor, k) -> tf.Tensor:
        return topk_indices(acc, k, self.options.sample_fraction)

    def _compiled(self, state, flat: tf.Tensor, k) -> bool:
        """Whether this tensor's step takes the compiled CPU pass (``cpu_path``)."""
        dtype = tf.as_dtype(state.residual.dtype)
        return flat.dtype == dtype and cpu_path.usable(dtype, int(flat.shape[0]), k,
                                                       self.options.sample_fraction)

    def accumulate_topk(self, state, flat: tf.Tensor, k, check_name: str | None):
        """On CPU, for large float tensors, one compiled pass (``cpu_path``) whose ``acc`` is a
        ``cpu_path.Selected``: the new residual and the sent values, with the finiteness check
        counted in the same pass; else TF ops on acc."""
        # Read the residual only on this path: a read held across the fallback's assign_add would
        # make that in-place add copy the whole buffer first.
        if self._compiled(state, flat, k):
            return cpu_path.accumulate_topk(
                _read_flat(state.residual), flat, k, self.options.sample_fraction,
                None if check_name is None else _non_finite_message(check_name))
        if check_name is not None:
            flat = self.ensure_finite(flat, check_name, state)
        acc = self.accumulate(state, flat)
        return acc, self.topk(acc, k)

    def accumulate_topk_many(self, states, flats, ks, check_names):
        """``accumulate_topk`` of several tensors: those that take the compiled CPU pass all in one
        call into Python (``cpu_path.accumulate_topk_many``), the others one by one."""
        out = [None] * len(states)
        batch = []
        for j, (state, flat, k) in enumerate(zip(states, flats, ks)):
            if self._compiled(state, flat, k):
                batch.append(j)
            else:
                out[j] = self.accumulate_topk(state, flat, k, check_names[j])
        if batch:
            selected = cpu_path.accumulate_topk_many(
                [_read_flat(states[j].residual) for j in batch], [flats[j] for j in batch],
                [ks[j] for j in batch], self.options.sample_fraction,
                [None if check_names[j] is None else _non_finite_message(check_names[j])
                 for j in batch])
            for j, result in zip(batch, selected):
                out[j] = result
        return out

    def random_k(self, numel: int, k, base_seed: int, state) -> tf.Tensor:
        return random_k_indices(numel, k, seed_pair(base_seed, state.step))

    def gather(self, acc, indices: tf.Tensor) -> tf.Tensor:
        if isinstance(acc, cpu_path.Selected):
            return acc.values
        return tf.gather(acc, indices)

    def keep_unsent(self, state, acc, u, indices, values) -> None:
        if isinstance(acc, cpu_path.Selected):  # already zeroed where sent
            _assign_flat(state.residual, acc.residual)
        else:
            _assign_flat(state.residual, _zero_at(acc, indices, [values]))
        if u is not None:
            _assign_flat(state.velocity, _zero_at(u, indices, [values]))

    def advance(self, state) -> None:
        if state.own_step:
            state.step.assign_add(1)

    def count(self, increments: list) -> None:
        self.counters.assign_add(tf.stack([tf.cast(x, tf.int64) for x in increments]))


def new_counters(name: str = "counters") -> tf.Variable:
    with tf.init_scope():
        return tf.Variable(tf.zeros([len(core.COUNTERS)], tf.int64), trainable=False, name=name)
