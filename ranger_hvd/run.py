"""``ranger_hvd.run``: what your own training script needs from a run, under ``ranger-hvd launch`` (a
config with ``job.command``) and under plain ``horovodrun`` with ``RANGER_HVD_CONFIG=path.yaml`` alike.

Three lines turn an ordinary Horovod script into one the launcher can sweep and compare::

    import ranger_hvd.run
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=ranger_hvd.run.compression())
    ranger_hvd.run.log(step, loss=loss.item(), accuracy=acc)      # rank 0 writes, the others skip

* :func:`compression` is the Horovod compressor for the run's ``compression:`` section and
  ``job.backend``: ``none`` -> ``hvd.Compression.none``, ``fp16`` -> ``hvd.Compression.fp16``, ``ranger``
  -> ``RangerCompressor(**options)`` of ``ranger_hvd.torch`` or ``ranger_hvd.tensorflow``.  With Ranger's
  ``momentum`` > 0 the compressor keeps the momentum, so the script's optimizer must have none.
* :func:`log` appends a step record to ``RUN_DIR/metrics.jsonl``, the format the reference jobs write,
  so ``report``, ``sweep``, ``status`` and the live progress line read it.  Without a run directory
  (plain horovodrun and no ``RANGER_HVD_RUN_DIR``) rank 0 prints the record instead.
* :func:`config` is the run's validated config; :func:`run_dir` the run directory (None outside one);
  :func:`checkpoint_dir` ``RUN_DIR/checkpoints``, which the launcher's restart (``train.max_restarts``)
  looks at: a restarted command finds :func:`resumed` true and loads what it saved there.

The launcher gives every rank ``RANGER_HVD_RUN_DIR`` and ``RANGER_HVD_CONFIG`` (``RUN_DIR/config.yaml``),
and ``RANGER_HVD_RESUME=1`` when it restarts or resumes the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from ranger_hvd.rundir.layout import CONFIG_ENV, RESUME_ENV, RUN_DIR_ENV

__all__ = ["RunError", "compression", "log", "config", "run_dir", "checkpoint_dir", "resumed", "this_rank"]

_START = time.perf_counter()
_RANK_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
TOP_LEVEL = ("epoch", "loss", "bytes_sent", "bytes_dense", "step_time")   # record fields, not metrics


class RunError(RuntimeError):
    """Not inside a run, or a record that the run's readers could not use."""


def config_file() -> Path:
    """The file named by ``RANGER_HVD_CONFIG``; RunError when it is not set."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RunError(f"ranger_hvd.run: not inside a run: {CONFIG_ENV} is not set. Start the script with "
                       f"'ranger-hvd launch CONFIG' (job.command), or under horovodrun with "
                       f"{CONFIG_ENV}=path/to/config.yaml")
    return Path(path)


_config_cache: dict[str, Any] = {}


def config():
    """The run's config (:class:`ranger_hvd.config.Config`), read once from ``RANGER_HVD_CONFIG``
    and validated against the launcher's schema (``ConfigError`` names the key)."""
    from ranger_hvd.config import read_run_config

    path = config_file()
    key = str(path.resolve())
    if key not in _config_cache:
        if not path.is_file():
            raise RunError(f"ranger_hvd.run: {CONFIG_ENV}={path} is not a file")
        _config_cache[key] = read_run_config(path)
    return _config_cache[key]


def compression(backend: Optional[str] = None, **ranger_kwargs):
    """The Horovod compressor of the run's ``compression:`` section for ``job.backend`` (or ``backend``:
    ``torch``, ``tensorflow``).  ``ranger_kwargs`` go to ``RangerCompressor`` as well (e.g.
    ``named_parameters`` for PyTorch); they cannot change the config's options."""
    cfg = config()
    backend = backend or cfg.job.backend
    comp = cfg.compression
    if backend == "torch":
        import horovod.torch as hvd
    elif backend == "tensorflow":
        import horovod.tensorflow as hvd
    else:
        raise RunError(f"ranger_hvd.run.compression: backend must be 'torch' or 'tensorflow' (got {backend!r})")
    if comp.type == "none":
        return hvd.Compression.none
    if comp.type == "fp16":
        return hvd.Compression.fp16
    options = comp.options()
    clash = sorted(set(ranger_kwargs) & set(options))
    if clash:
        raise RunError(f"ranger_hvd.run.compression: {', '.join(clash)} come(s) from the config's compression "
                       f"section; set compression.{clash[0]} there")
    if backend == "torch":
        from ranger_hvd.torch import RangerCompressor
    else:
        from ranger_hvd.tensorflow import RangerCompressor
    compressor = RangerCompressor(**options, **ranger_kwargs)
    _state["compressor"] = compressor
    _state["sent"] = (0, 0, 0)     # (step, bytes_sent, bytes_dense): nothing before the first step
    return compressor


def run_dir() -> Optional[Path]:
    """The run directory (``RANGER_HVD_RUN_DIR``), or None under plain horovodrun without it."""
    path = os.environ.get(RUN_DIR_ENV)
    return Path(path) if path else None


def checkpoint_dir() -> Path:
    """``RUN_DIR/checkpoints`` (created): keep what a restart needs there.  After a rank dies the launcher
    (``train.max_restarts``) starts the command again with :func:`resumed` true when this holds a file."""
    from ranger_hvd.rundir.checkpoint import checkpoint_root

    base = run_dir()
    if base is None:
        raise RunError(f"ranger_hvd.run.checkpoint_dir: no run directory: {RUN_DIR_ENV} is not set")
    path = checkpoint_root(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resumed() -> bool:
    """Whether this start continues a run (a restart after a failure, or ``launch --resume``)."""
    return os.environ.get(RESUME_ENV) == "1"


def this_rank() -> int:
    """This process's rank as horovodrun set it (0 when not under horovodrun)."""
    for name in _RANK_ENV:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


_state: dict[str, Any] = {"writer": None, "last": None, "sent": None, "trimmed": False, "compressor": None}


def _number(name: str, value: Any) -> Optional[float]:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()      # a one-element tensor or array, a NumPy scalar
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f"ranger_hvd.run.log: {name} must be a number (got {type(value).__name__})")
    return value


def _writer():
    from ranger_hvd.rundir.metrics import MetricsWriter

    if _state["writer"] is None:
        _state["writer"] = MetricsWriter(run_dir(), enabled=True)
        _state["writer"].start = _START
    return _state["writer"]


def log(step: int, *, rank: int = 0, **metrics: Any) -> Optional[dict]:
    """One step record: ``{"step": S, "epoch": ..., "loss": ..., "metrics": {...}, "time": ...}`` in
    ``RUN_DIR/metrics.jsonl``, written by the process of rank ``rank`` only (returns the record there,
    None elsewhere).  ``epoch``, ``loss``, ``bytes_sent``, ``bytes_dense`` and ``step_time`` are fields
    of the record; every other keyword is a metric (a number, a one-element tensor, or None).  Without
    ``step_time`` it is the time since the previous record divided by the steps in between; with a Ranger
    compressor from :func:`compression` and no ``bytes_sent``, that is what it handed to the collectives
    since the previous record, per step.  In a resumed run the first record drops the earlier attempt's
    records from this step on."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunError(f"ranger_hvd.run.log: step must be a non-negative integer (got {step!r})")
    if this_rank() != rank:
        return None
    fields = {k: _number(k, metrics.pop(k)) for k in TOP_LEVEL if k in metrics}
    if fields.get("epoch") is not None:
        if not float(fields["epoch"]).is_integer() or fields["epoch"] < 0:
            raise RunError(f"ranger_hvd.run.log: epoch must be a non-negative integer (got {fields['epoch']!r})")
        fields["epoch"] = int(fields["epoch"])
    record: dict[str, Any] = {"step": step, **fields, "metrics": {k: _number(k, v) for k, v in metrics.items()}}
    now = time.perf_counter()
    last = _state["last"]
    steps_between = step - last[0] if last is not None and step > last[0] else None
    if "step_time" not in record and steps_between:
        record["step_time"] = round((now - last[1]) / steps_between, 6)
    comp, before = _state["compressor"], _state["sent"]
    if comp is not None and "bytes_sent" not in record and before is not None and step > before[0]:
        stats = comp.stats()
        sent, dense = int(stats.get("bytes_sent", 0)), int(stats.get("bytes_dense", 0))
        record["bytes_sent"] = (sent - before[1]) // (step - before[0])
        record["bytes_dense"] = (dense - before[2]) // (step - before[0])
        _state["sent"] = (step, sent, dense)
    _state["last"] = (step, now)
    base = run_dir()
    if base is None:
        print(f"[ranger_hvd.run] {json.dumps(record)}", flush=True)
        return record
    if resumed() and not _state["trimmed"]:
        from ranger_hvd.rundir.checkpoint import trim_metrics

        trim_metrics(base, max(step - 1, 0))      # the failed attempt's records from this step on
    _state["trimmed"] = True
    writer = _writer()
    record["time"] = round(writer.elapsed(), 6)
    writer.write(record)
    return record
