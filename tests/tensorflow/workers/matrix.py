"""What both sides of the TF compatibility matrix share (``compat_worker.py`` for Keras 3,
``compat_legacy_worker.py`` for tf-keras): known per-rank gradients and the checks of a cell.

A cell is ``run(density) -> (weights, residuals)``: T steps of :func:`grads_at` through one entry
point, SGD at lr 1 from zero weights, so the weights are minus the sum of the applied averages.
Nothing here imports Keras (the tf-keras worker must not load Keras 3 first).
"""

import zlib

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
from ranger_hvd.tensorflow import RangerCompressor

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
SHAPES = [(40, 30), (30,), (30, 5)]  # min_elements 100: both kernels compressed, the bias dense
T = 2  # two steps: a residual carried over, and one update of backward_passes_per_step=2
out = {"size": SIZE}


def grads_at(t, rank):
    rng = np.random.default_rng(1000 * rank + t)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def linear_loss(variables, grads):
    """A loss whose gradient is exactly ``grads``, whatever the variables hold."""
    return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(v) * g) for v, g in zip(variables, grads)])


def compressor(density, **kwargs):
    return None if density is None else RangerCompressor(density=density, min_elements=100,
                                                         **kwargs)


def drive(step, variables, comp, traced=True):
    """T steps of :func:`grads_at` through ``step(grads)`` (as a tf.function or eagerly): the
    weights and, for a compressor of Horovod's hooks, its residuals."""
    fn = tf.function(step) if traced else step
    for t in range(T):
        fn([tf.constant(g) for g in grads_at(t, RANK)])
    return [v.numpy() for v in variables], positional_residuals(comp)


def positional_residuals(comp):
    """The residual of each of SHAPES (their shapes differ), None where the compressor has none (a
    dense tensor, one kept local, no compressor)."""
    by_shape = {s.shape: s.residual for s in comp.slots} if comp is not None else {}
    return [None if by_shape.get(shape) is None else by_shape[shape].numpy() for shape in SHAPES]


def check(name, run, plain, local=()):
    """Runs the cell at d = 1 (against ``plain``, the weights without compression) and at d = 0.01
    (conservation); ``local``: indices of variables whose gradient stays on its rank (divided by
    N, as Horovod scales local gradients), checked against this rank's own sum."""
    exact, exact_res = run(1.0)
    sparse, residuals = run(0.01)
    total = [sum(grads_at(t, RANK)[i].astype(np.float64) for t in range(T))
             for i in range(len(SHAPES))]
    kept = [t - (0.0 if r is None else np.asarray(r, np.float64).reshape(t.shape))
            for t, r in zip(total, residuals)]
    averaged = [k if i in local else
                hvd.allreduce(tf.constant(k), op=hvd.Sum, name=f"conserve_{name}_{i}").numpy()
                for i, k in enumerate(kept)]
    averaged = [a / SIZE for a in averaged]
    out[name] = {
        "d1_maxdiff": max(float(np.max(np.abs(a - b))) for a, b in zip(exact, plain)),
        "d1_residual": max([float(np.max(np.abs(r))) for r in exact_res if r is not None] + [0.0]),
        "conservation_maxerr": max(float(np.max(np.abs(-w - a))) for w, a in zip(sparse, averaged)),
        "moved": float(max(np.max(np.abs(w)) for w in sparse)),
        "residual_norm": float(sum(np.linalg.norm(r) for r in residuals if r is not None)),
        "crc": zlib.crc32(b"".join(np.asarray(w).tobytes() for w in sparse)),
    }
