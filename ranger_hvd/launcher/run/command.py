"""Config -> the ``horovodrun`` argv and the environment it runs in.  A pure function: everything it
depends on (interpreter, environment, uid, paths) is an argument, so a dry-run and a real launch build
exactly the same command.

Notes on the mapping (horovodrun 0.28.1):

* hosts always travel as ``-H host:slots,...``: a ``cluster.hostfile`` is parsed and checked by the
  launcher (comments and blank lines allowed), because horovodrun's own ``--hostfile`` parser fails on
  blank lines and comments;
* ``--output-filename RUN_DIR/logs``: Gloo writes ``logs/rank.N/{stdout,stderr}``; Open MPI's mpirun
  writes ``logs/1/rank.N/{stdout,stderr}`` (see :func:`rank_log_files` in supervisor);
* horovodrun forwards its whole environment to every rank, so the environment built here is complete:
  nothing else from the launcher's environment reaches the ranks;
* horovodrun pastes some of its arguments unquoted into ``sh -c`` lines: those are quoted here (see
  :mod:`.quoting`), so that the program at the end of that line receives each value unchanged.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Mapping, Optional

from ranger_hvd.config import Resolved, split_list
from ranger_hvd.config.checks import mpi_arg_list
from ranger_hvd.config.user_command import command_argv
from ranger_hvd.launcher.run.elastic import elastic_flags
from ranger_hvd.launcher.quoting import for_horovodrun, mpi_args_value
from ranger_hvd.rundir import layout

MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
TORCHRUN_RDZV_PORT = 29400      # torchrun's own default port of a c10d rendezvous
HOROVOD_STALL_WARNING_S = 60   # horovodrun's own default for --stall-check-warning-time-seconds
# Always passed when set in the launcher's environment (besides PATH and PYTHONPATH, which are built).
BASE_ENV = ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR")


@dataclass(frozen=True)
class LaunchCommand:
    argv: list[str]
    env: dict[str, str]                  # the complete environment of horovodrun (and so of every rank)
    missing_env: list[str] = field(default_factory=list)  # cluster.env names not set in the launcher

    @property
    def line(self) -> str:
        return shlex.join(self.argv)

    def env_lines(self) -> list[str]:
        return [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]

    def text(self) -> str:
        """What --dry-run prints and command.txt holds."""
        out = [self.line,
               f"# environment of {os.path.basename(self.argv[0])} and every rank (nothing else is passed):"]
        out += [f"#   {x}" for x in self.env_lines()]
        for name in self.missing_env:
            out.append(f"#   ({name} is listed in cluster.env but not set here, so it is not passed)")
        return "\n".join(out) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _join_path(*parts: Optional[str]) -> str:
    seen, out = set(), []
    for part in parts:
        for p in (part or "").split(os.pathsep):
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return os.pathsep.join(out)


def timeline_path(run_dir: str) -> str:
    return os.path.join(run_dir, layout.TIMELINE)


def stall_needs_timeline(res: Resolved) -> bool:
    """Under Gloo, Horovod 0.28.1's stall inspector never reports, so the launcher finds stalls in
    Horovod's timeline instead (see :mod:`ranger_hvd.launcher.run.stall`)."""
    hv = res.config.horovod
    # Not in elastic mode: after a resize the timeline's collectives have fewer ranks than it expects
    return (hv.stall_check and hv.stall_check_shutdown_time_seconds > 0 and not hv.timeline
            and res.config.cluster.controller == "gloo" and res.config.cluster.elastic is None
            and res.config.cluster.runner == "horovodrun")


def horovod_flags(res: Resolved, run_dir: str) -> list[str]:
    hv = res.config.horovod
    a: list[str] = []
    if hv.fusion_threshold_mb is not None:
        a += ["--fusion-threshold-mb", str(hv.fusion_threshold_mb)]
    if hv.cycle_time_ms is not None:
        a += ["--cycle-time-ms", _num(hv.cycle_time_ms)]
    if hv.cache_capacity is not None:
        a += ["--cache-capacity", str(hv.cache_capacity)]
    if hv.hierarchical_allreduce is not None:
        a += ["--hierarchical-allreduce" if hv.hierarchical_allreduce else "--no-hierarchical-allreduce"]
    if hv.hierarchical_allgather is not None:
        a += ["--hierarchical-allgather" if hv.hierarchical_allgather else "--no-hierarchical-allgather"]
    if hv.timeline:
        a += ["--timeline-filename", timeline_path(run_dir)]
        if hv.timeline_mark_cycles:
            a += ["--timeline-mark-cycles"]
    if hv.autotune:
        a += ["--autotune"]
        if hv.autotune_log:
            a += ["--autotune-log-file", os.path.join(run_dir, layout.AUTOTUNE_LOG)]
        for key in ("warmup_samples", "steps_per_sample", "bayes_opt_max_samples"):
            v = getattr(hv, f"autotune_{key}")
            if v is not None:
                a += [f"--autotune-{key.replace('_', '-')}", str(v)]
        if hv.autotune_gaussian_process_noise is not None:
            a += ["--autotune-gaussian-process-noise", _num(hv.autotune_gaussian_process_noise)]
    if not hv.stall_check:
        a += ["--no-stall-check"]
    else:
        if hv.stall_check_warning_time_seconds != HOROVOD_STALL_WARNING_S:
            a += ["--stall-check-warning-time-seconds", str(hv.stall_check_warning_time_seconds)]
        if hv.stall_check_shutdown_time_seconds:   # Horovod's default is 0: never shut down
            a += ["--stall-check-shutdown-time-seconds", str(hv.stall_check_shutdown_time_seconds)]
            if stall_needs_timeline(res):
                a += ["--timeline-filename", timeline_path(run_dir)]
    if hv.gloo_timeout_seconds is not None:
        a += ["--gloo-timeout-seconds", str(hv.gloo_timeout_seconds)]
    if hv.thread_affinity is not None:
        a += ["--thread-affinity", str(hv.thread_affinity)]
    if hv.mpi_threads_disable is not None:
        a += ["--mpi-threads-disable" if hv.mpi_threads_disable else "--no-mpi-threads-disable"]
    if hv.num_nccl_streams is not None:
        a += ["--num-nccl-streams", str(hv.num_nccl_streams)]
    if hv.tcp:
        a += ["--tcp"]
    if hv.log_level is not None:
        a += ["--log-level", hv.log_level]
    if hv.log_timestamp is not None:
        a += ["--log-with-timestamp" if hv.log_timestamp else "--log-without-timestamp"]
    if hv.prefix_output_with_timestamp:
        a += ["--prefix-output-with-timestamp"]
    if hv.disable_cache:
        a += ["--disable-cache"]
    if hv.verbose:
        a += ["--verbose"]
    return a


def build_command(res: Resolved, run_dir: str, *, python: str, environ: Mapping[str, str], uid: int,
                  project_root: str, venv_bin: Optional[str] = None, resume: bool = False) -> LaunchCommand:
    """The horovodrun argv and its complete environment for the resolved config ``res``.

    ``run_dir`` must be absolute (ranks on other hosts see the same path); ``python`` is the interpreter
    every rank runs (the same path must exist on every host); ``project_root`` goes first on PYTHONPATH.
    """
    cfg = res.config
    cl = cfg.cluster
    run_dir = str(run_dir)
    if cl.runner == "torchrun":
        argv = torchrun_argv(res, run_dir, resume=resume)
    else:
        argv = horovodrun_argv(res, run_dir, python=python, resume=resume)
    config_file = os.path.join(run_dir, layout.CONFIG)

    env: dict[str, str] = {}
    env["PATH"] = _join_path(venv_bin, environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONPATH"] = _join_path(project_root, environ.get("PYTHONPATH"))
    for name in BASE_ENV:
        if name in environ:
            env[name] = environ[name]
    env["PYTHONUNBUFFERED"] = "1"   # rank output reaches the logs as it is written
    if cl.runner == "torchrun" and cl.scheduler == "slurm":
        # srun finds its allocation (SLURM_JOB_ID, ...) and the cluster's slurm.conf (SLURM_CONF) here
        env.update({k: v for k, v in environ.items() if k.startswith("SLURM_")})
    if cfg.job.command:   # what ranger_hvd.run reads on every rank, and whether this start continues a run
        env[layout.RUN_DIR_ENV], env[layout.CONFIG_ENV] = run_dir, config_file
        if resume:
            env[layout.RESUME_ENV] = "1"
    if getattr(cfg.compression, "hierarchical", False) and cl.runner != "torchrun":
        # RangerCompressor(hierarchical=True) adds a Horovod process set per host and one of the leaders
        env["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"
    missing = []
    for entry in cl.env:
        if "=" in entry:
            name, value = entry.split("=", 1)
            env[name] = value
        elif entry in environ:
            env[entry] = environ[entry]
        else:
            missing.append(entry)
    if cl.controller == "mpi" and uid == 0:
        env.update(MPI_ROOT_ENV)
    return LaunchCommand(argv=argv, env=env, missing_env=missing)


def job_argv(res: Resolved, run_dir: str, resume: bool) -> list[str]:
    """What follows ``python -m`` on every rank: the reference job's module and its arguments."""
    argv = [res.config.job.entry, "--config", os.path.join(run_dir, layout.CONFIG), "--run-dir", run_dir]
    if resume:
        argv.append("--resume")   # the job continues from RUN_DIR/checkpoints (launch --resume)
    return argv


def torchrun_argv(res: Resolved, run_dir: str, *, resume: bool) -> list[str]:
    """torchrun (and, on a Slurm allocation, the srun that starts one torchrun per node).

    One host: ``--standalone`` (a c10d rendezvous on a free local port) with ``np`` ranks.  Slurm: srun
    starts one torchrun on each node of the allocation, which meet in a c10d rendezvous on the first node
    (``cluster.rdzv_port``, default 29400) under the run directory's name, each starting the node's tasks.
    torchrun's own restarts stay off: ``train.max_restarts`` restarts the whole launch from a checkpoint.
    The argv is exec'd as a list (srun passes it on as such); nothing goes through a shell.  The ranks run
    the interpreter of the torchrun found first on PATH, the run's environment (see build_command).
    """
    cl = res.config.cluster
    tail = ["--max-restarts", "0", "-m", *job_argv(res, run_dir, resume)]
    if cl.scheduler != "slurm":
        return ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(res.np), *tail]
    nodes = [h for h, _ in res.hosts] or ["localhost"]
    per_node = -(-res.np // len(nodes))
    port = cl.rdzv_port or TORCHRUN_RDZV_PORT
    srun = ["srun", "--nodes", str(len(nodes)), "--ntasks", str(len(nodes)), "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1"]
    return srun + ["torchrun", "--nnodes", str(len(nodes)), "--nproc-per-node", str(per_node),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes[0]}:{port}",
                   "--rdzv-id", os.path.basename(os.path.normpath(run_dir)), *tail]


def horovodrun_argv(res: Resolved, run_dir: str, *, python: str, resume: bool) -> list[str]:
    cfg = res.config
    cl = cfg.cluster
    argv = ["horovodrun", "-np", str(res.np)]
    if cl.elastic is not None:   # the discovery script lists the hosts
        argv += elastic_flags(res, run_dir)
    else:
        argv += ["-H", ",".join(f"{h}:{s}" for h, s in res.hosts)]
    argv.append("--mpi" if cl.controller == "mpi" else "--gloo")
    if cl.ssh_port is not None:
        argv += ["-p", str(cl.ssh_port)]
    if cl.ssh_identity_file is not None:
        argv += ["-i", cl.ssh_identity_file]
    if cl.network_interfaces is not None:
        argv += ["--network-interfaces", ",".join(split_list(cl.network_interfaces))]
    if cl.start_timeout is not None:
        argv += ["--start-timeout", str(cl.start_timeout)]
    logs = os.path.join(run_dir, layout.RANK_LOGS)
    # Gloo opens the files itself; under MPI horovodrun pastes the path into the mpirun line
    argv += ["--output-filename", for_horovodrun(logs) if cl.controller == "mpi" else logs]
    argv += horovod_flags(res, run_dir)
    mpi_args = mpi_arg_list(cl.mpi_args)
    if cl.controller == "mpi" and cl.ssh_known_hosts_file is not None:
        # mpirun's ssh is Open MPI's plm_rsh_agent, which it splits at spaces (the path has none, see
        # config.safety.PLAIN_PATH); horovodrun already uses plm_rsh_args for -p/-i
        mpi_args += ["-mca", "plm_rsh_agent", f"ssh -o UserKnownHostsFile={cl.ssh_known_hosts_file}"]
    if mpi_args:
        argv += [f"--mpi-args={mpi_args_value(mpi_args)}"]
    if cfg.job.command:
        # your own program, its arguments as given: horovodrun quotes them itself (see user_command.py)
        argv += command_argv(cfg.job.command, python)
    else:
        argv += [python, "-m", *job_argv(res, run_dir, resume)]
    return argv


def default_command(res: Resolved, run_dir: str, resume: bool = False) -> LaunchCommand:
    """build_command with this process's interpreter, environment and uid."""
    import sys
    from pathlib import Path

    import ranger_hvd

    return build_command(res, run_dir, python=sys.executable, environ=dict(os.environ), uid=os.getuid(),
                         project_root=str(Path(ranger_hvd.__file__).resolve().parents[1]),
                         venv_bin=str(Path(sys.executable).parent), resume=resume)
