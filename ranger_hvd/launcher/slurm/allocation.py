"""Runs inside a Slurm allocation (the last line of ``RUN_DIR/job.sbatch``)::

    python -m ranger_hvd.launcher.slurm.allocation RUN_DIR [--resume]

Takes the hosts and slots from Slurm's environment, writes ``command.txt``, runs ``horovodrun`` under
the same supervisor as a local launch (per-rank logs, ``metrics.jsonl``, ``summary.json``) and adds a
``slurm`` section to the summary.  Slurm ends a job (scancel, time limit) by sending SIGTERM to all its
processes; the supervisor then stops every rank, and the summary's status says ``cancelled`` or
``timeout`` instead of ``interrupted``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from ranger_hvd.launcher.run.command import default_command
from ranger_hvd.config import ConfigError, load_config
from ranger_hvd.launcher.run.launch import horovodrun_path, run_in_dir
from ranger_hvd.launcher.run.rundir import write_json
from ranger_hvd.launcher.slurm.batch import SlurmError, allocation_from_env, job_end_time
from ranger_hvd.rundir import layout

EXIT_USAGE = 2
# a SIGTERM this close to the time limit (seconds) is the time limit, not scancel
TIME_LIMIT_SLACK_S = 15


def _start_failed(run_dir: Path, console: Console, message: str, slurm: dict, code: int) -> int:
    console.print(f"[red]ranger-hvd (Slurm job {slurm.get('job_id')}):[/] {message}", highlight=False)
    write_json(run_dir / layout.SUMMARY, {"status": "start_failed", "exit_code": code, "error": message,
                                          "slurm": slurm, "rank_logs": {}})
    return code


def ended_by(signal_name: Optional[str], end_time: Optional[float], now: float) -> Optional[str]:
    """What a signal inside the allocation means: 'timeout' near the time limit, else 'cancelled'."""
    if signal_name != "SIGTERM":
        return None
    if end_time is not None and now >= end_time - TIME_LIMIT_SLACK_S:
        return "timeout"
    return "cancelled"


def run(run_dir: Path, resume: bool, console: Console) -> int:
    environ = dict(os.environ)
    slurm = {"job_id": environ.get("SLURM_JOB_ID"), "nodelist": environ.get("SLURM_JOB_NODELIST"),
             "partition": environ.get("SLURM_JOB_PARTITION"), "tasks_per_node": environ.get("SLURM_TASKS_PER_NODE")}
    try:
        res = load_config(run_dir / layout.CONFIG)
    except ConfigError as exc:
        return _start_failed(run_dir, console, f"invalid {run_dir / layout.CONFIG}: {exc}", slurm, EXIT_USAGE)
    try:
        alloc = allocation_from_env(environ)
    except SlurmError as exc:
        return _start_failed(run_dir, console, str(exc), slurm, EXIT_USAGE)
    slots = sum(n for _, n in alloc.hosts)
    slurm["hosts"] = [f"{h}:{n}" for h, n in alloc.hosts]
    if res.np > slots:
        return _start_failed(run_dir, console, f"cluster.np: {res.np} ranks do not fit in the {slots} tasks of "
                                               f"the allocation ({','.join(slurm['hosts'])})", slurm, EXIT_USAGE)
    try:
        end_time = job_end_time(alloc.job_id)
    except SlurmError:
        end_time = None
    res.hosts = alloc.hosts
    probe = default_command(res, str(run_dir), resume=resume)
    exe = horovodrun_path(probe)
    if exe is None:
        return _start_failed(run_dir, console, f"{probe.argv[0]} not found on PATH ({probe.env.get('PATH')}) on node "
                                               f"{os.uname().nodename}", slurm, 1)
    console.print(f"Slurm job {alloc.job_id}: {res.np} ranks on {','.join(slurm['hosts'])}", highlight=False)
    result = run_in_dir(res, run_dir, exe, console, live=False, resume=resume)

    summary = dict(result.summary)
    how = ended_by(summary.get("signal"), end_time, time.time()) if result.status == "interrupted" else None
    if how is not None:
        summary["status"] = how
        console.print(f"Slurm ended the job ({'time limit' if how == 'timeout' else 'scancel'}): every rank "
                      f"was stopped; summary status '{how}'", highlight=False)
    slurm["ended_by"] = {"cancelled": "scancel", "timeout": "time limit"}.get(how or "")
    summary["slurm"] = slurm
    write_json(run_dir / layout.SUMMARY, summary)
    return result.exit_code


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ranger_hvd.launcher.slurm.allocation",
                                description="run a ranger-hvd job inside its Slurm allocation")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints")
    args = p.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True, width=160)
    return run(Path(args.run_dir).resolve(), args.resume, console)


if __name__ == "__main__":
    sys.exit(main())
