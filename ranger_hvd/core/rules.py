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


def random_k_seed(seed: int, name: str) -> int:
    """The 31-bit base of a tensor's random-k stream, derived alike on every rank with no message.

    The coordinates of step t are drawn from the pair (base, t): PyTorch seeds a generator with
    ``base * 2**32 + t``, TensorFlow's stateless generators take ``[base, t]``. Python's hash() is salted
    per process, so a cryptographic digest of (seed, name) is used instead.
    """
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# Selection by a sampled threshold (DGC section 3.1), the same constants in every backend.
SAMPLING_MIN_NUMEL = 1 << 14
"""Below this size one exact selection is cheaper than sampling and its bookkeeping."""
SAMPLE_TRIES = ((1.0, 3.0, 4), (2.0, 8.0, 32))
"""The estimate aims at sample rank a*r + b*sqrt(r) + c, with r the expected rank of the true threshold
in the sample: three standard deviations of the count above r, so that one pass nearly always yields k
candidates while the candidate set stays close to k; the second try casts a much wider net."""


def sample_stride(sample_fraction: float) -> int:
    """Every stride-th entry is sampled."""
    return max(1, int(round(1.0 / sample_fraction)))


def sample_rank(attempt: tuple[float, float, int], k: int, m: int, n: int) -> int:
    """Rank in a sample of m (out of n) magnitudes at which to read the threshold estimate."""
    a, b, c = attempt
    expected = k * m / n  # rank of the true threshold inside the sample
    return min(m, int(math.ceil(a * expected + b * math.sqrt(expected))) + c)


def uses_sampling(numel: int, k: int | None, sample_fraction: float) -> bool:
    """Whether the sampled threshold is worth it (large tensor, sparse selection). k=None: unknown yet."""
    return (numel >= SAMPLING_MIN_NUMEL and sample_stride(sample_fraction) > 1
            and (k is None or k * 4 <= numel))


def k_schedule(numel: int, options: RangerOptions) -> list[int]:
    """k for steps 0, 1, ..., warmup_steps; the last entry holds for every later step."""
    total = max(0, options.warmup_steps)
    return [num_selected(numel, density_at(t, options)) for t in range(total + 1)]


def scale_each_value(scale: float, float32_or_64: bool) -> bool:
    """Whether the factor of a scatter-added sum of every rank's pairs (1/N for an average, 1 for a
    sum) may multiply each value before the adds instead of the whole sum after them, with the same
    bits: yes for 1, and for any other power of two in float32 or float64 (exact above their
    subnormal range), so that averages over 2, 4, 8... ranks spare a pass over the output. Any
    other factor, or a half-precision output, scales the sum afterwards."""
    return scale == 1.0 or (float32_or_64 and scale > 0 and math.frexp(scale)[0] == 0.5)


# ------------------------------------------------------------------------------------------ bytes
TOKEN_BYTES = 4
"""A top-k tensor also hands Horovod a 1-element fp32 tensor to allreduce: its result (1 for an average,
N for a sum) tells the receiving side which reduction Horovod was asked for."""


def sparse_bytes(k, value_dtype: str, with_indices: bool = True, with_token: bool | None = None):
    """Bytes one rank hands to collectives for k selected entries.

    Top-k (``with_indices``): k values and k int32 indices in the allgather, plus the 4-byte token
    where the exchange sends one (``with_token``, by default with the indices). Random-k: k values
    only, in Horovod's allreduce. ``k`` may be an int or a framework scalar.
    """
    token = TOKEN_BYTES if (with_indices if with_token is None else with_token) else 0
    if with_indices:
        return k * (VALUE_ITEMSIZE[value_dtype] + INDEX_ITEMSIZE) + token
    return k * VALUE_ITEMSIZE[value_dtype] + token


def dense_fp32_bytes(numel: int) -> int:
    """What a plain fp32 allreduce of the same tensor would hand over: the baseline of every ratio."""
    return 4 * numel


COUNTERS = ("bytes_sent", "bytes_dense", "tensors_sparse", "tensors_dense",
            "elements_selected", "elements_total", "steps")
"""The order of the byte counters; backends that count inside a traced graph keep them as one vector."""


def sparse_counts(numel: int, k, value_dtype: str, with_indices: bool = True,
                  with_token: bool | None = None) -> list:
    """What one sparse tensor adds to each of ``COUNTERS`` (k may be a framework scalar)."""
    return [sparse_bytes(k, value_dtype, with_indices, with_token), dense_fp32_bytes(numel), 1, 0, k,
            numel, 0]


def dense_counts(numel: int, itemsize: int) -> list:
    """What one tensor sent whole adds to each of ``COUNTERS``."""
    return [numel * itemsize, dense_fp32_bytes(numel), 0, 1, numel, numel, 0]


STEP_COUNTS = [0, 0, 0, 0, 0, 0, 1]
"""What closing an optimizer step adds to ``COUNTERS``."""


def stats_dict(counters, steps: int | None = None) -> dict:
    """The counters as a dict, with the compression ratio (dense fp32 bytes / bytes sent)."""
    out = {key: int(value) for key, value in zip(COUNTERS, counters)}
    if steps is not None:
        out["steps"] = int(steps)
    out["compression_ratio"] = out["bytes_dense"] / out["bytes_sent"] if out["bytes_sent"] else None
    return out


@dataclass
class CompressionStats:
    """Cumulative byte accounting of one rank, counted from the tensors handed to collectives."""

    counts: list = field(default_factory=lambda: [0] * len(COUNTERS))
    _last_step_bytes: int = field(default=0, repr=False)

    def add(self, increments) -> None:
        self.counts = [a + int(b) for a, b in zip(self.counts, increments)]
        self._last_step_bytes += int(increments[0])

    def end_step(self) -> int:
        """Closes a step; returns the bytes sent during it."""
        sent = self._last_step_bytes
        self.add(STEP_COUNTS)
        self._last_step_bytes = 0
        return sent

    def as_dict(self) -> dict:
        return stats_dict(self.counts)

    def load(self, state: dict) -> None:
        self.counts = [int(state.get(key, 0)) for key in COUNTERS]
