"""A launch's outcome: the ``summary.json`` record, and the lines that tell the user what happened."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console

from ranger_hvd.config import Resolved
from ranger_hvd.launcher.run.elastic import elastic_summary
from ranger_hvd.formatting import fmt_bytes, fmt_value
from ranger_hvd.launcher.run.ranklogs import tail_lines
from ranger_hvd.rundir import layout

STATUSES = ("success", "failed", "interrupted", "start_failed")


@dataclass
class RunResult:
    status: str                     # one of STATUSES
    exit_code: int                  # the launcher's exit status (0, 1, 128+signal)
    run_dir: Path
    failed_rank: Optional[int] = None
    summary: dict = field(default_factory=dict)


def exit_code_of(status: str, stop_signal: Optional[int]) -> int:
    if status == "success":
        return 0
    if status == "interrupted":
        return 128 + int(stop_signal or signal.SIGTERM)
    return 1


def build_summary(res: Resolved, *, status: str, records: list[dict], started: float, ended: float,
                  hvd_exit: Optional[int], failed_rank: Optional[int], failed_exit: Optional[int],
                  stop_signal: Optional[int], error: Optional[str], rank_logs: dict, command: str,
                  resumed: bool) -> dict:
    """The summary.json record of one launch, from the metrics lines it wrote."""
    steps = [r for r in records if "step" in r]
    end = next((r for r in reversed(records) if r.get("event") == layout.END_EVENT), None)
    last = steps[-1] if steps else {}
    bytes_list = [r.get("bytes_sent") for r in steps if isinstance(r.get("bytes_sent"), (int, float))]
    bytes_total = end.get("bytes_sent_total") if end and end.get("bytes_sent_total") is not None else (
        _bytes_over_steps(steps) if bytes_list else None)
    final_metrics = dict(last.get("metrics") or {})
    if end and isinstance(end.get("metrics"), dict):
        final_metrics.update(end["metrics"])
    return {
        "status": status,
        "exit_code": exit_code_of(status, stop_signal),
        "horovodrun_exit_code": hvd_exit,     # the exit code of the runner's process (torchrun, srun too)
        "failed_rank": failed_rank,
        "failed_rank_exit_code": failed_exit,
        "signal": signal.Signals(stop_signal).name if stop_signal else None,
        "error": error,
        "job": res.job_name,
        "np": res.np,
        "hosts": [f"{h}:{s}" for h, s in res.hosts],
        "controller": res.config.cluster.controller,
        "runner": res.config.cluster.runner,
        "compression": res.config.compression.type,
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
        "command": command,
        "resumed": resumed,
        "elastic": elastic_summary(res, records),
    }


def _bytes_over_steps(steps: list[dict]) -> float:
    """Bytes sent in all, from step records whose ``bytes_sent`` is per step: each record stands for the
    steps since the record before it (a record every N steps, as ``ranger_hvd.run.log`` may write)."""
    total, prev = 0, None
    for r in steps:
        b = r.get("bytes_sent")
        if isinstance(b, (int, float)):
            gap = r["step"] - prev if isinstance(r.get("step"), int) and isinstance(prev, int) and r["step"] > prev else 1
            total += b * gap
        prev = r.get("step")
    return total


def failure_cause(stall, cause, failed_rank: Optional[int], failed_exit: Optional[int],
                  start_error: Optional[str] = None) -> Optional[str]:
    """Why a launch failed, in one line: a stall Horovod or the launcher ended, the signal that killed
    the failed rank, the job's own error line, or why it never started on a host (see stall.py)."""
    if stall is not None and stall.shutdown:
        return stall.message()
    if failed_rank is not None and failed_exit is not None and (failed_exit > 128 or failed_exit < 0):
        try:
            name = signal.Signals(failed_exit - 128 if failed_exit > 128 else -failed_exit).name
            return f"rank {failed_rank} was killed by {name}"
        except ValueError:
            pass
    if cause is not None:
        return str(cause)
    if stall is not None:
        return stall.message()
    return start_error


def print_outcome(console: Console, summary: dict, run_dir: Path, rank_logs: dict) -> None:
    """What happened, in a few lines; for a failure, the failed rank's last stderr lines."""
    c, status = console, summary["status"]
    if summary.get("metrics_logged") is False:
        c.print("[yellow]no metrics were logged[/]: the command wrote no step record to metrics.jsonl "
                "(call ranger_hvd.run.log(step, loss=..., ...) on rank 0 to have progress, report and sweep)",
                highlight=False)
    if status == "success":
        loss = summary["final_loss"]
        extra = ", ".join(f"{k} {fmt_value(v)}" for k, v in summary["final_metrics"].items())
        c.print(f"[green]done[/] in {summary['duration_s']:.1f}s: {summary['records']} records"
                + (f", final loss {fmt_value(loss)}" if loss is not None else "")
                + (f", {extra}" if extra else "")
                + (f", {fmt_bytes(summary['bytes_sent_total'])} sent" if summary["bytes_sent_total"] else ""),
                highlight=False)
    elif status == "interrupted":
        c.print(f"[yellow]interrupted[/] ({summary['signal']}): every rank stopped; "
                f"what was written is kept in {run_dir}", highlight=False)
    elif status == "failed":
        if summary.get("stall") is not None:
            c.print(f"[red]stalled:[/] {summary['error']}", highlight=False)
        r, code = summary["failed_rank"], summary["failed_rank_exit_code"]
        if r is not None:
            c.print(f"[red]rank {r} failed[/]" + (f" (exit code {code})" if code is not None else "")
                    + f"; the job was stopped. Run directory kept: {run_dir}", highlight=False)
            err = rank_logs.get(r, {}).get("stderr")
            if err:
                c.print(f"--- last lines of rank {r} stderr ({err}) ---", highlight=False)
                c.out("\n".join(tail_lines(err, 30)), highlight=False)
                c.print("---", highlight=False)
        else:
            c.print(f"[red]job failed[/] ({summary.get('runner', 'horovodrun')} exit code "
                    f"{summary['horovodrun_exit_code']}); "
                    f"no rank reported a failure. Run directory kept: {run_dir}", highlight=False)
            if summary.get("error"):
                c.print(f"[red]cause:[/] {summary['error']}", highlight=False)
            c.print(f"--- last lines of {run_dir / layout.HOROVODRUN_LOG} ---", highlight=False)
            c.out("\n".join(tail_lines(str(run_dir / layout.HOROVODRUN_LOG), 30)), highlight=False)
    c.print(f"summary: {run_dir / layout.SUMMARY}", highlight=False)
