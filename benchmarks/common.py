"""What the benchmark scripts share: where results go, the machine line of a results file, a median
timer and the parser of density mode names (``ranger-0.01``, ``ranger-0.001-dgc``).

The scripts put ``benchmarks/`` on ``sys.path`` and import this module as ``common``; the CPU facts
themselves live in ``machine.py`` (also used by the network benchmark and the Horovod-suite harness).
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

from machine import cpu_and_load

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"   # every committed results file and plot


def machine(frameworks: str, threads: str) -> str:
    """'<CPU>; <n> logical CPUs; load average ... at start; Python X, <frameworks>; <threads>'."""
    return f"{cpu_and_load()}; Python {platform.python_version()}, {frameworks}; {threads}"


def median_seconds(fn, repeats: int, warmup: int = 1, ready=None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.
    ``ready(out)``, inside the timing, waits for what ``fn`` returned where that runs on after the
    call returns (:func:`tf_ready` for a traced TensorFlow function)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if ready is not None:
            ready(out)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def tf_ready(out) -> None:
    """Touches every tensor in ``out``, the TF scripts' ``ready`` (on a CPU a traced function's
    outputs are computed by the time the call returns)."""
    import tensorflow as tf

    for tensor in tf.nest.flatten(out):
        if tensor is not None:
            tensor.shape  # noqa: B018


def density_mode(mode: str, kinds: tuple[str, ...], suffixes: tuple[str, ...] = ()
                 ) -> tuple[str, float, str] | None:
    """``KIND-D`` or ``KIND-D-SUFFIX`` with KIND in ``kinds``, SUFFIX in ``suffixes`` and
    0 < D <= 1 -> (KIND, D, SUFFIX or ""); None for any other name."""
    parts = mode.split("-")
    if parts[0] not in kinds or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in suffixes):
        return None
    try:
        density = float(parts[1])
    except ValueError:
        return None
    return (parts[0], density, parts[2] if len(parts) == 3 else "") if 0.0 < density <= 1.0 else None
