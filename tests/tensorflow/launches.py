"""Launches shared by several test files: each tf-keras launch runs the compatibility matrix's
tf-keras side and the hook-equivalence checks (``workers/compat_legacy_worker.py``), once per rank
count per test session."""

from __future__ import annotations

from pathlib import Path

from tests.hvdrun import run_workers

WORKERS = Path(__file__).parent / "workers"
_LEGACY: dict = {}


def tf_keras_reports(np: int, tmp_path_factory) -> list[dict]:
    if np not in _LEGACY:
        _LEGACY[np] = run_workers(WORKERS / "compat_legacy_worker.py",
                                  tmp_path_factory.mktemp(f"legacy_np{np}"), np=np,
                                  env={"TF_USE_LEGACY_KERAS": "1"}, timeout=900)
    return _LEGACY[np]
