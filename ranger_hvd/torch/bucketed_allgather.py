"""One allgather per bucket of compressed tensors, instead of one per tensor (``buckets.py`` says how
tensors are grouped, when a bucket leaves and how it is named).

**Layout.** One rank's payload is the int32 indices of every tensor of the bucket, in bucket order,
then their values in the wire dtype, so each slice is aligned for its dtype without padding: a
tensor still costs exactly k * (4 + value size) bytes. A bucket of one tensor is the payload of
``compressor.pack_pairs``, and its allgather keeps the per-tensor name ``ranger.topk.<name>``.
Each tensor's rows come back in rank order, so the scatter-add gives the bits it gave before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .buckets import DEFAULT_BUCKET_MB, Bucket, BucketQueue, cut_buckets  # noqa: F401
from .state import all_finite


@dataclass
class _Gathered(Bucket):
    """A bucket's allgather: in flight, then every rank's payload."""

    handle: object = None
    gathered: torch.Tensor | None = None
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (first pair, k)
    total: int = 0                                                      # pairs per rank
    non_finite: torch.Tensor | None = None   # every value of the bucket, if one is NaN or Inf


class BucketedAllgather(BucketQueue):
    """The allgathers of one compressor's top-k pairs, a bucket of tensors at a time."""

    def __init__(self, value_dtype: torch.dtype, bucket_bytes: int, compressed):
        super().__init__(bucket_bytes, compressed)
        self.value_dtype = value_dtype
        self.received = 0                   # bytes the allgathers brought from other ranks

    def _new_bucket(self, expected: int, process_set) -> _Gathered:
        return _Gathered(expected, process_set)

    def add(self, name: str, indices: torch.Tensor, values: torch.Tensor, process_set,
            owner=None) -> None:
        """This rank's pairs of one tensor (int32 indices, values in the wire dtype)."""
        super().add(name, (indices, values), process_set, owner)

    def _send(self, bucket: _Gathered) -> None:
        import horovod.torch as hvd

        first = 0
        for _, name, indices, _ in bucket.members:
            bucket.offsets[name] = (first, indices.numel())
            first += indices.numel()
        bucket.total = first
        payload = torch.cat([m[2].view(torch.uint8) for m in bucket.members]
                            + [m[3].reshape(-1).view(torch.uint8) for m in bucket.members])
        kwargs = {} if bucket.process_set is None else {"process_set": bucket.process_set}
        bucket.handle = hvd.allgather_async(payload, name=bucket.head_name("ranger.topk."), **kwargs)
        bucket.members = []   # the payload holds them now

    def wait(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """Every rank's pairs of one tensor, in rank order: (int32 indices, values, number of
        ranks, every value of its bucket if one of them is NaN or Inf, else None: the bucket is
        checked once, when it arrives). Sends the open buckets first if this tensor's is one of
        them."""
        bucket = self.bucket_of(name)
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
