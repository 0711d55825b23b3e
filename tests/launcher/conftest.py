import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "ranger_hvd.launcher.cli"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: starts a real single-node Slurm cluster (needs root)")


def horovod_ready() -> bool:
    return (VENV_BIN / "horovodrun").exists() and (REPO / ".venv" / ".setup-stamp").exists()


needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovodrun not built yet (launch/setup.sh)")


def run_cli(args, cwd, timeout=120, env=None, **kw):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    e["COLUMNS"] = "200"
    e.update(env or {})
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_records(run: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl (a test's own run: each line is whole)."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def rank_process(run: Path, rank: int, rank_var: str = "HOROVOD_RANK", also_env: str | None = None):
    """The Python process of one rank of the job in ``run``: its command line runs ``ranger_hvd.jobs`` on
    ``run``, and its environment has ``rank_var`` = rank (``RANK`` under torchrun, whose workers also
    carry ``also_env="TORCHELASTIC_RUN_ID"``); not horovodrun's or torchrun's process around it."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if not (len(cmd) > 2 and os.path.basename(cmd[0]).startswith("python") and "ranger_hvd.jobs" in cmd
                    and str(run) in " ".join(cmd)):
                continue
            env = p.environ()
            if env.get(rank_var) == str(rank) and (also_env is None or also_env in env):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return None


def kill_rank_once_checkpointed(proc: subprocess.Popen, name_dir: Path, straight: Path, np_: int, backend: str,
                                find_rank, poll: float = 0.05):
    """Watches the launch ``proc`` (the new run under ``name_dir``, ``straight`` being an earlier one): once
    its first complete checkpoint set exists, SIGKILLs rank 1 (``find_rank(run)`` finds its process), then
    waits for the launcher. Returns ``(killed, launcher output)``, ``killed`` = (run, pid, the newest
    complete step when it was killed) or None if rank 1 was never seen after a checkpoint."""
    import signal

    from ranger_hvd.rundir.checkpoint import complete_steps

    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            runs_now = [d for d in name_dir.iterdir() if d != straight]
            if runs_now and complete_steps(runs_now[0], np_, backend):
                victim = find_rank(runs_now[0])
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    killed = (runs_now[0], victim.pid, complete_steps(runs_now[0], np_, backend)[-1])
                    break
            time.sleep(poll)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_launcher(proc)
    return killed, out


def stop_launcher(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Ends a launcher a test started and left running (a failed assertion, a timeout): SIGTERM first, so
    the launcher stops horovodrun and every rank it started, SIGKILL only if it has not ended after
    ``grace`` seconds (a killed launcher leaves its ranks behind, loading the machine for later tests)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in Path(path).rglob("*")}


def assert_refused(root: Path, case: tuple, monkeypatch, capsys) -> None:
    """A case (id, ROOT/exp.yaml's text, other files {name: text} or a function of ROOT giving them,
    overrides, dotted path, text of the message): ``launch`` and ``validate`` in-process exit 2 with the
    path and the text in the message, no line of unbounded length, nothing created, and no process
    started but ``bash -n`` (the check of cluster.slurm.setup)."""
    from ranger_hvd.launcher import cli

    _id, text, files, overrides, path, snippet = case
    files = files(root) if callable(files) else files
    for name, content in {"exp.yaml": text, **files}.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(root)
    before = tree(root)
    real_popen = subprocess.Popen

    def only_bash_n(argv, *a, **k):
        assert list(argv)[-1:] == ["-n"], f"a process was started for an invalid config: {argv}"
        return real_popen(argv, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", only_bash_n)
    for command in ("launch", "validate"):
        code = cli.main([command, "exp.yaml", *overrides])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{path}:" in err and snippet in err, err
        assert max(len(line) for line in err.splitlines()) < 2500   # never an unbounded value
        assert tree(root) == before                                 # no run directory, nothing else


NETNS_SCRIPT = REPO / "launch" / "netns-hosts.sh"


def netns_unusable(prefix: str, tools: tuple[str, ...] = ("ip", "ssh")) -> str:
    """Why test hosts PREFIX-ns1.. cannot be created here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in tools if not shutil.which(t)]
    if missing or not os.path.exists("/usr/sbin/sshd"):
        return f"needs /usr/sbin/sshd and {', '.join(tools)} on PATH"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if r.returncode != 0:
        return "ip netns unavailable"
    if f"{prefix}-ns1".encode() in r.stdout:
        return f"{prefix}-ns1 already exists (another run is using these test hosts)"
    return ""


def netns_script(action: str, state: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``launch/netns-hosts.sh ACTION STATE`` with ``env`` (HOSTS, PREFIX, NET) added."""
    return subprocess.run(["bash", str(NETNS_SCRIPT), action, str(state)], env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=120 if action == "up" else 60)
