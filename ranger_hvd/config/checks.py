"""Checks that span several keys (``data.dir`` only with mnist) and the ones that read files (hostfile,
ssh identity).  Each section has its own function; ``SECTION_CHECKS`` lists the file-free ones, which the
jobs run too."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Callable, Optional

from ranger_hvd.config.slurm import SlurmOptions, setup_problem, slurm_problems, tasks_per_node
from ranger_hvd.config.hosts import parse_host_list, parse_hostfile, split_list
from ranger_hvd.config.problems import Problem, short_repr
from ranger_hvd.config.safety import name_too_long, plain_path_problem
from ranger_hvd.config.schema import DEFAULT_ENTRY, SEED_LIMIT, Config
from ranger_hvd.config.user_command import check_user_command

Where = Callable[[str], str]
# whole-string grammars (fullmatch): Python's '$' would also match before a final newline
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NIC_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,63}")
# the longest run directory name below output.dir/<job.name>: a timestamp and a -NNN suffix
RUN_DIR_NAME = "YYYYmmdd-HHMMSS-999"
PATH_MAX = 4096
_AUTOTUNE_KEYS = ("autotune_log", "autotune_warmup_samples", "autotune_steps_per_sample",
                  "autotune_bayes_opt_max_samples", "autotune_gaussian_process_noise")


def mpi_arg_list(mpi_args) -> list[str]:
    """cluster.mpi_args as mpirun's arguments: a list as given, a string split the way a shell splits
    words (quotes and backslashes), with nothing expanded or run.  Raises ValueError (unbalanced quote)."""
    if mpi_args is None:
        return []
    return shlex.split(mpi_args) if isinstance(mpi_args, str) else list(mpi_args)


def check_data(cfg: Config, where: Where) -> list[Problem]:
    d, problems = cfg.data, []
    if d.dataset == "mnist" and not d.dir:
        problems.append(Problem("data.dir", "required when data.dataset is 'mnist' (the directory holding MNIST)",
                                where("data.dataset")))
    if d.dataset != "mnist" and d.dir:
        problems.append(Problem("data.dir", f"only used with data.dataset 'mnist' (dataset is '{d.dataset}')",
                                where("data.dir")))
    if d.dataset != "synthetic" and d.synthetic_samples is not None:
        problems.append(Problem("data.synthetic_samples", "only used with data.dataset 'synthetic' "
                                f"(dataset is '{d.dataset}')", where("data.synthetic_samples")))
    return problems


def check_cluster(cfg: Config, where: Where) -> list[Problem]:
    cl, problems = cfg.cluster, []
    if cl.hosts is not None and cl.hostfile is not None:
        problems.append(Problem("cluster.hostfile", "give cluster.hosts or cluster.hostfile, never both "
                                "(set the other to null)", where("cluster.hostfile")))
    if cl.network_interfaces is not None:
        nics = split_list(cl.network_interfaces)
        if not nics:
            problems.append(Problem("cluster.network_interfaces", "must name at least one interface",
                                    where("cluster.network_interfaces")))
        for i, nic in enumerate(nics):
            if not _NIC_RE.fullmatch(nic):
                p = f"cluster.network_interfaces[{i}]"
                problems.append(Problem(p, f"bad interface name {short_repr(nic)} (letters, digits, '_', '.', ':', "
                                           "'@', '-', not starting with '-')", where(p)))
    names: dict[str, int] = {}
    for i, entry in enumerate(cl.env):
        p = f"cluster.env[{i}]"
        name = entry.split("=", 1)[0]
        if not _ENV_RE.fullmatch(name):
            problems.append(Problem(p, f"must be an environment variable NAME or NAME=VALUE, NAME of letters, "
                                       f"digits and '_' (got {short_repr(entry)})", where(p)))
        elif name in names:
            problems.append(Problem(p, f"{name} is listed twice (also cluster.env[{names[name]}])", where(p)))
        else:
            names[name] = i
    if cl.mpi_args is not None and cl.controller != "mpi":
        problems.append(Problem("cluster.mpi_args", "only allowed with cluster.controller 'mpi'",
                                where("cluster.mpi_args")))
    try:
        mpi_arg_list(cl.mpi_args)
    except ValueError as exc:
        problems.append(Problem("cluster.mpi_args", f"cannot split {short_repr(cl.mpi_args)} into arguments ({exc}); "
                                "give a list such as [--bind-to, none]", where("cluster.mpi_args")))
    if cl.slurm is not None and cl.scheduler != "slurm":
        problems.append(Problem("cluster.slurm", "only allowed with cluster.scheduler 'slurm'", where("cluster.slurm")))
    if cl.scheduler == "slurm":
        for p, msg in slurm_problems(cl.slurm or SlurmOptions(), cl.np, cl.hosts is not None, cl.hostfile is not None):
            problems.append(Problem(p, msg, where(p)))
    if cl.elastic is not None:
        problems += elastic_problems(cfg, where)
    return problems


def elastic_problems(cfg: Config, where: Where) -> list[Problem]:
    """What elastic mode cannot be combined with, and its worker bounds (file-free)."""
    cl, el, problems = cfg.cluster, cfg.cluster.elastic, []
    if cl.controller != "gloo":
        problems.append(Problem("cluster.elastic", f"needs cluster.controller 'gloo' (Horovod's elastic mode runs "
                                f"on Gloo only); cluster.controller is '{cl.controller}'", where("cluster.controller")))
    if cl.scheduler == "slurm":
        problems.append(Problem("cluster.elastic", "cannot be combined with cluster.scheduler 'slurm' (the "
                                "allocation fixes the hosts)", where("cluster.scheduler")))
    if el.max_np is not None and el.max_np < el.min_np:
        problems.append(Problem("cluster.elastic.max_np", f"must be at least cluster.elastic.min_np ({el.min_np}); "
                                f"got {el.max_np}", where("cluster.elastic.max_np")))
    if cl.np is not None and cl.np < el.min_np:
        problems.append(Problem("cluster.np", f"{cl.np} is below cluster.elastic.min_np ({el.min_np}): the job "
                                "starts with np workers and continues with at least min_np", where("cluster.np")))
    if cl.np is not None and el.max_np is not None and cl.np > el.max_np:
        problems.append(Problem("cluster.np", f"{cl.np} is above cluster.elastic.max_np ({el.max_np})",
                                where("cluster.np")))
    if el.discovery_script is not None and (cl.hosts is not None or cl.hostfile is not None):
        key = "cluster.hosts" if cl.hosts is not None else "cluster.hostfile"
        problems.append(Problem(key, "not used with cluster.elastic.discovery_script, which lists the hosts "
                                "(set one of them to null)", where(key)))
    if cfg.job.backend == "tensorflow" and cfg.job.entry == DEFAULT_ENTRY and not cfg.job.command:
        problems.append(Problem("cluster.elastic", "the TensorFlow reference jobs have no elastic mode (use "
                                "job.backend 'torch', or leave cluster.elastic null)", where("job.backend")))
    if cfg.horovod.cycle_time_ms is not None:
        # measured: the surviving workers segfault in hvd.init() when the job re-initialises after a resize
        problems.append(Problem("horovod.cycle_time_ms", "cannot be combined with cluster.elastic: with a cycle "
                                "time, Horovod 0.28.1's workers crash in hvd.init() when an elastic job resizes "
                                "(set horovod.cycle_time_ms: null)", where("horovod.cycle_time_ms")))
    if cfg.train.max_restarts:
        problems.append(Problem("train.max_restarts", "cannot be combined with cluster.elastic: elastic mode "
                                "replaces lost workers itself (set train.max_restarts: 0)",
                                where("train.max_restarts")))
    return problems


def check_horovod(cfg: Config, where: Where) -> list[Problem]:
    hv, problems = cfg.horovod, []
    if hv.timeline_mark_cycles and not hv.timeline:
        problems.append(Problem("horovod.timeline_mark_cycles", "needs horovod.timeline: true",
                                where("horovod.timeline_mark_cycles")))
    for k in _AUTOTUNE_KEYS:
        if getattr(hv, k) not in (None, False) and not hv.autotune:
            problems.append(Problem(f"horovod.{k}", "only allowed with horovod.autotune: true", where(f"horovod.{k}")))
    for k in ("stall_check_warning_time_seconds", "stall_check_shutdown_time_seconds"):
        # a resolved config (RUN_DIR/config.yaml) spells out the defaults: only a changed value is pointless
        if getattr(hv, k) != type(hv).model_fields[k].default and hv.stall_check is False:
            problems.append(Problem(f"horovod.{k}", "has no effect with horovod.stall_check: false",
                                    where(f"horovod.{k}")))
    if hv.stall_check and 0 < hv.stall_check_shutdown_time_seconds < hv.stall_check_warning_time_seconds:
        p = "horovod.stall_check_shutdown_time_seconds"
        problems.append(Problem(p, f"must be 0 (never shut down) or at least horovod.stall_check_warning_time_"
                                   f"seconds ({hv.stall_check_warning_time_seconds}); Horovod ignores a shorter "
                                   f"one (got {hv.stall_check_shutdown_time_seconds})", where(p)))
    if hv.mpi_threads_disable is not None and cfg.cluster.controller != "mpi":
        problems.append(Problem("horovod.mpi_threads_disable", "only applies with cluster.controller 'mpi'",
                                where("horovod.mpi_threads_disable")))
    return problems


def check_momentum(cfg: Config, where: Where) -> list[Problem]:
    """Momentum lives in one place: the optimizer (train.momentum) or the compressor (DGC's
    compression.momentum), never both."""
    inside, outside = cfg.compression.compressor_momentum, cfg.train.momentum
    if inside > 0 and outside:
        kind = "DGC's momentum" if cfg.compression.momentum_masking else "the momentum, unmasked,"
        return [Problem("train.momentum", f"{outside} would apply momentum a second time: "
                        f"compression.momentum ({inside}) already keeps {kind} in the compressor. "
                        "Set train.momentum: 0, or compression.momentum: 0 for momentum on the averaged "
                        "update", where("train.momentum"))]
    return []


def check_gan(cfg: Config, where: Where) -> list[Problem]:
    """The gan section changes only the GAN job: on another model it would be silently ignored."""
    if cfg.job.model == "gan" or cfg.job.command:   # a user command: check_user_command names gan.*
        return []
    defaults = type(cfg.gan)()
    return [Problem(f"gan.{key}", f"only used with job.model 'gan' (model is '{cfg.job.model}')", where(f"gan.{key}"))
            for key in type(cfg.gan).model_fields if getattr(cfg.gan, key) != getattr(defaults, key)]


# cluster keys that only horovodrun reads (its ssh start of remote ranks and its own start timeout)
_HOROVODRUN_ONLY = {"ssh_port": "ssh port", "ssh_identity_file": "ssh key", "ssh_known_hosts_file": "known_hosts file",
                    "start_timeout": "start timeout", "network_interfaces": "interface list"}


def check_runner(cfg: Config, where: Where) -> list[Problem]:
    """cluster.runner 'torchrun' runs the PyTorch reference jobs under DDP: what only Horovod reads is refused,
    each key named (the horovod section's tunables are set aside as inactive in resolve.validate)."""
    cl = cfg.cluster
    if cl.runner != "torchrun":
        if cl.rdzv_port is not None:
            return [Problem("cluster.rdzv_port", "only used with cluster.runner 'torchrun'", where("cluster.rdzv_port"))]
        return []
    problems = []

    def refuse(key: str, why: str, at: Optional[str] = None) -> None:
        problems.append(Problem(key, f"{why} (cluster.runner is 'torchrun')", where(at or key)))

    if cfg.job.command:
        refuse("job.command", "torchrun runs the PyTorch reference jobs only; start your own DDP script with "
                              "torchrun yourself, or use cluster.runner 'horovodrun'")
    elif cfg.job.backend != "torch":
        refuse("job.backend", f"DDP is PyTorch's: job.backend must be 'torch', not '{cfg.job.backend}'")
    if cl.controller != "gloo":
        refuse("cluster.controller", f"'{cl.controller}' is Horovod's controller; DDP's ranks talk over "
                                     "torch.distributed's Gloo: set cluster.controller: gloo")
    if cl.elastic is not None:
        refuse("cluster.elastic", "elastic mode is Horovod's (hvd.elastic); set cluster.elastic: null")
    for key, what in _HOROVODRUN_ONLY.items():
        if getattr(cl, key) is not None:
            hint = ("; give Gloo's interface as cluster.env GLOO_SOCKET_IFNAME=NAME" if key == "network_interfaces"
                    else "")
            refuse(f"cluster.{key}", f"horovodrun's {what}, unused by torchrun{hint}")
    comp = cfg.compression
    if getattr(comp, "selection", "topk") != "topk":
        refuse("compression.selection", f"ranger_hook exchanges top-k pairs; '{comp.selection}' is for Horovod's "
                                        "compression= hook")
    if cl.scheduler == "slurm":
        opts = cl.slurm or SlurmOptions()
        per_node = tasks_per_node(opts, cl.np)
        if opts.nodes > 1 and cl.np is not None and cl.np != opts.nodes * per_node:
            refuse("cluster.np", f"torchrun starts the same number of ranks on every node: {cl.np} ranks on "
                                 f"{opts.nodes} nodes x {per_node} task(s) would leave slots empty; set cluster.np to "
                                 f"{opts.nodes * per_node} or cluster.slurm.ntasks_per_node")
    return problems


def check_hierarchical(cfg: Config, where: Where) -> list[Problem]:
    """compression.hierarchical runs on PyTorch jobs under horovodrun, not elastic (the hosts' ranks:
    ``resolve_hosts``)."""
    if not getattr(cfg.compression, "hierarchical", False):
        return []
    if cfg.job.backend != "torch":
        why = f"runs on job.backend 'torch' only so far (backend is '{cfg.job.backend}')"
    elif cfg.cluster.runner == "torchrun":
        why = ("ranger_hook (ranger_hvd.torch.ddp) exchanges among all ranks; hierarchical runs under "
               "horovodrun so far (cluster.runner is 'torchrun')")
    elif cfg.cluster.elastic is not None:
        why = "does not run under elastic horovodrun yet (the hosts change at every reset)"
    else:
        return []
    return [Problem("compression.hierarchical", why, where("compression.hierarchical"))]


SECTION_CHECKS = (check_data, check_cluster, check_horovod, check_momentum, check_gan, check_user_command,
                  check_runner, check_hierarchical)


def config_path(cwd: Path, p: str) -> Path:
    """A path given in the config: '~' expanded, relative to the working directory."""
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else cwd / q


def resolve_hosts(cfg: Config, where: Where, cwd: Path) -> tuple[list[tuple[str, int]], int, list[Problem]]:
    """(hosts, number of ranks, problems) from cluster.hosts, cluster.hostfile or the default
    localhost:np; also checks that the ssh identity file exists."""
    cl, problems = cfg.cluster, []
    el = cl.elastic
    hosts: list[tuple[str, int]] = []
    if cl.scheduler == "slurm" or (cl.hosts is not None and cl.hostfile is not None):
        pass   # Slurm: the hosts come from the allocation once the job runs; both given: check_cluster says so
    elif el is not None and el.discovery_script is not None:   # the script lists the hosts
        script = config_path(cwd, el.discovery_script)
        p = "cluster.elastic.discovery_script"
        if not script.is_file():
            problems.append(Problem(p, f"file not found: {el.discovery_script}", where(p)))
        elif not os.access(script, os.X_OK):
            problems.append(Problem(p, f"{el.discovery_script} is not executable (chmod +x it)", where(p)))
    elif cl.hostfile is not None:
        hosts = parse_hostfile(config_path(cwd, cl.hostfile), "cluster.hostfile", where("cluster.hostfile"), problems)
    elif cl.hosts is not None:
        hosts = parse_host_list(split_list(cl.hosts), "cluster.hosts", where, problems)
    else:
        hosts = [("localhost", cl.np or 2)]
    if cl.runner == "torchrun" and len({h for h, _ in hosts}) > 1:
        key = "cluster.hostfile" if cl.hostfile is not None else "cluster.hosts"
        problems.append(Problem(key, f"cluster.runner 'torchrun' starts the ranks on one host "
                                f"({len({h for h, _ in hosts})} are listed); for several nodes use cluster.scheduler "
                                "'slurm', where srun starts torchrun on each node", where(key)))
    total = sum(s for _, s in hosts)
    if cl.scheduler == "slurm":
        total = (cl.slurm or SlurmOptions()).nodes * tasks_per_node(cl.slurm or SlurmOptions(), cl.np)
    np_ = cl.np if cl.np is not None else total
    if el is not None and cl.np is None and el.max_np is not None:
        np_ = min(total, el.max_np)
    if el is not None and el.discovery_script is not None and cl.np is None:
        np_ = el.min_np     # the script's hosts are known only once it runs
    if hosts and cl.np is not None and cl.np > total:
        problems.append(Problem("cluster.np", f"{cl.np} ranks do not fit in the {total} slots of the hosts "
                                "(np may not exceed the total slots)", where("cluster.np")))
    if (el is not None and cl.network_interfaces is None and len({h for h, _ in hosts}) == 1
            and hosts[0][0] not in ("localhost", "127.0.0.1")):
        problems.append(Problem("cluster.network_interfaces", f"elastic mode on the one host {hosts[0][0]} needs "
                                "the interface its workers talk over (horovodrun otherwise waits for a second "
                                "host to find it)", where("cluster.elastic")))
    if el is not None and hosts and total < el.min_np:
        problems.append(Problem("cluster.elastic.min_np", f"{el.min_np} workers do not fit in the {total} slots "
                                "of the hosts", where("cluster.elastic.min_np")))
    if getattr(cfg.compression, "hierarchical", False) and cl.scheduler != "slurm" and el is None and hosts:
        left, per_host = np_, []
        for _, slots in hosts:   # horovodrun fills the hosts in order
            per_host.append(min(slots, left))
            left -= per_host[-1]
        if max(per_host) < 2:
            problems.append(Problem("compression.hierarchical", f"needs 2 or more ranks on a host, but the {np_} "
                                    "rank(s) go one per host: nothing to sum before the sparse exchange (give "
                                    "the hosts 2+ slots, or set compression.hierarchical: false)",
                                    where("compression.hierarchical")))
    if cl.ssh_identity_file is not None and not config_path(cwd, cl.ssh_identity_file).is_file():
        problems.append(Problem("cluster.ssh_identity_file", f"file not found: {cl.ssh_identity_file}",
                                where("cluster.ssh_identity_file")))
    if cl.ssh_known_hosts_file is not None and not config_path(cwd, cl.ssh_known_hosts_file).is_file():
        problems.append(Problem("cluster.ssh_known_hosts_file", f"file not found: {cl.ssh_known_hosts_file} "
                                "(create it, e.g. with ssh-keyscan -p PORT HOST > FILE)",
                                where("cluster.ssh_known_hosts_file")))
    return hosts, np_, problems


def output_dir_problem(out_dir: Path, job_name: str) -> Optional[str]:
    """Why no run directory can be created under ``out_dir`` (absolute), without creating anything."""
    longest = out_dir / job_name / RUN_DIR_NAME
    part = name_too_long(longest)
    if part is not None:
        return f"the name {short_repr(part)} is longer than 255 bytes, more than a file system allows"
    if len(str(longest).encode("utf-8", "surrogateescape")) + 64 > PATH_MAX:
        return f"{short_repr(str(out_dir))} is too long a path for the run directories below it"
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            return f"{short_repr(str(probe))} is a broken symbolic link"
        probe = probe.parent
    if not probe.is_dir():
        return (f"{short_repr(str(probe))} is a file, not a directory" if probe == out_dir else
                f"{short_repr(str(probe))} is a file, so no directory can be created below it")
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{short_repr(str(probe))} is not writable here, so no run directory can be created in it"
    return None


def path_problems(cfg: Config, np_: int, where: Where) -> list[Problem]:
    """Checks of the absolute paths of the resolved config and of values that depend on ``np``."""
    cl, problems = cfg.cluster, []
    why = output_dir_problem(Path(cfg.output.dir), cfg.job_name)
    if why is None and cl.controller == "mpi" and ":" in cfg.output.dir:
        why = (f"{short_repr(cfg.output.dir)} holds ':', which Open MPI's mpirun reads as the start of options "
               "in --output-filename (the ranks' logs would go elsewhere); use another directory with MPI")
    if why:
        problems.append(Problem("output.dir", why, where("output.dir")))
    if cl.ssh_identity_file is not None:
        why = plain_path_problem(cl.ssh_identity_file)
        if why:
            problems.append(Problem("cluster.ssh_identity_file", why, where("cluster.ssh_identity_file")))
    if cl.ssh_known_hosts_file is not None and cl.controller == "mpi":
        # Open MPI splits its ssh command (plm_rsh_agent) at spaces, quotes or not
        why = plain_path_problem(cl.ssh_known_hosts_file)
        if why:
            problems.append(Problem("cluster.ssh_known_hosts_file", why, where("cluster.ssh_known_hosts_file")))
    if cl.scheduler == "slurm" and cl.slurm is not None:
        why = setup_problem(cl.slurm.setup)
        if why:
            problems.append(Problem("cluster.slurm.setup", why, where("cluster.slurm.setup")))
    last_rank = max(np_, (cl.elastic.max_np or 0) if cl.elastic else 0) - 1
    if cfg.train.seed + last_rank >= SEED_LIMIT:
        # each rank seeds NumPy with train.seed + rank, which must stay below 2**32
        problems.append(Problem("train.seed", f"{cfg.train.seed} + {last_rank} (the last rank) must stay below "
                                "2**32, NumPy's seed limit", where("train.seed")))
    return problems
