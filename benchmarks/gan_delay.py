"""Which network of the reference GAN suffers from error feedback's delay: a one-process simulation.

    .venv/bin/python benchmarks/gan_delay.py --compress both,discriminator,generator,none --seeds 0,1,2,3,4,5
    .venv/bin/python benchmarks/gan_delay.py --set gan.r1_penalty=0 --set gan.disc_lr_scale=1

Replays the PyTorch GAN job of a config (default ``configs/gan-digits.yaml``, ``--set`` overrides as on
the launcher's command line: the same models, digits shards, batches, per-rank noise, SGD on the averaged
update with the config's learning rates, momentum and R1 penalty, and its epochs) with two simulated
ranks in one process. Each
rank's gradient goes through ``ranger_hvd.core.reference`` (the NumPy specification the backends are
tested against) and the ranks' payloads are combined as every rank would combine them, so the
compression is the product's rule without Horovod or a launcher. ``--compress`` picks which network's
gradients are compressed; the other one is averaged dense. Prints the sample FD of each seed (the
score the job reports as ``eval_fd``) and their mean.

The simulation seeds its models as the job does (``torch.manual_seed(train.seed)``) and steps with the
same optimizer, so it matches the launcher's run of the same config and seed closely (tests compare
them after one epoch); over several epochs the adversarial game amplifies rounding differences, so
compare means over seeds, not single seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from common import REPO

sys.path.insert(0, str(REPO))

from ranger_hvd.core import is_compressed, make_options  # noqa: E402
from ranger_hvd.core.reference import ReferenceCompressor, combine  # noqa: E402


class SimulatedExchange:
    """The averaged gradient of N ranks for one network: compressed per the reference, or dense."""

    def __init__(self, params, ranks: int, options, compress: bool):
        self.params, self.ranks, self.options = params, ranks, options
        self.states = [[ReferenceCompressor(p.numel(), options, world_size=ranks)
                        if compress and is_compressed(tuple(p.shape), options) else None for p in params]
                       for _ in range(ranks)]

    def __call__(self, grads):
        """``grads[r][j]``: rank r's gradient of parameter j; returns the averaged update of each."""
        import torch

        out = []
        for j, p in enumerate(self.params):
            if self.states[0][j] is None:
                out.append(sum(g[j] for g in grads) / self.ranks)
                continue
            payloads = [self.states[r][j].step(grads[r][j].numpy()) for r in range(self.ranks)]
            out.append(torch.from_numpy(combine(payloads, p.numel())).view_as(p))
        return out


def simulate(compress: str, cfg, ranks: int = 2) -> float:
    """The sample FD after the PyTorch GAN job of ``cfg`` (a launcher ``Config``), replayed in one process."""
    import torch
    import torch.nn as nn

    from ranger_hvd.jobs.common import optimizer_momentum
    from ranger_hvd.jobs.data import epoch_batches, load_digits, shard_indices, steps_per_epoch
    from ranger_hvd.jobs.quality import GanSampleQuality
    from ranger_hvd.jobs.torch_jobs import build_gan, r1_penalty

    tr, gan, seed, batch_size = cfg.train, cfg.gan, cfg.train.seed, cfg.train.batch_size
    torch.manual_seed(seed)
    data = load_digits()
    gen, disc = build_gan(int(np.prod(data.image_shape)))
    z_dim = gen[0].in_features
    options = make_options(**cfg.compression.options())
    d_params, g_params = list(disc.parameters()), list(gen.parameters())
    exchange_d = SimulatedExchange(d_params, ranks, options, compress in ("both", "discriminator"))
    exchange_g = SimulatedExchange(g_params, ranks, options, compress in ("both", "generator"))
    # the job's optimizers: SGD on the averaged update, the discriminator's at lr * gan.disc_lr_scale
    momentum = optimizer_momentum(cfg)
    opt_d = torch.optim.SGD(d_params, lr=tr.lr * gan.disc_lr_scale, momentum=momentum)
    opt_g = torch.optim.SGD(g_params, lr=tr.lr, momentum=momentum)
    noise = [torch.Generator().manual_seed(seed * 1000 + r) for r in range(ranks)]
    shards = [shard_indices(len(data.x_train), r, ranks) for r in range(ranks)]
    x = torch.from_numpy(data.x_train)
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(batch_size, 1), torch.zeros(batch_size, 1)

    def apply(opt, params, exchange, grads):
        for p, update in zip(params, exchange(grads)):
            p.grad = update.contiguous()
        opt.step()

    for epoch in range(tr.epochs):
        batches = [epoch_batches(len(shards[r]), batch_size, seed, epoch, r) for r in range(ranks)]
        for _ in range(steps_per_epoch(len(data.x_train), ranks, batch_size)):
            real = [x[torch.from_numpy(shards[r][next(batches[r])])].flatten(1) * 2 - 1 for r in range(ranks)]
            grads = []
            for r in range(ranks):
                fake = gen(torch.randn(batch_size, z_dim, generator=noise[r])).detach()
                real[r].requires_grad_(gan.r1_penalty > 0)
                d_real = disc(real[r])
                loss = bce(d_real, ones) + bce(disc(fake), zeros)
                if gan.r1_penalty > 0:
                    loss = loss + r1_penalty(d_real, real[r], gan.r1_penalty)
                grads.append(torch.autograd.grad(loss, d_params))
            apply(opt_d, d_params, exchange_d, grads)
            grads = []
            for r in range(ranks):
                loss = bce(disc(gen(torch.randn(batch_size, z_dim, generator=noise[r]))), ones)
                grads.append(torch.autograd.grad(loss, g_params))
            apply(opt_g, g_params, exchange_g, grads)
    quality = GanSampleQuality(data, seed=seed, z_dim=z_dim)

    def generate(z):
        with torch.no_grad():
            return gen(torch.from_numpy(z)).numpy()

    return quality.evaluate(generate)["eval_fd"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "gan-digits.yaml"),
                    help="a PyTorch GAN config (default: configs/gan-digits.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, as on ranger-hvd's command line (e.g. compression.density=0.001)")
    ap.add_argument("--compress", default="both,discriminator,generator,none",
                    help="comma-separated, each of: both, discriminator, generator, none")
    ap.add_argument("--seeds", default="0,1,2,3,4,5", help="train.seed values")
    args = ap.parse_args(argv)
    choices = args.compress.split(",")
    bad = [c for c in choices if c not in ("both", "discriminator", "generator", "none")]
    if bad:
        ap.error(f"--compress: unknown choice {', '.join(bad)} (both, discriminator, generator, none)")
    from ranger_hvd.config import ConfigError, load_config

    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        cfgs = [load_config(args.config, [*args.set, f"train.seed={s}"]).config for s in seeds]
    except ConfigError as exc:
        ap.error(str(exc))
    cfg = cfgs[0]
    if cfg.job.model != "gan" or cfg.job.backend != "torch" or cfg.compression.type != "ranger":
        ap.error(f"{args.config}: needs job.model gan, job.backend torch and compression.type ranger")
    import torch

    torch.set_num_threads(1)
    print(f"| {Path(args.config).name}, d = {cfg.compression.density}, {cfg.train.epochs} epochs, "
          f"R1 {cfg.gan.r1_penalty}, D lr x{cfg.gan.disc_lr_scale}: compressed | FD per seed | mean |")
    print("|---|---|---|")
    for choice in choices:
        fds = [simulate(choice, c) for c in cfgs]
        print(f"| {choice} | {' '.join(f'{f:.2f}' for f in fds)} | {statistics.fmean(fds):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
