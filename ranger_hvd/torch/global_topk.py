"""PyTorch's global top-k exchange through Horovod's collectives (the rule: ``core/global_topk.py``).

``compress`` of a tensor starts step 1, the alltoall of its pairs to their owners. The first
``decompress`` of a step runs step 2 for every tensor of the step whose alltoall was started, in
order of name (the same on every rank, whatever order Horovod hands tensors back in), and starts
each one's allgather of kept sums; each ``decompress`` then waits for its own allgather (step 3),
scatters G and gives the pairs that were not kept back to this rank's residual (step 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ranger_hvd.core import COUNTERS
from ranger_hvd.core import global_topk as rule

from .selection import topk_indices
from .state import TensorState, all_finite


def _rows(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pairs as rows of bytes (int32 index, value) for collectives that split on rows."""
    return torch.cat([indices.to(torch.int32).view(torch.uint8).view(-1, 4),
                      values.contiguous().view(torch.uint8).view(len(values), values.element_size())],
                     dim=1)


def _unrows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    indices = rows[:, :4].contiguous().view(torch.int32).reshape(-1)
    values = rows[:, 4:].contiguous().view(dtype).reshape(-1)
    return indices, values


@dataclass
class _Exchange:
    name: str
    state: TensorState
    numel: int
    k: int
    bounds: list[int]
    budgets: list[int]
    send: Any                   # the alltoall in flight (step 1)
    process_set: Any
    gather: Any = None          # the allgather in flight (step 3)
    sent_bytes: int = 0


class GlobalTopk:
    """The global exchanges of one compressor: what is in flight, and each tensor's last G."""

    def __init__(self, compressor):
        self.comp = compressor
        self.pending: dict[str, _Exchange] = {}
        self.last: dict[str, np.ndarray] = {}    # each tensor's last global selection, ascending

    def start(self, name: str, numel: int, indices: torch.Tensor, values: torch.Tensor,
              process_set) -> None:
        """Step 1: this rank's pairs (values on the wire dtype) to the owners of their indices."""
        import horovod.torch as hvd

        world = process_set.size() if process_set is not None else hvd.size()
        last = self.last.get(name)
        bounds = rule.range_bounds(numel, world, last)
        splits = rule.owner_split(indices.numpy(), bounds)
        kwargs = {} if process_set is None else {"process_set": process_set}
        rows = _rows(indices, values)
        handle = hvd.alltoall_async(rows, splits=torch.tensor(splits, dtype=torch.int32),
                                    name=f"ranger.gtopk.send.{name}", **kwargs)
        self.pending[name] = _Exchange(name, self.comp._state[name], numel, len(indices), bounds,
                                       rule.range_budgets(len(indices), bounds, last), handle,
                                       process_set)

    def _keep_all_pending(self) -> None:
        """Step 2 for every tensor whose alltoall is in flight, in name order."""
        import horovod.torch as hvd

        for name in sorted(n for n, ex in self.pending.items() if ex.gather is None):
            ex = self.pending[name]
            rows, received_splits = hvd.synchronize(ex.send)
            me = ex.process_set.rank() if ex.process_set is not None else hvd.rank()
            indices, values = _unrows(rows, self.comp.value_dtype)
            own = int(received_splits[me])
            self.comp._received += rows.numel() - own * rows.shape[1]
            dtype = ex.state.residual.dtype
            lo, hi = ex.bounds[me], ex.bounds[me + 1]
            kept_idx, kept_sums = self._owner_keep(indices, values.to(dtype), lo, hi,
                                                   ex.budgets[me])
            out = _rows(kept_idx, kept_sums)
            ex.sent_bytes = out.numel()
            kwargs = {} if ex.process_set is None else {"process_set": ex.process_set}
            ex.gather = hvd.allgather_async(out, name=f"ranger.gtopk.kept.{name}", **kwargs)

    def _owner_keep(self, indices, values, lo: int, hi: int, budget: int):
        """``core.global_topk.owner_keep`` on this rank's range [lo, hi)."""
        if indices.numel() == 0 or budget <= 0:
            return indices[:0], values[:0]
        sums = torch.zeros(hi - lo, dtype=values.dtype)
        positions = (indices - lo).long()
        sums.index_add_(0, positions, values)   # in arrival order: rank order
        candidates = torch.unique(positions)
        at = sums[candidates]
        budget = min(budget, candidates.numel())
        if all_finite(at):
            keep = topk_indices(at, budget, self.comp.options.sample_fraction).long()
        else:   # a void step: the NaN/Inf must reach every rank (and the loss scaler)
            keep = self.comp._ops.select_non_finite(at, budget).long()
        return (candidates[keep] + lo).to(torch.int32), at[keep]

    def finish(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Steps 3 and 4 of one tensor: (G's indices, G's sums, N); this rank's pairs that were not
        kept are back in its residual (and u where DGC masking zeroed it)."""
        import horovod.torch as hvd

        ex = self.pending[name]
        if ex.gather is None:
            self._keep_all_pending()
        rows = hvd.synchronize(ex.gather)
        del self.pending[name]
        g_idx, g_sums = _unrows(rows, ex.state.residual.dtype)
        self.comp._received += rows.numel() - ex.sent_bytes
        self.comp._stats.add([ex.sent_bytes] + [0] * (len(COUNTERS) - 1))   # bytes_sent only
        self.last[name] = g_idx.numpy().astype(np.int64)
        self._give_back_unkept(ex.state, g_idx)
        return g_idx, g_sums, len(ex.bounds) - 1

    def _give_back_unkept(self, st: TensorState, g_idx: torch.Tensor) -> None:
        """Step 4: the pairs of this rank outside G go back as an undone step's would (e[i] += v[i],
        u[i] restored: ``ErrorFeedback.undo``); what stays remembered for an undo of the whole step
        is the part that was delivered."""
        if st.sent is None:   # a void step already undone, or this rank's own g was not finite
            return
        indices, values, kept_u = st.sent
        delivered = torch.isin(indices, g_idx)

        def part(mask):
            return indices[mask], values[mask], None if kept_u is None else kept_u[mask]

        if not bool(delivered.all()):
            st.sent = part(~delivered)
            self.comp.engine.undo(st)
        st.sent = part(delivered)

    def state_dict(self) -> dict:
        return {name: sel.copy() for name, sel in self.last.items()}

    def load_state_dict(self, state: dict) -> None:
        self.last = {name: np.asarray(sel, np.int64) for name, sel in state.items()}
