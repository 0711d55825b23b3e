"""Reading a config file: YAML 1.2 numbers (``1e-3`` is a float), duplicate keys are errors, and the
line of every dotted key is kept so that problems can point at it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from .problems import ConfigError, Problem


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
    """(the mapping in the file, the line of each dotted key); raises ConfigError naming file and line."""
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
        raise ConfigError([Problem("(config)", "the top level must be a mapping of sections "
                                               f"(job, data, train, ...), got {type(data).__name__}", fname)])
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    _walk_lines(node, "", lines, problems, fname)
    if problems:
        raise ConfigError(problems)
    return data, lines
