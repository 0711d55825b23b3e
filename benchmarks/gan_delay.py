"""Which network of the reference GAN suffers from error feedback's delay: a one-process simulation.

    .venv/bin/python benchmarks/gan_delay.py --compress both,discriminator,generator,none --seeds 0,1,2,3,4,5

Replays the PyTorch GAN job (``configs/gan-digits.yaml``: the same models, digits shards, batches,
per-rank noise, SGD at lr 0.2 without momentum, 5 epochs) with N simulated ranks in one process. Each
rank's gradient goes through ``ranger_hvd.core.reference`` (the NumPy specification the backends are
tested against) and the ranks' payloads are combined as every rank would combine them, so the
compression is the product's rule without Horovod or a launcher. ``--compress`` picks which network's
gradients are compressed; the other one is averaged dense. Prints the sample FD of each seed (the
score the job reports as ``eval_fd``) and their mean.

The simulation seeds its own models, so its figures are comparable with one another, not seed by seed
with the launcher's runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
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


def simulate(compress: str, density: float, seed: int, *, epochs: int = 5, lr: float = 0.2, ranks: int = 2,
             batch_size: int = 16) -> float:
    import torch
    import torch.nn as nn

    from ranger_hvd.jobs.data import epoch_batches, load_digits, shard_indices, steps_per_epoch
    from ranger_hvd.jobs.quality import GanSampleQuality
    from ranger_hvd.jobs.torch_jobs import build_gan

    torch.manual_seed(seed)
    data = load_digits()
    gen, disc = build_gan(int(np.prod(data.image_shape)))
    z_dim = gen[0].in_features
    options = make_options(density=density)
    d_params, g_params = list(disc.parameters()), list(gen.parameters())
    exchange_d = SimulatedExchange(d_params, ranks, options, compress in ("both", "discriminator"))
    exchange_g = SimulatedExchange(g_params, ranks, options, compress in ("both", "generator"))
    noise = [torch.Generator().manual_seed(seed * 1000 + r) for r in range(ranks)]
    shards = [shard_indices(len(data.x_train), r, ranks) for r in range(ranks)]
    x = torch.from_numpy(data.x_train)
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(batch_size, 1), torch.zeros(batch_size, 1)
    for epoch in range(epochs):
        batches = [epoch_batches(len(shards[r]), batch_size, seed, epoch, r) for r in range(ranks)]
        for _ in range(steps_per_epoch(len(data.x_train), ranks, batch_size)):
            real = [x[torch.from_numpy(shards[r][next(batches[r])])].flatten(1) * 2 - 1 for r in range(ranks)]
            grads = []
            for r in range(ranks):
                fake = gen(torch.randn(batch_size, z_dim, generator=noise[r])).detach()
                loss = bce(disc(real[r]), ones) + bce(disc(fake), zeros)
                grads.append(torch.autograd.grad(loss, d_params))
            with torch.no_grad():
                for p, update in zip(d_params, exchange_d(grads)):
                    p -= lr * update
            grads = []
            for r in range(ranks):
                loss = bce(disc(gen(torch.randn(batch_size, z_dim, generator=noise[r]))), ones)
                grads.append(torch.autograd.grad(loss, g_params))
            with torch.no_grad():
                for p, update in zip(g_params, exchange_g(grads)):
                    p -= lr * update
    quality = GanSampleQuality(data, seed=seed, z_dim=z_dim)

    def generate(z):
        with torch.no_grad():
            return gen(torch.from_numpy(z)).numpy()

    return quality.evaluate(generate)["eval_fd"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compress", default="both,discriminator,generator,none",
                    help="comma-separated, each of: both, discriminator, generator, none")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    choices = args.compress.split(",")
    bad = [c for c in choices if c not in ("both", "discriminator", "generator", "none")]
    if bad:
        ap.error(f"--compress: unknown choice {', '.join(bad)} (both, discriminator, generator, none)")
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"| compressed at d = {args.density} | FD per seed ({args.epochs} epochs) | mean |")
    print("|---|---|---|")
    for choice in choices:
        fds = [simulate(choice, args.density, s, epochs=args.epochs) for s in seeds]
        print(f"| {choice} | {' '.join(f'{f:.2f}' for f in fds)} | {statistics.fmean(fds):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
