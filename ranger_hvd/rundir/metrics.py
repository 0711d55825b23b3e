"""The ``metrics.jsonl`` writer: one JSON object per line, appended and flushed at once.

Rank 0 writes it; other ranks get a disabled writer, so callers never test the rank themselves.

Step lines::

    {"step": 12, "epoch": 1, "loss": 0.41, "metrics": {"accuracy": 0.88},
     "bytes_sent": 5230, "bytes_dense": 284712, "step_time": 0.021, "time": 3.9}

``step`` counts optimizer steps from 1, ``epoch`` from 0, ``time`` is seconds since the training loop
started (after imports, data loading and the initial broadcast), ``step_time`` the step itself;
``bytes_*`` are this step's gradient bytes on this rank. The last step line of an epoch also carries
``metrics.eval_*`` (held-out evaluation). The job ends with one line ``{"event": "end", ...}``; see
:mod:`ranger_hvd.jobs` for its keys.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ranger_hvd.rundir import layout


def _clean(value):
    """Non-finite floats become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    def __init__(self, run_dir: str | Path | None, enabled: bool = True, filename: str = layout.METRICS):
        self.enabled = bool(enabled and run_dir is not None)
        self.start = time.perf_counter()
        self.path = Path(run_dir) / filename if run_dir is not None else None
        self._fh = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def set_enabled(self, enabled: bool) -> None:
        """Elastic jobs: the process that is rank 0 now writes (appending), the others stop."""
        enabled = bool(enabled and self.path is not None)
        if enabled and self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        elif not enabled:
            self.close()
        self.enabled = enabled

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._fh.flush()  # readers (the launcher's live view) see each line as soon as it is written

    def step(self, *, step: int, epoch: int, loss: float, metrics: dict, bytes_sent: int,
             bytes_dense: int, step_time: float) -> None:
        self.write({
            "step": int(step), "epoch": int(epoch), "loss": float(loss),
            "metrics": {k: v for k, v in metrics.items()},
            "bytes_sent": int(bytes_sent), "bytes_dense": int(bytes_dense),
            "step_time": round(float(step_time), 6), "time": round(self.elapsed(), 6),
        })

    def end(self, **fields) -> None:
        self.write({"event": layout.END_EVENT, "time": round(self.elapsed(), 6), **fields})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

