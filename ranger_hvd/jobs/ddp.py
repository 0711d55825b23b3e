"""The PyTorch reference jobs under ``DistributedDataParallel`` (``cluster.runner: torchrun``).

``torchrun`` starts the ranks (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... in their environment); the
jobs of :mod:`ranger_hvd.jobs.torch_jobs` then train each module through DDP with the compression as a
communication hook instead of Horovod's optimizer:

* ``compression.type: none``: DDP's own allreduce (no hook);
* ``fp16``: PyTorch's ``fp16_compress_hook`` (gradients travel as 2-byte floats);
* ``ranger``: :func:`ranger_hvd.torch.ddp.ranger_hook` with the compression options, one
  :class:`~ranger_hvd.torch.ddp.RangerHookState` per module, checkpointed with the module.

:class:`DdpComm` gives the jobs the few collectives they need besides the gradients (the eval sums, the
checkpoint agreement, the parameter digests) through ``torch.distributed``.  Horovod is not imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ranger_hvd.jobs.common import ByteMeter, Config, optimizer_momentum
from ranger_hvd.rundir import layout

RUNNER = "torchrun"


def under_torchrun() -> bool:
    """Was this process started by torchrun (its agent sets these for every worker)?"""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def write_own_rank_logs(run_dir) -> None:
    """torchrun leaves its workers' output on its own stdout; here each rank sends its stdout and stderr to
    ``RUN_DIR/logs/rank.N/{stdout,stderr}``, the files horovodrun's Gloo mode writes, so the launcher reads
    both runners' logs alike (what a rank prints before this goes to the launcher's log)."""
    d = Path(run_dir) / layout.RANK_LOGS / f"rank.{int(os.environ['RANK'])}"
    d.mkdir(parents=True, exist_ok=True)
    for stream, fd, name in ((sys.stdout, 1, "stdout"), (sys.stderr, 2, "stderr")):
        stream.flush()
        f = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)


class DdpComm:
    """The process group on torchrun's rendezvous and the jobs' collectives on it.  Gloo: the reference
    jobs train on the CPU, under Horovod too (``ranger_hook`` itself runs on NCCL as well, by
    construction).  The collectives are called in the same order on every rank; ``name`` is Horovod's
    and unused here."""

    runner = RUNNER

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")

    def rank(self) -> int:
        return self.dist.get_rank()

    def size(self) -> int:
        return self.dist.get_world_size()

    def allreduce_sum(self, tensor, name: str):
        out = tensor.clone()
        self.dist.all_reduce(out)
        return out

    def allgather_object(self, obj, name=None) -> list:
        out = [None] * self.size()
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, modules, opts) -> None:
        """DDP's constructor already sent rank 0's parameters and buffers to every rank."""
        for o in opts:
            o.reset_baseline()

    def close(self) -> None:
        """Every rank past its last collective; the process then ends without tearing the group down
        (see :func:`exit_without_teardown`)."""
        self.dist.barrier()


def exit_without_teardown(code: int) -> None:
    """Ends a torchrun worker once its work is written: Gloo's teardown (``destroy_process_group`` or the
    interpreter's exit) now and then aborts with "terminate called without an active exception" after
    a run that ended well (measured: 1 of 15 sweep runs), which would fail the launch."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class DdpOpt(ByteMeter):
    """A module wrapped by DDP with the config's communication hook, its SGD, and its byte meter.

    ``net`` is what the training step calls (the DDP wrapper); ``opt`` the plain SGD; with Ranger,
    ``hook_state`` holds the residuals, momentum and counters, saved by :meth:`hook_state_dict`.
    """

    def __init__(self, module, prefix: str, cfg: Config, lr_scale: float = 1.0):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.named = [(f"{prefix}{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named]
        self.dense_bytes = sum(4 * p.numel() for p in params)
        self.lr_scale = lr_scale
        self.comp = self.hook_state = None
        self.net = DistributedDataParallel(module)
        kind = cfg.compression.type
        if kind == "ranger":
            from ranger_hvd.torch.ddp import RangerHookState, ranger_hook

            self.hook_state = RangerHookState(self.named, **cfg.compression.options())
            self.comp = self.hook_state          # its stats() are the compressor's: bytes_sent
            self.net.register_comm_hook(self.hook_state, ranger_hook)
        elif kind == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.net.register_comm_hook(None, default_hooks.fp16_compress_hook)
        # none / fp16: what the allreduce is handed per step (fp16_compress_hook casts to 2 bytes)
        self.sent_per_step = sum(p.numel() * (2 if kind == "fp16" else p.element_size()) for p in params)
        self.opt = torch.optim.SGD(params, lr=cfg.train.lr * lr_scale, momentum=optimizer_momentum(cfg))
        self.reset_baseline()

    def hook_state_dict(self):
        return None if self.hook_state is None else self.hook_state.state_dict()

    def load_hook_state(self, state) -> None:
        if self.hook_state is not None:
            self.hook_state.load_state_dict(state)
