"""Non-finite gradients under Horovod's optimizer: the step is void, the state comes through intact.

1. ``void``: rank 0's gradient of the first layer turns Inf at step 2 (an Inf in backward on that
   rank only; the other layers stay finite). Every rank's averaged gradient must show NaN/Inf there; each tensor's residual must be
   what it held before the step plus that step's gradient (the send undone), and rank 0's Inf
   tensor's residual exactly what it held before. The next steps train normally.
2. ``scaler``: ``torch.autocast`` (fp16) + ``torch.amp.GradScaler`` with the compressor, the loss
   made Inf on rank 0 at one step: the scaler skips that step on every rank (parameters unchanged),
   its scale halves, the residuals stay finite and equal to the state before the step plus that
   step's gradient, and training goes on.
3. ``raise``: ``nonfinite="raise"`` fails fast naming the parameter.
"""

from __future__ import annotations

from common import params_of

import torch
import horovod.torch as hvd

from ranger_hvd.torch import NonFiniteGradientError, RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
out: dict = {"rank": RANK, "size": SIZE}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30),
                               torch.nn.Tanh(), torch.nn.Linear(30, 2))


def batch(step):
    g = torch.Generator().manual_seed(100 * RANK + step)
    return torch.randn(16, 12, generator=g), torch.randn(16, 2, generator=g)


def residuals(comp):
    return {n: st.residual.clone() for n, st in comp._state.items() if st.residual is not None}


def raw_grads(model, named, x, y, poison):
    """This rank's own gradients, by autograd.grad (no Horovod hook fires)."""
    loss = torch.nn.functional.mse_loss(forward(model, x, poison), y)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g.reshape(-1) for (n, _), g in zip(named, grads)}


def forward(model, x, poison):
    h = model[1](model[0](x))
    if poison:  # an Inf in backward below the second layer: the first layer's gradient turns
        h.register_hook(lambda grad: grad * float("inf"))   # non-finite, the others stay finite
    return model[4](model[3](model[2](h)))


def build(prefix: str, lr: float):
    """A fresh model under Horovod's optimizer with the compressor (names under ``prefix``)."""
    model = make_model()
    named = [(f"{prefix}.{n}", p) for n, p in model.named_parameters()]
    comp = RangerCompressor(density=0.05, min_elements=64)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                   named_parameters=named, compression=comp)
    return model, named, comp, opt


def void_step():
    model, named, comp, opt = build("void", 0.1)
    result = {}
    for step in range(5):
        x, y = batch(step)
        poison = step == 2 and RANK == 0
        before = residuals(comp)
        raw = raw_grads(model, named, x, y, poison)
        torch.nn.functional.mse_loss(forward(model, x, poison), y).backward()
        opt.synchronize()
        finite = {n: bool(torch.isfinite(p.grad).all()) for n, p in named}
        if step == 2:
            after = residuals(comp)
            checks = {}
            for n, e in after.items():
                g = raw[n]
                if bool(torch.isfinite(g).all()):
                    checks[n] = ("plus_g", bool(torch.equal(e, before[n] + g)))
                else:
                    checks[n] = ("unchanged", bool(torch.equal(e, before[n])))
            result["checks"] = checks
            result["finite_at_void"] = finite
            # the step a loss scaler would skip: skip it here too
            opt.zero_grad()
            continue
        with opt.skip_synchronize():
            opt.step()
        opt.zero_grad()
        result.setdefault("finite_later", []).append(all(finite.values()))
    result["residuals_finite"] = all(bool(torch.isfinite(e).all()) for e in residuals(comp).values())
    out["void"] = result


def scaler_run():
    model, _, comp, opt = build("amp", 0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    log = []
    for step in range(6):
        x, y = batch(step)
        before_params = params_of(model)
        before_res = residuals(comp)
        scale = scaler.get_scale()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        if step == 3 and RANK == 0:
            loss = loss * float("inf")   # an overflow on one rank only
        scaler.scale(loss).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after = params_of(model)
        res = residuals(comp)
        log.append({
            "step": step,
            "scale_before": scale,
            "scale_after": scaler.get_scale(),
            "params_changed": any(not torch.equal(a, b) for a, b in zip(after, before_params)),
            "residuals_finite": all(bool(torch.isfinite(e).all()) for e in res.values()),
            "residuals_changed": any(not torch.equal(res[n], before_res[n]) for n in before_res),
            "loss": float(loss),
        })
    out["scaler"] = log


def raise_mode():
    model = make_model()
    named = [(f"raise.{n}", p) for n, p in model.named_parameters()]
    comp = RangerCompressor(density=0.05, min_elements=64, nonfinite="raise")
    try:
        comp.compress_sparse("raise.2.weight", torch.full((30, 40), float("nan")))
    except NonFiniteGradientError as exc:
        out["raise"] = str(exc)
    else:
        out["raise"] = None
    out["raise_state_untouched"] = "raise.2.weight" not in comp._state or \
        comp._state["raise.2.weight"].residual is None


def run() -> dict:
    """Every check above; ``compat_scenario`` runs them in its 2-rank launch."""
    void_step()
    scaler_run()
    raise_mode()
    return out


if __name__ == "__main__":
    report(RANK, run())
