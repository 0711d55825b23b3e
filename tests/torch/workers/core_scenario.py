"""Equivalence at d = 1, conservation, byte counts and agreement across ranks, in one launch.

Every rank runs the same list of small trainings one after another and reports, per check, what the
test needs (differences, digests, byte counts); tests/torch/test_horovod.py asserts on them.
"""

from __future__ import annotations

from common import digest, max_diff, params_of, prefixed


import numpy as np
import torch
import horovod.torch as hvd

from ranger_hvd import core
from ranger_hvd.core import reference
from ranger_hvd.torch import DistributedOptimizer, Ranger, RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
out: dict = {"rank": RANK, "size": SIZE}


def make_model(dtype=torch.float32):
    torch.manual_seed(0)  # identical initial parameters on every rank
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.to(dtype)


def batch(step: int, micro: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(10_000 * RANK + 100 * step + micro)  # different data per rank
    x = torch.randn(16, 24, generator=g)
    y = torch.randn(16, 3, generator=g)
    return x.to(dtype), y.to(dtype)


def train(model, opt, steps: int, passes: int = 1, dtype=torch.float32):
    trace = []
    for step in range(steps):
        for micro in range(passes):
            x, y = batch(step, micro, dtype)
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trace.append(params_of(model))
    return trace


# ---------------------------------------------------------------- 1. d = 1, m = 0 equals Horovod
# Weights 64x24 (1536) and 8x64 (512) are compressed with min_elements=256; the rest goes dense.
# Modes: a = ranger_hvd.torch.DistributedOptimizer, b = Horovod's own optimizer with the compressor
# (top-k; the compressor finds the names itself), r = Horovod's optimizer with shared random-k.
MODES = ("a", "b", "r")


def make_optimizer(mode: str, sgd, named, density: float, min_elements: int, **hvd_kwargs):
    """The optimizer and the compressor of one entry point."""
    options = hvd_kwargs.pop("options", {})
    if mode == "a":
        comp = RangerCompressor(density=density, min_elements=min_elements, **options)
        return DistributedOptimizer(sgd, named_parameters=named, compression=comp, **hvd_kwargs), comp
    if mode == "r":
        options = dict(options, selection="random")
    comp = RangerCompressor(density=density, min_elements=min_elements, **options)
    return hvd.DistributedOptimizer(sgd, named_parameters=named, compression=comp, **hvd_kwargs), comp


def dense_mode(kind: str, steps=4, **hvd_kwargs):
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    named = prefixed(model, kind)
    if kind.startswith("plain"):
        opt = hvd.DistributedOptimizer(sgd, named_parameters=named, **hvd_kwargs)
    else:
        opt, _ = make_optimizer(kind[0], sgd, named, 1.0, 256, **hvd_kwargs)
    return train(model, opt, steps, passes=hvd_kwargs.get("backward_passes_per_step", 1))


equivalence = {}
for label, kwargs in {"average": {}, "sum": {"op": hvd.Sum},
                      "predivide": {"gradient_predivide_factor": 2.0},
                      "passes": {"backward_passes_per_step": 2},
                      "groups": {"groups": 2}}.items():
    plain = dense_mode(f"plain_{label}", **kwargs)
    for mode in MODES:
        trace = dense_mode(f"{mode}_{label}", **kwargs)
        equivalence[f"{mode}_{label}"] = [max_diff(p, q) for p, q in zip(plain, trace)]
    # The parameters must also move: a test passing on frozen parameters would prove nothing.
    equivalence[f"moved_{label}"] = max_diff(plain[0], plain[-1])
out["equivalence"] = equivalence


# ---------------------------------------------------------------- 2. conservation, bytes
# Gradients that do not depend on the parameters: loss = sum(W * G) + sum(b * H). With SGD(lr=1,
# no momentum) W moves by minus the averaged sum of what the ranks sent; once the residuals are
# drained by zero-gradient steps that must equal the average of all gradients.
class Fixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(40, 50))
        self.b = torch.nn.Parameter(torch.zeros(40))

    def loss(self, step, grad_steps):
        if step >= grad_steps:
            return (self.W * 0).sum() + (self.b * 0).sum()
        g = torch.Generator().manual_seed(777 + 1000 * RANK + step)
        G = torch.randn(40, 50, generator=g)
        H = torch.randn(40, generator=g)
        return (self.W * G).sum() + (self.b * H).sum()


def conservation(mode: str, density: float, grad_steps: int, zero_steps: int):
    model = Fixed()
    named = prefixed(model, f"cons_{mode}")
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    opt, comp = make_optimizer(mode, sgd, named, density, 100)
    total = grad_steps + zero_steps
    for step in range(total):
        model.loss(step, grad_steps).backward()
        opt.step()
        opt.zero_grad()
    # Everyone's gradients, summed, from outside the optimizer.
    mine = torch.zeros(40, 50, dtype=torch.float64)
    for step in range(grad_steps):
        g = torch.Generator().manual_seed(777 + 1000 * RANK + step)
        mine += torch.randn(40, 50, generator=g).double()
    everyone = hvd.allreduce(mine, op=hvd.Sum, name=f"cons_{mode}.check") / SIZE
    applied = -model.W.detach().double()  # W started at 0 and lr = 1
    k = core.num_selected(2000, density)
    value_bytes = k * 4 if mode == "r" else k * (4 + 4) + 4  # top-k: indices and the token
    return {
        "max_error": float((applied - everyone).abs().max()),
        "scale": float(everyone.abs().max()),
        "residual_norm": comp.residual_norms()[f"cons_{mode}.W"],
        "bytes_sent": comp.stats()["bytes_sent"],
        "bytes_expected": total * (value_bytes + 40 * 4),
        "bytes_dense": comp.stats()["bytes_dense"],
        "bytes_dense_expected": total * 4 * (2000 + 40),
        "params": digest(model.parameters()),
    }


out["conservation_a"] = conservation("a", 0.1, grad_steps=8, zero_steps=10)
out["conservation_b"] = conservation("b", 0.1, grad_steps=8, zero_steps=10)
# Random-k reaches every coordinate only eventually: half of them per step, for 60 steps.
out["conservation_r"] = conservation("r", 0.5, grad_steps=8, zero_steps=60)


# ---------------------------------------------------------------- 3. the spec, from outside
# Every rank can recompute every rank's gradients (they come from seeds), so it can replay the whole
# job with core.reference (one ReferenceCompressor per rank, combine) and compare parameters.
# a, b: SGD on the exchanged gradient. c: Ranger, global momentum (error feedback in the compressor,
# SGD momentum and weight decay on the averaged update). d: Ranger, DGC momentum in the compressor.
# e: Ranger, momentum in the compressor without factor masking (momentum_mode="local").
def against_reference(mode: str, steps: int = 8):
    lr, density = 0.5, 0.05
    m, wd = (0.9, 0.01) if mode in ("c", "d", "e") else (0.0, 0.0)
    model = Fixed()
    with torch.no_grad():
        model.W.copy_(torch.linspace(-1, 1, 2000).view(40, 50))
        model.b.copy_(torch.linspace(-1, 1, 40))
    named = prefixed(model, f"ref_{mode}")
    if mode in ("c", "d", "e"):
        opt = Ranger(model.parameters(), lr=lr, momentum=m, density=density, weight_decay=wd,
                     momentum_mode={"c": "global", "d": "dgc", "e": "local"}[mode], min_elements=100,
                     named_parameters=named)
    else:
        opt, _ = make_optimizer(mode, torch.optim.SGD(model.parameters(), lr=lr), named, density, 100)
    in_compressor = m if mode in ("d", "e") else 0.0
    options = core.make_options(density=density, momentum=in_compressor, min_elements=100,
                                momentum_masking=mode != "e")
    refs = [reference.ReferenceCompressor(2000, options, world_size=SIZE) for _ in range(SIZE)]
    W = model.W.detach().numpy().reshape(-1).copy()
    b = model.b.detach().numpy().copy()
    u_b = [np.zeros(40, np.float32) for _ in range(SIZE)]   # dgc: dense tensors' local momentum
    buf_W, buf_b = np.zeros(2000, np.float32), np.zeros(40, np.float32)  # global: SGD's momentum
    mm, wd32, lr32 = np.float32(m), np.float32(wd), np.float32(lr)
    worst = 0.0
    for step in range(steps):
        model.loss(step, steps).backward()
        opt.step()
        opt.zero_grad()
        payloads, dense = [], np.zeros(40, np.float32)
        for r in range(SIZE):
            g = torch.Generator().manual_seed(777 + 1000 * r + step)
            G = torch.randn(40, 50, generator=g).numpy().reshape(-1)
            H = torch.randn(40, generator=g).numpy()
            payloads.append(refs[r].step(G))
            u_b[r] = np.float32(in_compressor) * u_b[r] + H
            dense += u_b[r]
        agg_W = reference.combine(payloads, 2000, average=True) + wd32 * W
        agg_b = dense / np.float32(SIZE) + wd32 * b
        if mode == "c":
            buf_W, buf_b = mm * buf_W + agg_W, mm * buf_b + agg_b
            agg_W, agg_b = buf_W, buf_b
        W, b = W - lr32 * agg_W, b - lr32 * agg_b
        got = np.concatenate([model.W.detach().numpy().reshape(-1), model.b.detach().numpy()])
        want = np.concatenate([W, b])
        worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-12)))
    return {"max_rel_error": worst, "moved": float(np.abs(W - np.linspace(-1, 1, 2000)).max())}


for mode in ("a", "b", "c", "d", "e"):
    out[f"reference_{mode}"] = against_reference(mode)


# ---------------------------------------------------------------- 4. agreement at low density
class Recording(RangerCompressor):
    """Notes the coordinates each random-k compress call chose, to compare them across ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chosen = []

    def compress(self, tensor):
        sent, ctx = super().compress(tensor)
        if ctx.indices is not None:
            self.chosen.append(ctx.indices)
        return sent, ctx


def agreement(mode: str, dtype=torch.float32, momentum=0.0, steps=20, hvd_kwargs=None, **options):
    model = make_model(dtype)
    named = prefixed(model, f"agree_{mode}_{len(out)}")
    # SGD's momentum, unless the compressor carries DGC momentum (never both).
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if momentum else 0.9)
    if mode == "r":
        comp = Recording(density=0.02, momentum=momentum, min_elements=256, selection="random",
                         **options)
        opt = hvd.DistributedOptimizer(sgd, named_parameters=named, compression=comp)
    elif mode == "ranger":
        opt = Ranger(model.parameters(), lr=0.05, momentum=0.9, density=0.02, min_elements=256,
                     named_parameters=named, **options)
        comp = opt.compressor
    else:
        opt, comp = make_optimizer(mode, sgd, named, 0.02, 256,
                                   options=dict(options, momentum=momentum), **(hvd_kwargs or {}))
    trace = train(model, opt, steps, dtype=dtype)
    result = {"params": digest(model.parameters()), "moved": max_diff(trace[0], trace[-1]),
              "param_sum": float(sum(p.double().sum() for p in model.parameters())), "stats": comp.stats()}
    if mode == "r":
        result["chosen"] = digest(comp.chosen)
        result["chosen_count"] = len(comp.chosen)
    return result


# a, b and Ranger (global momentum = SGD momentum 0.9 after the exchange) are one exchange: at
# d = 0.01 they must end with the same bits.
out["agree_a"] = agreement("a")
out["agree_b"] = agreement("b")
out["agree_ranger"] = agreement("ranger")
out["agree_r"] = agreement("r")
out["agree_a_momentum_warmup"] = agreement("a", momentum=0.9, warmup_steps=4, warmup_start_density=0.5)
out["agree_b_momentum_warmup"] = agreement("b", momentum=0.9, warmup_steps=4, warmup_start_density=0.5)
out["agree_r_momentum_warmup"] = agreement("r", momentum=0.9, warmup_steps=4, warmup_start_density=0.5)
out["agree_b_fp16_wire"] = agreement("b", value_dtype="float16")
out["agree_b_bf16_model"] = agreement("b", dtype=torch.bfloat16, value_dtype="bfloat16")
out["agree_r_bf16_model"] = agreement("r", dtype=torch.bfloat16)
out["agree_b_fp16_model"] = agreement("b", dtype=torch.float16)
out["agree_r_fp16_wire"] = agreement("r", value_dtype="float16")


# Buckets: the two compressed weights share one allgather by default; in buckets of 5 KB each
# travels alone, and bucket_mb=0 is one allgather per tensor. Every rank must end with the bits of
# the default, whatever the buckets, and the count of top-k allgathers tells the paths apart. The
# global top-k exchange (an alltoall to the owners, then an allgather of what they kept) too.
def counted(run: str, prefix="ranger.topk.", collective="allgather_async", **options):
    names, start = [], getattr(hvd, collective)

    def counting(tensor, *args, name=None, **kwargs):
        if name and name.startswith(prefix):
            names.append(name)
        return start(tensor, *args, name=name, **kwargs)

    setattr(hvd, collective, counting)
    try:
        out[run] = agreement("b", **options)
    finally:
        setattr(hvd, collective, start)
    out[run]["allgathers"] = len(names)
    out[run]["allgather_names"] = sorted(set(names))


counted("buckets_default")
counted("buckets_small", bucket_mb=5 / 1024)
counted("buckets_none", bucket_mb=0)
counted("buckets_groups", hvd_kwargs={"groups": 1})
for run, options in (("global_buckets_default", {}), ("global_buckets_none", {"bucket_mb": 0})):
    counted(run, "ranger.gtopk.send.", "alltoall_async", exchange="global_topk", **options)


# ---------------------------------------------------------------- 5. a NaN gradient, last
# Every rank gets the same poisoned gradient, so every rank raises before its collective starts.
def non_finite(mode: str):
    model = Fixed()
    named = prefixed(model, f"nan_{mode}")
    opt, comp = make_optimizer(mode, torch.optim.SGD(model.parameters(), lr=1.0), named, 0.1, 100,
                               options={"nonfinite": "raise"})
    ((model.W * torch.ones(40, 50)).sum() + model.b.sum()).backward()   # a clean step: a residual to protect
    opt.step()
    opt.zero_grad()
    before = comp.residual_norms()
    poison = torch.ones(40, 50)
    poison[1, 2] = float("nan")
    try:
        (model.W * poison).sum().backward()
        opt.step()
    except Exception as exc:  # noqa: BLE001 - the test checks the type by name
        return {"raised": type(exc).__name__, "message": str(exc), "residual_norms_before": before,
                "residual_norms": comp.residual_norms()}
    return {"raised": None}


out["nan_a"] = non_finite("a")
out["nan_b"] = non_finite("b")
report(RANK, out)
