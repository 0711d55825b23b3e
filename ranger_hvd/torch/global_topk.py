"""PyTorch's global top-k exchange through Horovod's collectives, a bucket of tensors at a time
(the rule: ``core/global_topk.py``; the buckets: ``buckets.py``).

Each tensor keeps its own ranges, budgets and selection, exactly as the rule says; a bucket only
shares the collectives. In a bucket, tensor t's index i travels as the *bucket index*
``offset[t] + i`` (offsets: the running sum of the bucket's tensor sizes in bucket order), so one
alltoall carries every tensor's pairs to their owners and one allgather brings back every tensor's
kept sums, and an index alone says which tensor it belongs to.

1. When a bucket's last tensor is compressed, this rank's pairs of all its tensors leave in one
   alltoall, grouped by owner (each tensor's owner of ``i`` is the rule's, from that tensor's ranges);
2. as soon as that alltoall has arrived (checked at each later ``compress``, else at the first
   ``decompress`` that needs it), the owner sums what it received per index of each tensor in
   arrival order (rank order: the same bits as one alltoall per tensor), keeps each tensor's budget
   of the largest sums, and starts one allgather of the kept (bucket index, sum) rows (the sums of
   the whole bucket in one compiled pass, ``core.cpu_scan``, when its tensors all sum in the wire
   dtype, float32 or float64; tensor operations per tensor otherwise: mixed or 16-bit dtypes);
3. the first ``decompress`` of a bucket's tensors waits for that allgather, splits G by tensor and
   gives each tensor's pairs that were not kept back to this rank's residual (step 4 of the rule).

Bytes: a pair costs 4 + value size on the way to its owner, and 4 + sum size on the way back; sums
travel in the widest dtype of the bucket's tensors (widening a float is exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ranger_hvd.core import COUNTERS, cpu_scan
from ranger_hvd.core import global_topk as rule

from .buckets import Bucket, BucketQueue
from .selection import topk_indices
from .state import TensorState, all_finite


def _rows(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pairs as rows of bytes (int32 index, value) for collectives that split on rows."""
    if values.element_size() == 4:   # the same bytes, copied as 4-byte words: several times faster
        words = torch.stack([indices.to(torch.int32), values.contiguous().view(torch.int32)], dim=1)
        return words.view(torch.uint8)
    return torch.cat([indices.to(torch.int32).view(torch.uint8).view(-1, 4),
                      values.contiguous().view(torch.uint8).view(len(values), values.element_size())],
                     dim=1)


def _unrows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype.itemsize == 4 and rows.shape[1] == 8 and rows.is_contiguous():
        words = rows.view(torch.int32)
        return words[:, 0].contiguous(), words[:, 1].contiguous().view(dtype)
    indices = rows[:, :4].contiguous().view(torch.int32).reshape(-1)
    values = rows[:, 4:].contiguous().view(dtype).reshape(-1)
    return indices, values


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """``argsort(keys, stable)`` as NumPy does it fastest: small non-negative keys (owners) as
    16-bit integers, which NumPy sorts by radix in one pass over them; others by its timsort, which
    merges the ascending runs that the collectives deliver (one per rank) without sorting them
    again. Several times faster than ``torch.sort(stable=True)`` on the CPU."""
    if keys.size and 0 <= keys.min() and keys.max() < 2 ** 16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _by_tensor(bucket_indices: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
    """The order that sorts bucket indices ascending (stable: equal ones keep their arrival order,
    which is rank order), so they come grouped by tensor and ascending within each, and where each
    tensor's group ends. None where they arrived sorted already (one rank's chunk alone)."""
    keys = bucket_indices.numpy()
    order = None
    if keys.size > 1 and not bool(np.all(keys[1:] >= keys[:-1])):
        order = _stable_order(keys)
        keys = keys[order]
        order = torch.from_numpy(order)
    ends = np.searchsorted(keys, starts[1:].numpy(), "left").tolist() + [keys.size]
    return order, ends


def _compiled_sums(values: torch.Tensor, parts) -> bool:
    """Whether an owner's step may run in ``core.cpu_scan``'s loops: float32/float64 CPU values
    that every tensor of the bucket sums in their own dtype, and numba here."""
    return (values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
            and all(m.state.residual.dtype == values.dtype for m in parts) and cpu_scan.available())


@dataclass
class _Member:
    """One tensor of a bucket in one step."""

    name: str
    state: TensorState
    offset: int                 # its first bucket index
    bounds: list[int]           # owner j holds its indices [bounds[j], bounds[j+1])
    budgets: list[int]          # how many sums owner j keeps


@dataclass
class _GlobalBucket(Bucket):
    """A bucket's two collectives and what they brought."""

    world: int = 0
    me: int = 0
    parts: list[_Member] = field(default_factory=list)
    starts: torch.Tensor | None = None
    sum_dtype: torch.dtype = torch.float32
    send: object = None          # the alltoall in flight (step 1)
    gather: object = None        # the allgather in flight (step 2)
    kept_bytes: int = 0
    results: dict = field(default_factory=dict)   # name -> (G indices, G sums)
    done: bool = False


@dataclass
class Routed:
    """One bucket's pairs on their way to the owners (step 1): the rows in owner order, how many
    go to each owner, and what steps 2 and 3 need to read what comes back."""

    parts: list[_Member]
    starts: torch.Tensor          # each tensor's first bucket index
    sum_dtype: torch.dtype        # the widest dtype of the bucket's tensors
    rows: torch.Tensor            # uint8 rows (int32 bucket index, value), grouped by owner
    splits: torch.Tensor          # int64: rows for owner 0, 1, ...


def route(entries, world: int, last: dict, states: dict) -> Routed:
    """Step 1 of a bucket without the collective: ``entries`` are (name, numel, ascending int32
    indices, values) in bucket order, ``last`` each tensor's last G, ``states`` the tensors'
    ``TensorState`` by name."""
    offset, parts, indices, values, cuts = 0, [], [], [], []
    for name, numel, idx, vals in entries:
        before = last.get(name)
        bounds = rule.range_bounds(numel, world, before)
        parts.append(_Member(name, states[name], offset, bounds,
                             rule.range_budgets(len(idx), bounds, before)))
        cuts.extend(b + offset for b in bounds[1:-1])
        indices.append(idx.numpy())
        values.append(vals)
        offset += numel
    if offset >= 2 ** 31:
        raise ValueError(f"RangerCompressor: a global top-k bucket of {offset} entries does not "
                         "fit int32 indices; lower bucket_mb")
    sum_dtype = parts[0].state.residual.dtype
    for m in parts[1:]:
        sum_dtype = torch.promote_types(sum_dtype, m.state.residual.dtype)
    lengths = [len(i) for i in indices]
    bucket_indices = np.concatenate(indices).astype(np.int64)
    bucket_indices += np.repeat(np.array([m.offset for m in parts], np.int64), lengths)
    # Every tensor's owners in one search: the cuts ascend through the bucket, and below any index
    # of tensor t lie all (world - 1) inner cuts of each tensor before it.
    owner = np.searchsorted(np.array(cuts, np.int64), bucket_indices, "right")
    owner -= np.repeat(np.arange(len(parts), dtype=np.int64) * (world - 1), lengths)
    splits = torch.from_numpy(np.bincount(owner, minlength=world))
    bucket_indices, values = torch.from_numpy(bucket_indices), torch.cat(values)
    if len(parts) > 1:   # one tensor's pairs are already in owner order
        # by owner, ascending within each
        order = torch.from_numpy(_stable_order(owner))
        bucket_indices, values = bucket_indices[order], values[order]
    starts = torch.tensor([m.offset for m in parts], dtype=torch.int64)
    return Routed(parts, starts, sum_dtype, _rows(bucket_indices, values), splits)


class GlobalTopk(BucketQueue):
    """The global exchanges of one compressor: buckets in flight, and each tensor's last G."""

    def __init__(self, compressor):
        super().__init__(compressor.bucket_bytes, compressor.is_compressed)
        self.comp = compressor
        self.received = 0                        # bytes both collectives brought from other ranks
        self.last: dict[str, np.ndarray] = {}    # each tensor's last global selection, ascending
        self._unkept: list[_GlobalBucket] = []   # sent, step 2 not yet run

    def reset(self) -> None:
        super().reset()
        self._unkept = []

    def _new_bucket(self, expected: int, process_set) -> _GlobalBucket:
        return _GlobalBucket(expected, process_set)

    def start(self, name: str, numel: int, indices: torch.Tensor, values: torch.Tensor,
              process_set, owner=None) -> None:
        """This rank's pairs of one tensor (ascending int32 indices, values on the wire dtype) into
        its bucket; a bucket whose alltoall has arrived meanwhile goes on to step 2."""
        self.add(name, (numel, indices, values), process_set, owner)
        self._keep_arrived()

    # ------------------------------------------------------------------ step 1
    def _send(self, bucket: _GlobalBucket) -> None:
        import horovod.torch as hvd

        ps = bucket.process_set
        bucket.world = ps.size() if ps is not None else hvd.size()
        bucket.me = ps.rank() if ps is not None else hvd.rank()
        routed = route([m[1:] for m in bucket.members], bucket.world, self.last, self.comp._state)
        bucket.parts, bucket.starts, bucket.sum_dtype = routed.parts, routed.starts, routed.sum_dtype
        kwargs = {} if ps is None else {"process_set": ps}
        bucket.send = hvd.alltoall_async(routed.rows, splits=routed.splits.to(torch.int32),
                                         name=bucket.head_name("ranger.gtopk.send."), **kwargs)
        self._unkept.append(bucket)

    # ------------------------------------------------------------------ step 2
    def _keep_arrived(self) -> None:
        import horovod.torch as hvd

        while self._unkept and hvd.poll(self._unkept[0].send):
            self._keep(self._unkept.pop(0))

    def _keep(self, bucket: _GlobalBucket) -> None:
        """This rank's step 2 for every tensor of a bucket, and the allgather of what it kept."""
        import horovod.torch as hvd

        rows, received_splits = hvd.synchronize(bucket.send)
        own = int(received_splits[bucket.me])
        self.received += rows.numel() - own * rows.shape[1]
        out = self.keep_received(rows, bucket.parts, bucket.starts, bucket.me, bucket.sum_dtype)
        bucket.kept_bytes = out.numel()
        kwargs = {} if bucket.process_set is None else {"process_set": bucket.process_set}
        bucket.gather = hvd.allgather_async(out, name=bucket.head_name("ranger.gtopk.kept."), **kwargs)

    def keep_received(self, rows: torch.Tensor, parts: list[_Member], starts: torch.Tensor, me: int,
                      sum_dtype: torch.dtype) -> torch.Tensor:
        """Step 2 as owner ``me`` of a bucket: the (bucket index, sum) rows this rank keeps of every
        tensor, from the rows every rank routed to it (in rank order)."""
        indices, values = _unrows(rows, self.comp.value_dtype)
        order, ends = _by_tensor(indices, starts)
        if order is not None:
            indices, values = indices[order], values[order]
        if _compiled_sums(values, parts):
            return self._keep_compiled(indices, values, parts, starts, me)
        kept_idx, kept_sums, begin = [], [], 0
        for part, end in zip(parts, ends):
            lo, hi = part.bounds[me], part.bounds[me + 1]
            idx, sums = self._owner_keep(indices[begin:end] - part.offset,
                                         values[begin:end].to(part.state.residual.dtype),
                                         lo, hi, part.budgets[me])
            kept_idx.append(idx + part.offset)
            kept_sums.append(sums.to(sum_dtype))
            begin = end
        return _rows(torch.cat(kept_idx), torch.cat(kept_sums))

    def _keep_compiled(self, indices, values, parts: list[_Member], starts: torch.Tensor,
                       me: int) -> torch.Tensor:
        """``keep_received`` in compiled loops (``core.cpu_scan``) when every tensor of the bucket
        sums in the wire's dtype: the sums of the whole bucket in one pass (equal bucket indices
        belong to one tensor, so no run crosses two), then each tensor's budget of the largest."""
        unique, sums, non_finite = cpu_scan.sum_runs(indices.numpy(), values.numpy())
        cuts = np.searchsorted(unique, starts.numpy(), "left").tolist() + [unique.size]
        kept = []
        for j, part in enumerate(parts):
            begin, end = cuts[j], cuts[j + 1]
            budget = min(part.budgets[me], end - begin)
            if budget <= 0:
                continue
            segment = sums[begin:end]
            if non_finite and not np.isfinite(segment).all():
                # a void step: the NaN/Inf must reach every rank (and the loss scaler)
                keep = self.comp._ops.select_non_finite(torch.from_numpy(segment), budget).numpy()
            else:
                keep = cpu_scan.select_largest(segment, budget)
            kept.append(begin + keep)
        at = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        return _rows(torch.from_numpy(unique[at]), torch.from_numpy(sums[at]))

    def _owner_keep(self, indices, values, lo: int, hi: int, budget: int):
        """``core.global_topk.owner_keep`` on this rank's range [lo, hi) of one tensor."""
        if indices.numel() == 0 or budget <= 0:
            return indices[:0].to(torch.int64), values[:0]
        # the sums of the received indices only (a zeroed buffer of the whole range would cost
        # more than the pairs: the range is n/N entries, the pairs about k). The indices come
        # sorted (``_by_tensor``), equal ones in arrival order: each new index opens a slot.
        indices = indices.to(torch.int64)
        opens = torch.ones(indices.numel(), dtype=torch.bool)
        torch.ne(indices[1:], indices[:-1], out=opens[1:])
        candidates = indices[opens] - lo
        slot = torch.cumsum(opens, 0) - 1
        at = torch.zeros(candidates.numel(), dtype=values.dtype)
        at.index_add_(0, slot, values)   # in arrival order: rank order
        budget = min(budget, candidates.numel())
        if all_finite(at):
            keep = topk_indices(at, budget, self.comp.options.sample_fraction).long()
        else:   # a void step: the NaN/Inf must reach every rank (and the loss scaler)
            keep = self.comp._ops.select_non_finite(at, budget).long()
        return candidates[keep] + lo, at[keep]

    # ------------------------------------------------------------------ step 3
    def finish(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G's indices of one tensor, their sums, N), its bucket finished first if need be: this
        rank's pairs of the bucket that were not kept are back in its residual."""
        bucket = self.bucket_of(name)
        if not bucket.done:
            while bucket.gather is None:   # step 2 for the buckets sent before it, then for it
                self._keep(self._unkept.pop(0))
            self._finish(bucket)
        return bucket.results.pop(name) + (bucket.world,)

    def _finish(self, bucket: _GlobalBucket) -> None:
        import horovod.torch as hvd

        rows = hvd.synchronize(bucket.gather)
        self.received += rows.numel() - bucket.kept_bytes
        bucket.results = self.apply_selection(rows, bucket.parts, bucket.starts, bucket.sum_dtype,
                                              bucket.kept_bytes)
        bucket.done = True

    def apply_selection(self, rows: torch.Tensor, parts: list[_Member], starts: torch.Tensor,
                        sum_dtype: torch.dtype, kept_bytes: int) -> dict:
        """Step 3 of a bucket from every owner's kept rows: each tensor's G (ascending indices, sums
        in its dtype) by name; G becomes the tensor's next ranges, and this rank's pairs outside G
        go back into its residual."""
        self.comp._stats.add([kept_bytes] + [0] * (len(COUNTERS) - 1))   # bytes_sent only
        g_idx, g_sums = _unrows(rows, sum_dtype)
        order, ends = _by_tensor(g_idx, starts)
        if order is not None:
            g_idx, g_sums = g_idx[order], g_sums[order]
        results, begin = {}, 0
        for part, end in zip(parts, ends):
            # owners hold ascending ranges and send ascending indices: each tensor's G is ascending
            idx = g_idx[begin:end] - part.offset
            results[part.name] = (idx, g_sums[begin:end].to(part.state.residual.dtype))
            self.last[part.name] = idx.numpy().astype(np.int64)
            self._give_back_unkept(part.state, idx)
            begin = end
        return results

    def _give_back_unkept(self, st: TensorState, g_idx: torch.Tensor) -> None:
        """Step 4: the pairs of this rank outside G go back as an undone step's would (e[i] += v[i],
        u[i] restored: ``ErrorFeedback.undo``); what stays remembered for an undo of the whole step
        is the part that was delivered."""
        if st.sent is None:   # a void step already undone, or this rank's own g was not finite
            return
        indices, values, kept_u = st.sent
        # both ascending: whether each sent index is in G, in one compiled merge pass (NumPy's
        # searchsorted where numba is missing; torch's fixed cost per call is several times theirs)
        sent, g = indices.numpy(), g_idx.numpy()
        if cpu_scan.available():
            delivered, found = cpu_scan.sorted_member(sent, g)
        elif g.size:
            at = np.searchsorted(g, sent)
            np.minimum(at, g.size - 1, out=at)
            delivered = g[at] == sent
            found = int(delivered.sum())
        else:
            delivered, found = np.zeros(sent.shape, dtype=bool), 0
        if found == sent.size:
            return

        def part(mask):
            at = torch.from_numpy(np.flatnonzero(mask))   # index_select: cheaper than a bool mask
            return (torch.index_select(indices, 0, at), torch.index_select(values, 0, at),
                    None if kept_u is None else torch.index_select(kept_u, 0, at))

        st.sent = part(~delivered)
        self.comp.engine.undo(st)
        st.sent = part(delivered)

    def state_dict(self) -> dict:
        return {name: sel.copy() for name, sel in self.last.items()}

    def load_state_dict(self, state: dict) -> None:
        self.last = {name: np.asarray(sel, np.int64) for name, sel in state.items()}
