"""compression.exchange in launcher configs: global_topk on PyTorch and TensorFlow jobs, a typo refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ranger_hvd.launcher.cli"]


def _validate(config, *overrides):
    return subprocess.run([*CLI, "validate", str(REPO / "configs" / config), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_global_topk_validates_for_torch_and_tensorflow():
    assert _validate("cnn-digits.yaml", "compression.exchange=global_topk").returncode == 0
    tf = _validate("cnn-digits-tf.yaml", "compression.exchange=global_topk")
    assert tf.returncode == 0, tf.stdout + tf.stderr
    typo = _validate("cnn-digits.yaml", "compression.exchange=globaltopk")
    assert typo.returncode == 2 and "did you mean 'global_topk'" in typo.stdout + typo.stderr
