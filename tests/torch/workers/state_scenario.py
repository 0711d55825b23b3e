"""state_dict round trips: stop after 3 steps, save, rebuild everything, load, run 3 more; the result
must equal 6 uninterrupted steps bit for bit, for (a), (b), and Ranger with global (c) and DGC (d)
momentum."""

from __future__ import annotations

import io

from common import digest, max_diff, params_of, prefixed

import torch
import horovod.torch as hvd

from ranger_hvd.torch import DistributedOptimizer, Ranger, RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK = hvd.rank()


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4))


def build(mode: str, model):
    named = prefixed(model, mode)
    if mode == "a":
        comp = RangerCompressor(density=0.05, momentum=0.9, min_elements=128)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=named, compression=comp)
    elif mode == "b":
        comp = RangerCompressor(density=0.05, min_elements=128, named_parameters=named)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                       named_parameters=named, compression=comp)
    else:
        opt = Ranger(model.parameters(), lr=0.05, momentum=0.9, density=0.05, weight_decay=1e-3,
                     momentum_mode="global" if mode == "c" else "dgc", min_elements=128,
                     named_parameters=named)
        comp = opt.compressor
    return opt, comp


def residuals_of(comp) -> list[torch.Tensor]:
    return [st.residual.detach().clone() for st in comp._state.values() if st.residual is not None]


def run(model, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(1000 * RANK + step)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


out = {"rank": RANK}
for mode in ("a", "b", "c", "d"):
    model = make_model()
    opt, comp = build(mode, model)
    run(model, opt, range(6))
    straight_params = params_of(model)
    straight_res = residuals_of(comp)

    model = make_model()
    opt, comp = build(mode, model)
    run(model, opt, range(3))
    buf = io.BytesIO()
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    if mode == "b":
        saved["comp"] = comp.state_dict()  # Horovod's optimizer does not know the compressor
    torch.save(saved, buf)
    del model, opt, comp
    buf.seek(0)
    saved = torch.load(buf)

    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # make sure the parameters really come from the checkpoint
    opt, comp = build(mode, model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if mode == "b":
        comp.load_state_dict(saved["comp"])
    run(model, opt, range(3, 6))
    out[mode] = {
        "straight": digest(straight_params),
        "resumed": digest(model.parameters()),
        "resumed_maxdiff": max_diff(straight_params, params_of(model)),
        "residuals_maxdiff": max_diff(straight_res, residuals_of(comp)) if straight_res else 0.0,
        "residual_count": [len(straight_res), len(residuals_of(comp))],
        "has_ranger_state": "ranger" in saved["opt"],
        "steps": comp.stats()["steps"],
    }

report(RANK, out)
