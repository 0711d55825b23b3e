"""A rank whose gradient is NaN, or missing, never leaves the others waiting (real horovodrun, Gloo)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from tests.hvdrun import HOROVODRUN, REPO, run_workers, worker_env  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "fault_scenario.py"
pytestmark = pytest.mark.horovod


def test_nan_on_one_rank_ends_the_job_naming_the_parameter(tmp_path):
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(WORKER), "nan"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env({"RANGER_TEST_OUT": str(tmp_path)}),
                          capture_output=True, text=True, timeout=180)
    took = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[1]<stderr>:ranger_hvd.torch.state.NonFiniteGradientError" in text, text[-3000:]
    # the first hook to meet the NaN names its parameter (the head's, backward runs from the end)
    assert re.search(r"for parameter '(head|trunk)\.(weight|bias)' at step 1", text), text[-3000:]
    assert took < 120, f"the job took {took:.0f} s to end"
    assert not list(tmp_path.glob("rank*.json")), "no rank may finish training"


def test_a_missing_gradient_on_one_rank_keeps_ranks_in_step(tmp_path):
    reports = run_workers(WORKER, tmp_path, np=2, args=["missing"])
    assert reports[0]["params"] == reports[1]["params"]
    # every step exchanged both compressed weights on both ranks (zeros where a gradient is missing)
    assert reports[0]["stats"]["tensors_sparse"] == reports[1]["stats"]["tensors_sparse"] == 2 * 4
