"""Real launches with a value that would run commands if any shell line held it unquoted (issue 31), in
the output directory (so in every path horovodrun, mpirun, the ranks and the scripts see), an environment
value, an mpirun argument and the elastic discovery script's path: each run works and no marker file
appears.  Kept to one short launch per controller (horovodrun takes seconds to start)."""

import json
import os
import shlex
import stat
import subprocess

import pytest
import yaml

from .conftest import needs_horovod, run_cli, tree

EVIL = "a b;touch MARK;$(touch MARK)`touch MARK`'\"x"
TINY = {"job": {"name": "tiny", "entry": "tests.launcher.tiny_job"}, "train": {"epochs": 1},
        "horovod": {"stall_check": False}}


def no_marker(root) -> None:
    found = [p for p in tree(root) if p.endswith("MARK")] + [p for p in ("MARK",) if os.path.exists(p)]
    assert not found, f"a value ran as a command: {found}"


def launch(root, cluster: dict, extra_env: dict | None = None):
    out = root / EVIL
    cfg = {**TINY, "cluster": {"env": ["TINY_STEPS=2", f"EVIL_VALUE={EVIL}", "OMP_NUM_THREADS=1"], **cluster},
           "output": {"dir": str(out)}}
    (root / "exp.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(["launch", "exp.yaml", "--no-live"], root, timeout=180, env=extra_env)
    runs = list((out / "tiny").iterdir()) if (out / "tiny").is_dir() else []
    assert r.returncode == 0 and len(runs) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["records"] == 2
    env = json.loads((run / "env.json").read_text())
    assert env["EVIL_VALUE"] == EVIL           # the rank got the value unchanged
    no_marker(root)
    return run, env


@pytest.mark.horovod
@needs_horovod
def test_gloo_launch_with_hostile_values(tmp_path):
    run, _ = launch(tmp_path, {"np": 2})
    assert (run / "logs" / "rank.1" / "stdout").is_file()
    assert shlex.split((run / "command.txt").read_text().splitlines()[0])[-1] == str(run)


@pytest.mark.horovod
@needs_horovod
def test_mpi_launch_with_hostile_values(tmp_path):
    run, env = launch(tmp_path, {"np": 2, "controller": "mpi", "mpi_args": ["-x", f"MPI_EVIL={EVIL}"]})
    assert env["MPI_EVIL"] == EVIL             # one mpirun argument, unchanged
    assert (run / "logs" / "1" / "rank.1" / "stdout").is_file()


@pytest.mark.horovod
@needs_horovod
def test_elastic_launch_with_hostile_values(tmp_path):
    script = tmp_path / f"discover {EVIL}.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    run, _ = launch(tmp_path, {"np": 2, "network_interfaces": ["lo"],
                               "elastic": {"min_np": 2, "discovery_script": str(script)}})
    assert json.loads((run / "summary.json").read_text())["elastic"]["final_size"] == 2


def test_slurm_dry_run_with_hostile_values(tmp_path):
    cfg = {**TINY, "output": {"dir": str(tmp_path / EVIL)},
           "cluster": {"scheduler": "slurm", "env": [f"EVIL_VALUE={EVIL}"],
                       "slurm": {"time": "10", "modules": ["gcc/12"], "setup": [f"export X={shlex.quote(EVIL)}"]}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(["launch", "exp.yaml", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    script = r.stdout.split("nothing submitted):\n", 1)[1].split("# run directory", 1)[0]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    run_dir = r.stdout.rsplit("not by --dry-run): ", 1)[1].strip()
    assert run_dir.startswith(str(tmp_path / EVIL) + "/")
    assert shlex.split(script.splitlines()[-1])[-1] == run_dir
    # bash runs the setup line: X holds the value; nothing else runs
    probe = subprocess.run(["bash", "-c", f"{cfg['cluster']['slurm']['setup'][0]}; printf %s \"$X\""],
                           cwd=tmp_path, capture_output=True, text=True)
    assert probe.stdout == EVIL
    assert tree(tmp_path) == {"exp.yaml"}
    no_marker(tmp_path)
