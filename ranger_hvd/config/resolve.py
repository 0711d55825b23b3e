"""From a config file and overrides to a validated, resolved config (precedence: default < file <
override), and back from a run directory's ``config.yaml`` to the models the jobs read.

Relative paths (``cluster.hostfile``, ``cluster.ssh_identity_file``,
``cluster.ssh_known_hosts_file``, ``data.dir``, ``output.dir``) are
taken relative to the working directory and stored absolute in the resolved config.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ValidationError

from ranger_hvd.config.slurm import SlurmOptions, tasks_per_node
from ranger_hvd.config.checks import SECTION_CHECKS, config_path, path_problems, resolve_hosts
from ranger_hvd.config.hosts import split_list
from ranger_hvd.config.overrides import apply_override, parse_overrides
from ranger_hvd.config.problems import ConfigError, Problem
from ranger_hvd.config.safety import check_raw
from ranger_hvd.config.schema import GROUPS, Config, HorovodSection
from ranger_hvd.config.sources import Sources
from ranger_hvd.config.translate import problems_from
from ranger_hvd.config.user_command import drop_job_only, resolve_command
from ranger_hvd.config.yamlfile import read_yaml


@dataclass
class Inactive:
    """An option of a config group member other than the selected one (see groups.py)."""

    path: str      # e.g. "compression.density"
    value: Any
    reason: str    # e.g. "compression.type is 'none'"


@dataclass
class Resolved:
    config: Config
    sources: dict[str, str]                      # dotted path -> "default" | "file (x.yaml:3)" | "override"
    hosts: list[tuple[str, int]]                 # resolved host:slots (from hosts, hostfile or default)
    np: int
    config_path: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inactive: list[Inactive] = field(default_factory=list)

    @property
    def job_name(self) -> str:
        return self.config.job_name

    def resolved_dict(self) -> dict:
        """The config to write as RUN_DIR/config.yaml: every value explicit, paths absolute, np and hosts
        set, inactive options left out."""
        d = plain_dict(self.config)
        d["cluster"]["np"] = self.np
        if self.config.cluster.scheduler == "slurm":
            slurm = self.config.cluster.slurm or SlurmOptions()
            d["cluster"]["slurm"] = slurm.model_dump(mode="json")
            d["cluster"]["slurm"]["ntasks_per_node"] = tasks_per_node(slurm, self.np)
        elif d["cluster"]["hostfile"] is None and self.hosts:   # none: the elastic discovery script lists them
            d["cluster"]["hosts"] = [f"{h}:{s}" for h, s in self.hosts]
        d["job"]["name"] = self.job_name
        if self.config.job.command:
            d = drop_job_only(d)
        if isinstance(d["cluster"]["network_interfaces"], str):
            d["cluster"]["network_interfaces"] = split_list(d["cluster"]["network_interfaces"])
        return d


def plain_dict(cfg: Config) -> dict:
    """The config as plain data, each group's selector first."""
    d = cfg.model_dump(mode="json")
    for g in GROUPS:
        d[g.section] = {g.key: d[g.section][g.key], **d[g.section]}
    return d


def leaf_paths(model: BaseModel, prefix: str = "") -> list[str]:
    out = []
    names = list(type(model).model_fields)
    for g in GROUPS:   # the selector first, as in plain_dict
        if prefix == f"{g.section}." and g.key in names:
            names.remove(g.key)
            names.insert(0, g.key)
    for name in names:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        out.extend(leaf_paths(value, path + ".") if isinstance(value, BaseModel) else [path])
    return out


def _split_groups(data: dict, where: Sources) -> tuple[dict, list[Inactive], list[Problem]]:
    """The data with each group's inactive options taken out; those options checked by their owners."""
    data = dict(data)
    inactive: list[Inactive] = []
    problems: list[Problem] = []
    for g in GROUPS:
        raw = data.get(g.section)
        if not isinstance(raw, dict):
            continue
        data[g.section], others = g.split(raw)
        if not others:
            continue
        reason = f"{g.section}.{g.key} is {g.selected(raw)!r}"
        for member in g.members:
            mine = {k: v for k, v in others.items() if member in g.owners(k)}
            if not mine:
                continue
            try:
                g.members[member].model_validate({g.key: member, **mine})
            except ValidationError as exc:
                problems += problems_from(exc, where, prefix=(g.section, member),
                                          note=f" (inactive here: {reason})")
        inactive += [Inactive(f"{g.section}.{k}", v, reason) for k, v in others.items()]
    return data, inactive, problems


def validate(data: dict, where: Sources) -> tuple[Config, list[Inactive]]:
    """The schema, config groups and the file-free checks; raises ConfigError with every problem."""
    check_raw(data, where)    # control characters, lengths, integer range: before anything reads a value
    data, inactive, problems = _split_groups(data, where)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems + problems_from(exc, where)) from None
    inactive += _horovod_unused(cfg)
    for check in SECTION_CHECKS:
        problems += check(cfg, where)
    if problems:
        raise ConfigError(problems)
    return cfg, inactive


def _horovod_unused(cfg: Config) -> list[Inactive]:
    """Under cluster.runner 'torchrun' no Horovod runs: the horovod section's values are set aside as
    inactive (back to their defaults, left out of the run's config.yaml), so that a shipped config's
    tunables do not stop its DDP twin; load_config warns about each one."""
    if cfg.cluster.runner != "torchrun":
        return []
    defaults = HorovodSection()
    unused = [Inactive(f"horovod.{key}", getattr(cfg.horovod, key), "no Horovod under cluster.runner 'torchrun'")
              for key in HorovodSection.model_fields if getattr(cfg.horovod, key) != getattr(defaults, key)]
    cfg.horovod = defaults
    return unused


def _absolutize(cfg: Config, cwd: Path) -> Config:
    def absolute(p):
        return None if p is None else os.path.normpath(str(config_path(cwd, p)))

    out = cfg.model_copy(deep=True)
    out.cluster.hostfile = absolute(cfg.cluster.hostfile)
    out.cluster.ssh_identity_file = absolute(cfg.cluster.ssh_identity_file)
    out.cluster.ssh_known_hosts_file = absolute(cfg.cluster.ssh_known_hosts_file)
    if out.cluster.elastic is not None:
        out.cluster.elastic.discovery_script = absolute(cfg.cluster.elastic.discovery_script)
    out.data.dir = absolute(cfg.data.dir)
    out.output.dir = absolute(cfg.output.dir)
    return out


def load_config(path: Union[str, Path, None], overrides: list[str] = (), *, cwd: Optional[Path] = None) -> Resolved:
    """Reads CONFIG, applies KEY=VALUE overrides, validates everything; raises ConfigError."""
    cwd = Path(cwd or Path.cwd())
    data, lines, fname = {}, {}, ""
    if path is not None:
        cpath = Path(path)
        data, lines = read_yaml(cpath if cpath.is_absolute() else cwd / cpath, str(path))
        fname = str(path)
    parsed = parse_overrides(list(overrides))
    for key, value in parsed:
        apply_override(data, key, value)
    where = Sources(fname, lines, [k for k, _ in parsed])
    cfg, inactive = validate(data, where)
    hosts, np_, problems = resolve_hosts(cfg, where, cwd)
    if problems:
        raise ConfigError(problems)
    cfg = _absolutize(cfg, cwd)
    problems = path_problems(cfg, np_, where)
    if cfg.job.command:   # the script is relative to the config file's folder
        base = (cpath if cpath.is_absolute() else cwd / cpath).parent if path is not None else cwd
        cfg.job.command, more = resolve_command(cfg.job.command, base, where)
        problems += more
    if problems:
        raise ConfigError(problems)

    sources = {leaf: where.describe(leaf) for leaf in leaf_paths(cfg)}
    warnings = _keep_momentum(cfg, inactive, where, sources)
    if cfg.cluster.np is None:
        sources["cluster.np"] = "default (total slots)"
    if cfg.cluster.hosts is None and cfg.cluster.hostfile is None:
        sources["cluster.hosts"] = ("from the Slurm allocation" if cfg.cluster.scheduler == "slurm"
                                    else "default (localhost:np)")
    if cfg.job.name is None:
        sources["job.name"] = "default (the script's name)" if cfg.job.command else "default (MODEL-DATASET)"
    for opt in inactive:
        sources[opt.path] = where.describe(opt.path)
    res = Resolved(config=cfg, sources=sources, hosts=hosts, np=np_, config_path=Path(path) if path else None,
                   overrides=list(overrides), inactive=inactive, warnings=warnings)
    for opt in inactive:
        if sources[opt.path] == "override":
            res.warnings.append(f"{opt.path}={opt.value} has no effect: {opt.reason}")
    unused = [o for o in inactive if o.path.startswith("horovod.") and sources[o.path] != "override"]
    if unused:
        res.warnings.append(", ".join(f"{o.path}={o.value}" for o in unused) + " have no effect: "
                            f"{unused[0].reason}; left out of the run's config")
    for entry in cfg.cluster.env:
        if "=" not in entry and entry not in os.environ:
            res.warnings.append(f"cluster.env: {entry} is not set in this environment, so the ranks will not get it")
    return res


def _keep_momentum(cfg: Config, inactive: list[Inactive], where: Sources, sources: dict[str, str]) -> list[str]:
    """One momentum across compression types: a config whose momentum lives in the compressor
    (``compression.momentum: m``, ``train.momentum: 0``) switched to a type without one (``none``,
    ``fp16``) gives the optimizer that momentum, so the dense twin trains with the same momentum (for a
    dense exchange, momentum before the average equals momentum after it).  An override of
    ``train.momentum`` wins.  A user command's optimizer is in its script: a warning says it is dropped."""
    moved = next((o for o in inactive if o.path == "compression.momentum"
                  and isinstance(o.value, (int, float)) and o.value > 0), None)
    if moved is None or cfg.compression.compressor_momentum > 0:
        return []
    if cfg.job.command:
        return [f"compression.momentum={moved.value} is inactive ({moved.reason}): your script's optimizer runs "
                "without it unless it sets its own momentum"]
    if where("train.momentum") == "override" or cfg.train.momentum:
        return []
    cfg.train.momentum = float(moved.value)
    sources["train.momentum"] = (f"compression.momentum ({where.describe('compression.momentum')}), applied by "
                                 f"the optimizer as {moved.reason}")
    return []


def job_config(data: dict, fname: str = "", lines: Optional[dict[str, int]] = None) -> Config:
    """The models a job reads, from a resolved config as plain data (schema and file-free checks only:
    a rank need not see the launcher's hostfile or ssh key)."""
    cfg, _ = validate(copy.deepcopy(data), Sources(fname, lines))
    return cfg


def read_run_config(path: Union[str, Path]) -> Config:
    """:func:`job_config` of a file such as RUN_DIR/config.yaml; problems name its lines."""
    data, lines = read_yaml(Path(path))
    return job_config(data, str(path), lines)
