"""The run directory: ``output.dir/<job.name>/<timestamp>/`` and the files the launcher writes there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from ranger_hvd.launcher.run.command import LaunchCommand
from ranger_hvd.config import Resolved
from ranger_hvd.rundir import layout

TIMESTAMP = "%Y%m%d-%H%M%S"
REPORTS_DIR = "_reports"


def planned_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    """Where a run started now would go (pure: creates nothing; used by --dry-run)."""
    stamp = time.strftime(TIMESTAMP, time.localtime(now if now is not None else time.time()))
    return Path(res.config.output.dir) / res.job_name / stamp


class RunDirError(OSError):
    """The run directory cannot be created (nothing was left behind)."""


def create_unique_dir(base: Path) -> Path:
    """Creates ``base``, or ``base-2``, ``base-3``, ... when it exists (two runs in the same second).
    On failure the parent directories it created are removed again and RunDirError says why."""
    made: list[Path] = []
    try:
        for parent in reversed([base.parent, *base.parent.parents]):
            if not parent.is_dir():
                parent.mkdir()
                made.append(parent)
        for i in range(1, 1000):
            cand = base if i == 1 else base.with_name(f"{base.name}-{i}")
            try:
                cand.mkdir()
            except FileExistsError:
                continue
            return cand
        raise RunDirError(f"cannot create a directory next to {base}: 999 exist")
    except OSError as exc:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(exc, RunDirError):
            raise
        raise RunDirError(f"cannot create {exc.filename or base}: {exc.strerror or exc}") from None


def create_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    """Creates a fresh run directory ``output.dir/<job.name>/<timestamp>``."""
    return create_unique_dir(planned_run_dir(res, now))


def create_report_dir(output_dir: Path, suffix: str = "", now: Optional[float] = None) -> Path:
    """``output.dir/_reports/<timestamp><suffix>``: comparisons of several runs, apart from every run (job
    names cannot start with '_', so this never is a job's directory)."""
    stamp = time.strftime(TIMESTAMP, time.localtime(now if now is not None else time.time()))
    return create_unique_dir(Path(output_dir) / REPORTS_DIR / f"{stamp}{suffix}")


def write_config(run_dir: Path, res: Resolved) -> Path:
    path = run_dir / layout.CONFIG
    header = "# resolved by ranger-hvd"
    if res.config_path:
        header += f" from {res.config_path}"
    if res.overrides:
        header += " with overrides: " + " ".join(res.overrides)
    if res.inactive:
        header += "\n# left out, inactive: " + ", ".join(f"{o.path}={o.value} ({o.reason})" for o in res.inactive)
    path.write_text(header + "\n" + yaml.safe_dump(res.resolved_dict(), sort_keys=False))
    return path




def copy_script(run_dir: Path, res: Resolved) -> Optional[Path]:
    """A user command's script (job.command), copied into ``RUN_DIR/script/`` with a line naming its origin
    and sha256 in ``RUN_DIR/script/SOURCE``, so the run can be reproduced.  The ranks run the original
    (modules beside it stay importable); None when there is no script (a reference job, ``python -m``)."""
    from ranger_hvd.config.user_command import script_of

    src = script_of(res.config.job.command)
    if src is None:
        return None
    dest_dir = Path(run_dir) / layout.SCRIPT_DIR
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / Path(src).name
    shutil.copyfile(src, dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    (dest_dir / layout.SCRIPT_SOURCE).write_text(f"{src} sha256 {digest}\n")
    return dest


def write_command(run_dir: Path, cmd: LaunchCommand) -> Path:
    path = run_dir / layout.COMMAND
    text = cmd.text()
    text += f"# working directory: {os.getcwd()}\n"
    path.write_text(text)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)

