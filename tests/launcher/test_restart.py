"""Training that survives a lost rank, and resume paths that cannot hang (real launches, real jobs).

Per backend (torch on 2 ranks, TensorFlow on 3): run A trains 3 epochs straight; run B, under
``train.max_restarts: 1``, has rank 1 SIGKILLed right after the first checkpoint set is complete, is
restarted by the launcher from the last complete set, and must end with A's parameters bit for bit. Then
one rank's file of A's last checkpoint is cut to its first 1000 bytes and ``launch --resume`` must fail
within a minute, naming the file (before the fix both ranks spun forever in mismatched collectives).
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ranger_hvd.rundir.checkpoint import complete_steps

from .conftest import CLI, REPO, kill_rank_once_checkpointed, needs_horovod, rank_process, run_cli, run_records
from .test_launch import gone, processes_mentioning

pytestmark = [pytest.mark.horovod, needs_horovod]

EPOCHS = 3


def _config(root: Path, backend: str, np_: int) -> Path:
    cfg = {"job": {"name": f"restart-{backend}", "backend": backend, "model": "cnn"},
           "data": {"dataset": "synthetic", "synthetic_samples": 1024},
           "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.05, "seed": 3, "momentum": 0.0},
           "compression": {"type": "ranger", "density": 0.01, "momentum": 0.9},
           "cluster": {"np": np_, "env": ["OMP_NUM_THREADS=1"]},
           "output": {"dir": str(root / "runs")}}
    if np_ > 2:
        # Tensor Fusion packs whatever is ready in a cycle into one buffer, and with 3+ ranks the ring
        # allreduce's summation order follows the buffer's chunks: runs differ in the last bits
        cfg["horovod"] = {"fusion_threshold_mb": 0}
    path = root / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module", params=[("torch", 2), ("tensorflow", 3)], ids=["torch-2", "tensorflow-3"])
def runs(request, tmp_path_factory):
    backend, np_ = request.param
    root = tmp_path_factory.mktemp(f"restart_{backend}")
    cfg = _config(root, backend, np_)
    name_dir = root / "runs" / f"restart-{backend}"

    r = run_cli(["launch", cfg, "--no-live"], root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    straight = next(name_dir.iterdir())

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*CLI, "launch", str(cfg), "train.max_restarts=1", "--no-live"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, out = kill_rank_once_checkpointed(proc, name_dir, straight, np_, backend,
                                              lambda run: rank_process(run, 1))
    assert killed is not None, "rank 1 was never seen after the first checkpoint:\n" + (out or "")
    return backend, np_, root, straight, killed, proc.returncode, out


def test_killed_rank_is_restarted_and_ends_bit_for_bit(runs):
    backend, np_, root, straight, (run, pid, first_set), code, out = runs
    assert code == 0, out
    assert "restart 1/1" in out, out
    end_a = [x for x in run_records(straight) if x.get("event") == "end"][-1]
    recs = run_records(run)
    end_b = [x for x in recs if x.get("event") == "end"]
    assert len(end_b) == 1, end_b
    end_b = end_b[0]
    assert end_a["epochs"] == end_b["epochs"] == EPOCHS and end_b["steps"] == end_a["steps"]
    assert end_b["param_digest"] == end_a["param_digest"], (end_a["param_digests"], end_b["param_digests"])
    assert end_b["params_identical"] is True and len(end_b["param_digests"]) == np_
    # the steps the killed attempt took after its checkpoint were dropped: each step once, in order
    steps = [x["step"] for x in recs if "step" in x]
    assert steps == list(range(1, end_b["steps"] + 1)), steps
    assert [x["loss"] for x in recs if "step" in x] == [x["loss"] for x in run_records(straight) if "step" in x]
    resumes = [x for x in recs if x.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= first_set, resumes

    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["exit_code"] == 0 and s["max_restarts"] == 1
    (restart,) = s["restarts"]
    assert restart["attempt"] == 1 and restart["failed_rank"] == 1 and restart["resumed"] is True, restart
    assert restart["error"] == "rank 1 was killed by SIGKILL", restart
    assert restart["resumed_from_step"] == resumes[0]["from_step"] == restart["checkpoint_step"], restart
    assert Path(restart["logs"]).is_dir() and (run / "logs").is_dir()
    assert gone(pid) and not processes_mentioning(str(run))


def test_damaged_checkpoint_fails_fast_naming_the_file(runs):
    backend, np_, root, straight, *_ = runs
    last = complete_steps(straight, np_, backend)[-1]
    ext = "pt" if backend == "torch" else "pkl"
    victim = straight / "checkpoints" / f"step-{last:08d}" / f"rank1.{ext}"
    victim.write_bytes(victim.read_bytes()[:1000])
    t0 = time.time()
    r = run_cli(["launch", "--resume", straight, f"train.epochs={EPOCHS + 1}", "--no-live"], root, timeout=120)
    took = time.time() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 60, f"the failed resume took {took:.1f} s"
    assert str(victim) in r.stdout, r.stdout
    s = json.loads((straight / "summary.json").read_text())
    assert s["status"] == "failed" and str(victim) in s["error"] and s["job_error"]["config"] is True, s["error"]
    assert not processes_mentioning(str(straight))
