"""``KEY=VALUE`` overrides: a dotted key and a YAML value, applied on top of the file's mapping."""

from __future__ import annotations

import re
from typing import Any

from ranger_hvd.formatting import shown
from ranger_hvd.config.problems import ConfigError, Problem, short_repr
from ranger_hvd.config.yamlfile import yaml_scalar

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError([Problem(shown(text), "an override must look like KEY=VALUE (e.g. compression.density=0.001)",
                                   "override")])
    key, value = text.split("=", 1)
    key = key.strip()
    if not _KEY_RE.fullmatch(key):
        raise ConfigError([Problem(shown(key) if key else "(empty)",
                                   "an override key must be a dotted path such as train.epochs", "override")])
    try:
        return key, yaml_scalar(value)
    except ConfigError as exc:
        raise ConfigError([Problem(key, f"cannot parse value {short_repr(value)} as YAML: {exc.problems[0].message}",
                                   "override")]) from None


def apply_override(data: dict, key: str, value: Any) -> None:
    """Sets ``data[a][b][c] = value`` for key ``a.b.c``, creating missing mappings on the way."""
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


def parse_overrides(texts: list[str]) -> list[tuple[str, Any]]:
    """Every override parsed; all malformed ones reported together."""
    parsed, problems = [], []
    for text in texts:
        try:
            parsed.append(parse_override(text))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return parsed
