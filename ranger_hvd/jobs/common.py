"""Backend-neutral pieces of the reference jobs: the training loop, byte meters and small helpers.

The config is the launcher's schema (:mod:`ranger_hvd.config`), re-validated on every rank."""

from __future__ import annotations

import hashlib
import math
import os
import time

import numpy as np

from ranger_hvd.config import Config, ConfigError, job_config, read_run_config

__all__ = ["Config", "ConfigError", "job_config", "read_run_config", "optimizer_momentum", "ByteMeter",
           "train_loop", "timed_step", "record_step", "finish_run", "digest_arrays", "log", "set_tf_threads_from_env"]


DEFAULT_MOMENTUM = 0.9


def optimizer_momentum(cfg: Config) -> float:
    """train.momentum; when not given, 0.9, or 0 when the compressor keeps DGC's momentum (the config
    check refuses momentum in both places, so it is never applied twice)."""
    if cfg.train.momentum is not None:
        return cfg.train.momentum
    return 0.0 if cfg.compression.compressor_momentum > 0 else DEFAULT_MOMENTUM


def digest_arrays(arrays) -> str:
    """sha256 (first 16 hex digits) of the float32 bytes of the given arrays, in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]


def set_tf_threads_from_env() -> int:
    """Threads per process from OMP_NUM_THREADS (ranks share the cores), 0 = framework default."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[ranger_hvd.jobs] {msg}", flush=True)


class ByteMeter:
    """Bytes one rank hands to collectives per step, for one optimizer or tape.

    With a Ranger compressor (``self.comp``) they are read from its cumulative ``stats()``; otherwise
    every step hands over the fixed ``self.sent_per_step`` (what none/fp16 allreduce). Subclasses set
    ``comp``, ``sent_per_step`` and ``dense_bytes`` (4 * numel: the fp32 baseline), then call
    ``reset_baseline()``.
    """

    comp = None
    sent_per_step = 0
    dense_bytes = 0

    def _stat(self, key: str) -> int:
        return int(self.comp.stats().get(key, 0))

    def reset_baseline(self, base: int | None = None) -> None:
        """Counts bytes from here on (training), not what set-up may have exchanged.

        ``base``: on resume, the baseline saved with the checkpoint, so totals cover the whole run.
        """
        self._base = self._last = self._stat("bytes_sent") if self.comp is not None else 0
        if base is not None:
            self._base = base

    @property
    def baseline(self) -> int:
        return self._base

    def step_bytes(self) -> tuple[int, int]:
        """(bytes_sent, bytes_dense) of the step just taken on this rank."""
        if self.comp is None:
            return self.sent_per_step, self.dense_bytes
        now = self._stat("bytes_sent")
        sent, self._last = now - self._last, now
        return sent, self.dense_bytes

    def total_sent(self) -> int | None:
        return self._stat("bytes_sent") - self._base if self.comp is not None else None


def lr_at(train, step: int, total_steps: int) -> float:
    """The learning rate of the step after ``step`` steps (a function of the step only, so a resumed run
    follows the uninterrupted run's schedule)."""
    if train.lr_schedule == "constant":
        return train.lr
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def timed_step(step_fn, indices, meters, *, lr: float, set_lr, step_no: int, where: str):
    """One optimizer step as both training loops (plain and elastic) take it: the schedule's learning
    rate set, the step timed, its bytes summed over the meters, a non-finite loss refused.
    Returns ``(loss, metrics, seconds, bytes_sent, bytes_dense)``."""
    set_lr(lr)
    t0 = time.perf_counter()
    loss, metrics = step_fn(indices)
    seconds = time.perf_counter() - t0
    sent = dense = 0
    for meter in meters:
        s, d = meter.step_bytes()
        sent, dense = sent + s, dense + d
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step_no} ({where}); lower train.lr")
    return loss, metrics, seconds, sent, dense


def record_step(writer, train, evaluate, *, step: int, epoch: int, loss: float, metrics: dict, sent: int,
                dense: int, seconds: float, ends: bool) -> dict | None:
    """Evaluates on the held-out set when the step ends an epoch or the run (``ends``) and writes the
    step's metrics line when it is due; returns the held-out metrics when it evaluated, else None."""
    held_out = None
    if ends:
        held_out = evaluate(str(step))
        metrics = {**metrics, **held_out}
    if step % train.log_every == 0 or ends:
        writer.step(step=step, epoch=epoch, loss=loss, metrics=metrics, bytes_sent=sent, bytes_dense=dense,
                    step_time=seconds)
    return held_out


def finish_run(cfg: Config, writer, *, backend: str, dataset: str, rank: int, size: int, steps: int,
               epochs: int, train_time: float, eval_metrics: dict, sent_total: int, dense_total: int,
               param_arrays, allgather_object, end_fields=None, extra: dict | None = None) -> dict:
    """The end record, the same for both loops: every rank's parameters hashed and gathered (they must be
    identical after training), the totals, and ``extra`` fields; written by rank 0, returned by all."""
    digest = digest_arrays(param_arrays())
    digests = allgather_object(digest, name="ranger_hvd.jobs.param_digests")
    print(f"[ranger_hvd.jobs] rank {rank} param_digest {digest}", flush=True)
    record = {
        "steps": steps, "epochs": epochs, "train_time": round(train_time, 6),
        "backend": backend, "runner": cfg.cluster.runner, "model": cfg.job.model, "dataset": dataset,
        "compression": cfg.compression.type,
        "size": size, **eval_metrics, "metrics": dict(eval_metrics),
        **(end_fields() if end_fields is not None else {}),
        "bytes_sent_total": int(sent_total), "bytes_dense_total": int(dense_total),
        "compression_ratio": (dense_total / sent_total) if sent_total else None,
        "param_digest": digest, "param_digests": list(digests),
        "params_identical": len(set(digests)) == 1,
        **(extra or {}),
    }
    writer.end(**record)
    log(rank, "end: " + ", ".join(f"{k}={record[k]}" for k in
                                  ("steps", "size", *eval_metrics, "compression_ratio", "params_identical",
                                   *(extra or {}))))
    return record


def train_loop(cfg: Config, *, backend: str, dataset: str, rank: int, size: int, n_train: int,
               n_steps: int, step_fn, meters, evaluate, param_arrays, allgather_object, run_dir,
               set_lr, save_checkpoint=None, resume_from: dict | None = None, end_fields=None) -> dict:
    """The epochs, metrics lines and end record shared by both backends.

    ``step_fn(indices) -> (loss, {metric: value})`` runs one optimizer step on this rank's samples at
    ``indices`` and returns plain floats; ``evaluate(tag)`` the held-out metrics over all ranks;
    ``param_arrays()`` every parameter as an array, to check that all ranks hold the same model;
    ``set_lr(lr)`` sets the optimizers' learning rate before each step (``train.lr_schedule``).

    ``save_checkpoint(loop_state)``, if given, is called on every rank after each epoch (and when
    ``max_steps`` stops the run mid-epoch) with the loop's counters (see ``loop_state`` below); the
    backend adds the model and optimizer state. ``resume_from`` is such a ``loop_state`` read back: the
    loop continues at its ``epoch`` / ``batch`` with its counters, so a resumed run takes exactly the
    steps the uninterrupted run would have taken (the batches depend on (seed, epoch, rank) only).

    ``end_fields()``, if given, returns more fields for the end line (the GAN's sample-score references).
    """
    from ranger_hvd.jobs.data import epoch_batches
    from ranger_hvd.rundir.metrics import MetricsWriter

    train = cfg.train
    total_steps = train.epochs * n_steps   # the schedule spans the planned epochs, whatever max_steps stops
    if resume_from is not None and rank == 0 and run_dir is not None:
        from ranger_hvd.rundir.checkpoint import trim_metrics

        trim_metrics(run_dir, int(resume_from["step"]))   # the failed run's steps after the checkpoint
    writer = MetricsWriter(run_dir, enabled=(rank == 0))
    step, epoch, total_dense, total_sent = 0, 0, 0, 0
    train_time, loss = 0.0, float("nan")
    eval_metrics: dict = {}
    done = False
    first_epoch, first_batch = 0, 0
    if resume_from is not None:
        r = resume_from
        first_epoch, first_batch = int(r["epoch"]), int(r["batch"])
        step, total_dense, total_sent = int(r["step"]), int(r["bytes_dense_total"]), int(r["bytes_sent_total"])
        train_time, loss, eval_metrics = float(r["train_time"]), float(r["loss"]), dict(r["eval_metrics"])
        epoch = max(first_epoch - 1, 0) if first_batch == 0 else first_epoch
        done = train.max_steps is not None and step >= train.max_steps
        log(rank, f"resuming at epoch {first_epoch} batch {first_batch} (step {step})")

    def loop_state(next_epoch: int, next_batch: int) -> dict:
        return {"epoch": next_epoch, "batch": next_batch, "step": step, "bytes_dense_total": total_dense,
                "bytes_sent_total": total_sent, "train_time": train_time, "loss": loss,
                "eval_metrics": dict(eval_metrics)}

    try:
        for epoch in range(first_epoch, train.epochs):
            if done:
                break
            batches = list(epoch_batches(n_train, train.batch_size, train.seed, epoch, rank))[:n_steps]
            start = first_batch if epoch == first_epoch else 0
            for i, idx in enumerate(batches):
                if i < start:
                    continue
                loss, metrics, dt, sent, dense = timed_step(
                    step_fn, idx, meters, lr=lr_at(train, step, total_steps), set_lr=set_lr, step_no=step + 1,
                    where=f"epoch {epoch}")
                train_time += dt
                step += 1
                total_sent += sent
                total_dense += dense
                last_of_epoch = i == len(batches) - 1
                done = train.max_steps is not None and step >= train.max_steps
                held_out = record_step(writer, train, evaluate, step=step, epoch=epoch, loss=loss, metrics=metrics,
                                       sent=sent, dense=dense, seconds=dt, ends=last_of_epoch or done)
                if held_out is not None:
                    eval_metrics = held_out
                if save_checkpoint is not None and (last_of_epoch or done):
                    save_checkpoint(loop_state(epoch + 1, 0) if last_of_epoch else loop_state(epoch, i + 1))
                if done:
                    break
            log(rank, f"epoch {epoch}: step {step} loss {loss:.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            if done:
                break

        comp_totals = [m.total_sent() for m in meters]
        if all(t is not None for t in comp_totals):
            total_sent = sum(comp_totals)     # the compressors' own cumulative count
        return finish_run(cfg, writer, backend=backend, dataset=dataset, rank=rank, size=size, steps=step,
                          epochs=epoch + 1, train_time=train_time, eval_metrics=eval_metrics,
                          sent_total=total_sent, dense_total=total_dense, param_arrays=param_arrays,
                          allgather_object=allgather_object, end_fields=end_fields)
    finally:
        writer.close()
