"""Real launches through horovodrun with the tiny test job (tests/launcher/tiny_job.py).

Each horovodrun start costs several seconds (it imports TensorFlow to check how Horovod was built), so
the suite keeps real launches few: one success (shared by several checks), one crash, one SIGTERM.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from .conftest import CLI, REPO, needs_horovod, run_cli

pytestmark = [pytest.mark.horovod, needs_horovod]

TINY = "job: {name: tiny, entry: tests.launcher.tiny_job}\ntrain: {epochs: 2}\n"
STEP_KEYS = {"step", "epoch", "loss", "metrics", "bytes_sent", "step_time", "time"}


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in (root / "runs" / "tiny").iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(text in c for c in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ok")
    (root / "exp.yaml").write_text(TINY + "cluster: {np: 2, env: [TINY_SLEEP=0.05, TINY_STEPS=4, FORWARD_ME]}\n")
    t0 = time.time()
    r = run_cli(["launch", "exp.yaml", "train.epochs=2"], root, timeout=240,
                env={"SECRET_TOKEN": "do-not-pass", "FORWARD_ME": "forwarded"})
    return root, r, time.time() - t0


def test_launch_succeeds_and_fills_run_dir(tiny_run):
    root, r, _ = tiny_run
    assert r.returncode == 0, r.stdout + r.stderr
    run = only_run_dir(root)
    assert run.parent == root / "runs" / "tiny"
    for name in ("config.yaml", "command.txt", "metrics.jsonl", "summary.json", "horovodrun.log"):
        assert (run / name).is_file(), name
    # per-rank stdout and stderr from horovodrun --output-filename (Gloo: logs/rank.N/)
    for rank in (0, 1):
        assert f"tiny job rank {rank}/2" in (run / "logs" / f"rank.{rank}" / "stdout").read_text()
        assert f"tiny job rank {rank} stderr hello" in (run / "logs" / f"rank.{rank}" / "stderr").read_text()
    assert "done" in r.stdout


def test_run_dir_config_and_command(tiny_run):
    root, r, _ = tiny_run
    run = only_run_dir(root)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["cluster"]["np"] == 2
    assert cfg["cluster"]["hosts"] == ["localhost:2"] and cfg["output"]["dir"] == str(root / "runs")
    line = (run / "command.txt").read_text().splitlines()[0]
    argv = shlex.split(line)
    assert argv[:6] == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
    assert argv[argv.index("--output-filename") + 1] == str(run / "logs")
    assert argv[-7:] == [sys.executable, "-m", "tests.launcher.tiny_job", "--config", str(run / "config.yaml"),
                         "--run-dir", str(run)]
    # the resolved config is itself a valid config
    assert run_cli(["validate", str(run / "config.yaml")], root).returncode == 0


def test_metrics_and_summary(tiny_run):
    root, r, _ = tiny_run
    run = only_run_dir(root)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "step" in x]
    assert len(steps) == 8 and all(STEP_KEYS <= set(x) for x in steps)
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["exit_code"] == 0 and s["failed_rank"] is None
    assert s["steps"] == 8 and s["records"] == 8 and s["duration_s"] > 0
    assert s["final_loss"] == pytest.approx(steps[-1]["loss"])
    assert s["final_metrics"]["accuracy"] == pytest.approx(steps[-1]["metrics"]["accuracy"])
    assert s["bytes_sent_total"] == sum(x["bytes_sent"] for x in steps)
    assert set(s["rank_logs"]) == {"0", "1"}


def test_ranks_get_only_the_minimal_environment(tiny_run):
    root, r, _ = tiny_run
    env = json.loads((only_run_dir(root) / "env.json").read_text())
    assert "SECRET_TOKEN" not in env
    assert env["FORWARD_ME"] == "forwarded" and env["TINY_SLEEP"] == "0.05"
    allowed = {"PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "PYTHONUNBUFFERED",
               "FORWARD_ME", "TINY_SLEEP", "TINY_STEPS", "PWD", "SHLVL", "_", "OLDPWD",
               "NCCL_SOCKET_IFNAME"}  # the last one is set by horovodrun itself
    extra = {k for k in env if k not in allowed and not k.startswith(("HOROVOD_", "OMPI_", "PMIX_", "OPAL_"))}
    assert not extra, extra


def test_report_on_real_run(tiny_run, tmp_path):
    import matplotlib.image as mpimg

    root, r, _ = tiny_run
    run = only_run_dir(root)
    out = tmp_path / "rep"
    rr = run_cli(["report", str(run), "--out", str(out)], tmp_path)
    assert rr.returncode == 0, rr.stderr
    assert "train loss" in rr.stdout and "tiny" in rr.stdout
    for name in ("loss_vs_step.png", "loss_vs_time.png", "accuracy_vs_step.png", "accuracy_vs_time.png",
                 "bytes_per_step.png"):
        png = out / name
        assert png.stat().st_size > 0
        img = mpimg.imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert (out / "report.txt").read_text().startswith("run")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_rank_crash_exit_1_names_rank_and_keeps_files(tmp_path, controller):
    """Gloo writes logs/rank.N/, Open MPI logs/1/rank.N/: both are found, and the failed rank named."""
    (tmp_path / "exp.yaml").write_text(TINY + f"cluster: {{np: 2, controller: {controller}, env: [TINY_SLEEP=0.3, "
                                              "TINY_STEPS=20, TINY_CRASH_RANK=1, TINY_CRASH_STEP=2]}\n")
    r = run_cli(["launch", "exp.yaml"], tmp_path, timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rank 1 failed (exit code 3)" in r.stdout
    assert "about to fail at step 2" in r.stdout          # tail of rank 1's stderr
    run = only_run_dir(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "failed" and s["exit_code"] == 1 and s["failed_rank"] == 1
    assert s["failed_rank_exit_code"] == 3
    logs = "logs" if controller == "gloo" else "logs/1"
    for name in ("config.yaml", "command.txt", "metrics.jsonl", f"{logs}/rank.0/stdout", f"{logs}/rank.1/stderr"):
        assert (run / name).exists(), name
    assert s["rank_logs"]["1"]["stderr"] == str(run / logs / "rank.1" / "stderr")
    for rank in (0, 1):
        assert gone(int((run / "pids" / f"rank.{rank}").read_text()))
    assert not processes_mentioning(str(run))


def test_sigterm_stops_every_rank(tmp_path):
    """SIGTERM to the launcher: every rank stops (rank 1 ignores SIGTERM and needs SIGKILL), exit non-zero."""
    (tmp_path / "exp.yaml").write_text(TINY + "cluster: {np: 2, env: [TINY_SLEEP=0.2, TINY_STEPS=1000, "
                                              "TINY_IGNORE_TERM=1]}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*CLI, "launch", "exp.yaml"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        run = None
        while time.time() < deadline:
            dirs = list((tmp_path / "runs" / "tiny").glob("*")) if (tmp_path / "runs" / "tiny").exists() else []
            if dirs and (dirs[0] / "pids" / "rank.1").exists() and (dirs[0] / "pids" / "rank.0").exists() \
                    and (dirs[0] / "metrics.jsonl").exists() and (dirs[0] / "metrics.jsonl").stat().st_size:
                run = dirs[0]
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        assert run is not None, "the job did not start in time"
        tree = psutil.Process(proc.pid).children(recursive=True)
        rank_pids = [int((run / "pids" / f"rank.{i}").read_text()) for i in (0, 1)]
        assert all(not gone(p) for p in rank_pids)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out
    for p in rank_pids:
        assert gone(p), f"rank pid {p} survived"
    for p in tree:
        assert gone(p.pid), f"{p.pid} survived"
    assert not processes_mentioning(str(run))
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["signal"] == "SIGTERM" and s["exit_code"] == 143
    assert (run / "metrics.jsonl").stat().st_size > 0


def test_real_default_job_end_to_end(tmp_path):
    """The shipped default config with the real ranger_hvd.jobs, shrunk: synthetic data, 1 epoch."""
    pytest.importorskip("ranger_hvd.jobs")
    r = run_cli(["launch", str(REPO / "configs" / "cnn-digits.yaml"), "train.epochs=1", "data.dataset=synthetic",
                 "data.synthetic_samples=256", "train.batch_size=32", f"output.dir={tmp_path / 'runs'}"],
                tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list((tmp_path / "runs" / "cnn-digits").iterdir())
    assert len(runs) == 1
    run = runs[0]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "step" in x]
    assert steps and all(STEP_KEYS <= set(x) for x in steps)
    end = recs[-1]
    assert end.get("event") == "end" and end.get("params_identical") is True and end.get("size") == 2
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["compression"] == "ranger" and s["epochs"] == 1
    assert s["bytes_sent_total"] == end["bytes_sent_total"] > 0
    assert (run / "logs" / "rank.0" / "stdout").exists() and (run / "logs" / "rank.1" / "stderr").exists()

    # continue the same run to 2 epochs: same directory, appended metrics, summary rewritten
    before = (run / "metrics.jsonl").read_text()
    (ckpt_set,) = (run / "checkpoints").iterdir()          # one epoch: one save point
    assert ckpt_set.name.startswith("step-") and sorted(p.name for p in ckpt_set.iterdir()) == ["rank0.pt", "rank1.pt"]
    r = run_cli(["launch", "--resume", run, "train.epochs=2"], tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert list((tmp_path / "runs" / "cnn-digits").iterdir()) == [run]
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(before)
    recs = [json.loads(x) for x in text.splitlines()]
    ends = [x for x in recs if x.get("event") == "end"]
    assert len(ends) == 2 and recs[-1] == ends[1] and ends[1]["epochs"] == 2
    epochs = [x["epoch"] for x in recs if "step" in x]
    assert set(epochs) == {0, 1} and epochs == sorted(epochs)
    assert ends[1]["steps"] == 2 * ends[0]["steps"] and ends[1]["bytes_sent_total"] > ends[0]["bytes_sent_total"]
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["status"] == "success" and s2["resumed"] is True and s2["epochs"] == 2
    assert s2["end"] == ends[1] and s2["bytes_sent_total"] == ends[1]["bytes_sent_total"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    assert (run / "command.txt").read_text().splitlines()[0].endswith("--resume")
