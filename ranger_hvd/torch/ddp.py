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

from .compressor import WIRE_DTYPES, RangerCompressor, StepRound


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
        if options.get("exchange", "allgather") != "allgather":
            raise ValueError("ranger_hook has the allgather exchange only; exchange="
                             f"{options['exchange']!r} is for Horovod's compression= hook so far")
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
    wire = WIRE_DTYPES[state.options.value_dtype]
    sparse_idx, sparse_val, dense_pos, dense_vals, names = [], [], [], [], []
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
            sparse_idx.append(indices.to(torch.int32) + offset)
            sparse_val.append(values.to(wire))
        else:
            dense_vals.append(comp.engine.dense_step(st, grad, name, buffer.element_size())
                              .reshape(-1))
            dense_pos.append(torch.arange(offset, offset + n, device=buffer.device))
        offset += n
    if bucket.is_last():
        state._round_closed = True
    group = state.process_group
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
