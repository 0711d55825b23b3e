"""Buckets of compressed tensors: each leaves in one set of collectives instead of one per tensor.

Horovod's hook hands ``RangerCompressor.compress`` one gradient at a time. Sent with collectives of
its own, each tensor's pairs cost Horovod a negotiation, a response and a completion per
collective, and on a model of many small tensors that fixed cost, not the bytes or the selection,
was most of the exchange (``docs/results/network-per-tensor.md``). So the compressed tensors of
each Horovod optimizer are cut into buckets once, as DDP cuts its own: its parameters in reverse
order (the order backward produces their gradients), a new bucket whenever the next gradient would
take one past ``bucket_bytes`` or lives on another device. ``compress`` still runs a tensor's
error-feedback step at once and adds its pairs to its bucket; when the bucket's last tensor
arrives, the bucket leaves (the exchange's ``_send``) while backward goes on with the next layers.

**Names.** Every rank cuts the same buckets (the same parameters in the same order, which Horovod's
``broadcast_parameters`` already asks of the model) and names a bucket's collectives after its
first tensor in that order and the count of the others, so the names match on every rank. A
tensor whose bucket is still open when its result is wanted (code that calls ``compress`` and
``decompress`` one tensor at a time; a tensor that Horovod did not hand over this step) sends every
open bucket with the tensors it has: every rank compresses the same tensors of a step before
Horovod asks for any result, so every rank sends the same partial buckets under the same names.

This module only groups tensors; ``bucketed_allgather.py`` (each rank's pairs to every rank) and
``global_topk.py`` (pairs to the owners of their indices) send them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_BUCKET_MB = 25.0   # gradient bytes per bucket, DDP's bucket_cap_mb


@dataclass
class Plan:
    """One optimizer's buckets: each tensor's (bucket, place in it) and each bucket's size."""

    place: dict[str, tuple[int, int]]
    sizes: list[int]


@dataclass
class Bucket:
    """One bucket in one step: the tensors that arrived (``(place, name, *payload)``, sorted by
    place when it leaves), then what its exchange keeps in flight."""

    expected: int
    process_set: Any
    members: list = field(default_factory=list)
    sent: bool = False

    def head_name(self, prefix: str) -> str:
        """The bucket's collective name: after its first tensor and the count of the others."""
        rest = len(self.members) - 1
        return f"{prefix}{self.members[0][1]}" + (f"+{rest}" if rest else "")


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


def _plan_of(buckets: list[list], names: dict) -> Plan:
    place = {names[p]: (b, j) for b, bucket in enumerate(buckets) for j, p in enumerate(bucket)}
    return Plan(place, [len(bucket) for bucket in buckets])


class BucketQueue:
    """Fills one compressor's buckets step after step; a subclass sends them (``_send``)."""

    def __init__(self, bucket_bytes: int, compressed):
        self.bucket_bytes = bucket_bytes
        self.compressed = compressed        # shape -> whether that tensor travels as pairs
        self._plans: dict[int, tuple[Any, Plan]] = {}   # id(optimizer) -> (optimizer, plan)
        self._open: dict[Any, Bucket] = {}
        self._waiting: dict[str, Bucket] = {}

    def plan(self, owner) -> Plan | None:
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

    def _new_bucket(self, expected: int, process_set) -> Bucket:
        return Bucket(expected, process_set)

    def _send(self, bucket: Bucket) -> None:
        raise NotImplementedError

    def add(self, name: str, payload: tuple, process_set, owner=None) -> None:
        """One tensor's part of its bucket; sends the bucket if that was the last tensor it
        waited for."""
        plan = self.plan(owner)
        where = None if plan is None else plan.place.get(name)
        if where is None:   # not in a plan: a bucket of its own
            key, where, expected = ("alone", name), (0, 0), 1
        else:
            key, expected = (id(owner), where[0]), plan.sizes[where[0]]
        bucket = self._open.get(key)
        if bucket is None:
            bucket = self._open[key] = self._new_bucket(expected, process_set)
        bucket.members.append((where, name, *payload))
        self._waiting[name] = bucket
        if len(bucket.members) == bucket.expected:
            del self._open[key]
            self._leave(bucket)

    def flush(self) -> None:
        """Sends every open bucket with the tensors it has (Horovod matches collectives by name,
        so the order does not matter)."""
        for bucket in self._open.values():
            self._leave(bucket)
        self._open = {}

    def _leave(self, bucket: Bucket) -> None:
        bucket.members.sort(key=lambda m: m[0])   # arrival order may differ between ranks
        bucket.sent = True
        self._send(bucket)

    def bucket_of(self, name: str) -> Bucket:
        """The bucket of a tensor whose result is wanted, sent (with every open one) if it was not."""
        bucket = self._waiting.pop(name)
        if not bucket.sent:
            self.flush()
        return bucket
