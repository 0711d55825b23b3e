"""TensorFlow's side of the error-feedback engine: the tensor primitives.

``core.ErrorFeedback`` runs the step; :class:`TFOps` supplies it on TF tensors and variables. Every
primitive is plain TF ops on variables, so the step runs eagerly or inside a traced function alike.
State lives in variables: a ``slots.Slot`` of the compressor (flat ``tf.Variable``s and a step
counter), or a ``slots.OptimizerSlot`` of the Keras ``Ranger`` (its optimizer variables, shaped like
the model variable, stepped by the optimizer's ``iterations``).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ranger_hvd import core

from . import cpu_path
from .selection import random_k_indices, seed_pair, topk_indices
from .slots import backing


def _read_flat(variable) -> tf.Tensor:
    return tf.reshape(tf.convert_to_tensor(variable), [-1])


def _assign_flat(variable, flat: tf.Tensor):
    target = backing(variable)
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


def _label(state, name: str) -> str:
    """The variable's name as its user knows it (a slot keyed by position may only know 'tensorN')."""
    return getattr(state, "label", None) or name


def all_finite(x: tf.Tensor) -> tf.Tensor:
    """Whether ``x`` holds no NaN or Inf (a scalar bool). A sum is one streaming read and
    propagates NaN/Inf; only when it is not finite (an overflow of large finite values can also
    cause that) does the exact elementwise test run."""
    return tf.cond(tf.math.is_finite(tf.reduce_sum(x)), lambda: tf.constant(True),
                   lambda: tf.reduce_all(tf.math.is_finite(x)))


def _plain(x):
    """The tensor of a possibly :class:`Flagged` one."""
    return x.tensor if isinstance(x, Flagged) else x


def _symbolic(x) -> bool:
    return isinstance(x, tf.Tensor) and not hasattr(x, "numpy")


def when(ok, fn) -> None:
    """Runs the state update ``fn`` only if ``ok``: None (nothing to decide), a Python or eager
    bool (decided now), or a bool tensor of a traced step (a ``tf.cond``)."""
    if ok is None:
        fn()
    elif not _symbolic(ok):
        if bool(ok):
            fn()
    else:
        tf.cond(ok, lambda: (fn(), tf.constant(True))[1], lambda: tf.constant(False))


@dataclass
class Flagged:
    """A gradient of a traced step that may be void: ``ok`` (a bool tensor) says whether it holds
    no NaN or Inf. ``TFOps.finite`` hands it to the engine in place of the gradient, so that every
    primitive that writes state does so only when ``ok`` (``core.engine`` decides in Python, which
    a traced step cannot: eagerly ``finite`` answers in Python instead)."""

    tensor: tf.Tensor
    ok: tf.Tensor


@dataclass
class Sent:
    """What a sparse step sent, kept for ``undo_sent`` within the same step (same graph)."""

    indices: tf.Tensor
    values: tf.Tensor
    u: tf.Tensor | None   # u at the indices before the masking (None: nothing masked)
    ok: object = None     # whether the step was live (None or True: yes), set by keep_unsent


def _scatter(variable, indices: tf.Tensor, values: tf.Tensor, add: bool) -> None:
    """variable[indices] += values (or = values), on its flat view. A flat tf.Variable takes one
    scatter op, which needs no ordering against anything but its inputs (v1 graph mode has no
    automatic control dependencies)."""
    target = backing(variable)
    target = variable if target is None else target
    values = tf.cast(values, target.dtype)
    if isinstance(target, tf.Variable) and target.shape.rank == 1:
        update = tf.IndexedSlices(values, indices)
        (target.scatter_add if add else target.scatter_update)(update)
        return
    flat = _read_flat(target)
    op = tf.tensor_scatter_nd_add if add else tf.tensor_scatter_nd_update
    _assign_flat(target, op(flat, tf.reshape(indices, [-1, 1]), values))


def select_non_finite(flat: tf.Tensor, k) -> tf.Tensor:
    """``core.reference.select_non_finite``: k ascending int32 indices, the non-finite entries
    first (lowest index first), then the lowest finite ones."""
    order = tf.argsort(tf.cast(tf.math.is_finite(flat), tf.int32), stable=True)
    return tf.sort(tf.cast(order[:k], tf.int32))


class TFOps:
    """The primitives of ``core.TensorOps`` on TF tensors; bytes go to an int64 counter variable.

    Non-finite gradients (``nonfinite="skip"``): eagerly ``finite`` answers in Python and the
    engine takes its void path. In a traced step it hands on a :class:`Flagged` gradient instead,
    and each primitive that writes state writes only where the flag says the gradient is finite
    (``tf.cond``), while the selection falls back to ``select_non_finite`` and the raw values: the
    engine's void path, decided at run time. The compiled CPU pass decides it within its own call.
    """

    checks_in_selection = True  # the compiled pass counts NaN/Inf while it reads g (and voids)

    def __init__(self, options: core.RangerOptions, counters, received=None):
        self.options = options
        self.counters = counters  # int64 [len(core.COUNTERS)]
        self.received = received  # int64 scalar: bytes the collectives brought from other ranks
        self._sent: dict[int, Sent] = {}  # id(state) -> what its last sparse step sent
        self.skip = options.check_finite and options.nonfinite == "skip"
        # the global exchange gives back what its owners did not keep: it needs what was sent
        self.keep_sent = self.skip or options.exchange == "global_topk"

    def finite(self, g: tf.Tensor, name: str, state):
        if not self.skip:
            return self.ensure_finite(g, name, state), True
        if not state.compressed and self.options.momentum == 0:
            return g, True  # no state to protect: sent as it is, non-finite or not
        ok = all_finite(g)
        if not _symbolic(ok):
            return g, bool(ok)
        return Flagged(g, ok), True

    def select_non_finite(self, flat, k) -> tf.Tensor:
        return select_non_finite(_plain(flat), k)

    def remember_sent(self, state, indices, values, u) -> None:
        if not self.keep_sent or indices is None:
            self._sent.pop(id(state), None)
            return
        kept = None if u is None else tf.gather(_plain(u), indices)
        self._sent[id(state)] = Sent(indices, values, kept)

    def undo_sent(self, state) -> None:
        sent = self._sent.pop(id(state), None)
        if sent is None:
            return

        def undo():
            _scatter(state.residual, sent.indices, sent.values, add=True)
            if sent.u is not None:
                _scatter(state.velocity, sent.indices, sent.u, add=False)

        when(sent.ok, undo)

    def forget_sent(self, state) -> None:
        """Drops what ``remember_sent`` kept (the exchange found the step live)."""
        self._sent.pop(id(state), None)

    def take_sent(self, state):
        """What ``remember_sent`` kept, as a tuple of tensors (or None), forgotten here: to carry
        it out of a ``tf.function`` (``put_sent`` keeps it again)."""
        sent = self._sent.pop(id(state), None)
        return None if sent is None else (sent.indices, sent.values, sent.u, sent.ok)

    def put_sent(self, state, taken) -> None:
        if taken is not None:
            self._sent[id(state)] = Sent(*taken)

    def flatten(self, grad) -> tf.Tensor:
        return tf.reshape(tf.convert_to_tensor(grad), [-1])

    def ensure_finite(self, g: tf.Tensor, name: str, state) -> tf.Tensor:
        # A sum is one streaming read and propagates NaN/Inf, several times cheaper than
        # check_numerics; only when it is not finite (an overflow of large finite values can also
        # cause that) does the exact elementwise check run and raise.
        message = _non_finite_message(_label(state, name))
        return tf.cond(tf.math.is_finite(tf.reduce_sum(g)), lambda: tf.identity(g),
                       lambda: tf.debugging.check_numerics(g, message))

    def clip(self, g, limit: float):
        if isinstance(g, Flagged):  # a void step sends the raw gradient
            return Flagged(tf.cond(g.ok, lambda: self.clip(g.tensor, limit),
                                   lambda: tf.identity(g.tensor)), g.ok)
        norm = tf.norm(tf.cast(g, tf.float64))
        factor = tf.cast(limit / tf.maximum(norm, limit), g.dtype)
        return tf.where(norm > limit, g * factor, g)

    def momentum(self, state, g, m: float):
        if isinstance(g, Flagged):  # a void step leaves u alone and sends the raw gradient
            out = tf.cond(g.ok, lambda: self.momentum(state, g.tensor, m),
                          lambda: tf.identity(g.tensor))
            # a dense tensor sends what this returns: a tensor; a sparse one goes on flagged
            return Flagged(out, g.ok) if state.compressed else out
        # the velocity may be stored flat (compressor slots) or shaped (optimizer slots)
        u = tf.cast(m, g.dtype) * tf.reshape(tf.convert_to_tensor(state.velocity), tf.shape(g)) + g
        _assign_flat(state.velocity, tf.reshape(u, [-1]))
        return u

    def accumulate(self, state, flat):
        """acc = e + flat, formed in the residual's own buffer when a tf.Variable backs it (an
        in-place assign_add, then a read that aliases it); ``keep_unsent`` assigns the final value.
        A void step's acc is the raw gradient, and the residual is left alone."""
        if isinstance(flat, Flagged):
            return Flagged(tf.cond(flat.ok, lambda: self.accumulate(state, flat.tensor),
                                   lambda: tf.identity(flat.tensor)), flat.ok)
        tfv = backing(state.residual)
        if tfv is None:
            return _read_flat(state.residual) + flat
        tfv.assign_add(tf.reshape(flat, tfv.shape))
        return tf.reshape(tf.convert_to_tensor(tfv), [-1])

    def k_at(self, state, schedule: list[int]):
        if len(set(schedule)) == 1:
            return schedule[0]
        index = tf.minimum(tf.cast(state.step, tf.int32), len(schedule) - 1)
        return tf.gather(tf.constant(schedule, tf.int32), index)

    def _compiled(self, state, flat, k) -> bool:
        """Whether this tensor's step takes the compiled CPU pass (``cpu_path``)."""
        dtype = tf.as_dtype(state.residual.dtype)
        flat = _plain(flat)
        return flat.dtype == dtype and cpu_path.usable(dtype, int(flat.shape[0]), k,
                                                       self.options.sample_fraction)

    def _check_of(self, state, check_name: str | None):
        """What the compiled pass does on a NaN/Inf: raise this message, void the step ("skip",
        ``cpu_path.VOID``), or nothing (no check asked)."""
        if check_name is None:
            return None
        return cpu_path.VOID if self.skip else _non_finite_message(_label(state, check_name))

    def accumulate_topk(self, state, flat, k, check_name: str | None):
        """On CPU, for large float tensors, one compiled pass (``cpu_path``) whose ``acc`` is a
        ``cpu_path.Selected``: the new residual and the sent values, with the finiteness check
        counted in the same pass; else TF ops on acc."""
        return self.accumulate_topk_many([state], [flat], [k], [check_name])[0]

    def _accumulate_topk_ops(self, state, flat, k, check_name: str | None):
        """``accumulate_topk`` with TF ops: acc (Flagged when the step may be void) and indices."""
        if check_name is not None:
            flat, ok = self.finite(flat, check_name, state)
            if ok is False:  # eagerly void: what the engine's void path does
                return Flagged(flat, tf.constant(False)), self.select_non_finite(flat, k)
        if isinstance(flat, Flagged):
            g = flat.tensor
            acc, idx = tf.cond(flat.ok, lambda: self._accumulate_topk_ops(state, g, k, None),
                               lambda: (tf.identity(g), select_non_finite(g, k)))
            return Flagged(acc, flat.ok), idx
        acc = self.accumulate(state, flat)
        return acc, topk_indices(acc, k, self.options.sample_fraction)

    def accumulate_topk_many(self, states, flats, ks, check_names):
        """``accumulate_topk`` of several tensors: those that take the compiled CPU pass all in one
        call into Python (``cpu_path.accumulate_topk_many``), the others one by one."""
        out = [None] * len(states)
        batch = []
        for j, (state, flat, k) in enumerate(zip(states, flats, ks)):
            if self._compiled(state, flat, k):
                batch.append(j)
            else:
                out[j] = self._accumulate_topk_ops(state, flat, k, check_names[j])
        if batch:
            # Read the residuals only on this path: a read held across the other path's
            # assign_add would make that in-place add copy the whole buffer first.
            selected = cpu_path.accumulate_topk_many(
                [_read_flat(states[j].residual) for j in batch],
                [_plain(flats[j]) for j in batch], [ks[j] for j in batch],
                self.options.sample_fraction,
                [self._check_of(states[j], check_names[j]) for j in batch],
                [flats[j].ok if isinstance(flats[j], Flagged) else None for j in batch])
            for j, result in zip(batch, selected):
                out[j] = result
        return out

    def random_k(self, numel: int, k, base_seed: int, state) -> tf.Tensor:
        return random_k_indices(numel, k, seed_pair(base_seed, state.step))

    def gather(self, acc, indices: tf.Tensor) -> tf.Tensor:
        if isinstance(acc, cpu_path.Selected):
            return acc.values
        if isinstance(acc, Flagged):
            # a void step sends the non-finite entries first (top-k's indices are already those;
            # shared random coordinates are not, so its values are taken from there)
            g = acc.tensor
            return tf.cond(acc.ok, lambda: tf.gather(g, indices),
                           lambda: tf.gather(g, select_non_finite(g, tf.size(indices))))
        return tf.gather(acc, indices)

    def keep_unsent(self, state, acc, u, indices, values) -> None:
        sent = self._sent.get(id(state))
        after = [values] + ([sent.u] if sent is not None and sent.u is not None else [])
        ok = acc.ok if isinstance(acc, (cpu_path.Selected, Flagged)) else None
        if sent is not None:
            sent.ok = ok
        if isinstance(acc, cpu_path.Selected):  # already zeroed where sent (void: e itself)
            _assign_flat(state.residual, acc.residual)
        else:
            when(ok, lambda: _assign_flat(state.residual, _zero_at(_plain(acc), indices, after)))
        if u is not None:
            when(ok, lambda: _assign_flat(state.velocity, _zero_at(_plain(u), indices, after)))

    def advance(self, state) -> None:
        if state.own_step:
            state.step.assign_add(1)

    def count(self, increments: list) -> None:
        self.counters.assign_add(tf.stack([tf.cast(x, tf.int64) for x in increments]))

    def count_received(self, nbytes):
        """Adds ``nbytes`` (what a collective brought from other ranks) to ``bytes_received``;
        returns the update (None without a counter), for a ``tf.compat.v1`` graph to depend on."""
        if self.received is None:
            return None
        return self.received.assign_add(tf.cast(nbytes, tf.int64))
