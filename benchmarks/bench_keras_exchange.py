"""CPU cost per step of ranger's TF compress and decompress over Keras ResNet50's gradients, one thread, no
Horovod: every gradient through the engine (2 ranks assumed), then two ranks' payloads decompressed.

    python benchmarks/bench_keras_exchange.py 0.01,0.001

Run it from two checkouts (PYTHONPATH=checkout) to compare code versions side by side.
"""
import os, sys, time, numpy as np
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from ranger_hvd.tensorflow import RangerCompressor
from ranger_hvd.tensorflow import exchange
model = tf.keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=1000)
vs = model.trainable_variables
rng = np.random.default_rng(0)
grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32) * 1e-3) for v in vs]
for d in [float(a) for a in sys.argv[1].split(",")]:
    comp = RangerCompressor(density=d, variables=vs); comp.world_size = 2
    slots = comp.slots
    @tf.function
    def compress():
        outs = []
        for s, g in zip(slots, grads):
            if s.compressed:
                idx, vals, k = comp.engine.sparse_step(s, g, s.tensor_name, s.shape, 2)
                outs.append((idx, vals))
            else:
                outs.append((None, comp.engine.dense_step(s, g, s.tensor_name, 4)))
        return outs
    outs = compress()
    # two ranks' payloads: this rank's twice (same indices: a worst case for cache, fine for cost)
    packed = [None if i is None else exchange._pack(i, v, tf.float32) for i, v in outs]
    gathered = [None if p is None else tf.concat([p, p], 0) for p in packed]
    ctxs = [None if g is None else exchange.Context("topk", s.shape, s.dtype, gathered=g, k=int(g.shape[0]) // 2)
            for s, g in zip(slots, gathered)]
    token = tf.ones([1])
    @tf.function
    def decompress():
        return [exchange.finish(token, c, "float32") for c in ctxs if c is not None]
    def t(f, r=11):
        f(); ts = []
        for _ in range(r):
            a = time.perf_counter(); o = f(); [x.shape for x in tf.nest.flatten(o) if x is not None]; ts.append(time.perf_counter() - a)
        return np.median(ts) * 1e3
    print(f"d={d} compressed={sum(s.compressed for s in slots)} compress={t(compress):.1f} ms decompress={t(decompress):.1f} ms", flush=True)
