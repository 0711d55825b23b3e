"""The ``cluster.slurm`` options and their checks (used when ``cluster.scheduler`` is ``slurm``).

Kept free of imports from :mod:`.config` so that the schema there can embed :class:`SlurmOptions`;
the checks return ``(dotted path, message)`` pairs that the config module turns into its problems.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ranger_hvd.formatting import short_repr, shown

# Slurm names, whole (fullmatch): partitions may be a comma-separated list (the job runs in the first
# that can take it)
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
PARTITION_RE = re.compile(rf"{_NAME}(,{_NAME})*")
ACCOUNT_RE = re.compile(_NAME)
MODULE_RE = re.compile(r"[A-Za-z0-9_.+@-][A-Za-z0-9_.+/@-]*")
# sbatch --time: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC, or UNLIMITED / INFINITE (any case)
TIME_RE = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                     r"|UNLIMITED|INFINITE", re.IGNORECASE)
# options the launcher writes itself (and their aliases): an extra line may not set them a second time,
# in any spelling sbatch accepts (getopt_long takes any unambiguous prefix of a long option, and short
# options glued to their value or to other flags)
_OUTPUT = "(the run directory's slurm-JOBID.out)"
_CHDIR = "(the launcher's working directory)"
OWN_LONG = {"job-name": "job.name", "nodes": "cluster.slurm.nodes", "ntasks": "cluster.np",
            "ntasks-per-node": "cluster.slurm.ntasks_per_node", "tasks-per-node": "cluster.slurm.ntasks_per_node",
            "partition": "cluster.slurm.partition", "time": "cluster.slurm.time",
            "account": "cluster.slurm.account", "cpus-per-task": "cluster.slurm.cpus_per_task",
            "output": _OUTPUT, "error": _OUTPUT, "chdir": _CHDIR, "workdir": _CHDIR}
OWN_SHORT = {"J": "job-name", "N": "nodes", "n": "ntasks", "p": "partition", "t": "time", "A": "account",
             "c": "cpus-per-task", "o": "output", "e": "error", "D": "chdir"}
# sbatch's short options that take a value in every Slurm version that has them: the rest of a glued
# token is that value.  Any other letter is read as a flag, so the letters after it are options too.
SHORT_WITH_VALUE = set("aABcCdDeFgGiJLmMnNoptUwx")
# a word anywhere in an #SBATCH line that makes sbatch split the script into a heterogeneous job
HETJOB_RE = re.compile(r"hetjob|packjob", re.IGNORECASE)


class SlurmOptions(BaseModel):
    """What a Slurm user sets for a job; each maps to one ``#SBATCH`` line or to the script's setup."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    nodes: int = Field(1, ge=1, description="--nodes")
    ntasks_per_node: Optional[int] = Field(None, ge=1, description="--ntasks-per-node; default ceil(np / nodes)")
    cpus_per_task: Optional[int] = Field(None, ge=1, description="--cpus-per-task")
    partition: Optional[str] = Field(None, description="--partition (one name or a comma-separated list)")
    time: Optional[Union[str, int]] = Field(None, description="--time limit: MIN, H:MM:SS, D-HH:MM, ... or "
                                            "UNLIMITED; a plain number is minutes")
    account: Optional[str] = Field(None, description="--account")
    sbatch_lines: list[str] = Field(default_factory=list, description="extra sbatch options, one per "
                                    "#SBATCH line (e.g. --mem=4G, --gres=gpu:1)")
    modules: list[str] = Field(default_factory=list, description="environment modules: 'module load NAME'")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the launcher "
                             "(e.g. 'source /opt/env.sh'); the only config value that is shell")

    @field_validator("time", mode="after")
    @classmethod
    def _minutes_as_text(cls, v):
        """``time: 30`` is 30 minutes, as sbatch reads it."""
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 0:
                raise ValueError(f"a time limit in minutes must be at least 0 (got {v})")
            return str(v)
        return v


def sbatch_words(line: str) -> list[str]:
    """The words sbatch reads from the text after '#SBATCH' (its own splitting: quotes and backslashes
    group, an unquoted '#' starts a comment).  Raises ValueError for an unmatched quote."""
    words: list[str] = []
    word, quote, escaped, started = [], "", False, False
    for ch in line:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if quote:
        raise ValueError(f"unmatched {quote}")
    if started:
        words.append("".join(word))
    return words


def owned_option(word: str) -> Optional[str]:
    """The launcher's long option (``output``) that ``word`` sets in any spelling sbatch accepts
    (``--outp=x``, ``-ox``, ``-vo x``); '' for a bare '--'; None when it sets none of them."""
    if word.startswith("--"):
        name = word[2:].split("=", 1)[0]
        if name == "":
            return ""
        return next((own for own in OWN_LONG if own.startswith(name)), None)
    if word.startswith("-"):
        for letter in word[1:]:
            if letter in OWN_SHORT:
                return OWN_SHORT[letter]
            if letter in SHORT_WITH_VALUE:
                return None
    return None


def sbatch_line_problem(line: str) -> Optional[str]:
    """Why an extra #SBATCH line cannot be written (None: it can)."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    try:
        words = sbatch_words(text)
    except ValueError as exc:
        return f"sbatch cannot read {short_repr(line)}: {exc}"
    if not words or not words[0].startswith("-"):
        return f"must start with an sbatch option such as '--mem=4G' (got {short_repr(line)})"
    if HETJOB_RE.search(text):
        return "'hetjob' splits the script into a heterogeneous job, which the launcher does not run"
    for word in words:
        own = owned_option(word)
        if own == "":
            return "a bare '--' would end sbatch's options"
        if own is not None:
            flag = word.split("=", 1)[0]
            means = "" if flag == f"--{own}" else f" (sbatch reads it as --{own})"
            return f"{shown(flag, 40)}{means} is written by the launcher from {OWN_LONG[own]}; set it there"
    return None


def bash_syntax_problem(text: str) -> Optional[str]:
    """What ``bash -n`` finds wrong in a shell text (None: nothing, or no bash here to ask)."""
    bash = shutil.which("bash")
    if bash is None:
        return None
    try:
        r = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bash -n could not check it ({exc})"
    if r.returncode != 0:
        said = re.sub(r"^\S*bash: ", "", " ".join(r.stderr.split()))
        return f"not valid shell (bash -n: {short_repr(said, 300)})"
    return None


def setup_problem(setup: list[str]) -> Optional[str]:
    """Why the setup lines together are not complete shell text, or None."""
    return bash_syntax_problem("\n".join(setup) + "\n") if setup else None


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
    if opts.partition is not None and not PARTITION_RE.fullmatch(opts.partition):
        out.append(("cluster.slurm.partition", f"bad partition {short_repr(opts.partition)}: a Slurm partition name "
                                               "(letters, digits, '_', '.', '+', '-') or a comma-separated list"))
    if opts.account is not None and not ACCOUNT_RE.fullmatch(opts.account):
        out.append(("cluster.slurm.account", f"bad account name {short_repr(opts.account)}: letters, digits, '_', "
                                             "'.', '+', '-' only"))
    if opts.time is not None and not TIME_RE.fullmatch(opts.time):
        out.append(("cluster.slurm.time", f"bad time limit {short_repr(opts.time)}: use MINUTES, MM:SS, HH:MM:SS, "
                                          "D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED (e.g. 30, 2:00:00, 1-12:00:00)"))
    for i, line in enumerate(opts.sbatch_lines):
        why = sbatch_line_problem(line)
        if why:
            out.append((f"cluster.slurm.sbatch_lines[{i}]", why))
    for i, name in enumerate(opts.modules):
        if not MODULE_RE.fullmatch(name):
            out.append((f"cluster.slurm.modules[{i}]", f"bad module name {short_repr(name)} (e.g. 'cuda/12.2')"))
    for i, line in enumerate(opts.setup):
        if not line.strip():
            out.append((f"cluster.slurm.setup[{i}]", "must not be empty"))
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
