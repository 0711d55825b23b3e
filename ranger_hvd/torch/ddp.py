"""The Ranger exchange as a communication hook for PyTorch ``DistributedDataParallel``.

::

    state = RangerHookState(model.named_parameters(), density=0.01)   # before wrapping
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, ranger_hook)

DDP hands the hook one *bucket* at a time: a flat buffer holding the gradients of several
parameters back to back (``bucket.parameters()`` and ``bucket.gradients()`` give the split). Per
bucket, on each rank:

1. every parameter's gradient goes through the error-feedback engine (``core.ErrorFeedback``, the
   same step as Horovod's ``compression=`` hook): a compressed one yields its top-k (indices,
   values) and keeps the rest in its residual; a small or 1-D one goes whole;
2. the pairs of all compressed parameters of the bucket, their indices shifted to positions in the
   bucket, travel in one ``all_gather`` (every rank sends the same number of pairs, since k depends
   only on the shapes); the whole ones travel in one ``all_reduce``;
3. the returned future scatter-adds every rank's pairs in rank order into a zero buffer, puts the
   summed whole gradients in their place and divides by N: the average, as DDP's own hook gives.

With ``exchange="global_topk"`` step 2 is the global exchange of ``core/global_topk.py`` on the
bucket (the same helpers as Horovod's path, ``torch/global_topk.py``: each tensor keeps its own
ranges, budgets and last selection G): the pairs go to the owners of their indices in one
``all_to_all_single`` (after one of the counts), each owner keeps its budget of the largest sums,
and one ``all_gather`` of the kept rows (after one of their lengths: Gloo gathers equal sizes)
gives every rank G; this rank's pairs outside G go back into its residual. These collectives run
one after the other inside the hook, so the bucket's exchange does not overlap with backward;
every rank issues them in DDP's bucket order, the same everywhere.

The state is keyed by parameter *name*, not by bucket index (DDP rebuilds its buckets after the
first iteration, and ``bucket_cap_mb`` moves parameters between buckets), so ``state_dict()``
checkpoints residuals, momentum, step and byte counters and loads them into a fresh state.

Non-finite gradients (mixed precision): as in the compressor, a rank's NaN/Inf reaches everyone's
average (``GradScaler`` sees it and skips the step) and never its state, and every rank undoes what
it sent in a void step. A step is the run of buckets up to ``bucket.is_last()``.
"""

# No ``from __future__ import annotations``: DDP checks the hook's return annotation as an object.
from typing import Iterable

import torch
import torch.distributed as dist

from ranger_hvd.core import COUNTERS

from .compressor import WIRE_DTYPES, RangerCompressor, StepRound
from .global_topk import route


class RangerHookState:
    """What :func:`ranger_hook` keeps between steps, in the style of PyTorch's ``PowerSGDState``.

    Args:
        named_parameters: ``model.named_parameters()`` of the model DDP wraps: the names key the
            state, so that it survives bucket rebuilds and checkpoints.
        process_group: the group to exchange in (default: the global group).
        density, momentum, min_elements, **options: as :class:`RangerCompressor` (validated by the
            same model, ``core.RangerOptions``).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], process_group=None,
                 density: float = 0.01, momentum: float = 0.0, min_elements: int = 1024,
                 **options):
        if options.get("selection", "topk") != "topk":
            raise ValueError("ranger_hook exchanges top-k pairs; selection='random' is for "
                             "Horovod's compression= hook")
        if options.get("hierarchical", False):
            raise ValueError("ranger_hook exchanges among all ranks; hierarchical=True is for "
                             "Horovod's compression= hook so far")
        self.compressor = RangerCompressor(density=density, momentum=momentum,
                                           min_elements=min_elements, **options)
        self.options = self.compressor.options
        self.process_group = process_group
        self.names: dict[int, str] = {}
        for name, p in named_parameters:
            self.names[id(p)] = name
        if not self.names:
            raise ValueError("RangerHookState needs the model's named_parameters()")
        self.round = StepRound(self.compressor.engine)
        self._round_closed = True

    def name_of(self, p: torch.Tensor) -> str:
        try:
            return self.names[id(p)]
        except KeyError:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} in DDP's bucket is not among "
                             "the named_parameters given to RangerHookState: pass the "
                             "named_parameters() of the model that DDP wraps") from None

    def world(self) -> int:
        return dist.get_world_size(self.process_group)

    def stats(self) -> dict:
        """Cumulative bytes this rank handed to the collectives, and what plain fp32 would have."""
        return self.compressor.stats()

    def state_dict(self) -> dict:
        """Residuals, momentum, step and byte counters, keyed by parameter name."""
        return self.compressor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state)


def ranger_hook(state: RangerHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over ranks through top-k pairs with
    error feedback (see the module doc). Register with ``ddp.register_comm_hook(state, ranger_hook)``."""
    comp, world = state.compressor, state.world()
    if state._round_closed:   # the first bucket of a step
        state.round.reset()
        state._round_closed = False
    buffer = bucket.buffer()
    global_topk = state.options.exchange == "global_topk"
    if global_topk:
        _global_on_cpu(buffer)   # before any state changes
    wire = WIRE_DTYPES[state.options.value_dtype]
    dense_pos, dense_vals, names = [], [], []
    sparse_entries = []   # (name, numel, offset in the bucket, int32 indices, values on the wire)
    offset = 0
    for p, grad in zip(bucket.parameters(), bucket.gradients()):
        name = state.name_of(p)
        names.append(name)
        st = comp._state_of(name)
        state.round.add(name, st)
        n = grad.numel()
        if comp.is_compressed(grad.shape):
            indices, values, _ = comp.engine.sparse_step(st, grad, name, grad.shape, world,
                                                         token=False)
            sparse_entries.append((name, n, offset, indices.to(torch.int32), values.to(wire)))
        else:
            dense_vals.append(comp.engine.dense_step(st, grad, name, buffer.element_size())
                              .reshape(-1))
            dense_pos.append(torch.arange(offset, offset + n, device=buffer.device))
        offset += n
    if bucket.is_last():
        state._round_closed = True
    group = state.process_group
    if global_topk and sparse_entries:
        return _global_bucket(state, buffer, world, names, sparse_entries, dense_pos, dense_vals)
    # the allgather: every compressed tensor's indices shifted to their place in the bucket
    sparse_idx = [idx + offset for _, _, offset, idx, _ in sparse_entries]
    sparse_val = [vals for *_, vals in sparse_entries]
    futures, dense, gathered = [], None, []
    if dense_vals:
        dense = torch.cat(dense_vals)
        futures.append(dist.all_reduce(dense, group=group, async_op=True).get_future())
    if sparse_idx:
        indices = torch.cat(sparse_idx)
        payload = torch.cat([indices.view(torch.uint8), torch.cat(sparse_val).view(torch.uint8)])
        gathered = [torch.empty_like(payload) for _ in range(world)]
        futures.append(dist.all_gather(gathered, payload, group=group, async_op=True).get_future())
    k = sum(i.numel() for i in sparse_idx)

    def finish(_):
        out = torch.zeros_like(buffer)
        received = []
        # the collectives wrote into dense and gathered (their futures are done)
        if dense is not None:
            received.append(dense)
            out.index_copy_(0, torch.cat(dense_pos), dense.to(out.dtype))
        if gathered:
            rows = torch.stack(gathered)
            idx = rows[:, : 4 * k].reshape(-1).view(torch.int32)
            vals = rows[:, 4 * k:].reshape(-1).view(wire)
            received.append(vals)
            out.index_add_(0, idx, vals.to(out.dtype))
        state.round.check(names, received)   # a NaN/Inf: the step is void, each tensor undone
        return out.div_(world)

    return torch.futures.collect_all(futures).then(finish)


def _global_on_cpu(buffer: torch.Tensor) -> None:
    """The global exchange's owner step runs in NumPy: a bucket off the CPU is refused."""
    if buffer.device.type != "cpu":
        raise ValueError(f"ranger_hook's exchange='global_topk' runs on CPU tensors (Gloo) only; this "
                         f"bucket is on {buffer.device}. Use exchange='allgather' there")


def _global_bucket(state: RangerHookState, buffer: torch.Tensor, world: int, names: list[str],
                   entries: list, dense_pos: list, dense_vals: list) -> torch.futures.Future:
    """One bucket through the global top-k exchange (module doc): the averaged bucket, in a future
    that is already complete."""
    comp, group = state.compressor, state.process_group
    gtopk = comp._global
    dense = None
    if dense_vals:   # the whole tensors travel beside the sparse exchange
        dense = torch.cat(dense_vals)
        dense_work = dist.all_reduce(dense, group=group, async_op=True)
    # step 1: each pair to the owner of its index
    routed = route([(name, n, idx, vals) for name, n, _, idx, vals in entries], world, gtopk.last,
                   comp._state)
    sent_counts = routed.splits.to(torch.int64)
    got_counts = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(got_counts, sent_counts, group=group)
    # the counts (8 bytes per rank) and the kept length (8 bytes) count too: handed over, and
    # brought from the other ranks
    comp._stats.add([8 * world + 8] + [0] * (len(COUNTERS) - 1))
    gtopk.received += 16 * (world - 1)
    width = routed.rows.shape[1]
    arrived = torch.empty(int(got_counts.sum()), width, dtype=torch.uint8)
    dist.all_to_all_single(arrived, routed.rows, got_counts.tolist(), sent_counts.tolist(),
                           group=group)
    me = dist.get_rank(group)
    gtopk.received += arrived.numel() - int(got_counts[me]) * width
    # step 2: this rank's owner work, then every owner's kept rows to every rank
    kept = gtopk.keep_received(arrived, routed.parts, routed.starts, me, routed.sum_dtype)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([kept.shape[0]], dtype=torch.int64), group=group)
    lengths = [int(t) for t in lengths]
    longest = max(lengths)
    padded = torch.zeros(longest, kept.shape[1], dtype=torch.uint8)
    padded[: kept.shape[0]] = kept
    rows = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(rows, padded, group=group)
    every = torch.cat([r[:m] for r, m in zip(rows, lengths)])
    gtopk.received += (world - 1) * padded.numel()   # the padding travels too
    # step 3: G per tensor; this rank's pairs outside G go back into its residual
    selected = gtopk.apply_selection(every, routed.parts, routed.starts, routed.sum_dtype,
                                     padded.numel())
    out = torch.zeros_like(buffer)
    received = []
    for name, n, offset, _, _ in entries:
        g_idx, g_sums = selected[name]
        received.append(g_sums)
        out.index_add_(0, g_idx.to(torch.int64) + offset, g_sums.to(out.dtype))
    if dense is not None:
        dense_work.wait()
        received.append(dense)
        out.index_copy_(0, torch.cat(dense_pos), dense.to(out.dtype))
    state.round.check(names, received)   # a NaN/Inf: the step is void, each tensor undone
    done = torch.futures.Future()
    done.set_result(out.div_(world))
    return done
