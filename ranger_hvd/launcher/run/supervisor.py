"""Runs horovodrun for one launch: shows live progress, stops every rank on SIGINT/SIGTERM (see
processes.py) or when ranks stall in different collectives (see stall.py), names the rank that failed
and writes summary.json."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import psutil
from rich.console import Console
from rich.live import Live

from ranger_hvd.launcher.run.command import LaunchCommand, stall_needs_timeline, timeline_path
from ranger_hvd.config import Resolved
from ranger_hvd.launcher.run.processes import GRACE_S, ProcessTree, become_subreaper, reap_zombies, stop_processes
from ranger_hvd.launcher.run.progress import MetricsTail, planned_epochs, progress_line, progress_table
from ranger_hvd.launcher.run.ranklogs import find_failed_rank, rank_log_files, read_tail, read_whole_lines
from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import read_records
from ranger_hvd.launcher.run.rundir import write_json
from ranger_hvd.launcher.run.stall import StallWatch, job_error, start_failure
from ranger_hvd.launcher.run.summary import RunResult, build_summary, failure_cause, print_outcome

POLL_S = 0.25
STALL_POLL_S = 1.0
# After Horovod announces a stall shutdown the ranks normally fail at once; past this the launcher
# stops them itself, so a stall never outlives its limit by more than this.
STALL_EXIT_GRACE_S = 30.0
PRINT_EVERY_S = 10.0    # without a live table: a progress line per epoch, or at least this often


def ran_the_job(records: list[dict]) -> bool:
    """Did this launch's job run: a training step, or its end line (a resumed job with nothing left to do
    writes only that)?  A horovodrun that exits 0 without either started nothing (e.g. an mpirun line
    that failed before the last command of its shell)."""
    return any("step" in r or r.get("event") == layout.END_EVENT for r in records)


class Supervisor:
    def __init__(self, res: Resolved, cmd: LaunchCommand, run_dir: Path, console: Optional[Console] = None,
                 live: Optional[bool] = None, stream: bool = False, resume: bool = False,
                 summary_extra: Optional[dict] = None):
        self.res, self.cmd, self.run_dir = res, cmd, Path(run_dir)
        self.summary_extra = summary_extra or {}   # merged into summary.json (e.g. the restarts so far)
        hv = res.config.horovod
        self.stall = StallWatch(timeline=timeline_path(str(run_dir)) if stall_needs_timeline(res) else None,
                                size=res.np, limit_s=hv.stall_check_shutdown_time_seconds)
        self.stopped_for_stall = False
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
        log_path = self.run_dir / layout.HOROVODRUN_LOG
        metrics = MetricsTail(self.run_dir / layout.METRICS)
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
            elif self.stopped_for_stall:
                status = "failed"
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
        error = None
        user_command = bool(self.res.config.job.command)
        if status == "success" and not ran_the_job(metrics.records) and not user_command:
            status = "failed"
            error = (f"{Path(self.cmd.argv[0]).name} exited 0, but the job wrote no training step and no end "
                     f"line to metrics.jsonl: it never ran (see horovodrun.log)")
        if user_command:   # a script of yours may log nothing (ranger_hvd.run.log): then say so
            self.summary_extra["metrics_logged"] = bool(metrics.steps())
        return self._finish(status, hvd_exit, started, metrics, error=error)

    def _watch(self, proc: subprocess.Popen, root: psutil.Process, metrics: MetricsTail, started: float,
               log_path: Path) -> None:
        """Until horovodrun exits: progress (live table, lines or the ranks' own output) and signals."""
        epochs = planned_epochs(self.res)
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
            next_stall_poll = 0.0
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
                if time.time() >= next_stall_poll:
                    next_stall_poll = time.time() + STALL_POLL_S
                    if self._stalled_past_limit():
                        self.stopped_for_stall = True
                        self.console.print("[red]stalled collective: stopping every rank[/]", highlight=False)
                        self.tree.snapshot(root)
                        stop_processes(self.tree.alive(), grace=GRACE_S)
                        if proc.poll() is None:
                            proc.kill()
                        proc.wait(timeout=10)
                        break
                self.tree.snapshot(root)
                time.sleep(POLL_S)
        finally:
            if live is not None:
                live.update(progress_table(self.res, self.run_dir, metrics, started, "finished"))
                live.stop()

    def _stalled_past_limit(self) -> bool:
        now = time.time()
        self.stall.poll(rank_log_files(self.run_dir), now)
        if self.stall.expired:          # found in the timeline (Gloo): nobody else will end the job
            return True
        seen = self.stall.shutdown_seen_at
        return seen is not None and now - seen > STALL_EXIT_GRACE_S

    def _write_tensorboard(self, started: float) -> Optional[str]:
        """RUN_DIR/tensorboard/ from the whole metrics.jsonl (earlier launches of a resumed run too); a
        failure to write it is a warning, never the run's failure."""
        from ranger_hvd.launcher.run.tensorboard import write_events

        try:
            path = write_events(self.run_dir, read_records(self.run_dir / layout.METRICS).records, started)
        except OSError as exc:
            self.console.print(f"[yellow]warning:[/] TensorBoard events not written: {exc}", highlight=False)
            return None
        return None if path is None else str(path.parent)

    def _finish(self, status: str, hvd_exit: Optional[int], started: float, metrics: MetricsTail,
                error: Optional[str] = None) -> RunResult:
        rank_logs = rank_log_files(self.run_dir)
        failed_rank = failed_exit = None
        if status == "failed":
            log_text = read_tail(str(self.run_dir / layout.HOROVODRUN_LOG), 2_000_000)
            failed_rank, failed_exit = find_failed_rank(log_text, rank_logs)
        stall = cause = None
        if status == "failed":
            stall = self.stall.poll(rank_logs, time.time())
            cause = job_error(rank_logs, prefer_rank=failed_rank)
            error = error or failure_cause(stall, cause, failed_rank, failed_exit,
                                           start_failure(read_tail(str(self.run_dir / layout.HOROVODRUN_LOG), 200_000)))
        summary = build_summary(self.res, status=status, records=metrics.records, started=started,
                                ended=time.time(), hvd_exit=hvd_exit, failed_rank=failed_rank,
                                failed_exit=failed_exit, stop_signal=self.stop_signal, error=error,
                                rank_logs=rank_logs, command=self.cmd.line, resumed=self.resume)
        summary["stall"] = stall.to_json() if stall is not None else None
        summary["job_error"] = None if cause is None else {"rank": cause.rank, "message": cause.message,
                                                           "config": cause.config}
        summary.update(self.summary_extra)
        summary["tensorboard"] = self._write_tensorboard(started)
        write_json(self.run_dir / layout.SUMMARY, summary)
        print_outcome(self.console, summary, self.run_dir, rank_logs)
        return RunResult(status=status, exit_code=summary["exit_code"], run_dir=self.run_dir,
                         failed_rank=failed_rank, summary=summary)
