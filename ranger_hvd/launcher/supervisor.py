"""Starts horovodrun, shows live progress from metrics.jsonl, stops every rank on SIGINT/SIGTERM, names
the rank that failed and writes summary.json.

Process hygiene: horovodrun runs in its own session; under Gloo each rank runs behind a middleman
process that calls ``setsid``, so a process-group kill alone does not reach the ranks.  The supervisor
therefore (1) makes the launcher a Linux child subreaper, so orphaned descendants are re-parented to it
instead of init, (2) snapshots horovodrun's process tree while it runs, and (3) on shutdown sends
SIGTERM to every process it knows, then SIGKILL to the ones still alive after a grace period, and
reaps them.  Ranks on remote hosts are stopped by horovodrun / mpirun themselves (ssh sessions end).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .command import LaunchCommand
from .config import Resolved
from .rundir import write_json

GRACE_S = 5.0
POLL_S = 0.25


# --------------------------------------------------------------------------------------------------
# rank logs and failure detection
# --------------------------------------------------------------------------------------------------
def rank_log_files(run_dir: Path) -> dict[int, dict[str, str]]:
    """{rank: {"stdout": path, "stderr": path}} for Gloo (logs/rank.N/) and Open MPI (logs/1/rank.N/)."""
    out: dict[int, dict[str, str]] = {}
    logs = Path(run_dir) / "logs"
    for d in sorted(glob.glob(str(logs / "rank.*")) + glob.glob(str(logs / "*" / "rank.*"))):
        m = re.search(r"rank\.(\d+)$", d)
        if not m or not os.path.isdir(d):
            continue
        rank = int(m.group(1))
        entry = out.setdefault(rank, {})
        for stream in ("stdout", "stderr"):
            p = os.path.join(d, stream)
            if os.path.exists(p):
                entry[stream] = p
    return out


_FIRST_FAILED = re.compile(
    r"first process to do so was:\s*Process name:\s*(?:\[\[\d+,\d+\],(\d+)\]|(\d+))\s*Exit code:\s*(-?\d+)")
_GLOO_EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)")


def find_failed_rank(launcher_log: str, rank_logs: dict[int, dict[str, str]]) -> tuple[Optional[int], Optional[int]]:
    """(rank, its exit code) of the first rank that failed, from horovodrun's / mpirun's report."""
    m = _FIRST_FAILED.search(launcher_log)
    if m:
        return int(m.group(1) or m.group(2)), int(m.group(3))
    m = _GLOO_EXIT.search(launcher_log)
    if m:
        return int(m.group(1)), int(m.group(2))
    for rank in sorted(rank_logs):
        err = rank_logs[rank].get("stderr")
        if err and "Traceback (most recent call last)" in _read_tail(err, 200_000):
            return rank, None
    return None, None


def _read_tail(path: str, nbytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def tail_lines(path: str, n: int = 30) -> list[str]:
    return _read_tail(path, 64_000).splitlines()[-n:]


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
class MetricsTail:
    """Reads the complete lines appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.buf = b""
        self.records: list[dict] = []

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buf += chunk
        new = []
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                new.append(rec)
        self.records.extend(new)
        return new


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return str(n)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def progress_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec.get('epoch', '?')}/{epochs}", f"step {rec.get('step', '?')}"]
    if "loss" in rec:
        parts.append(f"loss {_fmt(rec['loss'])}")
    for k, v in (rec.get("metrics") or {}).items():
        parts.append(f"{k} {_fmt(v)}")
    if rec.get("bytes_sent") is not None:
        parts.append(f"sent {fmt_bytes(rec['bytes_sent'])}/step")
    if rec.get("time") is not None:
        parts.append(f"{float(rec['time']):.1f}s")
    return "  ".join(parts)


def _progress_table(res: Resolved, run_dir: Path, tail: MetricsTail, started: float, state: str) -> Table:
    t = Table(title=f"ranger-hvd  {res.job_name}  ({res.np} ranks, {res.config.cluster.controller}, "
                    f"compression {res.config.compression.type})", show_header=True, expand=False)
    for col in ("epoch", "step", "loss", "metrics", "bytes/step", "step time", "elapsed"):
        t.add_column(col)
    steps = [r for r in tail.records if "step" in r]
    rec = steps[-1] if steps else {}
    metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in (rec.get("metrics") or {}).items())
    t.add_row(f"{rec.get('epoch', '-')}/{res.config.train.epochs}", str(rec.get("step", "-")),
              _fmt(rec["loss"]) if "loss" in rec else "-", metrics or "-",
              fmt_bytes(rec.get("bytes_sent")),
              f"{rec['step_time'] * 1000:.1f} ms" if isinstance(rec.get("step_time"), (int, float)) else "-",
              f"{time.time() - started:.0f}s")
    t.caption = f"{state}  ·  {run_dir}"
    return t


# --------------------------------------------------------------------------------------------------
# process supervision
# --------------------------------------------------------------------------------------------------
def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_processes(procs: list[psutil.Process], grace: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the pids that needed SIGKILL."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
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
    _reap_zombies()
    return killed


@dataclass
class RunResult:
    status: str                     # success | failed | interrupted | start_failed
    exit_code: int                  # the launcher's exit status (0, 1, 128+signal)
    run_dir: Path
    failed_rank: Optional[int] = None
    summary: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, res: Resolved, cmd: LaunchCommand, run_dir: Path, console: Optional[Console] = None,
                 live: Optional[bool] = None, stream: bool = False, cwd: Optional[str] = None,
                 resume: bool = False):
        self.res, self.cmd, self.run_dir = res, cmd, Path(run_dir)
        self.resume = resume   # launch --resume: metrics.jsonl already holds the earlier runs' lines
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.stream = stream
        self.cwd = cwd or os.getcwd()
        self.stop_signal: Optional[int] = None
        self.known: dict[int, psutil.Process] = {}

    # signals ----------------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        if self.stop_signal is None:
            self.stop_signal = signum
        else:  # a second Ctrl-C: stop waiting politely
            self.stop_signal = signum

    def _snapshot(self, root: psutil.Process) -> None:
        try:
            for p in [root, *root.children(recursive=True)]:
                self.known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        try:
            me = psutil.Process()
            for p in me.children(recursive=True):
                if p.pid not in self.preexisting:
                    self.known.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def _alive_known(self) -> list[psutil.Process]:
        out = []
        for p in self.known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    # main -------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        become_subreaper()
        self.preexisting = {p.pid for p in psutil.Process().children(recursive=True)}
        log_path = self.run_dir / "horovodrun.log"
        metrics = MetricsTail(self.run_dir / "metrics.jsonl")
        if self.resume:
            # progress and summary describe this launch: start after the lines already there
            try:
                metrics.offset = (self.run_dir / "metrics.jsonl").stat().st_size
            except FileNotFoundError:
                pass
        started = time.time()
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        status, hvd_exit, failed_rank, failed_exit = "start_failed", None, None, None
        log_f = open(log_path, "ab" if self.resume else "wb")
        try:
            try:
                proc = subprocess.Popen(self.cmd.argv, env=self.cmd.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.console.print(f"[red]error:[/] cannot start {self.cmd.argv[0]}: {exc}")
                return self._finish("start_failed", None, None, None, started, metrics, error=str(exc))
            root = psutil.Process(proc.pid)
            self._snapshot(root)
            self._loop(proc, root, metrics, started, log_path)
            hvd_exit = proc.returncode
            if self.stop_signal is not None:
                status = "interrupted"
            elif hvd_exit == 0:
                status = "success"
            else:
                status = "failed"
        finally:
            # whatever happened, no worker outlives the launcher
            leftovers = self._alive_known()
            if leftovers:
                stop_processes(leftovers, grace=GRACE_S if status != "success" else 2.0)
            _reap_zombies()
            log_f.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        metrics.poll()
        if status == "failed":
            rank_logs = rank_log_files(self.run_dir)
            failed_rank, failed_exit = find_failed_rank(_read_tail(str(log_path), 2_000_000), rank_logs)
        return self._finish(status, hvd_exit, failed_rank, failed_exit, started, metrics)

    def _loop(self, proc: subprocess.Popen, root: psutil.Process, metrics: MetricsTail, started: float,
              log_path: Path) -> None:
        epochs = self.res.config.train.epochs
        last_epoch, last_print = None, 0.0
        stream_off = 0
        live = None
        if self.live:
            live = Live(_progress_table(self.res, self.run_dir, metrics, started, "starting"),
                        console=self.console, refresh_per_second=4, transient=False)
            live.start()
        else:
            self.console.print(f"run directory: {self.run_dir}")
        try:
            stopping_since = None
            while True:
                code = proc.poll()
                new = metrics.poll()
                if self.stream:
                    text, nread = _read_from(str(log_path), stream_off)
                    stream_off += nread
                    if text:
                        self.console.out(text, end="", highlight=False)
                if live is not None:
                    state = "running" if new or metrics.records else "starting"
                    if self.stop_signal is not None:
                        state = "stopping"
                    live.update(_progress_table(self.res, self.run_dir, metrics, started, state))
                elif any("step" in r for r in new) and not self.stream:
                    rec = [r for r in new if "step" in r][-1]
                    now = time.time()
                    if rec.get("epoch") != last_epoch or now - last_print > 10:
                        self.console.print(progress_line(rec, epochs), highlight=False)
                        last_epoch, last_print = rec.get("epoch"), now
                if code is not None:
                    break
                if self.stop_signal is not None:
                    if stopping_since is None:
                        stopping_since = time.time()
                        self.console.print(f"[yellow]{signal.Signals(self.stop_signal).name} received: "
                                           f"stopping every rank[/]")
                        self._snapshot(root)
                        stop_processes(self._alive_known(), grace=GRACE_S)
                    if proc.poll() is None and time.time() - stopping_since > GRACE_S:
                        proc.kill()
                    proc.wait(timeout=10)
                    break
                self._snapshot(root)
                time.sleep(POLL_S)
        finally:
            if live is not None:
                live.update(_progress_table(self.res, self.run_dir, metrics, started, "finished"))
                live.stop()

    def _finish(self, status, hvd_exit, failed_rank, failed_exit, started, metrics: MetricsTail,
                error: Optional[str] = None) -> RunResult:
        ended = time.time()
        recs = metrics.records
        steps = [r for r in recs if "step" in r]
        end = next((r for r in reversed(recs) if r.get("event") == "end"), None)
        last = steps[-1] if steps else {}
        bytes_list = [r.get("bytes_sent") for r in steps if isinstance(r.get("bytes_sent"), (int, float))]
        bytes_total = end.get("bytes_sent_total") if end and end.get("bytes_sent_total") is not None else (
            sum(bytes_list) if bytes_list else None)
        final_metrics = dict(last.get("metrics") or {})
        if end and isinstance(end.get("metrics"), dict):
            final_metrics.update(end["metrics"])
        if status == "success":
            code = 0
        elif status == "interrupted":
            code = 128 + int(self.stop_signal or signal.SIGTERM)
        else:
            code = 1
        rank_logs = rank_log_files(self.run_dir)
        summary = {
            "status": status,
            "exit_code": code,
            "horovodrun_exit_code": hvd_exit,
            "failed_rank": failed_rank,
            "failed_rank_exit_code": failed_exit,
            "signal": signal.Signals(self.stop_signal).name if self.stop_signal else None,
            "error": error,
            "job": self.res.job_name,
            "np": self.res.np,
            "hosts": [f"{h}:{s}" for h, s in self.res.hosts],
            "controller": self.res.config.cluster.controller,
            "compression": self.res.config.compression.type,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "duration_s": round(ended - started, 3),
            "records": len(steps),
            "steps": last.get("step"),
            # step lines count epochs from 0; the job's end line says how many it completed
            "epochs": (end or {}).get("epochs", None if last.get("epoch") is None else last["epoch"] + 1),
            "final_loss": last.get("loss"),
            "final_metrics": final_metrics,
            "final": last,
            "end": end,
            "bytes_sent_total": bytes_total,
            "bytes_sent_per_step_mean": (sum(bytes_list) / len(bytes_list)) if bytes_list else None,
            "rank_logs": {str(k): v for k, v in sorted(rank_logs.items())},
            "command": self.cmd.line,
            "resumed": self.resume,
        }
        write_json(self.run_dir / "summary.json", summary)
        self._report(status, summary, rank_logs)
        return RunResult(status=status, exit_code=code, run_dir=self.run_dir, failed_rank=failed_rank,
                         summary=summary)

    def _report(self, status: str, summary: dict, rank_logs: dict) -> None:
        c = self.console
        if status == "success":
            loss = summary["final_loss"]
            extra = ", ".join(f"{k} {_fmt(v)}" for k, v in summary["final_metrics"].items())
            c.print(f"[green]done[/] in {summary['duration_s']:.1f}s: {summary['records']} records"
                    + (f", final loss {_fmt(loss)}" if loss is not None else "")
                    + (f", {extra}" if extra else "")
                    + (f", {fmt_bytes(summary['bytes_sent_total'])} sent" if summary["bytes_sent_total"] else ""),
                    highlight=False)
        elif status == "interrupted":
            c.print(f"[yellow]interrupted[/] ({summary['signal']}): every rank stopped; "
                    f"what was written is kept in {self.run_dir}", highlight=False)
        elif status == "failed":
            r = summary["failed_rank"]
            code = summary["failed_rank_exit_code"]
            if r is not None:
                c.print(f"[red]rank {r} failed[/]" + (f" (exit code {code})" if code is not None else "")
                        + f"; the job was stopped. Run directory kept: {self.run_dir}", highlight=False)
                err = rank_logs.get(r, {}).get("stderr")
                if err:
                    c.print(f"--- last lines of rank {r} stderr ({err}) ---", highlight=False)
                    c.out("\n".join(tail_lines(err, 30)), highlight=False)
                    c.print("---", highlight=False)
            else:
                c.print(f"[red]job failed[/] (horovodrun exit code {summary['horovodrun_exit_code']}); "
                        f"no rank reported a failure. Run directory kept: {self.run_dir}", highlight=False)
                c.print(f"--- last lines of {self.run_dir / 'horovodrun.log'} ---", highlight=False)
                c.out("\n".join(tail_lines(str(self.run_dir / "horovodrun.log"), 30)), highlight=False)
        c.print(f"summary: {self.run_dir / 'summary.json'}", highlight=False)


def _read_from(path: str, offset: int) -> tuple[str, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "", 0
    # only whole lines, so multi-byte characters are not split
    cut = data.rfind(b"\n")
    if cut < 0:
        return "", 0
    return data[: cut + 1].decode("utf-8", "replace"), cut + 1
