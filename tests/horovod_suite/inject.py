"""pytest plugin for Horovod's own test files, loaded with ``-p tests.horovod_suite.inject``.

It does two things, both driven by environment variables that ``run_suite.py`` sets:

* **Injection.** With ``RANGER_SUITE_DENSITY`` set, it replaces Horovod's factories
  (``horovod.torch.DistributedOptimizer``; ``horovod.tensorflow.DistributedOptimizer``,
  ``DistributedGradientTape``, ``PartialDistributedGradientTape``;
  ``horovod.tensorflow.keras.DistributedOptimizer``; ``horovod.keras.DistributedOptimizer`` and
  ``PartialDistributedOptimizer``) by wrappers that pass a fresh ``RangerCompressor(density=d,
  **RANGER_SUITE_OPTIONS)`` whenever the caller gives no ``compression`` or ``Compression.none``.
  A compression the test chose itself (``Compression.fp16``) is left alone. Horovod's tests look the
  factories up on the module at call time (``hvd.DistributedOptimizer(...)``), so replacing the
  module attribute before collection reaches every call. One compressor per factory call: the
  compressor keeps per-model state, as with one compressor per optimizer in user code.
* **Results.** Every rank appends one JSON line per event to ``RANGER_SUITE_OUT/rank<R>.jsonl``
  (``start`` when a test begins, ``done`` with its outcome, the reason and how many factory calls got
  the compressor), flushed at once, so a run killed by a hang or a crash still says which test was
  running.

``RANGER_SUITE_SELECT`` (JSON ``{"names": [...], "parameterized": [...]}``) keeps only the named test
functions (a parameterized one also under its expanded names, ``name_0_True``...), and
``RANGER_SUITE_EXCLUDE`` (JSON list of node ids) drops tests an earlier launch already finished.
``RANGER_SUITE_HIDE_TORCH_OPTIMIZERS`` (comma-separated) hides ``torch.optim`` classes newer than
Horovod's tests from their sweeps over every optimizer (see ``hide_torch_optimizers``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

ENV_DENSITY = "RANGER_SUITE_DENSITY"
ENV_OPTIONS = "RANGER_SUITE_OPTIONS"
ENV_FRAMEWORK = "RANGER_SUITE_FRAMEWORK"
ENV_OUT = "RANGER_SUITE_OUT"
ENV_SELECT = "RANGER_SUITE_SELECT"
ENV_EXCLUDE = "RANGER_SUITE_EXCLUDE"
ENV_HIDE = "RANGER_SUITE_HIDE_TORCH_OPTIMIZERS"

# (Horovod module, factory name, ranger_hvd module whose RangerCompressor it gets)
FACTORIES = {
    "torch": [("horovod.torch", "DistributedOptimizer", "ranger_hvd.torch")],
    "tensorflow": [
        ("horovod.tensorflow", "DistributedOptimizer", "ranger_hvd.tensorflow"),
        ("horovod.tensorflow", "DistributedGradientTape", "ranger_hvd.tensorflow"),
        ("horovod.tensorflow", "PartialDistributedGradientTape", "ranger_hvd.tensorflow"),
        ("horovod.tensorflow.keras", "DistributedOptimizer", "ranger_hvd.tensorflow"),
        ("horovod.keras", "DistributedOptimizer", "ranger_hvd.tensorflow"),
        ("horovod.keras", "PartialDistributedOptimizer", "ranger_hvd.tensorflow"),
    ],
}
FACTORY_NAMES = sorted({name for entries in FACTORIES.values() for _, name, _ in entries})

_current: str | None = None
_injected: Counter = Counter()
_reports: dict[str, list] = {}
_traced_compressors: dict[tuple, object] = {}


def _is_no_compression(compression) -> bool:
    """True for a missing compression and for Horovod's ``Compression.none`` (either backend)."""
    if compression is None:
        return True
    return getattr(compression, "__name__", type(compression).__name__) == "NoneCompressor"


def _new_compressor(ranger_module: str, density: float, options: dict):
    """A fresh compressor, built as user code builds it: before the step, outside any trace.

    Some of Horovod's TF tests build the tape inside a ``tf.function``; user code passing
    ``compression=comp`` there has made ``comp`` beforehand, so the compressor (and any variable its
    constructor makes) is built under ``tf.init_scope()``, which lifts it out of the trace.

    A tf.function traces its body more than once (a second time after a first trace that made
    variables), calling the factory again each time; user code hands every trace the same ``comp``,
    so inside a trace the compressor is kept per call site and outer context (the v1 graph, or eager).
    """
    compressor_cls = importlib.import_module(ranger_module).RangerCompressor
    if ranger_module != "ranger_hvd.tensorflow":
        return compressor_cls(density=density, **options)
    import tensorflow as tf
    traced = tf.inside_function()
    caller = sys._getframe(2)
    with tf.init_scope():
        outer = "eager" if tf.executing_eagerly() else id(tf.compat.v1.get_default_graph())
        key = (_current, caller.f_code.co_filename, caller.f_lineno, outer)
        if traced and key in _traced_compressors:
            return _traced_compressors[key]
        compressor = compressor_cls(density=density, **options)
        if traced:
            _traced_compressors[key] = compressor
        return compressor


def _wrap(factory, ranger_module: str, density: float, options: dict):
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def with_ranger(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if _is_no_compression(bound.arguments.get("compression")):
            bound.arguments["compression"] = _new_compressor(ranger_module, density, options)
            _injected[_current] += 1
        return factory(*bound.args, **bound.kwargs)

    with_ranger.__ranger_suite_original__ = factory
    return with_ranger


def install(framework: str, density: float, options: dict) -> list[str]:
    """Replaces the factories of one framework; returns the ``module.name`` of each one replaced."""
    replaced = []
    for module_name, attr, ranger_module in FACTORIES[framework]:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr, None)
        if factory is None or hasattr(factory, "__ranger_suite_original__"):
            continue
        setattr(module, attr, _wrap(factory, ranger_module, density, options))
        replaced.append(f"{module_name}.{attr}")
    return replaced


def _rank() -> str:
    return os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def _emit(event: dict) -> None:
    out = os.environ.get(ENV_OUT)
    if not out:
        return
    with open(Path(out) / f"rank{_rank()}.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()
        os.fsync(f.fileno())


def hide_torch_optimizers(names: list[str]) -> list[str]:
    """Keeps ``torch.optim`` classes newer than Horovod's tests out of their optimizer sweeps.

    Horovod's torch tests run every ``torch.optim.Optimizer.__subclasses__()`` whose ``__module__``
    starts with ``torch.optim``; torch >= 2.9 adds ``Muon``, which refuses 1-D parameters, so those
    tests fail before any gradient is exchanged. Renaming the class's module drops it from the
    sweep, the same way in the plain and the injected runs.
    """
    import torch.optim
    hidden = []
    for name in names:
        cls = getattr(torch.optim, name, None)
        if cls is not None and cls.__module__.startswith("torch.optim"):
            cls.__module__ = "hidden_by_ranger_suite." + cls.__module__
            hidden.append(name)
    return hidden


class _LegacyKerasAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import keras`` and ``import keras.<x>`` give tf-keras's modules (the same objects).

    Horovod 0.28.1's ``horovod.keras`` and its Keras tests import the standalone ``keras`` package
    and expect Keras 2 (``keras.backend``, ``keras.optimizers.optimizer_v2``); this environment's
    standalone ``keras`` is Keras 3, while ``tf.keras`` under ``TF_USE_LEGACY_KERAS=1`` is tf-keras
    (Keras 2). Aliasing gives those imports the Keras 2 that Horovod 0.28.1 was built against.
    """

    RENAMED = {"keras.optimizers.optimizer_v2": "tf_keras.src.optimizers.legacy"}

    def __init__(self):
        self.modules = {}

    def find_spec(self, name, path=None, target=None):
        if name != "keras" and not name.startswith("keras."):
            return None
        rest = name[len("keras"):]
        for candidate in (self.RENAMED.get(name), "tf_keras" + rest, "tf_keras.src" + rest):
            if candidate is None:
                continue
            try:
                module = importlib.import_module(candidate)
            except ImportError:
                continue
            self.modules[name] = module
            return importlib.util.spec_from_loader(name, self,
                                                   is_package=hasattr(module, "__path__"))
        return None

    def create_module(self, spec):
        return self.modules[spec.name]

    def exec_module(self, module):
        pass


def legacy_keras_shims() -> list[str]:
    """Under ``TF_USE_LEGACY_KERAS=1``: Keras 2 for ``import keras``, and ``tf.keras.__version__``."""
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        return []
    applied = []
    if "keras" in sys.modules and not sys.modules["keras"].__name__.startswith("tf_keras"):
        applied.append("WARNING: Keras 3 was imported before the alias")
    sys.meta_path.insert(0, _LegacyKerasAlias())
    applied.append("import keras -> tf_keras")
    import tf_keras
    api = importlib.import_module("tf_keras.api._v2.keras")
    if not hasattr(api, "__version__"):
        api.__version__ = tf_keras.__version__
        applied.append(f"tf.keras.__version__ = {tf_keras.__version__!r}")
    return applied


def pytest_configure(config):
    shims = legacy_keras_shims()
    if shims:
        _emit({"event": "shims", "applied": shims})
    hide = [n for n in os.environ.get(ENV_HIDE, "").split(",") if n]
    if hide and os.environ.get(ENV_FRAMEWORK) == "torch":
        _emit({"event": "hidden", "optimizers": hide_torch_optimizers(hide)})
    density = os.environ.get(ENV_DENSITY, "")
    if density:
        options = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
        framework = os.environ[ENV_FRAMEWORK]
        replaced = install(framework, float(density), options)
        _emit({"event": "installed", "density": float(density), "options": options,
               "replaced": replaced})


def _selected(name: str, names: set, parameterized: set) -> bool:
    if name in names:
        return True
    return any(name.startswith(base + "_") for base in parameterized)


def pytest_collection_modifyitems(session, config, items):
    select = os.environ.get(ENV_SELECT)
    exclude = set(json.loads(os.environ.get(ENV_EXCLUDE) or "[]"))
    spec = json.loads(select) if select else None
    keep, drop = [], []
    for item in items:
        ok = item.nodeid not in exclude
        if ok and spec is not None:
            ok = _selected(item.name, set(spec["names"]), set(spec["parameterized"]))
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session):
    # After every plugin's deselection (-k included): the tests this launch will run, in order.
    _emit({"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logstart(nodeid, location):
    global _current
    _current = nodeid
    _reports[nodeid] = []
    _emit({"event": "start", "nodeid": nodeid})


def _reason(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):          # skipped: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    text = str(longrepr).strip().splitlines()
    return text[-1] if text else ""


def pytest_runtest_logreport(report):
    _reports.setdefault(report.nodeid, []).append(report)


def pytest_runtest_logfinish(nodeid, location):
    reports = _reports.pop(nodeid, [])
    outcome, reason = "passed", ""
    for report in reports:
        if report.failed:
            outcome = "failed" if report.when == "call" else f"error ({report.when})"
            reason = _reason(report)
            break
        if report.skipped and outcome == "passed":
            outcome, reason = "skipped", _reason(report)
    _emit({"event": "done", "nodeid": nodeid, "outcome": outcome,
           "reason": " ".join(reason.split())[:1500], "injected": _injected.get(nodeid, 0)})
