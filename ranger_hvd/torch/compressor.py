"""``RangerCompressor``: sparse gradient compression with error feedback, for PyTorch and Horovod.

One object serves two exchanges; which one runs depends on who holds it.

**Top-k with an allgather** (``ranger_hvd.torch.DistributedOptimizer`` and ``Ranger``).
Each rank sends the k entries of largest magnitude of its own accumulated gradient, as (int32
index, value) pairs, through one allgather per tensor; every rank then scatter-adds all N payloads
into one zeroed gradient. The optimizer calls :meth:`compress_sparse` and :meth:`decompress_sparse`.

**Random-k inside Horovod's allreduce** (``horovod.torch.DistributedOptimizer(compression=comp)``).
Horovod sums the compressed tensors elementwise and does not say which parameter a tensor belongs to
(Horovod issue #3312), so every rank must send values for the *same* coordinates. They are drawn
from ``core.random_k_seed(seed, parameter name, step)``: identical on every rank with no message.
Only the k values travel; the indices stay in the context. Horovod calls :meth:`compress` and
:meth:`decompress`; the parameter is found among ``named_parameters`` by the identity of its
``.grad``.

Both keep the same per-parameter state (keyed by parameter name), as in ``core/reference.py``::

    m = 0:  acc = e + g ;              send acc[S] ;  e = acc with acc[S] = 0
    m > 0:  u = m*u + g ;  v = v + u ; send v[S]   ;  v[S] = 0 ; u[S] = 0   (momentum factor masking)

where S is the top-k set (or the shared random set). With m = 0 nothing is ever lost: for every
rank, what it sent plus its residual ``e`` equals the sum of its gradients. Residuals are kept in
the gradient's dtype; values may travel as float16 or bfloat16 (``value_dtype``).

Tensors that :func:`core.is_compressed` rejects (small ones, 1-D ones by default) travel dense. With
momentum they carry DGC's plain local momentum u = m*u + g (all of it is sent, so there is nothing
to mask), which, summed over ranks, is ordinary momentum on the averaged gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ranger_hvd import core
from ranger_hvd.core.options import VALUE_ITEMSIZE

from .selection import SelectionScratch, random_k_indices, topk_indices

_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ACCEPTED_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf; raised before it could poison the residual."""


@dataclass
class _TensorState:
    residual: torch.Tensor | None = None   # e (m = 0) or v (m > 0), flat, gradient dtype
    velocity: torch.Tensor | None = None   # u, only with momentum
    step: int = 0                          # exchanges done for this tensor (drives warm-up and seeds)


@dataclass
class _HorovodContext:
    """What :meth:`RangerCompressor.decompress` needs; stays on this rank."""
    indices: torch.Tensor | None  # None: the tensor went dense
    shape: torch.Size
    dtype: torch.dtype


class RangerCompressor:
    """Sparse compression with error feedback (and optional DGC momentum correction).

    Args:
        density: fraction d of each compressed tensor's entries sent per step;
            k = max(1, ceil(d * n)).
        momentum: DGC momentum correction m (0 = plain error feedback). With m > 0 the optimizer
            must not add momentum of its own (use ``torch.optim.SGD(momentum=0)``, or ``Ranger``).
        min_elements: tensors with fewer entries go dense.
        named_parameters: ``model.named_parameters()``; required when the compressor is handed to
            Horovod's own ``DistributedOptimizer``, which passes gradients without names.
        **options: the rest of :class:`ranger_hvd.core.RangerOptions` (``compress_1d``,
            ``warmup_steps``, ``warmup_start_density``, ``clip_norm``, ``value_dtype``,
            ``check_finite``, ``sample_fraction``, ``seed``).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, density: float = 0.01, momentum: float = 0.0, min_elements: int = 1024,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None, **options):
        self.options = core.make_options(density=density, momentum=momentum,
                                         min_elements=min_elements, **options)
        self.value_dtype = _WIRE_DTYPES[self.options.value_dtype]
        self._params: dict[str, torch.Tensor] = {}
        self._grad_owner: dict[int, str] = {}   # id(p.grad) -> name, verified on every use
        if named_parameters is not None:
            self.set_named_parameters(named_parameters)
        self._state: dict[str, _TensorState] = {}
        self._stats = core.CompressionStats()
        self._scratch = SelectionScratch()
        self.world_size: int | None = None       # set by the optimizers; else read from Horovod

    # ------------------------------------------------------------------ configuration
    def set_named_parameters(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = {}
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError("named_parameters must yield (name, parameter) tuples, as "
                                 "model.named_parameters() does")
            name, p = item
            if name in params:
                raise ValueError(f"duplicate parameter name in named_parameters: {name!r}")
            params[name] = p
        self._params = params
        self._grad_owner.clear()

    def is_compressed(self, shape) -> bool:
        """Whether a tensor of this shape is sparsified (else it travels dense)."""
        return core.is_compressed(tuple(shape), self.options)

    def num_selected(self, name: str, numel: int) -> int:
        """k for this tensor at its next exchange (the warm-up schedule depends on its step)."""
        step = self._state[name].step if name in self._state else 0
        return core.num_selected(numel, core.density_at(step, self.options))

    def _world(self) -> int:
        if self.world_size is None:
            try:
                import horovod.torch as hvd  # only needed when Horovod drives the compressor
            except ImportError:
                return 1
            if not hvd.is_initialized():
                return 1  # used outside a job (tests, tools): a single worker
            self.world_size = hvd.size()
        return self.world_size

    # ------------------------------------------------------------------ shared state update
    def _check(self, name: str, grad: torch.Tensor) -> None:
        if grad.dtype not in _ACCEPTED_GRAD_DTYPES:
            raise TypeError(f"RangerCompressor: gradient of {name!r} has dtype {grad.dtype}; "
                            "expected a floating point tensor")
        if grad.is_sparse:
            raise TypeError(f"RangerCompressor: gradient of {name!r} is a sparse tensor; "
                            "pass sparse_as_dense=True")
        if self.options.check_finite:
            # A sum is one read-only pass and propagates NaN/Inf; only if it is not finite (which an
            # overflow of large finite values can also cause) is the exact elementwise test run.
            if not bool(torch.isfinite(grad.sum())) and not bool(torch.isfinite(grad).all()):
                step = self._state[name].step if name in self._state else 0
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN or Inf) for parameter {name!r} at step {step}; "
                    "its residual was left untouched. Lower the learning rate or use loss "
                    "scaling, or pass check_finite=False to skip this check.")

    def _state_for(self, name: str, flat: torch.Tensor) -> _TensorState:
        st = self._state.get(name)
        if st is None:
            st = self._state[name] = _TensorState()
        if st.residual is None or st.residual.numel() != flat.numel():
            if st.residual is not None:
                raise ValueError(f"parameter {name!r} changed size from {st.residual.numel()} to "
                                 f"{flat.numel()} entries")
            st.residual = torch.zeros_like(flat)
        elif st.residual.dtype != flat.dtype or st.residual.device != flat.device:
            st.residual = st.residual.to(device=flat.device, dtype=flat.dtype)
        if self.options.momentum > 0:
            if st.velocity is None:
                st.velocity = torch.zeros_like(flat)
            elif st.velocity.dtype != flat.dtype or st.velocity.device != flat.device:
                st.velocity = st.velocity.to(device=flat.device, dtype=flat.dtype)
        return st

    def _accumulate(self, name: str, grad: torch.Tensor) -> tuple[_TensorState, torch.Tensor]:
        """Folds one gradient into the state; returns the state and acc (the residual buffer itself).

        Done in place: the residual buffer becomes acc, and the caller zeroes what it sends, which
        leaves exactly ``e = acc with acc[S] = 0`` without allocating a tensor of the full size.
        """
        self._check(name, grad)
        flat = grad.detach().reshape(-1)
        st = self._state_for(name, flat)
        if self.options.clip_norm is not None:
            limit = core.clip_threshold(self.options, self._world())
            norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
            if norm > limit:
                flat = flat * (limit / norm)
        m = self.options.momentum
        if m > 0:
            st.velocity.mul_(m).add_(flat)       # u = m*u + g
            st.residual.add_(st.velocity)        # v = v + u
        else:
            st.residual.add_(flat)               # acc = e + g
        return st, st.residual

    def _finish(self, st: _TensorState, indices: torch.Tensor) -> None:
        st.residual[indices] = 0                 # what was sent leaves the residual
        if st.velocity is not None:
            st.velocity[indices] = 0             # momentum factor masking
        st.step += 1

    # ------------------------------------------------------------------ (a): top-k + allgather
    def compress_sparse(self, name: str, grad: torch.Tensor,
                        scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One error-feedback step of a named tensor: returns (values, indices) to allgather.

        ``values`` are ``acc[S] * scale`` in ``value_dtype`` (``scale`` is Horovod's prescale
        factor; the residual keeps the unscaled acc), ``indices`` the int32 set S, ascending,
        equal to ``core.reference.select(acc, k)``.
        """
        st, acc = self._accumulate(name, grad)
        k = core.num_selected(acc.numel(), core.density_at(st.step, self.options))
        indices = topk_indices(acc, k, self.options.sample_fraction, self._scratch)
        values = acc[indices]
        if scale != 1.0:
            values.mul_(scale)
        values = values.to(self.value_dtype)
        self._finish(st, indices)
        self._stats.record_sparse(acc.numel(), k, self.options.value_dtype, with_indices=True)
        return values, indices

    @staticmethod
    def decompress_sparse(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Adds every rank's (indices, values) into ``out`` (zeroed here) with one scatter-add.

        Duplicate indices from different ranks accumulate; the order of the additions is the
        order of the payloads (rank order from the allgather), so every rank gets the same bits.
        """
        flat = out.view(-1)
        flat.zero_()
        flat.index_add_(0, indices, values.to(out.dtype))
        return out

    def compress_dense(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """A tensor that travels whole: the gradient itself, or with momentum u = m*u + g.

        Returns the tensor to reduce (a fresh one when momentum is on, so the reduction may work in
        place without touching u).
        """
        if self.options.check_finite:
            self._check(name, grad)
        st = self._state.setdefault(name, _TensorState())
        st.step += 1
        if self.options.momentum <= 0:
            return grad
        flat = grad.detach().reshape(-1)
        # Only u: everything is sent, so a dense tensor never has a residual.
        if st.velocity is None or st.velocity.numel() != flat.numel():
            st.velocity = torch.zeros_like(flat)
        elif st.velocity.dtype != flat.dtype or st.velocity.device != flat.device:
            st.velocity = st.velocity.to(device=flat.device, dtype=flat.dtype)
        st.velocity.mul_(self.options.momentum).add_(flat)
        return st.velocity.view_as(grad).clone()

    def record_dense(self, numel: int, itemsize: int) -> None:
        """Counts a dense collective of ``numel`` entries of ``itemsize`` bytes."""
        self._stats.record_dense(numel, itemsize)

    def end_step(self) -> None:
        """Closes one optimizer step in the byte accounting."""
        self._stats.end_step()

    # ------------------------------------------------------------------ (b): Horovod's interface
    def _name_of(self, tensor: torch.Tensor) -> str:
        name = self._grad_owner.get(id(tensor))
        if name is not None and self._params[name].grad is tensor:
            return name
        for name, p in self._params.items():
            if p.grad is tensor:
                self._grad_owner[id(tensor)] = name
                return name
        if not self._params:
            raise ValueError("RangerCompressor used as Horovod's compression= needs "
                             "named_parameters=model.named_parameters() to know which parameter a "
                             "gradient belongs to")
        raise ValueError(f"RangerCompressor.compress got a tensor of shape {tuple(tensor.shape)} "
                         "that is not the .grad of any parameter in named_parameters (sparse "
                         "gradients with sparse_as_dense, or a model other than the one given, "
                         "cause this)")

    def compress(self, tensor: torch.Tensor):
        """Horovod's hook: returns (tensor to allreduce, context).

        Compressed tensors send the k values at shared random coordinates (no indices: every rank
        knows them), with error feedback; others are sent whole.
        """
        name = self._name_of(tensor)
        shape, dtype = tensor.shape, tensor.dtype
        if not self.is_compressed(shape):
            out = self.compress_dense(name, tensor)
            if out.dtype == torch.bfloat16:
                out = out.to(torch.float32)  # Horovod 0.28.1 has no bfloat16 collectives
            self._stats.record_dense(out.numel(), out.element_size())
            return out, _HorovodContext(None, shape, dtype)
        st, acc = self._accumulate(name, tensor)
        k = core.num_selected(acc.numel(), core.density_at(st.step, self.options))
        seed = core.random_k_seed(self.options.seed, name, st.step)
        indices = random_k_indices(acc.numel(), k, seed, device=acc.device)
        wire = self.value_dtype if self.value_dtype != torch.bfloat16 else torch.float32
        values = acc[indices].to(wire)
        self._finish(st, indices)
        self._stats.record_sparse(acc.numel(), k, _dtype_name(wire), with_indices=False)
        return values, _HorovodContext(indices, shape, dtype)

    def decompress(self, tensor: torch.Tensor, ctx: _HorovodContext) -> torch.Tensor:
        """Horovod's hook: the reduced values scattered back into a zero tensor of the gradient's shape."""
        if ctx.indices is None:
            return tensor.to(ctx.dtype).view(ctx.shape)
        out = torch.zeros(math.prod(ctx.shape), dtype=ctx.dtype, device=tensor.device)
        out[ctx.indices] = tensor.to(ctx.dtype)
        return out.view(ctx.shape)

    # ------------------------------------------------------------------ accounting and state
    def stats(self) -> dict:
        """Cumulative byte counts of this rank: ``bytes_sent`` handed to collectives, and
        ``bytes_dense``, what plain fp32 allreduce of the same tensors would have handed over."""
        out = self._stats.as_dict()
        out["steps"] = max([self._stats.steps] + [st.step for st in self._state.values()])
        return out

    def residual_norms(self) -> dict[str, float]:
        """L2 norm of each tensor's residual (v with momentum), for monitoring."""
        return {name: float(st.residual.double().norm()) for name, st in self._state.items()
                if st.residual is not None}

    def state_dict(self) -> dict:
        tensors = {}
        for name, st in self._state.items():
            tensors[name] = {
                "residual": None if st.residual is None else st.residual.detach().clone(),
                "velocity": None if st.velocity is None else st.velocity.detach().clone(),
                "step": st.step,
            }
        stats = self._stats.as_dict()
        stats.pop("compression_ratio", None)
        return {"options": self.options.model_dump(), "tensors": tensors, "stats": stats}

    def load_state_dict(self, state: dict) -> None:
        """Restores residuals, momentum buffers, step counters and byte counts (options stay)."""
        self._state = {}
        for name, t in state.get("tensors", {}).items():
            self._state[name] = _TensorState(
                residual=None if t.get("residual") is None else t["residual"].clone(),
                velocity=None if t.get("velocity") is None else t["velocity"].clone(),
                step=int(t.get("step", 0)))
        self._stats = core.CompressionStats()
        self._stats.load(state.get("stats", {}))

    def __repr__(self) -> str:
        o = self.options
        return (f"RangerCompressor(density={o.density}, momentum={o.momentum}, "
                f"min_elements={o.min_elements}, value_dtype={o.value_dtype!r})")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


assert set(_WIRE_DTYPES) == set(VALUE_ITEMSIZE)
