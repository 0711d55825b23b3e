"""``ranger-hvd launch`` with ``cluster.scheduler: slurm`` (write the batch script, check it, submit it,
optionally wait) and ``ranger-hvd status RUN_DIR`` (the Slurm job's state and the run's progress)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ranger_hvd.config import Resolved
from ranger_hvd.formatting import clip
from ranger_hvd.launcher.run.launch import remote_paths_problem
from ranger_hvd.launcher.run.progress import MetricsTail, planned_epochs, progress_line
from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import read_json_object, read_records, read_yaml_mapping, section_value
from ranger_hvd.launcher.run.ranklogs import tail_lines
from ranger_hvd.launcher.run.rundir import copy_script, create_run_dir, planned_run_dir, write_config, write_json
from ranger_hvd.launcher.slurm.batch import (ACTIVE_STATES, JOB_FILE, OUTPUT_PATTERN, SCRIPT_NAME, SlurmError, check_with_test_only,
                    default_script, job_state, read_job_file, require, sbatch_argv, script_paths_problem,
                    slurm_options, submit, write_job_file)
from ranger_hvd.config.slurm import bash_syntax_problem

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLL_S = 2.0
# how long a job that Slurm reports as ended may take to leave its summary.json (shared file systems lag)
SUMMARY_GRACE_S = 15.0


def _error(err: Console, message: str) -> None:
    err.print(f"[bold red]ranger-hvd:[/] {message}", highlight=False)


def launch_slurm(res: Resolved, *, dry_run: bool, wait: bool, resume_dir: Optional[Path], out: Console,
                 err: Console) -> int:
    resume = resume_dir is not None
    run_dir = resume_dir.resolve() if resume else planned_run_dir(res).absolute()
    why = script_paths_problem(str(run_dir), os.getcwd())
    if why is None and slurm_options(res).nodes > 1:   # horovodrun reaches the other nodes over ssh
        problem = remote_paths_problem(res.config.cluster.controller, "cluster.slurm.nodes")
        why = str(problem) if problem else None
    if why:
        _error(err, f"{why} (nothing was submitted)")
        return EXIT_USAGE
    if dry_run:
        script = default_script(res, str(run_dir), resume=resume)
        sys.stdout.write(f"# {shlex.join(sbatch_argv(str(run_dir / SCRIPT_NAME)))}\n"
                         f"# {run_dir / SCRIPT_NAME} (--dry-run: nothing written, nothing submitted):\n")
        sys.stdout.write(script)
        sys.stdout.write(f"# run directory (created by a real launch, not by --dry-run): {run_dir}\n")
        return EXIT_OK
    try:
        require("sbatch")
        require("squeue")
        require("scontrol")
        script = default_script(res, str(run_dir), resume=resume)
        why = bash_syntax_problem(script)
        if why:   # cluster.slurm.setup was checked with the config; this is the whole script
            raise SlurmError(f"the batch script is {why}", usage=True)
        # Slurm's own check of partition, account, node count and limits; nothing is submitted
        check_with_test_only(script, slurm_options(res))
    except SlurmError as exc:
        _error(err, f"{exc} (nothing was submitted)")
        return EXIT_USAGE if exc.usage else EXIT_FAILED

    if not resume:
        run_dir = create_run_dir(res).resolve()
    script_path = run_dir / SCRIPT_NAME
    script_path.write_text(default_script(res, str(run_dir), resume=resume))
    write_config(run_dir, res)
    if not resume:
        copy_script(run_dir, res)
    argv = sbatch_argv(str(script_path))
    (run_dir / layout.COMMAND).write_text(
        f"{shlex.join(argv)}\n# the batch script is {script_path}; once the job starts this file holds the "
        f"horovodrun line it runs on the allocation's hosts\n")
    try:
        job_id = submit(script_path)
    except SlurmError as exc:
        _error(err, f"{exc} (nothing was submitted)")
        if not resume:
            shutil.rmtree(run_dir)   # the run directory created above holds nothing of value yet
        return EXIT_FAILED
    write_job_file(run_dir, {"job_id": job_id, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "script": str(script_path), "sbatch": argv,
                             "output": str(run_dir / OUTPUT_PATTERN.replace("%j", job_id)), "resume": resume})
    out.print(f"submitted Slurm job {job_id}", highlight=False)
    out.print(f"run directory: {run_dir}", highlight=False)
    if not wait:
        out.print(f"follow it with: ranger-hvd status {run_dir}   (stop it with: scancel {job_id})", highlight=False)
        return EXIT_OK
    return wait_for_job(run_dir, job_id, planned_epochs(res), out, resume=resume)


def wait_for_job(run_dir: Path, job_id: str, epochs: Optional[int], out: Console, resume: bool = False) -> int:
    """Follows the job until it ends: a progress line per epoch, then the summary's outcome and exit code."""
    summary_path = run_dir / layout.SUMMARY
    old_mtime = summary_path.stat().st_mtime if (resume and summary_path.exists()) else None
    metrics = MetricsTail(run_dir / layout.METRICS)
    if resume and (run_dir / layout.METRICS).exists():
        metrics.offset = (run_dir / layout.METRICS).stat().st_size
    last_state, last_epoch, ended_at = None, None, None
    try:
        while True:
            try:
                state = job_state(job_id)
            except SlurmError as exc:   # a slow or restarting controller: ask again
                out.print(f"[yellow]warning:[/] {exc}", highlight=False)
                time.sleep(POLL_S)
                continue
            if state != last_state:
                out.print(f"Slurm job {job_id}: {state or 'no longer known to Slurm'}", highlight=False)
                last_state = state
            steps = [r for r in metrics.poll() if "step" in r]
            if steps and steps[-1].get("epoch") != last_epoch:
                out.print(progress_line(steps[-1], epochs), highlight=False)
                last_epoch = steps[-1].get("epoch")
            fresh = summary_path.exists() and (old_mtime is None or summary_path.stat().st_mtime != old_mtime)
            if state not in ACTIVE_STATES:
                if fresh:
                    break
                ended_at = ended_at or time.time()
                if not _launcher_ran(run_dir) or time.time() - ended_at > SUMMARY_GRACE_S:
                    return _ended_without_summary(run_dir, job_id, state, out)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        out.print(f"stopped waiting; Slurm job {job_id} goes on (scancel {job_id} stops it)", highlight=False)
        return 130
    steps = [r for r in metrics.poll() if "step" in r]
    if steps and steps[-1].get("epoch") != last_epoch:
        out.print(progress_line(steps[-1], epochs), highlight=False)
    summary, why = read_json_object(summary_path)
    if summary is None:
        out.print(f"[red]cannot read the job's summary:[/] {why}", highlight=False)
        return EXIT_FAILED
    status = summary.get("status")
    colour = "green" if status == "success" else "red"
    out.print(f"[{colour}]{escape(clip(str(status), 40))}[/]: Slurm job {job_id} ({state or 'ended'}); summary: {summary_path}",
              highlight=False)
    code = summary.get("exit_code", EXIT_FAILED)
    return code if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 256 else EXIT_FAILED


def _launcher_ran(run_dir: Path) -> bool:
    """The launcher inside the job replaces command.txt's sbatch line with the horovodrun line it runs."""
    try:
        with open(run_dir / layout.COMMAND, "rb") as fh:
            return fh.read(10) == b"horovodrun"
    except OSError:
        return False


def _ended_without_summary(run_dir: Path, job_id: str, state: Optional[str], out: Console) -> int:
    """The job ended before the launcher in it could write summary.json (cancelled while pending, a setup
    line or module load that failed, a node lost): record that, and show the end of the job's output."""
    output = run_dir / OUTPUT_PATTERN.replace("%j", job_id)
    cancelled = (state or "").startswith("CANCELLED")
    error = (f"Slurm job {job_id} ended ({state or 'state unknown'}) before the launcher in it "
             f"{'started' if not _launcher_ran(run_dir) else 'wrote summary.json'}; see {output}")
    write_json(run_dir / layout.SUMMARY, {"status": "cancelled" if cancelled else "failed",
                                          "exit_code": EXIT_FAILED, "error": error, "rank_logs": {},
                                          "slurm": {"job_id": job_id, "state": state}})
    out.print(f"[red]{error}[/]", highlight=False)
    if output.exists():
        out.print(f"--- last lines of {output} ---", highlight=False)
        out.out("\n".join(tail_lines(str(output), 20)), highlight=False)
    return EXIT_FAILED


def cmd_status(args) -> int:
    out = Console(highlight=False, soft_wrap=True, width=160)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    dirs = [Path(p).absolute() for p in args.run_dirs]
    for d in dirs:
        if not (d / layout.CONFIG).is_file():
            _error(err, f"{d} is not a run directory of ranger-hvd launch (no config.yaml)")
            return EXIT_USAGE
    t = Table(title="ranger-hvd status")
    for col in ("run directory", "Slurm job", "Slurm state", "status", "progress"):
        t.add_column(col)
    notes: list[str] = []
    for d in dirs:
        job, why = read_job_file(d)
        job_id = (job or {}).get("job_id")
        state = "-"
        if job_id:
            try:
                state = job_state(job_id) or "ended (no longer known to Slurm)"
            except SlurmError as exc:
                state = f"unknown: {exc}"
        summary, bad_summary = read_json_object(d / layout.SUMMARY)
        status = _status_text(summary, state)
        metrics = read_records(d / layout.METRICS)
        steps = metrics.steps()
        config, bad_config = read_yaml_mapping(d / layout.CONFIG)
        epochs = section_value(config or {}, "train", "epochs")
        notes += [n for n in (why, bad_summary, bad_config, metrics.note(d / layout.METRICS)) if n]
        t.add_row(str(d), str(job_id or "-"), state, status + (" (damaged)" if bad_summary else ""),
                  progress_line(steps[-1], epochs if isinstance(epochs, int)
                                else None if section_value(config or {}, "job", "command") else "?") if steps else "-")
    out.print(t)
    for note in notes:
        err.print(f"[yellow]warning:[/] {note}", highlight=False)
    return EXIT_OK


def _status_text(summary: Optional[dict], state: str) -> str:
    status = (summary or {}).get("status")
    if isinstance(status, str) and status:
        return clip(status, 40)
    if state in ACTIVE_STATES - {"PENDING"}:
        return "running"
    return "pending" if state == "PENDING" else "no summary"


__all__ = ["launch_slurm", "wait_for_job", "cmd_status", "JOB_FILE"]
