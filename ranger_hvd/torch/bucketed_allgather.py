"""One allgather per bucket of compressed tensors, instead of one per tensor.

Horovod's hook hands ``RangerCompressor.compress`` one gradient at a time. Sent one allgather per
tensor, each tensor's pairs cost Horovod a negotiation, a response and a completion of their own,
and on a model of many small tensors that fixed cost per collective, not the bytes or the
selection, was most of the exchange (``docs/results/network-per-tensor.md``). So the compressed
tensors of each Horovod optimizer are cut into buckets once, as DDP cuts its own: its parameters in
reverse order (the order backward produces their gradients), a new bucket whenever the next
gradient would take one past ``bucket_bytes`` or lives on another device. ``compress`` still runs a
tensor's error-feedback step at once and adds its pairs to its bucket; when the bucket's last
tensor arrives, the bucket leaves in one allgather, while backward goes on with the next layers.

**Names.** Every rank cuts the same buckets (the same parameters in the same order, which Horovod's
``broadcast_parameters`` already asks of the model) and names a bucket's allgather after its
first tensor in that order and the count of the others, so the name matches on every rank. A
tensor whose bucket is still open when its result is wanted (code that calls ``compress`` and
``decompress`` one tensor at a time; a tensor that Horovod did not hand over this step) sends every
open bucket with the tensors it has: every rank compresses the same tensors of a step before
Horovod asks for any result, so every rank sends the same partial buckets under the same names.

**Layout.** One rank's payload is the int32 indices of every tensor of the bucket, in bucket order,
then their values in the wire dtype, so each slice is aligned for its dtype without padding: a
tensor still costs exactly k * (4 + value size) bytes. A bucket of one tensor is the payload of
``compressor.pack_pairs``, and its allgather keeps the per-tensor name ``ranger.topk.<name>``.
Each tensor's rows come back in rank order, so the scatter-add gives the bits it gave before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .state import all_finite

DEFAULT_BUCKET_MB = 25.0   # gradient bytes per bucket, DDP's bucket_cap_mb


@dataclass
class _Plan:
    """One optimizer's buckets: each tensor's (bucket, place in it) and each bucket's size."""

    place: dict[str, tuple[int, int]]
    sizes: list[int]


@dataclass
class _Bucket:
    """One bucket in one step: the pairs of its tensors that arrived, then its allgather."""

    expected: int
    process_set: Any
    members: list = field(default_factory=list)   # (place, name, indices, values)
    handle: Any = None
    gathered: torch.Tensor | None = None
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (first pair, k)
    total: int = 0                                                      # pairs per rank
    non_finite: torch.Tensor | None = None   # every value of the bucket, if one is NaN or Inf


def cut_buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """The given parameters, in the given order, cut into buckets of up to ``bucket_bytes`` of
    gradient (a larger tensor is a bucket of its own), each on one device."""
    buckets, used = [], 0
    for p in params:
        size = p.numel() * p.element_size()
        if not buckets or (used + size > bucket_bytes) or p.device != buckets[-1][0].device:
            buckets.append([])
            used = 0
        buckets[-1].append(p)
        used += size
    return buckets


def _plan_of(buckets: list[list], names: dict) -> _Plan:
    place = {names[p]: (b, j) for b, bucket in enumerate(buckets) for j, p in enumerate(bucket)}
    return _Plan(place, [len(bucket) for bucket in buckets])


class BucketedAllgather:
    """The allgathers of one compressor's top-k pairs, a bucket of tensors at a time."""

    def __init__(self, value_dtype: torch.dtype, bucket_bytes: int, compressed):
        self.value_dtype = value_dtype
        self.bucket_bytes = bucket_bytes
        self.compressed = compressed        # shape -> whether that tensor travels as pairs
        self.received = 0                   # bytes the allgathers brought from other ranks
        self._plans: dict[int, tuple[Any, _Plan]] = {}   # id(optimizer) -> (optimizer, plan)
        self._open: dict[Any, _Bucket] = {}
        self._waiting: dict[str, _Bucket] = {}

    def plan(self, owner) -> _Plan | None:
        """The buckets of a Horovod optimizer's compressed parameters (cut on first use)."""
        if owner is None or self.bucket_bytes <= 0:
            return None
        known = self._plans.get(id(owner))
        if known is not None and known[0] is owner:
            return known[1]
        names = getattr(owner, "_parameter_names", {})
        params = [p for group in owner.param_groups for p in group["params"]
                  if p.requires_grad and p in names and self.compressed(p.shape)]
        groups = getattr(owner, "_p_to_group", None)
        if groups:   # Horovod's groups (``groups=``, ``num_groups=``): one bucket per group
            buckets: dict[int, list] = {}
            for p in reversed(params):
                group = groups.get(p)
                buckets.setdefault(id(p) if group is None else id(group), []).append(p)
            plan = _plan_of(list(buckets.values()), names)
        else:
            plan = _plan_of(cut_buckets(params[::-1], self.bucket_bytes), names)
        self._plans[id(owner)] = (owner, plan)
        return plan

    def reset(self) -> None:
        """A new step: whatever an unfinished step left open or unread is dropped."""
        self._open, self._waiting = {}, {}

    def add(self, name: str, indices: torch.Tensor, values: torch.Tensor, process_set,
            owner=None) -> None:
        """This rank's pairs of one tensor (int32 indices, values in the wire dtype); sends its
        bucket if that was the last tensor it waited for."""
        plan = self.plan(owner)
        where = None if plan is None else plan.place.get(name)
        if where is None:   # not in a plan: a bucket of its own
            key, where, expected = ("alone", name), (0, 0), 1
        else:
            key, expected = (id(owner), where[0]), plan.sizes[where[0]]
        bucket = self._open.get(key)
        if bucket is None:
            bucket = self._open[key] = _Bucket(expected, process_set)
        bucket.members.append((where, name, indices, values))
        self._waiting[name] = bucket
        if len(bucket.members) == bucket.expected:
            del self._open[key]
            self._send(bucket)

    def flush(self) -> None:
        """Sends every open bucket with the tensors it has (Horovod matches collectives by name,
        so the order does not matter)."""
        for bucket in self._open.values():
            self._send(bucket)
        self._open = {}

    def _send(self, bucket: _Bucket) -> None:
        import horovod.torch as hvd

        bucket.members.sort(key=lambda m: m[0])   # arrival order may differ between ranks
        first = 0
        for _, name, indices, _ in bucket.members:
            bucket.offsets[name] = (first, indices.numel())
            first += indices.numel()
        bucket.total = first
        payload = torch.cat([m[2].view(torch.uint8) for m in bucket.members]
                            + [m[3].reshape(-1).view(torch.uint8) for m in bucket.members])
        head = bucket.members[0][1]
        rest = len(bucket.members) - 1
        kwargs = {} if bucket.process_set is None else {"process_set": bucket.process_set}
        bucket.handle = hvd.allgather_async(payload, name=f"ranger.topk.{head}"
                                            + (f"+{rest}" if rest else ""), **kwargs)
        bucket.members = []   # the payload holds them now

    def wait(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """Every rank's pairs of one tensor, in rank order: (int32 indices, values, number of
        ranks, every value of its bucket if one of them is NaN or Inf, else None: the bucket is
        checked once, when it arrives). Sends the open buckets first if this tensor's is one of
        them."""
        bucket = self._waiting.pop(name)
        if bucket.handle is None:
            self.flush()
        row = bucket.total * (4 + self.value_dtype.itemsize)
        if bucket.gathered is None:
            import horovod.torch as hvd

            bucket.gathered = hvd.synchronize(bucket.handle)
            self.received += bucket.gathered.numel() - row
            every = bucket.gathered.view(-1, row)[:, 4 * bucket.total:].reshape(-1)
            every = every.view(self.value_dtype)
            bucket.non_finite = None if all_finite(every) else every
        rows = bucket.gathered.view(-1, row)
        first, k = bucket.offsets[name]
        values_at = 4 * bucket.total + first * self.value_dtype.itemsize
        # reshape(-1) copies the column blocks of several rows into one contiguous buffer
        indices = rows[:, 4 * first: 4 * (first + k)].reshape(-1).view(torch.int32)
        values = rows[:, values_at: values_at + k * self.value_dtype.itemsize].reshape(-1)
        return indices, values.view(self.value_dtype), rows.shape[0], bucket.non_finite
