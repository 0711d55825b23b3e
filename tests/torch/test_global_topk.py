"""``exchange="global_topk"`` on real ranks (Horovod, Gloo): 2, 3 and 4 processes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from tests.hvdrun import run_workers  # noqa: E402
from tests.torch.launches import compat_reports  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "global_scenario.py"
pytestmark = pytest.mark.horovod


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["np2", "np3", "np4"])
def runs(request, tmp_path_factory):
    if request.param in (2, 3):   # the compatibility launch of that size runs global_scenario too
        return [rep["global"] for rep in compat_reports(request.param, tmp_path_factory)]
    return run_workers(WORKER, tmp_path_factory.mktemp(f"global_np{request.param}"),
                       np=request.param, timeout=400)


@pytest.mark.parametrize("op", ["equal_average", "equal_sum"])
def test_density_one_equals_plain_horovod(runs, op):
    for rep in runs:
        r = rep[op]
        assert r["moved"] > 1e-3
        # two summands add alike in any order; more add in Gloo's order and ours (rank order)
        assert max(r["diffs"]) <= (0.0 if rep["size"] == 2 else 1e-6), r


def test_drain_delivers_every_gradient_once(runs):
    for rep in runs:
        d = rep["drain"]
        assert d["residual"] == 0.0, d
        assert d["error"] < 1e-6, d


def test_bytes_received_stay_flat_with_global_topk(runs):
    """1M entries, d = 0.01 (k = 10,000 pairs of 8 bytes): the busiest rank receives about 2·k·8
    bytes per step with global_topk, (N-1)·k·8 with the allgather."""
    k, pair = 10_000, 8
    size = runs[0]["size"]
    busiest = max(max(rep["bytes_global"]) for rep in runs)
    assert busiest <= 2.2 * k * pair, busiest
    for rep in runs:
        # the allgather: exactly the other ranks' pairs, plus the 4-byte token's result
        assert rep["bytes_allgather"] == [(size - 1) * k * pair + 4] * 3, rep["bytes_allgather"]


def test_digits_mlp_global_topk_trains_like_dense(runs):
    """4 ranks, each its own shard of the digits, 150 steps of SGD (momentum 0.9) through
    hvd.DistributedOptimizer: global_topk at d = 0.01 ends within 10% of dense's full-data loss."""
    if runs[0]["size"] != 4:
        pytest.skip("the digits MLP runs on 4 ranks")
    reps = [rep["digits"] for rep in runs]
    losses = [{m: (r[m]["initial"], r[m]["final"]) for m in ("dense", "global")} for r in reps]
    assert all(lo == losses[0] for lo in losses), losses   # the same model on every rank, so the same loss
    dense, glob = reps[0]["dense"], reps[0]["global"]
    assert dense["initial"] == glob["initial"], reps[0]        # the same starting weights
    assert dense["final"] < 0.2 * dense["initial"], dense      # training moved
    assert glob["final"] <= 1.10 * dense["final"], reps[0]
