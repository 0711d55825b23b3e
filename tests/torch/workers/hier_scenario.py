"""``hierarchical=True`` on 2 hosts x 2 ranks (``-H localhost:2,127.0.0.1:2``) under Horovod's optimizer.

layout     the hosts found, who leads, and the process sets registered at start-up are the ones used
equal      d = 1, both exchanges, equals plain Horovod step after step (Average, Sum, ranger_hvd's
           DistributedOptimizer with its groups and hosts= given, hosts of 3 ranks and of 1 rank);
           every rank ends with the same bits
drain      gradients for 3 steps, then zero gradients: every gradient delivered, none twice; residuals
           only on the leaders, empty at the end
nonfinite  an Inf on a rank that is not a leader voids the step everywhere; the leaders' residuals are
           what they were (its host) or hold the step's host sum back (the other host)
bytes      a 100,000-entry tensor at d = 0.01 (k = 1,000): bytes per step, flat and hierarchical
"""

from __future__ import annotations

import time

from common import digest, drain_error, max_diff, params_of, rank_batch, small_mlp

import torch
import horovod.torch as hvd

from ranger_hvd.torch import DistributedOptimizer, RangerCompressor
from ranger_hvd.torch.hierarchical import host_process_sets
from tests.hvdrun import report

# The sets of hosts [[0, 1], [2, 3]] registered at start-up (static); the drain's other partition
# of the ranks has its sets added by the compressor (dynamic process sets are on too).
STATIC = host_process_sets(2)
hvd.init(process_sets=STATIC)
RANK, SIZE = hvd.rank(), hvd.size()
out: dict = {"rank": RANK, "size": SIZE, "local_rank": hvd.local_rank()}


make = small_mlp


def batch(step):
    return rank_batch(RANK, step)


def trace(comp, tag, op, wrap=hvd.DistributedOptimizer, **kwargs):
    model = make()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
               named_parameters=[(f"{tag}.{n}", p) for n, p in model.named_parameters()],
               compression=comp, op=op, **kwargs)
    steps = []
    for step in range(4):
        x, y = batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        steps.append(params_of(model))
    return steps


HOSTS = {"groups": [[0, 1], [2, 3]], "mixed": [[0, 1, 2], [3]]}


def equal(tag, op, exchanges=("allgather", "global_topk"), wrap=hvd.DistributedOptimizer, **kwargs):
    plain = trace(hvd.Compression.none, f"{tag}.plain", op, wrap=wrap, **kwargs)
    result = {"moved": max_diff(plain[-1], plain[0])}
    for exchange in exchanges:
        comp = RangerCompressor(density=1.0, min_elements=100, exchange=exchange, hierarchical=True,
                                hosts=HOSTS.get(tag))
        steps = trace(comp, f"{tag}.{exchange}", op, wrap=wrap, **kwargs)
        result[exchange] = {"diffs": [max_diff(a, b) for a, b in zip(plain, steps)],
                            "digest": digest(steps[-1])}
    return result


def layout():
    comp = RangerCompressor(density=0.5, min_elements=100, hierarchical=True)
    comp._hier.setup()
    h = comp._hier
    return {"hosts": [list(host) for host in h.layout.hosts], "leader": h.leader,
            "is_leader": h.is_leader,
            "local": None if h.local is None else h.local.ranks,
            "cross": None if h.cross is None else h.cross.ranks,
            "static": [h.local.process_set_id] + ([] if h.cross is None else [h.cross.process_set_id]),
            "registered": {str(p.ranks): p.process_set_id for p in STATIC}}


def drain(exchange, steps, hosts=None):
    model = make()
    comp = RangerCompressor(density=0.2, min_elements=100, exchange=exchange, hierarchical=True,
                            hosts=hosts)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=[(f"drain.{exchange}.{n}", p)
                                                     for n, p in model.named_parameters()],
                                   compression=comp)
    # drain_error takes each gradient apart with autograd.grad: .grad is summed over the host in place
    worst = drain_error(model, opt, batch, steps, f"drain.{exchange}")
    compressed = [st for name, st in comp._state.items() if comp.is_compressed(
        dict(model.named_parameters())[name.split(".", 2)[2]].shape)]
    held = [st.residual is not None for st in compressed]
    residual = sum(float(st.residual.abs().sum()) for st in compressed if st.residual is not None)
    return {"error": worst, "residual": residual, "held": held, "leader": comp._hier.is_leader}


def nonfinite():
    w = torch.nn.Parameter(torch.zeros(40, 50))
    comp = RangerCompressor(density=0.3, min_elements=100, hierarchical=True)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("nf.w", w)],
                                   compression=comp)

    def coefficients(rank, step):
        c = torch.randn(40, 50, generator=torch.Generator().manual_seed(1000 * step + rank))
        if step == 1 and rank == 3:
            c[7, 9] = float("inf")
        return c

    before = None
    for step in range(2):
        (w * coefficients(RANK, step)).sum().backward()
        opt.synchronize()
        seen = bool(torch.isfinite(w.grad).all())
        opt.zero_grad()
        if step == 0 and comp._hier.is_leader:
            before = comp._state["nf.w"].residual.clone()
    result = {"finite_after_inf": seen, "void": comp.round.void}
    if comp._hier.is_leader:
        host = comp._hier.layout.host_of(RANK)
        host_sum = coefficients(host[0], 1) + coefficients(host[1], 1)
        after = comp._state["nf.w"].residual.view(40, 50)
        result["unchanged"] = bool(torch.equal(after.view(-1), before))
        result["holds_step_back"] = bool(torch.equal(after, before.view(40, 50) + host_sum))
    else:
        result["no_residual"] = comp._state["nf.w"].residual is None
    return result


def received_per_step(flat_or_hier, exchange):
    """One 400x250 weight (100,000 entries), d = 0.01, 2 steps: bytes per step."""
    w = torch.nn.Parameter(torch.zeros(400, 250))
    comp = RangerCompressor(density=0.01, min_elements=1000, exchange=exchange,
                            hierarchical=flat_or_hier == "hier")
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1),
                                   named_parameters=[(f"big.{flat_or_hier}.{exchange}", w)],
                                   compression=comp)
    rows, before = [], comp.stats()
    for step in range(2):
        g = torch.Generator().manual_seed(7 * RANK + step)
        (w * torch.randn(400, 250, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
        now = comp.stats()
        rows.append({key: now.get(key, 0) - before.get(key, 0) for key in
                     ("bytes_sent", "bytes_received", "bytes_sent_local", "bytes_received_local")})
        before = now
    return rows


SECTIONS = {   # the sections that add process sets of other host partitions last: every set
    # registered takes part in each cycle of Horovod's background loop
    "layout": layout,
    "equal_sum": lambda: equal("sum", hvd.Sum),
    "equal_average": lambda: equal("average", hvd.Average),
    "equal_groups": lambda: equal("groups", hvd.Average, ("allgather",), wrap=DistributedOptimizer),
    "drain_global": lambda: drain("global_topk", 16),
    "nonfinite": nonfinite,
    "bytes": lambda: {mode: received_per_step(*mode.split("-")) for mode in
                      ("flat-allgather", "hier-allgather", "hier-global_topk")},
    "drain_allgather": lambda: drain("allgather", 12, hosts=[[0, 2], [1, 3]]),
    "equal_mixed": lambda: equal("mixed", hvd.Average, ("allgather",)),
}
out["seconds"] = {}
for key, section in SECTIONS.items():
    began = time.perf_counter()
    out[key] = section()
    out["seconds"][key] = round(time.perf_counter() - began, 2)
report(RANK, out)
