"""Automatic restart (``train.max_restarts``): when a rank dies, run the job again from the last complete
checkpoint set, up to the limit, and record each restart in summary.json.

Between attempts the failed attempt's rank logs move to ``RUN_DIR/logs.attempt-N`` (the next attempt
writes fresh ones under ``logs/``) and ``horovodrun.log`` is appended to. The job itself picks the
checkpoint: with ``--resume`` the ranks agree on the latest set that every rank holds (see
:mod:`ranger_hvd.rundir.checkpoint`), so a set torn by the crash is never loaded. With no checkpoint at
all the job starts over, and the failed attempt's ``metrics.jsonl`` moves to
``metrics.attempt-N.jsonl``.

Not restarted: a run stopped by a signal, and a job that failed on its config, data or checkpoint
(``ranger_hvd.jobs (rank R): error: ...``): the same error would come back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from ranger_hvd.rundir import layout
from ranger_hvd.rundir.checkpoint import checkpoint_root, complete_steps, has_any_checkpoint

from ranger_hvd.launcher.run.command import LaunchCommand
from ranger_hvd.config import Resolved
from ranger_hvd.launcher.run.rundir import write_json
from ranger_hvd.rundir.records import read_records
from ranger_hvd.launcher.run.summary import RunResult
from ranger_hvd.launcher.run.supervisor import Supervisor

RESTART_PAUSE_S = 1.0


def _rotate(path: Path, attempt: int) -> Optional[str]:
    """Moves PATH aside as PATH.attempt-N (logs) or NAME.attempt-N.SUFFIX (files); returns the new path."""
    if not path.exists():
        return None
    target = (path.with_name(f"{path.stem}.attempt-{attempt}{path.suffix}") if path.is_file()
              else path.with_name(f"{path.name}.attempt-{attempt}"))
    os.replace(path, target)
    return str(target)


def _last_resume_step(run_dir: Path) -> Optional[int]:
    """``from_step`` of the last ``{"event": "resume"}`` line in metrics.jsonl (None if there is none)."""
    for rec in reversed(read_records(run_dir / layout.METRICS).records):
        if rec.get("event") == layout.RESUME_EVENT:
            return rec.get("from_step")
    return None


def run_with_restarts(res: Resolved, command_for: Callable[[bool], LaunchCommand], run_dir: Path, *,
                      console: Console, live: Optional[bool], stream: bool, resume: bool) -> RunResult:
    """Runs the job (``command_for(resume)`` gives its command), restarting it after a rank failure."""
    limit = res.config.train.max_restarts
    backend = res.config.job.backend
    restarts: list[dict] = []
    attempt_resume = resume
    while True:
        extra = {"max_restarts": limit, "restarts": restarts}
        sup = Supervisor(res, command_for(attempt_resume), run_dir, console=console, live=live, stream=stream,
                         resume=attempt_resume or bool(restarts), summary_extra=extra)
        result = sup.run()
        if restarts and restarts[-1]["resumed"]:
            restarts[-1]["resumed_from_step"] = _last_resume_step(run_dir)
            _rewrite_summary(run_dir, result, extra)
        if result.status != "failed" or len(restarts) >= limit:
            return result
        cause = result.summary.get("job_error")
        if cause and cause.get("config"):
            console.print(f"[yellow]not restarting:[/] rank {cause['rank']} failed on its config, data or "
                          f"checkpoint, which a restart would not change", highlight=False)
            return result

        attempt = len(restarts) + 1
        user_command = bool(res.config.job.command)
        # a user command's checkpoints are whatever its script keeps in ranger_hvd.run.checkpoint_dir()
        from_checkpoint = user_checkpoint_saved(run_dir) if user_command else has_any_checkpoint(run_dir)
        record = {
            "attempt": attempt,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "failed_rank": result.failed_rank,
            "failed_rank_exit_code": result.summary.get("failed_rank_exit_code"),
            "error": result.summary.get("error"),
            "steps_logged": result.summary.get("steps"),
            "resumed": from_checkpoint,
            # the latest set complete as seen from here (the job confirms it across hosts on resume)
            "checkpoint_step": ((complete_steps(run_dir, res.np, backend) or [None])[-1]
                                if from_checkpoint and not user_command else None),
            "logs": _rotate(run_dir / layout.RANK_LOGS, attempt),
            "metrics": None if from_checkpoint else _rotate(run_dir / layout.METRICS, attempt),
        }
        restarts.append(record)
        what = (f"from the checkpoint of step {record['checkpoint_step']}" if record["checkpoint_step"] is not None
                else "from the latest complete checkpoint" if from_checkpoint else "from the start (no checkpoint yet)")
        console.print(f"[yellow]restart {attempt}/{limit}:[/] rank {result.failed_rank} failed; starting again "
                      f"{what}", highlight=False)
        attempt_resume = from_checkpoint
        time.sleep(RESTART_PAUSE_S)


def user_checkpoint_saved(run_dir: Path) -> bool:
    """Did a user command leave anything in its checkpoint directory (``RUN_DIR/checkpoints``)?"""
    ckpt = checkpoint_root(run_dir)
    return ckpt.is_dir() and any(ckpt.iterdir())


def _rewrite_summary(run_dir: Path, result: RunResult, extra: dict) -> None:
    result.summary.update(extra)
    write_json(run_dir / layout.SUMMARY, result.summary)
