"""The global top-k exchange (``exchange="global_topk"``): traffic per rank that does not grow with N.

With the allgather exchange every rank receives every other rank's k pairs, (N-1)·k per tensor and
step. Here, as in Ok-Topk (Li and Hoefler, PPoPP 2022), the index space of a tensor is cut into N
ranges, one owned by each rank:

1. *sparse reduce-scatter*: each rank sends each of its local top-k pairs to the owner of its index
   (one alltoall with splits);
2. each owner sums what it received per index and keeps the ``budget`` largest sums of its range;
3. *allgather* of the kept sums: every rank gets the same global selection G and applies
   (scatter of G's sums) / N;
4. *error feedback stays exact*: a pair that rank r sent and the owners did not keep goes back into
   r's residual (e[i] += v_r[i]; with DGC masking u[i] is restored too), so what was applied plus
   every residual is still the sum of every gradient.

Ranges follow the previous step's G, which every rank holds alike: the boundaries are its quantiles,
so each range held about 1/N of the last selection (top-k entries cluster: equal widths would pile
them onto few owners). Before any selection the ranges have equal widths. An owner's budget is its
share of k by the same weights (the range's count in the last G, or its width), rounded up, so the
budgets sum to k up to N - 1 and, at density 1, every index is kept.

Each rank then receives about k pairs in step 1 (balanced ranges) and at most about k + N in step 3,
about 2·k pairs whatever N is.

Everything here is plain Python/NumPy on indices: the rule the backends follow and the reference
(:func:`reference_exchange`) they are tested against.
"""

from __future__ import annotations

import math

import numpy as np

from .reference import select


def range_bounds(numel: int, world: int, last_selected: np.ndarray | None) -> list[int]:
    """N+1 ascending boundaries: owner j holds indices [b[j], b[j+1]).

    From the quantiles of the last global selection (ascending, identical on every rank), or equal
    widths when there is none."""
    if last_selected is None or len(last_selected) < world:
        return [numel * j // world for j in range(world + 1)]
    sel = np.asarray(last_selected)
    inner = sel[len(sel) * np.arange(1, world) // world].tolist()
    return [0, *inner, numel]


def range_budgets(k: int, bounds: list[int], last_selected: np.ndarray | None) -> list[int]:
    """How many sums each owner keeps: its share of k, weighted by the range's count in the last
    selection (or by its width before any), rounded up."""
    world = len(bounds) - 1
    if last_selected is None or len(last_selected) < world:
        weights = [bounds[j + 1] - bounds[j] for j in range(world)]
    else:
        # the last selection's count in each range: one search for every boundary
        weights = np.diff(np.searchsorted(np.asarray(last_selected), bounds, "left")).tolist()
    total = sum(weights)
    return [min(bounds[j + 1] - bounds[j], math.ceil(k * w / total)) if total else 0
            for j, w in enumerate(weights)]


def owner_split(indices: np.ndarray, bounds: list[int]) -> list[int]:
    """How many of the ascending ``indices`` go to each owner."""
    cuts = np.searchsorted(np.asarray(indices), bounds, "left")
    return [int(cuts[j + 1] - cuts[j]) for j in range(len(bounds) - 1)]


def owner_keep(indices: np.ndarray, values: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """An owner's step 2: the sum per index of what it received (in arrival order: rank order), then
    the ``budget`` largest |sums|, ties to the lower index. Returns (ascending indices, sums)."""
    if len(indices) == 0 or budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0, values.dtype)
    unique, inverse = np.unique(indices, return_inverse=True)
    sums = np.zeros(len(unique), values.dtype)
    np.add.at(sums, inverse, values)
    keep = select(sums, min(budget, len(unique)))
    return unique[keep], sums[keep]


def reference_exchange(pairs: list[tuple[np.ndarray, np.ndarray]], numel: int,
                       last_selected: np.ndarray | None):
    """All ranks' (ascending indices, values) -> (G indices, G sums, per rank the positions of its
    pairs that were not kept), as every backend must compute it."""
    world = len(pairs)
    k = max(len(i) for i, _ in pairs)
    bounds = range_bounds(numel, world, last_selected)
    budgets = range_budgets(k, bounds, last_selected)
    kept_idx, kept_sums = [], []
    for j in range(world):
        parts = [(i[(i >= bounds[j]) & (i < bounds[j + 1])], v[(i >= bounds[j]) & (i < bounds[j + 1])])
                 for i, v in pairs]
        idx = np.concatenate([p[0] for p in parts])
        vals = np.concatenate([p[1] for p in parts])
        ki, ks = owner_keep(idx, vals, budgets[j])
        kept_idx.append(ki)
        kept_sums.append(ks)
    g_idx, g_sums = np.concatenate(kept_idx), np.concatenate(kept_sums)
    dropped = [np.flatnonzero(~np.isin(i, g_idx)) for i, _ in pairs]
    return g_idx, g_sums, dropped
