"""The compatibility matrix: one small model through every option of Horovod's torch optimizer.

Each cell trains the same model three times from the same start on the same per-rank data: under
plain Horovod (no compression), with ``RangerCompressor(density=1)`` and with density 0.01. The
test asserts that density 1 gives Horovod's parameters, and that density 0.01 trains and conserves:
what the steps applied plus the ranks' residuals equals what plain averaging would have applied.

The model has a dense embedding, an optional sparse one (``nn.Embedding(sparse=True)``), two
linear layers and an unused layer; cells freeze parameters, toggle ``requires_grad`` mid-run, change
the parameters' dtype, and pass each of Horovod's optimizer arguments.
"""

from __future__ import annotations

import sys

from common import max_diff, params_of

import torch
import horovod.torch as hvd

from ranger_hvd.torch import RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
STEPS, LR = 10, 0.2


class Net(torch.nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.sparse_embed = torch.nn.Embedding(40, 16, sparse=True) if sparse else None
        self.hidden = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 4)
        self.unused = torch.nn.Linear(8, 8)   # never in the graph: its .grad stays None

    def forward(self, tokens):
        h = self.embed(tokens).mean(1)
        if self.sparse_embed is not None:
            h = h + self.sparse_embed(tokens % 40).mean(1)
        return self.out(torch.tanh(self.hidden(h)))


def data(step: int, micro: int):
    # different data per rank, the same every step (so that training shows as a falling loss)
    g = torch.Generator().manual_seed(1000 * RANK + micro)
    return torch.randint(0, 50, (8, 5), generator=g), torch.randn(8, 4, generator=g)


def run(cell: dict, compression, tag: str):
    """Trains one model; returns (model, parameter trace, losses, the compressor's residuals, this
    rank's raw gradients summed over the run, the updates the exchange delivered summed over the
    run, the named parameters)."""
    torch.manual_seed(0)
    dtype = cell.get("dtype", torch.float32)
    model = Net(cell.get("sparse", False)).to(dtype)
    for name in cell.get("frozen", ()):
        getattr(model, name).weight.requires_grad_(False)
    hvd_kwargs = dict(cell.get("hvd", {}))
    groups = hvd_kwargs.pop("groups", None)
    if groups == "layers":
        hvd_kwargs["groups"] = [[model.hidden.weight, model.hidden.bias], [model.out.weight]]
    elif groups is not None:
        hvd_kwargs["groups"] = groups
    named = [(f"{tag}.{n}", p) for n, p in model.named_parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    opt = hvd.DistributedOptimizer(sgd, named_parameters=named, compression=compression,
                                   **hvd_kwargs)
    passes = hvd_kwargs.get("backward_passes_per_step", 1)
    trace, losses, raw, applied = [], [], {}, {}
    for step in range(STEPS):
        toggle = cell.get("toggle")
        if toggle is not None:  # a dynamically frozen layer: trains on even steps only
            getattr(model, toggle).weight.requires_grad_(step % 2 == 0)
        for micro in range(passes):
            tokens, y = data(step, micro)
            # This rank's raw gradients, summed over the run (for conservation): taken by
            # autograd.grad, which fires no Horovod hook (Horovod may reduce .grad in place).
            live = [(n, p) for n, p in named if p.requires_grad]
            loss = torch.nn.functional.mse_loss(model(tokens).float(), y)
            grads = torch.autograd.grad(loss, [p for _, p in live], allow_unused=True)
            for (n, _), g in zip(live, grads):
                if g is not None:
                    raw[n] = raw.get(n, 0) + (g.to_dense() if g.is_sparse else g).double()
            loss = torch.nn.functional.mse_loss(model(tokens).float(), y)
            loss.backward()
            if micro == 0:  # the loss over all ranks' data
                losses.append(float(hvd.allreduce(loss.detach(), name=f"{tag}.loss.{step}")))
        opt.synchronize()
        for n, p in named:  # what the exchange delivered (the optimizer is plain SGD)
            if p.grad is not None:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                applied[n] = applied.get(n, 0) + g.detach().double().reshape(-1)
        with opt.skip_synchronize():
            opt.step()
        opt.zero_grad()
        trace.append(params_of(model))
    residuals = {}
    if isinstance(compression, RangerCompressor):
        for n, st in compression._state.items():
            if st.residual is not None:
                residuals[n] = st.residual.double()
    return model, trace, losses, residuals, raw, applied, named


def conservation_error(residuals, raw, applied, average: bool) -> float:
    """max |Σ_t delivered_t + Σ_ranks e / N - Σ_ranks Σ_t g / N| over the parameters, relative to
    the largest entry of the last sum (N = 1 for op=Sum)."""
    worst = 0.0
    factor = 1.0 / SIZE if average else 1.0
    for n in sorted(raw):
        delivered = applied[n]
        total = hvd.allreduce(raw[n].reshape(-1), op=hvd.Sum, name=f"raw.{n}") * factor
        res = residuals.get(n)
        if res is not None:
            delivered = delivered + hvd.allreduce(res, op=hvd.Sum, name=f"res.{n}") * factor
        scale = float(total.abs().max()) or 1.0
        worst = max(worst, float((delivered - total).abs().max()) / scale)
    return worst


CELLS = {
    "average": {},
    "sum": {"hvd": {"op": hvd.Sum}},
    "predivide": {"hvd": {"gradient_predivide_factor": 2.0}},
    "passes": {"hvd": {"backward_passes_per_step": 2}},
    "groups_int": {"hvd": {"groups": 2}},
    "groups_list": {"hvd": {"groups": "layers"}},
    "sparse_as_dense": {"sparse": True, "hvd": {"sparse_as_dense": True}},
    "sparse_embedding": {"sparse": True},
    "frozen": {"frozen": ["hidden"]},
    "toggled": {"toggle": "hidden"},
    "fp64": {"dtype": torch.float64},
    "fp16": {"dtype": torch.float16},
    "bf16": {"dtype": torch.bfloat16},
    "process_set": {"hvd": {"process_set": hvd.global_process_set}},
}


def main(names):
    out = {"rank": RANK, "size": SIZE, "cells": {}}
    for name in names:
        cell = CELLS[name]
        min_el = 32
        plain = compressed = None
        try:
            plain = run(cell, hvd.Compression.none, f"{name}.plain")
        except Exception as exc:  # noqa: BLE001 - a cell Horovod itself refuses is reported as such
            plain_error = f"{type(exc).__name__}: {exc}"
        else:
            plain_error = None
        d1 = run(cell, RangerCompressor(density=1.0, min_elements=min_el), f"{name}.d1")
        comp = RangerCompressor(density=0.01, min_elements=min_el)
        torch.manual_seed(0)
        start = params_of(Net(cell.get("sparse", False)).to(cell.get("dtype", torch.float32)))
        model, trace, losses, residuals, raw, applied, named = run(cell, comp, f"{name}.d001")
        average = cell.get("hvd", {}).get("op", hvd.Average) != hvd.Sum
        result = {
            "plain_error": plain_error,
            "d1_vs_plain": None if plain is None else max_diff(d1[1][-1], plain[1][-1]),
            "d1_moved": max_diff(d1[1][-1], start),
            "d001_moved": max_diff(trace[-1], start),
            "d001_losses": losses,
            "d1_losses": d1[2],
            "d001_finite": all(bool(torch.isfinite(p).all()) for p in trace[-1]),
            "conservation": conservation_error(residuals, raw, applied, average),
            "compressed_tensors": sum(1 for n in residuals),
            "bytes_sent": comp.stats()["bytes_sent"],
        }
        if plain is None:
            # no Horovod baseline (it has no such collective): d = 1 must match the plain average
            result["d1_conservation"] = conservation_error(d1[3], d1[4], d1[5], average)
        out["cells"][name] = result
    if SIZE == 2:   # one launch fewer: the non-finite checks ride along on 2 ranks
        import nonfinite_scenario
        out["nonfinite"] = nonfinite_scenario.run()
    import global_scenario   # global top-k's checks ride along too (test_global_topk.py)
    out["global"] = global_scenario.run()
    report(RANK, out)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CELLS))
