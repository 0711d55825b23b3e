"""Where TensorFlow's error-feedback state lives, and the names it goes by.

A :class:`Slot` is one tensor's state in a ``RangerCompressor`` (flat ``tf.Variable``s and a step
counter); an :class:`OptimizerSlot` is the Keras ``Ranger``'s (its optimizer variables, shaped like
the model variable, stepped by the optimizer's ``iterations``). ``state.TFOps`` works on either.
Also here: the options check of the TensorFlow backend, the byte counters, and the helpers that
name variables and collectives alike on every rank.
"""

from __future__ import annotations

import re

import tensorflow as tf

from ranger_hvd import core


# Every control flow of this package is an explicit tf.cond. Autograph converts whatever a traced
# function calls (Horovod's allreduce_grads, Keras's train step, the user's step), and converting
# this package made up most of a small model's first trace: its entry points are marked to be left
# as written.
not_converted = tf.autograph.experimental.do_not_convert


def tf_options(**kwargs) -> core.RangerOptions:
    """``core.make_options``: the TensorFlow backend runs every option (both exchanges) but
    ``hierarchical``, and refuses what core refuses (a misspelled ``exchange`` among them)."""
    options = core.make_options(**kwargs)
    if options.hierarchical:
        raise core.OptionsError("invalid Ranger option: hierarchical=True runs on PyTorch only so "
                                "far; TensorFlow exchanges among all ranks")
    return options


def safe_name(name: str) -> str:
    """A name Horovod and TensorFlow accept for an op: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def variable_key(variable):
    """A hashable identity of a tf.Variable or a Keras 3 variable (keyed by its tf.Variable)."""
    target = backing(variable)
    if target is None:
        raise TypeError(f"expected a tf.Variable or a Keras variable, got {type(variable).__name__}")
    return target.ref()


def variable_name(variable) -> str:
    """Keras 3 paths are unique within a model ("dense/kernel"); tf.Variable names may repeat."""
    return str(getattr(variable, "path", None) or variable.name).split(":")[0]


class Slot(tf.Module):
    """State of one tensor: residual e (or v), velocity u (with momentum) and a step counter;
    under the global exchange (``world`` given) also its owners' ranges for the next step."""

    own_step = True  # the compressor advances it; the Keras optimizer's slots use its iterations

    def __init__(self, index: int, name: str, shape, dtype, compressed: bool, momentum: float,
                 label: str | None = None, world: int | None = None):
        super().__init__(name=f"slot{index}")
        self.index = index
        self.tensor_name = name
        self.label = label  # the variable's own name, for messages (None: not known)
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
            self.gbounds = self.gweights = None
            if compressed and world is not None:   # global_topk: N+1 bounds, N weights
                self.gbounds = tf.Variable(tf.zeros([world + 1], tf.int64), trainable=False,
                                           name="gbounds")
                self.gweights = tf.Variable(tf.zeros([world], tf.int64), trainable=False,
                                            name="gweights")


class OptimizerSlot:
    """The Keras ``Ranger``'s state of one variable: its optimizer variables and ``iterations``."""

    own_step = False

    def __init__(self, index: int, name: str, shape, dtype, compressed: bool, residual, velocity,
                 iterations, gbounds=None, gweights=None):
        self.index, self.tensor_name, self.compressed = index, name, compressed
        self.label = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = tf.as_dtype(dtype)
        self.numel = core.numel_of(self.shape)
        self.residual, self.velocity, self.step = residual, velocity, iterations
        self.gbounds, self.gweights = gbounds, gweights  # global_topk: the owners' ranges


def backing(variable):
    """The tf.Variable behind a tf.Variable or a Keras 3 variable (None if there is none)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)  # Keras 3: the backing tf.Variable
    return inner if isinstance(inner, tf.Variable) else None


def new_received(name: str = "received") -> tf.Variable:
    """bytes_received: what the collectives brought from other ranks (int64 scalar)."""
    with tf.init_scope():
        return tf.Variable(tf.constant(0, tf.int64), trainable=False, name=name)


def new_counters(name: str = "counters") -> tf.Variable:
    with tf.init_scope():
        return tf.Variable(tf.zeros([len(core.COUNTERS)], tf.int64), trainable=False, name=name)
