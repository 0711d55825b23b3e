"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's ``munge`` and
``slurm-wlm``, with key, config, state, spool and logs in one temporary directory and ports picked free.

The daemons run in the foreground as children of the test process, so they are stopped by their own pids.
Installs the two packages with apt-get when they are missing (root only), as CI on a fresh machine needs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class ClusterUnavailable(Exception):
    """The daemons cannot run here; the message says why (tests skip with it)."""


def _find(tool: str) -> Optional[str]:
    return shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)),
                                      None)


def ensure_packages() -> None:
    missing = [t for t in (*DAEMONS, "sbatch", "scancel", "squeue", "scontrol") if _find(t) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} missing and cannot install {' '.join(PACKAGES)} "
                                 f"(needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(argv)} failed: {(r.stderr or r.stdout)[-800:]}")
    still = [t for t in (*DAEMONS, "sbatch") if _find(t) is None]
    if still:
        raise ClusterUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, cpus: int = 4):
        self.cpus = cpus
        self.root = Path(tempfile.mkdtemp(prefix="rhvd13-slurm-"))
        self.root.chmod(0o755)    # munged (user munge) must reach its socket directory
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def log_tail(self, name: str, n: int = 15) -> str:
        try:
            return "\n".join((self.root / "log" / f"{name}.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _start(self, name: str, argv: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, **kw)
        log.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root (slurmd runs the jobs and munged is started as user munge)")
        ensure_packages()
        try:
            socket.gethostbyname(self.node)
        except OSError:
            raise ClusterUnavailable(f"this machine's host name {self.node!r} does not resolve") from None
        try:
            self._start_daemons()
        except BaseException:
            self.stop()
            raise

    def _start_daemons(self) -> None:
        import pwd

        munge_dir, log_dir = self.root / "munge", self.root / "log"
        for d in (munge_dir, log_dir, self.root / "state", self.root / "spool"):
            d.mkdir()
        try:
            munge = pwd.getpwnam("munge")
        except KeyError:
            raise ClusterUnavailable("no 'munge' user (the munge package creates it)") from None
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for p in (munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        munge_dir.chmod(0o755)
        sock = munge_dir / "munge.socket"
        self._start("munged", [_find("munged"), "-F", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: sock.exists(), 15, "munged", lambda: (munge_dir / "munged.log").read_text()[-800:]
                   if (munge_dir / "munged.log").exists() else "(no log)")
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=rhvd13",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={log_dir}/slurmctld.log", f"SlurmdLogFile={log_dir}/slurmd.log",
            f"PlugStackConfig={r}/plugstack.conf",
            # no cgroups here: track a job's processes by their parent ids
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2",
            "KillWait=10", "MinJobAge=600",
            # the node may claim more CPUs than the machine has, so 2 ranks fit on a 1-core runner
            "SlurmdParameters=config_overrides",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", ""]))
        env = dict(os.environ, **self.env)
        self._start("slurmctld", [_find("slurmctld"), "-D", "-f", str(self.conf)], env=env)
        self._start("slurmd", [_find("slurmd"), "-D", "-f", str(self.conf)], env=env)
        self._wait(self._node_idle, 60, "slurmctld/slurmd",
                   lambda: f"slurmctld:\n{self.log_tail('slurmctld')}\nslurmd:\n{self.log_tail('slurmd')}")

    def _node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with {p.returncode}: {self.log_tail(name)}")
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=dict(os.environ, **self.env), capture_output=True,
                           text=True, timeout=30)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str, why) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"{what} did not come up within {timeout:.0f}s:\n{why()}")

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=dict(os.environ, **self.env), capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        """Cancels what is left in the queue, then stops the daemons (SIGTERM, SIGKILL after 15 s)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
                if jobs:
                    self.run("scancel", *jobs)
                    deadline = time.time() + 30
                    while time.time() < deadline and self.run("squeue", "-h", "-o", "%i").stdout.strip():
                        time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
