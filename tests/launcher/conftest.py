import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "ranger_hvd.launcher.cli"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: starts a real single-node Slurm cluster (needs root)")


def horovod_ready() -> bool:
    return (VENV_BIN / "horovodrun").exists() and (REPO / ".venv" / ".setup-stamp").exists()


needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovodrun not built yet (launch/setup.sh)")


def run_cli(args, cwd, timeout=120, env=None, **kw):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    e["COLUMNS"] = "200"
    e.update(env or {})
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, **kw)


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in Path(path).rglob("*")}
