"""Global top-k's owner step (``GlobalTopk.keep_received``) in one process, on the rows that a bucket's
alltoall brings an owner: the compiled path (``core.cpu_scan``) gives the same bytes as the path of
tensor operations, and both keep what ``core.global_topk.owner_keep`` keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranger_hvd.core import global_topk as rule
from ranger_hvd.core import reference
from ranger_hvd.torch import RangerCompressor
from ranger_hvd.torch import global_topk
from ranger_hvd.torch.global_topk import GlobalTopk, _unrows, route
from ranger_hvd.torch.state import TensorState

NUMELS = [3000, 64, 5000, 700]


def _ranks_pairs(rng, world: int, k: int, poison: float | None):
    """Each rank's ascending top-k pairs of every tensor, drawn from a small pool of indices so that
    owners sum several ranks' values per index; ``poison`` lands in one value of tensor 2."""
    out = []
    for r in range(world):
        tensors = []
        for j, n in enumerate(NUMELS):
            pool = rng.choice(n, size=min(n, 3 * k), replace=False)
            idx = np.sort(rng.choice(pool, size=min(k, n), replace=False)).astype(np.int32)
            vals = rng.standard_normal(len(idx)).astype(np.float32)
            vals[rng.integers(0, len(vals), 3)] = vals[0]   # ties in magnitude
            if poison is not None and r == world - 1 and j == 2:
                vals[len(vals) // 2] = poison
            tensors.append((idx, vals))
        out.append(tensors)
    return out


def _owner_rows(gt, pairs, world, me, dtypes, wire, last):
    states = {f"t{j}": TensorState(residual=torch.zeros(n, dtype=dtypes[j])) for j, n in enumerate(NUMELS)}
    routed = [route([(f"t{j}", n, torch.from_numpy(i), torch.from_numpy(v).to(wire))
                     for j, (n, (i, v)) in enumerate(zip(NUMELS, rank))], world, last, states)
              for rank in pairs]
    chunks = []
    for r in routed:   # what the alltoall brings owner `me`: each rank's rows for it, in rank order
        at = [0, *np.cumsum(r.splits.numpy()).tolist()]
        chunks.append(r.rows[at[me]:at[me + 1]])
    head = routed[0]
    return torch.cat(chunks), head


def _reference_keep(idx, vals, budget):
    """``rule.owner_keep``; in a void step (a NaN/Inf sum) the non-finite sums first, then the
    lowest finite ones (``reference.select_non_finite``), so the NaN/Inf reaches every rank."""
    unique, inverse = np.unique(idx, return_inverse=True)
    sums = np.zeros(len(unique), vals.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        np.add.at(sums, inverse, vals)
    if np.isfinite(sums).all():
        return rule.owner_keep(idx, vals, budget)
    keep = reference.select_non_finite(sums, min(budget, len(unique)))
    return unique[keep], sums[keep]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", ["float32", "nan", "inf", "mixed-float64", "wire-float16", "after-a-step"])
def test_owner_step_compiled_equals_tensor_ops_and_the_rule(world, case, monkeypatch):
    rng = np.random.default_rng(world * 100 + len(case))
    poison = {"nan": np.nan, "inf": np.inf}.get(case)
    wire = "float16" if case == "wire-float16" else "float32"
    gt = GlobalTopk(RangerCompressor(density=0.05, value_dtype=wire))
    dtypes = [torch.float64 if case == "mixed-float64" and j == 1 else torch.float32 for j in range(len(NUMELS))]
    pairs = _ranks_pairs(rng, world, 200, poison)
    # after a step the ranges follow the last selection (uneven widths, budgets by count)
    last = ({f"t{j}": np.sort(rng.choice(n, size=min(n, 150), replace=False)).astype(np.int64)
             for j, n in enumerate(NUMELS)} if case == "after-a-step" else {})
    for me in range(world):
        rows, head = _owner_rows(gt, pairs, world, me, dtypes, getattr(torch, wire), last)
        expect_compiled = case not in ("mixed-float64", "wire-float16")
        assert global_topk._compiled_sums(torch.zeros(1, dtype=getattr(torch, wire)), head.parts) == expect_compiled
        compiled = gt.keep_received(rows, head.parts, head.starts, me, head.sum_dtype)
        monkeypatch.setattr(global_topk, "_compiled_sums", lambda *a: False)
        tensor_ops = gt.keep_received(rows, head.parts, head.starts, me, head.sum_dtype)
        monkeypatch.undo()
        assert compiled.dtype == torch.uint8 and torch.equal(compiled, tensor_ops)

        kept_idx, kept_sums = _unrows(compiled, head.sum_dtype)
        kept_idx = kept_idx.numpy().astype(np.int64)
        for j, part in enumerate(head.parts):
            lo, hi = part.bounds[me], part.bounds[me + 1]
            idx = np.concatenate([i[(i >= lo) & (i < hi)] for i, _ in (rank[j] for rank in pairs)])
            vals = np.concatenate([torch.from_numpy(v).to(getattr(torch, wire)).to(dtypes[j]).numpy()[(i >= lo) & (i < hi)]
                                   for i, v in (rank[j] for rank in pairs)])
            mine = (kept_idx >= part.offset) & (kept_idx < part.offset + NUMELS[j])
            got_idx, got_sums = kept_idx[mine] - part.offset, kept_sums.numpy()[mine]
            want_idx, want_sums = _reference_keep(idx, vals, part.budgets[me])
            np.testing.assert_array_equal(got_idx, want_idx)
            np.testing.assert_array_equal(got_sums, want_sums.astype(got_sums.dtype))
