"""PyTorch reference jobs (CNN, RNN, GAN) under Horovod, or under DDP when torchrun started them
(``cluster.runner: torchrun``, see :mod:`ranger_hvd.jobs.ddp`); see :mod:`ranger_hvd.jobs` for
inputs/outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ranger_hvd.rundir import checkpoint
from ranger_hvd.jobs.common import ByteMeter, Config, log, optimizer_momentum, train_loop
from ranger_hvd.jobs.data import Dataset, shard_indices, steps_per_epoch


def _torch():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    return torch, nn, F


# --------------------------------------------------------------------------------------------------
# models


def init_like_keras(module):
    """Glorot-uniform weights and zero biases (Keras' defaults): a faster start than torch's default
    init for these small ReLU nets, and the same starting point for both backends' reference jobs."""
    torch, nn, _ = _torch()
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def build_cnn(image_shape, num_classes):
    torch, nn, _ = _torch()
    return init_like_keras(nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 16 x H/2 x W/2
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),  # 32 x 4 x 4
        nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
    ))


def build_rnn(image_shape, num_classes, hidden=64):
    torch, nn, _ = _torch()

    class GRUClassifier(nn.Module):
        """Reads an image row by row: H time steps of W features; classifies from the last state."""

        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(input_size=image_shape[1], hidden_size=hidden, batch_first=True)
            self.head = nn.Linear(hidden, num_classes)

        def forward(self, x):              # x: (B, 1, H, W) or (B, H, W)
            if x.dim() == 4:
                x = x[:, 0]
            _, h = self.gru(x)
            return self.head(h[-1])

    return init_like_keras(GRUClassifier())


def build_gan(image_dim, z_dim=32, hidden=128):
    torch, nn, _ = _torch()
    gen = nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                        nn.LeakyReLU(0.2), nn.Linear(hidden, image_dim), nn.Tanh())
    disc = nn.Sequential(nn.Linear(image_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                         nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    return init_like_keras(gen), init_like_keras(disc)


def r1_penalty(d_real, real, gamma: float):
    """gamma/2 * mean over the batch of ||grad_x D(x)||^2 at the real samples (Mescheder et al. 2018).

    It pulls the discriminator's slope at the data towards zero, which damps the rotation of the
    adversarial game; the graph is kept (create_graph) so that the penalty's own gradient reaches D's
    weights. Only ``real`` is differentiated here, so no parameter's gradient hook fires twice.
    """
    torch, _, _ = _torch()
    (grad_x,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    return gamma / 2 * grad_x.pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------------------
# distributed optimizer and byte accounting


class DistOpt(ByteMeter):
    """A module's SGD wrapped by Horovod (none/fp16) or ranger_hvd (ranger), and its byte meter.

    ``lr_scale``: this module's learning rate is ``train.lr`` (or the schedule's) times it.
    """

    def __init__(self, module, prefix: str, cfg: Config, lr_scale: float = 1.0):
        torch, _, _ = _torch()
        import horovod.torch as hvd

        self.named = [(f"{prefix}{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.dense_bytes = sum(4 * p.numel() for p in params)
        self.comp = None
        self.net = module      # what the training step calls: Horovod's hooks sit on the parameters
        self.lr_scale = lr_scale
        sgd = torch.optim.SGD(params, lr=cfg.train.lr * lr_scale, momentum=optimizer_momentum(cfg))
        if cfg.compression.type == "ranger":
            from ranger_hvd.torch import DistributedOptimizer, RangerCompressor

            self.comp = RangerCompressor(named_parameters=self.named, **cfg.compression.options())
            self.opt = DistributedOptimizer(sgd, named_parameters=self.named, compression=self.comp)
        else:
            fp16 = cfg.compression.type == "fp16"
            compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
            self.opt = hvd.DistributedOptimizer(sgd, named_parameters=self.named, compression=compression)
            # What Horovod hands to allreduce: fp16 casts floating gradients to 2 bytes per element.
            self.sent_per_step = sum(p.numel() * (2 if fp16 and p.is_floating_point() else p.element_size())
                                     for p in params)
        self.reset_baseline()

    def hook_state_dict(self):
        return None     # Horovod: the compressor's state travels in the optimizer's state_dict

    def load_hook_state(self, state) -> None:
        pass


class HvdComm:
    """The jobs' collectives besides the gradients, through Horovod (see ddp.DdpComm for DDP's)."""

    runner = "horovodrun"

    def __init__(self):
        import horovod.torch as hvd

        self.hvd = hvd
        hvd.init()

    def rank(self) -> int:
        return self.hvd.rank()

    def size(self) -> int:
        return self.hvd.size()

    def allreduce_sum(self, tensor, name: str):
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def allgather_object(self, obj, name=None) -> list:
        return self.hvd.allgather_object(obj, name=name)

    def broadcast(self, modules, opts) -> None:
        _broadcast(self.hvd, modules, opts)

    def close(self) -> None:
        pass


def _broadcast(hvd, modules, opts):
    """Rank 0's parameters (and optimizer state, if any) to every rank.

    A fresh optimizer has no state, and ``hvd.broadcast_optimizer_state`` would then run one
    zero-gradient ``step()`` to create it, which through ranger_hvd's optimizer is a real exchange
    (bytes counted, compressor step advanced); every rank starts with the same empty state anyway, so
    the state is broadcast only when there is some.
    """
    for m in modules:
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    for o in opts:
        if any(len(s) for s in o.opt.state.values()):
            hvd.broadcast_optimizer_state(o.opt, root_rank=0)
    for o in opts:
        o.reset_baseline()


# --------------------------------------------------------------------------------------------------
# checkpoints: one file per rank and save point (each rank's compressor residuals differ); see
# :mod:`ranger_hvd.rundir.checkpoint` for the layout and how a complete set is chosen


def _write_torch(path: Path, state: dict) -> None:
    torch, _, _ = _torch()
    torch.save(state, path)


def _read_torch(path: Path) -> dict:
    torch, _, _ = _torch()
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# the training loop


def run(cfg: Config, data: Dataset, run_dir, resume: bool = False) -> dict:
    ddp = cfg.cluster.runner == "torchrun"
    if ddp:
        from ranger_hvd.jobs.ddp import DdpComm, DdpOpt

        comm, Opt = DdpComm(), DdpOpt
    else:
        comm, Opt = HvdComm(), DistOpt
    record = _run(cfg, data, run_dir, resume, comm, Opt)
    comm.close()
    return record


def _run(cfg: Config, data: Dataset, run_dir, resume: bool, comm, Opt) -> dict:
    torch, nn, F = _torch()

    rank, size = comm.rank(), comm.size()
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed + rank)

    H, W = data.image_shape
    # elastic: every worker holds the whole training set; each step's slice follows the current size
    elastic = cfg.cluster.elastic is not None
    tr = np.arange(len(data.x_train)) if elastic else shard_indices(len(data.x_train), rank, size)
    x_tr = torch.from_numpy(data.x_train[tr]).unsqueeze(1)            # (n, 1, H, W)
    y_tr = torch.from_numpy(data.y_train[tr])
    n_steps = steps_per_epoch(len(data.x_train), size, cfg.train.batch_size)

    def eval_shard():
        """This rank's held-out samples among the current workers."""
        ev = shard_indices(len(data.x_eval), comm.rank(), comm.size(), equalize=False)
        return torch.from_numpy(data.x_eval[ev]).unsqueeze(1), torch.from_numpy(data.y_eval[ev])

    gan = cfg.job.model == "gan"
    if gan:
        gen, disc = build_gan(H * W)
        modules = [gen, disc]
        opts = [Opt(disc, "D.", cfg, lr_scale=cfg.gan.disc_lr_scale), Opt(gen, "G.", cfg)]
        noise = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)   # each rank its own noise
        z_dim = gen[0].in_features
    else:
        model = build_cnn((H, W), data.num_classes) if cfg.job.model == "cnn" else build_rnn((H, W), data.num_classes)
        modules = [model]
        opts = [Opt(model, "", cfg)]
    if not elastic:       # elastic: TorchState's sync broadcasts rank 0's state
        comm.broadcast(modules, opts)
    quality = None
    # samples are scored on rank 0 (every rank holds the same generator); elastic: any worker may become it
    if gan and (rank == 0 or elastic):
        from ranger_hvd.jobs.quality import GanSampleQuality

        quality = GanSampleQuality(data, seed=cfg.train.seed, z_dim=z_dim, run_dir=run_dir)

        def generate(z):
            gen.eval()
            with torch.no_grad():
                return gen(torch.from_numpy(z)).numpy()

        quality.measure_untrained(generate)     # before a resume loads trained weights

    resume_from = None
    if resume:
        ckpt = checkpoint.load_for_resume(run_dir, rank=rank, size=size, backend="torch", model=cfg.job.model,
                                          compression=cfg.compression.type, allgather_object=comm.allgather_object,
                                          read=_read_torch)
        saved_by = ckpt.get("runner", "horovodrun")
        if saved_by != comm.runner:
            raise checkpoint.CheckpointError(f"cannot resume: the checkpoints were saved under {saved_by}, this "
                                             f"run's cluster.runner is {comm.runner}")
        for m, sd in zip(modules, ckpt["modules"]):
            m.load_state_dict(sd)
        for o, sd, base, hook in zip(opts, ckpt["optimizers"], ckpt["byte_baselines"],
                                     ckpt.get("hook_states", [None] * len(opts))):
            o.opt.load_state_dict(sd)
            o.load_hook_state(hook)     # DDP + ranger_hook: residuals, momentum, counters by parameter name
            for g in o.opt.param_groups:     # the config's values win (e.g. an lr override on resume)
                g["lr"], g["momentum"] = cfg.train.lr * o.lr_scale, optimizer_momentum(cfg)
            o.reset_baseline(base)       # steps count from the restored compressor; totals from the start
        if gan:
            noise.set_state(ckpt["noise"])
        torch.set_rng_state(ckpt["torch_rng"])
        resume_from = ckpt["loop"]

    def save(loop_state: dict) -> None:
        rank, size = comm.rank(), comm.size()    # elastic: the current ones
        checkpoint.save(run_dir, rank=rank, backend="torch", write=_write_torch, state={
            **checkpoint.header(rank=rank, size=size, backend="torch", model=cfg.job.model,
                                compression=cfg.compression.type),
            "modules": [m.state_dict() for m in modules],
            "optimizers": [o.opt.state_dict() for o in opts],      # Horovod + ranger: with the compressor state
            "hook_states": [o.hook_state_dict() for o in opts],    # DDP + ranger: the hook's state
            "runner": comm.runner,
            "byte_baselines": [o.baseline for o in opts],
            "noise": noise.get_state() if gan else None,
            "torch_rng": torch.get_rng_state(),
            "loop": loop_state,
        })

    log(rank, f"torch {cfg.job.model} on {data.name} ({'DDP' if comm.runner == 'torchrun' else 'Horovod'}): {size} ranks, {len(tr)} train samples/rank, "
              f"{n_steps} steps/epoch, compression={cfg.compression.type}"
              + (f" {cfg.compression.options()}" if cfg.compression.options() else ""))

    def classifier_step(xb, yb):
        model.train()
        opt = opts[0].opt
        opt.zero_grad()
        out = opts[0].net(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        acc = (out.argmax(1) == yb).float().mean().item()
        return loss.item(), {"accuracy": acc}

    bce = nn.BCEWithLogitsLoss()
    r1 = cfg.gan.r1_penalty

    def gan_step(xb, _yb):
        opt_d, opt_g = opts[0].opt, opts[1].opt
        # through the wrappers (DDP) where a module's gradients are exchanged; plain modules elsewhere
        disc_net, gen_net = opts[0].net, opts[1].net
        real = xb.flatten(1) * 2 - 1
        b = real.shape[0]
        ones, zeros = torch.ones(b, 1), torch.zeros(b, 1)
        # discriminator: real vs (detached) fake; only D's parameters get gradients
        opt_d.zero_grad()
        fake = gen(torch.randn(b, z_dim, generator=noise)).detach()
        if r1 > 0:
            real.requires_grad_(True)
        d_real = disc_net(real)
        d_loss = bce(d_real, ones) + bce(disc_net(fake), zeros)
        objective = d_loss + r1_penalty(d_real, real, r1) if r1 > 0 else d_loss
        objective.backward()
        opt_d.step()
        # generator: D frozen so its hooks do not fire and its gradients stay out of this step
        for p in disc.parameters():
            p.requires_grad_(False)
        try:
            opt_g.zero_grad()
            g_loss = bce(disc(gen_net(torch.randn(b, z_dim, generator=noise))), ones)
            g_loss.backward()
            opt_g.step()
        finally:
            for p in disc.parameters():
                p.requires_grad_(True)
        d, g = d_loss.item(), g_loss.item()
        return d + g, {"d_loss": d, "g_loss": g}

    def evaluate(epoch_tag: str) -> dict:
        """Held-out metrics over every rank's eval shard (one small allreduce of sums)."""
        for m in modules:
            m.eval()
        x_ev, y_ev = eval_shard()
        with torch.no_grad():
            if gan:
                real = x_ev.flatten(1) * 2 - 1
                n = real.shape[0]
                g = torch.Generator().manual_seed(777 + comm.rank())
                fake = gen(torch.randn(n, z_dim, generator=g))
                dr, df = disc(real), disc(fake)
                sums = torch.tensor([
                    F.binary_cross_entropy_with_logits(dr, torch.ones_like(dr), reduction="sum")
                    + F.binary_cross_entropy_with_logits(df, torch.zeros_like(df), reduction="sum"),
                    F.binary_cross_entropy_with_logits(df, torch.ones_like(df), reduction="sum"),
                    (dr > 0).sum(), (df < 0).sum(), n], dtype=torch.float64)
            else:
                out = model(x_ev)
                sums = torch.tensor([F.cross_entropy(out, y_ev, reduction="sum").item(),
                                     (out.argmax(1) == y_ev).sum().item(), len(y_ev)], dtype=torch.float64)
        tot = comm.allreduce_sum(sums, name=f"ranger_hvd.jobs.eval.{epoch_tag}")
        n = max(tot[-1].item(), 1.0)
        if gan:
            return {"eval_d_loss": tot[0].item() / n, "eval_g_loss": tot[1].item() / n,
                    "eval_d_real_acc": tot[2].item() / n, "eval_d_fake_acc": tot[3].item() / n,
                    **(quality.evaluate(generate, epoch_tag) if quality is not None and comm.rank() == 0 else {})}
        return {"eval_loss": tot[0].item() / n, "eval_accuracy": tot[1].item() / n}

    train_step = gan_step if gan else classifier_step

    def step_fn(idx):
        idx_t = torch.from_numpy(idx)
        return train_step(x_tr[idx_t], y_tr[idx_t])

    def set_lr(lr):
        for o in opts:
            for g in o.opt.param_groups:
                g["lr"] = lr * o.lr_scale

    if elastic:
        from ranger_hvd.jobs.torch_elastic import run_elastic

        return run_elastic(cfg, dataset=data.name, n_train=len(tr), modules=modules, opts=opts, step_fn=step_fn,
                           evaluate=evaluate, run_dir=run_dir, resume_from=resume_from, set_lr=set_lr,
                           end_fields=quality.references if quality is not None else None,
                           save_checkpoint=save if cfg.train.checkpoint and run_dir is not None else None)
    return train_loop(cfg, backend="torch", dataset=data.name, rank=rank, size=size, n_train=len(tr),
                      n_steps=n_steps, step_fn=step_fn, meters=opts, evaluate=evaluate,
                      param_arrays=lambda: [p.detach().cpu().numpy() for m in modules for p in m.parameters()],
                      allgather_object=comm.allgather_object, run_dir=run_dir, set_lr=set_lr,
                      end_fields=quality.references if quality is not None else None,
                      save_checkpoint=save if cfg.train.checkpoint and run_dir is not None else None,
                      resume_from=resume_from)
