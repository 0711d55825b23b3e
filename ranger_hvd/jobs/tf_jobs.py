"""TensorFlow / Keras 3 reference jobs (CNN, RNN, GAN) under Horovod; see :mod:`ranger_hvd.jobs`.

Horovod's own ``DistributedGradientTape`` and ``broadcast_variables`` call ``.ref()`` on variables,
which Keras 3 variables lack, so for ``none``/``fp16`` the gradients are allreduced here
(``hvd.grouped_allreduce`` with Horovod's compression) and the initial weights are broadcast here, one
``hvd.broadcast`` per variable; ``ranger`` uses ``ranger_hvd.tensorflow.DistributedGradientTape``.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from ranger_hvd.rundir import checkpoint
from ranger_hvd.jobs.common import ByteMeter, Config, log, optimizer_momentum, set_tf_threads_from_env, train_loop
from ranger_hvd.jobs.data import Dataset, shard_indices, steps_per_epoch


def _import_tf():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    threads = set_tf_threads_from_env()
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised (e.g. in a test process): keep what is set
            pass
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"the TensorFlow jobs need KERAS_BACKEND=tensorflow, not {keras.backend.backend()!r}")
    return tf, keras


# --------------------------------------------------------------------------------------------------
# models (Keras 3)


def build_cnn(keras, image_shape, num_classes):
    H, W = image_shape
    layers = keras.layers
    stack = [keras.Input((H, W, 1)), layers.Conv2D(16, 3, padding="same", activation="relu"),
             layers.MaxPooling2D(2), layers.Conv2D(32, 3, padding="same", activation="relu")]
    if min(H, W) // 2 > 4:           # 28x28 MNIST: one more pooling, 7x7 before the head
        stack.append(layers.MaxPooling2D(2))
    stack += [layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(num_classes)]
    return keras.Sequential(stack, name="cnn")


def build_rnn(keras, image_shape, num_classes, hidden=64):
    """Reads an image row by row: H time steps of W features; classifies from the last state."""
    H, W = image_shape
    return keras.Sequential([keras.Input((H, W)), keras.layers.GRU(hidden), keras.layers.Dense(num_classes)],
                            name="rnn")


def build_gan(keras, image_dim, z_dim=32, hidden=128):
    L = keras.layers
    gen = keras.Sequential([keras.Input((z_dim,)), L.Dense(hidden), L.LeakyReLU(0.2), L.Dense(hidden),
                            L.LeakyReLU(0.2), L.Dense(image_dim, activation="tanh")], name="generator")
    disc = keras.Sequential([keras.Input((image_dim,)), L.Dense(hidden), L.LeakyReLU(0.2), L.Dense(hidden),
                             L.LeakyReLU(0.2), L.Dense(1)], name="discriminator")
    return gen, disc


def r1_penalty(tf, disc, real, gamma: float):
    """(gamma/2 * mean over the batch of ||grad_x D(x)||^2 at the real samples, D(real)).

    Mescheder et al. 2018: the penalty damps the adversarial game. Called under the discriminator's
    tape, so that tape also differentiates the inner gradient and the penalty reaches D's weights.
    """
    with tf.GradientTape() as inner:
        inner.watch(real)
        d_real = disc(real, training=True)
    grad_x = inner.gradient(d_real, real)    # of the sum over the batch: each row its own sample's slope
    return gamma / 2 * tf.reduce_mean(tf.reduce_sum(tf.square(grad_x), axis=1)), d_real


# --------------------------------------------------------------------------------------------------
# gradient exchange and byte accounting


class GradExchange(ByteMeter):
    """One network's gradient exchange (none/fp16: grouped allreduce; ranger: the ranger tape)."""

    def __init__(self, hvd, variables, cfg: Config):
        self.hvd, self.variables = hvd, list(variables)
        self.kind = cfg.compression.type
        numels = [int(np.prod(v.shape)) for v in self.variables]
        self.dense_bytes = 4 * sum(numels)
        self.comp = None
        if self.kind == "ranger":
            from ranger_hvd.tensorflow import RangerCompressor

            self.comp = RangerCompressor(**cfg.compression.options())
            self.comp.build(self.variables)   # its state variables exist before tracing
        else:
            itemsize = 2 if self.kind == "fp16" else 4
            self.sent_per_step = itemsize * sum(numels)
            self.compression = hvd.Compression.fp16 if self.kind == "fp16" else hvd.Compression.none
        self.reset_baseline()

    def gradients(self, tape, loss):
        """Averaged gradients of ``loss`` with respect to this network's variables (call in tf.function)."""
        if self.comp is not None:
            from ranger_hvd.tensorflow import DistributedGradientTape

            return DistributedGradientTape(tape, compression=self.comp).gradient(loss, self.variables)
        grads = tape.gradient(loss, self.variables)
        if self.hvd.size() == 1:
            return grads
        return self.hvd.grouped_allreduce(grads, op=self.hvd.Average, compression=self.compression)


def broadcast_weights(tf, hvd, variables, tag: str) -> None:
    """Rank 0's values into every rank's variables (works on Keras 3 variables)."""
    for i, v in enumerate(variables):
        v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=0, name=f"ranger_hvd.jobs.bcast.{tag}.{i}"))


# --------------------------------------------------------------------------------------------------
# checkpoints: one pickle of NumPy arrays per rank and save point (see :mod:`ranger_hvd.rundir.checkpoint`)


def _write_pickle(path, state: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _read_pickle(path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _assign_all(variables, arrays, what: str) -> None:
    variables = list(variables)
    if len(variables) != len(arrays):
        raise checkpoint.CheckpointError(f"cannot resume: the checkpoint holds {len(arrays)} {what} variables, "
                                     f"this model has {len(variables)}")
    for v, a in zip(variables, arrays):
        v.assign(a)


# --------------------------------------------------------------------------------------------------
# the training loop


def run(cfg: Config, data: Dataset, run_dir, resume: bool = False) -> dict:
    tf, keras = _import_tf()
    import horovod.tensorflow as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    # Keras numbers layer names per process ("conv2d", "conv2d_1", ...); starting each job from a clean
    # slate gives its variables the same paths in every process, which the compressor state is keyed by
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.train.seed)

    H, W = data.image_shape
    tr = shard_indices(len(data.x_train), rank, size)
    ev = shard_indices(len(data.x_eval), rank, size, equalize=False)
    x_tr, y_tr = data.x_train[tr], data.y_train[tr]
    x_ev, y_ev = data.x_eval[ev], data.y_eval[ev]
    n_steps = steps_per_epoch(len(data.x_train), size, cfg.train.batch_size)

    gan = cfg.job.model == "gan"
    xce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def sgd(lr_scale):
        return keras.optimizers.SGD(learning_rate=cfg.train.lr * lr_scale, momentum=optimizer_momentum(cfg))

    if gan:
        gen, disc = build_gan(keras, H * W)
        z_dim = gen.inputs[0].shape[-1]
        nets = [disc, gen]
        lr_scales = [cfg.gan.disc_lr_scale, 1.0]
        x_tr = (x_tr.reshape(len(x_tr), H * W) * 2 - 1).astype(np.float32)
        x_ev = (x_ev.reshape(len(x_ev), H * W) * 2 - 1).astype(np.float32)
        noise = tf.random.Generator.from_seed(cfg.train.seed * 1000 + rank)
    else:
        model = (build_cnn(keras, (H, W), data.num_classes) if cfg.job.model == "cnn"
                 else build_rnn(keras, (H, W), data.num_classes))
        nets = [model]
        lr_scales = [1.0]
        if cfg.job.model == "cnn":
            x_tr, x_ev = x_tr[..., None], x_ev[..., None]
    opts = [sgd(scale) for scale in lr_scales]
    for net, opt in zip(nets, opts):
        opt.build(net.trainable_variables)
    exchanges = [GradExchange(hvd, net.trainable_variables, cfg) for net in nets]
    for net in nets:
        broadcast_weights(tf, hvd, net.weights, net.name)
    quality = None
    if gan and rank == 0:     # samples are scored on rank 0 (every rank holds the same generator)
        from ranger_hvd.jobs.quality import GanSampleQuality

        quality = GanSampleQuality(data, seed=cfg.train.seed, z_dim=z_dim, run_dir=run_dir)

        def generate(z):
            return np.asarray(gen(tf.constant(z), training=False))

        quality.measure_untrained(generate)

    resume_from = None
    if resume:
        ckpt = checkpoint.load_for_resume(run_dir, rank=rank, size=size, backend="tensorflow", model=cfg.job.model,
                                          compression=cfg.compression.type, allgather_object=hvd.allgather_object,
                                          read=_read_pickle)
        for i, (net, opt, ex, scale) in enumerate(zip(nets, opts, exchanges, lr_scales)):
            _assign_all(net.weights, ckpt["weights"][i], f"{net.name} weight")
            _assign_all(opt.variables, ckpt["optimizers"][i], f"{net.name} optimizer")
            opt.learning_rate = cfg.train.lr * scale    # the config's value wins (e.g. an lr override on resume)
            if ex.comp is not None:
                ex.comp.load_state_dict(ckpt["compressors"][i])
            ex.reset_baseline(ckpt["byte_baselines"][i])
        if gan:
            noise.state.assign(ckpt["noise"])
        resume_from = ckpt["loop"]

    def save(loop_state: dict) -> None:
        checkpoint.save(run_dir, rank=rank, backend="tensorflow", write=_write_pickle, state={
            **checkpoint.header(rank=rank, size=size, backend="tensorflow", model=cfg.job.model,
                                compression=cfg.compression.type),
            "weights": [[np.asarray(v) for v in net.weights] for net in nets],
            "optimizers": [[np.asarray(v) for v in opt.variables] for opt in opts],
            "compressors": [ex.comp.state_dict() if ex.comp is not None else None for ex in exchanges],
            "byte_baselines": [ex.baseline for ex in exchanges],
            "noise": noise.state.numpy() if gan else None,
            "loop": loop_state,
        })

    log(rank, f"tensorflow {cfg.job.model} on {data.name}: {size} ranks, {len(tr)} train samples/rank, "
              f"{n_steps} steps/epoch, compression={cfg.compression.type}"
              + (f" {cfg.compression.options()}" if cfg.compression.options() else ""))

    if gan:
        disc_x, gen_x = exchanges
        opt_d, opt_g = opts
        r1 = cfg.gan.r1_penalty

        @tf.function
        def train_step(real, _y):
            b = tf.shape(real)[0]
            with tf.GradientTape() as tape:
                fake = gen(noise.normal([b, z_dim]), training=True)
                if r1 > 0:
                    penalty, d_real = r1_penalty(tf, disc, real, r1)
                else:
                    d_real = disc(real, training=True)
                d_fake = disc(fake, training=True)
                d_loss = bce(tf.ones_like(d_real), d_real) + bce(tf.zeros_like(d_fake), d_fake)
                objective = d_loss + penalty if r1 > 0 else d_loss
            grads = disc_x.gradients(tape, objective)
            opt_d.apply_gradients(zip(grads, disc_x.variables))
            with tf.GradientTape() as tape:
                d_out = disc(gen(noise.normal([b, z_dim]), training=True), training=True)
                g_loss = bce(tf.ones_like(d_out), d_out)
            grads = gen_x.gradients(tape, g_loss)
            opt_g.apply_gradients(zip(grads, gen_x.variables))
            return d_loss + g_loss, {"d_loss": d_loss, "g_loss": g_loss}
    else:
        ex, opt = exchanges[0], opts[0]

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = xce(y, logits)
            grads = ex.gradients(tape, loss)
            opt.apply_gradients(zip(grads, ex.variables))
            acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int64), y), tf.float32))
            return loss, {"accuracy": acc}

    def evaluate(tag: str) -> dict:
        """Held-out metrics over every rank's eval shard (one small allreduce of sums)."""
        if gan:
            n = len(x_ev)
            z = tf.random.Generator.from_seed(777 + rank).normal([n, z_dim])
            dr, df = disc(x_ev, training=False), disc(gen(z, training=False), training=False)
            sums = [float(bce(tf.ones_like(dr), dr)) * n + float(bce(tf.zeros_like(df), df)) * n,
                    float(bce(tf.ones_like(df), df)) * n,
                    float(tf.reduce_sum(tf.cast(dr > 0, tf.float32))),
                    float(tf.reduce_sum(tf.cast(df < 0, tf.float32))), n]
        else:
            logits = model(x_ev, training=False)
            correct = float(np.sum(np.argmax(np.asarray(logits), 1) == y_ev))
            sums = [float(xce(y_ev, logits)) * len(y_ev), correct, len(y_ev)]
        tot = hvd.allreduce(tf.constant(sums, tf.float64), op=hvd.Sum, name=f"ranger_hvd.jobs.eval.{tag}").numpy()
        n = max(tot[-1], 1.0)
        if gan:
            return {"eval_d_loss": tot[0] / n, "eval_g_loss": tot[1] / n,
                    "eval_d_real_acc": tot[2] / n, "eval_d_fake_acc": tot[3] / n,
                    **(quality.evaluate(generate, tag) if quality is not None else {})}
        return {"eval_loss": tot[0] / n, "eval_accuracy": tot[1] / n}


    def step_fn(idx):
        loss_t, metrics_t = train_step(tf.constant(x_tr[idx]), tf.constant(y_tr[idx]))
        return float(loss_t), {k: float(v) for k, v in metrics_t.items()}   # float() waits for the step

    def set_lr(lr):
        for opt, scale in zip(opts, lr_scales):
            opt.learning_rate = lr * scale     # assigns the variable the traced step reads: no retracing

    return train_loop(cfg, backend="tensorflow", dataset=data.name, rank=rank, size=size, n_train=len(tr),
                      n_steps=n_steps, step_fn=step_fn, meters=exchanges, evaluate=evaluate,
                      param_arrays=lambda: [np.asarray(v) for net in nets for v in net.weights],
                      allgather_object=hvd.allgather_object, run_dir=run_dir, set_lr=set_lr,
                      save_checkpoint=save if cfg.train.checkpoint and run_dir is not None else None,
                      resume_from=resume_from,
                      end_fields=quality.references if quality is not None else None)
