"""Runs seed_example.py unchanged under horovodrun and reports its printed losses and final weights."""

import contextlib
import io
import runpy
import sys
import zlib
from pathlib import Path

import numpy as np

from tests.hvdrun import report

out = io.StringIO()
with contextlib.redirect_stdout(out):
    scope = runpy.run_path(str(Path(__file__).with_name("seed_example.py")), run_name="__main__")
sys.stdout.write(out.getvalue())
losses = [float(line.rsplit(":", 1)[1]) for line in out.getvalue().splitlines()
          if line.startswith("Epoch")]
weights = [w for w in scope["model"].get_weights()]
import horovod.tensorflow as hvd  # noqa: E402  (initialised by Ranger)

report(hvd.rank(), {
    "losses": losses,
    "weights_crc": [zlib.crc32(np.ascontiguousarray(w).tobytes()) for w in weights],
    "stats": scope["optimizer"].stats(),
    "size": hvd.size(),
})
