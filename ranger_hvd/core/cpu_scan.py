"""One pass over memory for the error-feedback step on CPU: ``e += g`` and the candidate screen.

Without it a compressed tensor costs four streaming passes on CPU: the residual add, |acc|, the
comparison with the sampled threshold, and ``nonzero`` over the mask (the slowest: several ns per
entry). :func:`accumulate_and_screen` does all of them in a single loop compiled by numba: each entry is
read and written once, and its position is appended to the candidate list when |acc| reaches the
threshold. The append is branch-free (write the position, advance the count by the comparison), so
the loop does not stall on mispredicted branches whatever the threshold lets through.

The loop adds in the tensor's own precision, as ``torch.add_`` does, so the residual it leaves is
bit-for-bit the same. :func:`select_candidates` then keeps the exact top k of the candidates in one
more compiled loop (a k-th value by introselect, then one ordered pass for the ties), instead of
several tensor operations with their own allocations.

numba is imported and the loops compiled (and cached on disk) on first use; ``available`` says
whether this process can use them at all.
"""

from __future__ import annotations

import functools

import numpy as np

def _accumulate_screen(residual, grad, threshold, out):
    n = residual.shape[0]
    room = out.shape[0]
    count = 0
    i = 0
    # While there is room: write every position, keep it by advancing the count.
    while i < n and count < room:
        a = residual[i] + grad[i]
        residual[i] = a
        out[count] = i
        count += abs(a) >= threshold
        i += 1
    # Out of room (the threshold let too many through): finish the sum, only count.
    while i < n:
        a = residual[i] + grad[i]
        residual[i] = a
        count += abs(a) >= threshold
        i += 1
    return count


def _select_candidates(residual, candidates, k, out):
    c = candidates.shape[0]
    mags = np.empty(c, dtype=residual.dtype)
    for j in range(c):
        mags[j] = abs(residual[candidates[j]])
    cut = np.partition(mags, c - k)[c - k]  # the k-th largest (introselect on a copy)
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


@functools.cache
def _kernels():
    import numba

    # Compiled once per dtype on first call; cache=True keeps the machine code on disk (next to this
    # file, else in the user's cache), so later processes, every rank of a job included, load it
    # instead of compiling. Where no cache directory is writable, each process compiles (~1 s).
    try:
        jit = numba.njit(nogil=True, cache=True, boundscheck=False)
        return jit(_accumulate_screen), jit(_select_candidates)
    except RuntimeError:   # numba: "cannot cache function ...: no locator available"
        jit = numba.njit(nogil=True, cache=False, boundscheck=False)
        return jit(_accumulate_screen), jit(_select_candidates)


@functools.cache
def available() -> bool:
    """Whether numba imports here (it is a dependency of the torch extra; this guards odd installs)."""
    try:
        _kernels()
    except ImportError:
        return False
    return True


def accumulate_and_screen(residual: np.ndarray, grad: np.ndarray, threshold: float,
                          out: np.ndarray) -> int:
    """``residual += grad`` in place, and the ascending positions i with |residual[i]| >= threshold
    (after the add) written to ``out`` while it has room.

    Returns the number of such positions; if it exceeds ``len(out)``, only the first ``len(out)``
    are in ``out`` (the sum is complete either way). Both arrays are 1-D, contiguous and of the same
    dtype (float32 or float64); ``out`` is int32.
    """
    return int(_kernels()[0](residual, grad, threshold, out))


def select_candidates(residual: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k of ``candidates`` (ascending int32 positions, at least k) with the largest
    |residual|, ties at the k-th value to the lower position: a new ascending int32 array.

    Exact for the whole tensor when every entry outside ``candidates`` is smaller than all k kept.
    """
    out = np.empty(k, dtype=np.int32)
    kept = _kernels()[1](residual, candidates, k, out)
    assert kept == k, (kept, k)
    return out
