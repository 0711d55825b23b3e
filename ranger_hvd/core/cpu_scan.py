"""One pass over memory for the error-feedback step on CPU: ``acc = e + g`` and the candidate screen.

Without it a compressed tensor costs several streaming passes on CPU: the residual add, |acc|, the
comparison with the sampled threshold, and listing the positions that pass (the slowest: several ns
per entry). :func:`accumulate_and_screen` does all of them in a single loop compiled by numba: each
entry is read and written once, and its position is appended to the candidate list when |acc|
reaches the threshold. The append is branch-free (write the position, advance the count by the
comparison), so the loop does not stall on mispredicted branches whatever the threshold lets through.
When the threshold lets through only a few entries in a hundred, as it does at the densities top-k
is for, a second form of the loop (:func:`_accumulate_screen_blocks`) runs on blocks of 32 entries:
the add and a count of the block's hits in a loop the compiler vectorizes, then the append only in
the blocks that hold a hit (a third of them at 1.1% candidates): 0.46 ns/entry instead of 0.61 at
1.1% and 0.33 at 0.15% on a 2-core AMD EPYC VM, slower (0.68) from about 2% on, where the plain
loop stays in use.

The loop adds in the tensors' own precision, as ``torch.add_`` and ``tf.add`` do, so the sum it
leaves is bit-for-bit theirs. :func:`select_candidates` then keeps the exact top k of the candidates
(their magnitudes gathered in a compiled loop, the k-th value by NumPy's introselect, one ordered
compiled pass for the ties), instead of several tensor operations with their own allocations.

Both backends use these loops on NumPy views of their CPU tensors: PyTorch's selection adds in
place (``torch/selection.py``), TensorFlow's runs :func:`accumulate_select`, the whole selection in
NumPy, inside its traced step (``tensorflow/cpu_path.py``). The same loop counts NaN and Inf in the
gradient as it reads it, so TensorFlow's finiteness check needs no pass of its own (PyTorch adds in
place, so it must check before). TensorFlow's decompress also scatter-adds the gathered pairs here
(:func:`scatter_add`), as its own scatters cost 30-150 ns per pair.

numba is imported and the loops compiled (and cached on disk) on first use; ``available`` says
whether this process can use them at all.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np

from .rules import SAMPLE_TRIES, sample_rank, sample_stride

def _accumulate_screen(residual, grad, threshold, out, acc):
    n = residual.shape[0]
    room = out.shape[0]
    count = 0
    non_finite = 0  # x - x is 0 for every finite x and NaN for NaN and +-Inf
    i = 0
    # While there is room: write every position, keep it by advancing the count.
    while i < n and count < room:
        x = grad[i]
        a = residual[i] + x
        acc[i] = a
        out[count] = i
        count += abs(a) >= threshold
        non_finite += not (x - x == 0)
        i += 1
    # Out of room (the threshold let too many through): finish the sum, only count.
    while i < n:
        x = grad[i]
        a = residual[i] + x
        acc[i] = a
        count += abs(a) >= threshold
        non_finite += not (x - x == 0)
        i += 1
    return count, non_finite


_BLOCK = 32  # entries per block of the sparse screen; 24-48 measured within 0.05 ns/entry of each other
SPARSE_SCREEN_MAX_RATE = 0.015  # candidates per entry up to which the block form is the faster one


def _accumulate_screen_blocks(residual, grad, threshold, out, acc):
    # _accumulate_screen's results, bit for bit, for a threshold that few entries reach
    n = residual.shape[0]
    room = out.shape[0]
    count = 0
    non_finite = 0
    full = n - n % _BLOCK
    i = 0
    while i < full:
        hits = 0
        bad = 0
        for j in range(i, i + _BLOCK):  # no branch: vectorized
            x = grad[j]
            a = residual[j] + x
            acc[j] = a
            hits += np.int32(abs(a) >= threshold)
            bad += np.int32(x - x != 0)  # NaN or +-Inf
        non_finite += bad
        if hits:
            if count + _BLOCK <= room:  # room for the whole block: the branch-free append
                for j in range(i, i + _BLOCK):
                    out[count] = j
                    count += abs(acc[j]) >= threshold
            else:
                for j in range(i, i + _BLOCK):
                    if abs(acc[j]) >= threshold:
                        if count < room:
                            out[count] = j
                        count += 1
        i += _BLOCK
    while i < n:  # the last partial block
        x = grad[i]
        a = residual[i] + x
        acc[i] = a
        if abs(a) >= threshold:
            if count < room:
                out[count] = i
            count += 1
        non_finite += not (x - x == 0)
        i += 1
    return count, non_finite


def _magnitudes_at(residual, candidates, mags):
    for j in range(candidates.shape[0]):
        mags[j] = abs(residual[candidates[j]])


def _keep_from_cut(mags, candidates, cut, k, out):
    # the candidates above the k-th largest magnitude (cut), then those equal to it by position
    c = candidates.shape[0]
    above = 0
    for j in range(c):
        above += mags[j] > cut
    ties_left = k - above  # entries equal to the cut that still fit: the lowest-indexed ones
    w = 0
    for j in range(c):
        m = mags[j]
        if m > cut or (m == cut and ties_left > 0):
            if m == cut:
                ties_left -= 1
            out[w] = candidates[j]
            w += 1
    return w


def _scatter_add(indices, values, factor, out, clear):
    n = out.shape[0]
    if clear:
        for i in range(n):
            out[i] = 0
    for j in range(indices.shape[0]):
        i = indices[j]
        if i < 0 or i >= n:
            return j
        out[i] += values[j] * factor
    return -1


class NonFiniteGradient(ValueError):
    """The gradient handed to :func:`accumulate_select` holds NaN or Inf (``check_finite=True``)."""


def _screen_sparse(residual, grad, threshold, out, acc):
    return _blocks(residual, grad, threshold, out, acc)


def _screen_sparse_in_place(residual, grad, threshold, out):
    # The same loop inlined with acc and residual one variable: the compiler then knows that the
    # store acc[j] only meets the load of residual[j] and vectorizes the add (0.50 instead of 0.82
    # ns/entry at 1.2% candidates); through two array arguments that may overlap it cannot.
    return _blocks(residual, grad, threshold, out, residual)


_blocks = None  # _accumulate_screen_blocks compiled for inlining, set by _kernels()


class _Kernels(NamedTuple):
    screen: Callable                 # (residual, grad, threshold, out, acc) -> (count, non_finite)
    screen_sparse: Callable          # the same results, faster when few entries pass
    screen_sparse_in_place: Callable  # (residual, grad, threshold, out), acc being residual
    magnitudes_at: Callable
    keep_from_cut: Callable
    scatter: Callable


def _screen(residual, grad, threshold: float, out, acc, expected: int | None) -> tuple[int, int]:
    """(count, non_finite) of the screen loop that suits about ``expected`` hits (None: unknown)."""
    kernels = _kernels()
    if expected is None or expected > SPARSE_SCREEN_MAX_RATE * residual.shape[0]:
        return kernels.screen(residual, grad, threshold, out, acc)
    if acc is residual:
        return kernels.screen_sparse_in_place(residual, grad, threshold, out)
    return kernels.screen_sparse(residual, grad, threshold, out, acc)


@functools.cache
def _kernels() -> _Kernels:
    import numba

    global _blocks
    _blocks = numba.njit(inline="always", nogil=True, boundscheck=False)(_accumulate_screen_blocks)
    # Compiled once per dtype on first call; cache=True keeps the machine code on disk (next to this
    # file, else in the user's cache), so later processes, every rank of a job included, load it
    # instead of compiling. Where no cache directory is writable, each process compiles (~1 s).
    for cache in (True, False):
        jit = numba.njit(nogil=True, cache=cache, boundscheck=False)
        try:
            return _Kernels(jit(_accumulate_screen), jit(_screen_sparse), jit(_screen_sparse_in_place),
                            jit(_magnitudes_at), jit(_keep_from_cut), jit(_scatter_add))
        except RuntimeError:   # numba: "cannot cache function ...: no locator available"
            continue
    raise AssertionError("unreachable: numba compiles without a cache")


@functools.cache
def available() -> bool:
    """Whether numba imports here (a dependency of both backends' extras; this guards odd installs)."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def accumulate_and_screen(residual: np.ndarray, grad: np.ndarray, threshold: float,
                          out: np.ndarray, acc: np.ndarray | None = None, expected: int | None = None) -> int:
    """``acc = residual + grad`` (by default ``acc`` is ``residual``: the add is in place), and the
    ascending positions i with |acc[i]| >= threshold written to ``out`` while it has room.

    Returns the number of such positions; if it exceeds ``len(out)``, only the first ``len(out)``
    are in ``out`` (the sum is complete either way). The arrays are 1-D, contiguous and of one
    dtype (float32 or float64); ``out`` is int32. ``expected``, about how many entries the threshold
    lets through, picks the faster form of the loop; the result is the same whatever it says.
    """
    return int(_screen(residual, grad, threshold, out, residual if acc is None else acc, expected)[0])


def select_candidates(residual: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k of ``candidates`` (ascending int32 positions, at least k) with the largest
    |residual|, ties at the k-th value to the lower position: a new ascending int32 array.

    Exact for the whole tensor when every entry outside ``candidates`` is smaller than all k kept.
    """
    kernels = _kernels()
    c = candidates.shape[0]
    mags = np.empty(c, dtype=residual.dtype)
    kernels.magnitudes_at(residual, candidates, mags)
    # the k-th largest by NumPy's introselect, which is 10x numba's (0.2 against 2.8 ms for 300K)
    cut = np.partition(mags, c - k)[c - k]  # a scalar of mags' dtype
    out = np.empty(k, dtype=np.int32)
    kept = kernels.keep_from_cut(mags, candidates, cut, k, out)
    assert kept == k, (kept, k)
    return out


def select_among_non_zeros(acc: np.ndarray, non_zeros: np.ndarray, k: int) -> np.ndarray:
    """The k largest |acc| (ascending int32 positions, ties to the lower one) when ``non_zeros``
    lists, ascending, every non-zero entry of acc: the k largest of them, or if fewer than k all of
    them and then the zeros with the lowest positions (which lie among the first k + len(non_zeros)).
    """
    count = non_zeros.shape[0]
    if count >= k:
        return select_candidates(acc, non_zeros, k)
    zeros = np.flatnonzero(acc[:k + count] == 0)[:k - count].astype(np.int32)
    return np.sort(np.concatenate([non_zeros, zeros]))


def non_zero_threshold(dtype) -> float:
    """The smallest positive value of ``dtype``: |x| reaches it exactly when x is not zero."""
    return float(np.nextafter(np.dtype(dtype).type(0), np.dtype(dtype).type(1)))


def accumulate_select(residual: np.ndarray, grad: np.ndarray, k: int, sample_fraction: float,
                      acc: np.ndarray, check_finite: bool = False) -> np.ndarray:
    """``acc = residual + grad`` and the ascending int32 positions of the k largest |acc|, ties to
    the lower position: the set of ``core.reference.select(acc, k)``, in one pass over memory.

    With ``check_finite`` a ``grad`` holding NaN or Inf raises :class:`NonFiniteGradient` once the
    pass is over; it is counted within the pass, at no extra read. ``acc`` must then be a buffer of
    its own, so that the residual is left as it was. Unchecked, NaN makes the selection arbitrary.

    The steps of the selection (``torch/selection.py`` documents them) in NumPy: a threshold
    estimated from the sampled sums, the fused add and screen, the exact top k among the
    candidates. Where the estimate lets fewer than k through it is lowered once, then every entry
    is a candidate. An estimate of 0 (mostly zeros, such as an embedding's gradient) screens for
    the non-zero entries; if fewer than k, the first zeros complete the set.
    """
    n = residual.shape[0]
    stride = sample_stride(sample_fraction)
    sample = np.abs(residual[::stride] + grad[::stride])  # the sums the add will produce there
    m = sample.shape[0]

    def estimate(attempt) -> float:
        rank = sample_rank(attempt, k, m, n)
        return float(np.partition(sample, m - rank)[m - rank])  # the rank-th largest

    first = estimate(SAMPLE_TRIES[0])
    # No buffer is touched beyond the count, so room for every entry costs only address space.
    positions = np.empty(n, dtype=np.int32)
    if check_finite and np.may_share_memory(acc, residual):
        raise ValueError("accumulate_select: check_finite needs an acc that is not the residual")
    if first > 0:  # the estimate lets about k through
        count, non_finite = _screen(residual, grad, first, positions, acc, k)
    else:  # most sampled sums are zero: screen for the non-zero entries, about as many as sampled
        count, non_finite = _screen(residual, grad, non_zero_threshold(residual.dtype), positions, acc,
                                    int(np.count_nonzero(sample)) * stride)
    if check_finite and non_finite:
        raise NonFiniteGradient(f"{non_finite} of the gradient's {n} entries are NaN or Inf")
    if not first > 0:
        return select_among_non_zeros(acc, positions[:count], k)
    if count >= k:
        return select_candidates(acc, positions[:count], k)
    wider = estimate(SAMPLE_TRIES[-1])
    candidates = np.flatnonzero(np.abs(acc) >= wider).astype(np.int32) if wider > 0 else positions[:0]
    if candidates.shape[0] < k:
        candidates = np.arange(n, dtype=np.int32)
    return select_candidates(acc, candidates, k)


def scatter_add(indices: np.ndarray, values: np.ndarray, factor, out: np.ndarray,
                zeroed: bool = False) -> None:
    """``out = 0``, then ``out[indices[j]] += values[j] * factor`` for j = 0, 1, ... in that order.

    Each entry's sum is formed in the order of the pairs, from +0.0, in ``out``'s dtype, as
    TensorFlow's ``scatter_nd`` and ``unsorted_segment_sum`` form it on CPU, at a few ns per pair
    instead of their 30-150. ``factor`` has ``values``' dtype; 1 leaves each value as it is. The
    indices arrive from other ranks, so each is checked: one outside ``out`` raises ValueError
    (the pairs before it are then added). ``zeroed``: the caller guarantees ``out`` holds +0.0
    everywhere, and the pass that clears it is skipped.
    """
    bad = _kernels().scatter(indices, values, values.dtype.type(factor), out, not zeroed)
    if bad >= 0:
        raise ValueError(f"pair {bad} has index {int(indices[bad])}, outside a tensor of "
                         f"{out.shape[0]} entries")
