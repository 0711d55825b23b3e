"""The TensorFlow compatibility matrix (issue 30) under the real ``horovodrun`` on 2 and 3 ranks
(Gloo): every Horovod entry point we claim, with a RangerCompressor, equals uncompressed Horovod at
density 1 and conserves at density 0.01; Keras 3 and tf-keras run in separate launches
(``workers/compat_*``).
"""

from pathlib import Path

import pytest

from tests.hvdrun import run_workers
from tests.tensorflow.launches import tf_keras_reports

pytestmark = pytest.mark.horovod
WORKERS = Path(__file__).parent / "workers"
KERAS3_CELLS = ["hvd_tape_eager", "hvd_tape_function", "hvd_tape_variables", "hvd_tape_groups",
                "hvd_tape_graph", "our_tape_eager", "our_tape_function", "ranger",
                # exchange="global_topk"
                "hvd_tape_graph_global", "ranger_global"]
TF_KERAS_CELLS = ["keras_minimize_eager", "keras_minimize_function", "keras_variables",
                  "keras_aggregation", "keras_local_var", "partial_tape"]


@pytest.fixture(scope="module", params=[2, 3])
def keras3(request, tmp_path_factory):
    return run_workers(WORKERS / "compat_worker.py", tmp_path_factory.mktemp("compat"),
                       np=request.param, timeout=900)


@pytest.fixture(scope="module", params=[2, 3])
def tf_keras(request, tmp_path_factory):
    return tf_keras_reports(request.param, tmp_path_factory)


def assert_cells(reports, cells):
    size = reports[0]["size"]
    for name in cells:
        for r in reports:
            cell = r[name]
            # density 1: uncompressed Horovod's numbers (exact on 2 ranks; 3 ranks sum in another
            # order) and nothing left behind
            assert cell["d1_maxdiff"] <= (0.0 if size == 2 else 1e-6), (name, cell)
            assert cell["d1_residual"] == 0.0, (name, cell)
            # density 0.01: what was applied plus what is left equals every gradient given
            assert cell["conservation_maxerr"] < 1e-5, (name, cell)
            assert cell["moved"] > 1.0 and cell["residual_norm"] > 10.0, (name, cell)
        assert len({r[name]["crc"] for r in reports}) == 1 or name in ("keras_local_var",
                                                                    "partial_tape"), name


def test_keras3_side_every_entry_point(keras3):
    """Horovod's tape eagerly, in tf.function, with variables=, with groups, in v1 graph mode;
    ranger_hvd's tape eagerly and traced; Keras 3 Ranger."""
    assert_cells(keras3, KERAS3_CELLS)


def test_tf_keras_side_every_entry_point(tf_keras):
    """hvd.keras.DistributedOptimizer (tf-keras) eagerly and traced, with and without variables=,
    with backward_passes_per_step=2 and a registered local variable; Horovod's partial tape with a
    local layer (local gradients stay per rank, so those weights differ between ranks)."""
    assert tf_keras[0]["keras_module"].startswith("tf_keras")
    assert_cells(tf_keras, TF_KERAS_CELLS)


def test_tf_keras_fit_without_variables_and_with_a_densified_embedding(tf_keras):
    """Issue 30, causes 2 and 3: model.fit (jit_compile=False) with hvd.keras.DistributedOptimizer
    wrapped before the model exists, no variables=, and an Embedding under sparse_as_dense (its
    densified gradient has an unknown first dimension). The state is made on the first trace and
    found again by Keras's retrace; slots carry the variables' names and full shapes; ranks agree
    and the loss falls (density 1 of this optimizer is in the matrix above)."""
    fits = [r["fit"] for r in tf_keras]
    assert len({f["crc"] for f in fits}) == 1
    for f in fits:
        assert [label for label, _ in f["slots"]][0] == "embedding/embeddings"
        assert f["slots"][0][1] == [50, 8]
        assert f["losses"][-1] < f["losses"][0] - 0.05, f["losses"]
        stats = f["stats"]
        assert stats["tensors_sparse"] > 0 and stats["bytes_sent"] < stats["bytes_dense"]


def test_mixed_precision_overflow_on_one_rank_is_skipped_everywhere(keras3):
    """Keras 3 mixed_float16 with dynamic loss scaling; the last rank's loss overflows at step 2.
    ranger_hvd's tape exchanges before Keras's LossScaleOptimizer looks: every rank's averaged
    gradient shows the overflow, every rank skips the step and halves its scale; the overflowed
    rank's residual is as it was and the others keep that step's gradient in theirs (they took back
    what they sent). Ranger under ranger_hvd's LossScaleOptimizer: every rank skips alike (one
    allreduced verdict) and no state moves. Both train on, ranks agree, nothing hangs."""
    last = len(keras3) - 1
    for key in ("mixed_tape", "mixed_ranger"):
        logs = [r[key] for r in keras3]
        assert len({log["crc"] for log in logs}) == 1, key
        for rank, log in enumerate(logs):
            assert log["scale"][:2] == [32768.0] * 2 and log["scale"][2:] == [16384.0] * 4, log
            assert log["iterations"] == 5, log          # six steps, one skipped
            assert all(log["residual_finite"]), log
            assert log["loss"][-1] < log["loss"][0], log
            assert log["void_local_finite"] is (rank != last)
            if key == "mixed_ranger" or rank == last:
                assert log["void_residual_unchanged"], (key, rank, log)
            else:
                assert log["void_residual_kept_gradient"], (key, rank, log)
