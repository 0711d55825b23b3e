"""``RangerCompressor``: sparse gradient compression with error feedback, for TensorFlow and Horovod.

One object serves two exchanges; which one runs depends on who holds it (one compressor serves one of
them, for one model: mixing raises an error).

**Top-k with an allgather** (``ranger_hvd.tensorflow.DistributedGradientTape``). Each rank sends the k
entries of largest magnitude of its own accumulated gradient as (int32 index, value) pairs through one
allgather per tensor; every rank scatter-adds all N payloads into one zeroed gradient and divides by N.
State is keyed by *variable* (tf.Variable or Keras 3 variable).

**Random-k inside Horovod's allreduce** (``horovod.tensorflow.DistributedGradientTape(tape,
compression=comp)``). Horovod sums the compressed tensors elementwise and hands :meth:`compress` only a
tensor, inside a function it traces. All ranks must send values for the *same* coordinates, so they
come from a stateless generator seeded by ``core.random_k_seed(seed, name, 0)`` and the tensor's step
counter: identical on every rank with no message. Only the k values travel; the indices stay in the
context. State is keyed by *position*: the i-th tensor compressed within one traced function owns
slot i, and every later trace must present the same (shape, dtype) sequence (see :meth:`compress`).

Both keep the same per-tensor state, stepping exactly as ``core/reference.py``::

    m = 0:  acc = e + g ;              send acc[S] ;  e = acc with acc[S] = 0
    m > 0:  u = m*u + g ;  v = v + u ; send v[S]   ;  v[S] = 0 ; u[S] = 0   (momentum factor masking)

where S is the top-k set (or the shared random set). With m = 0 nothing is lost: for every rank, what
it sent plus its residual e equals the sum of its gradients. Tensors that ``core.is_compressed`` rejects
(small and, by default, 1-D ones) travel dense; with m > 0 they carry plain local momentum u = m*u + g
(everything is sent, so nothing is masked), which summed over ranks is ordinary momentum on the
averaged gradient. This is the PyTorch backend's rule too, so the numbers match across backends.

All state lives in ``tf.Variable``s created once (lifted out of any function being traced), so eager
code and ``tf.function`` behave alike, and the compressor, being a ``tf.Module``, checkpoints through
``tf.train.Checkpoint(compressor=comp)``.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable

import tensorflow as tf

from ranger_hvd import core
from ranger_hvd.core.options import VALUE_ITEMSIZE

from . import _hvd
from .selection import k_for_step, random_k_indices, seed_pair, topk_indices

WIRE_DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}

# Order of the counters in the stats vector (same keys as core.CompressionStats).
_COUNTERS = ("bytes_sent", "bytes_dense", "tensors_sparse", "tensors_dense",
             "elements_selected", "elements_total", "steps")


class SharedCompressorError(Exception):
    """One RangerCompressor was used for two models (or two exchange modes); state would be mixed.

    Derived from Exception directly (with its constructor) so that TensorFlow re-raises it with its own
    type when it happens while a function is being traced, instead of wrapping it in a StagingError.
    """


def safe_name(name: str) -> str:
    """A name Horovod and TensorFlow accept for an op: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def variable_key(variable):
    """A hashable identity of a tf.Variable or a Keras 3 variable (keyed by its tf.Variable)."""
    if isinstance(variable, tf.Variable):
        return variable.ref()
    inner = getattr(variable, "value", None)  # Keras 3: the backing tf.Variable
    if isinstance(inner, tf.Variable):
        return inner.ref()
    raise TypeError(f"expected a tf.Variable or a Keras variable, got {type(variable).__name__}")


def variable_name(variable) -> str:
    """Keras 3 paths are unique within a model ("dense/kernel"); tf.Variable names may repeat."""
    return str(getattr(variable, "path", None) or variable.name).split(":")[0]


# ---------------------------------------------------------------------------------------------------
# The math of one tensor, shared by the tape, the Horovod hook and the Keras optimizer.
# ``residual`` and ``velocity`` are variables (tf or Keras) of any shape; they are read and written
# flat. Everything is plain TF ops, so it runs eagerly or inside a traced function alike.

def checked(grad: tf.Tensor, name: str, options) -> tf.Tensor:
    """The gradient, after making sure it holds no NaN or Inf (the error names the variable)."""
    if not options.check_finite:
        return grad
    # A sum is one streaming read and propagates NaN/Inf, several times cheaper than check_numerics;
    # only when it is not finite (an overflow of large finite values can also cause that) does the
    # exact elementwise check run and raise.
    return tf.cond(tf.math.is_finite(tf.reduce_sum(grad)), lambda: tf.identity(grad),
                   lambda: tf.debugging.check_numerics(
                       grad, f"ranger_hvd: non-finite gradient for variable '{name}' (NaN or Inf); "
                             f"it would poison the error-feedback residual"))


def clipped(g: tf.Tensor, options, world_size: int) -> tf.Tensor:
    """DGC local clipping: scale g so that ||g|| <= clip_norm / sqrt(N) (norm taken in float64)."""
    limit = core.clip_threshold(options, world_size)
    if limit is None:
        return g
    norm = tf.norm(tf.cast(g, tf.float64))
    factor = tf.cast(limit / tf.maximum(norm, limit), g.dtype)
    return tf.where(norm > limit, g * factor, g)


def _read_flat(variable) -> tf.Tensor:
    return tf.reshape(tf.convert_to_tensor(variable), [-1])


def _assign_flat(variable, flat: tf.Tensor):
    target = _backing(variable)
    target = variable if target is None else target
    return target.assign(tf.reshape(flat, target.shape))


def _backing(variable):
    """The tf.Variable behind a tf.Variable or a Keras 3 variable (None if there is none)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    return inner if isinstance(inner, tf.Variable) else None


def _added(variable, flat: tf.Tensor) -> tf.Tensor:
    """variable + flat, flat. With a tf.Variable behind it the sum is formed in the variable's own
    buffer (an in-place assign_add, then a read that aliases it) instead of a new full-size tensor;
    the caller finishes with ``settle``, which assigns the final value either way."""
    tfv = _backing(variable)
    if tfv is None:
        return _read_flat(variable) + flat
    tfv.assign_add(tf.reshape(flat, tfv.shape))
    return tf.reshape(tf.convert_to_tensor(tfv), [-1])


def accumulate(g: tf.Tensor, residual, velocity, momentum: float):
    """acc = e + g (m = 0), or u = m*u + g, acc = v + u (m > 0). Returns (acc, u or None).

    acc may share the residual's buffer: until ``settle`` runs, read it only through acc.
    """
    if momentum > 0:
        u = tf.cast(momentum, g.dtype) * _read_flat(velocity) + g
        return _added(residual, u), u
    return _added(residual, g), None


def _zero_at(fresh: tf.Tensor, idx: tf.Tensor, after) -> tf.Tensor:
    """``fresh`` with ``fresh[idx] = 0``, written into its own buffer (no full-size copy).

    ``InplaceUpdate`` mutates its input, so ``fresh`` must be a buffer of this step that nothing else
    holds: u (a fresh product), or acc (a fresh sum, or the residual's own buffer, which its
    assign_add made exclusive or which a read in copy-on-read mode copied). It runs only once
    everything that reads ``fresh`` (``after``: the selection and the gathered values) is done.
    """
    with tf.control_dependencies(after):
        return tf.raw_ops.InplaceUpdate(x=fresh, i=idx, v=tf.zeros(tf.shape(idx), fresh.dtype))


def settle(acc: tf.Tensor, u, idx: tf.Tensor, values: tf.Tensor, residual, velocity) -> None:
    """Keep what was not sent: e (or v) = acc with acc[S] = 0; with momentum also u[S] = 0.

    ``values`` (acc[S]) must already be gathered: acc and u are zeroed in place. The assignments
    make the result the variables' value in every case (a no-op alias when acc is the residual's
    buffer already, a copy when the variable is in copy-on-read mode).
    """
    _assign_flat(residual, _zero_at(acc, idx, [values]))
    if u is not None:
        _assign_flat(velocity, _zero_at(u, idx, [values]))


def topk_step(grad, residual, velocity, k, options, world_size: int, name: str):
    """One error-feedback (or DGC momentum) step of one tensor: (ascending int32 indices, values)."""
    g = clipped(tf.reshape(checked(grad, name, options), [-1]), options, world_size)
    acc, u = accumulate(g, residual, velocity, options.momentum)
    idx = topk_indices(acc, k, options.sample_fraction)
    values = tf.gather(acc, idx)
    settle(acc, u, idx, values, residual, velocity)
    return idx, values


def dense_step(grad, velocity, options, name: str):
    """A tensor that travels dense: the gradient itself, or its local momentum u = m*u + g."""
    g = checked(grad, name, options)
    if options.momentum > 0:
        # the velocity may be stored flat (compressor slots) or shaped (optimizer slots)
        u = tf.cast(options.momentum, g.dtype) * tf.reshape(tf.convert_to_tensor(velocity), tf.shape(g)) + g
        _assign_flat(velocity, tf.reshape(u, [-1]))
        return u
    return g


# ---------------------------------------------------------------------------------------------------
# Exchanges through Horovod, with explicit rank-independent names.

def sparse_exchange(idx, values, numel: int, dtype, name: str, *, average: bool, world_size: int,
                    value_dtype: str, process_set=None, predivide: float = 1.0) -> tf.Tensor:
    """All ranks' (indices, values) into one dense flat tensor: a single allgather, one scatter-add.

    Values and indices travel packed, as raw bits, in one integer tensor of the values' width: [k, 2]
    int32 for fp32 values, [k, 3] int16 for fp16/bf16 (an int32 index is two int16 columns). A tensor
    thus costs one collective of exactly k * (value bytes + 4) bytes, Horovod only copies the bits,
    and bfloat16 (which Horovod's ops do not accept) can travel too. The reconstruction is one
    scatter-add into zeros, never N dense tensors, then a division by N for an average.
    """
    hvd = _hvd.module()
    wire = WIRE_DTYPES[value_dtype]
    vals = tf.cast(values, wire)
    if average and predivide != 1.0:
        vals = vals * tf.cast(1.0 / predivide, wire)
    if wire == tf.float32:
        payload = tf.stack([tf.bitcast(vals, tf.int32), idx], axis=1)
    else:
        payload = tf.concat([tf.bitcast(vals, tf.int16)[:, None], tf.bitcast(idx, tf.int16)], axis=1)
    kwargs = {"process_set": process_set} if process_set is not None else {}
    gathered = hvd.allgather(payload, name=name, ignore_name_scope=True, **kwargs)
    if wire == tf.float32:
        all_vals, all_idx = tf.bitcast(gathered[:, 0], wire), gathered[:, 1]
    else:
        all_vals, all_idx = tf.bitcast(gathered[:, 0], wire), tf.bitcast(gathered[:, 1:], tf.int32)
    out = tf.scatter_nd(all_idx[:, None], tf.cast(all_vals, dtype), [numel])
    if average:
        out = out * tf.cast(predivide / world_size, dtype) if predivide != 1.0 else out / world_size
    return out


def dense_exchange(tensor, name: str, *, average: bool, process_set=None,
                   predivide: float = 1.0) -> tf.Tensor:
    """A plain Horovod allreduce (sum or average), as Horovod's own tape would do it."""
    hvd = _hvd.module()
    kwargs = {"process_set": process_set} if process_set is not None else {}
    if average:
        return hvd.allreduce(tensor, op=hvd.Average, prescale_factor=1.0 / predivide,
                             postscale_factor=predivide, name=name, ignore_name_scope=True, **kwargs)
    return hvd.allreduce(tensor, op=hvd.Sum, name=name, ignore_name_scope=True, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Byte accounting, counted where the tensors are handed to collectives (k may be a runtime tensor, so
# the counters are an int64 variable in _COUNTERS order rather than Python integers).

def count_sparse(counters, numel: int, k, value_dtype: str, with_indices: bool = True) -> None:
    """k values (and int32 indices): core.sparse_bytes; the fp32 baseline is core.dense_fp32_bytes."""
    per = VALUE_ITEMSIZE[value_dtype] + (4 if with_indices else 0)
    k = tf.cast(k, tf.int64)
    one, zero = tf.constant(1, tf.int64), tf.constant(0, tf.int64)
    counters.assign_add(tf.stack([k * per, tf.constant(core.dense_fp32_bytes(numel), tf.int64),
                                  one, zero, k, tf.constant(numel, tf.int64), zero]))


def count_dense(counters, numel: int, itemsize: int) -> None:
    counters.assign_add(tf.constant(
        [numel * itemsize, core.dense_fp32_bytes(numel), 0, 1, numel, numel, 0], tf.int64))


def stats_dict(counter_values, steps: int | None = None) -> dict:
    s = core.CompressionStats()
    s.load(dict(zip(_COUNTERS, (int(x) for x in counter_values))))
    if steps is not None:
        s.steps = int(steps)
    return s.as_dict()


class _Slot(tf.Module):
    """State of one tensor: residual e (or v), velocity u (with momentum) and a step counter."""

    def __init__(self, index: int, name: str, shape, dtype, compressed: bool, momentum: float):
        super().__init__(name=f"slot{index}")
        self.index = index
        self.tensor_name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = tf.as_dtype(dtype)
        self.numel = core.numel_of(self.shape)
        self.compressed = compressed
        with tf.init_scope():  # created once, eagerly, even when first met inside a trace
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.residual = (tf.Variable(tf.zeros([self.numel], self.dtype), trainable=False,
                                         name="residual") if compressed else None)
            self.velocity = (tf.Variable(tf.zeros([self.numel], self.dtype), trainable=False,
                                         name="velocity") if momentum > 0 else None)


class _Lookup:
    """Plain Python bookkeeping kept out of tf.Module's tracking (non-string keys, weak refs)."""

    def __init__(self):
        self.by_variable = {}  # variable ref (which keeps the variable alive) -> slot
        self.registered = None  # [(name, shape, dtype)] given by variables=, in Horovod's order
        self.graph = None      # weak ref to the traced function graph of the last compress() call
        self.cursor = 0
        self.functions = {}    # cached traced exchanges of the tape in eager mode


_instances = 0


class RangerCompressor(tf.Module):
    """Sparse top-k compression with error feedback (and optional DGC momentum correction).

    Args:
        density: fraction d of each compressed tensor's entries sent per step; k = max(1, ceil(d*n)).
        momentum: DGC momentum correction m (0 = plain error feedback). With m > 0 the optimizer must
            not add momentum of its own (plain SGD, or use ``Ranger``).
        min_elements: tensors with fewer entries go dense.
        variables: optional, for Horovod's own tape: the variables in the order their gradients reach
            Horovod (``model.trainable_variables``). Names the slots, creates them now (so a checkpoint
            can be restored before the first step) and lets every trace be checked against them.
        **options: the rest of :class:`ranger_hvd.core.RangerOptions` (``compress_1d``,
            ``warmup_steps``, ``warmup_start_density``, ``clip_norm``, ``value_dtype``,
            ``check_finite``, ``sample_fraction``, ``seed``).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, density: float = 0.01, momentum: float = 0.0, min_elements: int = 1024,
                 variables: Iterable | None = None, name: str | None = None, **options):
        global _instances
        self.options = core.make_options(density=density, momentum=momentum,
                                         min_elements=min_elements, **options)
        # Creation order is the same on every rank, so it makes rank-independent collective names.
        self.tag = name or f"ranger{_instances}"
        _instances += 1
        super().__init__(name=safe_name(self.tag))
        self.world_size: int | None = None  # read from Horovod on first use; tests may set it
        self.mode: str | None = None        # "variables" (our tape) or "positional" (Horovod's)
        self._lookup = _Lookup()
        self.slots = []                     # tracked list: index i is checkpointed as slots/i
        with tf.init_scope():
            self.counters = tf.Variable(tf.zeros([len(_COUNTERS)], tf.int64), trainable=False,
                                        name="counters")
            self.rounds = tf.Variable(0, dtype=tf.int64, trainable=False, name="rounds")
        if variables is not None:
            self._lookup.registered = [(variable_name(v), tuple(v.shape), tf.as_dtype(v.dtype))
                                       for v in variables]
            self._set_mode("positional")
            for i, (vname, shape, dtype) in enumerate(self._lookup.registered):
                # Positions make the names unique (tf.Variable names repeat); the name seeds random-k.
                self._new_slot(f"{i}.{vname}", shape, dtype)

    # ----------------------------------------------------------------------------- configuration
    def is_compressed(self, shape) -> bool:
        """Whether a tensor of this shape is sparsified (else it travels dense)."""
        return core.is_compressed(tuple(int(s) for s in shape), self.options)

    def world(self) -> int:
        if self.world_size is None:
            self.world_size = _hvd.ensure_init().size()
        return self.world_size

    def _set_mode(self, mode: str) -> None:
        if self.mode is None:
            self.mode = mode
        elif self.mode != mode:
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}' already serves "
                f"{'ranger_hvd.tensorflow.DistributedGradientTape' if self.mode == 'variables' else 'horovod.tensorflow.DistributedGradientTape'}"
                f"; create one compressor per model and per tape")

    def _new_slot(self, name: str, shape, dtype) -> _Slot:
        slot = _Slot(len(self.slots), name, shape, dtype, self.is_compressed(shape),
                     self.options.momentum)
        self.slots.append(slot)
        return slot

    def slot_for(self, variable) -> _Slot:
        """The state of one variable, created on first use (mode "variables")."""
        self._set_mode("variables")
        key = variable_key(variable)
        slot = self._lookup.by_variable.get(key)
        if slot is None:
            slot = self._new_slot(variable_name(variable), variable.shape, variable.dtype)
            self._lookup.by_variable[key] = slot
        return slot

    def build(self, variables: Iterable) -> None:
        """Creates the state of these variables now (e.g. before restoring a checkpoint)."""
        for v in variables:
            self.slot_for(v)

    # ----------------------------------------------------------------------------- (a) by variable
    def compress_variable(self, variable, grad):
        """One step of one variable's state: (indices, values) if sparse, else (None, dense tensor).

        No communication; :class:`DistributedGradientTape` exchanges the result. Exposed so tests can
        compare against ``core.reference`` and the PyTorch backend without Horovod.
        """
        slot = self.slot_for(variable)
        grad = tf.convert_to_tensor(grad)
        if grad.dtype != slot.dtype:
            grad = tf.cast(grad, slot.dtype)
        if not slot.compressed:
            out = dense_step(grad, slot.velocity, self.options, slot.tensor_name)
            slot.step.assign_add(1)
            return None, out
        k = k_for_step(slot.numel, self.options, slot.step)
        idx, values = topk_step(grad, slot.residual, slot.velocity, k, self.options, self.world(),
                                slot.tensor_name)
        slot.step.assign_add(1)
        return idx, values

    def record_sparse(self, numel: int, k, with_indices: bool = True) -> None:
        count_sparse(self.counters, numel, k, self.options.value_dtype, with_indices)

    def record_dense(self, numel: int, itemsize: int) -> None:
        count_dense(self.counters, numel, itemsize)

    def end_step(self) -> None:
        self.counters.assign_add(tf.constant([0, 0, 0, 0, 0, 0, 1], tf.int64))

    # ----------------------------------------------------------------------------- (b) positional
    def _position(self, tensor) -> _Slot:
        """The slot of the next tensor Horovod hands us, by order within the traced function."""
        self._set_mode("positional")
        lk = self._lookup
        if tf.executing_eagerly():
            # No trace delimits a step: wrap around the registered layout.
            if not self._lookup.registered:
                raise SharedCompressorError(
                    "RangerCompressor.compress was called eagerly; Horovod's tape calls it inside a "
                    "traced function. For eager use pass variables=model.trainable_variables so the "
                    "compressor knows the layout, or use ranger_hvd.tensorflow.DistributedGradientTape")
            pos = lk.cursor % len(self._lookup.registered)
            lk.cursor = pos + 1
        else:
            root = tf.compat.v1.get_default_graph()
            # Horovod compresses inside tf.cond branches; the step is the enclosing function graph.
            while hasattr(getattr(root, "outer_graph", None), "outer_graph"):
                root = root.outer_graph
            if lk.graph is None or lk.graph() is not root:
                lk.graph, lk.cursor = weakref.ref(root), 0
            pos = lk.cursor
            lk.cursor += 1
        shape = tuple(int(s) for s in tensor.shape)
        if pos < len(self.slots):
            slot = self.slots[pos]
            if slot.shape != shape or slot.dtype != tensor.dtype:
                raise SharedCompressorError(
                    f"RangerCompressor '{self.tag}': tensor #{pos} has shape {shape} {tensor.dtype.name}, "
                    f"but this compressor's slot #{pos} ('{slot.tensor_name}') holds "
                    f"{slot.shape} {slot.dtype.name}. Horovod does not say which variable a tensor "
                    f"belongs to, so state is keyed by order; one compressor is shared by two models "
                    f"(or the gradient list changed). Create one RangerCompressor per model.")
            return slot
        if self._lookup.registered is not None:
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}': tensor #{pos} {shape} is beyond the "
                f"{len(self._lookup.registered)} registered variables; one compressor is shared by two models")
        try:
            return self._new_slot(f"tensor{pos}", shape, tensor.dtype)
        except ValueError as exc:  # e.g. tf-keras fit traces Horovod's function where TF forbids it
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}' could not create its state while TensorFlow traced "
                f"this step ({exc}). Pass variables=model.trainable_variables when constructing the "
                f"compressor so the state exists before training starts.") from None

    def compress(self, tensor):
        """Horovod's hook: random-k values with error feedback; the context keeps the indices.

        Every rank draws the same k coordinates from the shared seed, so Horovod's elementwise sum of
        the [k] value tensors is the sum of the sparse gradients; fewer bytes than dense travel.
        """
        slot = self._position(tensor)
        # A runtime check that every slot steps once per round: with two models sharing the
        # compressor (one a prefix of the other) the counts drift apart and this fails loudly.
        if slot.index == 0:
            self.rounds.assign_add(1)
        tf.debugging.assert_equal(
            slot.step, self.rounds - 1,
            message=f"RangerCompressor '{self.tag}': slot #{slot.index} ('{slot.tensor_name}') is out "
                    f"of step with slot #0; one compressor is shared by two models or tapes")
        if not slot.compressed:
            out = dense_step(tensor, slot.velocity, self.options, slot.tensor_name)
            self.record_dense(slot.numel, out.dtype.size)
            slot.step.assign_add(1)
            return out, None
        k = k_for_step(slot.numel, self.options, slot.step)
        world = self.world()
        g = clipped(tf.reshape(checked(tensor, slot.tensor_name, self.options), [-1]),
                    self.options, world)
        acc, u = accumulate(g, slot.residual, slot.velocity, self.options.momentum)
        base = core.random_k_seed(self.options.seed, slot.tensor_name, 0)
        idx = random_k_indices(slot.numel, k, seed_pair(base, slot.step))
        values = tf.gather(acc, idx)
        settle(acc, u, idx, values, slot.residual, slot.velocity)
        self.record_sparse(slot.numel, tf.size(idx), with_indices=False)
        slot.step.assign_add(1)
        return tf.cast(values, WIRE_DTYPES[self.options.value_dtype]), (idx, slot.shape, slot.dtype)

    def decompress(self, tensor, ctx):
        """Horovod's hook: scatter the summed (or averaged) values back to the full shape."""
        if ctx is None:
            return tensor
        idx, shape, dtype = ctx
        numel = core.numel_of(shape)
        # The indices are distinct and ascending, so writing beats a scatter-add (which costs about
        # 100 ns per index on CPU); adding +0 keeps the scatter-add's +0.0 where a value is -0.0.
        values = tf.cast(tensor, dtype) + tf.zeros([], dtype)
        return tf.reshape(tf.raw_ops.SparseToDense(sparse_indices=idx, output_shape=[numel],
                                                   sparse_values=values,
                                                   default_value=tf.zeros([], dtype)), shape)

    # ----------------------------------------------------------------------------- reporting, state
    def stats(self) -> dict:
        """Cumulative bytes this rank handed to collectives, and what plain fp32 would have sent."""
        # Under Horovod's tape a step is one round of compress calls.
        steps = int(self.rounds.numpy()) if self.mode == "positional" else None
        return stats_dict(self.counters.numpy(), steps)

    def state_dict(self) -> dict:
        """NumPy copies of every slot's state, keyed by tensor name (checkpoints may also use
        ``tf.train.Checkpoint(compressor=self)``)."""
        out = {"counters": self.counters.numpy(), "rounds": int(self.rounds.numpy()), "slots": {}}
        for slot in self.slots:
            out["slots"][slot.tensor_name] = {
                "step": int(slot.step.numpy()),
                "residual": None if slot.residual is None else slot.residual.numpy(),
                "velocity": None if slot.velocity is None else slot.velocity.numpy(),
            }
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` into existing slots (build them first, or pass variables=)."""
        self.counters.assign(state["counters"])
        self.rounds.assign(state.get("rounds", 0))
        by_name = {slot.tensor_name: slot for slot in self.slots}
        for name, st in state["slots"].items():
            if name not in by_name:
                raise KeyError(f"no slot named {name!r}: build the compressor on the same variables "
                               f"before loading its state")
            slot = by_name[name]
            slot.step.assign(st["step"])
            if slot.residual is not None and st["residual"] is not None:
                slot.residual.assign(st["residual"])
            if slot.velocity is not None and st["velocity"] is not None:
                slot.velocity.assign(st["velocity"])

    def residual_of(self, variable) -> tf.Tensor | None:
        """This rank's current residual (e, or v with momentum) of a variable, in its shape."""
        slot = self.slot_for(variable)
        return None if slot.residual is None else tf.reshape(slot.residual, slot.shape)

    def __repr__(self) -> str:
        o = self.options
        return (f"RangerCompressor(density={o.density}, momentum={o.momentum}, "
                f"min_elements={o.min_elements}, value_dtype={o.value_dtype!r}, tag={self.tag!r})")
