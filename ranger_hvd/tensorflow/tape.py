"""``DistributedGradientTape``: Horovod's tape, with real per-rank top-k through allgather.

Wrap a tape as with Horovod::

    with tf.GradientTape() as tape:
        loss = ...
    tape = DistributedGradientTape(tape, compression=RangerCompressor(density=0.01))
    grads = tape.gradient(loss, model.trainable_variables)   # averaged over ranks

For each variable with a gradient, in the order of ``sources`` (the same on every rank):

* compressed tensors: the compressor steps its error-feedback state (keyed by the variable) and picks
  this rank's own top-k; values and int32 indices travel in one allgather named after the
  compressor's tag and the variable's slot (rank-independent names); every rank scatter-adds the
  N payloads into one zeroed gradient and divides by N (``op=Average``) or not (``op=Sum``);
* small and 1-D tensors: one plain allreduce.

Horovod's own tape keys its bookkeeping by ``variable.ref()``, which Keras 3 variables lack; this tape
calls Horovod's collectives directly and works with tf.Variables and Keras 3 variables alike. In eager
mode the exchange runs as one traced function per variable list (cached on the compressor), so the
collectives carry their names and Horovod can fuse them; inside ``tf.function`` it is inlined.
"""

from __future__ import annotations

import tensorflow as tf

from . import _hvd
from .compressor import RangerCompressor, dense_exchange, sparse_exchange


def _exchange(comp: RangerCompressor, variables, grads, average: bool, predivide: float,
              process_set, world: int):
    out = []
    for variable, grad in zip(variables, grads):
        slot = comp.slot_for(variable)
        idx, values = comp.compress_variable(variable, grad)
        name = f"{comp.tag}_{slot.index}"
        if idx is None:
            comp.record_dense(slot.numel, values.dtype.size)
            reduced = dense_exchange(values, f"RangerAllreduce_{name}", average=average,
                                     process_set=process_set, predivide=predivide)
        else:
            comp.record_sparse(slot.numel, tf.size(idx))
            reduced = tf.reshape(
                sparse_exchange(idx, values, slot.numel, slot.dtype, f"RangerAllgather_{name}",
                                average=average, world_size=world,
                                value_dtype=comp.options.value_dtype, process_set=process_set,
                                predivide=predivide), slot.shape)
        out.append(tf.cast(reduced, grad.dtype))
    comp.end_step()
    return out


class DistributedGradientTape:
    """A tape whose ``gradient`` returns gradients reduced over ranks with sparse top-k exchange.

    Args mirror ``horovod.tensorflow.DistributedGradientTape``: ``compression`` (a
    :class:`RangerCompressor`, required), ``op`` (``hvd.Average`` default, or ``hvd.Sum``),
    ``gradient_predivide_factor`` (Average only: values are scaled by 1/f before the exchange and by
    f/N after), ``process_set``. ``device_dense``, ``device_sparse``, ``num_groups``/``groups`` are
    accepted for drop-in use and have no effect here (each tensor is one collective; Horovod fuses
    them). ``tf.IndexedSlices`` gradients are made dense first (as ``sparse_as_dense=True``).
    """

    def __init__(self, gradtape, device_dense='', device_sparse='', compression=None,
                 sparse_as_dense=True, op=None, gradient_predivide_factor=1.0, num_groups=0,
                 groups=None, process_set=None, scale_local_gradients=True):
        if not isinstance(compression, RangerCompressor):
            raise TypeError("ranger_hvd.tensorflow.DistributedGradientTape needs "
                            "compression=RangerCompressor(...); for Horovod's own compressors use "
                            "horovod.tensorflow.DistributedGradientTape")
        hvd = _hvd.ensure_init()
        op = hvd.Average if op is None else op
        if op not in (hvd.Average, hvd.Sum):
            raise ValueError("ranger_hvd.tensorflow.DistributedGradientTape supports op=hvd.Average "
                             "or hvd.Sum (a sparse exchange can only add)")
        if gradient_predivide_factor != 1.0 and op != hvd.Average:
            raise ValueError("gradient_predivide_factor is only supported with op=hvd.Average")
        self._tape = gradtape
        self._comp = compression
        self._average = op == hvd.Average
        self._predivide = float(gradient_predivide_factor)
        self._process_set = process_set
        self._world = process_set.size() if process_set is not None else hvd.size()

    # The wrapped tape does the recording; this object only changes what gradient() returns.
    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._tape, name)

    def gradient(self, target, sources, output_gradients=None, **kwargs):
        kwargs.pop("use_generic_names", None)  # Horovod's argument; names here are always generic
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        sources = list(sources)
        present = [i for i, g in enumerate(grads) if g is not None]
        variables = [sources[i] for i in present]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]  # IndexedSlices -> dense
        for v in variables:  # state is created here, eagerly, before any tracing
            self._comp.slot_for(v)
        if tf.executing_eagerly():
            fn = self._traced(variables)
            reduced = fn(dense)
        else:
            reduced = _exchange(self._comp, variables, dense, self._average, self._predivide,
                                self._process_set, self._world)
        out = list(grads)
        for i, r in zip(present, reduced):
            out[i] = r
        return out

    def _traced(self, variables):
        comp = self._comp
        key = (tuple(comp.slot_for(v).index for v in variables), self._average, self._predivide,
               id(self._process_set))
        fn = comp._lookup.functions.get(key)
        if fn is None:
            average, predivide, ps, world = (self._average, self._predivide, self._process_set,
                                             self._world)

            def exchange(grads):
                return _exchange(comp, variables, grads, average, predivide, ps, world)

            fn = tf.function(exchange)
            comp._lookup.functions[key] = fn
        return fn
