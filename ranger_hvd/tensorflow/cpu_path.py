"""The error-feedback step of a large tensor on CPU in one pass over memory, inside a traced step.

TensorFlow's own ops take five passes or more over a compressed tensor (the add into the residual,
two column reductions to find candidates, the gathers and masks of the candidate block), and its
scatters cost about 100 ns per index, so the residual update alone costs more than a copy at
d = 0.01. PyTorch's backend runs the add, the screen and the exact selection in compiled loops
(``core/cpu_scan.py``); this module gives TensorFlow the same loops through ``tf.numpy_function``:
TensorFlow hands NumPy views of its CPU tensors (no copy) and takes back an output buffer aligned
for Eigen (no copy either). One call per tensor and step:

    acc     = e + g                                    one compiled pass, with the candidate screen
    S       = the k largest |acc|, ties to the lower index   (``cpu_scan.accumulate_select``)
    values  = acc[S];  acc[S] = 0                      the sent values, and the new residual

so the engine's ``gather`` and ``keep_unsent`` only pick up what this call produced (a
:class:`Selected`). The sets and bits are those of the TF ops path (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ranger_hvd.core import cpu_scan, uses_sampling

_ALIGN = 64  # bytes: TensorFlow adopts a NumPy buffer without copying only if it is this aligned


@dataclass
class Selected:
    """The fused step's result, handed through the engine as its ``acc``."""

    residual: tf.Tensor  # acc with the sent entries zeroed: the new e (or v)
    values: tf.Tensor    # acc at the selected indices, before zeroing


def _aligned_empty(n: int, dtype: np.dtype) -> np.ndarray:
    raw = np.empty(n * dtype.itemsize + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype)


def usable(residual_dtype: tf.DType, numel: int, k, sample_fraction: float) -> bool:
    """Whether the fused step applies: float32/64 on a CPU, a tensor large and sparse enough for a
    sampled threshold (k may be a tensor under density warm-up: then only n decides), numba here."""
    static_k = k if isinstance(k, int) else None
    return (residual_dtype in (tf.float32, tf.float64) and numel < 2 ** 31
            and uses_sampling(numel, static_k, sample_fraction)
            and not tf.config.list_logical_devices("GPU") and cpu_scan.available())


def accumulate_topk(residual: tf.Tensor, grad: tf.Tensor, k, sample_fraction: float):
    """(:class:`Selected`, int32 ascending indices) for acc = residual + grad (both flat, one dtype)."""
    n = int(residual.shape[0])
    dtype = residual.dtype.as_numpy_dtype

    def step(e: np.ndarray, g: np.ndarray, k_now) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        acc = _aligned_empty(n, np.dtype(dtype))
        idx = cpu_scan.accumulate_select(e, g, int(k_now), sample_fraction, acc)
        values = acc[idx]
        acc[idx] = 0
        return acc, idx, values

    acc, idx, values = tf.numpy_function(step, [residual, grad, tf.convert_to_tensor(k, tf.int32)],
                                         [residual.dtype, tf.int32, residual.dtype], stateful=True)
    size = k if isinstance(k, int) else None
    acc = tf.ensure_shape(acc, [n])
    return Selected(acc, tf.ensure_shape(values, [size])), tf.ensure_shape(idx, [size])
