"""cluster.scheduler slurm without a cluster: the schema and its errors, the batch script line by line,
reading an allocation from Slurm's variables, and the refusals that happen before anything is submitted."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from ranger_hvd.config import ConfigError, load_config
from ranger_hvd.launcher.slurm.batch import (SlurmError, allocation_from_env, culprit, expand_counts, render_sbatch,
                                       slurm_options)
from ranger_hvd.launcher.slurm.allocation import ended_by

from .conftest import REPO, run_cli, tree

TWO_NODES = """\
job: {name: cnn-digits, backend: torch, model: cnn}
train: {epochs: 3}
cluster:
  np: 4
  scheduler: slurm
  env: [OMP_NUM_THREADS=1]
  slurm:
    nodes: 2
    ntasks_per_node: 2
    cpus_per_task: 1
    partition: gpu,debug
    time: "1:30:00"
    account: proj-42
    sbatch_lines: ["--mem=4G", "#SBATCH --gres=gpu:1"]
    modules: [openmpi/4.1, cuda/12.2]
    setup: ["source /opt/site/env.sh"]
output: {dir: /scratch/runs}
"""


def problems_of(text: str, tmp_path: Path, overrides=()) -> list[str]:
    (tmp_path / "exp.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config("exp.yaml", list(overrides), cwd=tmp_path)
    return [str(p) for p in info.value.problems]


def test_sbatch_script_of_two_nodes_four_tasks_line_by_line(tmp_path):
    (tmp_path / "exp.yaml").write_text(TWO_NODES)
    res = load_config(tmp_path / "exp.yaml", cwd=tmp_path)
    assert res.np == 4 and res.hosts == []
    run = "/scratch/runs/cnn-digits/20260101-120000"
    script = render_sbatch(res, run, python="/opt/rhvd/.venv/bin/python", project_root="/opt/rhvd",
                           workdir="/home/me/exp")
    assert script.splitlines() == [
        "#!/bin/bash",
        "# ranger-hvd: job cnn-digits, 4 ranks; written by 'ranger-hvd launch', submitted with sbatch",
        "#SBATCH --job-name=cnn-digits",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks=4",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --partition=gpu,debug",
        "#SBATCH --time=1:30:00",
        "#SBATCH --account=proj-42",
        f"#SBATCH --output={run}/slurm-%j.out",
        "#SBATCH --chdir=/home/me/exp",
        "#SBATCH --mem=4G",
        "#SBATCH --gres=gpu:1",
        "set -e",
        "module load openmpi/4.1",
        "module load cuda/12.2",
        "source /opt/site/env.sh",
        "export PYTHONPATH=/opt/rhvd${PYTHONPATH:+:$PYTHONPATH}",
        f"exec /opt/rhvd/.venv/bin/python -m ranger_hvd.launcher.slurm.allocation {run}",
    ]
    resumed = render_sbatch(res, run, python="/p", project_root="/r", workdir="/w", resume=True)
    assert resumed.splitlines()[-1] == f"exec /p -m ranger_hvd.launcher.slurm.allocation {run} --resume"


def test_defaults_and_resolved_config_round_trip(tmp_path):
    res = load_config(REPO / "configs" / "cnn-digits.yaml", ["cluster.scheduler=slurm", "cluster.hosts=null"],
                      cwd=tmp_path)
    assert res.np == 2 and slurm_options(res).nodes == 1 and slurm_options(res).ntasks_per_node == 2
    resolved = res.resolved_dict()["cluster"]
    assert resolved["hosts"] is None and resolved["slurm"]["ntasks_per_node"] == 2
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(res.resolved_dict()))
    again = load_config(tmp_path / "resolved.yaml", cwd=tmp_path)
    assert again.resolved_dict() == res.resolved_dict()
    # the shipped Slurm config is the default job, only the cluster section differs
    shipped = load_config(REPO / "configs" / "cnn-digits-slurm.yaml", cwd=tmp_path).resolved_dict()
    default = load_config(REPO / "configs" / "cnn-digits.yaml", cwd=tmp_path).resolved_dict()
    assert {k: v for k, v in shipped.items() if k != "cluster"} == {k: v for k, v in default.items() if k != "cluster"}
    assert shipped["cluster"]["scheduler"] == "slurm" and shipped["cluster"]["np"] == 2
    # np defaults to nodes x tasks per node
    res = load_config(None, ["cluster.scheduler=slurm", "cluster.slurm.nodes=3", "cluster.slurm.ntasks_per_node=4"],
                      cwd=tmp_path)
    assert res.np == 12
    # tasks per node default to enough for np ranks
    res = load_config(None, ["cluster.scheduler=slurm", "cluster.slurm.nodes=2", "cluster.np=5"], cwd=tmp_path)
    assert slurm_options(res).ntasks_per_node == 3


@pytest.mark.parametrize("overrides, path, words", [
    (["cluster.slurm.partition=gpu partition"], "cluster.slurm.partition", "bad partition 'gpu partition'"),
    (["cluster.slurm.partition=gpu;rm"], "cluster.slurm.partition", "bad partition"),
    (["cluster.np=5", "cluster.slurm.ntasks_per_node=2"], "cluster.np",
     "5 ranks do not fit in the Slurm allocation of 1 node(s) x 2 task(s) per node = 2 tasks"),
    (["cluster.slurm.time=1h"], "cluster.slurm.time", "bad time limit '1h'"),
    (["cluster.slurm.account=a b"], "cluster.slurm.account", "bad account name"),
    (["cluster.slurm.sbatch_lines=[--ntasks=3]"], "cluster.slurm.sbatch_lines[0]",
     "--ntasks is written by the launcher from cluster.np"),
    (["cluster.slurm.sbatch_lines=[mem=4G]"], "cluster.slurm.sbatch_lines[0]",
     "must start with an sbatch option"),
    (["cluster.slurm.modules=['a b']"], "cluster.slurm.modules[0]", "bad module name"),
    (["cluster.slurm.nodes=3", "cluster.np=2"], "cluster.slurm.nodes", "would leave a node without a rank"),
    (["cluster.slurm.nodez=2"], "cluster.slurm.nodez", "did you mean 'nodes'"),
])
def test_bad_slurm_options_name_the_key(tmp_path, overrides, path, words):
    probs = problems_of("", tmp_path, ["cluster.scheduler=slurm", *overrides])
    assert any(f"{path}: " in p and words in p for p in probs), probs


def test_hosts_and_slurm_options_conflicts(tmp_path):
    probs = problems_of((REPO / "configs" / "cnn-digits.yaml").read_text(), tmp_path, ["cluster.scheduler=slurm"])
    assert probs == ["exp.yaml:12: cluster.hosts: the hosts come from the Slurm allocation when cluster.scheduler "
                     "is 'slurm': unset it (cluster.hosts=null) and set cluster.slurm.nodes / ntasks_per_node"]
    probs = problems_of("cluster: {slurm: {nodes: 2}}\n", tmp_path)
    assert probs == ["exp.yaml:1: cluster.slurm: only allowed with cluster.scheduler 'slurm'"]
    probs = problems_of("cluster: {scheduler: slrum}\n", tmp_path)
    assert len(probs) == 1 and "cluster.scheduler: must be one of none, slurm" in probs[0] \
        and "did you mean 'slurm'" in probs[0], probs


def test_cli_refuses_bad_input_before_submitting(tmp_path):
    """Exit 2 and nothing created: a config error, and sbatch missing from PATH."""
    on_slurm = [str(REPO / "configs" / "cnn-digits.yaml"), "cluster.scheduler=slurm", "cluster.hosts=null",
                f"output.dir={tmp_path / 'runs'}"]
    r = run_cli(["launch", *on_slurm, "cluster.slurm.partition=a b"], tmp_path)
    assert r.returncode == 2 and "cluster.slurm.partition: bad partition 'a b'" in r.stderr, r.stderr
    r = run_cli(["launch", *on_slurm, "cluster.np=3", "cluster.slurm.ntasks_per_node=2"], tmp_path)
    assert r.returncode == 2 and "cluster.np: 3 ranks do not fit in the Slurm allocation of 1 node(s) x 2 task(s) " \
        "per node = 2 tasks" in r.stderr, r.stderr
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = run_cli(["launch", *on_slurm], tmp_path, env={"PATH": str(empty)})
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "sbatch not found on PATH" in r.stderr and "nothing was submitted" in r.stderr, r.stderr
    assert tree(tmp_path) == {"empty-bin"}


def test_dry_run_prints_the_script_and_creates_nothing(tmp_path):
    r = run_cli(["launch", str(REPO / "configs" / "cnn-digits.yaml"), "cluster.scheduler=slurm", "cluster.hosts=null",
                 "cluster.slurm.partition=debug", f"output.dir={tmp_path / 'runs'}", "--dry-run"], tmp_path,
                env={"PATH": "/nonexistent"})   # no Slurm needed to look at the script
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# sbatch --parsable ") and lines[0].endswith("/job.sbatch")
    assert "#!/bin/bash" in lines and "#SBATCH --partition=debug" in lines and "#SBATCH --ntasks=2" in lines
    assert lines[-2].startswith("exec ") and "-m ranger_hvd.launcher.slurm.allocation" in lines[-2]
    assert tree(tmp_path) == set()


def test_validate_and_sweep_with_slurm(tmp_path):
    args = [str(REPO / "configs" / "cnn-digits.yaml"), "cluster.scheduler=slurm", "cluster.hosts=null"]
    r = run_cli(["validate", *args], tmp_path)
    assert r.returncode == 0 and "2 ranks on a Slurm allocation" in r.stdout, r.stdout + r.stderr
    r = run_cli(["sweep", *args, "train.lr=0.1,0.2"], tmp_path)
    assert r.returncode == 2 and "submit each one with ranger-hvd launch" in r.stderr, r.stderr


def test_status_of_a_local_run_reads_its_files(tmp_path):
    run = tmp_path / "runs" / "tiny" / "20260101-120000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train: {epochs: 3}\n")
    (run / "metrics.jsonl").write_text('{"step": 7, "epoch": 2, "loss": 0.25}\n{"event": "end"}\n')
    (run / "summary.json").write_text('{"status": "failed", "exit_code": 1}\n')
    r = run_cli(["status", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr
    row = next(x for x in r.stdout.splitlines() if "20260101-120000" in x)
    cells = [c.strip() for c in row.split("\u2502") if c.strip()]
    assert cells == [str(run), "-", "-", "failed", "epoch 2/3  step 7  loss 0.25"], cells


def test_status_names_a_directory_that_is_not_a_run(tmp_path):
    r = run_cli(["status", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and f"{tmp_path} is not a run directory" in r.stderr, r.stderr


def test_tasks_per_node_forms():
    assert expand_counts("2") == [2]
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert expand_counts("4,2(x2)") == [4, 2, 2]
    with pytest.raises(SlurmError, match="cannot read tasks per node"):
        expand_counts("2(3)")


@pytest.fixture
def scontrol_conf(tmp_path, monkeypatch):
    """scontrol expands node lists from a config file alone (no daemon)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (Debian package slurm-client)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=unit13\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


def test_allocation_from_slurm_variables(scontrol_conf):
    alloc = allocation_from_env({"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-03],gpu7",
                                 "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS_PER_NODE": "9"})
    assert alloc.job_id == "77" and alloc.nodelist == "node[01-03],gpu7"
    assert alloc.hosts == [("node01", 2), ("node02", 2), ("node03", 2), ("gpu7", 1)]
    alloc = allocation_from_env({"SLURM_JOB_ID": "8", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "3"})
    assert alloc.hosts == [("n1", 3), ("n2", 3)]
    with pytest.raises(SlurmError, match="does not match the 2 nodes"):
        allocation_from_env({"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x3)"})
    with pytest.raises(SlurmError, match="not inside a Slurm allocation"):
        allocation_from_env({k: v for k, v in os.environ.items() if not k.startswith("SLURM_JOB")})


def test_signal_meaning_and_refusal_culprits(tmp_path):
    assert ended_by("SIGTERM", None, 1000.0) == "cancelled"
    assert ended_by("SIGTERM", 5000.0, 1000.0) == "cancelled"
    assert ended_by("SIGTERM", 1005.0, 1000.0) == "timeout"
    assert ended_by("SIGINT", 1005.0, 1000.0) is None
    res = load_config(None, ["cluster.scheduler=slurm", "cluster.slurm.partition=gpu", "cluster.slurm.nodes=2",
                             "cluster.np=4"], cwd=tmp_path)
    opts = slurm_options(res)
    assert culprit("sbatch: error: invalid partition specified: gpu", opts) == ": cluster.slurm.partition 'gpu'"
    assert culprit("allocation failure: Requested node configuration is not available", opts) == \
        ": cluster.slurm.nodes / ntasks_per_node / cpus_per_task (2 node(s) x 2 task(s))"
    assert culprit("Requested time limit exceeds partition limit", opts) == \
        ": cluster.slurm.time (not set: the cluster's default)"
    assert culprit("something else", opts) == ""
