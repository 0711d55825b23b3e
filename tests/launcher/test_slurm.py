"""Real Slurm: a single-node cluster (munged, slurmctld, slurmd) started by the test in a temporary
directory runs the default job (configs/cnn-digits.yaml, 2 ranks) submitted by ``ranger-hvd launch``.

One cluster for the module; the daemons are stopped afterwards, also when a test fails.  Skipped, with the
reason, only where the daemons cannot start (not root, packages not installable, daemons failing).
"""

import json
import time
from pathlib import Path

import psutil
import pytest
import yaml

from .conftest import REPO, needs_horovod, run_cli
from .slurm_cluster import ClusterUnavailable, SlurmCluster
from .test_launch import processes_mentioning

pytestmark = [pytest.mark.horovod, pytest.mark.slurm, needs_horovod]

DEFAULT_JOB = str(REPO / "configs" / "cnn-digits.yaml")
ON_SLURM = ["cluster.scheduler=slurm", "cluster.hosts=null"]


@pytest.fixture(scope="module")
def cluster():
    c = SlurmCluster()
    try:
        c.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start a Slurm cluster here: {exc}")
    try:
        yield c
    finally:
        c.stop()
        for name, p in c.procs.items():
            assert p.poll() is not None, f"{name} (pid {p.pid}) still running after stop()"


def job_id_of(stdout: str) -> str:
    line = next((x for x in stdout.splitlines() if x.startswith("submitted Slurm job ")), None)
    assert line is not None, stdout
    return line.split()[-1]


def only_run_dir(out: Path, name: str) -> Path:
    dirs = [p for p in (out / name).iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_default_job_runs_through_slurm(cluster, tmp_path):
    out = tmp_path / "runs"
    t0 = time.time()
    r = run_cli(["launch", DEFAULT_JOB, *ON_SLURM, "train.epochs=2", f"output.dir={out}", "--wait"], tmp_path,
                timeout=300, env=cluster.env)
    took = time.time() - t0
    assert r.returncode == 0, f"exit {r.returncode} after {took:.1f}s\n{r.stdout}\n{r.stderr}"
    job_id = job_id_of(r.stdout)
    run = only_run_dir(out, "cnn-digits")

    for name in ("config.yaml", "command.txt", "job.sbatch", "slurm.json", f"slurm-{job_id}.out",
                 "horovodrun.log", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), f"{name} missing in {run}: {sorted(p.name for p in run.iterdir())}"
    for rank in (0, 1):
        for stream in ("stdout", "stderr"):
            assert (run / "logs" / f"rank.{rank}" / stream).is_file(), (rank, stream)

    # hosts and slots came from the allocation: this node with Slurm's 2 tasks
    command = (run / "command.txt").read_text().splitlines()[0]
    assert command.startswith(f"horovodrun -np 2 -H {cluster.node}:2 --gloo"), command
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["cluster"]["scheduler"] == "slurm" and cfg["cluster"]["np"] == 2 and cfg["train"]["epochs"] == 2
    assert json.loads((run / "slurm.json").read_text())["job_id"] == job_id

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["exit_code"] == 0, summary
    assert summary["hosts"] == [f"{cluster.node}:2"]
    assert summary["slurm"]["job_id"] == job_id and summary["slurm"]["hosts"] == [f"{cluster.node}:2"]
    assert summary["slurm"]["ended_by"] is None

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    end = lines[-1]
    assert end["event"] == "end" and end["size"] == 2 and end["epochs"] == 2, end
    digests = end["param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and end["params_identical"] is True, \
        f"final parameters differ between ranks: {digests}"
    assert summary["steps"] == max(x["step"] for x in lines if "step" in x)

    st = run_cli(["status", str(run)], tmp_path, env=cluster.env)
    assert st.returncode == 0, st.stderr
    assert job_id in st.stdout and "COMPLETED" in st.stdout and "success" in st.stdout, st.stdout
    rep = run_cli(["report", str(run), "--out", str(tmp_path / "report")], tmp_path, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert (tmp_path / "report" / "loss_vs_step.png").is_file()
    print(f"slurm run of cnn-digits (2 epochs, 2 ranks): {took:.1f}s from submission to summary")


def test_ddp_job_runs_through_slurm_with_srun_and_torchrun(cluster, tmp_path):
    """cluster.runner torchrun on an allocation: srun starts torchrun on the node, its ranks meet in a c10d
    rendezvous and train under DDP + ranger_hook; the run directory is a Horovod run's."""
    out = tmp_path / "runs"
    r = run_cli(["launch", DEFAULT_JOB, *ON_SLURM, "cluster.runner=torchrun", "cluster.rdzv_port=29517",
                 "train.epochs=1", "train.max_steps=10", f"output.dir={out}", "--wait"], tmp_path, timeout=300,
                env=cluster.env)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    run = only_run_dir(out, "cnn-digits")
    command = (run / "command.txt").read_text().splitlines()[0]
    assert command.startswith("srun --nodes 1 --ntasks 1 --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes 1 "
                              f"--nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint {cluster.node}:29517 "), command
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["slurm"]["job_id"] == job_id_of(r.stdout), summary
    end = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    assert end["event"] == "end" and end["runner"] == "torchrun" and end["steps"] == 10, end
    assert end["params_identical"] is True and len(end["param_digests"]) == 2, end
    assert all((run / "logs" / f"rank.{rank}" / "stdout").is_file() for rank in (0, 1))


def test_user_command_runs_through_slurm(cluster, tmp_path):
    """A user's own script (examples/torch_digits.py via job.command) submitted to Slurm: the same run
    directory contract as a reference job, with the script's own records."""
    out = tmp_path / "runs"
    r = run_cli(["launch", str(REPO / "examples" / "torch.yaml"), *ON_SLURM, f"output.dir={out}",
                 'job.command=[python, torch_digits.py, --epochs, "1"]', "--wait"], tmp_path,
                timeout=300, env=cluster.env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    job_id = job_id_of(r.stdout)
    run = only_run_dir(out, "torch_digits")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["slurm"]["job_id"] == job_id, summary
    assert (run / "script" / "torch_digits.py").read_bytes() == (REPO / "examples" / "torch_digits.py").read_bytes()
    command = (run / "command.txt").read_text().splitlines()[0]
    assert command.startswith(f"horovodrun -np 2 -H {cluster.node}:2 --gloo") and "torch_digits.py" in command
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps and summary["steps"] == steps[-1]["step"] and summary["records"] == len(steps)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_scancel_stops_every_rank_and_summary_says_cancelled(cluster, tmp_path):
    out = tmp_path / "runs"
    r = run_cli(["launch", DEFAULT_JOB, *ON_SLURM, "train.epochs=1000", "job.name=cancel-me", f"output.dir={out}"],
                tmp_path, timeout=120, env=cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = job_id_of(r.stdout)
    run = only_run_dir(out, "cancel-me")

    # wait until both ranks train (a metrics line is written after a step every rank took part in)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step"' in metrics.read_text()):
        time.sleep(0.5)
    ranks = [p for p in processes_mentioning(str(run / "config.yaml")) if "ranger_hvd.jobs" in p.cmdline()]
    assert len(ranks) >= 2, (f"expected 2 running ranks of {run}, found {[p.cmdline() for p in ranks]}; "
                             f"output so far:\n{(run / f'slurm-{job_id}.out').read_text()}")

    assert cluster.run("scancel", job_id).returncode == 0
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "summary.json").exists():
        time.sleep(0.5)
    while time.time() < deadline and cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip():
        time.sleep(0.5)
    slurm_out = (run / f"slurm-{job_id}.out").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "cancelled", f"{summary['status']}\n{slurm_out}"
    assert summary["signal"] == "SIGTERM" and summary["exit_code"] == 143
    assert summary["slurm"]["ended_by"] == "scancel" and summary["slurm"]["job_id"] == job_id
    _gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks still running after scancel: {[p.pid for p in alive]}"
    left = processes_mentioning(str(run))
    assert not left, f"processes of the cancelled run still running: {[p.cmdline() for p in left]}"
    assert "CANCELLED" in slurm_out, slurm_out

    st = run_cli(["status", str(run)], tmp_path, env=cluster.env)
    assert st.returncode == 0 and "CANCELLED" in st.stdout and "cancelled" in st.stdout, st.stdout


def test_slurm_refusals_exit_2_and_submit_nothing(cluster, tmp_path):
    out = tmp_path / "runs"
    cases = [(["cluster.slurm.partition=nosuch"], "cluster.slurm.partition 'nosuch'"),
             (["cluster.slurm.nodes=2"], "cluster.slurm.nodes"),                  # one node in this cluster
             (["cluster.np=8", "cluster.slurm.ntasks_per_node=8"], "cluster.slurm.nodes")]  # 4 CPUs here
    for extra, culprit in cases:
        r = run_cli(["launch", DEFAULT_JOB, *ON_SLURM, *extra, f"output.dir={out}"], tmp_path, env=cluster.env)
        assert r.returncode == 2, (extra, r.returncode, r.stdout, r.stderr)
        assert culprit in r.stderr and "nothing was submitted" in r.stderr, (extra, r.stderr)
    assert not out.exists()
    assert cluster.run("squeue", "-h").stdout.strip() == ""


def test_job_failing_before_the_launcher_runs_is_recorded(cluster, tmp_path):
    """A setup line that fails ends the batch script before the launcher starts: --wait says so, exits 1
    and leaves a summary naming Slurm's state, with the job's output shown."""
    out = tmp_path / "runs"
    r = run_cli(["launch", DEFAULT_JOB, *ON_SLURM, "cluster.slurm.setup=['echo setting up; exit 3']",
                 f"output.dir={out}", "--wait"], tmp_path, timeout=120, env=cluster.env)
    job_id = job_id_of(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"Slurm job {job_id} ended (FAILED) before the launcher in it started" in r.stdout, r.stdout
    assert "setting up" in r.stdout, r.stdout     # the end of slurm-JOBID.out
    run = only_run_dir(out, "cnn-digits")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["slurm"] == {"job_id": job_id, "state": "FAILED"}, summary
