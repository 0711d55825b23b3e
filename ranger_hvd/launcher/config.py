"""The experiment config: a strict schema, YAML loading, dotted overrides and where each value came from.

Precedence is default < file < override.  Every problem is reported as a :class:`Problem` that names the
dotted path (``train.epochs``, ``cluster.hosts[1]``), says what is allowed, and suggests the nearest key
for a misspelling; :func:`load_config` raises :class:`ConfigError` holding all of them at once.

Relative paths (``cluster.hostfile``, ``cluster.ssh_identity_file``, ``data.dir``, ``output.dir``) are
taken relative to the current working directory and stored absolute in the resolved config.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ranger_hvd.core.options import RangerOptions

DEFAULT_ENTRY = "ranger_hvd.jobs"

_STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True)


class _Section(BaseModel):
    model_config = _STRICT


# --------------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------------
class JobConfig(_Section):
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                description="run name (directory under output.dir); default MODEL-DATASET")
    backend: Literal["torch", "tensorflow"] = "torch"
    model: Literal["cnn", "rnn", "gan"] = "cnn"
    # Advanced, mainly for tests: the Python module each rank runs (``python -m ENTRY --config ...``).
    entry: str = Field(DEFAULT_ENTRY, pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class DataConfig(_Section):
    dataset: Literal["digits", "mnist", "synthetic"] = "digits"
    dir: Optional[str] = Field(None, min_length=1, description="directory holding MNIST (dataset: mnist only)")
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out share (digits, synthetic)")
    synthetic_samples: Optional[int] = Field(None, ge=1, description="samples (dataset: synthetic only; 2048)")


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0.0)
    seed: int = Field(0, ge=0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="the optimizer's (0 when Ranger has momentum)")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps (null: no cap)")
    log_every: int = Field(1, ge=1, description="write a metrics line every N steps")
    checkpoint: bool = Field(True, description="every rank saves RUN_DIR/checkpoints/rank{r}.pt after each "
                                               "epoch (torch jobs; needed by launch --resume)")


# compression: ``type`` plus every RangerOptions field, with RangerOptions' own constraints.  The fields
# default to None here so that we know which ones the user set; RangerOptions fills in its defaults.
RANGER_FIELDS = tuple(RangerOptions.model_fields)
_compression_fields: dict[str, Any] = {"type": (Literal["none", "fp16", "ranger"], "ranger")}
for _name, _info in RangerOptions.model_fields.items():
    _fi = copy.copy(_info)
    _fi.default = None
    _compression_fields[_name] = (Optional[_info.annotation], _fi)
CompressionConfig = create_model("CompressionConfig", __base__=_Section, **_compression_fields)


class ClusterConfig(_Section):
    np: Optional[int] = Field(None, ge=1, description="number of ranks; default: the total slots")
    hosts: Optional[Union[list[str], str]] = Field(None, description="host:slots entries (or one comma-separated string)")
    hostfile: Optional[str] = Field(None, min_length=1, description="file of 'host slots=N' lines")
    controller: Literal["gloo", "mpi"] = "gloo"
    ssh_port: Optional[int] = Field(None, ge=1, le=65535)
    ssh_identity_file: Optional[str] = Field(None, min_length=1)
    network_interfaces: Optional[Union[list[str], str]] = None
    start_timeout: Optional[int] = Field(None, ge=1, description="seconds horovodrun waits for the ranks to start")
    env: list[str] = Field(default_factory=list, description="NAME (forwarded) or NAME=VALUE (set) entries")
    mpi_args: Optional[str] = Field(None, min_length=1, description="extra mpirun arguments (controller: mpi)")


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL")


class HorovodConfig(_Section):
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
    stall_check: Optional[bool] = None
    stall_check_warning_time_seconds: Optional[int] = Field(None, ge=1)
    stall_check_shutdown_time_seconds: Optional[int] = Field(None, ge=0)
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


class OutputConfig(_Section):
    dir: str = Field("runs", min_length=1)


class Config(_Section):
    job: JobConfig = Field(default_factory=JobConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)  # type: ignore[valid-type]
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    horovod: HorovodConfig = Field(default_factory=HorovodConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    path: str            # dotted path, or "(config)" for the whole file
    message: str
    where: str = ""      # "file.yaml:3" or "override" or ""

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.path}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def suggest(word: str, choices) -> str:
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""


# --------------------------------------------------------------------------------------------------
# YAML loading: duplicate keys are errors, 1e-3 is a float (YAML 1.2), and each key's line is kept
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_scalar(text: str) -> Any:
    """Parses an override value the way the config file would (``4`` -> int, ``1e-3`` -> float)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def _walk_lines(node, prefix: str, lines: dict[str, int], problems: list[Problem], fname: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(Problem(path, f"duplicate key (first given on line {seen[key]})", f"{fname}:{line}"))
            seen[key] = line
            lines[path] = line
            _walk_lines(value_node, path, lines, problems, fname)


def read_yaml(path: Path, display: Optional[str] = None) -> tuple[dict, dict[str, int]]:
    """Returns (data, line of each dotted key); raises ConfigError naming the file and line."""
    fname = display or str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([Problem("(config)", f"config file not found: {fname}")]) from None
    except OSError as exc:
        raise ConfigError([Problem("(config)", f"cannot read config file {fname}: {exc.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{fname}:{mark.line + 1}" if mark else fname
        col = f", column {mark.column + 1}" if mark else ""
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError([Problem("(config)", f"YAML syntax error at line {mark.line + 1 if mark else '?'}{col}: {what}",
                                   where)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("(config)", f"YAML error: {exc}", fname)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("(config)", f"the top level must be a mapping of sections "
                                               f"({', '.join(Config.model_fields)}), got {type(data).__name__}",
                                   fname)])
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    _walk_lines(node, "", lines, problems, fname)
    if problems:
        raise ConfigError(problems)
    return data, lines


# --------------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------------
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([Problem(text, "an override must look like KEY=VALUE (e.g. compression.density=0.001)",
                                   "override")])
    key, value = text.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError([Problem(key or "(empty)", "an override key must be a dotted path such as train.epochs",
                                   "override")])
    try:
        return key, yaml_scalar(value)
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(key, f"cannot parse value {value!r} as YAML: {exc}", "override")]) from None


def apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([Problem(".".join(parts[: i + 1]),
                                       f"is a {type(nxt).__name__}, so '{key}' cannot be set inside it", "override")])
        node = nxt
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------------
@dataclass
class Resolved:
    config: Config
    sources: dict[str, str]                      # dotted path -> "default" | "file (x.yaml:3)" | "override"
    hosts: list[tuple[str, int]]                 # resolved host:slots (from hosts, hostfile or default)
    np: int
    config_path: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_slots(self) -> int:
        return sum(s for _, s in self.hosts)

    def resolved_dict(self) -> dict:
        """The config to write as RUN_DIR/config.yaml: every value explicit, paths absolute, np set."""
        d = self.config.model_dump(mode="json")
        d["cluster"]["np"] = self.np
        if d["cluster"]["hostfile"] is None:
            d["cluster"]["hosts"] = [f"{h}:{s}" for h, s in self.hosts]
        if d["job"]["name"] is None:
            d["job"]["name"] = self.job_name
        # Ranger options explicit (RangerOptions' defaults filled in) for type ranger, absent otherwise
        opts = self.ranger_options
        for k in RANGER_FIELDS:
            d["compression"].pop(k, None)
        if opts is not None:
            d["compression"].update(opts.model_dump(mode="json"))
        if isinstance(d["cluster"]["network_interfaces"], str):
            d["cluster"]["network_interfaces"] = split_list(d["cluster"]["network_interfaces"])
        return d

    @property
    def job_name(self) -> str:
        return self.config.job.name or f"{self.config.job.model}-{self.config.data.dataset}"

    @property
    def ranger_options(self) -> Optional[RangerOptions]:
        c = self.config.compression
        if c.type != "ranger":
            return None
        return RangerOptions(**{k: getattr(c, k) for k in RANGER_FIELDS if getattr(c, k) is not None})


def split_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = Config
    for part in loc:
        if not isinstance(part, str):
            return None
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return None
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _fmt_loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "function-after[...]") or "[" in str(part):
            continue  # union member tags that pydantic adds to a location
        else:
            out += f".{part}" if out else str(part)
    return out or "(config)"


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Where:
    def __init__(self, fname: str, lines: dict[str, int], override_keys: set[str]):
        self.fname, self.lines, self.override_keys = fname, lines, override_keys

    def __call__(self, path: str) -> str:
        base = re.sub(r"\[\d+\]", "", path)
        probe = base
        if any(k.startswith(base + ".") for k in self.override_keys):
            return "override"
        while probe:
            if probe in self.override_keys:
                return "override"
            if probe in self.lines:
                return f"{self.fname}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return ""


def _pydantic_problems(exc: ValidationError, where: _Where) -> list[Problem]:
    problems: list[Problem] = []
    seen_paths: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        typ = err["type"]
        path = _fmt_loc(loc)
        if typ == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            key = loc[-1]
            section = _fmt_loc(loc[:-1]) if loc[:-1] else "the top level"
            msg = (f"unknown key '{key}' in {section}{suggest(key, allowed)} "
                   f"(allowed: {', '.join(allowed)})")
        elif typ == "missing":
            msg = "required"
        elif typ == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            choices = re.findall(r"'([^']*)'", expected)
            msg = f"must be one of {', '.join(choices)} (got {_short(err['input'])}){suggest(err['input'], choices)}"
        elif typ in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a mapping of keys, got {_short(err['input'])}"
        else:
            msg = f"{err['msg'].replace('Input should be', 'must be')} (got {_short(err.get('input'))})"
        # a Union (hosts: list or string) reports each member; keep the first per path
        if path in seen_paths and typ not in ("extra_forbidden",):
            continue
        seen_paths.add(path)
        problems.append(Problem(path, msg, where(path)))
    return problems


_HOST_RE = re.compile(r"^[\w.-]+$")


def _check_host_entry(entry: Any, path: str, where: str, problems: list[Problem]) -> Optional[tuple[str, int]]:
    if not isinstance(entry, str) or ":" not in entry:
        problems.append(Problem(path, f"must be 'host:slots' such as 'localhost:2' (got {_short(entry)})", where))
        return None
    host, _, slots = entry.strip().rpartition(":")
    if not _HOST_RE.match(host):
        problems.append(Problem(path, f"bad host name {host!r}: letters, digits, '.', '-', '_' only", where))
        return None
    if not slots.isdigit() or int(slots) < 1:
        problems.append(Problem(path, f"slots must be a positive integer (got {slots!r} in {entry!r})", where))
        return None
    return host, int(slots)


def parse_hostfile(path: Path, cfg_path: str, where: str, problems: list[Problem]) -> list[tuple[str, int]]:
    """Reads 'host slots=N' lines ('#' comments and blank lines allowed); problems name FILE:LINE."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        problems.append(Problem(cfg_path, f"hostfile not found: {path}", where))
        return []
    except OSError as exc:
        problems.append(Problem(cfg_path, f"cannot read hostfile {path}: {exc.strerror}", where))
        return []
    hosts: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\S+)(?:\s+slots\s*=\s*(\S+))?$", line)
        if not m:
            problems.append(Problem(cfg_path, f"{path}:{n}: expected 'HOST slots=N', got {raw.strip()!r}", where))
            continue
        host, slots = m.group(1), m.group(2)
        if not _HOST_RE.match(host):
            problems.append(Problem(cfg_path, f"{path}:{n}: bad host name {host!r}", where))
            continue
        if slots is None:
            problems.append(Problem(cfg_path, f"{path}:{n}: missing 'slots=N' for host {host!r}", where))
            continue
        if not slots.isdigit() or int(slots) < 1:
            problems.append(Problem(cfg_path, f"{path}:{n}: slots must be a positive integer (got {slots!r})", where))
            continue
        if host in first_line:
            problems.append(Problem(cfg_path, f"{path}:{n}: duplicate host {host!r} (first on line {first_line[host]})",
                                    where))
            continue
        first_line[host] = n
        hosts.append((host, int(slots)))
    if not hosts and not problems:
        problems.append(Problem(cfg_path, f"{path}: no hosts in hostfile", where))
    return hosts


_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _semantic_checks(cfg: Config, where: _Where, cwd: Path) -> tuple[list[Problem], list[tuple[str, int]], int]:
    problems: list[Problem] = []
    cl = cfg.cluster

    # compression: RangerOptions fields only with type ranger, and RangerOptions' own cross-checks
    comp = cfg.compression
    set_ranger = [k for k in RANGER_FIELDS if getattr(comp, k) is not None]
    if comp.type != "ranger":
        for k in set_ranger:
            p = f"compression.{k}"
            problems.append(Problem(p, f"only allowed when compression.type is 'ranger' (type is '{comp.type}')",
                                    where(p)))
    else:
        try:
            RangerOptions(**{k: getattr(comp, k) for k in set_ranger})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                msg = str(err["msg"]).removeprefix("Value error, ")
                m = re.match(r"(\w+) \(", msg)
                p = f"compression.{m.group(1)}" if m and m.group(1) in RANGER_FIELDS else "compression"
                problems.append(Problem(p, msg, where(p)))

    # data
    if cfg.data.dataset == "mnist" and not cfg.data.dir:
        problems.append(Problem("data.dir", "required when data.dataset is 'mnist' (the directory holding MNIST)",
                                where("data.dataset")))
    if cfg.data.dataset != "mnist" and cfg.data.dir:
        problems.append(Problem("data.dir", f"only used with data.dataset 'mnist' (dataset is '{cfg.data.dataset}')",
                                where("data.dir")))

    if cfg.data.dataset != "synthetic" and cfg.data.synthetic_samples is not None:
        problems.append(Problem("data.synthetic_samples", "only used with data.dataset 'synthetic' "
                                f"(dataset is '{cfg.data.dataset}')", where("data.synthetic_samples")))

    # hosts
    hosts: list[tuple[str, int]] = []
    if cl.hosts is not None and cl.hostfile is not None:
        problems.append(Problem("cluster.hostfile", "give cluster.hosts or cluster.hostfile, never both "
                                "(set the other to null)", where("cluster.hostfile")))
    elif cl.hostfile is not None:
        hosts = parse_hostfile(_path(cwd, cl.hostfile), "cluster.hostfile", where("cluster.hostfile"), problems)
    elif cl.hosts is not None:
        entries = split_list(cl.hosts)
        if not entries:
            problems.append(Problem("cluster.hosts", "must list at least one 'host:slots' entry", where("cluster.hosts")))
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            p = f"cluster.hosts[{i}]"
            got = _check_host_entry(entry, p, where(p), problems)
            if got is None:
                continue
            if got[0] in seen:
                problems.append(Problem(p, f"duplicate host {got[0]!r} (also cluster.hosts[{seen[got[0]]}])", where(p)))
                continue
            seen[got[0]] = i
            hosts.append(got)
    else:
        hosts = [("localhost", cl.np or 2)]

    total = sum(s for _, s in hosts)
    np_ = cl.np if cl.np is not None else total
    if hosts and cl.np is not None and cl.np > total:
        problems.append(Problem("cluster.np", f"{cl.np} ranks do not fit in the {total} slots of the hosts "
                                "(np may not exceed the total slots)", where("cluster.np")))

    if cl.ssh_identity_file is not None and not _path(cwd, cl.ssh_identity_file).is_file():
        problems.append(Problem("cluster.ssh_identity_file", f"file not found: {cl.ssh_identity_file}",
                                where("cluster.ssh_identity_file")))
    if cl.network_interfaces is not None:
        nics = split_list(cl.network_interfaces)
        if not nics:
            problems.append(Problem("cluster.network_interfaces", "must name at least one interface",
                                    where("cluster.network_interfaces")))
        for i, nic in enumerate(nics):
            if not re.match(r"^[\w.:@-]+$", nic):
                p = f"cluster.network_interfaces[{i}]"
                problems.append(Problem(p, f"bad interface name {nic!r}", where(p)))
    names: dict[str, int] = {}
    for i, entry in enumerate(cl.env):
        p = f"cluster.env[{i}]"
        name = entry.split("=", 1)[0]
        if not _ENV_RE.match(name):
            problems.append(Problem(p, f"must be an environment variable NAME or NAME=VALUE (got {entry!r})", where(p)))
        elif name in names:
            problems.append(Problem(p, f"{name} is listed twice (also cluster.env[{names[name]}])", where(p)))
        else:
            names[name] = i
    if cl.mpi_args is not None and cl.controller != "mpi":
        problems.append(Problem("cluster.mpi_args", "only allowed with cluster.controller 'mpi'",
                                where("cluster.mpi_args")))

    hv = cfg.horovod
    if hv.timeline_mark_cycles and not hv.timeline:
        problems.append(Problem("horovod.timeline_mark_cycles", "needs horovod.timeline: true",
                                where("horovod.timeline_mark_cycles")))
    for k in ("autotune_log", "autotune_warmup_samples", "autotune_steps_per_sample",
              "autotune_bayes_opt_max_samples", "autotune_gaussian_process_noise"):
        v = getattr(hv, k)
        if v not in (None, False) and not hv.autotune:
            problems.append(Problem(f"horovod.{k}", "only allowed with horovod.autotune: true", where(f"horovod.{k}")))
    for k in ("stall_check_warning_time_seconds", "stall_check_shutdown_time_seconds"):
        if getattr(hv, k) is not None and hv.stall_check is False:
            problems.append(Problem(f"horovod.{k}", "has no effect with horovod.stall_check: false",
                                    where(f"horovod.{k}")))
    if hv.mpi_threads_disable is not None and cl.controller != "mpi":
        problems.append(Problem("horovod.mpi_threads_disable", "only applies with cluster.controller 'mpi'",
                                where("horovod.mpi_threads_disable")))
    return problems, hosts, np_


def _path(cwd: Path, p: str) -> Path:
    """A config path: '~' expanded, relative to the working directory."""
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else cwd / q


def _absolutize(cfg: Config, cwd: Path) -> Config:
    def ab(p):
        return None if p is None else os.path.normpath(str(_path(cwd, p)))

    upd = cfg.model_copy(deep=True)
    upd.cluster.hostfile = ab(cfg.cluster.hostfile)
    upd.cluster.ssh_identity_file = ab(cfg.cluster.ssh_identity_file)
    upd.data.dir = ab(cfg.data.dir)
    upd.output.dir = ab(cfg.output.dir)
    return upd


def _leaf_paths(model: BaseModel, prefix: str = "") -> list[str]:
    out = []
    for name, f in type(model).model_fields.items():
        path = f"{prefix}{name}"
        val = getattr(model, name)
        if isinstance(val, BaseModel):
            out.extend(_leaf_paths(val, path + "."))
        else:
            out.append(path)
    return out


def build(data: dict, *, fname: str = "", lines: Optional[dict[str, int]] = None,
          override_keys: Optional[set[str]] = None, cwd: Optional[Path] = None) -> tuple[Config, list[tuple[str, int]], int, _Where]:
    cwd = cwd or Path.cwd()
    where = _Where(fname, lines or {}, override_keys or set())
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc, where)) from None
    problems, hosts, np_ = _semantic_checks(cfg, where, cwd)
    if problems:
        raise ConfigError(problems)
    return _absolutize(cfg, cwd), hosts, np_, where


def load_config(path: Union[str, Path, None], overrides: list[str] = (), *, cwd: Optional[Path] = None) -> Resolved:
    """Reads CONFIG, applies KEY=VALUE overrides, validates everything; raises ConfigError."""
    cwd = Path(cwd or Path.cwd())
    if path is not None:
        cpath = Path(path)
        data, lines = read_yaml(cpath if cpath.is_absolute() else cwd / cpath, str(path))
        fname = str(path)
    else:
        data, lines, fname = {}, {}, ""
    parsed = []
    problems: list[Problem] = []
    for text in overrides:
        try:
            parsed.append(parse_override(text))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    override_keys = set()
    for key, value in parsed:
        apply_override(data, key, value)
        override_keys.add(key)
        # an override replaces the whole subtree, so file lines below it no longer apply
        for k in [k for k in lines if k.startswith(key + ".")]:
            del lines[k]
    cfg, hosts, np_, where = build(data, fname=fname, lines=lines, override_keys=override_keys, cwd=cwd)

    sources: dict[str, str] = {}
    for leaf in _leaf_paths(cfg):
        w = where(leaf)
        if w == "override":
            sources[leaf] = "override"
        elif w and leaf in lines:
            sources[leaf] = f"file ({w})"
        elif w and any(k in override_keys for k in _prefixes(leaf)):
            sources[leaf] = "override"
        else:
            sources[leaf] = "default"
    res = Resolved(config=cfg, sources=sources, hosts=hosts, np=np_,
                   config_path=Path(path) if path else None, overrides=list(overrides))
    if cfg.cluster.np is None:
        sources["cluster.np"] = "default (total slots)"
    if cfg.cluster.hosts is None and cfg.cluster.hostfile is None:
        sources["cluster.hosts"] = "default (localhost:np)"
    if cfg.job.name is None:
        sources["job.name"] = "default (MODEL-DATASET)"
    for entry in cfg.cluster.env:
        if "=" not in entry and entry not in os.environ:
            res.warnings.append(f"cluster.env: {entry} is not set in this environment, so the ranks will not get it")
    return res


def _prefixes(path: str):
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def show_lines(res: Resolved) -> list[tuple[str, str, str]]:
    """(dotted path, value as YAML, source) for every leaf of the resolved config."""
    resolved = res.resolved_dict()
    out = []
    for leaf in _leaf_paths(res.config):
        if leaf.startswith("compression.") and leaf != "compression.type" and res.ranger_options is None:
            continue  # Ranger options mean nothing for this compression type
        node: Any = resolved
        for part in leaf.split("."):
            node = node[part]
        text = yaml.safe_dump(node, default_flow_style=True, width=10_000).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.removesuffix("...").strip()
        out.append((leaf, text, res.sources.get(leaf, "default")))
    return out
