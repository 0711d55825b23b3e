"""Multi-process checks of the TensorFlow backend under the real ``horovodrun`` (2 ranks, Gloo).

Each scenario is one launch (starting TensorFlow is the slow part); the workers under ``workers/``
report what they observed and these tests assert on it.
"""

from pathlib import Path

import pytest

from tests.hvdrun import run_workers

pytestmark = pytest.mark.horovod
WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def main_reports(tmp_path_factory):
    return run_workers(WORKERS / "main_worker.py", tmp_path_factory.mktemp("tf_main"), np=2,
                       timeout=900)


# ----------------------------------------------------------------------------- (a) our tape
def test_tape_d1_equals_plain_horovod_averaging(main_reports):
    for r in main_reports:
        assert r["a_equiv_maxdiff"] == 0.0
    assert main_reports[0]["a_equiv_crc"] == main_reports[1]["a_equiv_crc"]


def test_tape_matches_reference_and_conserves(main_reports):
    for r in main_reports:
        # Every exchanged gradient equals core.reference's combine of both ranks' payloads, bit for bit,
        # and this rank's residual equals the reference residual.
        assert r["a_reference_maxdiff"] == 0.0
        # Observed from outside: the sum of all averaged gradients handed back (gradients, then zero
        # gradients until the residual drained) equals the average of the sums of all gradients.
        assert r["a_conservation_maxerr"] < 1e-5
        assert r["a_residual_after_drain"] == 0.0


def test_tape_bytes_follow_the_formula(main_reports):
    k = 120  # ceil(0.05 * 2400)
    steps = main_reports[0]["a_steps"]
    for r in main_reports:
        s = r["a_stats"]
        # sparse W: k values and k int32 indices (our tape sends no token); dense 1-D bias
        assert s["bytes_sent"] == steps * (k * (4 + 4) + 60 * 4)
        assert s["bytes_dense"] == steps * 4 * (2400 + 60)
        assert s["tensors_sparse"] == steps and s["tensors_dense"] == steps
        f = r["a_fp16_stats"]  # fp16 values: k * (2 + 4), k = ceil(0.02 * 1500) = 30
        assert f["bytes_sent"] == 5 * 30 * (2 + 4)


def test_tape_momentum_fp16_sum_matches_reference(main_reports):
    for r in main_reports:
        assert r["a_momentum_fp16_sum_maxdiff"] == 0.0


def test_tape_checkpoint_round_trip(main_reports):
    for r in main_reports:
        assert r["a_checkpoint_maxdiff"] == 0.0


# ----------------------------------------------------------------------------- (b) Horovod's tape
def test_horovod_tape_ranks_agree_and_send_fewer_bytes(main_reports):
    r0, r1 = main_reports
    for key in ("b", "br"):
        assert r0[f"{key}_crc"] == r1[f"{key}_crc"], key
        # Different data per rank: the residuals differ, the exchange keeps weights identical.
        assert r0[f"{key}_residual_norm"] != r1[f"{key}_residual_norm"], key
    # k = 200 of W's 2000: top-k sends values, int32 indices and the token; dense bias
    s = r0["b_stats"]
    assert s["bytes_sent"] == 4 * (200 * (4 + 4) + 4 + 40 * 4) and s["steps"] == 4
    # random-k sends the values only
    s = r0["br_stats"]
    assert s["bytes_sent"] == 4 * (200 * 4 + 40 * 4)
    assert s["bytes_sent"] < s["bytes_dense"]


def test_horovod_tape_equals_ours_at_low_density(main_reports):
    for r in main_reports:
        hook, ours = r["b_vs_a_crc"]
        assert hook == ours
        assert r["b_vs_a_moved"] > 1e-3


def test_horovod_tape_d1_equals_uncompressed(main_reports):
    for r in main_reports:
        assert r["b_equiv_maxdiff"] == 0.0


def test_horovod_tape_misuse_fails_loudly(main_reports):
    for r in main_reports:
        assert "shared by two models" in r["b_misuse"]
        assert "already serves" in r["b_mode_mix"]


# ----------------------------------------------------------------------------- (c) Ranger, Keras 3
def test_ranger_custom_loop_broadcasts_and_agrees(main_reports):
    r0, r1 = main_reports
    assert r0["c_initial_crc"] != r1["c_initial_crc"]  # the ranks really started apart
    assert r0["c_loop_crc"] == r1["c_loop_crc"]
    assert r0["c_loop_stats"]["tensors_sparse"] == 4    # the 20x64 kernel, 4 steps
    for r in main_reports:
        assert r["c_checkpoint_maxdiff"] == 0.0
        assert r["c_equiv_maxdiff"] == 0.0


def test_ranger_momentum_in_the_compressor_follows_reference(main_reports):
    """momentum_mode 'dgc' (factor masking) and 'local' (none) on two ranks: the weights are the
    reference replay's, and the two modes really differ."""
    for r in main_reports:
        dgc, local = r["c_compressor_momentum_dgc"], r["c_compressor_momentum_local"]
        for got in (dgc, local):
            assert got["moved"] > 0.05 and got["maxdiff"] < 1e-6, got
        assert dgc["weights"] != local["weights"]


def test_ranger_keras3_compile_fit_on_two_ranks(main_reports):
    r0, r1 = main_reports
    assert r0["c_fit_crc"] == r1["c_fit_crc"]
    for r in main_reports:
        assert r["c_fit_loss"][-1] < r["c_fit_loss"][0]
        assert r["c_fit_stats"]["bytes_sent"] < r["c_fit_stats"]["bytes_dense"]


# ----------------------------------------------------------------------------- the origin example
def test_origin_document_example_trains_on_two_ranks(tmp_path):
    reports = run_workers(WORKERS / "seed_runner.py", tmp_path / "seed", np=2, timeout=900)
    r0, r1 = reports
    assert r0["size"] == 2
    assert len(r0["losses"]) == 10
    assert r0["losses"][-1] < r0["losses"][0] - 0.3, r0["losses"]
    assert r0["weights_crc"] == r1["weights_crc"]
    assert r0["stats"]["tensors_sparse"] > 0


def test_seed_example_differs_from_the_document_only_where_allowed():
    text = (WORKERS / "seed_example.py").read_text()
    assert "from ranger_hvd.tensorflow import Ranger" in text
    assert "from ranger import Ranger" not in text.replace("`from ranger import Ranger`", "")
    for line in ["optimizer = Ranger(lr=0.001, momentum=0.9)",
                 "loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)",
                 "    optimizer.apply_gradients(zip(grads, model.trainable_variables))",
                 '    print(f"Epoch {epoch+1}, loss: {loss.numpy():.4f}")']:
        assert line in text


def test_horovod_tape_top_k_learns_like_dense(main_reports):
    """Existing Horovod TF code with compression=RangerCompressor(density=0.01) ends within 5% of
    dense's loss on the digits MLP (300 steps, 2 ranks, SGD momentum after the exchange)."""
    reps = [r["converge"] for r in main_reports]
    for r in reps:
        assert r["dense"] < 0.5 * r["initial_loss"], r
        assert r["ranger"] <= 1.05 * r["dense"], (r["ranger"], r["dense"])
        s = r["ranger_stats"]
        assert s["bytes_sent"] * 10 < s["bytes_dense"], s
    assert reps[0]["ranger_digest"] == reps[1]["ranger_digest"]
