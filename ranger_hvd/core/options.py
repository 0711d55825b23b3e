"""Options of the Ranger compressor, validated once for every backend.

The same model validates ``RangerCompressor(...)`` keyword arguments in PyTorch and TensorFlow and the
``compression:`` section of a launcher config, so a user switching backends or moving a setting from
code to YAML gets the same names, defaults and error messages.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ValueDType = Literal["float32", "float16", "bfloat16"]
Selection = Literal["topk", "random"]
NonFinite = Literal["skip", "raise"]
Exchange = Literal["allgather", "global_topk"]

# Bytes per element of each value dtype that can travel; indices always travel as int32.
VALUE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
INDEX_ITEMSIZE = 4


class RangerOptions(BaseModel):
    """What to send, and how to keep what is not sent.

    density
        Fraction d of each compressed tensor's elements sent per step: k = max(1, ceil(d * n)).
    momentum
        DGC momentum correction m. With m = 0 the compressor does plain error feedback
        (acc = residual + g). With m > 0 it keeps u = m*u + g and v = v + u, sends the top-k of v and
        zeroes v, and u unless ``momentum_masking`` is false, where it sent; the optimizer must then
        run without momentum of its own, as the momentum already lives here.
    momentum_masking
        With m > 0: whether a coordinate's u is zeroed when it is sent (DGC's factor masking, the
        default). ``False`` keeps u running, so the residual is plain error feedback on the local
        momentum (Zheng et al. 2019, dist-EF-SGDM): everything the momentum produces is sent in time,
        exactly once. Ignored with m = 0.
    min_elements
        Tensors with fewer elements are sent dense: their indices would cost more than they save.
    compress_1d
        1-D tensors (biases, norms) go dense unless this is true, as in DGC.
    warmup_steps, warmup_start_density
        DGC's density warm-up, off by default: the density falls geometrically from
        ``warmup_start_density`` to ``density`` over the first ``warmup_steps`` steps. Setting
        ``warmup_start_density`` without warm-up steps is an error.
    clip_norm
        Local gradient clipping before accumulation: each worker scales a compressed tensor's gradient so
        its L2 norm is at most clip_norm / sqrt(N) (N workers), so that the sum over workers stays within
        clip_norm (DGC section 3.2).
    value_dtype
        Dtype of the values on the wire; indices are int32. Residuals always stay in the gradient's dtype.
    check_finite
        Look for NaN and Inf in each gradient before it can reach the residual or the momentum (one
        read of the gradient). ``False`` skips the look, and a non-finite gradient then poisons the
        state for good.
    nonfinite
        What a NaN or Inf found by ``check_finite`` does. ``"skip"`` (default): the step is void, as
        a loss scaler (``torch.amp.GradScaler``, Keras ``LossScaleOptimizer``) needs it: the
        non-finite values reach the averaged gradient on every rank, so the scaler sees them and
        skips the step, and every rank's residual and momentum stay as they were (what ranks sent
        in that step goes back into their residuals). ``"raise"``: fail fast with an error naming
        the variable, for training without a loss scaler.
    sample_fraction
        Fraction of a large tensor sampled to estimate the top-k threshold before the exact selection
        (top-k only: setting it with ``selection="random"`` is an error).
    selection
        ``"topk"`` (default): each rank sends its own k largest entries, values and int32 indices,
        through an allgather started inside the compressor. ``"random"``: every rank sends the values
        at the same k random coordinates, drawn from ``seed``, the tensor's name and its step, through
        Horovod's own allreduce; no indices travel and the traffic does not grow with the number of
        workers, but random coordinates carry much less of the gradient than the largest ones.
    seed
        Seed of the shared random-k coordinates (``selection="random"`` only: setting it with top-k
        is an error).
    exchange
        How top-k pairs travel. ``"allgather"`` (default): every rank receives every other rank's k
        pairs, (N-1)·k per tensor, the least latency for few workers. ``"global_topk"``: a sparse
        reduce-scatter to index-range owners, who keep about k of the summed entries, then an
        allgather of those: about 2·k pairs received per rank whatever N is, and the pairs the
        owners do not keep go back into their senders' residuals (``core/global_topk.py``).
    hierarchical
        PyTorch only. ``True``: the ranks on one host first sum each compressed gradient densely
        (an allreduce over the host's Horovod process set), each host's lowest rank (its leader)
        runs error feedback on that sum and the sparse ``exchange`` among the leaders only, and a
        broadcast within the host shares the result, so the sparse exchange has as many members as
        there are hosts. The update is still the average over every rank. Residuals (and DGC
        momentum) live on the leaders and hold their host's unsent sum; the other ranks keep none
        for compressed tensors. Needs several ranks on at least one host, and Horovod process sets
        for the hosts: dynamic ones (``HOROVOD_DYNAMIC_PROCESS_SETS=1``, which the launcher sets)
        or the same sets registered at ``hvd.init`` (``ranger_hvd/torch/hierarchical.py``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    density: float = Field(0.01, gt=0.0, le=1.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    momentum_masking: bool = True
    min_elements: int = Field(1024, ge=1)
    compress_1d: bool = False
    warmup_steps: int = Field(0, ge=0)
    warmup_start_density: float = Field(0.25, gt=0.0, le=1.0)
    clip_norm: Optional[float] = Field(None, gt=0.0)
    value_dtype: ValueDType = "float32"
    check_finite: bool = True
    nonfinite: NonFinite = "skip"
    sample_fraction: float = Field(0.01, gt=0.0, le=1.0)
    selection: Selection = "topk"
    seed: int = Field(0, ge=0)
    exchange: Exchange = "allgather"
    hierarchical: bool = False

    @model_validator(mode="after")
    def _warmup_starts_denser(self) -> "RangerOptions":
        if self.warmup_steps and self.warmup_start_density < self.density:
            raise ValueError(
                f"warmup_start_density ({self.warmup_start_density}) must be at least density "
                f"({self.density}): warm-up starts dense and ends at the target density"
            )
        return self

    @model_validator(mode="after")
    def _no_inactive_option(self) -> "RangerOptions":
        # An option set to a value other than its default where nothing reads it would be accepted
        # and ignored: refused instead, naming it and why (as the launcher refuses gan.* off-model).
        problems = [f"{key} ({getattr(self, key)!r}) has no effect: {why}"
                    for key, why in self._inactive().items()
                    if key in self.model_fields_set
                    and getattr(self, key) != RangerOptions.model_fields[key].default]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _inactive(self) -> dict[str, str]:
        """The options that nothing reads under the others' values, each with the reason."""
        inactive = {}
        if self.selection == "topk":
            inactive["seed"] = "only selection 'random' draws coordinates from a seed"
        if self.selection == "random":
            inactive["sample_fraction"] = ("it sizes the sample that estimates the top-k threshold, "
                                           "and selection 'random' estimates none")
        if self.warmup_steps == 0:
            inactive["warmup_start_density"] = "there is no density warm-up (warmup_steps is 0)"
        if self.momentum == 0:
            inactive["momentum_masking"] = "there is no momentum to mask (momentum is 0)"
        return inactive

    @model_validator(mode="after")
    def _nonfinite_needs_check(self) -> "RangerOptions":
        if self.nonfinite != "skip" and not self.check_finite:
            raise ValueError(f"nonfinite={self.nonfinite!r} has no effect with check_finite=False: "
                             "nothing looks for NaN or Inf")
        return self

    @model_validator(mode="after")
    def _global_needs_topk(self) -> "RangerOptions":
        if self.exchange == "global_topk" and self.selection != "topk":
            raise ValueError("exchange 'global_topk' needs selection 'topk': random-k already "
                             "travels through Horovod's allreduce, whose traffic does not grow with N")
        return self

    @model_validator(mode="after")
    def _hierarchical_needs_topk(self) -> "RangerOptions":
        if self.hierarchical and self.selection != "topk":
            raise ValueError("hierarchical=True needs selection 'topk': random-k already travels "
                             "through Horovod's allreduce, whose traffic does not grow with N")
        return self

    @model_validator(mode="after")
    def _random_k_wire(self) -> "RangerOptions":
        if self.selection == "random" and self.value_dtype == "bfloat16":
            raise ValueError("value_dtype 'bfloat16' needs selection 'topk': random-k values travel "
                             "through Horovod's allreduce, which has no bfloat16")
        return self


MOMENTUM_MODES = ("global", "dgc", "local")


def compressor_momentum(momentum_mode: str, momentum: float, options: dict) -> dict:
    """Where a ``Ranger`` optimizer's momentum goes, as the compressor's ``momentum`` and
    ``momentum_masking``: ``"global"`` keeps none in the compressor (the optimizer applies it to the
    averaged update), ``"dgc"`` keeps DGC's masked momentum there, ``"local"`` the same unmasked.
    ``options`` are the other compressor options given; the mode alone decides the masking, which
    is left out where the compressor keeps no momentum (nothing to mask)."""
    if momentum_mode not in MOMENTUM_MODES:
        raise ValueError(f"momentum_mode must be 'global', 'dgc' or 'local', got {momentum_mode!r}")
    if "momentum_masking" in options:
        raise ValueError("Ranger takes no momentum_masking=... for its compressor: momentum_mode "
                         "chooses where the momentum is applied and whether it is masked ('dgc' "
                         "masks, 'local' does not)")
    inside = 0.0 if momentum_mode == "global" else momentum
    if not inside > 0:
        return {"momentum": inside}
    return {"momentum": inside, "momentum_masking": momentum_mode != "local"}


class OptionsError(ValueError):
    """A Ranger option that makes no sense; the message names the option and what is allowed."""


def make_options(**kwargs) -> RangerOptions:
    """Builds RangerOptions, turning pydantic's report into one readable ValueError."""
    try:
        return RangerOptions(**kwargs)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            got = f" (got {err['input']!r})" if "input" in err and where != "options" else ""
            problems.append(f"{where}: {err['msg']}{got}")
        raise OptionsError("invalid Ranger option: " + "; ".join(problems)) from None
