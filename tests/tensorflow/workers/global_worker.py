"""``exchange="global_topk"`` on TensorFlow, on 2 or 3 ranks (tf-keras, ``TF_USE_LEGACY_KERAS=1``).

Run inside the tf-keras compatibility launch (``compat_legacy_worker.py`` calls :func:`run`: no
launch of its own), or alone. Every key it reports starts with ``gtopk_``:

equal      density 1 with global_topk equals uncompressed Horovod step after step: Horovod's own
           tape (Average, Sum), ranger_hvd's tape (Average), tf-keras ``hvd.DistributedOptimizer``
reference  the exchange's functions on known pairs against ``core.global_topk.reference_exchange``,
           step after step (the ranges follow each G): G's indices and sums and the pairs given back
drain      some steps with gradients, then zero gradients: every gradient delivered once and the
           residuals end at 0 (Horovod's tape: the hook path; ranger_hvd's tape: the batched step)
bytes      one 1000x1000 tensor at d = 0.01: bytes this rank received per step, global_topk through
           both paths and the allgather through Horovod's tape
"""

import os
import time
import traceback

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
from ranger_hvd import core
from ranger_hvd.core import global_topk as rule
from ranger_hvd.tensorflow import DistributedGradientTape, RangerCompressor
from ranger_hvd.tensorflow import global_topk
from ranger_hvd.tensorflow.state import Sent, TFOps
from tests.tensorflow.workers.hook_worker import (PLAIN, data, diffs, keras_run, loss_fn,
                                                  make_model, tape_run)

assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()


def global_comp(density, variables=None, min_elements=256):
    return RangerCompressor(density=density, min_elements=min_elements, variables=variables,
                            exchange="global_topk")


def equal() -> dict:
    res = {}
    for label, kwargs in {"average": {}, "sum": {"op": hvd.Sum}}.items():
        plain = PLAIN.get(label) or tape_run(
            lambda m: lambda t: hvd.DistributedGradientTape(t, **kwargs))

        def hook(model):
            comp = global_comp(1.0, model.trainable_variables)
            return lambda t: hvd.DistributedGradientTape(t, compression=comp, **kwargs)

        def ours(model):
            comp = global_comp(1.0)
            return lambda t: DistributedGradientTape(t, compression=comp, **kwargs)

        res[f"hvd_tape_{label}"] = diffs(plain, tape_run(hook))
        if label == "average":   # a sum differs only by the factor: the hook's Sum covers it
            res[f"our_tape_{label}"] = diffs(plain, tape_run(ours))
        res[f"moved_{label}"] = diffs(plain[:1], plain[-1:])[0]
    plain = PLAIN.get("keras") or keras_run(None)[0]
    res["keras"] = diffs(plain, keras_run(None, compression_of=lambda m: global_comp(
        1.0, m.trainable_variables))[0])
    res["moved_keras"] = diffs(plain[:1], plain[-1:])[0]
    return res


class _Slot:
    """A compressor slot's fields, for the exchange's functions on known pairs."""

    def __init__(self, numel):
        self.numel, self.shape, self.dtype = numel, (numel,), tf.float32
        self.residual = tf.Variable(tf.zeros([numel]))
        self.velocity = None
        self.gbounds = tf.Variable(tf.zeros([SIZE + 1], tf.int64))
        self.gweights = tf.Variable(tf.zeros([SIZE], tf.int64))


def reference(steps=6, numel=5000, k=200) -> dict:
    """Each rank's k pairs drawn from a skewed distribution (top-k entries cluster, so the ranges
    and budgets move away from equal widths); every rank draws every rank's pairs and computes the
    reference, then runs its own through ``global_topk.start``/``finish``."""
    options = core.make_options(density=0.04, min_elements=1, exchange="global_topk")
    engine = core.ErrorFeedback(options, TFOps(options, tf.Variable(tf.zeros([len(core.COUNTERS)],
                                                                               tf.int64))))
    slot = _Slot(numel)
    weights = np.exp(-np.arange(numel) / 700.0)
    weights /= weights.sum()
    last, mismatches = None, []
    for step in range(steps):
        pairs = []
        for r in range(SIZE):
            rng = np.random.default_rng(100 * step + r)
            idx = np.sort(rng.choice(numel, k, replace=False, p=weights)).astype(np.int32)
            pairs.append((idx, rng.standard_normal(k).astype(np.float32)))
        g_idx, g_sums, dropped = rule.reference_exchange(pairs, numel, last)
        last = g_idx.astype(np.int64)
        idx, values = (tf.constant(a) for a in pairs[RANK])
        slot.residual.assign(tf.zeros([numel]))
        engine.ops._sent[id(slot)] = Sent(idx, values, None)
        flight = global_topk.start(engine, slot, idx, values, k, SIZE, tf.float32, f"gref_{step}")
        update = global_topk.finish(engine, flight, tf.constant(1.0, tf.float64))
        got_idx, got_sums = (t.numpy() for t in global_topk.selection(flight))
        want_back = np.zeros(numel, np.float32)
        want_back[pairs[RANK][0][dropped[RANK]]] = pairs[RANK][1][dropped[RANK]]
        want_update = np.zeros(numel, np.float32)
        want_update[g_idx] = g_sums
        ok = (np.array_equal(got_idx, g_idx) and np.array_equal(got_sums.view(np.uint32),
                                                                 g_sums.view(np.uint32))
              and np.array_equal(slot.residual.numpy(), want_back)
              and np.array_equal(update.numpy(), want_update))
        if not ok:
            mismatches.append(step)
    return {"mismatches": mismatches, "last_size": int(len(last)),
            "bounds": [int(b) for b in slot.gbounds.numpy()]}


def drain(label, steps=20) -> dict:
    """3 steps with gradients, then zeros, SGD lr 0: what the exchange delivered against the
    average of every rank's gradients, and what stays in the residuals."""
    model = make_model()
    variables = model.trainable_variables
    comp = (global_comp(0.2, variables) if label == "hvd_tape" else global_comp(0.2))
    wrap = ((lambda t: hvd.DistributedGradientTape(t, compression=comp)) if label == "hvd_tape"
            else (lambda t: DistributedGradientTape(t, compression=comp)))

    @tf.function
    def step(x, y, scale):
        with tf.GradientTape(persistent=True) as tape:
            loss = scale * loss_fn(y, model(x, training=True))
        local = tape.gradient(loss, variables)
        return local, wrap(tape).gradient(loss, variables)

    total = [np.zeros(v.shape, np.float64) for v in variables]
    delivered = [np.zeros(v.shape, np.float64) for v in variables]
    emptied = None   # the first step after which every residual of this rank was 0
    for t in range(steps):
        local, reduced = step(*data(t), tf.constant(1.0 if t < 3 else 0.0))
        for a, g in zip(total, local):
            a += g.numpy()
        for a, g in zip(delivered, reduced):
            a += g.numpy()
        left = sum(float(np.abs(s.residual.numpy()).sum()) for s in comp.slots
                   if s.residual is not None)
        emptied = None if left else (t if emptied is None else emptied)
    worst = 0.0
    for j, (d, t) in enumerate(zip(delivered, total)):
        avg = hvd.allreduce(tf.constant(t), op=hvd.Average, name=f"gtopk_drain_{label}_{j}").numpy()
        worst = max(worst, float(np.abs(d - avg).max()) / (float(np.abs(avg).max()) or 1.0))
    residual = sum(float(np.abs(s.residual.numpy()).sum()) for s in comp.slots
                   if s.residual is not None)
    return {"error": worst, "residual": residual, "emptied_at": emptied, "stats": comp.stats()}


def received_per_step(label, exchange, steps=3) -> list:
    """One 1000x1000 weight (1M entries), d = 0.01: bytes this rank received per step."""
    w = tf.Variable(tf.zeros([1000, 1000]))
    comp = RangerCompressor(density=0.01, min_elements=1000, exchange=exchange,
                            variables=[w] if label == "hvd_tape" else None)
    wrap = ((lambda t: hvd.DistributedGradientTape(t, compression=comp)) if label == "hvd_tape"
            else (lambda t: DistributedGradientTape(t, compression=comp)))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(w * x)
        return wrap(tape).gradient(loss, [w])[0]

    per_step, before = [], 0
    for t in range(steps):
        rng = np.random.default_rng(7 * RANK + t)
        step(tf.constant(rng.standard_normal((1000, 1000)).astype(np.float32)))
        now = comp.stats()["bytes_received"]
        per_step.append(now - before)
        before = now
    return per_step


def run(full: bool = True) -> dict:
    """Every check; ``full=False`` only equal and reference (the shared 3-rank launch: the drain and
    the bytes run on 2 ranks there and on 4 in the opt-in launch, keeping the suite's time)."""
    out, seconds = {}, {}

    def timed(key, fn):
        started, cpu = time.perf_counter(), time.process_time()
        out[key] = fn()
        seconds[key] = [round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)]

    try:
        timed("gtopk_equal", equal)
        timed("gtopk_reference", reference)
        if full:
            timed("gtopk_drain", lambda: {label: drain(label) for label in ("hvd_tape", "our_tape")})
            timed("gtopk_bytes", lambda: {
                "hvd_tape_global": received_per_step("hvd_tape", "global_topk"),
                "our_tape_global": received_per_step("our_tape", "global_topk"),
                "hvd_tape_allgather": received_per_step("hvd_tape", "allgather")})
        out["gtopk_seconds"] = seconds
    except Exception:   # reported, so that the other checks of a shared launch still report
        out["gtopk_error"] = traceback.format_exc()
    return out


if __name__ == "__main__":
    from tests.hvdrun import report

    report(RANK, {"rank": RANK, "size": SIZE, **run()})
