"""CPU cost per step of ranger's TF compress and decompress over Keras ResNet50's gradients, one thread, no
Horovod: every gradient through the engine (2 ranks assumed), then two ranks' payloads decompressed.

    python benchmarks/bench_keras_exchange.py 0.01,0.001

Prints one line per density (medians of 11 calls after one untimed); nothing is written. Run it from
two checkouts (PYTHONPATH=checkout) to compare code versions side by side.
"""

import os
import sys

import numpy as np

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf  # noqa: E402

from common import median_seconds, tf_ready  # noqa: E402
from ranger_hvd.tensorflow import RangerCompressor, exchange  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


def measure(density: float, variables, grads) -> str:
    comp = RangerCompressor(density=density, variables=variables)
    comp.world_size = 2
    slots = comp.slots

    @tf.function
    def compress():
        outs = []
        for s, g in zip(slots, grads):
            if s.compressed:
                idx, vals, _ = comp.engine.sparse_step(s, g, s.tensor_name, s.shape, 2)
                outs.append((idx, vals))
            else:
                outs.append((None, comp.engine.dense_step(s, g, s.tensor_name, 4)))
        return outs

    outs = compress()
    # Two ranks' payloads: this rank's twice (same indices: a worst case for cache, fine for cost).
    gathered = [None if i is None else tf.concat([exchange.pack_pairs(i, v, tf.float32)] * 2, 0) for i, v in outs]
    contexts = [exchange.Context("topk", s.shape, s.dtype, gathered=g, k=int(g.shape[0]) // 2)
                for s, g in zip(slots, gathered) if g is not None]
    token = tf.ones([1])

    @tf.function
    def decompress():
        return [exchange.finish(token, c, "float32") for c in contexts]

    ms = {name: median_seconds(fn, 11, ready=tf_ready) * 1e3
          for name, fn in (("compress", compress), ("decompress", decompress))}
    return (f"d={density} compressed={sum(s.compressed for s in slots)} "
            f"compress={ms['compress']:.1f} ms decompress={ms['decompress']:.1f} ms")


def main() -> None:
    model = tf.keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=1000)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32) * 1e-3) for v in variables]
    for density in (float(a) for a in sys.argv[1].split(",")):
        print(measure(density, variables, grads), flush=True)


if __name__ == "__main__":
    main()
