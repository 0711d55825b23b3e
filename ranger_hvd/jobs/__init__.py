"""Reference jobs of ranger_hvd: a CNN, an RNN and a GAN, for PyTorch and TensorFlow (Keras 3).

Run on every rank under ``horovodrun``, or for the PyTorch jobs under ``torchrun`` (DDP with the
compression as a communication hook, ``cluster.runner: torchrun``, see :mod:`ranger_hvd.jobs.ddp`); the
``ranger-hvd`` launcher does this::

    horovodrun -np 2 -H localhost:2 --gloo python -m ranger_hvd.jobs --config RUN_DIR/config.yaml --run-dir RUN_DIR

Inputs: the launcher's resolved config (YAML), validated on every rank against the launcher's schema,
:mod:`ranger_hvd.config.schema`, which defines every key and default. The jobs use ``job``
(backend, model), ``data``, ``train`` (epochs, per-rank batch_size, lr, seed, the optimizer's momentum,
set to 0 when the compressor has momentum of its own, max_steps, log_every, checkpoint: every rank
writes ``RUN_DIR/checkpoints/step-SSSSSSSS/rank{r}.pt`` (torch) or ``.pkl`` (TensorFlow) after each
epoch, keeping its two newest; see :mod:`ranger_hvd.rundir.checkpoint`) and ``compression`` (type
none | fp16 | ranger, and ranger's options: :class:`ranger_hvd.core.options.RangerOptions`). The
cluster, horovod and output sections are validated but used only by the launcher, except
``cluster.elastic``: with it the PyTorch jobs train under ``hvd.elastic.run`` (see
:mod:`ranger_hvd.jobs.torch_elastic`).

Models: ``cnn`` two conv layers + MLP head; ``rnn`` a GRU reading the image rows as a sequence;
``gan`` an MLP generator and discriminator on the flattened images, both trained through the
distributed optimizer (torch) or tape (TF).

Outputs (rank 0 only), all in ``RUN_DIR/metrics.jsonl`` (see :mod:`ranger_hvd.rundir.metrics`):
  - one line per logged step: ``step, epoch, loss, metrics, bytes_sent, bytes_dense, step_time, time``.
    ``loss`` and ``metrics.accuracy`` are rank 0's on its batch (no extra collective in the timed
    step); GAN: ``loss = d_loss + g_loss`` and ``metrics`` holds ``d_loss``, ``g_loss``. The last line of
    each epoch adds the held-out ``metrics.eval_*`` (computed over all ranks' eval shards).
    ``bytes_sent`` is what this rank handed to the gradient collectives this step (Ranger: the
    compressor's ``stats()`` delta; none/fp16: numel * itemsize of the gradients, 4 or 2 bytes);
    ``bytes_dense`` is 4 * numel of the same gradients.
  - no separate result file: the job ends with ONE final line ``{"event": "end", ...}`` holding
    ``steps, epochs, train_time, time, backend, model, dataset, compression, size``,
    the final evaluation both flat (``eval_loss``, ``eval_accuracy``; GAN: ``eval_d_loss``,
    ``eval_g_loss``, ``eval_d_real_acc``, ``eval_d_fake_acc`` and the sample score, see below) and as
    ``metrics``, the totals
    ``bytes_sent_total``, ``bytes_dense_total``, ``compression_ratio`` (dense / sent), and
    ``param_digest`` / ``param_digests`` (per rank) / ``params_identical``: every rank's
    parameters hashed after training, gathered to rank 0.
GAN samples (:mod:`ranger_hvd.jobs.quality`): every evaluation also scores the generator's digits,
``eval_fd``, the Fréchet distance between generated and real training images in the feature space of
a small classifier trained (seeded) on the training images at the start of the run; lower is better.
The end line adds what to read it against (flat, not in ``metrics``): ``eval_fd_real`` (real held-out
images: the floor, near 0) and ``eval_fd_untrained`` (the generator before training). Rank 0 also rewrites ``RUN_DIR/samples.png``, a grid of 100 samples.
Resume (``--resume``): the ranks agree on the latest checkpoint set that every rank holds (a torn set,
where a rank died while saving, is skipped), every rank loads its own file (model, optimizer state, the
Ranger compressor's residuals, momentum and counters, the GAN's noise generator, the loop's position and
byte counters), checks that the number of ranks is unchanged and continues where that save point left
off. Rank 0 drops the step lines a failed run wrote after that point from ``metrics.jsonl``, appends
``{"event": "resume", "from_step": S, "dropped_lines": n}`` and appends on from there (a resumed run's
``time`` restarts at 0; its end line holds the whole run's totals). A damaged or missing file makes
every rank fail together, naming the file.
Exit status: 0 on success, 1 on any failure (config, data or training), with the reason on stderr.
"""

from __future__ import annotations

from pathlib import Path

from ranger_hvd.config import Config, ConfigError, job_config, read_run_config

from ranger_hvd.jobs.data import DataError, load_dataset

from ranger_hvd.rundir.checkpoint import CheckpointError  # noqa: E402

__all__ = ["run_job", "run_config_file", "ConfigError", "DataError", "CheckpointError", "Config"]


def run_job(cfg: dict | Config, run_dir: str | Path | None, resume: bool = False) -> dict:
    """Runs one job from a resolved config (plain data, validated here, or the model) on this rank;
    returns the final record (all ranks).

    ``resume``: continue from the latest checkpoint set every rank holds under ``RUN_DIR/checkpoints``.
    """
    if not isinstance(cfg, Config):
        cfg = job_config(cfg)
    dataset = load_dataset(cfg.data)   # before any framework import: a missing file fails fast
    if cfg.job.backend == "torch":
        from ranger_hvd.jobs.torch_jobs import run

        return run(cfg, dataset, run_dir, resume=resume)
    from ranger_hvd.jobs.tf_jobs import run

    return run(cfg, dataset, run_dir, resume=resume)


def run_config_file(config: str | Path, run_dir: str | Path | None, resume: bool = False) -> dict:
    return run_job(read_run_config(config), run_dir, resume=resume)
