"""The run directory's layout: every file name, the environment that points a rank at its run, and the
record events.  The one place these names are written; everything else imports them.

    RUN_DIR/
      config.yaml        the resolved config (the launcher writes it; ranks read it)
      command.txt        the horovodrun/mpirun/sbatch command line, as run
      horovodrun.log     horovodrun's own output
      logs/              one stdout/stderr per rank (Gloo: logs/rank.N/, Open MPI: logs/1/rank.N/)
      metrics.jsonl      the run's records (:mod:`ranger_hvd.rundir.metrics`)
      summary.json       how the run ended (the launcher writes it last)
      checkpoints/       per-rank save points (:mod:`ranger_hvd.rundir.checkpoint`)
      tensorboard/       TensorBoard event files made from metrics.jsonl
      script/            a user command's script, copied, with its origin in script/SOURCE
      timeline.json      Horovod's timeline, when asked for (autotune.csv: its autotuning log)
      job.sbatch, slurm.json, slurm-JOBID.out   under Slurm
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
COMMAND = "command.txt"
HOROVODRUN_LOG = "horovodrun.log"
RANK_LOGS = "logs"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SCRIPT_DIR = "script"
SCRIPT_SOURCE = "SOURCE"
TIMELINE = "timeline.json"
AUTOTUNE_LOG = "autotune.csv"
SBATCH_SCRIPT = "job.sbatch"
SLURM_JOB = "slurm.json"

# what the launcher puts in every rank's environment
RUN_DIR_ENV = "RANGER_HVD_RUN_DIR"
CONFIG_ENV = "RANGER_HVD_CONFIG"
RESUME_ENV = "RANGER_HVD_RESUME"

# metrics.jsonl: step records carry "step"; the others carry "event" with one of these
END_EVENT = "end"                  # the last record of a reference job (its totals)
RESUME_EVENT = "resume"            # where a resumed run continues ({"from_step": S, ...})
RESET_EVENT = "elastic_reset"      # an elastic job's membership changed


def path(run_dir: str | Path, name: str) -> Path:
    """``RUN_DIR/name`` for one of the names above."""
    return Path(run_dir) / name
