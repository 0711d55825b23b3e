"""``DistributedOptimizer`` and ``Ranger``: Horovod's own optimizer with the Ranger compressor.

There is one exchange: Horovod's ``DistributedOptimizer`` calls ``RangerCompressor.compress`` and
``decompress`` around its allreduce, and the compressor sends real per-rank top-k (see
``compressor.py``). What this module adds is convenience, never a second code path:

* :func:`DistributedOptimizer` returns ``horovod.torch.DistributedOptimizer(...)`` unchanged, with
  the compressor's state (residuals, momentum, step and byte counters) added to ``state_dict()`` and
  ``load_state_dict()``, and ``compressor`` and ``stats()`` on the optimizer.
* :func:`Ranger` is momentum SGD built that way in one line.

Both hand Horovod ``groups`` that match the compressor's buckets unless the caller gives ``groups``
or ``num_groups``: each bucket's tokens and small dense tensors then go in one grouped allreduce
beside its one allgather, instead of a collective per parameter.
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Literal

import torch
import horovod.torch as hvd
from horovod.torch.mpi_ops import Average, Sum, global_process_set

from ranger_hvd import core

from .bucketed_allgather import cut_buckets
from .compressor import RangerCompressor

MomentumMode = Literal["global", "dgc", "local"]


def _with_compressor_state(opt, comp: RangerCompressor):
    """Adds the compressor to ``opt``'s checkpoints and exposes it (instance attributes: Horovod's
    class calls ``super(self.__class__, self)``, so it must not be subclassed)."""
    base_state_dict, base_load = opt.state_dict, opt.load_state_dict

    def state_dict(self):
        state = base_state_dict()
        state["ranger"] = comp.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        ranger = state_dict.pop("ranger", None)
        base_load(state_dict)
        if ranger is not None:
            comp.load_state_dict(ranger)

    opt.state_dict = MethodType(state_dict, opt)
    opt.load_state_dict = MethodType(load_state_dict, opt)
    opt.compressor = comp
    opt.stats = comp.stats
    return opt


def bucket_groups(optimizer: torch.optim.Optimizer, bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Horovod ``groups`` cut as the compressor cuts its buckets: the trainable parameters in
    reverse order (as backward produces their gradients), up to ``bucket_bytes`` of gradient each.
    Horovod starts a group's collectives once all of its gradients are in."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    return cut_buckets(params[::-1], bucket_bytes)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=hvd.Compression.none, backward_passes_per_step: int = 1,
                         op=Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups=None, sparse_as_dense: bool = False,
                         process_set=global_process_set):
    """``horovod.torch.DistributedOptimizer`` with the same arguments; with a ``RangerCompressor``
    its ``state_dict()`` also holds the compressor's state.

    Without ``groups``, ``num_groups`` or a ``gradient_predivide_factor``, a ``RangerCompressor``'s
    buckets become Horovod's groups (:func:`bucket_groups`), except under elastic horovodrun. Every argument goes to Horovod unchanged (``groups``,
    ``backward_passes_per_step``,
    ``gradient_predivide_factor``, ``sparse_as_dense``, ``process_set`` all take effect). ``op`` must
    be ``hvd.Average`` or ``hvd.Sum`` with a ``RangerCompressor``: sparse updates can only be added.
    """
    ranger = isinstance(compression, RangerCompressor)
    if ranger and op not in (Average, Sum):
        raise ValueError("RangerCompressor supports op=hvd.Average and op=hvd.Sum (Adasum, Min, Max "
                         "and Product do not commute with sparsification)")
    # (Horovod's grouped allreduce drops the predivide factor: with one, no groups are made.)  Not under
    # elastic horovodrun: Horovod broadcasts the group layout from the optimizer's constructor, and a worker
    # that joins a running job builds its optimizer while the others are in their state sync (a hang).
    elastic = os.environ.get("HOROVOD_ELASTIC") == "1"
    if (ranger and groups is None and num_groups == 0 and compression.bucket_bytes > 0
            and gradient_predivide_factor == 1.0 and not elastic):
        groups = bucket_groups(optimizer, compression.bucket_bytes)
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=compression,
                                   backward_passes_per_step=backward_passes_per_step, op=op,
                                   gradient_predivide_factor=gradient_predivide_factor,
                                   num_groups=num_groups, groups=groups,
                                   sparse_as_dense=sparse_as_dense, process_set=process_set)
    if ranger:
        if process_set.included():
            compression.world_size = process_set.size()
        _with_compressor_state(opt, compression)
    return opt


def Ranger(params, lr: float, momentum: float = 0.9, density: float = 0.01, *,
           momentum_mode: MomentumMode = "global", nesterov: bool = False,
           weight_decay: float = 0.0, named_parameters=None, backward_passes_per_step: int = 1,
           op=Average, process_set=global_process_set, **compressor_options):
    """Distributed momentum SGD whose gradients travel as sparse top-k with error feedback.

    ``momentum_mode="global"`` (default): the compressor does plain error feedback and SGD applies
    momentum (and Nesterov, weight decay) to the averaged sparse update, as PowerSGD and EF-SGD do:

        e = e + g ; send top-k ; update = average of what was sent ; SGD(momentum) on update

    ``momentum_mode="dgc"``: Deep Gradient Compression's momentum correction in the compressor
    (u = m*u + g, v = v + u, send top-k of v, zero u and v where sent) and plain SGD after it.
    ``momentum_mode="local"``: the same without DGC's factor masking (u is never zeroed), so v is
    error feedback on each rank's momentum (Zheng et al. 2019); on the reference RNN it closed the gap
    to dense that the other two leave at 1% density. In both, per-group ``momentum`` and ``nesterov``
    cannot apply (the compressor has one m) and raise. Weight decay joins the averaged update in every
    mode.

    With one process nothing is exchanged and every mode is ``torch.optim.SGD(lr, momentum, ...)``.
    Initialises Horovod if needed. ``compressor_options`` are the other
    :class:`ranger_hvd.core.RangerOptions` (``min_elements``, ``value_dtype``, ``warmup_steps``, ...).
    Returns a Horovod ``DistributedOptimizer`` over SGD, with the compressor's state in
    ``state_dict()``.
    """
    if "momentum" in compressor_options:
        raise ValueError("give Ranger's momentum as momentum=..., with momentum_mode choosing where "
                         "it is applied")
    placement = core.compressor_momentum(momentum_mode, momentum, compressor_options)
    if not hvd.is_initialized():
        hvd.init()
    alone = not process_set.included() or process_set.size() == 1
    in_compressor = momentum_mode != "global" and not alone
    sgd = torch.optim.SGD(params, lr=lr, momentum=0.0 if in_compressor else momentum,
                          nesterov=nesterov and not in_compressor, weight_decay=weight_decay)
    if in_compressor:
        if nesterov:
            raise ValueError(f"nesterov=True needs momentum_mode='global': momentum in the "
                             f"compressor ({momentum_mode!r}) has no Nesterov form")
        odd = [i for i, g in enumerate(sgd.param_groups) if g["momentum"] != 0.0]
        if odd:
            raise ValueError(f"parameter group(s) {odd} set their own momentum; with "
                             f"momentum_mode={momentum_mode!r} one momentum lives in the compressor. "
                             "Use momentum_mode='global' for per-group momentum")
    if not in_compressor:       # one process: SGD keeps the momentum, the compressor none to mask
        placement = {"momentum": 0.0}
    comp = RangerCompressor(density=density, **placement, **compressor_options)
    return DistributedOptimizer(sgd, named_parameters=named_parameters, compression=comp,
                                backward_passes_per_step=backward_passes_per_step, op=op,
                                process_set=process_set)
