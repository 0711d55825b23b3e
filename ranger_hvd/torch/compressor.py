"""``RangerCompressor``: sparse gradient compression with error feedback, through Horovod's own hook.

Pass it as ``compression=`` to ``horovod.torch.DistributedOptimizer`` (or to
``ranger_hvd.torch.DistributedOptimizer``, which is that plus the compressor's state in
``state_dict()``). Horovod calls :meth:`compress` on each gradient, allreduces what it returns with its
own ``op``, pre- and postscale factors, then calls :meth:`decompress`.

**Top-k (default).** ``compress`` runs the error-feedback step (``core.ErrorFeedback``), adds this
rank's (int32 indices, values) to the tensor's bucket, and hands Horovod a 1-element tensor of ones.
A bucket is up to ``bucket_mb`` of gradient in backward order; it leaves in one allgather as soon as
its last tensor is compressed (``bucketed_allgather.py``; ``bucket_mb=0``: one allgather per tensor).
Horovod's allreduce of the token returns 1 for ``Average`` (pre- and postscale cancel) and N for
``Sum``. ``decompress`` waits for the bucket's allgather, scatter-adds every rank's pairs into a zero
gradient in rank order (so every rank gets the same bits) and multiplies by (that result) / N. The
ones fuse into one tiny allreduce per cycle. Bytes per compressed tensor: k * (value + 4) + 4.

**Shared random-k** (``selection="random"``). Every rank sends the values at the same k coordinates,
drawn from (seed, name, step), and ``compress`` returns them to Horovod's allreduce: no indices and no
allgather, so the traffic does not grow with N; but random coordinates carry far less of the gradient.

**Names.** Collectives must carry the same name on every rank: ``compress`` finds the Horovod
optimizer that called it and takes its name for the parameter (``naming.py``); code that calls
``compress`` otherwise must give ``named_parameters``.

**Memory.** Each compressed parameter keeps one reusable output buffer, which becomes its ``.grad``
after the exchange (zeroed and refilled at its next exchange): one more parameter-sized buffer, in
exchange for no page-faulting allocation of a full-size gradient per tensor and step.

Tensors that ``core.is_compressed`` rejects (small ones, 1-D ones by default) go through Horovod's
allreduce whole (with momentum: their local u = m*u + g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ranger_hvd import core

from .bucketed_allgather import DEFAULT_BUCKET_MB, BucketedAllgather
from .global_topk import GlobalTopk
from .hierarchical import HierarchicalHosts
from .naming import identify
from .state import NonFiniteGradientError, TensorState, TorchOps, all_finite  # noqa: F401
from .step_round import StepRound

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Context:
    """What :meth:`RangerCompressor.decompress` needs; stays on this rank."""
    kind: str                      # "dense", "random", "topk" or "global"
    shape: torch.Size
    dtype: torch.dtype
    indices: torch.Tensor | None = None   # random: the shared coordinates
    name: str = ""


def pack_pairs(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One rank's pairs as the raw bytes that travel and that :meth:`RangerCompressor.combine` reads:
    k int32 indices, then k values."""
    return torch.cat([indices.view(torch.uint8), values.reshape(-1).view(torch.uint8)])


class RangerCompressor:
    """Sparse compression with error feedback (and optional DGC momentum correction).

    Args:
        density: fraction d of each compressed tensor's entries sent per step; k = max(1, ceil(d*n)).
        momentum: DGC momentum correction m (0 = plain error feedback). With m > 0 the optimizer
            must not add momentum of its own.
        min_elements: tensors with fewer entries go dense.
        bucket_mb: megabytes (2**20 bytes) of gradient whose pairs share one allgather (default
            25, DDP's bucket size); 0 sends each tensor's pairs in an allgather of its own.
        named_parameters: ``model.named_parameters()``; only needed when ``compress`` is called by
            something other than a Horovod ``DistributedOptimizer``.
        hosts: with ``hierarchical=True``, which ranks share a host (lists of ranks or Horovod
            ``ProcessSet`` objects, e.g. ``[[0, 1], [2, 3]]``); by default found from Horovod's host
            names and local ranks (``hierarchical.py``).
        **options: the rest of :class:`ranger_hvd.core.RangerOptions` (``selection``,
            ``compress_1d``, ``warmup_steps``, ``warmup_start_density``, ``clip_norm``,
            ``value_dtype``, ``check_finite``, ``sample_fraction``, ``seed``, ``exchange``,
            ``hierarchical``).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, density: float = 0.01, momentum: float = 0.0, min_elements: int = 1024,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                 bucket_mb: float = DEFAULT_BUCKET_MB, hosts=None, **options):
        self.options = core.make_options(density=density, momentum=momentum,
                                         min_elements=min_elements, **options)
        if hosts is not None and not self.options.hierarchical:
            raise core.OptionsError("hosts=... says which ranks share a host for hierarchical=True; "
                                    "pass hierarchical=True too, or drop hosts")
        if not (isinstance(bucket_mb, (int, float)) and math.isfinite(bucket_mb) and bucket_mb >= 0):
            raise core.OptionsError(f"bucket_mb must be a number of megabytes >= 0, got {bucket_mb!r}")
        self.value_dtype = WIRE_DTYPES[self.options.value_dtype]
        self._stats = core.CompressionStats()
        self._ops = TorchOps(self.options, self._stats)
        self.engine = core.ErrorFeedback(self.options, self._ops)
        self._state: dict[str, TensorState] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor] = {}
        # One step's tensors: those compressed since every earlier exchange was decompressed (and
        # before a tensor of the step comes again).
        self.round = StepRound(self.engine)
        self._in_flight = 0
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self._buckets = BucketedAllgather(self.value_dtype, self.bucket_bytes, self.is_compressed)
        self._global = GlobalTopk(self)
        self._received = 0   # bytes the collectives brought from other ranks (see stats())
        self._hier = HierarchicalHosts(self, hosts) if self.options.hierarchical else None
        if named_parameters is not None:
            self.set_named_parameters(named_parameters)
        self.world_size: int | None = None   # read from Horovod on first use; tests may set it

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

    def is_compressed(self, shape) -> bool:
        """Whether a tensor of this shape is sparsified (else it travels dense)."""
        return core.is_compressed(tuple(shape), self.options)

    def _world(self, process_set=None) -> int:
        if process_set is not None:
            return process_set.size()
        if self.world_size is None:
            try:
                import horovod.torch as hvd
            except ImportError:
                return 1
            if not hvd.is_initialized():
                return 1  # used outside a job (tests, tools): a single worker
            self.world_size = hvd.size()
        return self.world_size

    def _state_of(self, name: str) -> TensorState:
        st = self._state.get(name)
        if st is None:
            st = self._state[name] = TensorState()
        return st

    # ------------------------------------------------------------------ the engine, no communication
    def compress_sparse(self, name: str, grad: torch.Tensor,
                        process_set=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One error-feedback step of a named tensor: (values in ``value_dtype``, int32 indices).

        The indices are ascending and equal ``core.reference.select(acc, k)`` (or the shared random
        set); nothing is sent.
        """
        if grad.is_sparse:
            raise TypeError(f"RangerCompressor: gradient of {name!r} is a sparse tensor; pass "
                            "sparse_as_dense=True to the DistributedOptimizer")
        self._ops.name = name
        indices, values, _ = self.engine.sparse_step(self._state_of(name), grad, name, grad.shape,
                                                     self._world(process_set))
        return values.to(self.value_dtype), indices.to(torch.int32)

    def compress_dense(self, name: str, grad: torch.Tensor, wire_itemsize: int) -> torch.Tensor:
        """A tensor that travels whole: a fresh tensor Horovod may reduce in place."""
        self._ops.name = name
        out = self.engine.dense_step(self._state_of(name), grad, name, wire_itemsize)
        return out.clone() if self.options.momentum > 0 else out  # never hand over u itself

    # ------------------------------------------------------------------ Horovod's interface
    def _enter_round(self, name: str) -> None:
        if self._in_flight == 0 or name in self.round:  # a new step begins
            self.round.reset()
            self._buckets.reset()
            self._global.reset()
            if self._hier is not None:
                self._hier.reset()
            self._in_flight = 0
        self.round.add(name, self._state_of(name))
        self._in_flight += 1

    def compress(self, tensor: torch.Tensor):
        """Horovod's hook: returns (tensor for Horovod's allreduce, context)."""
        name, process_set, owner = identify(self, tensor, self._params)
        self._enter_round(name)
        shape, dtype = tensor.shape, tensor.dtype
        if not self.is_compressed(shape):
            # Horovod 0.28.1 has no bfloat16 collectives: such tensors travel as fp32.
            wire = torch.float32 if dtype == torch.bfloat16 else dtype
            out = self.compress_dense(name, tensor, wire.itemsize)
            return out.to(wire), _Context("dense", shape, dtype, name=name)
        if self._hier is not None:   # the host sum first, the sparse step on the host's leader
            return self._hier.compress(name, tensor, process_set, owner)
        values, indices = self.compress_sparse(name, tensor, process_set)
        if self.options.selection == "random":
            # a copy: Horovod reduces it in place, and an undo needs the values as sent
            values = values.to(torch.float32 if values.dtype == torch.bfloat16 else values.dtype,
                               copy=True)
            return values, _Context("random", shape, dtype, indices=indices, name=name)
        token = torch.ones(1, dtype=torch.float32, device=tensor.device)
        kind = self.start_exchange(name, math.prod(shape), indices, values, process_set, owner)
        return token, _Context(kind, shape, dtype, name=name)

    def start_exchange(self, name: str, numel: int, indices: torch.Tensor, values: torch.Tensor,
                       process_set, owner) -> str:
        """Sends one tensor's pairs in the configured exchange; returns the context's kind."""
        if self.options.exchange == "global_topk":
            self._global.start(name, numel, indices, values, process_set, owner)
            return "global"
        self._buckets.add(name, indices, values, process_set, owner)
        return "topk"

    def decompress(self, tensor: torch.Tensor, ctx: _Context | None) -> torch.Tensor:
        """Horovod's hook: the reduced gradient in the original shape and dtype.

        ``ctx`` is None for what Horovod reduced without calling :meth:`compress` (sparse
        gradients, ``sparse_as_dense=False``): that is returned as it is, as Horovod's own
        compressors do."""
        if ctx is None:
            return tensor
        self._in_flight -= 1
        self._received += tensor.numel() * tensor.element_size()   # the allreduced tensor or token
        if ctx.kind == "dense":
            self.round.check([ctx.name], [tensor])
            return tensor.to(ctx.dtype).view(ctx.shape)
        if ctx.kind == "hier":
            return self._hier.decompress(tensor, ctx)
        if ctx.kind == "random":
            self.round.check([ctx.name], [tensor])
            out = self._output(ctx, tensor.device)
            out[ctx.indices.long()] = tensor.to(ctx.dtype)
            return out.view(ctx.shape)
        return self.sparse_result(tensor, ctx.name, ctx.shape, ctx.dtype)

    def sparse_result(self, token: torch.Tensor, name: str, shape, dtype: torch.dtype,
                      world: int | None = None) -> torch.Tensor:
        """The sum of every member's pairs of one tensor from the exchange, times (Horovod's
        token) / ``world`` (default: the exchange's members; hierarchical hosts give N, all ranks)."""
        indices, values, members = self.exchange_pairs(name)
        return self.scatter_pairs(token, name, shape, dtype, indices, values, world or members)

    def exchange_pairs(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every member's pairs of one tensor from the exchange (int32 indices, values: on the wire
        dtype from the allgather, the gradient's dtype from global top-k) and the number of members;
        a NaN/Inf among them voids the step."""
        if self.options.exchange == "global_topk":
            g_idx, g_sums, members = self._global.finish(name)
            self.round.check([name], [g_sums])
            return g_idx, g_sums, members
        indices, values, members, non_finite = self._buckets.wait(name)
        # the bucket's values were checked as it arrived: a NaN/Inf anywhere in it voids the step
        self.round.check([name], [] if non_finite is None else [non_finite])
        return indices, values, members

    def scatter_pairs(self, token: torch.Tensor, name: str, shape, dtype: torch.dtype,
                      indices: torch.Tensor, values: torch.Tensor, world: int) -> torch.Tensor:
        """``exchange_pairs``' pairs scatter-added into the tensor's zeroed output buffer, times
        (Horovod's token) / ``world``: the same bits wherever the same pairs are scattered."""
        # The token: 1 after an average, N after a sum (rounded: predivide factors leave float noise).
        scale = round(float(token.reshape(-1)[0])) / world
        out = self.output_buffer(name, shape, dtype, token.device)
        if self.options.exchange == "global_topk":
            return out.index_add_(0, indices, values.to(out.dtype), alpha=scale).view(shape)
        early = core.scale_each_value(scale, out.dtype in (torch.float32, torch.float64))
        out.index_add_(0, indices, values.to(out.dtype), alpha=scale if early else 1.0)
        if not early:
            out.mul_(scale)
        return out.view(shape)

    def _output(self, ctx: _Context, device) -> torch.Tensor:
        return self.output_buffer(ctx.name, ctx.shape, ctx.dtype, device)

    def output_buffer(self, name: str, shape, dtype: torch.dtype, device,
                      zero: bool = True) -> torch.Tensor:
        """The zeroed flat buffer a sparse result is scattered into, reused step after step.

        Horovod makes it the parameter's ``.grad``. A fresh full-size tensor per step would cost its
        page faults on every step (tens of ms for tens of millions of entries on a CPU); zeroing a
        warm buffer costs one write pass. The buffer is overwritten at this parameter's next
        exchange: code that keeps last step's ``.grad`` past it must copy it. ``zero=False`` leaves
        a warm buffer as it is, for a result that overwrites all of it (a broadcast).
        """
        numel = math.prod(shape)
        out = self._outputs.get(name)
        if out is None or out.numel() != numel or out.dtype != dtype or out.device != device:
            out = self._outputs[name] = torch.zeros(numel, dtype=dtype, device=device)
        elif zero:
            out.zero_()
        return out

    def _row_bytes(self, k: int) -> int:
        """Bytes of one rank's payload in the allgather: k int32 indices and k values."""
        return k * (4 + self.value_dtype.itemsize)

    def combine(self, gathered: torch.Tensor, k: int, out: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
        """Every rank's (indices, values) from the allgather, each value times ``scale``,
        scatter-added into ``out`` (zeros).

        Duplicate indices from different ranks accumulate in rank order, the order of the gathered
        rows, so every rank gets the same bits.
        """
        rows = gathered.view(-1, self._row_bytes(k))
        # reshape(-1) copies the column blocks of several rows into one contiguous buffer
        indices = rows[:, : 4 * k].reshape(-1).view(torch.int32)
        return out.index_add_(0, indices, self._gathered_values(gathered, k).to(out.dtype),
                              alpha=scale)

    def _gathered_values(self, gathered: torch.Tensor, k: int) -> torch.Tensor:
        """Every rank's k values from the allgather, one after the other."""
        return gathered.view(-1, self._row_bytes(k))[:, 4 * k:].reshape(-1).view(self.value_dtype)

    # ------------------------------------------------------------------ accounting and state
    def end_step(self) -> None:
        """Closes one optimizer step in the byte accounting (optional: ``stats`` infers steps)."""
        self._stats.end_step()

    def stats(self) -> dict:
        """Cumulative byte counts of this rank: ``bytes_sent`` handed to collectives, and
        ``bytes_dense``, what plain fp32 allreduce of the same tensors would have handed over."""
        out = self._stats.as_dict()
        out["steps"] = max([out["steps"]] + [st.step for st in self._state.values()])
        out["bytes_received"] = self._received + self._buckets.received + self._global.received
        if self._hier is not None:
            out.update(self._hier.stats())
        return out

    def residual_norms(self) -> dict[str, float]:
        """L2 norm of each tensor's residual (v with momentum), for monitoring."""
        return {name: float(st.residual.double().norm()) for name, st in self._state.items()
                if st.residual is not None}

    def step_counters(self) -> dict[str, int]:
        """Each tensor's exchange count (the warm-up and random-k schedules depend on it)."""
        return {name: st.step for name, st in self._state.items()}

    def set_step_counters(self, steps: dict[str, int]) -> None:
        """Sets the exchange counts (a worker that joins an elastic job takes rank 0's), keeping the
        residuals: every rank must pick the same k for a tensor, or their allgathers do not fit."""
        for name, step in steps.items():
            self._state_of(name).step = int(step)

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
        stats["bytes_received"] = self._received + self._buckets.received + self._global.received
        return {"options": self.options.model_dump(), "tensors": tensors, "stats": stats,
                "global_selection": self._global.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores residuals, momentum buffers, step counters and byte counts (options stay)."""
        self._state = {}
        for name, t in state.get("tensors", {}).items():
            self._state[name] = TensorState(
                residual=None if t.get("residual") is None else t["residual"].clone(),
                velocity=None if t.get("velocity") is None else t["velocity"].clone(),
                step=int(t.get("step", 0)))
        self._stats.load(state.get("stats", {}))
        self._received = int(state.get("stats", {}).get("bytes_received", 0))
        self._buckets.received = self._global.received = 0
        # the ranges of the global exchange follow the last selection: part of the state
        self._global.load_state_dict(state.get("global_selection", {}))

    def __repr__(self) -> str:
        o = self.options
        return (f"RangerCompressor(density={o.density}, momentum={o.momentum}, "
                f"selection={o.selection!r}, min_elements={o.min_elements}, "
                f"value_dtype={o.value_dtype!r})")
