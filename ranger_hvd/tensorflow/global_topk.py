"""TensorFlow's global top-k exchange through Horovod's collectives (the rule: ``core/global_topk.py``).

Per compressed tensor and step, after the engine's error-feedback step gave this rank's top-k
(ascending int32 indices, values):

1. the owners' ranges: N+1 bounds and N weights kept in the tensor's slot (``gbounds``,
   ``gweights``: int64 variables, all zeros before any selection, which means equal widths), and the
   budgets ceil(k * weight / total), capped at the range's width (``core.range_budgets``);
2. one ``hvd.alltoall`` with splits sends each pair (packed as ``exchange.pack_pairs`` packs them)
   to the owner of its index;
3. the owner sums what it received per index in arrival (rank) order and keeps its budget of the
   largest |sums|, ties to the lower index (a non-finite sum: ``select_non_finite``, so that a void
   step reaches every rank); one ``hvd.allgather`` of the kept (index, sum) pairs in the slot's
   dtype gives every rank the same global selection G, ascending;
4. the update is the scatter of G's sums times (token or 1) / N; the pairs this rank sent that are
   not in G go back into its residual (and u where DGC masking zeroed it), as ``ErrorFeedback.undo``
   would take them back; what stays remembered for an undo of the whole step is what was delivered;
   G's quantiles and counts become the next step's bounds and weights.

Everything is TF ops on variables, so it runs eagerly, inside ``tf.function`` and in a
``tf.compat.v1`` graph (its state updates then run as a ``tf.function``, as the engine's do).
Collective names derive from the caller's, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ranger_hvd import core

from . import _hvd
from .selection import _magnitudes
from .state import Sent, _scatter, all_finite, select_non_finite, when


def _ranges(slot, numel: int, world: int, k):
    """This step's (bounds int32 [N+1], budgets int32 [N]): ``core.range_bounds`` and
    ``core.range_budgets`` from the state the last step left (equal widths before any)."""
    equal = [numel * j // world for j in range(world + 1)]
    widths = [equal[j + 1] - equal[j] for j in range(world)]
    stored_b = tf.convert_to_tensor(slot.gbounds)
    stored_w = tf.convert_to_tensor(slot.gweights)
    fresh = tf.equal(stored_b[-1], 0)
    bounds = tf.where(fresh, tf.constant(equal, tf.int64), stored_b)
    weights = tf.where(fresh, tf.constant(widths, tf.int64), stored_w)
    total = tf.reduce_sum(weights)
    # Python's ceil(k * w / total): k * w is exact in float64 (< 2**53), the division rounds alike
    share = tf.math.ceil(tf.cast(tf.cast(k, tf.int64) * weights, tf.float64)
                         / tf.cast(tf.maximum(total, 1), tf.float64))
    budgets = tf.minimum(bounds[1:] - bounds[:-1], tf.cast(share, tf.int64))
    budgets = tf.where(total > 0, budgets, tf.zeros_like(budgets))
    return tf.cast(bounds, tf.int32), tf.cast(budgets, tf.int32)


def pack(idx: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """Rows of (value bits, index bits) in one integer tensor: int16 rows for 2-byte values, int32
    rows otherwise (fp32: 2 columns, fp64: 3)."""
    if values.dtype.size == 2:
        return tf.concat([tf.bitcast(values, tf.int16)[:, None], tf.bitcast(idx, tf.int16)], axis=1)
    bits = tf.bitcast(values, tf.int32)
    bits = bits[:, None] if values.dtype.size == 4 else bits
    return tf.concat([bits, idx[:, None]], axis=1)


def unpack(rows: tf.Tensor, dtype: tf.DType):
    """(int32 indices, values of ``dtype``) of :func:`pack`'s rows."""
    if dtype.size == 2:
        return tf.bitcast(rows[:, 1:], tf.int32), tf.bitcast(rows[:, 0], dtype)
    bits = rows[:, :-1]
    return rows[:, -1], tf.bitcast(bits[:, 0] if dtype.size == 4 else bits, dtype)


def _row_bytes(rows: tf.Tensor) -> int:
    return int(rows.shape[1]) * rows.dtype.size


def owner_keep(indices: tf.Tensor, values: tf.Tensor, budget):
    """``core.global_topk.owner_keep``: the sum per index in arrival order, then the ``budget``
    largest |sums|, ties to the lower index (non-finite sums first when there are any).
    Returns (ascending int32 indices, sums)."""
    unique, inverse = tf.unique(indices)
    order = tf.argsort(unique)
    candidates = tf.gather(unique, order)
    segment = tf.gather(tf.math.invert_permutation(order), inverse)
    n = tf.size(candidates)
    # adds in input order for each output entry: the arrival order, as NumPy's add.at and torch's
    # index_add_ do
    sums = tf.math.unsorted_segment_sum(values, segment, n)
    budget = tf.maximum(tf.minimum(tf.cast(budget, tf.int32), n), 0)

    def largest():
        chosen = tf.math.top_k(_magnitudes(sums), k=budget, sorted=True).indices  # ties: lower first
        return tf.sort(chosen)

    keep = tf.cond(all_finite(sums), largest, lambda: select_non_finite(sums, budget))
    return tf.gather(candidates, keep), tf.gather(sums, keep)


@dataclass
class Flight:
    """One tensor's global exchange between its start and its finish."""

    slot: object
    numel: int
    world: int
    kept: tf.Tensor             # this rank's kept rows (what it put into the allgather)
    received: tf.Tensor         # bytes the alltoall brought from other ranks (int64)
    gathered: tf.Tensor = None  # every owner's kept rows: G
    counted: list = None        # the byte counters' updates (a tf.compat.v1 graph runs them only
                                # where the result depends on them)


def _me(process_set) -> int:
    return process_set.rank() if process_set is not None else _hvd.module().rank()


def send(slot, idx, values, k, world: int, wire, name: str, process_set=None) -> Flight:
    """Steps 1 to 3 up to the allgather: the alltoall to the owners and this rank's owner step."""
    hvd = _hvd.module()
    kwargs = {"process_set": process_set} if process_set is not None else {}
    numel = slot.numel
    bounds, budgets = _ranges(slot, numel, world, k)
    cuts = tf.searchsorted(idx, bounds, side="left")
    splits = cuts[1:] - cuts[:-1]
    rows = pack(idx, tf.cast(values, wire))
    received, received_splits = hvd.alltoall(rows, splits=splits, name=f"{name}_send",
                                             ignore_name_scope=True, **kwargs)
    me = _me(process_set)
    from_others = tf.cast(tf.shape(received)[0] - received_splits[me], tf.int64) * _row_bytes(rows)
    r_idx, r_vals = unpack(received, wire)
    kept_idx, kept_sums = owner_keep(r_idx, tf.cast(r_vals, slot.dtype), budgets[me])
    return Flight(slot, numel, world, pack(kept_idx, kept_sums), from_others)


def start(engine, slot, idx, values, k, world: int, wire, name: str, process_set=None) -> Flight:
    """One tensor's exchange up to G (Horovod's hook: one tensor at a time)."""
    flight = send(slot, idx, values, k, world, wire, name, process_set)
    kwargs = {"process_set": process_set} if process_set is not None else {}
    flight.gathered = _hvd.module().allgather(flight.kept, name=f"{name}_kept",
                                              ignore_name_scope=True, **kwargs)
    flight.counted = _count(engine, flight)
    return flight


def start_many(engine, slots, idx_values_k, world: int, wire, name: str,
               process_set=None) -> list[Flight]:
    """Several tensors' exchanges (ranger_hvd's tape, ``Ranger``): one alltoall each, then every
    owner's kept rows of all of them in one grouped allgather."""
    flights = [send(slot, idx, values, k, world, wire, f"{name}_{j}", process_set)
               for j, (slot, (idx, values, k)) in enumerate(zip(slots, idx_values_k))]
    kwargs = {"process_set": process_set} if process_set is not None else {}
    gathered = _hvd.module().grouped_allgather([f.kept for f in flights], name=f"{name}_kept",
                                               ignore_name_scope=True, **kwargs)
    for flight, g in zip(flights, gathered):
        flight.gathered = g
        flight.counted = _count(engine, flight)
    return flights


def _count(engine, flight: Flight) -> list:
    """bytes_sent += the kept rows; bytes_received += what the alltoall and the allgather brought
    from other ranks. Returns the counters' updates."""
    kept_bytes = tf.cast(tf.size(flight.kept), tf.int64) * flight.kept.dtype.size
    more = tf.one_hot(core.COUNTERS.index("bytes_sent"), len(core.COUNTERS), dtype=tf.int64)
    sent = engine.ops.counters.assign_add(more * kept_bytes)
    gathered_bytes = tf.cast(tf.size(flight.gathered), tf.int64) * flight.gathered.dtype.size
    received = engine.ops.count_received(flight.received + gathered_bytes - kept_bytes)
    return [op for op in (sent, received) if op is not None]


def selection(flight: Flight):
    """G: (ascending int32 indices, sums in the slot's dtype)."""
    return unpack(flight.gathered, flight.slot.dtype)


def finish(engine, flight: Flight, scale) -> tf.Tensor:
    """Step 4: the update (G's sums times ``scale``, a float64 scalar, scattered into zeros, in the
    tensor's shape); this rank's pairs outside G go back into its residual, and G sets the next
    step's ranges. What stays remembered for an undo of the whole step is what was delivered."""
    from .exchange import _in_order

    slot = flight.slot
    g_idx, g_sums = selection(flight)
    give_back = _split_sent(engine, slot, g_idx)

    def update_state():
        if give_back is not None:
            give_back()
        _next_ranges(slot, g_idx, flight.numel, flight.world)
        return tf.constant(True)

    done = _in_order(update_state)
    factor = tf.cast(scale, slot.dtype)
    # in a tf.compat.v1 graph only what the result depends on runs
    with tf.control_dependencies([done, *flight.counted]):
        return tf.reshape(tf.scatter_nd(g_idx[:, None], g_sums * factor, [flight.numel]),
                          slot.shape)


def _split_sent(engine, slot, g_idx):
    """What this rank sent, split by G: the part outside G is returned as a state update that gives
    it back (e[i] += v[i], u[i] restored: ``ErrorFeedback.undo`` on that part); the part in G stays
    remembered for an undo of the whole step (under ``nonfinite="skip"``)."""
    ops = engine.ops
    sent = ops._sent.get(id(slot))
    if sent is None:   # this rank's own gradient was not finite: nothing of its state went out
        return None
    # G is ascending: an index is in G where the search lands on it
    at = tf.searchsorted(g_idx, sent.indices, side="left")
    found = tf.gather(tf.concat([g_idx, [-1]], 0), tf.minimum(at, tf.size(g_idx)))
    delivered = tf.equal(found, sent.indices)
    dropped = tf.logical_not(delivered)
    idx = tf.boolean_mask(sent.indices, dropped)
    values = tf.boolean_mask(sent.values, dropped)
    u = None if sent.u is None else tf.boolean_mask(sent.u, dropped)

    def give_back():
        when(sent.ok, lambda: _restore(slot, idx, values, u))

    if ops.skip:
        kept_u = None if sent.u is None else tf.boolean_mask(sent.u, delivered)
        ops._sent[id(slot)] = Sent(tf.boolean_mask(sent.indices, delivered),
                                   tf.boolean_mask(sent.values, delivered), kept_u, sent.ok)
    else:   # remembered only for this give-back
        ops.forget_sent(slot)
    return give_back


def _restore(slot, idx, values, u) -> None:
    _scatter(slot.residual, idx, values, add=True)
    if u is not None:
        _scatter(slot.velocity, idx, u, add=False)


def _next_ranges(slot, g_idx, numel: int, world: int) -> None:
    """``core.range_bounds`` and the weights of ``core.range_budgets`` from G, for the next step
    (zeros, meaning equal widths, when G holds fewer than N entries)."""
    g = tf.cast(g_idx, tf.int64)
    m = tf.size(g, out_type=tf.int64)

    def from_g():
        at = (m * tf.range(1, world, dtype=tf.int64)) // world
        bounds = tf.concat([[0], tf.gather(g, at), [numel]], 0)
        cuts = tf.searchsorted(g, bounds, side="left", out_type=tf.int64)
        return bounds, cuts[1:] - cuts[:-1]

    def none():
        return tf.zeros([world + 1], tf.int64), tf.zeros([world], tf.int64)

    bounds, weights = tf.cond(m >= world, from_g, none)
    slot.gbounds.assign(bounds)
    slot.gweights.assign(weights)


def exchange_many(engine, slots, grads, world: int, name: str, process_set=None) -> list:
    """The global exchange of several compressed tensors up to G (ranger_hvd's tape, ``Ranger``):
    their error-feedback steps with one batched selection, an alltoall each, one grouped allgather.
    Returns one ``exchange.Context`` per tensor; :func:`finish` each."""
    from .exchange import WIRE_DTYPES, Context

    steps = engine.sparse_steps(slots, grads, [s.tensor_name for s in slots],
                                [s.shape for s in slots], world, token=False)
    flights = start_many(engine, slots, steps, world, WIRE_DTYPES[engine.options.value_dtype],
                         name, process_set)
    return [Context("global", s.shape, s.dtype, slot=s, world=world, flight=f)
            for s, f in zip(slots, flights)]
