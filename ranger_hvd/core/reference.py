"""The compressor's math, written once in NumPy: the executable specification both backends must match.

One rank, one tensor, one step (all arrays flattened):

    g  <- g * min(1, c / ||g||)            local clipping, c = clip_norm / sqrt(N)      (optional)
    m = 0:  acc = e + g                    error feedback: add back what was not sent
    m > 0:  u = m*u + g ;  acc = v + u     DGC momentum correction (v plays the residual's part)
    S   = top_k(|acc|)                     k = max(1, ceil(d*n)); ties go to the lower index
    send  (S ascending, acc[S])
    e = acc with acc[S] = 0                (m > 0: v = acc, then u[S] = 0 and v[S] = 0: factor masking;
                                            without masking u runs on and v is error feedback on it)

Invariant (m = 0): sum of everything sent + e == sum of every g, exactly up to float rounding; nothing is
lost, only delayed.  After the exchange every rank adds all ranks' (indices, values) into one zero
tensor (a scatter-add) and divides by N for an average.

Non-finite gradients (``check_finite``, ``nonfinite="skip"``): a step whose g holds NaN or Inf changes
no state; it sends ``select_non_finite(g, k)`` and g there, so the average shows the NaN/Inf to a loss
scaler. A step that the exchange shows void (some rank sent a non-finite value) is undone on every
rank that stepped normally: e[S] += values sent, and u[S] = u[S] before the masking (``undo``).

The backends implement ``select`` faster (a sampled threshold, then an exact top-k among candidates)
but must return exactly the set this function returns; their tests compare against it.
"""

from __future__ import annotations

import numpy as np

from .options import RangerOptions
from .rules import clip_threshold, density_at, num_selected


def select(acc: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |acc|, ties broken toward the lower index, returned ascending."""
    flat = np.asarray(acc).reshape(-1)
    order = np.lexsort((np.arange(flat.size), -np.abs(flat.astype(np.float64))))
    return np.sort(order[:k]).astype(np.int64)


def select_non_finite(g: np.ndarray, k: int) -> np.ndarray:
    """k indices, ascending: the non-finite entries of g first (lowest index first), then the lowest
    finite ones to make up k."""
    flat = np.asarray(g).reshape(-1)
    order = np.argsort(np.isfinite(flat), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


class NonFiniteGradient(FloatingPointError):
    """The reference's ``nonfinite="raise"``."""


class ReferenceCompressor:
    """Error-feedback state of one tensor on one rank, stepping exactly as documented above."""

    def __init__(self, numel: int, options: RangerOptions, world_size: int = 1, dtype=np.float32):
        self.options = options
        self.world_size = world_size
        self.residual = np.zeros(numel, dtype=dtype)   # e, or v with momentum
        self.velocity = np.zeros(numel, dtype=dtype)   # u, only used with momentum
        self.step_count = 0
        self.sent = None                               # what undo() takes back

    def step(self, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(grad, dtype=self.residual.dtype).reshape(-1).copy()
        self.sent = None
        if self.options.check_finite and not np.isfinite(g).all():
            if self.options.nonfinite == "raise":
                raise NonFiniteGradient("non-finite gradient")
            k = num_selected(g.size, density_at(self.step_count, self.options))
            idx = select_non_finite(g, k)
            self.step_count += 1
            return idx, g[idx]
        limit = clip_threshold(self.options, self.world_size)
        if limit is not None:
            norm = float(np.linalg.norm(g.astype(np.float64)))
            if norm > limit:
                g *= self.residual.dtype.type(limit / norm)
        m = self.options.momentum
        if m > 0:
            self.velocity = self.residual.dtype.type(m) * self.velocity + g
            acc = self.residual + self.velocity
        else:
            acc = self.residual + g
        k = num_selected(acc.size, density_at(self.step_count, self.options))
        idx = select(acc, k)
        values = acc[idx].copy()
        acc[idx] = 0
        self.residual = acc
        masked = m > 0 and self.options.momentum_masking
        self.sent = (idx, values, self.velocity[idx].copy() if masked else None)
        if masked:
            self.velocity[idx] = 0
        self.step_count += 1
        return idx, values

    def undo(self) -> None:
        """Takes back the last step's send (the exchange showed the step void): e[S] += values,
        u[S] restored; the step count stays (every rank must keep choosing the same k)."""
        if self.sent is None:
            return
        idx, values, u_sent = self.sent
        self.residual[idx] += values
        if u_sent is not None:
            self.velocity[idx] = u_sent
        self.sent = None


def combine(payloads: list[tuple[np.ndarray, np.ndarray]], numel: int, average: bool = True,
            dtype=np.float32) -> np.ndarray:
    """What every rank reconstructs from all ranks' (indices, values): a scatter-add, then / N."""
    out = np.zeros(numel, dtype=dtype)
    for idx, values in payloads:
        np.add.at(out, idx, values.astype(dtype))
    if average:
        out /= len(payloads)
    return out
