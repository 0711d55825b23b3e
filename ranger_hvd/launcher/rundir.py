"""The run directory: ``output.dir/<job.name>/<timestamp>/`` and the files the launcher writes there."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import yaml

from .command import LaunchCommand
from .config import Resolved

TIMESTAMP = "%Y%m%d-%H%M%S"


def planned_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    """Where a run started now would go (pure: creates nothing; used by --dry-run)."""
    stamp = time.strftime(TIMESTAMP, time.localtime(now if now is not None else time.time()))
    return Path(res.config.output.dir) / res.job_name / stamp


def create_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    """Creates a fresh run directory; a second run in the same second gets a '-2', '-3', ... suffix."""
    base = planned_run_dir(res, now)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        cand = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        return cand
    raise RuntimeError(f"cannot create a run directory next to {base}")


def write_config(run_dir: Path, res: Resolved) -> Path:
    path = run_dir / "config.yaml"
    header = "# resolved by ranger-hvd"
    if res.config_path:
        header += f" from {res.config_path}"
    if res.overrides:
        header += " with overrides: " + " ".join(res.overrides)
    path.write_text(header + "\n" + yaml.safe_dump(res.resolved_dict(), sort_keys=False))
    return path


def write_command(run_dir: Path, cmd: LaunchCommand, cwd: Optional[str] = None) -> Path:
    path = run_dir / "command.txt"
    text = cmd.text()
    text += f"# working directory: {cwd or os.getcwd()}\n"
    path.write_text(text)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """All complete JSON lines of a metrics.jsonl (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out
