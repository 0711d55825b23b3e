"""``exchange="global_topk"`` under Horovod's optimizer: equality at d = 1, the drain, the bytes.

equal     d = 1 with global_topk equals plain Horovod step after step (Average, Sum)
drain     some steps with gradients, then zero gradients: every gradient delivered, none twice
bytes     a 1M-entry tensor at d = 0.01: bytes this rank received per step, global_topk and allgather
digits    4 ranks only: a 64-128-10 MLP on scikit-learn's digits, each rank its own shard, 150 steps of
          SGD (momentum 0.9) through hvd.DistributedOptimizer, dense against global_topk at d = 0.01
          (the 64x128 weight compressed): the full-data loss of each at the start and the end
"""

from __future__ import annotations

from common import drain_error, max_diff, params_of, rank_batch, small_mlp

import torch
import horovod.torch as hvd

from ranger_hvd.torch import RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()


make = small_mlp


def batch(step):
    return rank_batch(RANK, step)


def equal(op, tag):
    traces = []
    for comp in (hvd.Compression.none, RangerCompressor(density=1.0, min_elements=100,
                                                        exchange="global_topk")):
        model = make()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                                       named_parameters=[(f"{tag}{len(traces)}.{n}", p)
                                                         for n, p in model.named_parameters()],
                                       compression=comp, op=op)
        trace = []
        for step in range(4):
            x, y = batch(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            trace.append(params_of(model))
        traces.append(trace)
    return {"diffs": [max_diff(a, b) for a, b in zip(*traces)],
            "moved": max_diff(traces[0][-1], traces[0][0])}


def drain():
    model = make()
    comp = RangerCompressor(density=0.2, min_elements=100, exchange="global_topk")
    named = [(f"drain.{n}", p) for n, p in model.named_parameters()]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=named, compression=comp)
    # 3 steps with gradients, then nothing new: an index leaves a rank's residual only when that
    # rank sends it and its owner keeps it, so draining takes up to about N*n/k steps
    worst = drain_error(model, opt, batch, 40, "drain")
    residual = sum(float(st.residual.abs().sum()) for st in comp._state.values()
                   if st.residual is not None)
    return {"error": worst, "residual": residual}


def received_per_step(exchange):
    """One 1000x1000 weight (1M entries), d = 0.01, 3 steps: bytes received per step."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(1000, 1000))
    comp = RangerCompressor(density=0.01, min_elements=1000, exchange=exchange)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1),
                                   named_parameters=[(f"big.{exchange}", w)], compression=comp)
    per_step, before = [], 0
    for step in range(3):
        g = torch.Generator().manual_seed(7 * RANK + step)
        (w * torch.randn(1000, 1000, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
        now = comp.stats()["bytes_received"]
        per_step.append(now - before)
        before = now
    return per_step


DIGITS_STEPS, DIGITS_BATCH = 150, 16


def digits_mlp():
    """Full-data cross-entropy of a 64-128-10 MLP before and after DIGITS_STEPS steps, dense and with
    global_topk at d = 0.01, from the same initial weights and the same batches; each rank trains on its
    own quarter of the digits (a fixed shuffle, then every SIZE-th sample)."""
    import time

    from sklearn.datasets import load_digits

    data = load_digits()
    x_all = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    mine = order[RANK::SIZE]
    x, y = x_all[mine], y_all[mine]

    def full_loss(model):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x_all), y_all))

    result = {}
    # the hidden layer's 64x128 weight (8192 entries) is compressed; the rest (at most 1280) goes dense
    for label, comp in (("dense", hvd.Compression.none),
                        ("global", RangerCompressor(density=0.01, min_elements=4096, exchange="global_topk"))):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                       named_parameters=[(f"digits.{label}.{n}", p)
                                                         for n, p in model.named_parameters()],
                                       compression=comp)
        gen = torch.Generator().manual_seed(1000 + RANK)
        initial, started = full_loss(model), time.perf_counter()
        for _ in range(DIGITS_STEPS):
            pick = torch.randint(len(y), (DIGITS_BATCH,), generator=gen)
            torch.nn.functional.cross_entropy(model(x[pick]), y[pick]).backward()
            opt.step()
            opt.zero_grad()
        result[label] = {"initial": initial, "final": full_loss(model),
                         "seconds": time.perf_counter() - started}
    return result


def run() -> dict:
    """Every section; ``compat_scenario.py`` calls it in its 2- and 3-rank launches (a launch fewer
    each), the 4-rank launch runs this file alone."""
    out = {"rank": RANK, "size": SIZE}
    out["equal_average"] = equal(hvd.Average, "ea")
    out["equal_sum"] = equal(hvd.Sum, "es")
    out["drain"] = drain()
    out["bytes_global"] = received_per_step("global_topk")
    out["bytes_allgather"] = received_per_step("allgather")
    if SIZE == 4:
        out["digits"] = digits_mlp()
    return out


if __name__ == "__main__":
    # the busiest rank is what bounds a step: every rank reports, the test takes the maximum
    report(RANK, run())
