"""The ranks' log files in a run directory and what they say about a failure."""

from __future__ import annotations

import glob
import os
import re
import signal
from pathlib import Path
from typing import Optional

from ranger_hvd.rundir import layout

_FIRST_FAILED = re.compile(
    r"first process to do so was:\s*Process name:\s*(?:\[\[\d+,\d+\],(\d+)\]|(\d+))\s*Exit code:\s*(-?\d+)")
_GLOO_EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)")
# torchrun's ChildFailedError report: "Root Cause (first observed failure):" ... "rank : R (local_rank: L)",
# "exitcode : C" (a negative C: killed by signal -C)
_TORCHRUN_ENTRY = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)
_TORCHRUN_ROOT = re.compile(r"Root Cause \(first observed failure\):\s*\[\d+\]:(?:\s*\w+\s*:[^\n]*\n)*?"
                            r"\s*rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def rank_log_files(run_dir: Path) -> dict[int, dict[str, str]]:
    """{rank: {"stdout": path, "stderr": path}} for Gloo (logs/rank.N/) and Open MPI (logs/1/rank.N/)."""
    out: dict[int, dict[str, str]] = {}
    logs = Path(run_dir) / layout.RANK_LOGS
    for d in sorted(glob.glob(str(logs / "rank.*")) + glob.glob(str(logs / "*" / "rank.*"))):
        m = re.search(r"rank\.(\d+)$", d)
        if not m or not os.path.isdir(d):
            continue
        entry = out.setdefault(int(m.group(1)), {})
        for stream in ("stdout", "stderr"):
            p = os.path.join(d, stream)
            if os.path.exists(p):
                entry[stream] = p
    return out


def find_failed_rank(launcher_log: str, rank_logs: dict[int, dict[str, str]]) -> tuple[Optional[int], Optional[int]]:
    """(rank, its exit code) of the first rank that failed, from horovodrun's / mpirun's / torchrun's report, else the
    first rank whose stderr holds a Python traceback (exit code unknown)."""
    m = _FIRST_FAILED.search(launcher_log)
    if m:
        return int(m.group(1) or m.group(2)), int(m.group(3))
    m = _GLOO_EXIT.search(launcher_log)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _TORCHRUN_ROOT.search(launcher_log)
    if m:
        # torchrun's root cause is the failure it saw first: when one rank is killed, a peer that exits 1 on
        # the broken connection can be seen first; a rank killed by a signal is then the cause. torchrun's
        # agent stops the surviving ranks with SIGTERM, so a rank killed by another signal comes first.
        killed = [(int(r), int(c)) for r, c in _TORCHRUN_ENTRY.findall(launcher_log) if int(c) < 0]
        not_by_agent = [entry for entry in killed if entry[1] != -signal.SIGTERM]
        return (not_by_agent or killed or [(int(m.group(1)), int(m.group(2)))])[0]
    for rank in sorted(rank_logs):
        err = rank_logs[rank].get("stderr")
        if err and "Traceback (most recent call last)" in read_tail(err, 200_000):
            return rank, None
    return None, None


def read_tail(path: str, nbytes: int) -> str:
    """The last ``nbytes`` of a file as text ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def tail_lines(path: str, n: int = 30) -> list[str]:
    return read_tail(path, 64_000).splitlines()[-n:]


def read_whole_lines(path: str, offset: int) -> tuple[str, int]:
    """(text of the complete lines after ``offset``, bytes consumed): multi-byte characters stay whole."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "", 0
    cut = data.rfind(b"\n")
    if cut < 0:
        return "", 0
    return data[: cut + 1].decode("utf-8", "replace"), cut + 1
