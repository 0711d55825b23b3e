"""The error-feedback step, written once for every backend and every entry point.

Horovod's ``compression=`` hook, ranger_hvd's drop-in optimizer and tape, and the ``Ranger``
optimizers all hand each gradient to :meth:`ErrorFeedback.sparse_step` (compressed tensors) or
:meth:`ErrorFeedback.dense_step` (tensors that travel whole). One rank, one tensor, one step::

    g   = grad, checked for NaN/Inf                     (check_finite; see "Non-finite" below)
    g   = g * min(1, c / ||g||),  c = clip_norm/sqrt(N)  (clip_norm, DGC local clipping)
    m = 0:  acc = e + g                                  error feedback: add back what was not sent
    m > 0:  u = m*u + g ;  acc = v + u                   DGC momentum correction
    S   = top-k of |acc| (or k shared random coordinates), k from the warm-up schedule
    send  (S, acc[S])
    e   = acc with acc[S] = 0    (m > 0: v = acc, v[S] = 0 and u[S] = 0: momentum factor masking,
                                  unless momentum_masking is off: then u runs on unmasked)
    count the bytes handed to the collectives

``core/reference.py`` is the same rule in NumPy; the backends are tested against it.

**Non-finite gradients** (``nonfinite="skip"``, the default). Under mixed precision an Inf is routine:
the loss scaler must see it in the averaged gradient to skip the step and lower its scale, and the
compressor's state must come through unharmed. So a rank whose gradient holds NaN/Inf leaves that
tensor's residual and momentum untouched and sends k entries of the raw gradient, its non-finite
entries first (``reference.select_non_finite``): the average is then non-finite on every rank. Every
rank sees the same gathered pairs, so every rank knows the step is void and calls :meth:`undo` on
each tensor of that step: what it sent goes back where it came from (e[S] += sent, u[S] = u before the
masking), so nothing sent in a skipped step is lost. ``nonfinite="raise"`` fails fast instead.

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
    def finite(self, flat, name: str, state) -> tuple[Any, Any]:
        """(``flat``, whether it holds no NaN or Inf). Under ``nonfinite="raise"`` a non-finite
        ``flat`` is an error naming ``name`` instead."""
    def clip(self, flat, limit: float) -> Any:
        """``flat * min(1, limit / ||flat||)``, the norm taken in float64."""
    def momentum(self, state, flat, m: float) -> Any:
        """u = m*u + g, stored in the state; returns u."""
    def accumulate(self, state, flat) -> Any:
        """acc = e + flat (e: the residual, or v with momentum). acc may share e's buffer."""
    def accumulate_topk(self, state, flat, k, check_name: str | None) -> tuple[Any, Any]:
        """(acc, the ascending indices of the k largest |acc|, ties to the lower index) with acc
        from ``accumulate``: one call, so that a backend can fuse the add with the selection's pass
        over memory. With ``check_name`` (only for a backend whose ``checks_in_selection`` is true)
        it first does what ``finite`` does (a fused pass may check while it reads, if a failure
        leaves the state untouched)."""
    def accumulate_topk_many(self, states: list, flats: list, ks: list,
                             check_names: list) -> list[tuple[Any, Any]]:
        """Optional: ``accumulate_topk`` of several tensors, in order, in one call, so that a backend
        can run all of their selections at once. Without it the engine calls ``accumulate_topk``
        for each."""
    def k_at(self, state, schedule: list[int]) -> Any:
        """k at the state's current step (an int, or a scalar tensor under warm-up)."""
    def random_k(self, numel: int, k, base_seed: int, state) -> Any:
        """k distinct ascending indices drawn from (base_seed, the state's step)."""
    def gather(self, acc, indices) -> Any: ...
    def select_non_finite(self, flat, k) -> Any:
        """``reference.select_non_finite``: k ascending indices, the non-finite entries first."""
    def remember_sent(self, state, indices, values, u) -> None:
        """Keeps what :meth:`ErrorFeedback.undo` needs (indices, values, and u[indices] before
        masking when ``u`` is given); ``indices=None`` forgets it (nothing of this step to undo)."""
    def undo_sent(self, state) -> None:
        """e[S] += the remembered values (and u[S] = its remembered values), then forgets them."""
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
        limit = clip_threshold(o, world_size)
        # A backend that checks while its fused selection reads g (it must then leave the state
        # untouched on a failure) gets the check there; others check first, in a pass of their own.
        check_in_selection = (o.check_finite and getattr(ops, "checks_in_selection", False)
                              and limit is None and o.momentum == 0 and o.selection == "topk")
        live, sources, velocities, ks, out = [], [], [], [], []
        counts = [0] * len(COUNTERS)
        for j, (state, grad, name, shape) in enumerate(zip(states, grads, names, shapes)):
            g = ops.flatten(grad)
            k = ops.k_at(state, self.schedule(numel_of(shape)))
            ok = True
            if o.check_finite and not check_in_selection:
                g, ok = ops.finite(g, name, state)
            out.append(None)
            counts = [a + b for a, b in zip(counts, self._sparse_record(shape, k, token))]
            if ok is False:
                # Void step: the state stays as it was, the raw non-finite entries go out so
                # that every rank's average shows them to the loss scaler.
                indices = ops.select_non_finite(g, k)
                ops.remember_sent(state, None, None, None)
                ops.advance(state)
                out[j] = (indices, ops.gather(g, indices), k)
                continue
            if limit is not None:
                g = ops.clip(g, limit)
            u = None
            if o.momentum > 0:
                u = g = ops.momentum(state, g, o.momentum)
            live.append(j)
            sources.append(g)
            velocities.append(u)
            ks.append(k)
        live_states = [states[j] for j in live]
        if o.selection == "topk":
            checks = [names[j] if check_in_selection else None for j in live]
            many = getattr(ops, "accumulate_topk_many", None)
            selected = (many(live_states, sources, ks, checks) if many is not None and len(live) > 1
                        else [ops.accumulate_topk(*args)
                              for args in zip(live_states, sources, ks, checks)])
        else:
            selected = []
            for state, g, k, j in zip(live_states, sources, ks, live):
                acc = ops.accumulate(state, g)
                selected.append((acc, ops.random_k(numel_of(shapes[j]), k,
                                                   random_k_seed(o.seed, names[j]), state)))
        for j, state, (acc, indices), u, k in zip(live, live_states, selected, velocities, ks):
            values = ops.gather(acc, indices)
            masked = u if o.momentum_masking else None
            ops.remember_sent(state, indices, values, masked)
            ops.keep_unsent(state, acc, masked, indices, values)
            ops.advance(state)
            out[j] = (indices, values, k)
        if out:
            ops.count(counts)
        return out

    def _sparse_record(self, shape, k, token: bool) -> list:
        o = self.options
        return sparse_counts(numel_of(shape), k, o.value_dtype, with_indices=o.selection == "topk",
                             with_token=token and o.selection == "topk")

    def undo(self, state) -> None:
        """Takes back this rank's last sparse step of a tensor after the exchange showed the step
        void (a non-finite average, which a loss scaler skips): the values it sent go back into its
        residual, and u's masked entries are restored, so the state is what it would have been had
        the step sent nothing. A tensor whose own gradient was non-finite has nothing to undo; a
        second call does nothing."""
        self.ops.undo_sent(state)

    def dense_step(self, state, grad, name: str, wire_itemsize: int):
        """A tensor that travels whole: the gradient, or with momentum its local u = m*u + g.

        Everything is sent, so there is no residual and nothing to mask; summed over ranks, the local
        momentum is ordinary momentum on the averaged gradient. A non-finite g is sent as it is and
        leaves u alone.
        """
        o, ops = self.options, self.ops
        out, ok = grad, True
        if o.check_finite:
            out, ok = ops.finite(out, name, state)
        if o.momentum > 0 and ok is not False:  # a non-finite g must not reach u
            out = ops.momentum(state, out, o.momentum)
        ops.advance(state)
        ops.count(dense_counts(numel_of(grad.shape), wire_itemsize))
        return out
