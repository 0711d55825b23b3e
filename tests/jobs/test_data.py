"""Data loading, config parsing and the metrics writer of the reference jobs (no Horovod needed)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from ranger_hvd.jobs import data as D
from ranger_hvd.jobs.common import ConfigError, job_config, lr_at, optimizer_momentum
from ranger_hvd.config import DataSection
from ranger_hvd.rundir.metrics import MetricsWriter
from ranger_hvd.rundir.records import read_records
from tests.hvdrun import REPO, worker_env


def test_digits_shapes_and_split():
    ds = D.load_digits()
    assert ds.x_train.shape[1:] == (8, 8) and ds.x_eval.shape[1:] == (8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert len(ds.x_train) + len(ds.x_eval) == 1797
    assert abs(len(ds.x_eval) - round(0.2 * 1797)) <= 1
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))
    # the split is fixed: loading again gives the same arrays
    again = D.load_digits()
    np.testing.assert_array_equal(ds.y_eval, again.y_eval)


def test_digits_match_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = D.load_digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(target, bunch.target)


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = D.make_synthetic(300), D.make_synthetic(300)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_eval, b.y_eval)
    assert a.x_train.shape[1:] == (8, 8) and len(a.x_train) + len(a.x_eval) == 300
    # class means differ clearly (the task is learnable)
    means = np.stack([a.x_train[a.y_train == c].mean(0) for c in range(10)])
    assert np.min([np.abs(means[i] - means[j]).mean() for i in range(10) for j in range(i)]) > 0.05


@pytest.mark.parametrize("n,size", [(1437, 2), (1438, 2), (10, 3), (7, 4), (5, 1)])
def test_shards_disjoint_equal_and_covering(n, size):
    shards = [D.shard_indices(n, r, size) for r in range(size)]
    assert len({len(s) for s in shards}) == 1                 # same step count on every rank
    flat = np.concatenate(shards)
    assert len(flat) == len(set(flat.tolist()))               # disjoint
    assert len(flat) >= n - (size - 1)                        # at most size-1 samples dropped
    full = [D.shard_indices(n, r, size, equalize=False) for r in range(size)]
    assert sorted(np.concatenate(full).tolist()) == list(range(n))   # covering
    np.testing.assert_array_equal(full[1 % size], np.arange(1 % size, n, size))


def test_epoch_batches_reshuffle_and_drop_last():
    b0 = list(D.epoch_batches(10, 3, seed=0, epoch=0, rank=0))
    b1 = list(D.epoch_batches(10, 3, seed=0, epoch=1, rank=0))
    assert [len(b) for b in b0] == [3, 3, 3]
    assert not all(np.array_equal(x, y) for x, y in zip(b0, b1))
    assert len(set(np.concatenate(b0).tolist())) == 9
    assert D.steps_per_epoch(1437, 2, 64) == 11
    with pytest.raises(D.DataError, match="batch_size"):
        D.steps_per_epoch(100, 2, 64)


def _write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(header + body)


def test_read_idx_formats(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a"), a)
    b = np.array([1, -2, 300000], dtype=np.int32)
    _write_idx(tmp_path / "b.gz", b, gz=True)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "b.gz"), b)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(D.DataError, match="not an idx file"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(D.DataError, match="truncated"):
        D.read_idx(tmp_path / "short")


def _fake_mnist(directory, n_train=20, n_test=6, gz=False):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    _write_idx(directory / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), gz)
    _write_idx(directory / f"train-labels-idx1-ubyte{sfx}", (np.arange(n_train) % 10).astype(np.uint8), gz)
    _write_idx(directory / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), gz)
    _write_idx(directory / f"t10k-labels-idx1-ubyte{sfx}", (np.arange(n_test) % 10).astype(np.uint8), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    _fake_mnist(tmp_path, gz=gz)
    ds = D.load_dataset(DataSection(dataset="mnist", dir=str(tmp_path)))
    assert ds.x_train.shape == (20, 28, 28) and ds.x_eval.shape == (6, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0
    assert ds.y_train.tolist() == [i % 10 for i in range(20)]


def test_mnist_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(D.DataError, match=str(missing)):
        D.load_dataset(DataSection(dataset="mnist", dir=str(missing)))
    with pytest.raises(D.DataError, match="data.dir"):
        D.load_dataset(DataSection(dataset="mnist"))
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte.*" + str(tmp_path)):
        D.load_dataset(DataSection(dataset="mnist", dir=str(tmp_path)))


def test_jobs_validate_with_the_launcher_schema():
    cfg = job_config({"job": {"backend": "torch", "model": "cnn"}, "data": {"dataset": "digits", "dir": None},
                      "train": {"epochs": 2, "batch_size": 32, "lr": 0.1, "seed": 1},
                      "compression": {"type": "ranger", "density": 0.05, "momentum": 0.9},
                      "cluster": {"np": 2}, "output": {"dir": "runs"}})
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.seed, t.max_steps, t.log_every) == (2, 32, 0.1, 1, None, 1)
    assert cfg.data.eval_fraction == 0.2 and cfg.compression.options()["density"] == 0.05
    assert optimizer_momentum(cfg) == 0.0            # momentum lives in the compressor
    with pytest.raises(ConfigError, match="job.model"):
        job_config({"job": {"model": "transformer"}})
    with pytest.raises(ConfigError, match="compression.type"):
        job_config({"compression": {"type": "zip"}})
    with pytest.raises(ConfigError, match="compression.density"):
        job_config({"compression": {"type": "ranger", "density": 2.0}})


def test_metrics_writer(tmp_path):
    w = MetricsWriter(tmp_path)
    w.step(step=1, epoch=0, loss=np.float32(1.5), metrics={"accuracy": 0.5}, bytes_sent=10,
           bytes_dense=40, step_time=0.01)
    assert len(read_records(tmp_path / "metrics.jsonl").records) == 1     # flushed at once
    w.step(step=2, epoch=0, loss=float("nan"), metrics={}, bytes_sent=10, bytes_dense=40, step_time=0.01)
    w.end(eval_accuracy=0.9)
    w.close()
    lines = read_records(tmp_path / "metrics.jsonl").records
    assert set(lines[0]) == {"step", "epoch", "loss", "metrics", "bytes_sent", "bytes_dense", "step_time", "time"}
    assert lines[1]["loss"] is None                                 # strict JSON, no NaN
    assert lines[2]["event"] == "end" and lines[2]["eval_accuracy"] == 0.9
    off = MetricsWriter(tmp_path / "other", enabled=False)
    off.step(step=1, epoch=0, loss=1.0, metrics={}, bytes_sent=0, bytes_dense=0, step_time=0)
    assert not (tmp_path / "other").exists()


def test_entry_point_fails_clearly_on_missing_mnist(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"job: {{backend: torch, model: cnn}}\ndata: {{dataset: mnist, dir: {tmp_path / 'nodata'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ranger_hvd.jobs", "--config", str(cfg), "--run-dir", str(tmp_path)],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "nodata" in proc.stderr and "mnist" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_lr_schedule_values():
    constant = job_config({"job": {"backend": "torch", "model": "cnn"}, "train": {"lr": 0.1}}).train
    assert [lr_at(constant, s, 100) for s in (0, 50, 99)] == [0.1, 0.1, 0.1]
    cosine = job_config({"job": {"backend": "torch", "model": "cnn"},
                         "train": {"lr": 0.1, "lr_schedule": "cosine"}}).train
    assert lr_at(cosine, 0, 100) == 0.1                       # starts at lr
    assert abs(lr_at(cosine, 50, 100) - 0.05) < 1e-15         # half way: half of it
    assert abs(lr_at(cosine, 25, 100) - 0.1 * (1 + 2 ** -0.5) / 2) < 1e-15
    assert lr_at(cosine, 100, 100) == 0.0 and lr_at(cosine, 120, 100) == 0.0   # ends at 0 and stays
    steps = [lr_at(cosine, s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(steps, steps[1:]))       # strictly decreasing
