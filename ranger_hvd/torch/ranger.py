"""``Ranger``: momentum SGD whose momentum lives in the compressor (DGC), sparse exchange built in.

With N > 1 processes, one step of one parameter on one rank is (DGC, Lin et al. 2018)::

    g = grad + weight_decay * p                 weight decay joins the gradient, before momentum
    u = m*u + g ;  v = v + u                    momentum correction: accumulate velocity, not gradient
    send top-k of v ; v[S] = 0 ; u[S] = 0       momentum factor masking
    p = p - lr * (sum over ranks of what they sent) / N

Plain momentum SGD applied to sparsified gradients would keep momentum only of what arrived, and the
delayed entries would lose their momentum history; accumulating velocities keeps it, and masking
stops stale momentum from pushing entries that were just sent. Small and 1-D tensors travel dense
with ordinary local momentum (u = m*u + g, all of u sent), which summed over ranks is momentum SGD
on the averaged gradient.

With one process there is nothing to exchange and ``Ranger`` steps exactly like
``torch.optim.SGD(lr, momentum=m, weight_decay=wd)``.
"""

from __future__ import annotations

import torch
import horovod.torch as hvd
from horovod.torch.mpi_ops import Average, global_process_set

from .compressor import RangerCompressor
from .optimizer import _SparseExchange


class Ranger(_SparseExchange, torch.optim.SGD):
    """Distributed momentum SGD with DGC momentum correction and top-k sparse exchange.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.SGD``.
        lr: learning rate.
        momentum: m, kept by the compressor when N > 1 (per-group ``momentum`` is not supported).
        density: fraction of each compressed tensor sent per step.
        weight_decay: L2 penalty, added to the gradient before momentum (per group).
        named_parameters: optional ``model.named_parameters()``; names key the compressor's state
            and the collectives (default: ``noname.<group>.<index>``, the same on every rank).
        backward_passes_per_step, op, process_set: as for ``horovod.torch.DistributedOptimizer``.
        **compressor_options: any other :class:`RangerCompressor` option (``min_elements``,
            ``value_dtype``, ``warmup_steps``, ``clip_norm``, ...).

    Initialises Horovod if needed. ``compressor`` and ``stats()`` expose the compressor;
    ``state_dict()`` holds the SGD state plus residuals, velocities and step counters.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, density: float = 0.001,
                 weight_decay: float = 0.0, named_parameters=None, backward_passes_per_step: int = 1,
                 op=Average, process_set=global_process_set, **compressor_options):
        torch.optim.SGD.__init__(self, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if not hvd.is_initialized():
            hvd.init()
        compressor = RangerCompressor(density=density, momentum=momentum, **compressor_options)
        self._rx_setup(named_parameters, compressor, backward_passes_per_step, op, 1.0, False,
                       process_set)
        self._rx_group_of = {p: group for group in self.param_groups for p in group["params"]}

    @property
    def distributed(self) -> bool:
        """True when gradients are exchanged (more than one process)."""
        return bool(self._rx_hooks)

    def _rx_gradient(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        wd = self._rx_group_of[p]["weight_decay"]
        if wd:
            return grad.add(p.detach(), alpha=wd)
        return grad

    def step(self, closure=None):
        if not self.distributed:
            sgd_step = torch.optim.SGD.step
            if getattr(sgd_step, "hooked", False):
                # Our own step already ran the optimizer step hooks; do not run them twice.
                sgd_step = sgd_step.__wrapped__
            return sgd_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._rx_before_step()
        # Momentum and weight decay already happened in the compressor: a plain SGD update.
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        return loss
