"""``ranger-hvd launch --resume RUN_DIR``: the checks made before anything starts (exit 2), the
resolved config it would run with, and the job argv. A real resume launch is in test_launch.py."""

from pathlib import Path

import yaml

from ranger_hvd.launcher.run.command import build_command
from ranger_hvd.config import load_config
from ranger_hvd.launcher.run.rundir import write_config

from .conftest import REPO, run_cli, tree

CFG = REPO / "configs" / "cnn-digits.yaml"


def _run_dir(tmp_path: Path, *, checkpoints: bool = True, overrides=()) -> Path:
    run = tmp_path / "runs" / "cnn-digits" / "20260101-000000"
    run.mkdir(parents=True)
    write_config(run, load_config(CFG, list(overrides)))
    if checkpoints:
        (run / "checkpoints" / "step-00000011").mkdir(parents=True)
        (run / "checkpoints" / "step-00000011" / "rank0.pt").write_bytes(b"x")
    return run


def test_resume_refuses_missing_dir_config_or_checkpoints(tmp_path):
    missing = tmp_path / "nope"
    r = run_cli(["launch", "--resume", missing], tmp_path)
    assert r.returncode == 2 and "cannot resume" in r.stderr and "is not a directory" in r.stderr, r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["launch", "--resume", empty, "train.epochs=2"], tmp_path)
    assert r.returncode == 2 and "has no config.yaml" in r.stderr, r.stderr
    assert tree(empty) == set()

    run = _run_dir(tmp_path, checkpoints=False)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli(["launch", "--resume", run, "train.epochs=2"], tmp_path)
    assert r.returncode == 2 and "no checkpoints/step-*/rank*" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before   # nothing touched
    assert not (run / "summary.json").exists() and not (run / "horovodrun.log").exists()


def test_resume_usage_errors(tmp_path):
    run = _run_dir(tmp_path)
    r = run_cli(["launch", str(CFG), "--resume", run], tmp_path)
    assert r.returncode == 2 and "drop the CONFIG argument" in r.stderr, r.stderr
    r = run_cli(["launch", "--resume", run, "train.epochs=0"], tmp_path)         # overrides are validated
    assert r.returncode == 2 and "train.epochs" in r.stderr, r.stderr
    r = run_cli(["launch", "--resume", run, "train.nope=1"], tmp_path)           # strict keys
    assert r.returncode == 2 and "train.nope" in r.stderr, r.stderr
    r = run_cli(["launch", "--resume", run, "--dry-run", "job.backend=tensorflow"], tmp_path)
    assert r.returncode == 0 and "--resume" in r.stdout, r.stderr     # TensorFlow jobs resume too
    r = run_cli(["launch"], tmp_path)
    assert r.returncode == 2 and "required: CONFIG" in r.stderr, r.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 5   # unchanged


def test_resume_dry_run_shows_the_command_and_changes_nothing(tmp_path):
    run = _run_dir(tmp_path)
    before = (run / "config.yaml").read_text()
    r = run_cli(["launch", "--resume", run, "--dry-run", "train.epochs=12"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--resume" in r.stdout and f"--run-dir {run}" in r.stdout and str(run) in r.stdout
    assert (run / "config.yaml").read_text() == before


def test_checkpoint_key_and_resume_argv(tmp_path):
    res = load_config(CFG, ["train.checkpoint=false"])
    assert res.config.train.checkpoint is False
    assert load_config(CFG).config.train.checkpoint is True
    kw = dict(python="/py", environ={}, uid=1000, project_root="/repo")
    assert build_command(res, "/r", **kw).argv[-1] == "/r"
    argv = build_command(res, "/r", resume=True, **kw).argv
    assert argv[-6:] == ["ranger_hvd.jobs", "--config", "/r/config.yaml", "--run-dir", "/r", "--resume"]
