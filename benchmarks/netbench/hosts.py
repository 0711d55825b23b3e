"""Test hosts for the benchmark: ``launch/netns-hosts.sh`` driven from Python, torn down on any exit.

``TestHosts`` is a context manager: ``up`` on entry, ``down`` on exit, including after an exception,
Ctrl-C or SIGTERM (both turned into KeyboardInterrupt by :func:`interrupt_on_signals`).
``down`` also kills whatever still runs inside the namespaces (ranks of a job that was cut short).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "netns-hosts.sh"
INTERFACE = "rhvd0"
SSH_PORT = 2222


class HostsError(RuntimeError):
    """The test hosts cannot be created here (reason in the message)."""


def unusable_reason(prefix: str) -> str:
    """Why namespaces with this prefix cannot be created now ("" when they can)."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not shutil.which("ip") or not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"):
        return "needs iproute2 (ip), sshd (/usr/sbin/sshd) and ssh"
    if not shutil.which("tc"):
        return "needs tc (iproute2) to limit the links"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns unavailable: {r.stderr.strip()}"
    if f"{prefix}-ns1" in r.stdout.split():
        return f"{prefix}-ns1 already exists (another run uses these test hosts; pick another --prefix)"
    return ""


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so ``finally`` blocks (teardown) run.

    SIGINT is set explicitly: a process started in the background by a non-interactive shell
    (``cmd &`` in a script, as CI may do) inherits SIGINT as ignored, and Python then installs no
    handler, so Ctrl-C or ``kill -INT`` would leave the hosts and ranks running.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class TestHosts:
    """``count`` namespaces ``PREFIX-ns1..`` at ``NET.11..``, each with sshd on port 2222."""

    __test__ = False  # not a pytest class

    def __init__(self, count: int, state: Path, prefix: str, net: str):
        self.count, self.state, self.prefix, self.net = count, Path(state), prefix, net
        self.addresses = [f"{net}.1{i}" for i in range(1, count + 1)]
        self.key = self.state / "id_ed25519"
        self.link = "none"

    def _script(self, *args: str, timeout: float = 120) -> None:
        env = dict(os.environ, HOSTS=str(self.count), PREFIX=self.prefix, NET=self.net)
        r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise HostsError(f"{SCRIPT.name} {' '.join(args)} failed: {r.stderr.strip()[-2000:]}")

    def __enter__(self) -> "TestHosts":
        why = unusable_reason(self.prefix)
        if why:
            raise HostsError(why)
        try:
            self._script("up", str(self.state))
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def down(self) -> None:
        self._script("down", str(self.state), timeout=60)

    def set_link(self, rate: str) -> None:
        """``rate`` as tc writes it (``1gbit``, ``10gbit``) or ``none``, on every host's link."""
        self._script("rate", rate)
        self.link = rate

    def run_prefix(self) -> list[str]:
        """argv prefix that runs a command inside the first host (horovodrun starts there)."""
        return ["ip", "netns", "exec", f"{self.prefix}-ns1"]

    def horovodrun_args(self, ranks_per_host: int = 1) -> list[str]:
        return ["-np", str(self.count * ranks_per_host), "-H",
                ",".join(f"{a}:{ranks_per_host}" for a in self.addresses), "--gloo",
                "-p", str(SSH_PORT), "-i", str(self.key), "--network-interfaces", INTERFACE]

    def existing(self) -> list[str]:
        """Namespaces of this prefix that exist now (empty after ``down``)."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [w for w in out.split() if w.startswith(f"{self.prefix}-ns")]
