"""Elastic mode without launching anything: config checks, the horovodrun argv, the generated discovery
script, the jobs' data plan and resize records, and the summary."""

import os
import subprocess

import numpy as np
import pytest

from ranger_hvd.jobs.torch_elastic import (epoch_has_step, epoch_order, membership_change, step_slice)
from ranger_hvd.launcher.run.command import build_command
from ranger_hvd.config import ConfigError, load_config
from ranger_hvd.launcher.run.elastic import elastic_summary, write_discovery_files

from .conftest import run_cli, tree

RD = "/runs/t/20250101-000000"
PY = "/venv/bin/python"
TAIL = [PY, "-m", "ranger_hvd.jobs", "--config", f"{RD}/config.yaml", "--run-dir", RD]
HOSTS = "cluster:\n  hosts: [a:1, b:1, c:1]\n  network_interfaces: eth1\n"


def resolve(tmp_path, text, overrides=()):
    (tmp_path / "exp.yaml").write_text(text)
    return load_config(tmp_path / "exp.yaml", list(overrides), cwd=tmp_path)


def argv(tmp_path, text, overrides=()):
    res = resolve(tmp_path, text, overrides)
    return build_command(res, RD, python=PY, environ={"PATH": "/bin"}, uid=1000, project_root="/repo").argv


def problems(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as exc:
        resolve(tmp_path, text, overrides)
    return [(p.path, p.message) for p in exc.value.problems]


def test_generated_discovery_argv(tmp_path):
    a = argv(tmp_path, HOSTS + "  elastic: {min_np: 2, max_np: 3, reset_limit: 4, elastic_timeout: 60}\n")
    assert a[:a.index("--output-filename")] == [
        "horovodrun", "-np", "3", "--min-np", "2", "--max-np", "3",
        "--host-discovery-script", f"{RD}/elastic/discover-hosts.sh", "--reset-limit", "4",
        "--elastic-timeout", "60", "--gloo", "--network-interfaces", "eth1"]
    assert "-H" not in a and a[-len(TAIL):] == TAIL
    # the stall watch reads Horovod's timeline, whose collectives shrink after a resize: not in elastic mode
    assert "--timeline-filename" not in a


def test_np_defaults_to_max_np_and_local_hosts_get_lo(tmp_path):
    a = argv(tmp_path, "cluster:\n  hosts: [localhost:4]\n  elastic: {min_np: 2, max_np: 3}\n")
    assert a[:9] == ["horovodrun", "-np", "3", "--min-np", "2", "--network-interfaces", "lo", "--max-np", "3"]


def test_user_discovery_script(tmp_path):
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho a:2\n")
    script.chmod(0o755)
    res = resolve(tmp_path, "cluster:\n  elastic: {min_np: 2, discovery_script: discover.sh, slots_per_host: 2}\n")
    assert res.hosts == [] and res.np == 2
    a = build_command(res, RD, python=PY, environ={}, uid=0, project_root="/repo").argv
    assert a[:9] == ["horovodrun", "-np", "2", "--min-np", "2", "--host-discovery-script", str(script),
                     "--slots-per-host", "2"]
    assert "hosts" not in res.resolved_dict()["cluster"] or res.resolved_dict()["cluster"]["hosts"] is None
    assert write_discovery_files(tmp_path / "run", res) is None and not (tmp_path / "run").exists()


def test_generated_script_prints_the_hosts_file(tmp_path):
    res = resolve(tmp_path, HOSTS + "  elastic: {min_np: 2}\n")
    run = tmp_path / "run"
    script = write_discovery_files(run, res)
    assert os.access(script, os.X_OK)
    out = subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["a:1", "b:1", "c:1"]
    hosts = run / "elastic" / "hosts"
    hosts.write_text(hosts.read_text().replace("c:1\n", "") + "\n  d:2   # a new one\n")
    out = subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["a:1", "b:1", "d:2"]


@pytest.mark.parametrize("extra, overrides, expected", [
    ("  elastic: {min_np: 2}\n", ["cluster.controller=mpi"], ("cluster.elastic", "cluster.controller is 'mpi'")),
    ("  elastic: {min_np: 3, max_np: 2}\n", [], ("cluster.elastic.max_np", "at least cluster.elastic.min_np (3)")),
    ("  elastic: {min_np: 2, max_np: 3}\n", ["cluster.np=1"], ("cluster.np", "below cluster.elastic.min_np (2)")),
    ("  elastic: {min_np: 1, max_np: 2}\n", ["cluster.np=3"], ("cluster.np", "above cluster.elastic.max_np (2)")),
    ("  elastic: {min_np: 4}\n", [], ("cluster.elastic.min_np", "do not fit in the 3 slots")),
    ("  elastic: {min_np: 2}\n", ["job.backend=tensorflow"], ("cluster.elastic", "TensorFlow")),
    ("  elastic: {min_np: 2}\n", ["train.max_restarts=1"], ("train.max_restarts", "cluster.elastic")),
    ("  elastic: {min_np: 2}\n", ["horovod.cycle_time_ms=5"], ("horovod.cycle_time_ms", "cluster.elastic")),
    ("  elastic: {min_np: 2, discovery_script: nope.sh}\n", [], ("cluster.hosts", "discovery_script")),
    ("  elastic: {min_np: 0}\n", [], ("cluster.elastic.min_np", "")),
    ("  elastic: {min_np: 2, max_nps: 3}\n", [], ("cluster.elastic.max_nps", "max_np")),
])
def test_config_problems_name_the_keys(tmp_path, extra, overrides, expected):
    found = problems(tmp_path, HOSTS + extra, overrides)
    assert any(p == expected[0] and expected[1] in m for p, m in found), found


def test_script_file_problems(tmp_path):
    found = problems(tmp_path, "cluster:\n  elastic: {min_np: 2, discovery_script: nope.sh}\n")
    assert found == [("cluster.elastic.discovery_script", "file not found: nope.sh")]
    (tmp_path / "plain.sh").write_text("echo a:1\n")
    found = problems(tmp_path, "cluster:\n  elastic: {min_np: 2, discovery_script: plain.sh}\n"
                               "  ssh_identity_file: nokey\n")
    assert found == [("cluster.elastic.discovery_script", "plain.sh is not executable (chmod +x it)"),
                     ("cluster.ssh_identity_file", "file not found: nokey")]


def test_one_remote_host_needs_the_interface(tmp_path):
    found = problems(tmp_path, "cluster:\n  hosts: [gpu1:4]\n  elastic: {min_np: 2}\n")
    assert found[0][0] == "cluster.network_interfaces" and "gpu1" in found[0][1], found


def test_cli_dry_run_shows_command_and_hosts_creates_nothing(tmp_path):
    (tmp_path / "exp.yaml").write_text(HOSTS + "  elastic: {min_np: 2, max_np: 3}\n")
    r = run_cli(["launch", "exp.yaml", "--dry-run", "output.dir=out"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script ") and "-H" not in first
    assert "#   a:1\n#   b:1\n#   c:1\n" in r.stdout
    assert tree(tmp_path) == {"exp.yaml"}
    r = run_cli(["validate", "exp.yaml"], cwd=tmp_path)
    assert r.returncode == 0 and "3 ranks (elastic: 2 to 3) on a:1,b:1,c:1" in r.stdout, r.stdout
    r = run_cli(["launch", "exp.yaml", "--dry-run", "cluster.controller=mpi"], cwd=tmp_path)
    assert r.returncode == 2 and "cluster.elastic" in r.stderr and "cluster.controller is 'mpi'" in r.stderr


def test_epoch_plan_covers_each_sample_once_across_a_resize():
    order = epoch_order(100, seed=3, epoch=1)
    assert sorted(order) == list(range(100)) and not np.array_equal(order, epoch_order(100, 3, 2))
    taken, pos = [], 0
    for size in (3, 3, 2, 2):   # two steps on 3 workers, then a resize to 2
        assert epoch_has_step(100, pos, size, 8)
        taken += [int(i) for r in range(size) for i in step_slice(order, pos, r, size, 8)]
        pos += size * 8
    assert pos == 80 and not epoch_has_step(100, pos, 3, 8) and epoch_has_step(100, pos, 2, 8)
    assert len(taken) == len(set(taken)) == 80 and taken == [int(i) for i in order[:80]]


def test_membership_change_names_hosts_and_lost_residual():
    before = [("h1", 10, 9.0), ("h2", 11, 16.0), ("h3", 12, 144.0)]
    assert membership_change(before, [("h1", 10, 1.0), ("h2", 11, 2.0), ("h3", 12, 3.0)]) is None
    ch = membership_change(before, [("h1", 10, 9.0), ("h2", 11, 16.0), ("h4", 20, None)])
    assert (ch["old_size"], ch["new_size"], ch["hosts_lost"], ch["hosts_added"]) == (3, 3, ["h3"], ["h4"])
    assert ch["lost_residual_norm"] == 12.0 and ch["residual_norm_all_workers"] == 13.0
    assert ch["hosts_after"] == [("h1", 1), ("h2", 1), ("h4", 1)]


def test_summary_collects_reset_events(tmp_path):
    res = resolve(tmp_path, HOSTS + "  elastic: {min_np: 2, max_np: 3}\n")
    records = [{"step": 1}, {"event": "elastic_reset", "old_size": 3, "new_size": 2}, {"step": 2},
               {"event": "end", "size": 2}]
    assert elastic_summary(res, records) == {
        "min_np": 2, "max_np": 3, "start_np": 3, "final_size": 2, "resets": 1,
        "events": [{"event": "elastic_reset", "old_size": 3, "new_size": 2}]}
    assert elastic_summary(resolve(tmp_path, "job: {name: t}\n"), records) is None
