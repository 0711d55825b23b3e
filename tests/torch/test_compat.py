"""Works wherever Horovod works: the compatibility matrix and non-finite gradients, on real ranks.

Each launch runs every cell (tests/torch/workers/compat_scenario.py); the tests read the reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from tests.hvdrun import run_workers  # noqa: E402
from tests.torch.launches import compat_reports  # noqa: E402

WORKERS = Path(__file__).parent / "workers"
pytestmark = pytest.mark.horovod

CELLS = ["average", "sum", "predivide", "passes", "groups_int", "groups_list", "sparse_as_dense",
         "sparse_embedding", "frozen", "toggled", "fp64", "fp16", "bf16", "process_set"]


def _compat(np: int, tmp_path_factory) -> list[dict]:
    """One launch per rank count, shared by the fixtures below (and test_global_topk.py)."""
    return compat_reports(np, tmp_path_factory)


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def matrix(request, tmp_path_factory):
    return _compat(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory):
    """The 2-rank matrix launch also runs workers/nonfinite_scenario.py."""
    return [rep["nonfinite"] for rep in _compat(2, tmp_path_factory)]


# Half precision gradients and residuals round to fp16/bf16 (8 and 11 bits less than fp32): a
# tolerance of a few of their epsilons. Values travel as fp32 (value_dtype), so fp64 differs from
# Horovod's fp64 allreduce by fp32 rounding. Three ranks: Gloo adds three summands in its own order.
TOLERANCE = {"fp16": 4e-3, "bf16": 3e-2, "fp64": 1e-7}


@pytest.mark.parametrize("cell", CELLS)
def test_density_one_equals_plain_horovod(matrix, cell):
    for rep in matrix:
        r = rep["cells"][cell]
        assert r["d1_moved"] > 1e-3, r
        if r["plain_error"] is not None:
            # Horovod alone cannot run this cell (bf16 has no collective): d = 1 must equal the
            # plain average of every rank's gradient instead.
            assert cell == "bf16", r
            assert r["d1_conservation"] < TOLERANCE[cell], r
            continue
        tol = TOLERANCE.get(cell, 0.0 if rep["size"] == 2 else 1e-6)
        assert r["d1_vs_plain"] <= tol, (cell, rep["size"], r)


@pytest.mark.parametrize("cell", CELLS)
def test_density_001_trains_and_conserves(matrix, cell):
    for rep in matrix:
        r = rep["cells"][cell]
        assert r["d001_finite"] and r["d001_moved"] > 1e-4, r
        # the loss over every rank's data falls, at d = 1 as at d = 0.01
        assert r["d1_losses"][-1] < 0.95 * r["d1_losses"][0], r["d1_losses"]
        assert r["d001_losses"][-1] < r["d001_losses"][0], r["d001_losses"]
        assert r["compressed_tensors"] >= 2, r   # the embedding and the hidden layer at least
        assert r["bytes_sent"] > 0
        # what was applied + what the residuals hold == every rank's gradients, averaged
        assert r["conservation"] < TOLERANCE.get(cell, 1e-5), (cell, rep["size"], r)


def test_ranks_agree_on_every_cell(matrix):
    first = matrix[0]["cells"]
    for rep in matrix[1:]:
        for cell in CELLS:
            assert rep["cells"][cell]["d001_moved"] == first[cell]["d001_moved"], cell


def test_void_step_shows_non_finite_and_undoes_sends(nonfinite):
    for rep in nonfinite:
        v = rep["void"]
        # every rank's averaged first-layer gradient shows the Inf of rank 0
        assert not v["finite_at_void"]["void.0.weight"], v
        for name, (kind, ok) in v["checks"].items():
            assert ok, (rep["rank"], name, kind)
            expected = "unchanged" if rep["rank"] == 0 and name == "void.0.weight" else "plus_g"
            assert kind == expected, (rep["rank"], name, kind)
        assert v["finite_later"] == [True] * 4
        assert v["residuals_finite"]


def test_grad_scaler_skips_the_overflow_step_and_goes_on(nonfinite):
    for rep in nonfinite:
        log = rep["scaler"]
        overflow = log[3]
        assert not overflow["params_changed"], overflow          # skipped on every rank
        assert overflow["scale_after"] == overflow["scale_before"] / 2
        assert all(e["residuals_finite"] for e in log)
        for e in log[:3] + log[4:]:
            assert e["params_changed"], e
            assert e["scale_after"] == e["scale_before"]
        assert log[-1]["loss"] == log[-1]["loss"]  # finite training after the overflow


def test_raise_mode_names_the_parameter(nonfinite):
    for rep in nonfinite:
        assert rep["raise"] is not None and "'raise.2.weight'" in rep["raise"]
        assert rep["raise_state_untouched"]


def test_adasum_is_refused_with_a_clear_error(tmp_path):
    """Adasum combines whole vectors by dot products; top-k pairs cannot take part (MPI: Gloo has no
    Adasum in Horovod 0.28.1)."""
    for rep in run_workers(WORKERS / "adasum_scenario.py", tmp_path, np=2, controller="mpi"):
        assert rep["error"] is not None and "op=hvd.Adasum" in rep["error"], rep
