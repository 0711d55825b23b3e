"""``ranger-hvd doctor``: what this environment has, and whether it can run ranger_hvd jobs.

Exit status 0 when everything required is present, 1 otherwise. Required: Horovod, at least one
framework, every installed framework built into Horovod, and the Gloo controller (the default). MPI is
reported but optional, since a job can always run on Gloo.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass
class Check:
    name: str
    value: str
    ok: bool
    required: bool


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken install counts as missing; the table shows it
        return None
    return str(getattr(mod, "__version__", "unknown"))


def horovod_build() -> dict[str, bool] | None:
    """Parses ``horovodrun --check-build``: {'TensorFlow': True, 'PyTorch': True, 'MPI': ..., ...}."""
    horovodrun = Path(sys.executable).with_name("horovodrun")
    exe = str(horovodrun) if horovodrun.exists() else shutil.which("horovodrun")
    if exe is None:
        return None
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        out = subprocess.run([exe, "--check-build"], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {name: mark == "X" for mark, name in re.findall(r"\[([X ])\]\s+(\S+)", out.stdout)}


def collect() -> list[Check]:
    checks = [Check("Python", platform.python_version(), sys.version_info >= (3, 10), True)]
    torch_v = _version("torch")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf_v = _version("tensorflow")
    keras_v = _version("keras")
    hvd_v = _version("horovod")
    checks.append(Check("PyTorch", torch_v or "not installed", True, False))
    checks.append(Check("TensorFlow", tf_v or "not installed", True, False))
    checks.append(Check("Keras", keras_v or "not installed", True, False))
    checks.append(Check("at least one framework", "yes" if (torch_v or tf_v) else "no",
                        bool(torch_v or tf_v), True))
    checks.append(Check("Horovod", hvd_v or "not installed", hvd_v is not None, True))
    built = horovod_build() if hvd_v else None
    if hvd_v:
        checks.append(Check("horovodrun --check-build", "ran" if built is not None else "failed",
                            built is not None, True))
    built = built or {}
    for framework, installed in (("PyTorch", torch_v), ("TensorFlow", tf_v)):
        has = built.get(framework, False)
        checks.append(Check(f"Horovod built with {framework}", "yes" if has else "no",
                            has or not installed, bool(installed)))
    checks.append(Check("Horovod built with Gloo", "yes" if built.get("Gloo") else "no",
                        bool(built.get("Gloo")), True))
    checks.append(Check("Horovod built with MPI", "yes" if built.get("MPI") else "no",
                        bool(built.get("MPI")), False))
    mpirun = shutil.which("mpirun")
    checks.append(Check("mpirun", mpirun or "not found", mpirun is not None, False))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ranger-hvd doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = collect()
    failed = [c for c in checks if c.required and not c.ok]
    if args.json:
        import json

        print(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}, indent=2))
    else:
        table = Table(title="ranger-hvd doctor")
        for col in ("check", "found", "status"):
            table.add_column(col)
        for c in checks:
            status = "ok" if c.ok else ("MISSING" if c.required else "warning")
            style = "green" if c.ok else ("bold red" if c.required else "yellow")
            table.add_row(c.name, c.value, f"[{style}]{status}[/]")
        Console().print(table)
        if failed:
            Console(stderr=True).print("[bold red]missing:[/] " + ", ".join(c.name for c in failed)
                                       + " (run launch/setup.sh)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
