"""``exchange="global_topk"`` on real ranks (Horovod, Gloo): 2, 3 and 4 processes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from tests.hvdrun import run_workers  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "global_scenario.py"
pytestmark = pytest.mark.horovod


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["np2", "np3", "np4"])
def runs(request, tmp_path_factory):
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
