"""Reading a config file: YAML 1.2 numbers (``1e-3`` is a float, ``010`` is 10, ``2:00:00`` a string),
duplicate keys are errors, and the line of every dotted key is kept so that problems can point at it.

Bounded work on any input: the file is read up to a size limit, aliases may not expand the document
beyond :data:`MAX_NODES` nodes (an "alias bomb" is refused before it is expanded), deep nesting is an
error, not a crash."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from ranger_hvd.config.problems import ConfigError, Problem
from ranger_hvd.config.safety import read_text_problem

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
MAX_NODES = 50_000          # nodes of the document with every alias expanded
MAX_INT_DIGITS = 40


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2's core schema for numbers (PyYAML implements YAML 1.1: 010 is octal 8, 2:00:00 is 7200,
# 1_000 is 1000) and no timestamps (2024-01-01 stays a string)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in (INT_TAG, FLOAT_TAG, "tag:yaml.org,2002:timestamp")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(INT_TAG, re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    FLOAT_TAG, re.compile(r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    try:
        if len(digits) > MAX_INT_DIGITS:
            raise ValueError
        if digits[:2] == "0o":
            return sign * int(digits[2:], 8)
        if digits[:2] == "0x":
            return sign * int(digits[2:], 16)
        return sign * int(digits, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"not a YAML 1.2 integer of at most {MAX_INT_DIGITS} digits", node.start_mark) from None


_Loader.add_constructor(INT_TAG, _construct_int)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes of ``node`` with every alias expanded, counted once per distinct node (capped above
    MAX_NODES; a node that contains itself counts as too many)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_NODES + 1
    n = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            n += _expanded_size(child, memo)
            if n > MAX_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            n += _expanded_size(k, memo) + _expanded_size(v, memo)
            if n > MAX_NODES:
                break
    memo[key] = min(n, MAX_NODES + 1)
    return memo[key]


def _syntax_problem(exc: yaml.YAMLError, fname: str) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{fname}:{mark.line + 1}" if mark else fname
        col = f", column {mark.column + 1}" if mark else ""
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        return Problem("(config)", f"YAML syntax error at line {mark.line + 1 if mark else '?'}{col}: {what}", where)
    return Problem("(config)", f"YAML error: {exc}", fname)


def load_yaml(text: str, fname: str, what: str = "(config)") -> tuple[Any, Optional[yaml.Node]]:
    """(the data, its node tree) of one YAML document; raises ConfigError naming ``what`` and ``fname``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise ConfigError([Problem(what, f"more than {MAX_NODES} values, each alias (*name) counted "
                                             "as what it stands for: refused", fname)])
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        problem = _syntax_problem(exc, fname)
        problem.path = what
        raise ConfigError([problem]) from None
    except RecursionError:
        raise ConfigError([Problem(what, "nested too deeply", fname)]) from None
    finally:
        loader.dispose()
    return data, node


def yaml_scalar(text: str) -> Any:
    """Parses an override value the way the config file would (``4`` -> int, ``1e-3`` -> float); raises
    ConfigError."""
    return load_yaml(text, "override")[0] if text.strip() else ""


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
    text, why = read_text_problem(path, "config file", fname)
    if text is None:
        raise ConfigError([Problem("(config)", why)])
    data, node = load_yaml(text, fname)
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
