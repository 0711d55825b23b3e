"""Choosing which entries of a flattened tensor to send.

``topk_indices`` is the per-rank top-k of the drop-in optimizer; it returns exactly the set of
``ranger_hvd.core.reference.select`` (the k largest magnitudes, ties to the lower index, ascending)
but avoids a full sort or a full ``torch.topk``:

1. estimate the threshold from a strided sample of about ``sample_fraction * n`` magnitudes
   (DGC, section 3.1), aiming a little low so that enough entries pass it;
2. candidates = every index whose magnitude reaches the estimate (``nonzero`` gives them ascending);
3. if fewer than k made it, lower the estimate once, then fall back to the whole tensor;
4. the exact k-th largest magnitude t among the candidates is the global one, because every entry
   at or above the estimate is a candidate and at least k of them are;
5. keep everything above t and, of the entries equal to t, the lowest-indexed ones (a running count
   over the ``== t`` mask), so the set never depends on how ties happen to be ordered.

An estimate of 0 (a mostly-zero tensor, such as an embedding's gradient) would let every entry through;
then the non-zero entries are the candidates instead (``_mostly_zero``).

Steps 2 and 3 cost one streaming pass (|x| and a comparison); steps 4 and 5 touch only candidates.

``accumulate_topk`` is what the error-feedback step calls: ``e += g`` and the selection on the sum. On
CPU it runs ``core.cpu_scan.accumulate_select``, which folds the add and steps 2-3 into one compiled
loop, estimating the threshold from the sampled sums before the add; the result is the same set.

``random_k_indices`` serves Horovod's own optimizer, which sums compressed tensors elementwise: every
rank must pick the same coordinates without a message, so they come from a seeded generator.
"""

from __future__ import annotations

import numpy as np
import torch

from ranger_hvd.core import SAMPLE_TRIES, cpu_scan, sample_rank, sample_stride, uses_sampling


class SelectionScratch:
    """Reusable buffers for the magnitudes, the candidate mask and the fused pass's positions.

    A fresh allocation of a large tensor costs page faults comparable to the pass itself, so the
    compressor keeps one buffer of each, sized for the largest request so far.
    """

    def __init__(self) -> None:
        self._mag: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._positions: np.ndarray | None = None

    def magnitude(self, n: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mag = self._mag
        if mag is None or mag.numel() < n or mag.device != like.device or mag.dtype != dtype:
            self._mag = torch.empty(n, dtype=dtype, device=like.device)
        return self._mag[:n]

    def positions(self, n: int) -> np.ndarray:
        """An int32 array of n slots for the fused screen's candidate positions."""
        if self._positions is None or self._positions.size < n:
            self._positions = np.empty(n, dtype=np.int32)
        return self._positions[:n]

    def mask(self, n: int, like: torch.Tensor) -> torch.Tensor:
        if self._mask is None or self._mask.numel() < n or self._mask.device != like.device:
            self._mask = torch.empty(n, dtype=torch.bool, device=like.device)
        return self._mask[:n]


def _magnitudes(flat: torch.Tensor, scratch: SelectionScratch | None) -> torch.Tensor:
    # fp16/bf16 -> fp32 is exact, so the order is kept; float64 stays float64 (fp32 could tie).
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if scratch is None:
        return flat.abs().to(dtype)
    mag = scratch.magnitude(flat.numel(), flat, dtype)
    if flat.dtype == dtype:
        return torch.abs(flat, out=mag)
    mag.copy_(flat)
    return mag.abs_()


def _true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the True entries of a 1-D bool mask.

    ``nonzero`` over the full mask is the slowest pass of the selection on one thread. Candidates
    are rare, so the mask is first read as 64-bit words, eight entries at a time: only the words
    that are not zero are expanded and looked at entry by entry.
    """
    n = mask.numel()
    whole = n - n % 8
    if whole < 64 or mask.storage_offset() % 8 or not mask.is_contiguous():
        return mask.nonzero().view(-1)
    words = mask[:whole].view(torch.int64)
    hot = (words != 0).nonzero().view(-1)
    spread = (hot.unsqueeze(1) * 8 + torch.arange(8, device=mask.device)).view(-1)
    found = spread[mask[spread]]
    if whole == n:
        return found
    return torch.cat([found, mask[whole:].nonzero().view(-1) + whole])


def _keep_k_lowest_ties(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over ``values`` selecting its k largest, ties at the k-th value going to lower positions."""
    c = values.numel()
    if k >= c:
        return torch.ones(c, dtype=torch.bool, device=values.device)
    # k-th largest = (c-k+1)-th smallest; kthvalue is a linear-time selection, not a sort.
    t = torch.kthvalue(values, c - k + 1).values
    at_least = values >= t
    if int(at_least.sum()) == k:
        return at_least  # no tie straddles the cut (the usual case for real gradients)
    above = values > t
    need = k - int(above.sum())
    ties = values == t
    # Ties to the lower index: the running count of equal entries admits only the first `need`.
    return above | (ties & (ties.cumsum(0) <= need))


def _mostly_zero(mag: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Exact selection when the sampled threshold is 0: most entries are zero (an embedding's
    gradient touches a few rows), so every entry would pass it. The non-zero entries are found in one
    pass; if there are at least k, the k largest of them; else all of them and, ties to the lower
    index, the first zeros, which lie within the first k + (non-zeros) positions."""
    nonzero = _true_positions(torch.gt(mag, 0, out=mask) if mask is not None else mag > 0)
    if nonzero.numel() >= k:
        return nonzero[_keep_k_lowest_ties(mag[nonzero], k)].to(torch.int32)
    need = k - nonzero.numel()
    window = mag[: k + nonzero.numel()]
    zeros = (window == 0).nonzero().view(-1)[:need]
    return torch.sort(torch.cat([nonzero, zeros])).values.to(torch.int32)


def topk_indices(flat: torch.Tensor, k: int, sample_fraction: float = 0.01,
                 scratch: SelectionScratch | None = None) -> torch.Tensor:
    """Indices (int32, ascending) of the k largest |flat|, ties to the lower index.

    ``flat`` must be 1-D and hold no NaN (callers check finiteness first); the result equals
    ``core.reference.select(flat, k)``.
    """
    n = flat.numel()
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return torch.arange(n, dtype=torch.int32, device=flat.device)
    mag = _magnitudes(flat, scratch)

    stride = sample_stride(sample_fraction)
    if uses_sampling(n, k, sample_fraction):
        sample = mag[::stride]
        m = sample.numel()
        mask = scratch.mask(n, flat) if scratch is not None else None
        for attempt in SAMPLE_TRIES:
            rank = sample_rank(attempt, k, m, n)
            estimate = torch.topk(sample, rank, sorted=False).values.min()
            if not bool(estimate > 0):
                return _mostly_zero(mag, k, scratch.mask(n, flat) if scratch is not None else None)
            if mask is None:
                passed = mag >= estimate
            else:
                passed = torch.ge(mag, estimate, out=mask)
            candidates = _true_positions(passed)  # ascending
            if candidates.numel() >= k:
                keep = _keep_k_lowest_ties(mag[candidates], k)
                return candidates[keep].to(torch.int32)
            if rank == m:
                break
    # Whole-tensor exact selection: small tensors, dense selections, or an estimate that failed.
    keep = _keep_k_lowest_ties(mag, k)
    return keep.nonzero().view(-1).to(torch.int32)


def accumulate_topk(residual: torch.Tensor, grad: torch.Tensor, k: int,
                    sample_fraction: float = 0.01,
                    scratch: SelectionScratch | None = None) -> torch.Tensor:
    """``residual += grad`` in place, then the top-k indices of the sum (as :func:`topk_indices`).

    On CPU, for float32/float64, the add and the candidate screen share one pass over memory:
    ``core.cpu_scan.accumulate_select``, the CPU selection both backends run, on NumPy views of the
    tensors (the add stays in place). Elsewhere the add, then :func:`topk_indices`.
    """
    n = residual.numel()
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not _fused_ok(residual, grad, k, sample_fraction):
        return topk_indices(residual.add_(grad), k, sample_fraction, scratch)
    slots = cpu_scan.screen_room(k, sample_fraction, n)
    room = scratch.positions(slots) if scratch is not None else np.empty(slots, dtype=np.int32)
    return torch.from_numpy(cpu_scan.accumulate_select(residual.numpy(), grad.numpy(), k,
                                                       sample_fraction, positions=room))


def _fused_ok(residual: torch.Tensor, grad: torch.Tensor, k: int, sample_fraction: float) -> bool:
    return (residual.device.type == "cpu" and grad.device == residual.device
            and residual.dtype in (torch.float32, torch.float64) and grad.dtype == residual.dtype
            and residual.dim() == 1 and grad.dim() == 1
            and residual.is_contiguous() and grad.is_contiguous()
            and not residual.requires_grad and not grad.requires_grad
            and not residual.is_neg() and not grad.is_neg()   # lazy views .numpy() refuses
            and cpu_scan.usable(residual.numel(), k, sample_fraction))


def random_k_indices(n: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """k distinct indices in [0, n), ascending int64, a pure function of (n, k, seed).

    Every rank calls this with the same arguments and gets the same set: the draws run on a CPU
    generator (identical across processes for one PyTorch version) and are then moved to ``device``.
    """
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=device)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if k * 8 >= n:
        chosen = torch.randperm(n, generator=gen)[:k]
    else:
        # Sparse case: a full permutation of n would cost O(n); draw with replacement, deduplicate,
        # and top up until k distinct, then thin uniformly to exactly k.
        pool = torch.unique(torch.randint(0, n, (k + k // 4 + 16,), generator=gen))
        while pool.numel() < k:
            extra = torch.randint(0, n, (2 * (k - pool.numel()) + 16,), generator=gen)
            pool = torch.unique(torch.cat([pool, extra]))
        chosen = pool[torch.randperm(pool.numel(), generator=gen)[:k]]
    return torch.sort(chosen).values.to(device)
