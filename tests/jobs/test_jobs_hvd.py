"""The reference jobs under real ``horovodrun`` with 2 ranks (Gloo): one launch per check group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ranger_hvd.jobs.data import load_dataset, steps_per_epoch
from ranger_hvd.rundir.records import read_records
from ranger_hvd.config import DataSection
from tests.hvdrun import HOROVODRUN, MPI_ROOT_ENV, REPO, worker_env
from tests.launcher.conftest import run_cli

pytestmark = pytest.mark.horovod

STEP_KEYS = {"step", "epoch", "loss", "metrics", "bytes_sent", "bytes_dense", "step_time", "time"}


def _horovodrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"horovodrun failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _run_jobs(tmp_path: Path, jobs: list[dict]) -> None:
    """One horovodrun (2 ranks) running each job of ``jobs`` in turn ({"config", "run_dir", "resume"?})."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    _horovodrun([str(REPO / "tests" / "jobs" / "multi_worker.py"), str(spec)])


def _run_many(tmp_path: Path, configs: dict[str, dict]) -> dict[str, list[dict]]:
    _run_jobs(tmp_path, [{"config": cfg, "run_dir": str(tmp_path / name)} for name, cfg in configs.items()])
    return {name: read_records(tmp_path / name / "metrics.jsonl").records for name in configs}


def _split(lines):
    steps = [ln for ln in lines if "event" not in ln]
    ends = [ln for ln in lines if ln.get("event") == "end"]
    assert len(ends) == 1 and lines[-1] is ends[0], "exactly one end line, written last"
    return steps, ends[0]


def _common_checks(lines, n_params_identical=True):
    steps, end = _split(lines)
    assert steps, "no step lines"
    for ln in steps:
        assert set(ln) == STEP_KEYS, ln
        assert ln["bytes_dense"] > 0 and ln["bytes_sent"] >= 0 and ln["step_time"] > 0
    assert all(b["step"] > a["step"] for a, b in zip(steps, steps[1:]))
    assert all(b["time"] >= a["time"] for a, b in zip(steps, steps[1:]))
    assert end["size"] == 2 and end["steps"] == steps[-1]["step"]
    assert len(end["param_digests"]) == 2
    if n_params_identical:
        assert end["params_identical"] is True and len(set(end["param_digests"])) == 1, end["param_digests"]
    return steps, end


def _cfg(backend, model, ctype="none", dataset="synthetic", **train):
    comp = {"type": ctype}
    if ctype == "ranger":
        # the GAN keeps the optimizer's (lower) momentum: compressor momentum 0 (plain error feedback)
        comp.update(density=0.01 if model != "gan" else 0.05, momentum=0.9 if model != "gan" else 0.0)
    return {"job": {"name": f"{backend}-{model}", "backend": backend, "model": model},
            "data": {"dataset": dataset}, "compression": comp,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0, **train},
            "cluster": {"np": 2, "hosts": ["localhost:2"]}, "output": {"dir": "runs"}}


def test_default_torch_cnn_on_digits_with_ranger(tmp_path):
    """The README's main job: torch CNN, digits, ranger d=0.01 m=0.9, 2 ranks, via the entry point."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = {"job": {"name": "cnn-digits", "backend": "torch", "model": "cnn"}, "data": {"dataset": "digits"},
           "train": {"epochs": 5, "batch_size": 64, "lr": 0.05, "seed": 0},
           "compression": {"type": "ranger", "density": 0.01, "momentum": 0.9},
           "cluster": {"np": 2, "hosts": ["localhost:2"], "controller": "gloo"},
           "horovod": {"fusion_threshold_mb": 64}, "output": {"dir": str(tmp_path)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = _horovodrun(["-m", "ranger_hvd.jobs", "--config", str(run_dir / "config.yaml"),
                        "--run-dir", str(run_dir)])
    steps, end = _common_checks(read_records(run_dir / "metrics.jsonl").records)

    # every rank printed the same digest as the one gathered to rank 0
    out = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} param_digest {end['param_digest']}" in out

    assert len(steps) == 5 * 11 and end["epochs"] == 5            # 1438 // 2 // 64 = 11 steps per epoch
    assert {ln["epoch"] for ln in steps} == set(range(5))
    first = sum(ln["loss"] for ln in steps[:5]) / 5
    last = sum(ln["loss"] for ln in steps[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert end["eval_accuracy"] > 0.6, end                         # chance is 0.1
    assert end["metrics"]["eval_accuracy"] == end["eval_accuracy"]
    assert "eval_accuracy" in steps[10]["metrics"] and "accuracy" in steps[0]["metrics"]
    # sparse: far fewer bytes than dense, and the totals add up
    assert end["bytes_sent_total"] == sum(ln["bytes_sent"] for ln in steps)
    assert end["bytes_dense_total"] == sum(ln["bytes_dense"] for ln in steps)
    assert all(ln["bytes_dense"] == steps[0]["bytes_dense"] for ln in steps)
    # fixed density, no warm-up: the same k every step, set-up exchanged nothing that is counted
    assert all(ln["bytes_sent"] == steps[0]["bytes_sent"] for ln in steps)
    assert end["compression_ratio"] > 5, end


def test_torch_rnn_and_fp16(tmp_path):
    res = _run_many(tmp_path, {
        "rnn": _cfg("torch", "rnn", "ranger", max_steps=12),
        "fp16": _cfg("torch", "cnn", "fp16", max_steps=6, log_every=4),
    })
    steps, end = _common_checks(res["rnn"])
    assert [ln["step"] for ln in steps] == list(range(1, 13)) and end["steps"] == 12 and "eval_accuracy" in end
    assert sum(ln["bytes_sent"] for ln in steps) < sum(ln["bytes_dense"] for ln in steps)

    steps, end = _common_checks(res["fp16"])
    assert [ln["step"] for ln in steps] == [4, 6]                  # log_every=4, plus the last step
    for ln in steps:
        assert 2 * ln["bytes_sent"] == ln["bytes_dense"]           # fp16: half of fp32


def test_tensorflow_cnn_and_rnn(tmp_path):
    res = _run_many(tmp_path, {
        "cnn": _cfg("tensorflow", "cnn", "ranger", dataset="digits", epochs=2),
        "rnn": _cfg("tensorflow", "rnn", "fp16", max_steps=6),
    })
    steps, end = _common_checks(res["cnn"])
    assert end["backend"] == "tensorflow" and end["epochs"] == 2
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert end["eval_accuracy"] > 0.3, end
    assert end["compression_ratio"] > 2, end

    steps, end = _common_checks(res["rnn"])
    assert all(2 * ln["bytes_sent"] == ln["bytes_dense"] for ln in steps)


# The shipped GAN configs with plain SGD and error feedback (no momentum: with it, these GANs collapse in
# a few epochs): 2 epochs of 22 steps take the sample score well below the untrained generator's.
GAN_OVERRIDES = ["train.epochs=2", "train.batch_size=32", "train.lr=0.2", "train.momentum=0",
                 "compression.momentum=0", "train.checkpoint=false"]
FD_KEYS = ("eval_fd", "eval_fd_real", "eval_fd_untrained")


def _launch_gan(root: Path, config: str) -> Path:
    """``ranger-hvd launch configs/CONFIG`` (real launcher, horovodrun, 2 ranks); returns the run dir."""
    root.mkdir(parents=True)
    r = run_cli(["launch", str(REPO / "configs" / config), *GAN_OVERRIDES, f"output.dir={root}"], root,
                timeout=400, env=MPI_ROOT_ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (run,) = [p for p in root.glob("*/*") if p.is_dir()]
    return run


def test_gan_sample_score_on_both_backends(tmp_path):
    """Each backend's GAN through the launcher: losses and bytes per step, the sample score in every
    epoch's evaluation, the end line and summary.json, lower after training than untrained, the real
    held-out reference near 0 (the same on both backends: one backend-neutral scorer), samples.png."""
    ends = {}
    for backend, config in (("torch", "gan-digits.yaml"), ("tensorflow", "gan-digits-tf.yaml")):
        run = _launch_gan(tmp_path / backend, config)
        steps, end = _common_checks(read_records(run / "metrics.jsonl").records)  # two compressors, D and G
        assert end["backend"] == backend and end["epochs"] == 2 and len(steps) == 2 * 22, (end, len(steps))
        for ln in steps:
            assert set(ln["metrics"]) >= {"d_loss", "g_loss"}
            assert ln["loss"] == pytest.approx(ln["metrics"]["d_loss"] + ln["metrics"]["g_loss"], rel=1e-5)
            assert 0 < ln["bytes_sent"] < ln["bytes_dense"]
        assert {"eval_d_loss", "eval_g_loss", "eval_d_real_acc", "eval_d_fake_acc", *FD_KEYS} <= set(end)
        scored = [ln["step"] for ln in steps if "eval_fd" in ln["metrics"]]
        assert scored == [22, 44], scored                               # every epoch's evaluation
        # the references are in the end line only (one column each in a report would say nothing)
        assert not any({"eval_fd_real", "eval_fd_untrained"} & set(ln["metrics"]) for ln in steps + [end])
        fd, real, untrained = (end[k] for k in FD_KEYS)
        assert all(isinstance(v, float) and np.isfinite(v) for v in (fd, real, untrained)), end
        assert fd < 0.8 * untrained, f"{backend}: FD after training {fd}, untrained {untrained}"
        assert real < 2.0 and real < 0.05 * untrained, f"{backend}: real held-out {real}, untrained {untrained}"
        assert end["metrics"]["eval_fd"] == fd
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "success"
        assert summary["final_metrics"]["eval_fd"] == fd, summary
        assert {k: summary["end"][k] for k in FD_KEYS} == {k: end[k] for k in FD_KEYS}, summary
        png = (run / "samples.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, len(png)
        ends[backend] = end
    assert ends["torch"]["eval_fd_real"] == ends["tensorflow"]["eval_fd_real"], ends


def test_torch_gan_recipe_matches_the_one_process_replay(tmp_path):
    """The shipped PyTorch GAN (R1 penalty, the discriminator's own lr, Ranger at d = 0.01) for one epoch
    through the launcher ends with the sample FD of benchmarks/gan_delay.py's replay of the same config,
    which writes the step out with plain torch and the NumPy reference compressor: so the job applies
    the penalty and the lr scale as documented. The replay without either lands elsewhere."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gan_delay

    from ranger_hvd.config import load_config

    config = REPO / "configs" / "gan-digits.yaml"
    r = run_cli(["launch", str(config), "train.epochs=1", "train.checkpoint=false", f"output.dir={tmp_path}"],
                tmp_path, timeout=400, env=MPI_ROOT_ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    fd = read_records(run / "metrics.jsonl").records[-1]["eval_fd"]
    cfg = load_config(config, ["train.epochs=1"]).config
    assert cfg.gan.r1_penalty > 0 and cfg.gan.disc_lr_scale != 1
    assert fd == pytest.approx(gan_delay.simulate("both", cfg), rel=1e-3)
    for plain in (["gan.r1_penalty=0"], ["gan.disc_lr_scale=1"]):
        other = gan_delay.simulate("both", load_config(config, ["train.epochs=1", *plain]).config)
        assert abs(other - fd) > 0.05 * fd, (plain, other, fd)


def _check_resume_bit_for_bit(tmp_path: Path, backend: str, ext: str) -> None:
    """Run A: 2 epochs straight. Run B: 1 epoch, then resumed from its per-rank checkpoints to 2 epochs.
    B must end with A's parameters bit for bit (model, optimizer state and the compressor's residuals and
    momentum all restored) and the same byte totals. One launch: resume reads everything from disk.
    The cosine schedule spans train.epochs, so B's first launch is A's config stopped by max_steps."""
    cnn = _cfg(backend, "cnn", "ranger", epochs=2, batch_size=16, momentum=0.0,   # DGC momentum only
               lr_schedule="cosine")
    cnn["data"]["synthetic_samples"] = 256
    n_train = len(load_dataset(DataSection(**cnn["data"])).x_train)
    one = {**cnn, "train": {**cnn["train"], "max_steps": steps_per_epoch(n_train, 2, 16)}}
    off = {**cnn, "train": {**cnn["train"], "checkpoint": False, "lr_schedule": "constant"}}
    jobs = [{"config": cnn, "run_dir": str(tmp_path / "A")},
            {"config": one, "run_dir": str(tmp_path / "B")},
            {"config": cnn, "run_dir": str(tmp_path / "B"), "resume": True},
            {"config": off, "run_dir": str(tmp_path / "off")}]
    _run_jobs(tmp_path, jobs)

    a = read_records(tmp_path / "A" / "metrics.jsonl").records
    steps_a, end_a = _common_checks(a)
    b = read_records(tmp_path / "B" / "metrics.jsonl").records
    ends_b = [ln for ln in b if ln.get("event") == "end"]
    assert len(ends_b) == 2 and b[-1] is ends_b[1], "one end line per launch, appended"
    resumes = [ln for ln in b if ln.get("event") == "resume"]
    assert resumes == [{"event": "resume", "from_step": ends_b[0]["steps"], "dropped_lines": 0}], resumes
    steps_b = [ln for ln in b if "event" not in ln]
    assert {ln["epoch"] for ln in steps_a} == {ln["epoch"] for ln in steps_b} == {0, 1}
    assert [ln["step"] for ln in steps_b] == [ln["step"] for ln in steps_a]
    first, end_b = ends_b
    assert first["epochs"] == 1 and end_b["epochs"] == 2 and end_b["steps"] == end_a["steps"]
    assert first["param_digest"] != end_a["param_digest"]
    assert end_b["param_digest"] == end_a["param_digest"], (end_a["param_digests"], end_b["param_digests"])
    assert end_b["params_identical"] is True
    # identical steps give identical losses and bytes; totals carried across the restart
    assert [ln["loss"] for ln in steps_b] == [ln["loss"] for ln in steps_a]
    assert [ln["bytes_sent"] for ln in steps_b] == [ln["bytes_sent"] for ln in steps_a]
    for key in ("bytes_sent_total", "bytes_dense_total", "eval_loss", "eval_accuracy"):
        assert end_b[key] == end_a[key], key
    # one directory per save point (end of each epoch), every rank's file in each
    per_epoch = end_a["steps"] // 2
    for run in ("A", "B"):
        sets = sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())
        assert sets == [f"step-{per_epoch:08d}", f"step-{2 * per_epoch:08d}"], sets
        for name in sets:
            files = sorted(p.name for p in (tmp_path / run / "checkpoints" / name).iterdir())
            assert files == [f"rank0.{ext}", f"rank1.{ext}"], files
    assert not (tmp_path / "off" / "checkpoints").exists()          # train.checkpoint: false
    # the schedule reaches the optimizer: the same run at a constant lr ends elsewhere
    end_off = read_records(tmp_path / "off" / "metrics.jsonl").records[-1]
    assert end_off["param_digest"] != end_a["param_digest"] and end_off["steps"] == end_a["steps"]


def test_torch_checkpoint_resume_is_bit_for_bit(tmp_path):
    _check_resume_bit_for_bit(tmp_path, "torch", "pt")


def test_tensorflow_checkpoint_resume_is_bit_for_bit(tmp_path):
    _check_resume_bit_for_bit(tmp_path, "tensorflow", "pkl")


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_gan_resume_keeps_the_discriminators_lr(tmp_path, backend):
    """The GAN recipe (R1 penalty, the discriminator at train.lr * gan.disc_lr_scale) through a resume: a
    run stopped after epoch 1 and resumed ends with the straight run's parameters and sample score bit
    for bit; the same run with the scale at 1 ends elsewhere, so the scale is in force in both."""
    gan = _cfg(backend, "gan", "ranger", dataset="digits", epochs=2, batch_size=32, lr=0.1, momentum=0.0)
    gan["gan"] = {"r1_penalty": 1.0, "disc_lr_scale": 2.5}
    n_train = len(load_dataset(DataSection(**gan["data"])).x_train)
    one = {**gan, "train": {**gan["train"], "max_steps": steps_per_epoch(n_train, 2, 32)}}
    plain = {**gan, "gan": {"r1_penalty": 1.0, "disc_lr_scale": 1.0}, "train": {**gan["train"], "checkpoint": False}}
    jobs = [{"config": gan, "run_dir": str(tmp_path / "A")},
            {"config": one, "run_dir": str(tmp_path / "B")},
            {"config": gan, "run_dir": str(tmp_path / "B"), "resume": True},
            {"config": plain, "run_dir": str(tmp_path / "plain")}]
    _run_jobs(tmp_path, jobs)

    end_a = read_records(tmp_path / "A" / "metrics.jsonl").records[-1]
    first, end_b = [ln for ln in read_records(tmp_path / "B" / "metrics.jsonl").records if ln.get("event") == "end"]
    end_plain = read_records(tmp_path / "plain" / "metrics.jsonl").records[-1]
    assert first["epochs"] == 1 and end_b["epochs"] == 2 and end_b["steps"] == end_a["steps"]
    assert end_b["param_digest"] == end_a["param_digest"], (end_a["param_digests"], end_b["param_digests"])
    assert end_b["eval_fd"] == end_a["eval_fd"]
    assert end_plain["param_digest"] != end_a["param_digest"] and end_plain["steps"] == end_a["steps"]


def test_resume_errors_name_the_file(tmp_path):
    """One process (Horovod size 1, no horovodrun): a missing checkpoint, then one from 2 ranks."""
    import torch

    cfg = _cfg("torch", "cnn", "ranger")
    cfg["data"]["synthetic_samples"] = 64
    script = ("import json, sys\nfrom ranger_hvd.jobs import run_job, CheckpointError\n"
              "try:\n    run_job(json.loads(sys.argv[1]), sys.argv[2], resume=True)\n"
              "except CheckpointError as e:\n    print('ERR', e)\n")
    run_dir = tmp_path / "run"

    def attempt():
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg), str(run_dir)], cwd=REPO,
                              env=worker_env(), capture_output=True, text=True, timeout=120)
        assert "ERR" in proc.stdout, proc.stdout + proc.stderr
        return proc.stdout

    out = attempt()
    assert str(run_dir / "checkpoints") in out and "step-*/rank0.pt" in out, out
    ckpt = run_dir / "checkpoints" / "step-00000006" / "rank0.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": 2, "rank": 0, "size": 2, "backend": "torch", "model": "cnn", "compression": "ranger",
                "loop": {"step": 6}}, ckpt)
    out = attempt()
    assert "2 ranks" in out and "this run has 1" in out and str(ckpt) in out, out
    ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 996)         # cut short, as an interrupted copy leaves it
    out = attempt()
    assert f"checkpoint {ckpt} is unreadable" in out, out
