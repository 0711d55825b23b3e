"""Runs horovodrun for one launch: shows live progress, stops every rank on SIGINT/SIGTERM (see
processes.py), names the rank that failed and writes summary.json."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import psutil
from rich.console import Console
from rich.live import Live

from .command import LaunchCommand
from .config import Resolved
from .processes import GRACE_S, ProcessTree, become_subreaper, reap_zombies, stop_processes
from .progress import MetricsTail, progress_line, progress_table
from .ranklogs import find_failed_rank, rank_log_files, read_tail, read_whole_lines
from .rundir import write_json
from .summary import RunResult, build_summary, print_outcome

POLL_S = 0.25
PRINT_EVERY_S = 10.0    # without a live table: a progress line per epoch, or at least this often


class Supervisor:
    def __init__(self, res: Resolved, cmd: LaunchCommand, run_dir: Path, console: Optional[Console] = None,
                 live: Optional[bool] = None, stream: bool = False, resume: bool = False):
        self.res, self.cmd, self.run_dir = res, cmd, Path(run_dir)
        self.resume = resume   # launch --resume: metrics.jsonl already holds the earlier runs' lines
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.stream = stream
        self.stop_signal: Optional[int] = None
        self.tree: Optional[ProcessTree] = None

    def _on_signal(self, signum, _frame):
        self.stop_signal = signum

    def run(self) -> RunResult:
        become_subreaper()
        self.tree = ProcessTree()
        log_path = self.run_dir / "horovodrun.log"
        metrics = MetricsTail(self.run_dir / "metrics.jsonl")
        if self.resume:   # progress and summary describe this launch
            metrics.skip_existing()
        started = time.time()
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        status, hvd_exit = "start_failed", None
        log_f = open(log_path, "ab" if self.resume else "wb")
        try:
            try:
                proc = subprocess.Popen(self.cmd.argv, env=self.cmd.env, stdin=subprocess.DEVNULL,
                                        stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.console.print(f"[red]error:[/] cannot start {self.cmd.argv[0]}: {exc}")
                return self._finish("start_failed", None, started, metrics, error=str(exc))
            root = psutil.Process(proc.pid)
            self.tree.snapshot(root)
            self._watch(proc, root, metrics, started, log_path)
            hvd_exit = proc.returncode
            if self.stop_signal is not None:
                status = "interrupted"
            else:
                status = "success" if hvd_exit == 0 else "failed"
        finally:
            # whatever happened, no worker outlives the launcher
            leftovers = self.tree.alive()
            if leftovers:
                stop_processes(leftovers, grace=GRACE_S if status != "success" else 2.0)
            reap_zombies()
            log_f.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        metrics.poll()
        return self._finish(status, hvd_exit, started, metrics)

    def _watch(self, proc: subprocess.Popen, root: psutil.Process, metrics: MetricsTail, started: float,
               log_path: Path) -> None:
        """Until horovodrun exits: progress (live table, lines or the ranks' own output) and signals."""
        epochs = self.res.config.train.epochs
        last_epoch, last_print = None, 0.0
        stream_offset = 0
        live = None
        if self.live:
            live = Live(progress_table(self.res, self.run_dir, metrics, started, "starting"),
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
                    text, nread = read_whole_lines(str(log_path), stream_offset)
                    stream_offset += nread
                    if text:
                        self.console.out(text, end="", highlight=False)
                if live is not None:
                    state = "running" if metrics.records else "starting"
                    if self.stop_signal is not None:
                        state = "stopping"
                    live.update(progress_table(self.res, self.run_dir, metrics, started, state))
                elif any("step" in r for r in new) and not self.stream:
                    rec = [r for r in new if "step" in r][-1]
                    now = time.time()
                    if rec.get("epoch") != last_epoch or now - last_print > PRINT_EVERY_S:
                        self.console.print(progress_line(rec, epochs), highlight=False)
                        last_epoch, last_print = rec.get("epoch"), now
                if code is not None:
                    break
                if self.stop_signal is not None:
                    if stopping_since is None:
                        stopping_since = time.time()
                        self.console.print(f"[yellow]{signal.Signals(self.stop_signal).name} received: "
                                           f"stopping every rank[/]")
                        self.tree.snapshot(root)
                        stop_processes(self.tree.alive(), grace=GRACE_S)
                    if proc.poll() is None and time.time() - stopping_since > GRACE_S:
                        proc.kill()
                    proc.wait(timeout=10)
                    break
                self.tree.snapshot(root)
                time.sleep(POLL_S)
        finally:
            if live is not None:
                live.update(progress_table(self.res, self.run_dir, metrics, started, "finished"))
                live.stop()

    def _finish(self, status: str, hvd_exit: Optional[int], started: float, metrics: MetricsTail,
                error: Optional[str] = None) -> RunResult:
        rank_logs = rank_log_files(self.run_dir)
        failed_rank = failed_exit = None
        if status == "failed":
            log_text = read_tail(str(self.run_dir / "horovodrun.log"), 2_000_000)
            failed_rank, failed_exit = find_failed_rank(log_text, rank_logs)
        summary = build_summary(self.res, status=status, records=metrics.records, started=started,
                                ended=time.time(), hvd_exit=hvd_exit, failed_rank=failed_rank,
                                failed_exit=failed_exit, stop_signal=self.stop_signal, error=error,
                                rank_logs=rank_logs, command=self.cmd.line, resumed=self.resume)
        write_json(self.run_dir / "summary.json", summary)
        print_outcome(self.console, summary, self.run_dir, rank_logs)
        return RunResult(status=status, exit_code=summary["exit_code"], run_dir=self.run_dir,
                         failed_rank=failed_rank, summary=summary)
