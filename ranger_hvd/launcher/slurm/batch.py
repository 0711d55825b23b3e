"""Slurm: the sbatch script (a pure function of the config), submission, the job's state, and the hosts of
an allocation read from Slurm's environment.

A Slurm launch writes ``RUN_DIR/job.sbatch`` and submits it; the script runs
``python -m ranger_hvd.launcher.slurm.allocation RUN_DIR`` on the allocation's first node, which starts
``horovodrun`` on the hosts and slots Slurm gave the job (see :mod:`.allocation`).  ``RUN_DIR/slurm.json``
records the job id, so ``ranger-hvd status RUN_DIR`` can ask Slurm about it later.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ranger_hvd.config import Resolved
from ranger_hvd.config.safety import control_chars
from ranger_hvd.formatting import short_repr
from ranger_hvd.launcher.quoting import sbatch_path, sbatch_word
from ranger_hvd.config.slurm import HETJOB_RE, SlurmOptions, sbatch_option_lines, tasks_per_node
from ranger_hvd.rundir import layout

SCRIPT_NAME = layout.SBATCH_SCRIPT
JOB_FILE = layout.SLURM_JOB
OUTPUT_PATTERN = "slurm-%j.out"
# squeue / scontrol states of a job that has not ended yet
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "SIGNALING", "STAGE_OUT", "STOPPED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
SLURM_TIMEOUT_S = 30


class SlurmError(Exception):
    """A Slurm command failed or is missing; ``usage`` marks problems of the user's input (exit 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def slurm_options(res: Resolved) -> SlurmOptions:
    """The job's Slurm options with ntasks_per_node filled in."""
    opts = res.config.cluster.slurm or SlurmOptions()
    return opts.model_copy(update={"ntasks_per_node": tasks_per_node(opts, res.np)})


# --------------------------------------------------------------------------------------------------
# the batch script
# --------------------------------------------------------------------------------------------------
def render_sbatch(res: Resolved, run_dir: str, *, python: str, project_root: str, workdir: str,
                  resume: bool = False) -> str:
    """The batch script for ``res`` running in ``run_dir`` (absolute): ``#SBATCH`` lines from the config,
    module loads and setup lines, then the launcher exec'd, so that the signals Slurm sends on scancel or at
    the time limit reach it directly and it can stop every rank and write summary.json."""
    opts = slurm_options(res)
    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# ranger-hvd: job {res.job_name}, {res.np} ranks; written by 'ranger-hvd launch', submitted with sbatch",
             f"#SBATCH --job-name={res.job_name}",
             f"#SBATCH --nodes={opts.nodes}",
             f"#SBATCH --ntasks={res.np}",
             f"#SBATCH --ntasks-per-node={opts.ntasks_per_node}"]
    if opts.cpus_per_task is not None:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    if opts.partition is not None:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time is not None:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.account is not None:
        lines.append(f"#SBATCH --account={opts.account}")
    # sbatch does not expand variables in #SBATCH lines, but splits them into words and expands % in file
    # names: the paths are escaped for that (see quoting.py); %j is the job id
    lines.append(f"#SBATCH --output={sbatch_path(run_dir, OUTPUT_PATTERN)}")
    lines.append(f"#SBATCH --chdir={sbatch_word(workdir)}")
    lines += [f"#SBATCH {opt}" for opt in sbatch_option_lines(opts)]
    lines.append("set -e")
    lines += [f"module load {q(name)}" for name in opts.modules]
    lines += list(opts.setup)
    lines.append(f"export PYTHONPATH={q(project_root)}${{PYTHONPATH:+:$PYTHONPATH}}")
    run = [python, "-m", "ranger_hvd.launcher.slurm.allocation", run_dir]
    if resume:
        run.append("--resume")
    lines.append("exec " + shlex.join(run))
    return "\n".join(lines) + "\n"


def script_paths_problem(run_dir: str, workdir: str) -> Optional[str]:
    """Why the run directory or working directory cannot be written on an #SBATCH line (None: they can):
    sbatch splits a script into a heterogeneous job wherever a line holds 'hetjob' (or 'packjob')."""
    for what, path in (("the run directory", run_dir), ("the working directory", workdir)):
        if control_chars(path):
            return f"{what} {short_repr(path)} holds control characters"
        if HETJOB_RE.search(path):
            return (f"{what} {short_repr(path)} holds '{HETJOB_RE.search(path).group(0)}', which sbatch reads as "
                    f"the start of another job wherever it stands on an #SBATCH line")
    return None


def default_script(res: Resolved, run_dir: str, resume: bool = False) -> str:
    """render_sbatch with this process's interpreter, project and working directory."""
    import sys

    import ranger_hvd

    return render_sbatch(res, run_dir, python=sys.executable,
                         project_root=str(Path(ranger_hvd.__file__).resolve().parents[1]),
                         workdir=os.getcwd(), resume=resume)


def sbatch_argv(script: str) -> list[str]:
    return ["sbatch", "--parsable", script]


# --------------------------------------------------------------------------------------------------
# talking to Slurm
# --------------------------------------------------------------------------------------------------
def require(tool: str, environ: Optional[Mapping[str, str]] = None) -> str:
    path = shutil.which(tool, path=(environ or os.environ).get("PATH"))
    if path is None:
        raise SlurmError(f"{tool} not found on PATH ({(environ or os.environ).get('PATH', '')}); "
                         f"cluster.scheduler 'slurm' needs the Slurm client commands (sbatch, squeue, scontrol)",
                         usage=True)
    return path


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, **kw)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(argv)} did not answer within {SLURM_TIMEOUT_S}s "
                         f"(is slurmctld running? see SLURM_CONF)") from None
    except OSError as exc:
        raise SlurmError(f"cannot run {argv[0]}: {exc.strerror}") from None


# the config keys behind sbatch's refusals, most specific first ("time limit exceeds partition limit")
_REFUSALS = ((re.compile(r"time limit", re.I), "cluster.slurm.time", "time"),
             (re.compile(r"account", re.I), "cluster.slurm.account", "account"),
             (re.compile(r"partition", re.I), "cluster.slurm.partition", "partition"),
             (re.compile(r"node configuration|node count|nodes? (are|is) not available|ntasks", re.I),
              "cluster.slurm.nodes / ntasks_per_node / cpus_per_task", None))


# sbatch failing for want of a controller, not because of the job
_UNREACHABLE = re.compile(r"configuration source|Unable to contact|Connection refused|Zero Bytes were transmitted|"
                          r"Unable to process configuration", re.I)


def culprit(message: str, opts: SlurmOptions) -> str:
    """': cluster.slurm.partition 'gpu'' for sbatch's 'invalid partition specified', '' when unclear."""
    for pattern, path, field in _REFUSALS:
        if pattern.search(message):
            if field is None:
                return (f": {path} ({opts.nodes} node(s) x {opts.ntasks_per_node} task(s)"
                        + (f" x {opts.cpus_per_task} cpu(s)" if opts.cpus_per_task else "") + ")")
            value = getattr(opts, field)
            return f": {path} {value!r}" if value is not None else f": {path} (not set: the cluster's default)"
    return ""


def check_with_test_only(script_text: str, opts: SlurmOptions) -> None:
    """``sbatch --test-only``: Slurm checks partition, account, nodes and limits without submitting.
    Its refusal is the user's input problem (exit 2)."""
    r = _run([require("sbatch"), "--test-only"], input=script_text)   # the script on stdin
    if r.returncode != 0:
        why = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        if _UNREACHABLE.search(why):
            raise SlurmError(f"cannot reach Slurm (sbatch --test-only said: {why}); check SLURM_CONF and slurmctld")
        raise SlurmError(f"Slurm refuses the job{culprit(why, opts)} (sbatch --test-only said: {why})", usage=True)


def submit(script: Path) -> str:
    """Submits the script; returns the job id."""
    r = _run([require("sbatch"), "--parsable", str(script)])
    out = r.stdout.strip()
    if r.returncode != 0 or not out:
        why = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise SlurmError(f"sbatch failed: {why}")
    return out.split(";")[0]   # --parsable prints "ID" or "ID;CLUSTER"


def job_state(job_id: str) -> Optional[str]:
    """The job's state as Slurm reports it (PENDING, RUNNING, COMPLETED, CANCELLED, ...), or None once
    Slurm has forgotten it (controllers keep finished jobs for MinJobAge seconds; sacct answers after that
    only where accounting is enabled)."""
    r = _run([require("squeue"), "-h", "-j", job_id, "-o", "%T"])
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0]
    if shutil.which("scontrol"):
        r = _run(["scontrol", "show", "job", "-o", job_id])
        m = re.search(r"\bJobState=(\S+)", r.stdout)
        if r.returncode == 0 and m:
            return m.group(1)
    if shutil.which("sacct"):
        r = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0]   # "CANCELLED by 0" -> CANCELLED
    return None


def job_end_time(job_id: str) -> Optional[float]:
    """When the job's time limit runs out (epoch seconds), None for no limit or when unknown."""
    r = _run([require("squeue"), "-h", "-j", job_id, "-o", "%e"])
    text = r.stdout.strip()
    if r.returncode != 0 or not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", text):
        return None
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


# --------------------------------------------------------------------------------------------------
# inside an allocation
# --------------------------------------------------------------------------------------------------
@dataclass
class Allocation:
    job_id: str
    hosts: list[tuple[str, int]]     # (node, tasks Slurm gave it), in Slurm's order
    nodelist: str                    # compressed, as Slurm wrote it ("node[01-04]")


def expand_counts(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE's form, '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmError(f"cannot read tasks per node {text!r} (SLURM_TASKS_PER_NODE)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """'node[01-03],gpu7' -> its host names, by Slurm itself (scontrol show hostnames)."""
    r = _run([require("scontrol"), "show", "hostnames", nodelist])
    hosts = r.stdout.split()
    if r.returncode != 0 or not hosts:
        raise SlurmError(f"scontrol show hostnames {nodelist!r} failed: {(r.stderr or r.stdout).strip()}")
    return hosts


def allocation_from_env(environ: Mapping[str, str]) -> Allocation:
    """Hosts and slots of the allocation this process runs in, from Slurm's variables."""
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not job_id or not nodelist:
        raise SlurmError("not inside a Slurm allocation (SLURM_JOB_ID / SLURM_JOB_NODELIST are not set)")
    nodes = expand_nodelist(nodelist)
    if environ.get("SLURM_TASKS_PER_NODE"):
        counts = expand_counts(environ["SLURM_TASKS_PER_NODE"])
    elif environ.get("SLURM_NTASKS_PER_NODE"):
        counts = [int(environ["SLURM_NTASKS_PER_NODE"])] * len(nodes)
    else:
        counts = [1] * len(nodes)
    if len(counts) != len(nodes):
        raise SlurmError(f"SLURM_TASKS_PER_NODE={environ.get('SLURM_TASKS_PER_NODE')!r} does not match the "
                         f"{len(nodes)} nodes of SLURM_JOB_NODELIST={nodelist!r}")
    return Allocation(job_id=job_id, hosts=list(zip(nodes, counts)), nodelist=nodelist)


# --------------------------------------------------------------------------------------------------
# the run directory's record of the job
# --------------------------------------------------------------------------------------------------
def write_job_file(run_dir: Path, data: dict) -> None:
    from ranger_hvd.launcher.run.rundir import write_json

    write_json(run_dir / JOB_FILE, data)


def read_job_file(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(slurm.json's record, None), (None, None) when there is none, or (None, why it is unusable)."""
    from ranger_hvd.rundir.records import read_json_object

    data, why = read_json_object(Path(run_dir) / JOB_FILE)
    if data is not None and not (isinstance(data.get("job_id"), str) and re.fullmatch(r"[0-9_]{1,32}", data["job_id"])):
        return None, f"{Path(run_dir) / JOB_FILE} has no usable job_id"
    return data, why
