"""Runs a worker script under the real ``horovodrun`` and collects what each rank reports.

A worker writes one JSON file per rank into the directory given by ``RANGER_TEST_OUT`` (use
``report(...)`` below), so a single launch can check many things and the test asserts on each.
Launching is the slow part (process start, framework import), so tests batch their checks per launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HOROVODRUN = str(VENV_BIN / "horovodrun")

# Open MPI refuses to start as root without these; harmless for Gloo.
MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(MPI_ROOT_ENV)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on two cores: no oversubscription
    env.update(extra or {})
    return env


def run_workers(script: str | Path, out_dir: Path, np: int = 2, controller: str = "gloo",
                args: list[str] | None = None, env: dict | None = None,
                timeout: float = 300, hosts: str | None = None) -> list[dict]:
    """Starts ``horovodrun -np N --gloo|--mpi python script args`` and returns each rank's report.

    ``hosts``: horovodrun's ``-H`` (default ``localhost:N``); ``localhost:2,127.0.0.1:2`` gives two
    hosts of two ranks each on this machine (horovodrun starts both locally, without ssh).
    Fails the test with the job's output if the job fails or a rank wrote no report.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = [HOROVODRUN, "-np", str(np), "-H", hosts or f"localhost:{np}", f"--{controller}",
           sys.executable, str(script), *(args or [])]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env({"RANGER_TEST_OUT": str(out_dir), **(env or {})}),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"horovodrun failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    reports = []
    for rank in range(np):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            raise AssertionError(f"rank {rank} wrote no report\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        reports.append(json.loads(path.read_text()))
    return reports


def report(rank: int, data: dict) -> None:
    """Called inside a worker: writes this rank's results for the test to read."""
    out = Path(os.environ["RANGER_TEST_OUT"])
    (out / f"rank{rank}.json").write_text(json.dumps(data))
