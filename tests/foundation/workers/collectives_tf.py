"""Checks Horovod's collectives on real ranks with TensorFlow: allreduce, and allgather of unequal lengths."""
import horovod.tensorflow as hvd
import tensorflow as tf

from tests.hvdrun import report

hvd.init()
rank, size = hvd.rank(), hvd.size()
summed = hvd.allreduce(tf.range(6, dtype=tf.float32) * (rank + 1), op=hvd.Sum, name="sum")
averaged = hvd.allreduce(tf.fill([3], float(rank)), op=hvd.Average, name="avg")
gathered = hvd.allgather(tf.fill([rank + 1, 2], tf.constant(rank, tf.int32)), name="gather")


@tf.function
def traced_sum(x):  # Horovod ops must also work inside a traced function
    return hvd.allreduce(x, op=hvd.Sum, name="traced")


traced = traced_sum(tf.ones([4]) * (rank + 1))
report(rank, {
    "size": size,
    "sum": summed.numpy().tolist(),
    "avg": averaged.numpy().tolist(),
    "gather": gathered.numpy().tolist(),
    "traced": traced.numpy().tolist(),
    "mpi": bool(hvd.mpi_enabled()),
    "gloo": bool(hvd.gloo_enabled()),
})
