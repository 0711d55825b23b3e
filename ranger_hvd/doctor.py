"""``ranger-hvd doctor``: what this environment has, and whether it can run ranger_hvd jobs.

Exit status 0 when everything required is present, 1 otherwise. Required: Horovod, at least one
framework, every installed framework built into Horovod, and the Gloo controller (the default). MPI is
reported but optional, since a job can always run on Gloo.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
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


# Run in a child per framework: importing a framework and Horovod's extension for it may crash a
# process (an ABI mismatch), and the two frameworks are imported side by side, not one after another.
_PROBE = """
import importlib, json, sys
framework, extension = sys.argv[1], sys.argv[2]
try:
    out = {"version": str(importlib.import_module(framework).__version__)}
except Exception as exc:
    out = {"broken": f"{type(exc).__name__}: {exc}"[:300]}
else:
    try:
        ext = importlib.import_module(extension)
        out.update(built=True, MPI=bool(ext.mpi_built()), Gloo=bool(ext.gloo_built()))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(out))
"""
FRAMEWORKS = {"PyTorch": ("torch", "horovod.torch"), "TensorFlow": ("tensorflow", "horovod.tensorflow")}


def _installed(module: str) -> bool:
    """Whether ``module`` could be imported here (found, not imported: that is the probe's job)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe_frameworks() -> dict[str, dict]:
    """For each framework, what a fresh process finds: {"version", "built" (Horovod's extension
    for it imports), "MPI", "Gloo"}; {"version", "error"} where Horovod's extension does not import,
    {"broken": why} where the framework itself does not (or the process importing it dies), {}
    where it is not installed."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    children = {}
    for name, (module, extension) in FRAMEWORKS.items():
        if _installed(module):
            children[name] = subprocess.Popen([sys.executable, "-c", _PROBE, module, extension], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found = {name: {} for name in FRAMEWORKS}
    for name, child in children.items():
        try:
            stdout, _ = child.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            found[name] = {"broken": "importing it took over 300 s"}
            continue
        lines = stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            found[name] = json.loads(lines[-1])
        else:   # a crash while importing (a signal: a negative code)
            found[name] = {"broken": f"a process importing it exited with {child.returncode}"}
    return found


def horovod_build(found: dict[str, dict] | None = None) -> dict[str, bool]:
    """What ``horovodrun --check-build`` lists ({'TensorFlow': True, 'PyTorch': True, 'MPI': ...,
    'Gloo': ...}), from :func:`probe_frameworks` (one fresh process per framework, where
    ``--check-build`` forks one per framework and controller and takes four times as long)."""
    found = probe_frameworks() if found is None else found
    built = {name: bool(info.get("built")) for name, info in found.items()}
    for controller in ("MPI", "Gloo"):
        built[controller] = any(info.get(controller) for info in found.values())
    return built


def horovodrun_version() -> str | None:
    horovodrun = Path(sys.executable).with_name("horovodrun")
    exe = str(horovodrun) if horovodrun.exists() else shutil.which("horovodrun")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def horovod_version() -> str | None:
    try:
        import horovod
    except Exception:  # a broken install counts as missing
        return None
    return str(horovod.__version__)


def collect() -> list[Check]:
    checks = [Check("Python", platform.python_version(), sys.version_info >= (3, 10), True)]
    hvd_v = horovod_version()
    found = probe_frameworks()
    versions = {name: info.get("version") for name, info in found.items()}
    for name, info in found.items():   # a broken install counts as missing; the table says why
        checks.append(Check(name, versions[name] or info.get("broken", "not installed"), True, False))
    try:
        keras_v = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        keras_v = None
    checks.append(Check("Keras", keras_v or "not installed", True, False))
    checks.append(Check("at least one framework", "yes" if any(versions.values()) else "no",
                        any(versions.values()), True))
    checks.append(Check("Horovod", hvd_v or "not installed", hvd_v is not None, True))
    built = horovod_build(found) if hvd_v else {}
    if hvd_v:
        runner = horovodrun_version()
        checks.append(Check("horovodrun", runner or "does not run", runner is not None, True))
    for framework, installed in versions.items():
        has = built.get(framework, False)
        if has:
            value = "yes"
        elif not hvd_v:   # the extension's import error would only say it again
            value = "no: Horovod is not installed"
        else:
            value = "no: " + found[framework]["error"] if "error" in found[framework] else "no"
        checks.append(Check(f"Horovod built with {framework}", value, has or not installed, bool(installed)))
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
