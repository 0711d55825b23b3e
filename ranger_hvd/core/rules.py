"""The rules every backend follows: which tensors are compressed, how many entries they send, the
warm-up schedule, local clipping, the shared random-k seed, and what a step costs in bytes.

Everything here is plain Python on shapes and numbers, so PyTorch, TensorFlow (at trace time) and the
tests compute exactly the same k, the same schedule and the same byte counts.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from .options import INDEX_ITEMSIZE, VALUE_ITEMSIZE, RangerOptions


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def num_selected(numel: int, density: float) -> int:
    """k = max(1, ceil(density * numel)), capped at numel.

    The product is taken on the decimal the user wrote (``Fraction(repr(density))``), so 0.07 * 100 is
    7, not the 8 that float rounding (7.000000000000001) would give.
    """
    if numel <= 0:
        raise ValueError(f"cannot select from an empty tensor (numel={numel})")
    exact = Fraction(repr(float(density))) * numel
    return min(numel, max(1, math.ceil(exact)))


def is_compressed(shape: Sequence[int], options: RangerOptions) -> bool:
    """Small tensors, and 1-D ones unless ``compress_1d``, are sent dense."""
    if numel_of(shape) < options.min_elements:
        return False
    return len(shape) > 1 or options.compress_1d


def density_at(step: int, options: RangerOptions) -> float:
    """Density used at 0-based ``step``: DGC's exponential warm-up, then ``options.density``.

    d(t) = d0 * (d / d0) ** (t / T) for t < T (geometric interpolation from d0 = warmup_start_density
    down to d over T = warmup_steps steps), and d afterwards.
    """
    total = options.warmup_steps
    if total <= 0 or step >= total:
        return options.density
    start, end = options.warmup_start_density, options.density
    return start * (end / start) ** (max(step, 0) / total)


def clip_threshold(options: RangerOptions, world_size: int) -> float | None:
    """Per-worker L2 bound on a gradient: clip_norm / sqrt(N), so the N-worker sum stays within clip_norm."""
    if options.clip_norm is None:
        return None
    return options.clip_norm / math.sqrt(max(1, world_size))


def random_k_seed(seed: int, name: str, step: int) -> int:
    """A 63-bit seed that every rank derives alike from (seed, parameter name, step), with no message.

    Python's hash() is salted per process, so a cryptographic digest of the three is used instead.
    """
    digest = hashlib.blake2b(f"{seed}\0{name}\0{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sparse_bytes(k: int, value_dtype: str, with_indices: bool = True) -> int:
    """Bytes one rank hands to the collective for k selected entries: values, plus int32 indices."""
    return k * (VALUE_ITEMSIZE[value_dtype] + (INDEX_ITEMSIZE if with_indices else 0))


def dense_fp32_bytes(numel: int) -> int:
    """What a plain fp32 allreduce of the same tensor would hand over: the baseline of every ratio."""
    return 4 * numel


@dataclass
class CompressionStats:
    """Cumulative byte accounting of one rank, counted from the tensors handed to collectives."""

    bytes_sent: int = 0
    bytes_dense: int = 0
    tensors_sparse: int = 0
    tensors_dense: int = 0
    elements_selected: int = 0
    elements_total: int = 0
    steps: int = 0
    _last_step_bytes: int = field(default=0, repr=False)

    def record_sparse(self, numel: int, k: int, value_dtype: str, with_indices: bool = True) -> None:
        sent = sparse_bytes(k, value_dtype, with_indices)
        self.bytes_sent += sent
        self.bytes_dense += dense_fp32_bytes(numel)
        self.tensors_sparse += 1
        self.elements_selected += k
        self.elements_total += numel
        self._last_step_bytes += sent

    def record_dense(self, numel: int, itemsize: int) -> None:
        sent = numel * itemsize
        self.bytes_sent += sent
        self.bytes_dense += dense_fp32_bytes(numel)
        self.tensors_dense += 1
        self.elements_selected += numel
        self.elements_total += numel
        self._last_step_bytes += sent

    def end_step(self) -> int:
        """Closes a step; returns the bytes sent during it."""
        self.steps += 1
        sent, self._last_step_bytes = self._last_step_bytes, 0
        return sent

    def as_dict(self) -> dict:
        ratio = self.bytes_dense / self.bytes_sent if self.bytes_sent else None
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_dense": self.bytes_dense,
            "compression_ratio": ratio,
            "tensors_sparse": self.tensors_sparse,
            "tensors_dense": self.tensors_dense,
            "elements_selected": self.elements_selected,
            "elements_total": self.elements_total,
            "steps": self.steps,
        }

    def load(self, state: dict) -> None:
        for key in ("bytes_sent", "bytes_dense", "tensors_sparse", "tensors_dense",
                    "elements_selected", "elements_total", "steps"):
            setattr(self, key, int(state.get(key, 0)))
