"""Slurm: ``batch`` (the sbatch script, a pure function of the config; submission and job state), ``cli``
(``launch`` with ``cluster.scheduler: slurm`` and ``status``), ``allocation`` (what runs inside the
allocation: ``python -m ranger_hvd.launcher.slurm.allocation RUN_DIR``).  The ``cluster.slurm`` options
themselves are part of the config schema (:mod:`ranger_hvd.config.slurm`)."""
