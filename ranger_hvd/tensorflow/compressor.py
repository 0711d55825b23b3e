"""``RangerCompressor``: sparse gradient compression with error feedback, for TensorFlow and Horovod.

Hand it to Horovod's own ``horovod.tensorflow.DistributedGradientTape(tape, compression=comp)`` or
tf-keras ``horovod.tensorflow.keras.DistributedOptimizer(opt, compression=comp)``, or to ranger_hvd's
:class:`~ranger_hvd.tensorflow.DistributedGradientTape` (which also takes Keras 3 variables). Every
path runs the same exchange (``exchange.py``): by default each rank sends its own top-k (values and
int32 indices) through an allgather started inside ``compress``, and Horovod's allreduce carries a
1-element token whose result (1 for an average, N for a sum) scales the scatter-added sum.
``selection="random"`` sends the values at shared random coordinates through the allreduce instead.

State is keyed two ways; one compressor serves one model and one of them (mixing raises):

* by *variable*, for ranger_hvd's tape, which knows the variables;
* by *position*, for Horovod's tape and Keras optimizer, which hand ``compress`` only a tensor inside
  a function they trace: the i-th tensor compressed within one traced function owns slot i, and every
  later trace must present the same (shape, dtype) sequence. Collective names follow the same keys, so
  they are identical on every rank.

The per-tensor math is ``core.ErrorFeedback`` (see ``core/engine.py``). All state lives in
``tf.Variable``s created once (lifted out of any function being traced), so eager code and
``tf.function`` behave alike, and the compressor, being a ``tf.Module``, checkpoints through
``tf.train.Checkpoint(compressor=comp)``.
"""

from __future__ import annotations

import sys
import weakref
from typing import Iterable

import numpy as np
import tensorflow as tf

from ranger_hvd import core

from . import _hvd, exchange
from .slots import (Slot, new_counters, new_received, not_converted, safe_name, tf_options,
                    variable_key, variable_name)
from .state import TFOps


def _initialize_if_needed(variables) -> list:
    """Ops that set each of ``variables`` to zeros unless it is initialized (state created in a
    ``tf.compat.v1`` graph after its initializer ran); every state variable starts at zeros."""
    def init(v):
        with tf.control_dependencies([v.assign(tf.zeros(v.shape, v.dtype))]):
            return tf.constant(True)
    return [tf.cond(v.is_initialized(), lambda: tf.constant(False), lambda v=v: init(v))
            for v in variables]


class SharedCompressorError(Exception):
    """One RangerCompressor was used for two models (or two exchange modes); state would be mixed.

    Derived from Exception directly (with its constructor) so that TensorFlow re-raises it with its own
    type when it happens while a function is being traced, instead of wrapping it in a StagingError.
    """


class _Lookup:
    """Plain Python bookkeeping kept out of tf.Module's tracking (non-string keys, weak refs)."""

    def __init__(self):
        self.by_variable = {}  # variable ref (which keeps the variable alive) -> slot
        self.registered = None  # [(name, shape, dtype)] given by variables=, in Horovod's order
        self.graph = None      # weak ref to the traced function graph of the last compress() call
        self.cursor = 0
        self.functions = {}    # cached traced exchanges of the tape in eager mode


_instances = 0
_STACK_SEARCH = 64  # frames from compress() up to Horovod's allreduce_grads (tf.cond adds many)


def _step_graph():
    """The graph whose trace is one step of the model: the innermost graph that is not a tf.cond
    branch or a loop body. Horovod compresses each tensor inside a tf.cond of its own, in a
    ``tf.function`` of its own when it was made eagerly (which Keras may trace twice within one
    trace of its train function: each trace counts from 0), or in a ``tf.Graph`` (v1 graph mode)."""
    graph = tf.compat.v1.get_default_graph()
    while getattr(graph, "is_control_flow_graph", False):
        graph = graph.outer_graph
    return graph


def _horovod_variable(tensor):
    """The variable whose gradient ``tensor`` is, when Horovod's ``allreduce_grads(grads, vars)`` is
    on the call stack with it (Horovod's tape and Keras optimizer pass it the variables; the
    compressor is not told). None when it cannot be found."""
    frame = sys._getframe(2)
    for _ in range(_STACK_SEARCH):
        if frame is None:
            return None
        code = frame.f_code
        # tf.function converts Horovod's function (autograph): tf__allreduce_grads
        if code.co_name.endswith("allreduce_grads") and "horovod" in code.co_filename \
                or code.co_name == "tf__allreduce_grads":
            grads, variables = frame.f_locals.get("grads"), frame.f_locals.get("vars")
            if not isinstance(grads, (list, tuple)) or not isinstance(variables, (list, tuple)):
                return None
            for grad, variable in zip(grads, variables):
                if grad is tensor:
                    return variable
            return None
        frame = frame.f_back
    return None


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
        name: tag of the compressor's collectives (default: ``ranger<creation index>``, the same on
            every rank when ranks create compressors in the same order).
        process_set: the Horovod process set of the exchange (default: the global one).
        **options: the rest of :class:`ranger_hvd.core.RangerOptions` (``selection``,
            ``compress_1d``, ``warmup_steps``, ``warmup_start_density``, ``clip_norm``,
            ``value_dtype``, ``check_finite``, ``sample_fraction``, ``seed``, ``exchange``:
            ``"allgather"`` or ``"global_topk"``, see ``global_topk.py``).

    Raises ``ranger_hvd.core.OptionsError`` on options that make no sense.
    """

    def __init__(self, density: float = 0.01, momentum: float = 0.0, min_elements: int = 1024,
                 variables: Iterable | None = None, name: str | None = None, process_set=None,
                 **options):
        global _instances
        self.options = tf_options(density=density, momentum=momentum,
                                         min_elements=min_elements, **options)
        # Creation order is the same on every rank, so it makes rank-independent collective names.
        self.tag = name or f"ranger{_instances}"
        _instances += 1
        super().__init__(name=safe_name(self.tag))
        self.world_size: int | None = None  # read from Horovod on first use; tests may set it
        self.mode: str | None = None        # "variables" (our tape) or "positional" (Horovod's)
        self._lookup = _Lookup()
        self.slots = []                     # tracked list: index i is checkpointed as slots/i
        self.counters = new_counters()
        self.received = new_received()
        self.engine = core.ErrorFeedback(self.options,
                                         TFOps(self.options, self.counters, self.received))
        self.process_set = process_set
        with tf.init_scope():
            self.rounds = tf.Variable(0, dtype=tf.int64, trainable=False, name="rounds")
        if variables is not None:
            self._lookup.registered = [(variable_name(v), tuple(v.shape), tf.as_dtype(v.dtype))
                                       for v in variables]
            self._set_mode("positional")
            for i, (vname, shape, dtype) in enumerate(self._lookup.registered):
                # Positions make the names unique (tf.Variable names repeat); the name seeds random-k.
                self._new_slot(f"{i}.{vname}", shape, dtype, label=vname)

    # ----------------------------------------------------------------------------- configuration
    def is_compressed(self, shape) -> bool:
        """Whether a tensor of this shape is sparsified (else it travels dense)."""
        return core.is_compressed(tuple(int(s) for s in shape), self.options)

    def world(self) -> int:
        if self.world_size is None:
            ps = self.process_set
            self.world_size = ps.size() if ps is not None else _hvd.ensure_init().size()
        return self.world_size

    def _set_mode(self, mode: str) -> None:
        if self.mode is None:
            self.mode = mode
        elif self.mode != mode:
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}' already serves "
                f"{'ranger_hvd.tensorflow.DistributedGradientTape' if self.mode == 'variables' else 'horovod.tensorflow.DistributedGradientTape'}"
                f"; create one compressor per model and per tape")

    def _new_slot(self, name: str, shape, dtype, label: str | None = None) -> Slot:
        compressed = self.is_compressed(shape)
        # the global exchange keeps each compressed tensor's N+1 range bounds and N weights
        world = self.world() if compressed and self.options.exchange == "global_topk" else None
        slot = Slot(len(self.slots), name, shape, dtype, compressed, self.options.momentum, label,
                    world)
        self.slots.append(slot)
        return slot

    def slot_for(self, variable) -> Slot:
        """The state of one variable, created on first use (mode "variables")."""
        self._set_mode("variables")
        key = variable_key(variable)
        slot = self._lookup.by_variable.get(key)
        if slot is None:
            vname = variable_name(variable)
            slot = self._new_slot(vname, variable.shape, variable.dtype, label=vname)
            self._lookup.by_variable[key] = slot
        return slot

    def build(self, variables: Iterable) -> None:
        """Creates the state of these variables now (e.g. before restoring a checkpoint)."""
        for v in variables:
            self.slot_for(v)

    # ----------------------------------------------------------------------------- keyed by variable
    @not_converted
    def compress_variable(self, variable, grad):
        """One step of one variable's state, without communication: (indices, values) if sparse,
        else (None, the dense tensor to reduce). For tests against ``core.reference`` and PyTorch."""
        slot = self.slot_for(variable)
        grad = tf.convert_to_tensor(grad)
        if grad.dtype != slot.dtype:
            grad = tf.cast(grad, slot.dtype)
        if not slot.compressed:
            return None, self.engine.dense_step(slot, grad, slot.tensor_name, grad.dtype.size)
        idx, values, _ = self.engine.sparse_step(slot, grad, slot.tensor_name, slot.shape,
                                                 self.world())
        return idx, values

    def end_step(self) -> None:
        self.counters.assign_add(tf.constant(core.rules.STEP_COUNTS, tf.int64))

    # ----------------------------------------------------------------------------- (b) positional
    def _position(self, tensor) -> Slot:
        """The slot of the next tensor Horovod hands us, by order within the traced step."""
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
            root = _step_graph()
            if lk.graph is None or lk.graph() is not root:
                lk.graph, lk.cursor = weakref.ref(root), 0
            pos = lk.cursor
            lk.cursor += 1
        variable = _horovod_variable(tensor)
        shape = self._static_shape(tensor, pos, variable)
        if pos < len(self.slots):
            slot = self.slots[pos]
            if slot.shape != shape or slot.dtype != tensor.dtype:
                raise SharedCompressorError(
                    f"RangerCompressor '{self.tag}': tensor #{pos} has shape {shape} {tensor.dtype.name}, "
                    f"but this compressor's slot #{pos} ('{slot.tensor_name}') holds "
                    f"{slot.shape} {slot.dtype.name}. Horovod does not say which variable a tensor "
                    f"belongs to, so state is keyed by order; one compressor is shared by two models "
                    f"(or the gradient list changed). Create one RangerCompressor per model.")
            if slot.label is None and variable is not None:
                slot.label = variable_name(variable)
            return slot
        if self._lookup.registered is not None:
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}': tensor #{pos} {shape} is beyond the "
                f"{len(self._lookup.registered)} registered variables; one compressor is shared by two models")
        label = None if variable is None else variable_name(variable)
        try:
            return self._new_slot(f"tensor{pos}", shape, tensor.dtype, label)
        except ValueError as exc:  # TF forbids new variables in this trace (a retrace of a step)
            raise SharedCompressorError(
                f"RangerCompressor '{self.tag}' could not create its state while TensorFlow traced "
                f"this step ({exc}). Pass variables=model.trainable_variables when constructing the "
                f"compressor so the state exists before training starts.") from None

    def _static_shape(self, tensor, pos: int, variable) -> tuple:
        """The tensor's shape, known in full. A densified ``tf.IndexedSlices`` (an embedding's
        gradient under ``sparse_as_dense``) has an unknown first dimension: it comes from the
        variable behind it, the registered layout or the slot that an earlier trace made."""
        if tensor.shape.is_fully_defined():
            return tuple(int(s) for s in tensor.shape)
        known = [tuple(variable.shape)] if variable is not None else []
        if pos < len(self.slots):
            known.append(self.slots[pos].shape)
        for shape in known:
            if tensor.shape.is_compatible_with(shape) and None not in shape:
                return tuple(int(s) for s in shape)
        raise SharedCompressorError(
            f"RangerCompressor '{self.tag}': tensor #{pos} has shape {tensor.shape}, not known in "
            f"full while TensorFlow traces the step, and nothing says which variable it belongs to. "
            f"Pass variables=model.trainable_variables when constructing the compressor.")

    @not_converted
    def compress(self, tensor):
        """Horovod's hook: (tensor for Horovod's allreduce, context); see ``exchange.start``."""
        slot = self._position(tensor)
        if not exchange.in_program_order():
            # A tf.compat.v1 graph may have run its variables' initializer before this compressor
            # made its state (Horovod's own tests do): initialize what is not, first.
            ready = _initialize_if_needed(self._graph_state(slot))
            with tf.control_dependencies(ready):
                carried, ctx = self._compress_slot(slot, tensor)
            ctx.ready = ready   # decompress's counter update too runs after them
            return carried, ctx
        return self._compress_slot(slot, tensor)

    def _graph_state(self, slot) -> list:
        return [v for v in (self.counters, self.received, self.rounds, slot.step, slot.residual,
                            slot.velocity, slot.gbounds, slot.gweights) if v is not None]

    def _compress_slot(self, slot, tensor):
        # A runtime check that every slot steps once per round: with two models sharing the
        # compressor (one a prefix of the other) the counts drift apart and this fails loudly.
        if slot.index == 0:
            self.rounds.assign_add(1)
        tf.debugging.assert_equal(
            slot.step, self.rounds - 1,
            message=f"RangerCompressor '{self.tag}': slot #{slot.index} ('{slot.tensor_name}') is out "
                    f"of step with slot #0; one compressor is shared by two models or tapes")
        return exchange.start(self.engine, slot, tensor, self.world(),
                              f"RangerTopkHvd_{safe_name(self.tag)}_{slot.index}", self.process_set)

    @not_converted
    def decompress(self, tensor, ctx):
        """Horovod's hook: the reduced gradient in the original shape; see ``exchange.finish``."""
        with tf.control_dependencies(ctx.ready):
            counted = exchange.count_received(self.engine, tensor, ctx)
        # in a tf.compat.v1 graph only what the result depends on runs
        with tf.control_dependencies([] if counted is None else [counted]):
            return exchange.finish(tensor, ctx, self.options.value_dtype)

    # ----------------------------------------------------------------------------- reporting, state
    def stats(self) -> dict:
        """Cumulative bytes this rank handed to collectives (``bytes_sent``) and received from
        other ranks through them (``bytes_received``), and what plain fp32 would have sent."""
        # Under Horovod's tape a step is one round of compress calls.
        steps = int(self.rounds.numpy()) if self.mode == "positional" else None
        out = core.stats_dict(self.counters.numpy(), steps)
        out["bytes_received"] = int(self.received.numpy())
        return out

    def state_dict(self) -> dict:
        """NumPy copies of every slot's state, keyed by tensor name (checkpoints may also use
        ``tf.train.Checkpoint(compressor=self)``)."""
        out = {"counters": self.counters.numpy(), "rounds": int(self.rounds.numpy()),
               "bytes_received": int(self.received.numpy()), "slots": {}}
        for slot in self.slots:
            out["slots"][slot.tensor_name] = {
                "step": int(slot.step.numpy()),
                "residual": None if slot.residual is None else slot.residual.numpy(),
                "velocity": None if slot.velocity is None else slot.velocity.numpy(),
            }
            if slot.gbounds is not None:   # the global exchange's ranges follow the last selection
                out["slots"][slot.tensor_name]["global_ranges"] = (slot.gbounds.numpy(),
                                                                  slot.gweights.numpy())
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` into existing slots (build them first, or pass variables=)."""
        self.counters.assign(state["counters"])
        self.rounds.assign(state.get("rounds", 0))
        self.received.assign(state.get("bytes_received", 0))
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
            if slot.gbounds is not None:
                ranges = st.get("global_ranges")
                if ranges is None or len(ranges[0]) != int(slot.gbounds.shape[0]):
                    ranges = (np.zeros(slot.gbounds.shape, np.int64),   # equal widths again
                              np.zeros(slot.gweights.shape, np.int64))
                slot.gbounds.assign(ranges[0])
                slot.gweights.assign(ranges[1])

    def residual_of(self, variable) -> tf.Tensor | None:
        """This rank's current residual (e, or v with momentum) of a variable, in its shape."""
        slot = self.slot_for(variable)
        return None if slot.residual is None else tf.reshape(slot.residual, slot.shape)

    def __repr__(self) -> str:
        o = self.options
        return (f"RangerCompressor(density={o.density}, momentum={o.momentum}, "
                f"selection={o.selection!r}, min_elements={o.min_elements}, "
                f"value_dtype={o.value_dtype!r}, tag={self.tag!r})")
