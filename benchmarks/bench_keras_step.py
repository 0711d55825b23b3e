"""Median step time of Keras ResNet50 on 2 ranks of one machine, Horovod's own tape, dense or ranger.

    .venv/bin/horovodrun -np 2 --gloo .venv/bin/python benchmarks/bench_keras_step.py 0.01
    .venv/bin/horovodrun -np 2 --gloo .venv/bin/python benchmarks/bench_keras_step.py dense

A quick A/B of two code versions without test hosts: run it alternately with PYTHONPATH set to each
checkout (``bench_revisions.py`` does the full network benchmark that way). Same model and batch as
``bench_network.py``'s keras-resnet50; one thread per rank, rank r pinned to core r; 3 warm-up steps,
then the median of 8. The argument is the density, or ``dense``.
"""
import os
import sys
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import horovod.tensorflow as hvd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds  # noqa: E402
from netbench import models  # noqa: E402

from ranger_hvd.tensorflow import RangerCompressor  # noqa: E402

hvd.init()
os.sched_setaffinity(0, {hvd.rank() % os.cpu_count()})
mode = sys.argv[1]
tf.keras.utils.set_random_seed(0)
model, (x, y) = models.tf_model("keras-resnet50")
variables = model.trainable_variables
opt = tf.keras.optimizers.SGD(0.01)
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
comp = None if mode == "dense" else RangerCompressor(density=float(mode), variables=variables)


@tf.function
def train(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    dtape = (hvd.DistributedGradientTape(tape) if comp is None
             else hvd.DistributedGradientTape(tape, compression=comp))
    opt.apply_gradients(zip(dtape.gradient(loss, variables), variables))
    return loss


median = median_seconds(lambda: train(x, y).numpy(), 8, warmup=3)
print(f"rank {hvd.rank()} mode {mode} median {median * 1e3:.0f} ms", flush=True)
