"""The one exchange of every TensorFlow entry point.

:func:`start` runs the error-feedback step of one tensor and returns (what Horovod's allreduce must
carry, a context); :func:`finish` turns the allreduce's result and the context into the gradient.
Horovod's own tape and Keras optimizer call them through ``RangerCompressor.compress`` and
``decompress``, one tensor at a time. ranger_hvd's tape and the Keras ``Ranger`` see a whole step's
gradients and call :func:`step`, which runs the same per-tensor math batched: one selection call and
one grouped allgather for every top-k tensor, one grouped allreduce for the rest. Every path
computes the same bits (over 2 ranks; with 3, Gloo's ring may add a dense tensor's three terms in
another order).

* top-k: this rank's (int32 indices, values) travel in one allgather, packed as raw bits in one
  integer tensor of the values' width ([k, 2] int32 for fp32 values, [k, 3] int16 for fp16/bf16), and
  Horovod's allreduce carries a 1-element tensor of ones: its result is 1 after an average and N
  after a sum, the factor (divided by N) applied after scatter-adding every rank's pairs.
* random-k: the k values at shared coordinates go through the allreduce itself.
* dense: the tensor (or its local momentum) goes through the allreduce whole.
* global top-k (``exchange="global_topk"``): the pairs go to the owners of their indices and the
  owners' kept sums come back to every rank (``global_topk.py``); Horovod's allreduce carries the
  token, as for top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ranger_hvd import core

from . import _hvd, cpu_path, global_topk
from .state import when

# Largest output for which unsorted_segment_sum may replace scatter_nd (beyond it its per-entry
# counters no longer fit in cache and it is the slower of the two).
_SEGMENT_SUM_MAX = 1 << 23

WIRE_DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}


@dataclass
class Context:
    kind: str                 # "dense", "random", "topk" or "global"
    shape: tuple
    dtype: tf.DType
    indices: tf.Tensor | None = None   # random-k coordinates
    gathered: tf.Tensor | None = None  # top-k: every rank's packed pairs
    k: object = 0                      # top-k: pairs per rank (an int, or a tensor under warm-up)
    slot: object = None                # the state to take the step back from if it turns out void
    engine: object = None              # its engine, where finish() itself may take the step back
    world: int | None = None           # top-k: the ranks of the exchange (None: not known here)
    flight: object = None              # global top-k: its exchange (global_topk.Flight)
    ready: list = ()                   # v1 graph: the state's initialization, to run after


def pack_pairs(idx: tf.Tensor, values: tf.Tensor, wire) -> tf.Tensor:
    """One rank's k pairs in the layout that travels and that :func:`finish` reads: rows of (value bits,
    index) as int32 for a float32 wire, rows of (value bits, index low/high halves) as int16 for fp16."""
    vals = tf.cast(values, wire)
    if wire == tf.float32:
        return tf.stack([tf.bitcast(vals, tf.int32), idx], axis=1)
    return tf.concat([tf.bitcast(vals, tf.int16)[:, None], tf.bitcast(idx, tf.int16)], axis=1)


def _unpack(gathered: tf.Tensor, wire):
    if wire == tf.float32:
        return tf.bitcast(gathered[:, 0], wire), gathered[:, 1]
    return tf.bitcast(gathered[:, 0], wire), tf.bitcast(gathered[:, 1:], tf.int32)


def _in_slot_dtype(grad, slot) -> tf.Tensor:
    grad = tf.convert_to_tensor(grad)
    if not grad.shape.is_fully_defined():  # a densified IndexedSlices: its first dimension
        grad = tf.ensure_shape(grad, slot.shape)
    return grad if grad.dtype == slot.dtype else tf.cast(grad, slot.dtype)


def start(engine: core.ErrorFeedback, slot, grad, world_size: int, gather_name: str,
          process_set=None):
    """The error-feedback step of one tensor: (tensor for Horovod's allreduce, Context)."""
    options = engine.options
    grad = _in_slot_dtype(grad, slot)
    if not slot.compressed:
        out = _in_order(lambda g: engine.dense_step(slot, g, slot.tensor_name, g.dtype.size), grad)
        return out, Context("dense", slot.shape, slot.dtype)

    def sparse(g):
        idx, values, k = engine.sparse_step(slot, g, slot.tensor_name, slot.shape, world_size)
        return idx, values, k, engine.ops.take_sent(slot)

    idx, values, k, sent = _in_order(sparse, grad)
    engine.ops.put_sent(slot, sent)
    wire = WIRE_DTYPES[options.value_dtype]
    if options.selection == "random":
        return tf.cast(values, wire), Context("random", slot.shape, slot.dtype, indices=idx,
                                             slot=slot, engine=engine)
    if options.exchange == "global_topk":
        flight = global_topk.start(engine, slot, idx, values, k, world_size, wire, gather_name,
                                   process_set)
        return tf.ones([1], tf.float32), Context("global", slot.shape, slot.dtype, slot=slot,
                                               engine=engine, world=world_size, flight=flight)
    kwargs = {"process_set": process_set} if process_set is not None else {}
    gathered = _hvd.module().allgather(pack_pairs(idx, values, wire), name=gather_name,
                                       ignore_name_scope=True, **kwargs)
    return tf.ones([1], tf.float32), Context("topk", slot.shape, slot.dtype, gathered=gathered,
                                           k=k, slot=slot, engine=engine, world=world_size)


def in_program_order() -> bool:
    """Whether state updates written here run in program order: eagerly and in a ``tf.function``
    (automatic control dependencies) they do; in a ``tf.compat.v1`` graph only what data links is
    ordered (a read of the residual could run before the add into it)."""
    graph = tf.compat.v1.get_default_graph()
    return tf.executing_eagerly() or getattr(graph, "_add_control_dependencies", True)


def _in_order(fn, *args):
    """``fn(*args)``, its state updates in program order: where the graph would not order them,
    ``fn`` runs as a ``tf.function``, whose body is ordered."""
    return fn(*args) if in_program_order() else tf.function(fn, autograph=False)(*args)


def step(engine: core.ErrorFeedback, slots: list, grads: list, world_size: int, tag: str,
         average: bool = True, predivide: float = 1.0, process_set=None) -> list[tf.Tensor]:
    """The exchange of a whole step for callers that see every gradient at once (ranger_hvd's tape
    and ``Ranger``), in two collectives whatever the number of tensors: one grouped allreduce of
    the dense (and random-k) tensors and one grouped allgather of the top-k tensors' pairs
    (:func:`start_topk_many`); Horovod negotiates each once instead of once per tensor. Returns
    the gradients averaged (or summed) over ranks, in order. ``tag`` names the collectives and must
    be the same on every rank. (Buckets started during backpropagation were tried and were slower:
    docs/results/, ``benchmarks/bench_keras_exchange.py``.)
    """
    hvd = _hvd.module()
    kwargs = {"process_set": process_set} if process_set is not None else {}
    op = hvd.Average if average else hvd.Sum
    scales = {"prescale_factor": 1.0 / predivide, "postscale_factor": predivide} if average else {}
    topk = engine.options.selection == "topk"
    sparse = [j for j, s in enumerate(slots) if s.compressed and topk]
    rest = [j for j, s in enumerate(slots) if not (s.compressed and topk)]
    out = [None] * len(slots)
    exchanged = []  # (reduced, Context) of every tensor: what shows a void step
    if rest:
        started = [start(engine, slots[j], grads[j], world_size, "", process_set) for j in rest]
        reduced = hvd.grouped_allreduce([carried for carried, _ in started], op=op,
                                        name=f"RangerAllreduce_{tag}", ignore_name_scope=True,
                                        **scales, **kwargs)
        for j, r, (_, ctx) in zip(rest, reduced, started):
            count_received(engine, r, ctx)
            out[j] = finish(r, ctx, engine.options.value_dtype, undo=False)
            exchanged.append((r, ctx))
    if sparse and engine.options.exchange == "global_topk":
        scale = tf.constant(1.0 / world_size if average else 1.0, tf.float64)
        contexts = global_topk.exchange_many(engine, [slots[j] for j in sparse],
                                             [_in_slot_dtype(grads[j], slots[j]) for j in sparse],
                                             world_size, f"RangerGtopk_{tag}", process_set)
        for j, ctx in zip(sparse, contexts):
            out[j] = global_topk.finish(engine, ctx.flight, scale)
        exchanged += [(None, ctx) for ctx in contexts]
    elif sparse:
        contexts = start_topk_many(engine, [slots[j] for j in sparse], [grads[j] for j in sparse],
                                   world_size, f"RangerTopk_{tag}", process_set)
        scale = 1.0 / world_size if average else 1.0
        for ctx in contexts:
            count_received(engine, None, ctx)
        for j, g in zip(sparse, finish_topk_many(contexts, engine.options.value_dtype, scale)):
            out[j] = g
        exchanged += [(None, ctx) for ctx in contexts]
    # The step is one: if any tensor of it came back non-finite, a loss scaler skips it all, so
    # every tensor of it takes back what it sent.
    undo_if_void(engine, exchanged)
    return [tf.cast(o, tf.convert_to_tensor(g).dtype) for o, g in zip(out, grads)]


def undo_if_void(engine: core.ErrorFeedback, exchanged: list) -> None:
    """Under ``nonfinite="skip"``, ``engine.undo`` on the slot of every (reduced, Context) given if
    any of them came back holding NaN or Inf (every rank sees the same values, so every rank
    decides alike): a top-k tensor's gathered values, another's reduced tensor."""
    if not engine.ops.skip:
        return
    seen = [_sent_values(reduced, ctx, engine.options.value_dtype) for reduced, ctx in exchanged]
    slots = [ctx.slot for _, ctx in exchanged if ctx.slot is not None]
    if not seen or not slots:
        return
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in seen]))
    when(tf.logical_not(finite), lambda: [engine.undo(slot) for slot in slots])
    for slot in slots:  # what was kept for the undo is of this step only
        engine.ops.forget_sent(slot)


def _sent_values(reduced, ctx: Context, value_dtype: str) -> tf.Tensor:
    if ctx.kind == "global":   # G's sums: non-finite where any rank's part of the step was
        return global_topk.selection(ctx.flight)[1]
    if ctx.kind == "topk":
        return _unpack(ctx.gathered, WIRE_DTYPES[value_dtype])[0]
    return reduced


def start_topk_many(engine: core.ErrorFeedback, slots: list, grads: list, world_size: int,
                    gather_name: str, process_set=None) -> list[Context]:
    """The top-k exchange of several compressed tensors at once, for callers that see a whole
    step's gradients (ranger_hvd's tape): their error-feedback steps with one batched selection,
    then every rank's packed pairs of all of them through one grouped allgather, which Horovod
    negotiates once instead of once per tensor. No token goes with them: the caller knows the
    reduction and passes its factor to :func:`finish_topk_many`. Returns one Context per tensor."""
    grads = [_in_slot_dtype(g, slot) for slot, g in zip(slots, grads)]
    steps = engine.sparse_steps(slots, grads, [s.tensor_name for s in slots],
                                [s.shape for s in slots], world_size, token=False)
    wire = WIRE_DTYPES[engine.options.value_dtype]
    packed = [pack_pairs(idx, values, wire) for idx, values, _ in steps]
    kwargs = {"process_set": process_set} if process_set is not None else {}
    gathered = _hvd.module().grouped_allgather(packed, name=gather_name, ignore_name_scope=True,
                                               **kwargs)
    return [Context("topk", s.shape, s.dtype, gathered=g, k=k, slot=s, world=world_size)
            for s, g, (_, _, k) in zip(slots, gathered, steps)]


def finish_topk_many(contexts: list[Context], value_dtype: str, scale: float) -> list[tf.Tensor]:
    """The gradients of :func:`start_topk_many`'s tensors: each rank's pairs scatter-added, times
    ``scale`` (1/N for an average, 1 for a sum), the bits :func:`finish` gives. The tensors that
    take the compiled scatter go through one call into Python together."""
    out = [None] * len(contexts)
    batch = []
    for j, ctx in enumerate(contexts):
        if value_dtype == "float32" and cpu_path.scatter_usable(ctx.dtype, core.numel_of(ctx.shape)):
            batch.append(j)
        else:
            out[j] = _combine(ctx, value_dtype, tf.constant(scale, tf.float64), (scale,))
    if batch:
        early = core.scale_each_value(scale, True)  # the batch is float32/64
        flats = cpu_path.scatter_add_pairs_many(
            [contexts[j].gathered for j in batch], [core.numel_of(contexts[j].shape) for j in batch],
            [contexts[j].dtype for j in batch], scale if early else 1.0)
        for j, flat in zip(batch, flats):
            ctx = contexts[j]
            if not early:
                flat = flat * tf.constant(scale, ctx.dtype)
            out[j] = tf.reshape(flat, ctx.shape)
    return out


def finish(reduced: tf.Tensor, ctx: Context, value_dtype: str, undo: bool = True) -> tf.Tensor:
    """The reduced gradient, in the original shape and dtype. With ``undo`` (Horovod's hook, one
    tensor at a time), a tensor that came back non-finite takes back what it sent
    (:func:`undo_if_void`); the other tensors of its step cannot be told (see the README)."""
    if ctx.kind == "global":   # G's update; the sent pairs outside G go back to the residual first
        token = tf.round(tf.cast(tf.reshape(reduced, [-1])[0], tf.float64))
        out = global_topk.finish(ctx.engine, ctx.flight, token / ctx.world)
        if undo:
            undo_if_void(ctx.engine, [(reduced, ctx)])
        return out
    if undo and ctx.engine is not None:
        undo_if_void(ctx.engine, [(reduced, ctx)])
    if ctx.kind == "dense":
        return tf.reshape(tf.cast(reduced, ctx.dtype), ctx.shape)
    numel = core.numel_of(ctx.shape)
    if ctx.kind == "random":
        # The indices are distinct and ascending, so writing beats a scatter-add (slow per index
        # on CPU); adding +0 keeps the scatter-add's +0.0 where a value is -0.0.
        values = tf.cast(reduced, ctx.dtype) + tf.zeros([], ctx.dtype)
        return tf.reshape(tf.raw_ops.SparseToDense(sparse_indices=ctx.indices, output_shape=[numel],
                                                   sparse_values=values,
                                                   default_value=tf.zeros([], ctx.dtype)), ctx.shape)
    # The gathered rows are N ranks times k pairs; the token is 1 after an average and N after a sum
    # (rounded: predivide factors leave float noise).
    world = tf.cast(tf.shape(ctx.gathered)[0], tf.float64) / tf.cast(ctx.k, tf.float64)
    token = tf.round(tf.cast(tf.reshape(reduced, [-1])[0], tf.float64))
    known = (1.0,) if ctx.world is None else (1.0, 1.0 / ctx.world)  # a sum's, an average's
    return _combine(ctx, value_dtype, token / world, known)


def count_received(engine: core.ErrorFeedback, reduced, ctx: Context):
    """bytes_received += what this tensor's collectives brought: the allreduced tensor (or token),
    and every other rank's pairs of a top-k allgather (a global exchange counts its own). Returns
    the counter's update (or None)."""
    nbytes = 0 if reduced is None else tf.cast(tf.size(reduced), tf.int64) * reduced.dtype.size
    if ctx.kind == "topk":
        rows = ctx.gathered
        row_bytes = int(rows.shape[1]) * rows.dtype.size
        nbytes += (tf.cast(tf.shape(rows)[0], tf.int64) - tf.cast(ctx.k, tf.int64)) * row_bytes
    return engine.ops.count_received(nbytes)


def _combine(ctx: Context, value_dtype: str, scale: tf.Tensor, known: tuple) -> tf.Tensor:
    """Every rank's pairs of a top-k tensor added into zeros, times ``scale`` (a float64 scalar).

    ``known``: values that ``scale`` may take, as Python floats; where it takes one of those that
    ``core.scale_each_value`` lets multiply each value, it does, else the sum is scaled after."""
    numel = core.numel_of(ctx.shape)
    values, indices = _unpack(ctx.gathered, WIRE_DTYPES[value_dtype])
    values = tf.cast(values, ctx.dtype)
    wide = ctx.dtype in (tf.float32, tf.float64)
    early_at = [v for v in known if core.scale_each_value(v, wide)]
    early = tf.reduce_any(tf.stack([tf.equal(scale, v) for v in early_at] or [False]))
    factor = tf.cast(scale, ctx.dtype)
    if cpu_path.scatter_usable(ctx.dtype, numel):  # the same bits, without TF's scatter
        one = tf.ones([], ctx.dtype)
        out = tf.cond(early, lambda: cpu_path.scatter_add(indices, values, numel, factor),
                      lambda: cpu_path.scatter_add(indices, values, numel, one) * factor)
    else:
        out = tf.cond(early, lambda: _scatter_add(indices, values * factor, numel),
                      lambda: _scatter_add(indices, values, numel) * factor)
    return tf.reshape(out, ctx.shape)


def _scatter_add(indices: tf.Tensor, values: tf.Tensor, numel: int) -> tf.Tensor:
    """A zero tensor of numel entries with every pair added in, in the gathered (rank) order.

    Both ops add in input order for each output entry, so they give the same bits.
    ``unsorted_segment_sum`` costs less per pair than ``scatter_nd`` on a CPU, but it also clears a
    counter per output entry, which costs more than it saves when pairs are few: it is used from one
    pair per 64 entries on, on tensors that fit in cache.
    """
    if numel > _SEGMENT_SUM_MAX:
        return tf.scatter_nd(indices[:, None], values, [numel])
    return tf.cond(tf.size(indices) * 64 >= numel,
                   lambda: tf.math.unsorted_segment_sum(values, indices, numel),
                   lambda: tf.scatter_nd(indices[:, None], values, [numel]))
