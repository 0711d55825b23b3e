"""``exchange="global_topk"`` on TensorFlow under real horovodrun (Gloo), 2 and 3 ranks (and 4
with ``RANGER_TF_GLOBAL_NP4=1``).

On 2 and 3 ranks the checks run inside the tf-keras compatibility launch
(``workers/global_worker.py``, called by ``compat_legacy_worker.py``), so they add their own steps
but no launch of their own. The 4-rank run is a launch of its own (about a minute on two cores),
so it is opt-in."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("horovod.tensorflow")

from tests.hvdrun import run_workers  # noqa: E402
from tests.tensorflow.launches import WORKERS, tf_keras_reports  # noqa: E402

pytestmark = pytest.mark.horovod


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["np2", "np3", "np4"])
def reports(request, tmp_path_factory):
    if request.param == 4:
        if os.environ.get("RANGER_TF_GLOBAL_NP4") != "1":
            pytest.skip("4 ranks: set RANGER_TF_GLOBAL_NP4=1 (a launch of its own)")
        reps = run_workers(WORKERS / "global_worker.py", tmp_path_factory.mktemp("global_np4"),
                           np=4, env={"TF_USE_LEGACY_KERAS": "1"}, timeout=900)
    else:
        reps = tf_keras_reports(request.param, tmp_path_factory)
    for r in reps:
        assert "gtopk_error" not in r, r["gtopk_error"]
    return reps


def _ran(reports, key):
    if key not in reports[0]:
        pytest.skip(f"{key.removeprefix('gtopk_')} runs on 2 ranks and in the opt-in 4-rank launch, "
                    "not in the shared 3-rank one")


def _tolerance(size: int) -> float:
    # two summands add alike in any order and 1/2 is exact; three add in Gloo's order and ours
    return 0.0 if size == 2 else 1e-6


@pytest.mark.parametrize("path", ["hvd_tape_average", "our_tape_average", "hvd_tape_sum", "keras"])
def test_density_one_equals_plain_horovod(reports, path):
    """Horovod's tape (the hook), ranger_hvd's tape (the batched step) and tf-keras
    ``hvd.DistributedOptimizer``: step after step, the weights of uncompressed Horovod."""
    for r in reports:
        eq = r["gtopk_equal"]
        assert eq[f"moved_{path.rsplit('_', 1)[-1]}"] > 1e-3, "the weights must move"
        assert len(eq[path]) == 6
        assert max(eq[path]) <= _tolerance(r["size"]), (path, eq[path])


def test_exchange_follows_the_reference_rule(reports):
    """Known pairs, skewed toward low indices, 6 steps: G (indices, sums bit for bit), the update
    and the pairs given back equal ``core.global_topk.reference_exchange``, whose ranges follow
    each step's G (so they leave equal widths)."""
    for r in reports:
        ref = r["gtopk_reference"]
        assert ref["mismatches"] == [], ref
        equal_widths = [5000 * j // r["size"] for j in range(r["size"] + 1)]
        assert ref["bounds"] != equal_widths, ref
    assert len({str(r["gtopk_reference"]) for r in reports}) == 1, "ranks disagree on the ranges"


@pytest.mark.parametrize("path", ["hvd_tape", "our_tape"])
def test_drain_delivers_every_gradient_once(reports, path):
    """3 steps with gradients, then zeros (20 steps; the residuals emptied after 12 on 2 ranks, 15
    on 3, 17 on 4): the residuals empty and what was delivered is the average of every rank's gradients
    (float32 rounding only): nothing lost, nothing twice."""
    _ran(reports, "gtopk_drain")
    for r in reports:
        d = r["gtopk_drain"][path]
        assert d["residual"] == 0.0, d
        assert d["emptied_at"] is not None, d
        assert d["error"] < 1e-6, d


def test_bytes_received_stay_near_two_k(reports):
    """1M entries, d = 0.01 (k = 10,000 pairs of 8 bytes): with global_topk each rank receives
    about 2·k·8 bytes per step at most; with the allgather exactly the other ranks' pairs plus the
    4-byte token's result. ranger_hvd's tape sends no token."""
    _ran(reports, "gtopk_bytes")
    k, pair = 10_000, 8
    size = reports[0]["size"]
    for r in reports:
        b = r["gtopk_bytes"]
        assert b["hvd_tape_allgather"] == [(size - 1) * k * pair + 4] * 3, b
        for path in ("hvd_tape_global", "our_tape_global"):
            assert all(0 < x <= 2.2 * k * pair for x in b[path]), (path, b[path])
        # the same exchange through both paths; the hook's token adds 4 bytes
        assert [x - 4 for x in b["hvd_tape_global"]] == b["our_tape_global"], b
        if size > 2:
            assert max(b["hvd_tape_global"]) < b["hvd_tape_allgather"][0], b
