"""A NaN gradient on one rank ends a TF job under nonfinite="raise", naming the variable, instead of
leaving the other rank waiting in a collective (real horovodrun, Gloo)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("horovod.tensorflow")

from tests.hvdrun import HOROVODRUN, REPO, worker_env  # noqa: E402

pytestmark = pytest.mark.horovod
WORKER = Path(__file__).parent / "workers" / "nan_worker.py"


def test_nan_on_one_rank_ends_the_job_naming_the_variable(tmp_path):
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(WORKER)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env({"RANGER_TEST_OUT": str(tmp_path)}),
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "non-finite gradient for variable 'wide_kernel'" in text, text[-3000:]
    assert took < 180, f"the job took {took:.0f} s to end"
    assert not list(tmp_path.glob("rank*.json")), "no rank may finish training"
