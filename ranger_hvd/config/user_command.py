"""``job.command``: your own training program instead of a reference job.

The command is a list of arguments (never a shell string).  Its first item ``python`` stands for the
run's interpreter (the launcher's ``sys.executable``, the one every rank runs); the script it runs (the
first argument that is not an option; none for ``python -m MODULE``) or a program given by path is
resolved against the config file's folder and must be a regular file.  A program given by name only
(``[torchrun_wrapper, ...]``) must be on ``PATH``.

Only the keys the launcher itself uses apply to a user command: ``train.max_restarts`` of the ``train``
section, nothing of ``data`` and ``gan``, and neither ``job.model`` nor ``job.entry`` (they choose a
reference job).  Any of them given is an error naming the key; the run's ``config.yaml`` leaves those
sections out.

The arguments reach the program unchanged: horovodrun 0.28.1 quotes the job's own command line itself
(``shlex.quote`` of each item) before it pastes it into its ``sh -c`` lines, under Gloo and MPI, so the
launcher passes them as they are (quoting them again would hand the program the quotes); see
:mod:`ranger_hvd.launcher.quoting`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from ranger_hvd.config.problems import Problem, short_repr

PYTHON = "python"
# what a user command may set of the sections that configure the reference jobs
LAUNCHER_TRAIN_KEYS = ("max_restarts",)
JOB_ONLY_SECTIONS = ("data", "gan")
JOB_ONLY_KEYS = ("job.model", "job.entry")

Where = Callable[[str], str]


def command_item_problem(value) -> Optional[str]:
    """Why ``value`` is not a usable ``job.command`` (None: it is): the schema's before-check, so that a
    shell string or a number says what to write instead."""
    if isinstance(value, str):
        return (f"must be a list of arguments, one string each, e.g. [python, train.py, --lr, '0.1'], not a "
                f"shell string ({short_repr(value)}): nothing is split or run by a shell")
    if not isinstance(value, list):
        return None          # the schema's own type error
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return (f"item {i} is {short_repr(item)} ({type(item).__name__}): every argument must be a "
                    f"string (quote numbers in YAML: '0.1')")
    if value and not value[0]:
        return "the program (item 0) is empty"
    return None


def script_index(command: list[str]) -> Optional[int]:
    """Which item is the file the command runs: the program itself (0), or with ``python`` its script
    (the first argument that is not an option); None for ``python -m MODULE``, ``python -c CODE`` or a
    program looked up on PATH."""
    if command[0] != PYTHON:
        return 0 if "/" in command[0] else None
    skip = False
    for i, arg in enumerate(command[1:], start=1):
        if skip:                       # the value of -W / -X
            skip = False
            continue
        if arg == "-" or arg in ("-m", "-c") or (arg[:2] in ("-m", "-c") and len(arg) > 2):
            return None
        if arg in ("-W", "-X"):
            skip = True
        elif not arg.startswith("-"):
            return i
    return None


def default_name(command: list[str]) -> str:
    """The run's name when job.name is not set: the script's (or program's, or module's) name."""
    idx = script_index(command)
    if idx is not None:
        base = Path(command[idx]).stem
    elif command[0] == PYTHON and "-m" in command[1:-1]:
        base = command[command.index("-m", 1) + 1]
    else:
        base = Path(command[0]).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("._-")[:100]
    return name or "command"


def given_keys(where: Where) -> list[str]:
    """The dotted keys given in the file or as overrides (not defaults), when ``where`` knows them."""
    return sorted(set(getattr(where, "lines", {})) | set(getattr(where, "override_keys", ())))


def check_user_command(cfg, where: Where) -> list[Problem]:
    """A user command: keys that configure only the reference jobs are errors, naming each."""
    if not cfg.job.command:
        return []
    why = "means nothing for a user command (job.command): it configures the reference jobs"
    problems = []
    keys = given_keys(where)
    for key in keys:
        if any(k.startswith(key + ".") for k in keys):
            continue                    # a section: its keys are named
        section, _, rest = key.partition(".")
        if (key in JOB_ONLY_KEYS or section in JOB_ONLY_SECTIONS
                or (section == "train" and rest and rest.split(".")[0] not in LAUNCHER_TRAIN_KEYS)):
            problems.append(Problem(key, why, where(key)))
    return problems


def resolve_command(command: list[str], base_dir: Path, where: Where) -> tuple[list[str], list[Problem]]:
    """The command with its script (or program path) absolute, resolved against ``base_dir`` (the
    config file's folder); a problem when that file is missing, or a program is not on PATH."""
    idx = script_index(command)
    if idx is None:
        if command[0] != PYTHON and shutil.which(command[0]) is None:
            return command, [Problem("job.command[0]", f"program {short_repr(command[0])} is not on PATH "
                                     "(give its path, or [python, script.py, ...])", where("job.command"))]
        return command, []
    raw = os.path.expanduser(command[idx])
    path = Path(os.path.normpath(raw if os.path.isabs(raw) else base_dir / raw))
    if not path.is_file():
        what = "script" if command[0] == PYTHON else "program"
        state = "is not a regular file" if path.exists() else "does not exist"
        return command, [Problem(f"job.command[{idx}]", f"{what} {path} {state} (a relative path is relative to "
                                 f"the config file's folder, {base_dir})", where("job.command"))]
    if idx == 0 and not os.access(path, os.X_OK):
        return command, [Problem("job.command[0]", f"program {path} is not executable", where("job.command"))]
    out = list(command)
    out[idx] = str(path)
    return out, []


def command_argv(command: list[str], python: str) -> list[str]:
    """The argv every rank runs: ``python`` replaced by the run's interpreter, nothing else changed."""
    return [python if i == 0 and arg == PYTHON else arg for i, arg in enumerate(command)]


def script_of(command: Optional[list[str]]) -> Optional[str]:
    """The file the command runs (absolute once resolved), or None."""
    if not command:
        return None
    idx = script_index(command)
    return None if idx is None else command[idx]


def drop_job_only(d: dict) -> dict:
    """A user command's resolved config as plain data without what configures only the reference jobs."""
    d = dict(d)
    d["job"] = {k: v for k, v in d["job"].items() if f"job.{k}" not in JOB_ONLY_KEYS}
    d["train"] = {k: v for k, v in d["train"].items() if k in LAUNCHER_TRAIN_KEYS}
    for section in JOB_ONLY_SECTIONS:
        d.pop(section, None)
    return d
