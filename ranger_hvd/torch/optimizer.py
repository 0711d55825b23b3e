"""``DistributedOptimizer``: Horovod's drop-in optimizer wrapper, with real per-rank top-k.

What happens to one gradient, from ``loss.backward()`` to ``step()``::

    hook (after the last of backward_passes_per_step passes accumulated into p.grad):
        compressed tensor:  (values, idx) = compressor.compress_sparse(name, p.grad)   # top-k + EF
                            payload = [idx as int32 | values] as bytes
                            allgather_async(payload, name="ranger.sparse.<name>")      # N * k pairs
        other tensor:       allreduce_async_(p.grad or its momentum, name="ranger.dense.<name>")
    synchronize():
        p.grad = 0; p.grad.index_add_(all N ranks' idx, values)       # one scatter-add, rank order
        op=Average: p.grad *= gradient_predivide_factor / N           # as Horovod's postscale

Every rank sends the same k for a tensor (k depends only on its size and step), so the allgather
sizes match; payloads arrive in rank order, so every rank adds them in the same order and ends with
bit-identical gradients. Collective names are the parameter names, never an order or a counter, so
ranks that finish backward in different orders still pair up.

Hooks, ``backward_passes_per_step``, ``synchronize()``, ``skip_synchronize()`` and the
``zero_grad()`` check behave as in ``horovod.torch.DistributedOptimizer``; like Horovod, nothing is
registered when the job has a single process, and then the wrapped optimizer runs untouched.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
import horovod.torch as hvd
from horovod.torch.mpi_ops import Adasum, Average, Sum, global_process_set

from .compressor import RangerCompressor

_PREFIX = "ranger"  # prefix of every collective this package starts


class _Pending:
    """One launched collective of one parameter, waiting for synchronize()."""

    __slots__ = ("handle", "sparse", "k", "reduced", "sparse_grad")

    def __init__(self, handle, sparse: bool, k: int = 0, reduced: torch.Tensor | None = None,
                 sparse_grad: bool = False):
        self.handle = handle
        self.sparse = sparse
        self.k = k
        self.reduced = reduced          # dense: the tensor reduced in place
        self.sparse_grad = sparse_grad  # sparse_as_dense: turn the result back into a sparse grad


def _named(optimizer_groups, named_parameters) -> dict[torch.Tensor, str]:
    """Parameter -> name, with Horovod's checks (tuples, unique names, every parameter named)."""
    if named_parameters is not None:
        named = list(named_parameters)
    else:
        named = [(f"noname.{i}.{j}", p) for i, group in enumerate(optimizer_groups)
                 for j, p in enumerate(group["params"])]
    if any(not isinstance(item, tuple) for item in named):
        raise ValueError("named_parameters should be a sequence of (name, parameter) tuples, "
                         "usually produced by model.named_parameters()")
    seen, dups = set(), set()
    for name, _ in named:
        (dups if name in seen else seen).add(name)
    if dups:
        raise ValueError("parameter names in named_parameters must be unique; duplicates: "
                         + ", ".join(sorted(dups)))
    named_ids = {id(p) for _, p in named}
    unnamed = [p for group in optimizer_groups for p in group["params"] if id(p) not in named_ids]
    if unnamed:
        raise ValueError(f"named_parameters was given, but {len(unnamed)} parameter(s) of the "
                         "optimizer are not in it")
    return {p: name for name, p in named}


class _SparseExchange:
    """Mixin putting the sparse exchange in front of an optimizer's ``step()``.

    Used as a base of ``DistributedOptimizer``'s class (before the wrapped optimizer's class) and
    of ``Ranger``. All attributes are prefixed ``_rx_`` to stay clear of the optimizer's own.
    """

    def _rx_setup(self, named_parameters, compressor: RangerCompressor,
                  backward_passes_per_step: int = 1, op=Average,
                  gradient_predivide_factor: float = 1.0, sparse_as_dense: bool = False,
                  process_set=global_process_set) -> None:
        if backward_passes_per_step <= 0:
            raise ValueError("backward_passes_per_step must be > 0")
        if op not in (Average, Sum):
            raise ValueError("RangerCompressor supports op=hvd.Average and op=hvd.Sum "
                             "(Adasum, Min, Max and Product do not commute with sparsification)")
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        self._rx_names = _named(self.param_groups, named_parameters)
        self._rx_comp = compressor
        self._rx_op = op
        self._rx_predivide = float(gradient_predivide_factor)
        self._rx_sparse_as_dense = sparse_as_dense
        self._rx_process_set = process_set
        self.backward_passes_per_step = backward_passes_per_step
        self._rx_delay = {p: backward_passes_per_step for p in self._rx_names}
        self._rx_pending: dict[torch.Tensor, _Pending | None] = {}
        self._rx_hooks = []
        self._rx_requires_update: list[torch.Tensor] = []
        self._rx_synchronized = False
        self._rx_should_synchronize = True
        self._rx_world = process_set.size() if process_set.included() else 1
        compressor.world_size = self._rx_world
        distributed = self._rx_world > 1 or os.environ.get("HOROVOD_ELASTIC") == "1"
        if process_set.included() and distributed:
            self._rx_register_hooks()

    # ------------------------------------------------------------------ hooks
    def _rx_register_hooks(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._rx_requires_update.append(p)
                    self._rx_hooks.append(p.register_post_accumulate_grad_hook(self._rx_make_hook(p)))

    def _rx_make_hook(self, p: torch.Tensor):
        def hook(_param):
            if self._rx_pending.get(p) is not None and self._rx_delay[p] <= 0:
                raise AssertionError("Gradients were computed more than backward_passes_per_step "
                                     "times before call to step(). Increase "
                                     "backward_passes_per_step to accumulate gradients locally.")
            assert self._rx_delay[p] > 0
            self._rx_delay[p] -= 1
            self._rx_pending[p] = self._rx_launch(p) if self._rx_delay[p] == 0 else None
        return hook

    def _rx_gradient(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the compressor sees; ``Ranger`` adds weight decay here."""
        return grad

    def _rx_launch(self, p: torch.Tensor) -> _Pending:
        if p.grad is None:
            # Another rank may have a gradient for p (dynamic graphs): always take part.
            p.grad = torch.zeros_like(p)
        name = self._rx_names[p]
        grad = p.grad
        sparse_grad = grad.is_sparse
        if sparse_grad:
            if not self._rx_sparse_as_dense:
                raise ValueError(f"parameter {name!r} has a sparse gradient; pass sparse_as_dense=True")
            grad = grad.to_dense()
        grad = self._rx_gradient(p, grad)
        comp = self._rx_comp
        prescale, postscale = self._rx_scales()
        ps = self._rx_process_set
        if comp.is_compressed(p.shape):
            values, indices = comp.compress_sparse(name, grad, scale=prescale)
            # One collective per tensor: int32 indices then values, as raw bytes.
            payload = torch.cat([indices.view(torch.uint8), values.view(torch.uint8)])
            handle = hvd.allgather_async(payload, name=f"{_PREFIX}.sparse.{name}", process_set=ps)
            return _Pending(handle, True, k=indices.numel(), sparse_grad=sparse_grad)
        # The gradient itself (reduced in place, as Horovod does) or a fresh tensor (momentum).
        reduced = comp.compress_dense(name, grad)
        if reduced.dtype == torch.bfloat16:
            reduced = reduced.to(torch.float32)  # Horovod 0.28.1 has no bfloat16 collectives
        reduced = reduced.contiguous()
        comp.record_dense(reduced.numel(), reduced.element_size())
        handle = hvd.allreduce_async_(reduced, name=f"{_PREFIX}.dense.{name}", op=self._rx_op,
                                      prescale_factor=prescale, postscale_factor=postscale,
                                      process_set=ps)
        return _Pending(handle, False, reduced=reduced, sparse_grad=sparse_grad)

    def _rx_scales(self) -> tuple[float, float]:
        # Horovod splits an average into 1/f before the sum and f/N after it.
        if self._rx_op == Average:
            return 1.0 / self._rx_predivide, self._rx_predivide
        return 1.0, 1.0

    # ------------------------------------------------------------------ synchronize
    def _rx_finish(self, p: torch.Tensor, pending: _Pending) -> None:
        out = hvd.synchronize(pending.handle)
        self._rx_delay[p] = self.backward_passes_per_step
        if pending.sparse_grad:
            target = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        else:
            target = p.grad
        if pending.sparse:
            k, n = pending.k, self._rx_world
            rows = out.view(n, -1)
            indices = rows[:, : 4 * k].contiguous().view(torch.int32).view(-1)
            values = rows[:, 4 * k:].contiguous().view(self._rx_comp.value_dtype).view(-1)
            if not target.is_contiguous():
                target = torch.empty(p.shape, dtype=p.grad.dtype, device=p.device)
            self._rx_comp.decompress_sparse(values, indices, target)
            if self._rx_op == Average:
                # Horovod's postscale: (f / N), applied in the tensor's own precision.
                target.mul_(self._rx_predivide / n)
        elif pending.reduced is not target:
            target.copy_(pending.reduced.view(target.shape))
        if pending.sparse_grad:
            p.grad = target.to_sparse()
        elif target is not p.grad:
            p.grad.copy_(target)

    def synchronize(self) -> None:
        """Waits for every gradient's exchange and writes the combined gradients into ``p.grad``."""
        if not self._rx_process_set.included():
            self._rx_synchronized = True
            return
        for p in self._rx_requires_update:
            if self._rx_pending.get(p) is None:
                # Never produced a gradient this step, or was still short of its passes.
                self._rx_pending[p] = self._rx_launch(p)
        for p, pending in self._rx_pending.items():
            self._rx_finish(p, pending)
        if self._rx_pending:
            self._rx_comp.end_step()
        self._rx_pending.clear()
        self._rx_synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """Lets ``step()`` skip synchronization after an explicit ``synchronize()`` (e.g. to clip)."""
        self._rx_should_synchronize = False
        try:
            yield
        finally:
            self._rx_should_synchronize = True

    def _rx_before_step(self) -> None:
        if self._rx_should_synchronize:
            if self._rx_synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._rx_synchronized = False

    def step(self, closure=None):
        self._rx_before_step()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if any(v is not None for v in self._rx_pending.values()):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        return super().zero_grad(set_to_none=set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._rx_delay:
            self._rx_delay[p] = passes

    # ------------------------------------------------------------------ state
    @property
    def compressor(self) -> RangerCompressor:
        return self._rx_comp

    def stats(self) -> dict:
        """The compressor's cumulative byte counts (see ``RangerCompressor.stats``)."""
        return self._rx_comp.stats()

    def state_dict(self):
        """The wrapped optimizer's state plus ``"ranger"``: residuals, momentum, step counters."""
        state = super().state_dict()
        state["ranger"] = self._rx_comp.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        ranger = state_dict.pop("ranger", None)
        self._rx_pending.clear()
        self._rx_synchronized = False
        self._rx_should_synchronize = True
        for p in self._rx_delay:
            self._rx_delay[p] = self.backward_passes_per_step
        super().load_state_dict(state_dict)
        if ranger is not None:
            self._rx_comp.load_state_dict(ranger)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=hvd.Compression.none, backward_passes_per_step: int = 1,
                         op=Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups=None, sparse_as_dense: bool = False,
                         process_set=global_process_set):
    """Drop-in for ``horovod.torch.DistributedOptimizer`` that exchanges top-k sparse gradients.

    Same arguments as Horovod's. With ``compression=RangerCompressor(...)`` each rank sends, per
    compressed tensor, its own top-k (values and int32 indices) through one allgather, keeps the
    rest as a residual (error feedback), and every rank scatter-adds all payloads into the
    gradient; small and 1-D tensors are allreduced whole. With any other ``compression``
    (``hvd.Compression.none``, ``hvd.Compression.fp16``) this simply returns Horovod's optimizer.

    ``op`` may be ``hvd.Average`` or ``hvd.Sum``; ``gradient_predivide_factor`` splits the average
    as in Horovod. ``num_groups``/``groups`` are accepted for compatibility and ignored: every
    tensor has its own collective, and Horovod's tensor fusion still batches those that are ready
    together. The returned object is an instance of a subclass of the optimizer's class that shares
    the optimizer's parameter groups and state; ``state_dict()`` also holds the compressor's state.
    """
    if not isinstance(compression, RangerCompressor):
        return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                        compression=compression,
                                        backward_passes_per_step=backward_passes_per_step, op=op,
                                        gradient_predivide_factor=gradient_predivide_factor,
                                        num_groups=num_groups, groups=groups,
                                        sparse_as_dense=sparse_as_dense, process_set=process_set)
    if op == Adasum:
        raise ValueError("op=hvd.Adasum cannot be combined with RangerCompressor")
    base = optimizer.__class__
    cls = type(base.__name__, (_SparseExchange, base), {"__module__": base.__module__,
                                                        "__doc__": base.__doc__})
    # Share the wrapped optimizer's attributes (param_groups, state, defaults, hooks) instead of
    # building it again from param_groups, so its defaults and any loaded state are kept.
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._rx_setup(named_parameters, compression, backward_passes_per_step, op,
                      gradient_predivide_factor, sparse_as_dense, process_set)
    return wrapped
