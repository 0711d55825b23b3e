"""The multi-host preflight: fast checks of its messages and of what counts as this machine, then real
test hosts (network namespaces with sshd, created here with launch/netns-hosts.sh and removed after):
an unknown host key (MPI only), an sshd that is down and a host without the environment each end the
launch with exit 2 naming the host, nothing started; a real 2-host MPI run passes with known_hosts
prepared through cluster.ssh_known_hosts_file.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ranger_hvd.launcher.run.command import build_command
from ranger_hvd.config import load_config
from ranger_hvd.launcher.run.preflight import (LocalEnv, PreflightError, check_host, env_mismatch, format_problems,
                                           is_local, run_preflight, ssh_failure, ssh_options)

from .conftest import CLI, REPO, needs_horovod, netns_script, netns_unusable, run_cli

CNN = REPO / "configs" / "cnn-digits.yaml"
PREFIX, NET = "rpre", "10.78.0"
ENV = LocalEnv(python="/opt/env/bin/python", project_root="/srv/repo", ranger_hvd="0.1.0", horovod="0.28.1",
               cwd="/srv/repo")


def _res(*overrides):
    return load_config(CNN, list(overrides))


# ---- fast: no network namespaces ----

def test_local_names_cover_this_machine():
    for host in ("localhost", "127.0.0.1", "127.0.1.1", socket.gethostname()):
        assert is_local(host), host
    assert not is_local("192.0.2.7")   # TEST-NET-1: never one of this machine's addresses


def test_ssh_options_follow_the_controller(tmp_path):
    key, known = tmp_path / "k", tmp_path / "kh"
    key.write_text("")
    known.write_text("")
    gloo = ssh_options(_res("cluster.ssh_port=2222", f"cluster.ssh_identity_file={key}"), check_host_key=False)
    assert "StrictHostKeyChecking=no" in gloo and gloo[gloo.index("-p") + 1] == "2222"
    assert gloo[gloo.index("-i") + 1] == str(key) and "BatchMode=yes" in gloo
    mpi = ssh_options(_res("cluster.controller=mpi", f"cluster.ssh_known_hosts_file={known}"), check_host_key=True)
    assert "StrictHostKeyChecking=yes" in mpi and f"UserKnownHostsFile={known}" in mpi
    assert mpi[mpi.index("-p") + 1] == "22"


def test_failure_messages_name_the_fix(tmp_path):
    known = tmp_path / "kh"
    known.write_text("")
    res = _res("cluster.controller=mpi", f"cluster.ssh_known_hosts_file={known}")
    msg = ssh_failure("h1", 2222, "No ED25519 host key is known for [h1]:2222\nHost key verification failed.\n", res)
    assert f"ssh-keyscan -p 2222 h1 >> {known}" in msg
    assert "authorized_keys" in ssh_failure("h1", 22, "root@h1: Permission denied (publickey).", res)
    assert env_mismatch("h2", {"missing": "python"}, ENV) == (
        "the interpreter /opt/env/bin/python does not exist there: install the environment at /srv/repo on h2 "
        "(launch/multihost-ssh.sh sync h2)")
    same = {"executable": ENV.python, "ranger_hvd": "0.1.0", "horovod": "0.28.1",
            "ranger_hvd_file": "/srv/repo/ranger_hvd/__init__.py"}
    assert env_mismatch("h2", same, ENV) is None
    older = dict(same, horovod="0.27.0", ranger_hvd_file="/other/ranger_hvd/__init__.py")
    msg = env_mismatch("h2", older, ENV)
    assert "horovod 0.27.0 there, 0.28.1 here" in msg and "not from /srv/repo" in msg
    text = format_problems({"h2": "x", "h1": "y"})
    assert text.index("h1: y") < text.index("h2: x") and "cluster.preflight=false" in text


def test_closed_ssh_port_is_named():
    with socket.socket() as s:   # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    why = check_host("127.0.0.1", _res(f"cluster.ssh_port={port}"), ENV)
    assert why.startswith(f"ssh port {port} does not answer") and "start sshd on 127.0.0.1" in why


def test_local_hosts_need_no_ssh():
    res = _res("cluster.hosts=[localhost:1,127.0.0.1:1]", "cluster.ssh_port=1")
    assert run_preflight(res, str(REPO)) == []


def test_known_hosts_reach_mpiruns_ssh_only(tmp_path):
    known = tmp_path / "kh"
    known.write_text("")
    kw = dict(python="/p", environ={}, uid=0, project_root="/r")
    mpi = build_command(_res("cluster.controller=mpi", f"cluster.ssh_known_hosts_file={known}",
                             "cluster.mpi_args=-x FOO"), "/run", **kw)
    arg = [a for a in mpi.argv if a.startswith("--mpi-args=")]
    assert len(arg) == 1 and arg[0].startswith("--mpi-args=-x FOO -mca plm_rsh_agent "), arg
    # what mpirun's shell (horovodrun runs it with sh -c) passes as the agent
    assert shlex.split(arg[0][len("--mpi-args="):]) == ["-x", "FOO", "-mca", "plm_rsh_agent",
                                                         f"ssh -o UserKnownHostsFile={known}"]
    gloo = build_command(_res(f"cluster.ssh_known_hosts_file={known}"), "/run", **kw)
    assert not any(a.startswith("--mpi-args") for a in gloo.argv)


def test_dry_run_does_not_ssh(tmp_path):
    # 192.0.2.7 is unroutable: a preflight would fail; --dry-run must not try
    r = run_cli(["launch", str(CNN), "--dry-run", "cluster.hosts=[192.0.2.7:1,localhost:1]",
                 f"output.dir={tmp_path / 'runs'}"], cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "preflight" not in r.stdout + r.stderr and not (tmp_path / "runs").exists()


# ---- real test hosts ----

def _ns(i: int) -> str:
    return f"{PREFIX}-ns{i}"


def _addr(i: int) -> str:
    return f"{NET}.1{i}"


def _stop_sshd(state: Path, i: int) -> None:
    pid_file = state / f"sshd-{_ns(i)}.pid"
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, 15)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            return
        subprocess.run(["sleep", "0.1"])


def _forget_test_host_keys(path: Path, before: set) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [x for x in lines if x in before or NET + "." not in x]
    if keep != lines:
        path.write_text("".join(x + "\n" for x in keep))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """ns1 starts the launcher; ns2 is healthy; ns3's sshd is stopped; ns4's sshd runs in a private mount
    namespace where the environment (the .venv) is hidden."""
    why = netns_unusable(PREFIX, ("ip", "ssh", "ssh-keyscan", "unshare"))
    if why:
        pytest.skip(why)
    state = tmp_path_factory.mktemp("netns11pre")
    # horovodrun's own ssh (StrictHostKeyChecking=no) records the keys of hosts it reaches in root's
    # known_hosts; the test removes what it added there
    root_known = Path.home() / ".ssh" / "known_hosts"
    before = set(root_known.read_text().splitlines()) if root_known.exists() else set()
    env = {"PREFIX": PREFIX, "NET": NET, "HOSTS": "4"}
    up = netns_script("up", state, env)
    try:
        if up.returncode != 0:
            pytest.skip(f"could not create the test hosts: {up.stderr[-2000:]}")
        _stop_sshd(state, 3)
        _stop_sshd(state, 4)
        venv = os.path.realpath(REPO / ".venv")
        sshd = ["/usr/sbin/sshd", "-f", "/dev/null", "-o", "Port=2222", "-o", f"ListenAddress={_addr(4)}",
                "-o", f"HostKey={state}/hostkey", "-o", f"AuthorizedKeysFile={state}/authorized_keys",
                "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no", "-o", "StrictModes=no",
                "-o", "UsePAM=no", "-o", f"PidFile={state}/sshd-{_ns(4)}.pid"]
        inner = f"mount -t tmpfs none {shlex.quote(venv)} && exec {shlex.join(sshd)}"
        subprocess.run(["ip", "netns", "exec", _ns(4), "unshare", "-m", "--propagation", "private",
                        "sh", "-c", inner], check=True, timeout=30)
        yield state
    finally:
        _forget_test_host_keys(root_known, before)
        netns_script("down", state, env)


def _launch(state: Path, tmp_path: Path, *overrides, timeout=120):
    argv = ["ip", "netns", "exec", _ns(1), *CLI, "launch", str(CNN), "cluster.ssh_port=2222",
            f"cluster.ssh_identity_file={state / 'id_ed25519'}", "cluster.network_interfaces=rhvd0",
            "cluster.start_timeout=120", "train.epochs=1", "data.dataset=synthetic", "data.synthetic_samples=256",
            "train.batch_size=32", "--no-live", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _known_hosts(tmp_path: Path, *indices: int) -> Path:
    path = tmp_path / "known_hosts"
    lines = []
    for i in indices:
        r = subprocess.run(["ip", "netns", "exec", _ns(1), "ssh-keyscan", "-p", "2222", "-t", "ed25519", _addr(i)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        lines.append(r.stdout)
    path.write_text("".join(lines))
    return path


def _problem_lines(stderr: str) -> dict:
    out = {}
    for line in stderr.splitlines():
        for i in range(1, 5):
            if line.strip().startswith(f"{_addr(i)}:"):
                out[i] = line.strip()
    return out


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_bad_hosts_named_nothing_started(hosts, tmp_path, controller):
    known = _known_hosts(tmp_path, 4)   # ns2's key is unknown, ns4's known (so its environment is checked)
    out = tmp_path / "runs"
    hostlist = ",".join(f"{_addr(i)}:1" for i in range(1, 5))
    r = _launch(hosts, tmp_path, f"cluster.hosts=[{hostlist}]", f"cluster.controller={controller}",
                f"cluster.ssh_known_hosts_file={known}", f"output.dir={out}")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    named = _problem_lines(r.stderr)
    if controller == "mpi":
        assert f"ssh-keyscan -p 2222 {_addr(2)} >> {known}" in named.get(2, ""), r.stderr
    else:
        assert 2 not in named, r.stderr   # Gloo's ssh does not check host keys: ns2 is fine
    assert 1 not in named, r.stderr       # the launcher's own host
    assert "ssh port 2222 does not answer" in named.get(3, "") and f"start sshd on {_addr(3)}" in named[3], r.stderr
    assert f"does not exist there: install the environment" in named.get(4, ""), r.stderr
    assert f"launch/multihost-ssh.sh sync {_addr(4)}" in named[4], r.stderr
    assert not out.exists(), list(out.rglob("*"))   # no run directory, so no horovodrun and no rank


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
def test_unchecked_host_key_failure_is_in_summary(hosts, tmp_path):
    # with the check off, the launch goes ahead and Open MPI's ssh refuses ns2's unknown host key (ORTE
    # cannot start its daemons); summary.json names the cause
    known = tmp_path / "empty_known_hosts"
    known.write_text("")
    out = tmp_path / "runs"
    r = _launch(hosts, tmp_path, f"cluster.hosts=[{_addr(1)}:1,{_addr(2)}:1]", "cluster.controller=mpi",
                "cluster.preflight=false", f"cluster.ssh_known_hosts_file={known}", "cluster.start_timeout=30",
                f"output.dir={out}")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["status"] == "failed" and summary["error"], summary
    assert "not in known_hosts" in summary["error"] and "ORTE" in summary["error"], summary["error"]


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
def test_two_host_mpi_job(hosts, tmp_path):
    pytest.importorskip("ranger_hvd.jobs")
    known = _known_hosts(tmp_path, 2)
    out = tmp_path / "runs"
    r = _launch(hosts, tmp_path, f"cluster.hosts=[{_addr(1)}:1,{_addr(2)}:1]", "cluster.controller=mpi",
                f"cluster.ssh_known_hosts_file={known}", f"output.dir={out}", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"preflight: {_addr(2)} reachable" in r.stdout, r.stdout
    run = next((out / "cnn-digits").iterdir())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    end = recs[-1]
    assert end["event"] == "end" and end["size"] == 2 and end["params_identical"] is True, end
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "success" and s["error"] is None, s
