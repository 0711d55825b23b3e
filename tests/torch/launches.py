"""Launches shared by several test files: each compatibility launch (``workers/compat_scenario.py``)
runs the matrix, on 2 ranks the non-finite checks, and global top-k's checks
(``workers/global_scenario.py``), once per rank count per test session."""

from __future__ import annotations

from pathlib import Path

from tests.hvdrun import run_workers

WORKERS = Path(__file__).parent / "workers"
_COMPAT: dict = {}


def compat_reports(np: int, tmp_path_factory) -> list[dict]:
    if np not in _COMPAT:
        _COMPAT[np] = run_workers(WORKERS / "compat_scenario.py",
                                  tmp_path_factory.mktemp(f"compat_np{np}"), np=np)
    return _COMPAT[np]
