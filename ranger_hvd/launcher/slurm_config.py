"""The ``cluster.slurm`` options and their checks (used when ``cluster.scheduler`` is ``slurm``).

Kept free of imports from :mod:`.config` so that the schema there can embed :class:`SlurmOptions`;
the checks return ``(dotted path, message)`` pairs that the config module turns into its problems.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

# Slurm names: partitions may be a comma-separated list (the job runs in the first that can take it)
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
PARTITION_RE = re.compile(rf"^{_NAME}(,{_NAME})*$")
ACCOUNT_RE = re.compile(rf"^{_NAME}$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_.+/@-]+$")
# sbatch --time: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC, or UNLIMITED / INFINITE
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                     r"|UNLIMITED|INFINITE)$")
# options the launcher writes itself: an extra line may not set them a second time
OWN_OPTIONS = {"--job-name": "job.name", "-J": "job.name", "--nodes": "cluster.slurm.nodes",
               "-N": "cluster.slurm.nodes", "--ntasks": "cluster.np", "-n": "cluster.np",
               "--ntasks-per-node": "cluster.slurm.ntasks_per_node", "--partition": "cluster.slurm.partition",
               "-p": "cluster.slurm.partition", "--time": "cluster.slurm.time", "-t": "cluster.slurm.time",
               "--account": "cluster.slurm.account", "-A": "cluster.slurm.account",
               "--cpus-per-task": "cluster.slurm.cpus_per_task", "-c": "cluster.slurm.cpus_per_task",
               "--output": "(the run directory's slurm-JOBID.out)", "-o": "(the run directory's slurm-JOBID.out)",
               "--error": "(the run directory's slurm-JOBID.out)", "-e": "(the run directory's slurm-JOBID.out)",
               "--chdir": "(the launcher's working directory)", "-D": "(the launcher's working directory)"}


class SlurmOptions(BaseModel):
    """What a Slurm user sets for a job; each maps to one ``#SBATCH`` line or to the script's setup."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    nodes: int = Field(1, ge=1, description="--nodes")
    ntasks_per_node: Optional[int] = Field(None, ge=1, description="--ntasks-per-node; default ceil(np / nodes)")
    cpus_per_task: Optional[int] = Field(None, ge=1, description="--cpus-per-task")
    partition: Optional[str] = Field(None, description="--partition (one name or a comma-separated list)")
    time: Optional[str] = Field(None, description="--time limit: MIN, H:MM:SS, D-HH:MM, ... or UNLIMITED")
    account: Optional[str] = Field(None, description="--account")
    sbatch_lines: list[str] = Field(default_factory=list, description="extra sbatch options, one per "
                                    "#SBATCH line (e.g. --mem=4G, --gres=gpu:1)")
    modules: list[str] = Field(default_factory=list, description="environment modules: 'module load NAME'")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the launcher "
                             "(e.g. 'source /opt/env.sh')")


def tasks_per_node(opts: SlurmOptions, np_: Optional[int]) -> int:
    """--ntasks-per-node: as given, else enough for ``np`` ranks spread over the nodes (1 without np)."""
    if opts.ntasks_per_node is not None:
        return opts.ntasks_per_node
    return math.ceil(np_ / opts.nodes) if np_ is not None else 1


def slurm_problems(opts: SlurmOptions, np_: Optional[int], hosts_set: bool,
                   hostfile_set: bool) -> list[tuple[str, str]]:
    """Checks the Slurm options against each other and against ``cluster.np``/``hosts``/``hostfile``."""
    out: list[tuple[str, str]] = []
    if hosts_set:
        out.append(("cluster.hosts", "the hosts come from the Slurm allocation when cluster.scheduler is 'slurm': "
                                     "unset it (cluster.hosts=null) and set cluster.slurm.nodes / ntasks_per_node"))
    if hostfile_set:
        out.append(("cluster.hostfile", "the hosts come from the Slurm allocation when cluster.scheduler is "
                                        "'slurm': unset it (cluster.hostfile=null)"))
    slots = opts.nodes * tasks_per_node(opts, np_)
    if np_ is not None and np_ > slots:
        out.append(("cluster.np", f"{np_} ranks do not fit in the Slurm allocation of {opts.nodes} node(s) x "
                                  f"{tasks_per_node(opts, np_)} task(s) per node = {slots} tasks "
                                  f"(raise cluster.slurm.nodes or cluster.slurm.ntasks_per_node)"))
    if np_ is not None and np_ < opts.nodes:
        out.append(("cluster.slurm.nodes", f"{opts.nodes} nodes for {np_} ranks would leave a node without a rank"))
    if opts.partition is not None and not PARTITION_RE.match(opts.partition):
        out.append(("cluster.slurm.partition", f"bad partition {opts.partition!r}: a Slurm partition name (letters, "
                                               f"digits, '_', '.', '+', '-') or a comma-separated list of them"))
    if opts.account is not None and not ACCOUNT_RE.match(opts.account):
        out.append(("cluster.slurm.account", f"bad account name {opts.account!r}: letters, digits, '_', '.', "
                                             f"'+', '-' only"))
    if opts.time is not None and not TIME_RE.match(opts.time):
        out.append(("cluster.slurm.time", f"bad time limit {opts.time!r}: use MINUTES, MM:SS, HH:MM:SS, D-HH, "
                                          f"D-HH:MM, D-HH:MM:SS or UNLIMITED (e.g. 30, 2:00:00, 1-12:00:00)"))
    for i, line in enumerate(opts.sbatch_lines):
        path = f"cluster.slurm.sbatch_lines[{i}]"
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        if not text.startswith("-") or "\n" in text:
            out.append((path, f"must be one sbatch option such as '--mem=4G' (got {line!r})"))
            continue
        flag = re.split(r"[=\s]", text, maxsplit=1)[0]
        if flag in OWN_OPTIONS:
            out.append((path, f"{flag} is written by the launcher from {OWN_OPTIONS[flag]}; set it there"))
    for i, name in enumerate(opts.modules):
        if not MODULE_RE.match(name):
            out.append((f"cluster.slurm.modules[{i}]", f"bad module name {name!r} (e.g. 'cuda/12.2')"))
    for i, line in enumerate(opts.setup):
        if "\n" in line or not line.strip():
            out.append((f"cluster.slurm.setup[{i}]", "must be one non-empty shell line"))
    return out


def sbatch_option_lines(opts: SlurmOptions) -> list[str]:
    """The user's extra sbatch options as they appear after '#SBATCH ' (a leading '#SBATCH' dropped)."""
    out = []
    for line in opts.sbatch_lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        out.append(text)
    return out
