"""PyTorch's side of the error-feedback engine: per-tensor state and the tensor primitives.

``core.ErrorFeedback`` runs the step; :class:`TorchOps` supplies what it needs on torch tensors. The
residual buffer is updated in place: it becomes acc, and zeroing what was sent leaves exactly
``e = acc with acc[S] = 0`` without a second full-size tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ranger_hvd import core

from .selection import SelectionScratch, accumulate_topk, random_k_indices

ACCEPTED_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf under ``nonfinite="raise"``; raised before it reached the state."""


@dataclass
class TensorState:
    """What one rank keeps of one tensor between steps (flat, in the gradient's dtype)."""

    residual: torch.Tensor | None = None   # e (m = 0) or v (m > 0)
    velocity: torch.Tensor | None = None   # u, only with momentum
    step: int = 0                          # exchanges done (drives warm-up and random-k seeds)
    sent: tuple | None = None              # (indices, values, u at indices or None): for undo


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf. A sum is one read-only pass and propagates NaN/Inf; only
    if it is not finite (an overflow of large finite values can also cause that) does the exact
    elementwise test run."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def _fit(buffer: torch.Tensor | None, like: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """The state buffer for ``like`` (flat): created as zeros, or moved to its dtype and device."""
    if buffer is None:
        return torch.zeros_like(like)
    if buffer.numel() != like.numel():
        raise ValueError(f"parameter {name!r} changed size from {buffer.numel()} to {like.numel()} "
                         f"entries; its {what} cannot be carried over")
    if buffer.dtype != like.dtype or buffer.device != like.device:
        return buffer.to(device=like.device, dtype=like.dtype)
    return buffer


class TorchOps:
    """The primitives of ``core.TensorOps`` on torch tensors, for one compressor."""

    def __init__(self, options: core.RangerOptions, stats: core.CompressionStats):
        self.options = options
        self.stats = stats
        self.scratch = SelectionScratch()
        self.name = ""  # of the tensor being stepped, for error messages

    def flatten(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.detach().reshape(-1)

    def finite(self, flat: torch.Tensor, name: str, state: TensorState):
        if flat.dtype not in ACCEPTED_GRAD_DTYPES:
            raise TypeError(f"RangerCompressor: gradient of {name!r} has dtype {flat.dtype}; "
                            "expected a floating point tensor")
        if all_finite(flat):
            return flat, True
        if self.options.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or Inf) for parameter {name!r} at step {state.step}; "
                "its residual was left untouched. Use loss scaling (the default nonfinite='skip' "
                "lets the scaler skip such steps), lower the learning rate, or pass "
                "check_finite=False to skip this check.")
        return flat, False

    def select_non_finite(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        order = torch.argsort(torch.isfinite(flat).to(torch.int8), stable=True)
        return order[:k].sort().values

    def remember_sent(self, state: TensorState, indices, values, u) -> None:
        if indices is None:
            state.sent = None
            return
        kept_u = None if u is None else torch.index_select(u.reshape(-1), 0, indices)
        state.sent = (indices, values, kept_u)

    def undo_sent(self, state: TensorState) -> None:
        if state.sent is None:
            return
        indices, values, kept_u = state.sent
        state.residual.index_add_(0, indices, values.to(state.residual.dtype))
        if kept_u is not None:
            state.velocity.index_copy_(0, indices.long(), kept_u)
        state.sent = None

    def clip(self, flat: torch.Tensor, limit: float) -> torch.Tensor:
        norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        return flat * (limit / norm) if norm > limit else flat

    def momentum(self, state: TensorState, g: torch.Tensor, m: float) -> torch.Tensor:
        flat = g.reshape(-1)
        state.velocity = _fit(state.velocity, flat, self.name, "momentum")
        state.velocity.mul_(m).add_(flat)
        return state.velocity.view(g.shape)

    def accumulate(self, state: TensorState, flat: torch.Tensor) -> torch.Tensor:
        state.residual = _fit(state.residual, flat, self.name, "residual")
        return state.residual.add_(flat)

    def accumulate_topk(self, state: TensorState, flat: torch.Tensor, k: int,
                        check_name: str | None):
        # check_name is always None: the add is in place, so the engine checks first (a NaN found
        # mid-pass would already have reached the residual).
        state.residual = _fit(state.residual, flat, self.name, "residual")
        indices = accumulate_topk(state.residual, flat, k, self.options.sample_fraction, self.scratch)
        return state.residual, indices

    def k_at(self, state: TensorState, schedule: list[int]) -> int:
        return schedule[min(state.step, len(schedule) - 1)]

    def random_k(self, numel: int, k: int, base_seed: int, state: TensorState) -> torch.Tensor:
        return random_k_indices(numel, k, base_seed * 2 ** 32 + state.step, device=state.residual.device)

    def gather(self, acc: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # index_select, not acc[indices]: the same values, several times faster on CPU
        return torch.index_select(acc, 0, indices)

    def keep_unsent(self, state, acc, u, indices, values) -> None:
        # index_fill_ wants int64 indices; with the conversion it is still faster than acc[indices] = 0
        positions = indices.long()
        acc.index_fill_(0, positions, 0)          # acc is the residual buffer: what was sent leaves it
        if u is not None:
            u.view(-1).index_fill_(0, positions, 0)   # momentum factor masking

    def advance(self, state: TensorState) -> None:
        state.step += 1

    def count(self, increments: list) -> None:
        self.stats.add(increments)
