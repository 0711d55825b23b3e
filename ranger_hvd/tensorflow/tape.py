"""``DistributedGradientTape``: Horovod's tape, with real per-rank top-k through allgather.

Wrap a tape as with Horovod::

    with tf.GradientTape() as tape:
        loss = ...
    tape = DistributedGradientTape(tape, compression=RangerCompressor(density=0.01))
    grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks

For each variable with a gradient, in the order of ``sources`` (the same on every rank):

the compressor's state is keyed by the variable, and each tensor's math is the one Horovod's own tape
runs with a ``RangerCompressor`` (``exchange.py``), batched over the step: the small and 1-D tensors
in one grouped allreduce, the top-k selections of all compressed tensors in one call, their pairs
in one grouped allgather, and their scatter-adds in one call. Horovod negotiates two collectives per
step instead of two per tensor. Collective names follow the compressor's tag and the variable list,
the same on every rank.

Horovod's own tape keys its bookkeeping by ``variable.ref()``, which Keras 3 variables lack; this tape
calls Horovod's collectives directly and works with tf.Variables and Keras 3 variables alike. In eager
mode the exchange runs as one traced function per variable list (cached on the compressor), so the
collectives carry their names and Horovod can fuse them (and in a ``tf.compat.v1`` graph, so that its
state updates run in order); inside ``tf.function`` it is inlined.
"""

from __future__ import annotations

import tensorflow as tf

from . import _hvd, exchange
from .compressor import RangerCompressor
from .slots import not_converted, safe_name

# Horovod's tape arguments that this tape cannot honour, with the value that means "not used".
_UNSUPPORTED = {"device_dense": "", "device_sparse": "", "num_groups": 0, "groups": None,
                "scale_local_gradients": True}


def _exchange(comp: RangerCompressor, variables, grads, op, predivide: float, process_set):
    hvd = _hvd.module()
    process_set = process_set or comp.process_set
    world = comp.world() if process_set is None else process_set.size()
    slots = [comp.slot_for(v) for v in variables]
    # Names carry the first slot and the count: the same on every rank, distinct per variable list.
    tag = f"{safe_name(comp.tag)}_{slots[0].index}_{len(slots)}" if slots else safe_name(comp.tag)
    out = exchange.step(comp.engine, slots, grads, world, tag, average=op == hvd.Average,
                        predivide=predivide, process_set=process_set)
    comp.end_step()
    return out


class DistributedGradientTape:
    """A tape whose ``gradient`` returns gradients reduced over ranks with sparse top-k exchange.

    Args mirror ``horovod.tensorflow.DistributedGradientTape``: ``compression`` (a
    :class:`RangerCompressor`, required), ``op`` (``hvd.Average`` default, or ``hvd.Sum``),
    ``gradient_predivide_factor`` (Average only), ``process_set``. ``tf.IndexedSlices`` gradients are
    made dense first (as ``sparse_as_dense=True``; ``sparse_as_dense=False`` raises).
    ``device_dense``, ``device_sparse``, ``num_groups``/``groups`` and
    ``scale_local_gradients=False`` have no meaning here and raise when set (this tape already
    groups each step into one allgather and one allreduce).
    """

    def __init__(self, gradtape, device_dense='', device_sparse='', compression=None,
                 sparse_as_dense=True, op=None, gradient_predivide_factor=1.0, num_groups=0,
                 groups=None, process_set=None, scale_local_gradients=True):
        if not isinstance(compression, RangerCompressor):
            raise TypeError("ranger_hvd.tensorflow.DistributedGradientTape needs "
                            "compression=RangerCompressor(...); for Horovod's own compressors use "
                            "horovod.tensorflow.DistributedGradientTape")
        given = {"device_dense": device_dense, "device_sparse": device_sparse,
                 "num_groups": num_groups, "groups": groups,
                 "scale_local_gradients": scale_local_gradients}
        for arg, default in _UNSUPPORTED.items():
            if given[arg] != default:
                raise ValueError(f"ranger_hvd.tensorflow.DistributedGradientTape does not support "
                                 f"{arg}={given[arg]!r} (only the default, {default!r})")
        if not sparse_as_dense:
            raise ValueError("ranger_hvd.tensorflow.DistributedGradientTape: sparse_as_dense=False "
                             "has no effect here: every tf.IndexedSlices gradient is made dense and "
                             "goes through the compressor's exchange, as with sparse_as_dense=True")
        hvd = _hvd.ensure_init()
        op = hvd.Average if op is None else op
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("ranger_hvd.tensorflow.DistributedGradientTape supports op=hvd.Average "
                             "or hvd.Sum (a sparse exchange can only add)")
        if gradient_predivide_factor != 1.0 and op != hvd.Average:
            raise ValueError("gradient_predivide_factor is only supported with op=hvd.Average")
        self._tape = gradtape
        self._comp = compression
        self._op = op
        self._predivide = float(gradient_predivide_factor)
        self._process_set = process_set

    # The wrapped tape does the recording; this object only changes what gradient() returns.
    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._tape, name)

    @not_converted
    def gradient(self, target, sources, output_gradients=None, **kwargs):
        kwargs.pop("use_generic_names", None)  # Horovod's argument; names here are always generic
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        sources = list(sources)
        present = [i for i, g in enumerate(grads) if g is not None]
        variables = [sources[i] for i in present]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]  # IndexedSlices -> dense
        for v in variables:  # state is created here, eagerly, before any tracing
            self._comp.slot_for(v)
        if tf.executing_eagerly() or not exchange.in_program_order():  # eager, or a v1 graph
            fn = self._traced(variables)
            reduced = fn(dense)
        else:
            reduced = _exchange(self._comp, variables, dense, self._op, self._predivide,
                                self._process_set)
        out = list(grads)
        for i, r in zip(present, reduced):
            out[i] = r
        return out

    def _traced(self, variables):
        comp = self._comp
        key = (tuple(comp.slot_for(v).index for v in variables), self._op, self._predivide,
               id(self._process_set))
        fn = comp._lookup.functions.get(key)
        if fn is None:
            op, predivide, ps = self._op, self._predivide, self._process_set

            def traced_exchange(grads):
                return _exchange(comp, variables, grads, op, predivide, ps)

            fn = tf.function(traced_exchange, autograph=False)  # its own tf.conds, as written
            comp._lookup.functions[key] = fn
        return fn
