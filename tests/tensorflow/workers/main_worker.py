"""One horovodrun launch, many checks (launching TF is the slow part): runs on every rank and reports.

Sections: (a) our DistributedGradientTape, (b) Horovod's own tape with a RangerCompressor, (c) the
Keras 3 Ranger optimizer (custom loop and compile/fit), (d) ``converge_worker.py``'s digits MLP.
Every rank can regenerate every rank's gradients from seeds, so each rank also checks the exchanged
result against ``core.reference``.
"""

import zlib

import keras
import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd
from ranger_hvd.core import make_options
from ranger_hvd.core.reference import ReferenceCompressor, combine
from ranger_hvd.tensorflow import (BroadcastInitialWeights, DistributedGradientTape, Ranger,
                                   RangerCompressor, SharedCompressorError)
from tests.hvdrun import report

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
out = {"rank": RANK, "size": SIZE}


def crc(arrays):
    return [zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes()) for a in arrays]


def maxdiff(a, b) -> float:
    """Largest absolute difference of two arrays (inf when their shapes differ): 0.0 means same values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) if a.shape == b.shape else float("inf")


def grads_of(step, rank, shapes, base=0):
    rng = np.random.default_rng(base + 1000 * rank + step)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def linear_loss(variables, grads):
    """A loss whose gradient is exactly ``grads``, whatever the variables hold."""
    return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(v) * g) for v, g in zip(variables, grads)])


# ------------------------------------------------------------------------------------------------
# (a1) d = 1, m = 0 equals plain Horovod averaging, Keras 3 variables, eager then tf.function.
keras.utils.set_random_seed(7)  # same initial weights on every rank
m1 = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="tanh"),
                       keras.layers.Dense(10)])
m2 = keras.models.clone_model(m1)
m2.set_weights(m1.get_weights())
comp_eq = RangerCompressor(density=1.0, min_elements=1, compress_1d=True)
x = tf.constant(np.random.default_rng(RANK).standard_normal((16, 20)).astype(np.float32))


def step_ranger():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(m1(x) ** 2)
    grads = DistributedGradientTape(tape, compression=comp_eq).gradient(loss, m1.trainable_variables)
    for v, g in zip(m1.trainable_variables, grads):
        v.assign_sub(0.1 * g)


def step_plain():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(m2(x) ** 2)
    grads = tape.gradient(loss, m2.trainable_variables)
    for i, (v, g) in enumerate(zip(m2.trainable_variables, grads)):
        v.assign_sub(0.1 * hvd.allreduce(g, op=hvd.Average, name=f"plain_{i}"))


for _ in range(3):
    step_ranger()
    step_plain()
step_ranger_fn, step_plain_fn = tf.function(step_ranger), tf.function(step_plain)
for _ in range(3):
    step_ranger_fn()
    step_plain_fn()
out["a_equiv_maxdiff"] = max(float(np.max(np.abs(a - b)))
                             for a, b in zip(m1.get_weights(), m2.get_weights()))
out["a_equiv_crc"] = crc(m1.get_weights())

# ------------------------------------------------------------------------------------------------
# (a2) conservation, bytes and agreement with core.reference: gradients that ignore the parameters,
# then zero-gradient steps until the residual is drained. Half the steps eager, half traced.
shapes = [(40, 60), (60,)]
W = tf.Variable(tf.zeros(shapes[0]), name="W")
b = tf.Variable(tf.zeros(shapes[1]), name="b")
comp = RangerCompressor(density=0.05, min_elements=100)
T, DRAIN = 6, 20
refs = [ReferenceCompressor(2400, make_options(density=0.05, min_elements=100), SIZE)
        for _ in range(SIZE)]


def exchanged(grads):
    with tf.GradientTape() as tape:
        loss = linear_loss([W, b], grads)
    return DistributedGradientTape(tape, compression=comp).gradient(loss, [W, b])


exchanged_fn = tf.function(exchanged)
total_out = [np.zeros(s, np.float64) for s in shapes]
ref_maxdiff = 0.0
for t in range(T + DRAIN):
    mine = grads_of(t, RANK, shapes) if t < T else [np.zeros(s, np.float32) for s in shapes]
    res = (exchanged if t % 2 == 0 else exchanged_fn)([tf.constant(g) for g in mine])
    res = [r.numpy() for r in res]
    for acc, r in zip(total_out, res):
        acc += r
    # What core.reference says every rank should reconstruct (all ranks' gradients are known).
    payloads = []
    for r in range(SIZE):
        g = grads_of(t, r, shapes)[0] if t < T else np.zeros(shapes[0], np.float32)
        payloads.append(refs[r].step(g))
    expect = combine(payloads, 2400).reshape(shapes[0])
    ref_maxdiff = max(ref_maxdiff, maxdiff(res[0], expect),
                      maxdiff(comp.residual_of(W).numpy().reshape(-1), refs[RANK].residual))
sum_grads = [sum(grads_of(t, r, shapes)[i].astype(np.float64) for t in range(T) for r in range(SIZE))
             / SIZE for i in range(2)]
out["a_conservation_maxerr"] = max(float(np.max(np.abs(o - s))) for o, s in zip(total_out, sum_grads))
out["a_residual_after_drain"] = float(np.max(np.abs(comp.residual_of(W).numpy())))
out["a_reference_maxdiff"] = ref_maxdiff
out["a_stats"] = comp.stats()
out["a_steps"] = T + DRAIN

# (a3) DGC momentum (m = 0.9) and fp16 values with op=Sum against the reference.
Wm = tf.Variable(tf.zeros((30, 50)), name="Wm")
comp_m = RangerCompressor(density=0.02, momentum=0.9, min_elements=100, value_dtype="float16")
ref_m = [ReferenceCompressor(1500, comp_m.options, SIZE) for _ in range(SIZE)]
mom_maxdiff = 0.0
for t in range(5):
    g = grads_of(t, RANK, [(30, 50)], base=77)[0]
    with tf.GradientTape() as tape:
        loss = linear_loss([Wm], [g])
    res = DistributedGradientTape(tape, compression=comp_m, op=hvd.Sum).gradient(loss, [Wm])[0]
    payloads = []
    for r in range(SIZE):
        idx, vals = ref_m[r].step(grads_of(t, r, [(30, 50)], base=77)[0])
        payloads.append((idx, vals.astype(np.float16)))
    expect = combine(payloads, 1500, average=False).reshape(30, 50)
    mom_maxdiff = max(mom_maxdiff, maxdiff(res.numpy(), expect))
out["a_momentum_fp16_sum_maxdiff"] = mom_maxdiff
out["a_fp16_stats"] = comp_m.stats()

# (a4) checkpoint round trip: save, run 3 steps; restore into a fresh compressor, rerun: same bits.
Wc = tf.Variable(tf.zeros((40, 40)), name="Wc")
comp_c = RangerCompressor(density=0.05, momentum=0.5, min_elements=100, warmup_steps=6,
                          warmup_start_density=0.5)


def ck_step(cmp, t):
    g = grads_of(t, RANK, [(40, 40)], base=555)[0]
    with tf.GradientTape() as tape:
        loss = linear_loss([Wc], [g])
    return DistributedGradientTape(tape, compression=cmp).gradient(loss, [Wc])[0].numpy()


for t in range(3):
    ck_step(comp_c, t)
path = tf.train.Checkpoint(compressor=comp_c).save(f"/tmp/ranger_tf_ck_{RANK}/ck")
first = [ck_step(comp_c, t) for t in range(3, 6)]
res_first = comp_c.residual_of(Wc).numpy()
comp_r = RangerCompressor(density=0.05, momentum=0.5, min_elements=100, warmup_steps=6,
                          warmup_start_density=0.5)
comp_r.build([Wc])
tf.train.Checkpoint(compressor=comp_r).restore(path).assert_existing_objects_matched()
second = [ck_step(comp_r, t) for t in range(3, 6)]
out["a_checkpoint_maxdiff"] = max(*(maxdiff(p, q) for p, q in zip(first, second)),
                                  maxdiff(res_first, comp_r.residual_of(Wc).numpy()))

# ------------------------------------------------------------------------------------------------
# (b) Horovod's own tape, tf.Variables: real top-k by default, shared random-k as an option.
rng = np.random.default_rng(100 + RANK)
xb = tf.constant(rng.standard_normal((8, 50)).astype(np.float32))
Wb1, bb1 = tf.Variable(tf.ones((50, 40)) * 0.1), tf.Variable(tf.zeros((40,)))
Wb2, bb2 = tf.Variable(tf.ones((50, 40)) * 0.1), tf.Variable(tf.zeros((40,)))
comp_b = RangerCompressor(density=0.1, min_elements=100, variables=[Wb1, bb1])
comp_b1 = RangerCompressor(density=1.0, min_elements=100)
Wr, br = tf.Variable(tf.ones((50, 40)) * 0.1), tf.Variable(tf.zeros((40,)))
comp_br = RangerCompressor(density=0.1, min_elements=100, variables=[Wr, br], selection="random")


def hvd_step(W_, b_, compression):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((xb @ W_ + b_) ** 2)
    tape = hvd.DistributedGradientTape(tape, compression=compression)
    gw, gb = tape.gradient(loss, [W_, b_])
    W_.assign_sub(0.05 * gw)
    b_.assign_sub(0.05 * gb)


for _ in range(4):
    hvd_step(Wb1, bb1, comp_b)
    hvd_step(Wr, br, comp_br)
out["b_crc"] = crc([Wb1.numpy(), bb1.numpy()])
out["b_stats"] = comp_b.stats()
out["b_residual_norm"] = float(np.linalg.norm(comp_b.slots[0].residual.numpy()))
out["br_crc"] = crc([Wr.numpy(), br.numpy()])
out["br_stats"] = comp_br.stats()
out["br_residual_norm"] = float(np.linalg.norm(comp_br.slots[0].residual.numpy()))

# Horovod's tape and ours are one exchange: 20 steps at d = 0.01 end with the same bits.
def same_start():
    return tf.Variable(tf.reshape(tf.range(2000, dtype=tf.float32), (50, 40)) * 1e-4), \
        tf.Variable(tf.zeros((40,)))


Wh, bh = same_start()
Wo_, bo_ = same_start()
comp_h = RangerCompressor(density=0.01, min_elements=100)
comp_o = RangerCompressor(density=0.01, min_elements=100)


@tf.function
def ours_step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((xb @ Wo_ + bo_) ** 2)
    gw, gb = DistributedGradientTape(tape, compression=comp_o).gradient(loss, [Wo_, bo_])
    Wo_.assign_sub(0.05 * gw)
    bo_.assign_sub(0.05 * gb)


hvd_step_fn = tf.function(hvd_step)
for _ in range(20):
    hvd_step_fn(Wh, bh, comp_h)
    ours_step()
out["b_vs_a_crc"] = [crc([Wh.numpy(), bh.numpy()]), crc([Wo_.numpy(), bo_.numpy()])]
out["b_vs_a_moved"] = float(np.max(np.abs(Wh.numpy() - same_start()[0].numpy())))
# d = 1: same as Horovod without compression, step for step.
Wp, bp = tf.Variable(tf.ones((50, 40)) * 0.1), tf.Variable(tf.zeros((40,)))
for _ in range(3):
    hvd_step(Wb2, bb2, comp_b1)
    hvd_step(Wp, bp, hvd.Compression.none)
out["b_equiv_maxdiff"] = float(max(np.max(np.abs(Wb2.numpy() - Wp.numpy())),
                                   np.max(np.abs(bb2.numpy() - bp.numpy()))))
# Misuse: a second, differently shaped model handed the same compressor fails loudly, on every rank
# alike (at trace time, before any collective).
Wo, bo = tf.Variable(tf.ones((50, 30))), tf.Variable(tf.zeros((30,)))
try:
    hvd_step(Wo, bo, comp_b)
    out["b_misuse"] = "no error"
except SharedCompressorError as exc:
    out["b_misuse"] = str(exc)
# And a compressor of our tape cannot also serve Horovod's tape.
try:
    hvd_step(Wb2, bb2, comp)
    out["b_mode_mix"] = "no error"
except SharedCompressorError as exc:
    out["b_mode_mix"] = str(exc)

# ------------------------------------------------------------------------------------------------
# (c1) Ranger, custom loop (apply_gradients), ranks starting from different weights.
keras.utils.set_random_seed(1000 + RANK)  # deliberately different initial weights per rank
mc = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                       keras.layers.Dense(10)])
out["c_initial_crc"] = crc(mc.get_weights())
opt = Ranger(lr=0.05, momentum=0.9, density=0.05)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
xs = np.random.default_rng(RANK).standard_normal((64, 20)).astype(np.float32)
ys = (xs[:, 0] > 0).astype(np.int64) + 2 * (xs[:, 1] > 0).astype(np.int64)


def c_step(model, optimizer, xb_, yb_):
    with tf.GradientTape() as tape:
        loss = loss_fn(yb_, model(xb_))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                  model.trainable_variables))
    return loss


c_step_fn = tf.function(c_step)
for i in range(2):
    c_step(mc, opt, xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
for i in range(2, 4):
    c_step_fn(mc, opt, xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
out["c_loop_crc"] = crc(mc.get_weights())
out["c_loop_stats"] = opt.stats()
# Checkpoint of the optimizer (residuals, velocities, iterations) with the model.
ck = tf.train.Checkpoint(model=mc, optimizer=opt)
cpath = ck.save(f"/tmp/ranger_tf_opt_{RANK}/ck")
for i in range(4):
    c_step(mc, opt, xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
after = mc.get_weights()
mc2 = keras.models.clone_model(mc)
opt2 = Ranger(lr=0.05, momentum=0.9, density=0.05)
opt2.build(mc2.trainable_variables)
tf.train.Checkpoint(model=mc2, optimizer=opt2).restore(cpath).assert_existing_objects_matched()
for i in range(4):
    c_step(mc2, opt2, xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16])
out["c_checkpoint_maxdiff"] = max(maxdiff(p, q) for p, q in zip(after, mc2.get_weights()))

# (c2) Ranger at d = 1, m = 0 equals SGD on Horovod-averaged gradients.
keras.utils.set_random_seed(3)
me1 = keras.Sequential([keras.Input((20,)), keras.layers.Dense(48), keras.layers.Dense(10)])
me2 = keras.models.clone_model(me1)
me2.set_weights(me1.get_weights())
opt_e = Ranger(learning_rate=0.1, momentum=0.0, density=1.0)
for i in range(3):
    xb_, yb_ = xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16]
    c_step(me1, opt_e, xb_, yb_)
    with tf.GradientTape() as tape:
        loss = loss_fn(yb_, me2(xb_))
    for j, (v, g) in enumerate(zip(me2.trainable_variables,
                                   tape.gradient(loss, me2.trainable_variables))):
        v.assign_sub(hvd.allreduce(g, op=hvd.Average, name=f"sgd_{j}") * 0.1)
out["c_equiv_maxdiff"] = max(float(np.max(np.abs(a - b)))
                             for a, b in zip(me1.get_weights(), me2.get_weights()))

# (c3) compile + fit on Keras 3, different initial weights, rank 0's broadcast by the callback.
keras.utils.set_random_seed(2000 + RANK)
mf = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                       keras.layers.Dense(4)])
mf.compile(optimizer=Ranger(lr=0.05, momentum=0.9, density=0.05), loss=loss_fn)
hist = mf.fit(xs, ys, epochs=4, batch_size=16, verbose=0, shuffle=False,
              callbacks=[BroadcastInitialWeights()])
out["c_fit_loss"] = [float(v) for v in hist.history["loss"]]
out["c_fit_crc"] = crc(mf.get_weights())
out["c_fit_stats"] = mf.optimizer.stats()

# (c4) Ranger with its momentum in the compressor, DGC's (masked) and local (unmasked), against the
# reference replayed with every rank's gradients: w = w - lr * average of what the ranks sent.
def momentum_in_compressor(mode, steps=6, lr=0.1, m=0.9, density=0.02):
    w0 = np.linspace(-1, 1, 2000, dtype=np.float32)
    var = keras.Variable(w0.reshape(40, 50), name=f"w_{mode}")
    opt_m = Ranger(lr=lr, momentum=m, density=density, momentum_mode=mode, min_elements=100,
                   name=f"ranger_{mode}")
    options = make_options(density=density, momentum=m, momentum_masking=mode == "dgc", min_elements=100)
    refs = [ReferenceCompressor(2000, options, world_size=SIZE) for _ in range(SIZE)]
    w = w0.copy()
    for step in range(steps):
        grads = [grads_of(step, r, [(2000,)], base=70_000)[0] for r in range(SIZE)]
        opt_m.apply_gradients([(tf.constant(grads[RANK].reshape(40, 50)), var)])
        w = w - np.float32(lr) * combine([refs[r].step(grads[r]) for r in range(SIZE)], 2000)
    return {"maxdiff": maxdiff(var.numpy().reshape(-1), w), "weights": crc([var.numpy()])[0],
            "moved": maxdiff(w, w0)}


for mode in ("dgc", "local"):
    out[f"c_compressor_momentum_{mode}"] = momentum_in_compressor(mode)

# (d) the digits MLP through Horovod's tape, dense and compressed, in this launch
from tests.tensorflow.workers import converge_worker  # noqa: E402

out["converge"] = converge_worker.run()
report(RANK, out)
