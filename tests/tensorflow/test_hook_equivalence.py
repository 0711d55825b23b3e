"""Horovod's own TF tape and tf-keras optimizer with a RangerCompressor, under real horovodrun on 2 and
3 ranks: the hook sends real top-k and computes what uncompressed Horovod and ranger_hvd's tape do."""

from __future__ import annotations

import pytest

pytest.importorskip("horovod.tensorflow")

from tests.tensorflow.launches import tf_keras_reports  # noqa: E402

pytestmark = pytest.mark.horovod


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def reports(request, tmp_path_factory):
    """workers/hook_worker.py's checks, run inside the tf-keras compatibility launch."""
    return tf_keras_reports(request.param, tmp_path_factory)


def _tolerance(size: int) -> float:
    # Two summands add the same way in any order and 1/2 is exact: the same bits. Gloo's ring adds
    # three in its own order and 1/3 rounds.
    return 0.0 if size == 2 else 1e-6


@pytest.mark.parametrize("label", ["average", "sum", "predivide"])
def test_horovod_tape_at_density_one_equals_uncompressed(reports, label):
    for r in reports:
        assert r[f"tape_d1_{label}_moved"] > 1e-3, "the weights must move for this to mean anything"
        assert len(r[f"tape_d1_{label}"]) == 6
        assert max(r[f"tape_d1_{label}"]) <= _tolerance(r["size"]), (label, r[f"tape_d1_{label}"])


def test_horovod_keras_optimizer_at_density_one_equals_uncompressed(reports):
    for r in reports:
        assert len(r["keras_d1"]) == 6
        assert max(r["keras_d1"]) <= _tolerance(r["size"]), r["keras_d1"]


def test_three_entry_points_one_exchange_at_low_density(reports):
    for r in reports:
        assert r["d001_moved"] > 1e-3
        assert r["d001_hvd_tape_vs_ours"] <= _tolerance(r["size"]), r["d001_hvd_tape_vs_ours"]
        assert r["d001_keras_vs_ours"] <= _tolerance(r["size"]), r["d001_keras_vs_ours"]
        hvd_tape, keras_opt, ours = r["d001_stats"]
        # 20 steps: k = 16 of 1536 and k = 5 of 480, each k * (4 + 4), plus a 4-byte token each
        # through Horovod's hook (ranger_hvd's tape sends none); biases 48 + 10 dense
        expected = 20 * ((16 + 5) * 8 + 58 * 4)
        assert hvd_tape["bytes_sent"] == keras_opt["bytes_sent"] == expected + 20 * 2 * 4, (
            hvd_tape["bytes_sent"], keras_opt["bytes_sent"], expected)
        assert ours["bytes_sent"] == expected, (ours["bytes_sent"], expected)
    assert len({r["d001_weights_sum"] for r in reports}) == 1, "ranks disagree"
