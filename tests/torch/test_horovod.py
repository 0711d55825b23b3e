"""The PyTorch backend under real ``horovodrun`` (Gloo), 1, 2 and 3 processes.

Launching is the slow part, so each scenario is one launch whose workers run many checks and report
them (tests/torch/workers/*.py); the tests below only read the reports.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from tests.hvdrun import run_workers  # noqa: E402

WORKERS = Path(__file__).parent / "workers"
pytestmark = pytest.mark.horovod


def _launch(tmp_path_factory, script: str, np: int, args=None):
    return run_workers(WORKERS / script, tmp_path_factory.mktemp(f"{Path(script).stem}_np{np}"),
                       np=np, args=args)


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def core(request, tmp_path_factory):
    return _launch(tmp_path_factory, "core_scenario.py", request.param)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return _launch(tmp_path_factory, "state_scenario.py", 2)


@pytest.fixture(scope="module")
def converge(tmp_path_factory):
    return _launch(tmp_path_factory, "converge_scenario.py", 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch(tmp_path_factory, "single_scenario.py", 1)[0]


# ---------------------------------------------------------------- equivalence and the spec
def test_density_one_equals_horovod_step_after_step(core):
    for rep in core:
        eq = rep["equivalence"]
        for label in ("average", "sum", "predivide", "passes", "groups"):
            assert eq[f"moved_{label}"] > 1e-3, label  # the parameters did change
            for mode in ("a", "b", "r"):
                diffs = eq[f"{mode}_{label}"]
                assert len(diffs) == 4
                if rep["size"] == 2:
                    # Two summands add the same way in any order, and 1/2 is exact: same bits.
                    assert diffs == [0.0] * 4, (mode, label, diffs)
                else:
                    # Gloo's ring adds three summands in its own order; 1/3 rounds.
                    assert max(diffs) < 1e-6, (mode, label, diffs)


def test_sparse_optimizer_and_ranger_follow_reference(core):
    for rep in core:
        for mode in ("reference_a", "reference_b", "reference_c", "reference_d", "reference_e"):
            assert rep[mode]["moved"] > 0.1
            assert rep[mode]["max_rel_error"] < 1e-5, (mode, rep[mode])


# ---------------------------------------------------------------- conservation and bytes
@pytest.mark.parametrize("mode", ["conservation_a", "conservation_b", "conservation_r"])
def test_conservation_observed_from_outside(core, mode):
    for rep in core:
        r = rep[mode]
        assert r["residual_norm"] == 0.0, "zero-gradient steps should drain the residual"
        # The sum of the applied updates equals the average of all ranks' summed gradients.
        assert r["max_error"] < 1e-5 * max(1.0, r["scale"]), r


@pytest.mark.parametrize("mode", ["conservation_a", "conservation_b", "conservation_r"])
def test_bytes_follow_the_formula(core, mode):
    for rep in core:
        r = rep[mode]
        assert r["bytes_sent"] == r["bytes_expected"]
        assert r["bytes_dense"] == r["bytes_dense_expected"]
        assert r["bytes_sent"] < r["bytes_dense"]


def test_low_density_bytes(core):
    # Two compressed weights (64x24 -> k=31, 8x64 -> k=11) and three dense biases plus the 3x8
    # weight (64 + 8 + 3 + 24 = 99 entries), 20 steps. Top-k: k * (4 + 4) plus the 4-byte token per
    # compressed tensor; random-k: k values.
    for run in ("agree_a", "agree_b", "agree_ranger"):
        stats = core[0][run]["stats"]
        assert stats["bytes_sent"] == 20 * ((31 + 11) * (4 + 4) + 2 * 4 + 99 * 4), (run, stats)
        assert stats["bytes_dense"] == 20 * 4 * (1536 + 512 + 99)
    assert core[0]["agree_r"]["stats"]["bytes_sent"] == 20 * ((31 + 11) * 4 + 99 * 4)
    fp16 = core[0]["agree_b_fp16_wire"]["stats"]
    assert fp16["bytes_sent"] == 20 * ((31 + 11) * (2 + 4) + 2 * 4 + 99 * 4)


def test_every_entry_point_is_one_exchange(core):
    """Horovod's optimizer with the compressor, ours and Ranger end with the same bits on 2 ranks
    (on 3, Gloo's ring adds the dense tensors in an order that depends on how Horovod fused them)."""
    for rep in core:
        if rep["size"] == 2:
            assert rep["agree_a"]["params"] == rep["agree_b"]["params"] == rep["agree_ranger"]["params"]


BUCKET_RUNS = ["buckets_default", "buckets_small", "buckets_none", "buckets_groups"]


def test_buckets_change_the_collectives_not_the_bits(core):
    """The two compressed weights (2.weight, then 0.weight: backward order) share one allgather per
    step by default or under one Horovod group, and travel alone in 5 KB buckets or with
    bucket_mb=0; the parameters end with the same bits (on 2 ranks; on 3, Horovod's fusion of the
    dense tensors may add three summands in another order) and the same byte counts."""
    for rep in core:
        steps = 20
        for run in BUCKET_RUNS:
            assert rep[run]["stats"]["bytes_sent"] == rep["agree_b"]["stats"]["bytes_sent"], run
            if rep["size"] == 2:
                assert rep[run]["params"] == rep["agree_b"]["params"], run
        for run in ("buckets_default", "buckets_groups"):
            assert rep[run]["allgathers"] == steps, run
            [name] = rep[run]["allgather_names"]
            assert name.startswith("ranger.topk.") and name.endswith(".2.weight+1"), name
        for run in ("buckets_small", "buckets_none"):
            assert rep[run]["allgathers"] == 2 * steps, run
            assert [n.rsplit(".", 2)[-2:] for n in rep[run]["allgather_names"]] == [
                ["0", "weight"], ["2", "weight"]], rep[run]["allgather_names"]


def test_global_topk_buckets_change_the_collectives_not_the_bits(core):
    """exchange="global_topk": by default the two compressed weights share one alltoall (and one
    allgather of kept sums) per step, with bucket_mb=0 each has its own; each tensor keeps its own
    ranges, budgets and selection, so the parameters and byte counts end the same."""
    for rep in core:
        steps = 20
        bucketed, alone = rep["global_buckets_default"], rep["global_buckets_none"]
        assert bucketed["stats"] == alone["stats"]
        assert bucketed["moved"] > 1e-3
        if rep["size"] == 2:
            assert bucketed["params"] == alone["params"]
        assert bucketed["allgathers"] == steps
        [name] = bucketed["allgather_names"]
        assert name.startswith("ranger.gtopk.send.") and name.endswith(".2.weight+1"), name
        assert alone["allgathers"] == 2 * steps


# ---------------------------------------------------------------- agreement across ranks
AGREEMENT_RUNS = ["agree_a", "agree_b", "agree_ranger", "agree_r", "agree_a_momentum_warmup",
                  "agree_b_momentum_warmup", "agree_r_momentum_warmup", "agree_b_fp16_wire",
                  "agree_b_bf16_model", "agree_r_bf16_model", "agree_b_fp16_model",
                  "agree_r_fp16_wire", *BUCKET_RUNS]


@pytest.mark.parametrize("run", AGREEMENT_RUNS)
def test_all_ranks_end_with_identical_parameters(core, run):
    per_rank = [(rep[run]["params"], rep[run]["param_sum"]) for rep in core]
    assert len({digest for digest, _ in per_rank}) == 1, f"(digest, sum of parameters) per rank: {per_rank}"
    assert core[0][run]["moved"] > 0


def test_conservation_params_identical_across_ranks(core):
    for mode in ("conservation_a", "conservation_b", "conservation_r"):
        assert len({rep[mode]["params"] for rep in core}) == 1


@pytest.mark.parametrize("run", [r for r in AGREEMENT_RUNS if r.startswith("agree_r") and r != "agree_ranger"])
def test_random_k_ranks_choose_the_same_coordinates(core, run):
    assert len({rep[run]["chosen"] for rep in core}) == 1
    assert core[0][run]["chosen_count"] == 2 * 20  # two compressed tensors, 20 steps


# ---------------------------------------------------------------- state_dict round trip
@pytest.mark.parametrize("mode", ["a", "b", "c", "d"])
def test_state_dict_round_trip_resumes_bit_for_bit(state, mode):
    for rep in state:
        r = rep[mode]
        assert r["resumed_maxdiff"] == 0.0 and r["resumed"] == r["straight"], r
        assert r["residuals_maxdiff"] == 0.0 and r["residual_count"][0] == r["residual_count"][1], r
        assert r["steps"] == 6
        assert r["has_ranger_state"] == (mode != "b")
    assert len({rep[mode]["straight"] for rep in state}) == 1


# ---------------------------------------------------------------- convergence
def test_small_classification_at_one_percent_density(converge):
    for rep in converge:
        dense = rep["dense"]["loss"]
        assert dense < 0.5 * rep["initial_loss"]
        # Top-k with error feedback and momentum after the exchange learns like dense: our
        # optimizer (a), Horovod's own with the compressor (b) and Ranger's default (c).
        for mode in ("a", "b", "c"):
            assert rep[mode]["loss"] <= 1.05 * dense, (mode, rep[mode]["loss"], dense)
        # DGC's momentum factor masking drops the momentum of the coordinates sent most often, so
        # it learns more slowly on this small problem; random-k more slowly still.
        assert rep["d"]["loss"] <= 1.6 * dense, (rep["d"]["loss"], dense)
        # The same momentum in the compressor without the masking (momentum_mode="local").
        assert rep["l"]["loss"] <= 1.05 * dense, (rep["l"]["loss"], dense)
        assert rep["r"]["loss"] < 0.5 * rep["initial_loss"], rep["r"]["loss"]
        for mode in ("a", "b", "c", "d", "l", "r"):
            s = rep[mode]["stats"]
            assert s["bytes_sent"] * 10 < s["bytes_dense"], (mode, s)
        assert rep["a"]["params"] == rep["b"]["params"] == rep["c"]["params"]
    assert len({rep["a"]["params"] for rep in converge}) == 1


# ---------------------------------------------------------------- one process
def test_ranger_single_process_is_sgd_momentum(single):
    assert single["size"] == 1 and single["initialised_by_ranger"]
    assert single["ranger_vs_sgd_maxdiff"] == 0.0 and single["ranger_dgc_vs_sgd_maxdiff"] == 0.0
    assert single["ranger"] == single["sgd"] == single["ranger_dgc"] == single["ranger_local"]
    assert single["ranger_vs_sgd_other_wd_maxdiff"] > 0.0  # the comparison can tell runs apart
    assert single["ranger_stats"]["bytes_sent"] == 0 == single["ranger_dgc_stats"]["bytes_sent"]


def test_ranger_refuses_unknown_momentum_modes_and_compressor_momentum(single):
    refused = single["refused"]
    assert "'global', 'dgc' or 'local'" in refused["mode"] and "bogus" in refused["mode"]
    assert "momentum_masking" in refused["masking"]


def test_distributed_optimizer_single_process_is_the_wrapped_optimizer(single):
    assert single["wrapped_class"] == "Adam" and single["wrapped_is_adam"]
    assert single["wrapped_vs_adam_maxdiff"] == 0.0 and single["wrapped"] == single["adam"]
    assert single["wrapped_stats"]["bytes_sent"] == 0


# ---------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("mode", ["nan_a", "nan_b"])
def test_non_finite_gradient_raises_naming_the_parameter(core, mode):
    for rep in core:
        r = rep[mode]
        assert r["raised"] == "NonFiniteGradientError", r
        assert f"{mode}.W" in r["message"]
        # the residual of the clean step before is kept as it was, not poisoned
        assert r["residual_norms"] == r["residual_norms_before"], r
        assert r["residual_norms"] and all(math.isfinite(v) for v in r["residual_norms"].values()), r
