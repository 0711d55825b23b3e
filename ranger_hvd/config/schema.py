"""The experiment config's schema: one pydantic model per section, strict, with every default.

The launcher validates a user's YAML against it, and the reference jobs validate the resolved
``RUN_DIR/config.yaml`` against the same models, so each default and each constraint lives here only.
To add a key, add a field to its section; to add a section, add a model and a field of :class:`Config`.
Checks that involve several keys or the file system live in ``checks.py``.
"""

from __future__ import annotations

import typing
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ranger_hvd.core.options import RangerOptions

from ranger_hvd.config.slurm import SlurmOptions
from ranger_hvd.config.groups import Group

DEFAULT_ENTRY = "ranger_hvd.jobs"
SYNTHETIC_SAMPLES = 2048
SEED_LIMIT = 2**32          # NumPy's seeds are below 2**32 (each rank adds its rank to train.seed)
MAX_NP = 65536              # ranks of one job
MAX_JOB_NAME = 100          # a directory name, with room for output.dir and the timestamp

# YAML input: no coercion ("64" is not an int), no unknown keys, defaults validated too; floats finite
# (.inf, .nan and 1e400 are errors)
STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


class Section(BaseModel):
    model_config = STRICT


class JobSection(Section):
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=MAX_JOB_NAME,
                                description="run name (directory under output.dir); default MODEL-DATASET")
    backend: Literal["torch", "tensorflow"] = "torch"
    model: Literal["cnn", "rnn", "gan"] = "cnn"
    # Advanced, mainly for tests: the Python module each rank runs (``python -m ENTRY --config ...``).
    entry: str = Field(DEFAULT_ENTRY, pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
    # Your own training script instead of a reference job: a list of arguments, never a shell string
    # (see user_command.py); ``python`` is the run's interpreter, a relative script path is relative to
    # the config file's folder.
    command: Optional[list[str]] = Field(None, min_length=1, max_length=4096,
                                         description="your own program and its arguments, e.g. "
                                                     "[python, train.py, --lr, '0.1']")

    @field_validator("command", mode="before")
    @classmethod
    def _command_is_a_list_of_strings(cls, value):
        from ranger_hvd.config.user_command import command_item_problem

        problem = command_item_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class DataSection(Section):
    dataset: Literal["digits", "mnist", "synthetic"] = "digits"
    dir: Optional[str] = Field(None, min_length=1, description="directory holding MNIST (dataset: mnist only)")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share (digits, synthetic)")
    synthetic_samples: Optional[int] = Field(None, ge=1, description="samples (dataset: synthetic only; "
                                                                     f"null: {SYNTHETIC_SAMPLES})")

    @property
    def samples(self) -> int:
        """Samples of the synthetic data set."""
        return SYNTHETIC_SAMPLES if self.synthetic_samples is None else self.synthetic_samples


class TrainSection(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="per rank")
    lr: float = Field(0.05, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: lr * (1 + cos(pi * step / steps of train.epochs)) / 2, from lr to 0")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    momentum: Optional[float] = Field(None, ge=0.0, lt=1.0,
                                      description="SGD momentum on the averaged update (null: 0.9, or 0 when "
                                                  "compression.momentum keeps DGC's momentum in the compressor)")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps (null: no cap)")
    log_every: int = Field(1, ge=1, description="write a metrics line every N steps")
    checkpoint: bool = Field(True, description="every rank saves RUN_DIR/checkpoints/step-S/rank{r}.* after "
                                               "each epoch (needed by launch --resume and max_restarts)")
    max_restarts: int = Field(0, ge=0, description="when a rank dies, restart the job up to this many times "
                                                   "from the last complete checkpoint set")


class GanSection(Section):
    """The GAN job's training recipe (job.model: gan only); both are off by default."""

    r1_penalty: float = Field(0.0, ge=0.0, description="R1 gradient penalty weight gamma: the discriminator "
                              "also minimises gamma/2 * E||grad_x D(x)||^2 over real x (Mescheder et al. 2018)")
    disc_lr_scale: float = Field(1.0, gt=0.0, description="the discriminator's learning rate is train.lr times "
                                 "this (two time-scale update rule, Heusel et al. 2017)")


# compression: a config group.  Each member's fields are its options; see groups.py.
class _WithoutOptions(Section):
    """A compression type that takes no options."""

    @property
    def compressor_momentum(self) -> float:
        return 0.0

    def options(self) -> dict:
        return {}


class NoCompression(_WithoutOptions):
    """Horovod's plain allreduce of the fp32 gradients."""

    type: Literal["none"] = "none"


class Fp16Compression(_WithoutOptions):
    """Horovod's fp16 compression: gradients travel as 2-byte floats."""

    type: Literal["fp16"] = "fp16"


class RangerCompression(RangerOptions):
    """Ranger's sparse top-k with error feedback: exactly the fields and checks of RangerOptions."""

    model_config = ConfigDict(**{**RangerOptions.model_config, **STRICT})
    type: Literal["ranger"] = "ranger"

    @property
    def compressor_momentum(self) -> float:
        return self.momentum

    def options(self) -> dict:
        """The keyword arguments of ``RangerCompressor``."""
        return self.model_dump(exclude={"type"})


COMPRESSION = Group("compression", "type",
                    {"none": NoCompression, "fp16": Fp16Compression, "ranger": RangerCompression},
                    default="ranger")
GROUPS = (COMPRESSION,)
CompressionSection = Union[NoCompression, Fp16Compression, RangerCompression]


class ElasticOptions(Section):
    """Elastic training: horovodrun keeps the job going while workers leave or join (Gloo only)."""

    min_np: int = Field(..., ge=1, le=MAX_NP, description="fewest workers the job continues with (below: it waits)")
    max_np: Optional[int] = Field(None, ge=1, le=MAX_NP, description="most workers (null: every discovered slot)")
    discovery_script: Optional[str] = Field(None, min_length=1, description="executable printing one "
                                            "host[:slots] line per available host (null: generated in the run "
                                            "directory from cluster.hosts)")
    slots_per_host: Optional[int] = Field(None, ge=1, description="slots of a discovered host printed "
                                          "without ':slots'")
    reset_limit: Optional[int] = Field(None, ge=0, description="most resizes before the job fails "
                                       "(null: no limit)")
    elastic_timeout: Optional[int] = Field(None, ge=1, description="seconds to wait for min_np workers "
                                           "after a resize (null: horovodrun's 600)")
    commit_every_steps: Optional[int] = Field(None, ge=1, description="the jobs commit their state every N "
                                              "steps and at each epoch end (null: each epoch end only)")


class ClusterSection(Section):
    np: Optional[int] = Field(None, ge=1, le=MAX_NP, description="number of ranks; default: the total slots")
    hosts: Optional[Union[list[str], str]] = Field(None, description="host:slots entries (or one comma-separated string)")
    hostfile: Optional[str] = Field(None, min_length=1, description="file of 'host slots=N' lines")
    controller: Literal["gloo", "mpi"] = "gloo"
    runner: Literal["horovodrun", "torchrun"] = Field(
        "horovodrun", description="torchrun: the PyTorch reference jobs train under DistributedDataParallel "
        "with the compression as a DDP communication hook, started by torchrun (one host, or srun on a Slurm "
        "allocation); the horovod section is unused")
    rdzv_port: Optional[int] = Field(None, ge=1, le=65535, description="port of torchrun's c10d rendezvous on "
                                     "the first node of a multi-node Slurm allocation (runner: torchrun; null: "
                                     "29400; one host picks a free port itself)")
    ssh_port: Optional[int] = Field(None, ge=1, le=65535)
    ssh_identity_file: Optional[str] = Field(None, min_length=1)
    network_interfaces: Optional[Union[list[str], str]] = None
    start_timeout: Optional[int] = Field(None, ge=1, description="seconds horovodrun waits for the ranks to start")
    env: list[str] = Field(default_factory=list, description="NAME (forwarded) or NAME=VALUE (set) entries")
    mpi_args: Optional[Union[list[str], str]] = Field(
        None, description="extra mpirun arguments (controller: mpi): a list, each item one argument (a string is "
        "split into words as a shell would, with nothing expanded)")
    elastic: Optional[ElasticOptions] = Field(None, description="elastic mode (controller: gloo): workers may "
                                              "leave and join; see docs/launcher.md")
    scheduler: Literal["none", "slurm"] = Field("none", description="slurm: submit with sbatch; hosts come "
                                                "from the allocation")
    slurm: Optional[SlurmOptions] = Field(None, description="Slurm job options (scheduler: slurm only)")
    preflight: bool = Field(True, description="before a multi-host launch, check every remote host's ssh "
                            "port, login, host key (controller: mpi) and environment; exit 2 naming the host")
    ssh_known_hosts_file: Optional[str] = Field(None, min_length=1, description="known_hosts file for the "
                                                "preflight and mpirun's ssh (default: ~/.ssh/known_hosts)")


class HorovodSection(Section):
    """Horovod tunables; each maps to one horovodrun flag (None: horovodrun's own default)."""

    fusion_threshold_mb: Optional[int] = Field(None, ge=0)
    cycle_time_ms: Optional[float] = Field(None, gt=0)
    cache_capacity: Optional[int] = Field(None, ge=0)
    hierarchical_allreduce: Optional[bool] = None
    hierarchical_allgather: Optional[bool] = None
    timeline: bool = False
    timeline_mark_cycles: bool = False
    autotune: bool = False
    autotune_log: bool = False
    autotune_warmup_samples: Optional[int] = Field(None, ge=0)
    autotune_steps_per_sample: Optional[int] = Field(None, ge=1)
    autotune_bayes_opt_max_samples: Optional[int] = Field(None, ge=1)
    autotune_gaussian_process_noise: Optional[float] = Field(None, ge=0.0, le=1.0)
    # On by default: ranks that wait on different collectives end the job (exit 1, the collective named)
    # instead of spinning forever. Shutdown 0: warn only.
    stall_check: bool = True
    stall_check_warning_time_seconds: int = Field(60, ge=1)
    stall_check_shutdown_time_seconds: int = Field(300, ge=0, description="0: warn only, never shut down")
    gloo_timeout_seconds: Optional[int] = Field(None, ge=1)
    thread_affinity: Optional[int] = Field(None, ge=0)
    mpi_threads_disable: Optional[bool] = None
    num_nccl_streams: Optional[int] = Field(None, ge=1)
    tcp: bool = False
    log_level: Optional[Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL"]] = None
    log_timestamp: Optional[bool] = None
    prefix_output_with_timestamp: bool = False
    disable_cache: bool = False
    verbose: bool = False


class OutputSection(Section):
    dir: str = Field("runs", min_length=1)


class Config(Section):
    job: JobSection = Field(default_factory=JobSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    gan: GanSection = Field(default_factory=GanSection)
    compression: COMPRESSION.annotation() = COMPRESSION.field()  # type: ignore[valid-type]
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    horovod: HorovodSection = Field(default_factory=HorovodSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @property
    def job_name(self) -> str:
        if self.job.name:
            return self.job.name
        if self.job.command:
            from ranger_hvd.config.user_command import default_name

            return default_name(self.job.command)
        return f"{self.job.model}-{self.data.dataset}"


def section_model(path: tuple) -> Optional[type[BaseModel]]:
    """The model that validates the mapping at ``path`` (a pydantic location; group tags included)."""
    model: type[BaseModel] = Config
    parts = list(path)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        group = next((g for g in GROUPS if model is Config and g.section == part), None)
        if group is not None:
            if not parts or parts[0] not in group.members:
                return None
            model = group.members[parts.pop(0)]
            continue
        # Optional[Model]: the model inside
        ann = next((a for a in typing.get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)),
                   field.annotation)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model
