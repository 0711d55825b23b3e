"""One launch: the run directory, its config.yaml and command.txt, then horovodrun under supervision."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console

from ranger_hvd.launcher.run.command import LaunchCommand, default_command
from ranger_hvd.config import ConfigError, Problem, Resolved
from ranger_hvd.formatting import short_repr
from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import read_yaml_mapping, section_value
from ranger_hvd.launcher.run.elastic import write_discovery_files
from ranger_hvd.launcher.run.rundir import copy_script, create_run_dir, planned_run_dir, write_command, write_config
from ranger_hvd.launcher.run.summary import RunResult


def planned_abs_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    return planned_run_dir(res, now).absolute()


def horovodrun_path(cmd: LaunchCommand) -> Optional[str]:
    """Where the command's horovodrun (torchrun, srun: ``argv[0]``) is on its own PATH (None: not installed)."""
    return shutil.which(cmd.argv[0], path=cmd.env.get("PATH"))


def resume_problem(run_dir: Path) -> Optional[str]:
    """Why RUN_DIR cannot be resumed (None if it can): it needs config.yaml and checkpoints/step-*/rank*."""
    from ranger_hvd.rundir.checkpoint import has_any_checkpoint

    if not run_dir.is_dir():
        return f"{run_dir} is not a directory"
    if not (run_dir / layout.CONFIG).is_file():
        return f"{run_dir} has no config.yaml (not a run directory of ranger-hvd launch)"
    config, _ = read_yaml_mapping(run_dir / layout.CONFIG)
    if section_value(config or {}, "job", "command"):   # a user command keeps what it likes there
        from ranger_hvd.launcher.run.restart import user_checkpoint_saved

        if not user_checkpoint_saved(run_dir):
            return (f"{run_dir} has nothing in checkpoints/ (the command saved nothing in "
                    f"ranger_hvd.run.checkpoint_dir())")
        return None
    if not has_any_checkpoint(run_dir):
        return (f"{run_dir} has no checkpoints/step-*/rank* (the run wrote no checkpoint: train.checkpoint "
                f"false, or it stopped before its first epoch ended)")
    return None


def launch_problem(res: Resolved, run_dir: Path) -> Optional[Problem]:
    """What the launch would hand to a shell that no config check could see: the run directory of
    ``--resume`` (Open MPI reads a ':' in ``--output-filename`` as options), and, with remote hosts, this
    interpreter and working directory, which horovodrun pastes unquoted into the ssh lines that start
    the remote side (its host probe under both controllers, the ranks under Gloo)."""
    cl = res.config.cluster
    if cl.controller == "mpi" and ":" in str(run_dir):
        return Problem("output.dir", f"the run directory {short_repr(str(run_dir))} holds ':', which Open MPI's "
                                     "mpirun reads as the start of options in --output-filename")
    from ranger_hvd.launcher.run.preflight import remote_hosts

    if res.hosts and remote_hosts(res):
        if cl.runner == "torchrun":
            key = "cluster.hostfile" if cl.hostfile is not None else "cluster.hosts"
            return Problem(key, f"cluster.runner 'torchrun' starts the ranks on this machine; {res.hosts[0][0]} is "
                                "another host (give localhost, or use cluster.scheduler 'slurm' for other nodes)")
        return remote_paths_problem(cl.controller, "cluster.hosts")
    return None


def remote_paths_problem(controller: str, key: str) -> Optional[Problem]:
    """horovodrun starts other hosts with ssh lines holding this interpreter's path and (Gloo) the working
    directory unquoted: both must be free of spaces and shell characters."""
    paths = [("interpreter", sys.executable)] + ([("working directory", os.getcwd())]
                                                 if controller == "gloo" else [])
    for what, path in paths:
        if shlex.quote(path) != path:
            return Problem(key, f"horovodrun starts other hosts with ssh command lines that hold this {what} "
                                f"unquoted ({short_repr(path)}): use one whose path has no spaces or shell "
                                "characters")
    return None


def launch_one(res: Resolved, console: Console, *, stream: bool = False, live: Optional[bool] = None,
               resume_dir: Optional[Path] = None) -> Optional[RunResult]:
    """Creates the run directory (or reuses ``resume_dir``, passing ``--resume`` to the job) and runs the
    job; returns its RunResult, or None when horovodrun is not installed (nothing is created then).
    Raises PreflightError (nothing created) when a remote host cannot run the job (cluster.preflight)."""
    resume = resume_dir is not None
    planned = resume_dir.resolve() if resume else planned_abs_run_dir(res)
    probe = default_command(res, str(planned), resume=resume)
    exe = horovodrun_path(probe)
    if exe is None:
        console.print(f"[red]error:[/] {probe.argv[0]} not found on PATH ({probe.env.get('PATH')}); "
                      f"build the environment with launch/setup.sh (see ranger-hvd doctor)", highlight=False)
        return None
    problem = launch_problem(res, planned)
    if problem is not None:
        raise ConfigError([problem])      # nothing created or started
    if res.config.cluster.preflight:
        from ranger_hvd.launcher.run.preflight import default_project_root, run_preflight

        checked = run_preflight(res, default_project_root())   # PreflightError: nothing created or started
        if checked:
            console.print(f"preflight: {', '.join(checked)} reachable with this environment", highlight=False)
    run_dir = resume_dir.resolve() if resume else create_run_dir(res).resolve()
    write_config(run_dir, res)
    if not resume:
        copy_script(run_dir, res)
    return run_in_dir(res, run_dir, exe, console, stream=stream, live=live, resume=resume)


def run_in_dir(res: Resolved, run_dir: Path, exe: str, console: Console, *, stream: bool = False,
               live: Optional[bool] = None, resume: bool = False) -> RunResult:
    """Writes command.txt into ``run_dir`` (which holds config.yaml) and runs the job there with the
    horovodrun at ``exe``: a local launch, and the launcher inside a Slurm allocation."""
    from ranger_hvd.launcher.run.supervisor import Supervisor

    cmd = default_command(res, str(run_dir), resume=resume)
    write_discovery_files(run_dir, res)
    write_command(run_dir, cmd)
    for name in cmd.missing_env:
        console.print(f"[yellow]warning:[/] cluster.env: {name} is not set here, so the ranks do not get it",
                      highlight=False)

    def runnable(with_resume: bool) -> LaunchCommand:
        c = default_command(res, str(run_dir), resume=with_resume)
        return LaunchCommand(argv=[exe, *c.argv[1:]], env=c.env, missing_env=c.missing_env)

    if res.config.train.max_restarts:
        from ranger_hvd.launcher.run.restart import run_with_restarts

        return run_with_restarts(res, runnable, run_dir, console=console, live=live, stream=stream, resume=resume)
    return Supervisor(res, runnable(resume), run_dir, console=console, live=live, stream=stream, resume=resume).run()
