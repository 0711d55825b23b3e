"""The bucketed allgather of top-k pairs, in one process: Horovod's allgather is replaced by one that
records each call and answers as if every rank had sent the same payload as this one."""

from __future__ import annotations

import types

import pytest
import torch

from ranger_hvd.torch import RangerCompressor
from ranger_hvd.torch.bucketed_allgather import BucketedAllgather, cut_buckets
from ranger_hvd.torch.compressor import pack_pairs


class FakeHorovod:
    def __init__(self, world: int):
        self.world, self.calls, self.results = world, [], {}

    def allgather_async(self, tensor, name=None, **kwargs):
        self.calls.append((name, tensor.clone(), kwargs))
        handle = len(self.calls)
        self.results[handle] = torch.cat([tensor] * self.world)
        return handle

    def synchronize(self, handle):
        return self.results.pop(handle)


@pytest.fixture
def fake_hvd(monkeypatch):
    import horovod.torch as hvd

    fake = FakeHorovod(world=2)
    monkeypatch.setattr(hvd, "allgather_async", fake.allgather_async)
    monkeypatch.setattr(hvd, "synchronize", fake.synchronize)
    return fake


def _owner(shapes):
    """What the buckets read of a Horovod optimizer: param_groups and _parameter_names."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    names = {p: f"p{i}" for i, p in enumerate(params)}
    return types.SimpleNamespace(param_groups=[{"params": params}], _parameter_names=names), params


def test_cut_buckets_in_the_given_order_up_to_the_size():
    params = [torch.zeros(n) for n in (100, 100, 300, 50, 50, 10)]   # 400, 400, 1200, 200, 200, 40 bytes
    sizes = [[p.numel() for p in b] for b in cut_buckets(params, 800)]
    assert sizes == [[100, 100], [300], [50, 50, 10]]    # a tensor over the size is a bucket alone
    assert [[p.numel() for p in b] for b in cut_buckets(params, 10 ** 9)] == [[100, 100, 300, 50, 50, 10]]
    assert len(cut_buckets(params, 1)) == 6


def _pairs(k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(1000, generator=g)[:k].sort().values.to(torch.int32), torch.randn(k, generator=g)


def test_a_bucket_leaves_when_complete_whatever_the_arrival_order(fake_hvd):
    owner, params = _owner([(30, 40), (8,), (20, 50), (10, 10)])   # p1 is not compressed
    layouts = []
    for order in ([3, 2, 0], [0, 3, 2]):
        fake_hvd.calls.clear()
        buckets = BucketedAllgather(torch.float32, 10 ** 6, lambda shape: len(shape) == 2)
        pairs = {i: _pairs(5 + i, i) for i in (0, 2, 3)}
        for n, i in enumerate(order):
            assert len(fake_hvd.calls) == 0, "the bucket left before its last tensor"
            buckets.add(f"p{i}", *pairs[i], None, owner)
        [(name, payload, _)] = fake_hvd.calls
        # backward order: the last parameter first; named after it and the count of the others
        assert name == "ranger.topk.p3+2"
        layouts.append(payload)
        for i in (0, 2, 3):
            indices, values, world, non_finite = buckets.wait(f"p{i}")
            assert world == 2 and non_finite is None
            assert torch.equal(indices, torch.cat([pairs[i][0]] * 2))
            assert torch.equal(values, torch.cat([pairs[i][1]] * 2))
        # indices of every tensor in bucket order, then their values: exactly k * 8 bytes each
        expected = torch.cat([pairs[i][0].view(torch.uint8) for i in (3, 2, 0)]
                             + [pairs[i][1].view(torch.uint8) for i in (3, 2, 0)])
        assert torch.equal(payload, expected)
        assert buckets.received == payload.numel()    # the other rank's row
    assert torch.equal(layouts[0], layouts[1])


def test_an_open_bucket_is_sent_when_a_result_is_wanted(fake_hvd):
    owner, params = _owner([(30, 40), (20, 50), (10, 10)])
    buckets = BucketedAllgather(torch.float16, 10 ** 6, lambda shape: True)
    a, b = _pairs(4, 1), _pairs(3, 2)
    buckets.add("p2", a[0], a[1].half(), None, owner)
    buckets.add("p0", b[0], b[1].half(), None, owner)
    assert fake_hvd.calls == []
    indices, values, _, _ = buckets.wait("p0")              # p1 never came: sent without it
    [(name, payload, _)] = fake_hvd.calls
    assert name == "ranger.topk.p2+1" and payload.numel() == (4 + 3) * (4 + 2)
    assert torch.equal(indices, torch.cat([b[0]] * 2)) and values.dtype == torch.float16
    assert torch.equal(buckets.wait("p2")[1], torch.cat([a[1].half()] * 2))


def test_a_non_finite_value_anywhere_in_a_bucket_is_reported_to_every_tensor_of_it(fake_hvd):
    owner, _ = _owner([(30, 40), (20, 50)])
    buckets = BucketedAllgather(torch.float32, 10 ** 6, lambda shape: True)
    a, b = _pairs(4, 1), _pairs(3, 2)
    b[1][2] = float("inf")
    buckets.add("p1", *a, None, owner)
    buckets.add("p0", *b, None, owner)
    first = buckets.wait("p1")          # its own values are finite, p0's are not
    assert torch.isfinite(first[1]).all()
    assert first[3] is not None and torch.isinf(first[3]).sum() == 2    # both ranks' copies
    assert buckets.wait("p0")[3] is first[3]


def test_one_tensor_alone_keeps_the_per_tensor_payload_and_name(fake_hvd):
    indices, values = _pairs(6, 3)
    for bucket_bytes, owner in ((0, _owner([(30, 40)])[0]), (10 ** 6, None)):
        fake_hvd.calls.clear()
        buckets = BucketedAllgather(torch.float32, bucket_bytes, lambda shape: True)
        buckets.add("p0", indices, values, None, owner)
        [(name, payload, _)] = fake_hvd.calls
        assert name == "ranger.topk.p0" and torch.equal(payload, pack_pairs(indices, values))


def test_bucket_mb_must_be_a_size():
    for bad in (-1, float("nan"), "25"):
        with pytest.raises(ValueError, match="bucket_mb"):
            RangerCompressor(bucket_mb=bad)
    assert RangerCompressor(bucket_mb=0).bucket_bytes == 0
    assert RangerCompressor().bucket_bytes == 25 * 2 ** 20
