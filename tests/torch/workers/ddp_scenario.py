"""``ranger_hook`` under ``torchrun`` (Gloo): one launch, every check; tests/torch/test_ddp.py reads it.

equal      d = 1 equals plain DDP step after step (also with tiny buckets, find_unused_parameters,
           static_graph)
digits     d = 0.01 on the digits MLP against DDP at the same steps (final loss)
resume     saved after 10 steps (model, optimizer, hook state), resumed in fresh objects
drain      gradients for some steps, then zero gradients: every gradient delivered, none twice
scaler     GradScaler with an Inf on every rank at one step: skipped, residuals bit for bit as before
no_sync    4 micro-batches under no_sync at d = 1 equal one batch of all of them
global     exchange="global_topk": d = 1 equals plain DDP (the four cells of "equal"); at d = 0.05
           each step's update and residuals against core.global_topk.reference_exchange fed with
           every rank's own top-k; the drain; GradScaler's skipped step; the digits MLP; the bytes
           a 1M-entry tensor brings each rank at d = 0.01
"""

from __future__ import annotations

import io
import os
import sys

from common import max_diff, params_of

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import numpy as np

from ranger_hvd.core import global_topk as rule
from ranger_hvd.core import reference
from ranger_hvd.torch.ddp import RangerHookState, ranger_hook
from tests.hvdrun import report

dist.init_process_group("gloo")
RANK, SIZE = dist.get_rank(), dist.get_world_size()
out: dict = {"rank": RANK, "size": SIZE}


class Net(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 10)
        self.spare = torch.nn.Linear(10, 10) if unused else None

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


GLOBAL = {"exchange": "global_topk"}


def make(hook: dict | None, unused=False, model=None, comm_hook=ranger_hook, **ddp_kwargs):
    torch.manual_seed(0)
    model = Net(unused) if model is None else model
    named = list(model.named_parameters())
    ddp = DDP(model, **ddp_kwargs)
    state = None
    if hook is not None:
        state = RangerHookState(named, **hook)
        ddp.register_comm_hook(state, comm_hook)
    return model, ddp, state


def batch(step, micro=0, size=16):
    g = torch.Generator().manual_seed(1000 * RANK + 10 * step + micro)
    return torch.randn(size, 64, generator=g), torch.randint(0, 10, (size,), generator=g)


def train(ddp, opt, steps, start=0):
    trace = []
    for step in range(start, start + steps):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        trace.append(params_of(ddp.module))
    return trace


def equal_cells(extra=None, key="equal"):
    cells = {"default": {}, "tiny_buckets": {"bucket_cap_mb": 0.01},
             "unused": {"find_unused_parameters": True}, "static": {"static_graph": True}}
    res = {}
    for name, kw in cells.items():
        unused = name == "unused"
        runs = []
        for hook in (None, {"density": 1.0, "min_elements": 100, **(extra or {})}):
            model, ddp, _ = make(hook, unused=unused, **kw)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            runs.append(train(ddp, opt, 5))
        res[name] = max(max_diff(a, b) for a, b in zip(*runs))
        res[name + "_moved"] = max_diff(runs[0][-1], runs[0][0])
    out[key] = res


def digits(extra=None, min_elements=100):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    losses = {}
    for label, hook in (("ddp", None), ("ranger", {"density": 0.01, "min_elements": min_elements,
                                                   **(extra or {})})):
        model, ddp, state = make(hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(RANK)
        for _ in range(300):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            losses[label] = float(torch.nn.functional.cross_entropy(model(x), y))
        if state is not None:
            losses["bytes_sent"] = state.stats()["bytes_sent"]
            losses["bytes_dense"] = state.stats()["bytes_dense"]
    return losses


def resume():
    hook = {"density": 0.05, "min_elements": 100, "momentum": 0.9}
    model, ddp, state = make(hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    straight = train(ddp, opt, 20)
    model, ddp, state = make(hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(ddp, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
               buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    # fresh objects, and buckets of another size: the state is keyed by parameter name
    model, ddp, state = make(hook, bucket_cap_mb=0.01)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(saved["opt"])
    state.load_state_dict(saved["hook"])
    resumed = train(ddp, opt, 10, start=10)
    out["resume"] = {"diff": max_diff(straight[-1], resumed[-1]),
                     "names": sorted(saved["hook"]["tensors"])}


def drain(extra=None, density=0.01):
    model, ddp, state = make({"density": density, "min_elements": 100, **(extra or {})})
    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    delivered = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for step in range(110):
        x, y = batch(step)
        zero = 0.0 if step >= 5 else 1.0    # 5 steps with gradients, then nothing new
        grads = torch.autograd.grad(zero * torch.nn.functional.cross_entropy(model(x), y),
                                    list(model.parameters()))
        for t, g in zip(total, grads):
            t += g.double()
        (zero * torch.nn.functional.cross_entropy(ddp(x), y)).backward()
        for d, p in zip(delivered, model.parameters()):
            d += p.grad.double()
        model.zero_grad()
    for t in total:
        dist.all_reduce(t)
        t /= SIZE
    residual = sum(float(st.residual.abs().sum()) for st in state.compressor._state.values()
                   if st.residual is not None)
    return {"error": max(float((d - t).abs().max()) for d, t in zip(delivered, total)),
            "scale": max(float(t.abs().max()) for t in total), "residual": residual}


def scaler(extra=None):
    model, ddp, state = make({"density": 0.05, "min_elements": 100, **(extra or {})})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    log = []
    for step in range(5):
        x, y = batch(step)
        before = {n: st.residual.clone() for n, st in state.compressor._state.items()
                  if st.residual is not None}
        params = params_of(model)
        scale = sc.get_scale()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(ddp(x).float(), y)
        if step == 2:
            loss = loss * float("inf")
        sc.scale(loss).backward()
        sc.step(opt)
        sc.update()
        opt.zero_grad()
        after = {n: st.residual for n, st in state.compressor._state.items()
                 if st.residual is not None}
        log.append({
            "skipped": all(torch.equal(a, b) for a, b in zip(params, params_of(model))),
            "scale_before": scale, "scale_after": sc.get_scale(),
            "residuals_same": bool(before) and all(torch.equal(before[n], after[n]) for n in before),
            "residuals_finite": all(bool(torch.isfinite(e).all()) for e in after.values()),
        })
    return log


def no_sync():
    results = []
    for micro in (4, 1):
        model, ddp, _ = make({"density": 1.0, "min_elements": 100})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            x, y = batch(step, size=32)
            if micro == 1:
                torch.nn.functional.cross_entropy(ddp(x), y, reduction="sum").backward()
            else:
                with ddp.no_sync():
                    for j in range(3):
                        part = slice(8 * j, 8 * j + 8)
                        torch.nn.functional.cross_entropy(ddp(x[part]), y[part],
                                                          reduction="sum").backward()
                torch.nn.functional.cross_entropy(ddp(x[24:]), y[24:], reduction="sum").backward()
            opt.step()
            opt.zero_grad()
        results.append(params_of(model))
    out["no_sync"] = max_diff(*results)


def global_reference():
    """Each step at d = 0.05 against the rule: every rank's own top-k of (its residual before + the
    gradient the hook was handed), exchanged by ``reference_exchange`` with the ranges of the last G."""
    seen = {}

    def recording_hook(st, bucket):
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            seen[st.name_of(p)] = g.detach().clone()
        return ranger_hook(st, bucket)

    model, ddp, state = make({"density": 0.05, "min_elements": 100, **GLOBAL},
                             comm_hook=recording_hook, bucket_cap_mb=0.01)
    comp = state.compressor
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = dict(model.named_parameters())
    compressed = [n for n, p in named.items() if comp.is_compressed(p.shape)]
    worst = {"grad": 0.0, "residual": 0.0, "selected": [], "k": {}, "compressed": compressed}
    for step in range(4):
        before = {n: (comp._state[n].residual.clone() if n in comp._state else
                      torch.zeros(named[n].numel())) for n in compressed}
        last = {n: comp._global.last.get(n) for n in compressed}
        x, y = batch(step)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        for n in compressed:
            acc = before[n] + seen[n].reshape(-1)
            k = comp.engine.schedule(acc.numel())[-1]
            idx = reference.select(acc.numpy(), k)
            pairs = [None] * SIZE
            dist.all_gather_object(pairs, (idx, acc.numpy()[idx]))
            g_idx, g_sums, dropped = rule.reference_exchange(pairs, acc.numel(), last[n])
            want = np.zeros(acc.numel(), np.float32)
            want[g_idx] = g_sums / np.float32(SIZE)
            got = named[n].grad.reshape(-1).numpy()
            worst["grad"] = max(worst["grad"], float(np.abs(got - want).max()))
            residual = acc.numpy().copy()
            residual[idx] = 0
            back = idx[dropped[RANK]]
            residual[back] = acc.numpy()[back]
            worst["residual"] = max(worst["residual"],
                                    float(np.abs(comp._state[n].residual.numpy() - residual).max()))
            worst["selected"].append(int(len(g_idx)))
            worst["k"][n] = int(k)
        opt.step()
        opt.zero_grad()
    return worst


def global_bytes():
    """Bytes a 1M-entry tensor brings this rank per step at d = 0.01 (k = 10,000 pairs of 8 bytes)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 1000, bias=False)
    _, ddp, state = make({"density": 0.01, **GLOBAL}, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    per_step, last = [], 0
    for step in range(4):
        g = torch.Generator().manual_seed(100 * RANK + step)
        ddp(torch.randn(8, 1000, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        now = state.stats()["bytes_received"]
        per_step.append(now - last)
        last = now
    return {"per_step": per_step, "k": 10_000}


def global_cells():
    # digits as issue 33 sets it: the hidden layer's 64x128 weight compressed, the 1280-entry output
    # weight dense (compressed too, at 13 entries a step, global top-k lags dense at 300 steps and
    # catches up by 600: benchmarks/ddp_global_digits.py).
    # The drain at d = 0.2: an index leaves a rank's residual only when that rank sends it and its
    # owner keeps it, so emptying them takes up to about N*n/k steps
    equal_cells(GLOBAL, key="global_equal")
    out["global"] = {"reference": global_reference(), "drain": drain(GLOBAL, density=0.2),
                     "scaler": scaler(GLOBAL), "digits": digits(GLOBAL, min_elements=4096), "bytes": global_bytes()}


equal_cells()
out["digits"] = digits()
resume()
out["drain"] = drain()
out["scaler"] = scaler()
no_sync()
global_cells()
report(RANK, out)
dist.barrier()
# Exit without tearing down Gloo's process group and the interpreter: once in a while that teardown
# aborted ("terminate called without an active exception", after both reports were written), which
# says nothing about the hook and would fail the launch.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
