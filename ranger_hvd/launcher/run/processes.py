"""Keeping track of every process a launch starts, and stopping them all.

horovodrun runs in its own session; under Gloo each rank runs behind a middleman process that calls
``setsid``, so a process-group kill alone does not reach the ranks.  Hence: the launcher becomes a Linux
child subreaper (orphaned descendants are re-parented to it instead of init), :class:`ProcessTree`
records every descendant it sees while the job runs, and :func:`stop_processes` sends SIGTERM to each,
then SIGKILL to the ones still alive after a grace period, and reaps them.  Ranks on remote hosts are
stopped by horovodrun / mpirun themselves (their ssh sessions end).
"""

from __future__ import annotations

import ctypes
import os
import signal

import psutil

GRACE_S = 5.0


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_processes(procs: list[psutil.Process], grace: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the pids that needed SIGKILL."""
    alive = []
    for p in procs:
        if _alive(p):
            try:
                p.send_signal(signal.SIGTERM)
                alive.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    _gone, alive = psutil.wait_procs(alive, timeout=grace)
    killed = []
    for p in alive:
        try:
            p.kill()
            killed.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=5)
    reap_zombies()
    return killed


class ProcessTree:
    """Every process started under ``root`` (and re-parented to this subreaper) since construction."""

    def __init__(self) -> None:
        self.preexisting = {p.pid for p in psutil.Process().children(recursive=True)}
        self.known: dict[int, psutil.Process] = {}

    def snapshot(self, root: psutil.Process) -> None:
        try:
            for p in [root, *root.children(recursive=True)]:
                self.known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        try:
            for p in psutil.Process().children(recursive=True):
                if p.pid not in self.preexisting:
                    self.known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.known.values() if _alive(p)]
