"""The PyTorch reference jobs in elastic mode (``cluster.elastic``): Horovod's ``TorchState`` and
``hvd.elastic.run`` around the training loop, so that workers may leave or join while it runs.

What is committed (every ``commit_every_steps`` steps, if set, and at each epoch end): every module's
parameters, every optimizer's state, which with Ranger holds this worker's compressor state
(residuals, momentum, exchange counts, byte counts: see ``ranger_hvd.torch.optimizer``), and the
loop's position and counters. When a worker fails, the others roll back to the last commit; the
workers that remain (and any that join) then take rank 0's parameters, optimizer state and position.
The residuals stay with their worker: a lost worker's residual, the gradient it had not sent yet, is
lost with it, and a new worker starts with none. Each compressor's exchange counts follow rank 0, so
that every rank picks the same k.

Data: each epoch is one permutation of the whole training set, drawn from (seed, epoch); a step takes
the next ``size * batch_size`` samples of it, rank r its r-th slice. The loop commits the number of
samples taken, so after a resize the remaining samples of the epoch are split among the new workers
and none is taken twice. Horovod's ``Average`` divides by the new N at once; the learning rate stays
as configured (the per-rank batch is fixed, so the global batch shrinks with N).

Each resize adds one ``{"event": "elastic_reset", ...}`` line to metrics.jsonl (rank 0 writes it): when,
the sizes before and after, the hosts lost and added, the steps taken again after a rollback, and the
L2 norm of the residuals that left with the lost workers (at the last commit, where training resumes).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter

import numpy as np

from ranger_hvd.rundir.layout import RESET_EVENT   # the launcher's summary collects these lines

from ranger_hvd.jobs.common import finish_run, log, lr_at, record_step, timed_step
from ranger_hvd.rundir.metrics import MetricsWriter


def epoch_order(n_train: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the whole training set (the same on every worker)."""
    return np.random.default_rng([seed, epoch, 0x5E1A]).permutation(n_train)


def step_slice(order: np.ndarray, pos: int, rank: int, size: int, batch_size: int) -> np.ndarray:
    """Rank ``rank``'s samples of the step that starts at ``pos`` samples into the epoch."""
    start = pos + rank * batch_size
    return order[start:start + batch_size]


def epoch_has_step(n_train: int, pos: int, size: int, batch_size: int) -> bool:
    """Whether a whole step of ``size * batch_size`` samples is left in the epoch (drop-last)."""
    return pos + size * batch_size <= n_train


def this_host() -> str:
    """The host name horovodrun gave this worker (test hosts in namespaces share the kernel's)."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def membership_change(previous: list, current: list) -> dict | None:
    """The resize between two memberships, lists of (host, pid, residual square sum), or None."""
    before = {(h, p): sq for h, p, sq in previous}
    after = {(h, p) for h, p, _ in current}
    if set(before) == after:
        return None
    lost = [k for k in before if k not in after]
    added = [k for k in after if k not in before]
    lost_sq = sum(before[k] or 0.0 for k in lost)
    all_sq = sum(sq or 0.0 for sq in before.values())
    return {
        "old_size": len(before), "new_size": len(after),
        "hosts_before": sorted(Counter(h for h, _ in before).items()),
        "hosts_after": sorted(Counter(h for h, _ in after).items()),
        "hosts_lost": sorted(Counter(h for h, _ in lost).elements()),
        "hosts_added": sorted(Counter(h for h, _ in added).elements()),
        "lost_residual_norm": math.sqrt(lost_sq),
        "residual_norm_all_workers": math.sqrt(all_sq),
    }


class _Meters:
    """The byte meters of the optimizers (see common.ByteMeter), resynchronised after a rollback."""

    def __init__(self, opts):
        self.opts = opts

    def resync(self) -> None:
        for o in self.opts:
            o._last = o._stat("bytes_sent") if o.comp is not None else 0

    def residual_sq(self) -> float | None:
        comps = [o.comp for o in self.opts if o.comp is not None]
        if not comps:
            return None
        return float(sum(n * n for c in comps for n in c.residual_norms().values()))


def run_elastic(cfg, *, dataset: str, n_train: int, modules, opts, step_fn, evaluate, run_dir, set_lr,
                save_checkpoint=None, resume_from: dict | None = None, end_fields=None) -> dict:
    """Trains under ``hvd.elastic.run``; returns the end record (every worker).

    ``step_fn(indices)`` runs one step on this rank's samples (indices into the whole training set);
    ``evaluate(tag)`` the held-out metrics over the current workers; ``set_lr(lr)`` sets the
    learning rate before each step: ``train.lr_schedule`` over the samples taken, since the number of
    steps per epoch changes with the workers; ``save_checkpoint(loop_state)`` writes this rank's
    checkpoint file.
    """
    import horovod.torch as hvd
    from horovod.torch.elastic import TorchState

    train, el = cfg.train, cfg.cluster.elastic
    meters = _Meters(opts)
    comps = [o.comp for o in opts if o.comp is not None]
    writer = MetricsWriter(run_dir, enabled=hvd.rank() == 0)
    host, pid = this_host(), os.getpid()
    local = {"known": None, "last_step_run": None, "resets": 0}

    class ElasticState(TorchState):
        def sync(self):
            super().sync()
            for i, comp in enumerate(comps):   # every rank must pick the same k per tensor
                steps = hvd.broadcast_object(comp.step_counters(), root_rank=0,
                                             name=f"ranger_hvd.jobs.elastic.compressor_steps.{i}")
                comp.set_step_counters(steps)

    r = resume_from or {}
    state = ElasticState(**{f"module{i}": m for i, m in enumerate(modules)},
                         **{f"optimizer{i}": o.opt for i, o in enumerate(opts)},
                         epoch=int(r.get("epoch", 0)), pos=int(r.get("pos", 0)), step=int(r.get("step", 0)),
                         bytes_dense_total=int(r.get("bytes_dense_total", 0)),
                         bytes_sent_total=int(r.get("bytes_sent_total", 0)),
                         train_time=float(r.get("train_time", 0.0)), loss=float(r.get("loss", float("nan"))),
                         eval_metrics=dict(r.get("eval_metrics", {})), resets=int(r.get("resets", 0)))

    def on_reset():
        for comp in comps:
            comp.world_size = hvd.size()

    state.register_reset_callbacks([on_reset])

    def loop_state() -> dict:
        return {"epoch": state.epoch, "batch": 0, "pos": state.pos, "step": state.step,
                "bytes_dense_total": state.bytes_dense_total, "bytes_sent_total": state.bytes_sent_total,
                "train_time": state.train_time, "loss": state.loss, "eval_metrics": dict(state.eval_metrics),
                "resets": state.resets}

    def commit() -> None:
        # each worker's residual at this commit: what would be lost with it
        local["known"] = [tuple(x) for x in hvd.allgather_object(
            (host, pid, meters.residual_sq()), name="ranger_hvd.jobs.elastic.commit")]
        state.commit()

    def note_membership() -> None:
        """After a (re)start: compare the workers with the last known ones and record a resize."""
        rows = hvd.allgather_object((host, pid, meters.residual_sq(), local["known"], local["last_step_run"]),
                                    name="ranger_hvd.jobs.elastic.members")
        previous = next((known for *_, known, _ in rows if known is not None), None)
        current = [(h, p, sq) for h, p, sq, _, _ in rows]
        change = membership_change(previous, current) if previous is not None else None
        if change is not None:
            last_run = max((s for *_, s in rows if s is not None), default=state.step)
            state.resets += 1
            event = {"event": RESET_EVENT, "wall_time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "time": round(writer.elapsed(), 6), "reset": state.resets, **change,
                     "resumed_at": {"epoch": state.epoch, "pos": state.pos, "step": state.step},
                     "steps_rolled_back": max(0, int(last_run) - state.step)}
            writer.write(event)
            log(hvd.rank(), f"elastic reset: {change['old_size']} -> {change['new_size']} workers, lost "
                            f"{change['hosts_lost'] or 'none'}, added {change['hosts_added'] or 'none'}; resuming "
                            f"at epoch {state.epoch} step {state.step}")
        local["known"] = current

    @hvd.elastic.run
    def train_elastic(state):
        rank, size = hvd.rank(), hvd.size()
        writer.set_enabled(rank == 0)
        meters.resync()
        note_membership()
        per_step = size * train.batch_size
        if n_train < per_step:
            raise ValueError(f"train.batch_size {train.batch_size} x {size} workers is more than the "
                             f"{n_train} training samples")
        done = train.max_steps is not None and state.step >= train.max_steps
        while state.epoch < train.epochs and not done:
            order = epoch_order(n_train, train.seed, state.epoch)
            while epoch_has_step(n_train, state.pos, size, train.batch_size) and not done:
                loss, metrics, dt, sent, dense = timed_step(
                    step_fn, step_slice(order, state.pos, rank, size, train.batch_size), opts,
                    lr=lr_at(train, state.epoch * n_train + state.pos, train.epochs * n_train), set_lr=set_lr,
                    step_no=state.step + 1, where=f"epoch {state.epoch}, {size} workers")
                state.pos += per_step
                state.step += 1
                local["last_step_run"] = state.step
                state.train_time += dt
                state.loss = loss
                state.bytes_sent_total += sent
                state.bytes_dense_total += dense
                end_of_epoch = not epoch_has_step(n_train, state.pos, size, train.batch_size)
                done = train.max_steps is not None and state.step >= train.max_steps
                held_out = record_step(writer, train, evaluate, step=state.step, epoch=state.epoch, loss=loss,
                                       metrics=metrics, sent=sent, dense=dense, seconds=dt, ends=end_of_epoch or done)
                if held_out is not None:
                    state.eval_metrics = held_out
                if end_of_epoch:
                    log(rank, f"epoch {state.epoch}: step {state.step} loss {loss:.4f} {size} workers "
                              + " ".join(f"{k} {v:.4f}" for k, v in state.eval_metrics.items()))
                    state.epoch += 1
                    state.pos = 0
                if save_checkpoint is not None and (end_of_epoch or done):
                    save_checkpoint(loop_state())
                if end_of_epoch or done or (el.commit_every_steps and state.step % el.commit_every_steps == 0):
                    commit()
                if end_of_epoch:
                    break
        return finish(rank, size)

    def finish(rank: int, size: int) -> dict:
        return finish_run(cfg, writer, backend="torch", dataset=dataset, rank=rank, size=size, steps=state.step,
                          epochs=state.epoch, train_time=state.train_time, eval_metrics=state.eval_metrics,
                          sent_total=state.bytes_sent_total, dense_total=state.bytes_dense_total,
                          param_arrays=lambda: [p.detach().cpu().numpy() for m in modules for p in m.parameters()],
                          allgather_object=hvd.allgather_object, end_fields=end_fields,
                          extra={"elastic_resets": state.resets})

    if resume_from is not None and hvd.rank() == 0 and run_dir is not None:
        from ranger_hvd.rundir.checkpoint import trim_metrics

        trim_metrics(run_dir, int(resume_from["step"]))
    try:
        return train_elastic(state)
    finally:
        writer.close()
