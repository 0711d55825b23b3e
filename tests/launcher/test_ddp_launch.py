"""``cluster.runner: torchrun``: the PyTorch reference jobs under DDP + the compression as a communication
hook, started by torchrun (real launches, Gloo, 2 ranks on this machine).

Run A launches the shipped configs/cnn-digits.yaml with the switch (3 short epochs: a checkpoint set after
each), run B the same under ``train.max_restarts: 1`` with rank 1 SIGKILLed right after the first set:
the launcher restarts torchrun from it and B ends bit for bit with A.  The dry-run and the refusals run
in-process and start nothing.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import CLI, REPO, assert_refused, kill_rank_once_checkpointed, rank_process, run_cli, run_records
from .test_launch import gone, processes_mentioning

DEFAULT_JOB = str(REPO / "configs" / "cnn-digits.yaml")
# 3 epochs of the digits CNN (44 steps each on 2 ranks) take seconds under DDP; starting torch takes longer
SWITCH = ["cluster.runner=torchrun", "train.epochs=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out = root / "runs"
    name_dir = out / "cnn-digits"
    r = run_cli(["launch", DEFAULT_JOB, *SWITCH, f"output.dir={out}", "--no-live"], root, timeout=300)
    straight = next(name_dir.iterdir())

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*CLI, "launch", DEFAULT_JOB, *SWITCH, f"output.dir={out}", "train.max_restarts=1",
                             "--no-live"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killed, b_out = kill_rank_once_checkpointed(
        proc, name_dir, straight, 2, "torch", lambda run: rank_process(run, 1, "RANK", "TORCHELASTIC_RUN_ID"),
        poll=0.02)
    return r, straight, killed, proc.returncode, b_out


def test_default_config_runs_under_torchrun(runs):
    r, run, *_ = runs
    assert r.returncode == 0, r.stdout + r.stderr
    # the shipped horovod tunables are set aside, said once
    assert "horovod.fusion_threshold_mb=64" in r.stderr and "have no effect" in r.stderr, r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["exit_code"] == 0 and s["runner"] == "torchrun", s
    command = (run / "command.txt").read_text()
    assert command.startswith("torchrun --standalone --nnodes 1 --nproc-per-node 2 --max-restarts 0 -m "
                              "ranger_hvd.jobs --config "), command
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["cluster"]["runner"] == "torchrun" and cfg["horovod"]["fusion_threshold_mb"] is None, cfg

    recs = run_records(run)
    steps = [x for x in recs if "step" in x]
    assert [x["step"] for x in steps] == list(range(1, len(steps) + 1))
    assert all(0 < x["bytes_sent"] < x["bytes_dense"] / 10 for x in steps), steps[0]   # the hook's top-k
    (end,) = [x for x in recs if x.get("event") == "end"]
    assert end["runner"] == "torchrun" and end["size"] == 2 and end["compression"] == "ranger", end
    assert end["epochs"] == 3 and end["steps"] == len(steps) == 3 * 44, end   # 1437 samples / (2 x 16)
    assert end["params_identical"] is True and len(set(end["param_digests"])) == 1, end
    assert len(end["param_digests"]) == 2 and end["eval_accuracy"] > 0.5, end
    # each rank's own output in logs/rank.N/, as under horovodrun's Gloo
    for rank in (0, 1):
        assert f"rank {rank} param_digest {end['param_digest']}" in (run / "logs" / f"rank.{rank}" / "stdout").read_text()
    assert "(DDP): 2 ranks" in (run / "logs" / "rank.0" / "stdout").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000088", "step-00000132"]
    state = __import__("torch").load(run / "checkpoints" / "step-00000132" / "rank1.pt", weights_only=False)
    assert state["runner"] == "torchrun" and state["hook_states"][0]["tensors"], state.keys()
    rep = run_cli(["report", str(run), "--out", str(run.parent / "report")], run.parent, timeout=120)
    assert rep.returncode == 0 and (run.parent / "report" / "loss_vs_step.png").is_file(), rep.stdout + rep.stderr


def test_global_topk_exchange_runs_under_torchrun(tmp_path):
    """compression.exchange: global_topk reaches ranger_hook: one epoch trains, the ranks agree."""
    out = tmp_path / "runs"
    r = run_cli(["launch", DEFAULT_JOB, "cluster.runner=torchrun", "train.epochs=1",
                 "compression.exchange=global_topk", f"output.dir={out}", "--no-live"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = (out / "cnn-digits").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["compression"]["exchange"] == "global_topk"
    recs = run_records(run)
    steps = [x for x in recs if "step" in x]
    # pairs to their owners, then the kept sums back: about twice the allgather's k pairs on 2 ranks
    assert len(steps) == 44 and all(0 < x["bytes_sent"] < x["bytes_dense"] / 5 for x in steps), steps[0]
    (end,) = [x for x in recs if x.get("event") == "end"]
    assert end["params_identical"] is True and end["eval_accuracy"] > 0.5, end


def test_killed_rank_restarts_from_the_checkpoint_and_ends_bit_for_bit(runs):
    _r, straight, killed, code, out = runs
    assert killed is not None, "rank 1 was never seen after the first checkpoint:\n" + (out or "")
    run, pid, first_set = killed
    assert code == 0, out
    assert "restart 1/1" in out, out
    end_a = [x for x in run_records(straight) if x.get("event") == "end"][-1]
    recs = run_records(run)
    (end_b,) = [x for x in recs if x.get("event") == "end"]
    assert end_b["steps"] == end_a["steps"] and end_b["param_digest"] == end_a["param_digest"], (end_a, end_b)
    assert [x["loss"] for x in recs if "step" in x] == [x["loss"] for x in run_records(straight) if "step" in x]
    resumes = [x for x in recs if x.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= first_set, resumes
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["max_restarts"] == 1, s
    (restart,) = s["restarts"]
    assert restart["failed_rank"] == 1 and restart["resumed"] is True, restart
    assert restart["error"] == "rank 1 was killed by SIGKILL", restart
    assert gone(pid) and not processes_mentioning(str(run))


def test_dry_run_prints_the_torchrun_command(tmp_path):
    r = run_cli(["launch", DEFAULT_JOB, "cluster.runner=torchrun", "cluster.np=2", f"output.dir={tmp_path / 'o'}",
                 "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("torchrun --standalone --nnodes 1 --nproc-per-node 2 --max-restarts 0 -m ranger_hvd.jobs"), first
    assert f"--run-dir {tmp_path / 'o'}/cnn-digits/" in first
    assert "# environment of torchrun and every rank" in r.stdout and "OMP_NUM_THREADS=1" in r.stdout
    assert not (tmp_path / "o").exists()


def test_hostile_run_directory_reaches_torchrun_as_one_argument():
    """torchrun's argv is a list: a run directory with spaces, quotes and $() stays one argument."""
    from ranger_hvd.config import load_config
    from ranger_hvd.launcher.run.command import build_command

    res = load_config(DEFAULT_JOB, ["cluster.runner=torchrun"])
    hostile = "/tmp/a b/'; $(touch x) \"c\"/run"
    cmd = build_command(res, hostile, python="/p/python", environ={}, uid=0, project_root="/r")
    i = cmd.argv.index("--run-dir")
    assert cmd.argv[i + 1] == hostile and cmd.argv[cmd.argv.index("--config") + 1] == hostile + "/config.yaml"
    resumed = build_command(res, hostile, python="/p/python", environ={}, uid=0, project_root="/r", resume=True)
    assert resumed.argv[-1] == "--resume"


def test_slurm_allocation_starts_one_torchrun_per_node():
    """On an allocation, srun starts torchrun on every node; they meet in a c10d rendezvous on the first."""
    from ranger_hvd.config import load_config
    from ranger_hvd.launcher.run.command import build_command

    res = load_config(DEFAULT_JOB, ["cluster.runner=torchrun", "cluster.scheduler=slurm", "cluster.hosts=null",
                                    "cluster.np=4", "cluster.slurm.nodes=2", "cluster.rdzv_port=29511"])
    res.hosts = [("node01", 2), ("node02", 2)]   # what the allocation module reads from Slurm
    argv = build_command(res, "/runs/x/20260101-000000", python="/p/python", environ={}, uid=0,
                         project_root="/r").argv
    assert argv[:argv.index("torchrun")] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                                             "--kill-on-bad-exit=1"]
    t = argv[argv.index("torchrun"):]
    assert t[:12] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", "node01:29511", "--rdzv-id", "20260101-000000", "--max-restarts"], t


HORO = "job: {backend: torch, model: cnn}\ncluster: {np: 2, runner: torchrun}\n"
REFUSED = [
    ("controller", HORO, {}, ["cluster.controller=mpi"], "cluster.controller", "Horovod's controller"),
    ("elastic", HORO, {}, ["cluster.elastic.min_np=1"], "cluster.elastic", "elastic mode is Horovod's"),
    ("tensorflow", HORO, {}, ["job.backend=tensorflow"], "job.backend", "must be 'torch'"),
    ("random-k", HORO, {}, ["compression.selection=random"], "compression.selection", "top-k pairs"),
    ("ssh-port", HORO, {}, ["cluster.ssh_port=2222"], "cluster.ssh_port", "unused by torchrun"),
    ("nic", HORO, {}, ["cluster.network_interfaces=eth0"], "cluster.network_interfaces", "GLOO_SOCKET_IFNAME"),
    ("two-hosts", HORO, {}, ["cluster.hosts=[a:1,b:1]"], "cluster.hosts", "on one host"),
    ("user-command", HORO, {}, ["job.command=[python,x.py]"], "job.command", "reference jobs only"),
    ("uneven-nodes", HORO, {}, ["cluster.scheduler=slurm", "cluster.np=3", "cluster.slurm.nodes=2"],
     "cluster.np", "same number of ranks on every node"),
    ("port-without-torchrun", "cluster: {np: 2, rdzv_port: 29500}\n", {}, [], "cluster.rdzv_port",
     "only used with cluster.runner 'torchrun'"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_ddp_cannot_use_exits_2_naming_the_key(tmp_path, monkeypatch, capsys, case):
    assert_refused(tmp_path, case, monkeypatch, capsys)


def test_horovod_tunables_are_set_aside_and_shown_as_such():
    """The shipped config's horovod tunables under torchrun: defaults in the run's config, listed as
    inactive with their origin, one warning; a compression type's inactive options keep their own reason."""
    from ranger_hvd.config import load_config
    from ranger_hvd.config.show import show_text

    res = load_config(DEFAULT_JOB, ["cluster.runner=torchrun", "compression.type=none"])
    assert res.resolved_dict()["horovod"] == load_config(DEFAULT_JOB, ["horovod.fusion_threshold_mb=null",
                                                                       "horovod.cycle_time_ms=null",
                                                                       "horovod.log_level=null"]
                                                         ).resolved_dict()["horovod"]
    reasons = {o.path: o.reason for o in res.inactive}
    assert reasons["horovod.cycle_time_ms"] == "no Horovod under cluster.runner 'torchrun'"
    assert reasons["compression.density"] == "compression.type is 'none'"
    assert [w for w in res.warnings if "horovod." in w] == [
        "horovod.fusion_threshold_mb=64, horovod.cycle_time_ms=5.0, horovod.log_level=WARNING have no effect: "
        "no Horovod under cluster.runner 'torchrun'; left out of the run's config"]
    text = show_text(res, "t")
    assert "horovod.cycle_time_ms: null" in text and "# default (no Horovod under cluster.runner 'torchrun')" in text
    assert "# horovod.cycle_time_ms: 5.0" in text
    # under horovodrun nothing of the kind
    plain = load_config(DEFAULT_JOB, [])
    assert not [o for o in plain.inactive if o.path.startswith("horovod.")] and plain.config.horovod.cycle_time_ms == 5
