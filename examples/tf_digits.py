"""An ordinary Horovod TensorFlow / Keras training script: an MLP on scikit-learn's digits (offline).

The three lines marked ``# ranger_hvd`` are all it takes to run it with ``ranger-hvd launch`` /
``sweep`` (``examples/tf.yaml``).  Without them it is plain Horovod:

    horovodrun -np 2 -H localhost:2 python examples/tf_digits.py --epochs 5
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import ranger_hvd.run  # noqa: E402  # ranger_hvd

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

hvd.init()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
keras.utils.set_random_seed(0)

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
order = np.random.RandomState(0).permutation(len(x))
x, y = x[order], y[order]
n_eval = len(x) // 5
x_eval, y_eval = x[:n_eval], y[:n_eval]
x_train, y_train = x[n_eval:][hvd.rank()::hvd.size()], y[n_eval:][hvd.rank()::hvd.size()]
steps_per_epoch = (len(x) - n_eval) // hvd.size() // args.batch_size   # the same on every rank

model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
optimizer = keras.optimizers.SGD(learning_rate=args.lr, momentum=0.9)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
compression = ranger_hvd.run.compression()  # ranger_hvd
for v in model.variables:                     # every rank starts from rank 0's weights
    v.assign(hvd.broadcast(v.value, root_rank=0))


def train_step(xb, yb):
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
    tape = hvd.DistributedGradientTape(tape, compression=compression)
    grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


step = 0
for epoch in range(args.epochs):
    batches = np.random.RandomState(1000 * epoch + hvd.rank()).permutation(len(x_train))
    for i in range(steps_per_epoch):
        idx = batches[i * args.batch_size:(i + 1) * args.batch_size]
        loss = train_step(x_train[idx], y_train[idx])
        step += 1
    logits = model(x_eval, training=False)
    eval_loss = float(loss_fn(y_eval, logits))
    eval_accuracy = float(np.mean(np.argmax(logits, axis=1) == y_eval))
    if hvd.rank() == 0:
        print(f"epoch {epoch}: loss {float(loss):.4f} eval_accuracy {eval_accuracy:.4f}", flush=True)
    ranger_hvd.run.log(step, epoch=epoch, loss=float(loss), eval_loss=eval_loss, eval_accuracy=eval_accuracy)  # ranger_hvd
