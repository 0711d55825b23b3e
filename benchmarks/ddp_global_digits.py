"""The digits MLP under DDP: plain DDP, ``ranger_hook`` with the allgather and with global top-k.

    .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/ddp_global_digits.py
    .venv/bin/torchrun --standalone --nproc-per-node 3 benchmarks/ddp_global_digits.py --steps 300 600

A 64-128-10 MLP on the digits (offline, from scikit-learn), SGD (lr 0.1, momentum 0.9), batches of
32 drawn per rank, the same seeds for every mode; prints the full-data loss after each number of
steps (each a run of its own from the same start). ``min_elements`` says what is compressed:
100 compresses both weights (the 1280-entry output weight sends 13 entries a step at d = 0.01),
4096 only the hidden layer's 64x128 weight (issue 33's setting). Rank 0 prints the table.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import machine
from ranger_hvd.torch.ddp import RangerHookState, ranger_hook

MODES = {
    "ddp": None,
    "allgather d=0.01, both weights": {"density": 0.01, "min_elements": 100},
    "global_topk d=0.01, both weights": {"density": 0.01, "min_elements": 100,
                                         "exchange": "global_topk"},
    "global_topk d=0.01, hidden weight only": {"density": 0.01, "min_elements": 4096,
                                               "exchange": "global_topk"},
}


def final_loss(x, y, hook, steps: int, rank: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    named = list(model.named_parameters())
    ddp = DDP(model)
    if hook is not None:
        ddp.register_comm_hook(RangerHookState(named, **hook), ranger_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (32,), generator=gen)
        torch.nn.functional.cross_entropy(ddp(x[pick]), y[pick]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 600])
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    data, target = load_digits(return_X_y=True)
    x = torch.tensor(data / 16.0, dtype=torch.float32)
    y = torch.tensor(target)
    table = {mode: [final_loss(x, y, hook, n, rank) for n in args.steps]
             for mode, hook in MODES.items()}
    if rank == 0:
        print(f"digits MLP under DDP, {size} ranks (Gloo): full-data loss after each number of steps")
        print(machine(f"PyTorch {torch.__version__}", "one thread per rank"))
        print("| mode | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
        print("|---|" + "---|" * len(args.steps))
        for mode, losses in table.items():
            print(f"| {mode} | " + " | ".join(f"{v:.4f}" for v in losses) + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
