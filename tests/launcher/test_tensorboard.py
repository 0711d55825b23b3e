"""RUN_DIR/tensorboard/: event files written without a framework, read back by TensorFlow's reader."""

import pytest

from ranger_hvd.launcher.compare.report import make_report, tensorboard_name
from ranger_hvd.launcher.run.tensorboard import crc32c, write_events


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283      # the CRC-32C (Castagnoli) check value


def test_events_read_back_by_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    records = [{"step": 1, "epoch": 0, "loss": 2.5, "metrics": {"eval_accuracy": 0.5, "gone": None}, "time": 1.0},
               {"event": "resume", "from_step": 1},
               {"step": 3, "loss": 1.25, "bytes_sent": 1320, "step_time": 0.01, "metrics": {}, "time": 2.0},
               {"event": "end", "steps": 3}]
    write_events(tmp_path, records, started=1000.0)
    path = write_events(tmp_path, records, started=1000.0)           # replaces the earlier file
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == [path.name]
    events = list(tf.compat.v1.train.summary_iterator(str(path)))    # checks every CRC
    assert events[0].file_version == "brain.Event:2"
    got = [(e.wall_time, e.step, {v.tag: round(v.simple_value, 6) for v in e.summary.value}) for e in events[1:]]
    assert got == [(1001.0, 1, {"loss": 2.5, "eval_accuracy": 0.5}),
                   (1002.0, 3, {"loss": 1.25, "bytes_sent": 1320.0, "step_time": 0.01})]


def test_no_step_records_no_events(tmp_path):
    assert write_events(tmp_path, [{"event": "end"}]) is None and not (tmp_path / "tensorboard").exists()


def test_report_names_tensorboard_runs_by_their_labels(tmp_path):
    """``tensorboard --logdir REPORT/tensorboard`` shows each run under the label the report gives it."""
    tf = pytest.importorskip("tensorflow")
    from rich.console import Console

    from tests.launcher.test_report_sweep import fake_run

    a = fake_run(tmp_path, "a", compression={"type": "none"}, momentum=0.9)
    b = fake_run(tmp_path, "b", density=0.01, momentum=0.9)
    runs, _, out = make_report([a, b], out_dir=tmp_path / "rep", console=Console(width=100, file=open(
        tmp_path / "out.txt", "w")))
    assert [r.label for r in runs] == ["none m=0.9", "ranger d=0.01 m=0.9@optimizer"]
    folders = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert folders == ["none_m=0.9", "ranger_d=0.01_m=0.9@optimizer"]
    for run in runs:
        (path,) = (out / "tensorboard" / tensorboard_name(run.label)).iterdir()
        losses = [v.simple_value for e in tf.compat.v1.train.summary_iterator(str(path))
                  for v in e.summary.value if v.tag == "loss"]
        assert losses == pytest.approx([r["loss"] for r in run.records if "step" in r], rel=1e-6)


@pytest.mark.parametrize("label", ["", "..", "a/b", "x" * 300, "ranger d=0.01\n$(rm -rf /)", "é ü"])
def test_tensorboard_names_are_one_plain_folder(label):
    name = tensorboard_name(label)
    assert name and "/" not in name and name not in (".", "..") and len(name) <= 120 and name.isascii()
