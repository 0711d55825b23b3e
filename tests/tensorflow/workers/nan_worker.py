"""One rank's gradient turns NaN at step 1 under Horovod's own tape with a RangerCompressor that fails
fast (nonfinite="raise"): the job must end (not wait forever), naming the variable as its user named
it, though the compressor was not given the variables (it finds them on Horovod's call stack)."""

import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
from ranger_hvd.tensorflow import RangerCompressor
from tests.hvdrun import report

hvd.init()
RANK = hvd.rank()
w = tf.Variable(tf.ones((64, 32)), name="wide_kernel")
comp = RangerCompressor(density=0.1, min_elements=100, nonfinite="raise")


@tf.function
def step(x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum((x @ w) ** 2)
    (g,) = hvd.DistributedGradientTape(tape, compression=comp).gradient(loss, [w])
    w.assign_sub(0.01 * g)


for t in range(4):
    x = np.ones((4, 64), np.float32)
    if t == 1 and RANK == 1:
        x[0, 0] = np.nan
    step(tf.constant(x))
report(RANK, {"finished": True})
