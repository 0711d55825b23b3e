"""The error-feedback step of a large tensor on CPU in one pass over memory, inside a traced step.

TensorFlow's own ops take five passes or more over a compressed tensor (the add into the residual,
two column reductions to find candidates, the gathers and masks of the candidate block), and its
scatters are slow per index, so the residual update alone costs more than a copy at d = 0.01.
``core/cpu_scan.py`` runs the add, the screen and the exact selection in compiled loops, the CPU
selection of both backends; this module gives TensorFlow those loops through ``tf.numpy_function``:
TensorFlow hands NumPy views of its CPU tensors (no copy) and, in a traced function, takes back an
output buffer aligned for Eigen (no copy either; eagerly it copies). Output buffers are reused from
step to step once TensorFlow has let go of them (:class:`_Buffers`). One call per tensor and step:

    acc     = e + g                                    one compiled pass, with the candidate screen
    S       = the k largest |acc|, ties to the lower index   (``cpu_scan.accumulate_select``)
    values  = acc[S];  acc[S] = 0                      the sent values, and the new residual

so the engine's ``gather`` and ``keep_unsent`` only pick up what this call produced (a
:class:`Selected`). The sets and bits are those of the TF ops path (tests compare them). The same
pass counts NaN and Inf in g, which replaces the finiteness check's own pass over g.

:func:`scatter_add` is the decompress side: every rank's pairs added into a zero tensor in one
compiled loop, instead of ``scatter_nd``. (Measurements: docs/results/, from
``benchmarks/bench_selection_tf.py`` and ``benchmarks/bench_keras_exchange.py``.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ranger_hvd.core import cpu_scan
from ranger_hvd.core.reference import select_non_finite

_ALIGN = 64  # bytes: TensorFlow adopts a NumPy buffer without copying only if it is this aligned


@dataclass
class Selected:
    """The fused step's result, handed through the engine as its ``acc``."""

    residual: tf.Tensor  # acc with the sent entries zeroed: the new e (or v)
    values: tf.Tensor    # acc at the selected indices, before zeroing
    ok: tf.Tensor | None = None  # False: a void step (the residual is e as it was); None: unchecked


VOID = object()  # a check that turns a NaN/Inf gradient into a void step instead of an error


class _InvalidArgument(tf.errors.InvalidArgumentError, ValueError):
    """Raised inside ``tf.numpy_function``: eagerly it arrives as it is, an InvalidArgumentError;
    from a traced function TensorFlow turns a ValueError into one. Either way the caller sees what
    TensorFlow's own checks (``check_numerics``, ``scatter_nd``'s index check) raise."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


def _aligned_empty(n: int, dtype: np.dtype) -> np.ndarray:
    raw = np.empty(n * dtype.itemsize + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype)


class _Buffers:
    """Aligned output buffers of one call site, each reused once TensorFlow has let go of it.

    A new buffer costs a page fault per 4 KiB at its first write (the kernel maps and zeroes every
    page), which can cost as much as the pass that writes it. From a traced function TensorFlow
    adopts an aligned NumPy output without copying and keeps a reference to the array while any
    tensor uses its memory (a variable it was assigned to included; eagerly it copies instead), so
    an array that only this object references is free to overwrite.
    """

    keep = 2  # the residual alternates between two: the variable holds one while we write the other

    def __init__(self, n: int, dtype):
        self.n, self.dtype = n, np.dtype(dtype)
        self._arrays: list[np.ndarray] = []
        self._written: dict[int, np.ndarray] = {}  # id of a kept array -> where it is not zero

    def take(self) -> np.ndarray:
        arrays = self._arrays
        for i in range(len(arrays)):
            # The list's reference and getrefcount's argument: nobody else holds this array.
            if sys.getrefcount(arrays[i]) == 2:
                return arrays[i]
        fresh = _aligned_empty(self.n, self.dtype)
        if len(arrays) < self.keep:
            arrays.append(fresh)
        return fresh

    def take_zeroed(self) -> np.ndarray:
        """A buffer of +0.0 everywhere. A reused one is cleared only where its last user wrote
        (:meth:`wrote`): a decompress output is zero but for its N * k pairs, and TensorFlow never
        writes into a buffer it adopted from NumPy (it does not own the memory), so clearing those
        entries restores it without a pass over the whole tensor."""
        out = self.take()
        written = self._written.pop(id(out), None)
        if written is None:  # fresh, or its last use is unknown
            out.fill(0)
        else:
            out[written] = 0
        return out

    def wrote(self, out: np.ndarray, indices: np.ndarray) -> None:
        """Records that ``out`` (from :meth:`take_zeroed`) is zero except at ``indices`` (an array
        nobody else will change). Only kept buffers are recorded: a discarded one's id may return."""
        if any(a is out for a in self._arrays):
            self._written[id(out)] = indices


def usable(residual_dtype: tf.DType, numel: int, k, sample_fraction: float) -> bool:
    """Whether the fused step applies: float32/64 on a CPU, a tensor large and sparse enough for a
    sampled threshold (k may be a tensor under density warm-up: then only n decides), numba here."""
    static_k = k if isinstance(k, int) else None
    return (residual_dtype in (tf.float32, tf.float64) and not tf.config.list_logical_devices("GPU")
            and cpu_scan.usable(numel, static_k, sample_fraction))


def accumulate_topk(residual: tf.Tensor, grad: tf.Tensor, k, sample_fraction: float,
                    check=None, ok=None):
    """(:class:`Selected`, int32 ascending indices) for acc = residual + grad (both flat, one dtype).

    ``check``: None, a message (a gradient holding NaN or Inf raises InvalidArgumentError with
    it, found within the pass; the residual is left untouched, acc being a new buffer) or
    :data:`VOID` (such a gradient makes the step void instead: the residual stays as it was, the
    indices are ``core.reference.select_non_finite``'s and the values the raw gradient's there,
    and ``Selected.ok`` is False). ``ok``: a verdict made before (a bool tensor); False voids the
    step without the pass.
    """
    return accumulate_topk_many([residual], [grad], [k], sample_fraction, [check], [ok])[0]


def accumulate_topk_many(residuals: list, grads: list, ks: list, sample_fraction: float,
                         checks: list, oks: list | None = None) -> list:
    """:func:`accumulate_topk` of several tensors in one ``numpy_function`` (one call into Python
    per step instead of one per tensor): a list of (:class:`Selected`, indices), in order.

    The k may be ints or scalar tensors. A non-finite gradient checked with a message raises for
    the first tensor that holds one, before any later tensor is touched; the residuals are left as
    they were (each acc is a new buffer).
    """
    sizes = [int(r.shape[0]) for r in residuals]
    buffers = [_Buffers(n, r.dtype.as_numpy_dtype) for n, r in zip(sizes, residuals)]
    count = len(residuals)
    oks = [None] * count if oks is None else oks
    flagged = any(c is not None for c in checks) or any(o is not None for o in oks)

    # Not converted by autograph: its loops would hold references to the buffers.
    @tf.autograph.experimental.do_not_convert
    def step(*arrays):
        es, gs, k_now = arrays[:count], arrays[count:2 * count], arrays[2 * count]
        live = arrays[2 * count + 1]
        accs, indices, values, verdicts = [], [], [], np.ones(count, np.bool_)
        for j in range(count):
            acc = buffers[j].take()
            check, k = checks[j], int(k_now[j])
            try:
                if not live[j]:
                    raise cpu_scan.NonFiniteGradient("known before the pass")
                idx = cpu_scan.accumulate_select(es[j], gs[j], k, sample_fraction, acc,
                                                 check_finite=check is not None)
            except cpu_scan.NonFiniteGradient as exc:
                if live[j] and check is not VOID:
                    raise _InvalidArgument(f"{check} ({exc})") from None
                # void: e as it was, the raw gradient's non-finite entries first
                verdicts[j] = False
                np.copyto(acc, es[j])
                idx = select_non_finite(gs[j], k).astype(np.int32)
                values.append(gs[j][idx])
                accs.append(acc)
                indices.append(idx)
                continue
            values.append(acc[idx])
            acc[idx] = 0
            accs.append(acc)
            indices.append(idx)
        return accs + indices + values + [verdicts]

    k_vector = tf.stack([tf.convert_to_tensor(k, tf.int32) for k in ks])
    live = tf.stack([tf.constant(True) if o is None else tf.convert_to_tensor(o) for o in oks])
    outs = tf.numpy_function(step, [*residuals, *grads, k_vector, live],
                             [r.dtype for r in residuals] + [tf.int32] * count
                             + [r.dtype for r in residuals] + [tf.bool], stateful=True)
    verdicts = tf.ensure_shape(outs[3 * count], [count])
    result = []
    for j, (n, k) in enumerate(zip(sizes, ks)):
        size = k if isinstance(k, int) else None
        acc = tf.ensure_shape(outs[j], [n])
        idx = tf.ensure_shape(outs[count + j], [size])
        values = tf.ensure_shape(outs[2 * count + j], [size])
        result.append((Selected(acc, values, verdicts[j] if flagged else None), idx))
    return result


def scatter_usable(dtype: tf.DType, numel: int) -> bool:
    """Whether :func:`scatter_add` applies: float32/64 on a CPU, numba here. Below 2^16 entries
    TensorFlow's own scatter costs about as much as the call into Python."""
    return (dtype in (tf.float32, tf.float64) and (1 << 16) <= numel < 2 ** 31
            and not tf.config.list_logical_devices("GPU") and cpu_scan.available())


def _scatter_into(buffers: _Buffers, indices: np.ndarray, values: np.ndarray, factor) -> np.ndarray:
    """A zeroed buffer of ``buffers`` with the pairs added (``cpu_scan.scatter_add``); ``indices``
    must be an array of the caller's own, kept to clear those entries when the buffer returns."""
    out = buffers.take_zeroed()
    try:
        cpu_scan.scatter_add(indices, values, factor, out, zeroed=True)
    except ValueError as exc:  # a corrupt payload from some rank
        raise _InvalidArgument(f"ranger_hvd: gathered top-k pairs: {exc}") from None
    buffers.wrote(out, indices)
    return out


def scatter_add(indices: tf.Tensor, values: tf.Tensor, numel: int, factor: tf.Tensor) -> tf.Tensor:
    """A flat tensor of numel entries: zeros, with ``values * factor`` added at ``indices`` in the
    order of the pairs (``cpu_scan.scatter_add``), the bits of ``tf.scatter_nd`` on the same
    scaled values. An index outside [0, numel) raises InvalidArgumentError."""
    buffers = _Buffers(numel, values.dtype.as_numpy_dtype)

    @tf.autograph.experimental.do_not_convert
    def scatter(idx: np.ndarray, vals: np.ndarray, f: np.ndarray) -> np.ndarray:
        return _scatter_into(buffers, idx.copy(), vals, f)  # idx is TensorFlow's memory

    # Stateless: a traced function runs its stateful ops in program order, so a stateful scatter
    # would hold back the next tensor's compress until this tensor's allgather is done, a much
    # slower step. A folded constant would be a copy, so the reused buffers stay safe.
    out = tf.numpy_function(scatter, [indices, values, tf.cast(factor, values.dtype)],
                            values.dtype, stateful=False)
    return tf.ensure_shape(out, [numel])


def scatter_add_pairs_many(gathered: list, numels: list, dtypes: list, factor: float) -> list:
    """For each gathered [N * k, 2] int32 tensor of fp32 value bits and indices (``exchange``'s
    packing), a flat tensor of numel entries of its dtype: zeros with ``value * factor`` added at
    each index in the order of the rows, all in one ``numpy_function``: per tensor the bits of
    :func:`scatter_add`. An index outside a tensor raises InvalidArgumentError."""
    buffers = [_Buffers(n, d.as_numpy_dtype) for n, d in zip(numels, dtypes)]

    @tf.autograph.experimental.do_not_convert
    def scatter(*pairs_list):
        outs = []
        for pairs, buffer in zip(pairs_list, buffers):
            values = np.ascontiguousarray(pairs[:, 0]).view(np.float32).astype(buffer.dtype,
                                                                               copy=False)
            outs.append(_scatter_into(buffer, pairs[:, 1].copy(), values, buffer.dtype.type(factor)))
        return outs

    # Stateless, as scatter_add: nothing else waits on it in program order.
    outs = tf.numpy_function(scatter, list(gathered), list(dtypes), stateful=False)
    return [tf.ensure_shape(o, [n]) for o, n in zip(outs, numels)]
