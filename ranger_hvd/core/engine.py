"""The error-feedback step, written once for every backend and every entry point.

Horovod's ``compression=`` hook, ranger_hvd's drop-in optimizer and tape, and the ``Ranger``
optimizers all hand each gradient to :meth:`ErrorFeedback.sparse_step` (compressed tensors) or
:meth:`ErrorFeedback.dense_step` (tensors that travel whole). One rank, one tensor, one step::

    g   = grad, checked for NaN/Inf                     (check_finite)
    g   = g * min(1, c / ||g||),  c = clip_norm/sqrt(N)  (clip_norm, DGC local clipping)
    m = 0:  acc = e + g                                  error feedback: add back what was not sent
    m > 0:  u = m*u + g ;  acc = v + u                   DGC momentum correction
    S   = top-k of |acc| (or k shared random coordinates), k from the warm-up schedule
    send  (S, acc[S])
    e   = acc with acc[S] = 0    (m > 0: v = acc, v[S] = 0 and u[S] = 0: momentum factor masking,
                                  unless momentum_masking is off: then u runs on unmasked)
    count the bytes handed to the collectives

``core/reference.py`` is the same rule in NumPy; the backends are tested against it.

A backend supplies :class:`TensorOps`: a handful of tensor primitives that work on its tensors and on
its state objects (PyTorch keeps Python-side tensors and an int step; TensorFlow keeps variables and a
step variable, so the same code runs eagerly and inside a traced function). The engine never looks
inside a tensor, so it is indifferent to eager or graph execution.
"""

from __future__ import annotations

from typing import Any, Protocol

from .options import RangerOptions
from .rules import (COUNTERS, clip_threshold, dense_counts, k_schedule, numel_of, random_k_seed,
                    sparse_counts)


class TensorOps(Protocol):
    """The primitives a backend provides. ``state`` is the backend's per-tensor state object."""

    def flatten(self, grad) -> Any: ...
    def ensure_finite(self, flat, name: str, state) -> Any:
        """``flat`` unchanged, or an error naming ``name`` if it holds NaN or Inf."""
    def clip(self, flat, limit: float) -> Any:
        """``flat * min(1, limit / ||flat||)``, the norm taken in float64."""
    def momentum(self, state, flat, m: float) -> Any:
        """u = m*u + g, stored in the state; returns u."""
    def accumulate(self, state, flat) -> Any:
        """acc = e + flat (e: the residual, or v with momentum). acc may share e's buffer."""
    def accumulate_topk(self, state, flat, k, check_name: str | None) -> tuple[Any, Any]:
        """(acc, ``topk(acc, k)``) with acc from ``accumulate``: one call, so that a backend can
        fuse the add with the selection's pass over memory. With ``check_name`` it first does what
        ``ensure_finite`` does (a fused pass may check while it reads, if a failure leaves the
        state untouched)."""
    def accumulate_topk_many(self, states: list, flats: list, ks: list,
                             check_names: list) -> list[tuple[Any, Any]]:
        """Optional: ``accumulate_topk`` of several tensors, in order, in one call, so that a backend
        can run all of their selections at once. Without it the engine calls ``accumulate_topk``
        for each."""
    def k_at(self, state, schedule: list[int]) -> Any:
        """k at the state's current step (an int, or a scalar tensor under warm-up)."""
    def topk(self, acc, k) -> Any:
        """Ascending int32 indices of the k largest |acc|, ties to the lower index."""
    def random_k(self, numel: int, k, base_seed: int, state) -> Any:
        """k distinct ascending indices drawn from (base_seed, the state's step)."""
    def gather(self, acc, indices) -> Any: ...
    def keep_unsent(self, state, acc, u, indices, values) -> None:
        """e (or v) = acc with acc[indices] = 0; unless ``u`` is None (no momentum, or no masking)
        also u[indices] = 0 (after ``values``)."""
    def advance(self, state) -> None:
        """The state's step += 1."""
    def count(self, increments: list) -> None:
        """Adds one record (in ``core.COUNTERS`` order) to this rank's byte counters."""


class ErrorFeedback:
    """Residuals, momentum, selection and byte accounting of one compressor, for any backend."""

    def __init__(self, options: RangerOptions, ops: TensorOps):
        self.options = options
        self.ops = ops
        self._schedules: dict[int, list[int]] = {}

    def schedule(self, numel: int) -> list[int]:
        """k at steps 0..warmup_steps of a tensor of ``numel`` entries (cached per size)."""
        table = self._schedules.get(numel)
        if table is None:
            table = self._schedules[numel] = k_schedule(numel, self.options)
        return table

    def sparse_step(self, state, grad, name: str, shape, world_size: int, token: bool = True):
        """One step of a compressed tensor on this rank: returns (indices, values, k).

        ``values`` are acc[indices] in the gradient's dtype; the caller casts them for the wire.
        ``token``: whether the exchange also hands Horovod a 1-element token for this tensor (Horovod's
        ``compression=`` hook does; a batched exchange does not), which the byte counters include.
        """
        return self.sparse_steps([state], [grad], [name], [shape], world_size, token)[0]

    def sparse_steps(self, states, grads, names, shapes, world_size: int, token: bool = True):
        """:meth:`sparse_step` of several tensors, each with its own state: the same math tensor by
        tensor, with the top-k selections of all of them in one backend call
        (``accumulate_topk_many``), which a backend may run as one. Returns a list of
        (indices, values, k); the byte counters get one record for all of them."""
        o, ops = self.options, self.ops
        # Where g reaches the selection unchanged, its finiteness check moves into that call, which
        # a backend may fuse with its pass over memory (a separate check is one more pass).
        limit = clip_threshold(o, world_size)
        check_in_selection = (o.check_finite and limit is None and o.momentum == 0
                              and o.selection == "topk")
        sources, velocities, ks = [], [], []
        for state, grad, name, shape in zip(states, grads, names, shapes):
            g = ops.flatten(grad)
            if o.check_finite and not check_in_selection:
                g = ops.ensure_finite(g, name, state)
            if limit is not None:
                g = ops.clip(g, limit)
            u = None
            if o.momentum > 0:
                u = g = ops.momentum(state, g, o.momentum)
            sources.append(g)
            velocities.append(u)
            ks.append(ops.k_at(state, self.schedule(numel_of(shape))))
        if o.selection == "topk":
            checks = [name if check_in_selection else None for name in names]
            many = getattr(ops, "accumulate_topk_many", None)
            selected = (many(states, sources, ks, checks) if many is not None and len(states) > 1 else
                        [ops.accumulate_topk(*args) for args in zip(states, sources, ks, checks)])
        else:
            selected = []
            for state, g, k, name, shape in zip(states, sources, ks, names, shapes):
                acc = ops.accumulate(state, g)
                selected.append((acc, ops.random_k(numel_of(shape), k, random_k_seed(o.seed, name),
                                                   state)))
        out, counts = [], [0] * len(COUNTERS)
        for state, (acc, indices), u, k, shape in zip(states, selected, velocities, ks, shapes):
            values = ops.gather(acc, indices)
            ops.keep_unsent(state, acc, u if o.momentum_masking else None, indices, values)
            ops.advance(state)
            record = sparse_counts(numel_of(shape), k, o.value_dtype,
                                   with_indices=o.selection == "topk",
                                   with_token=token and o.selection == "topk")
            counts = [a + b for a, b in zip(counts, record)]
            out.append((indices, values, k))
        if out:
            ops.count(counts)
        return out

    def dense_step(self, state, grad, name: str, wire_itemsize: int):
        """A tensor that travels whole: the gradient, or with momentum its local u = m*u + g.

        Everything is sent, so there is no residual and nothing to mask; summed over ranks, the local
        momentum is ordinary momentum on the averaged gradient.
        """
        o, ops = self.options, self.ops
        out = grad
        if o.check_finite:
            out = ops.ensure_finite(out, name, state)
        if o.momentum > 0:
            out = ops.momentum(state, out, o.momentum)
        ops.advance(state)
        ops.count(dense_counts(numel_of(grad.shape), wire_itemsize))
        return out
