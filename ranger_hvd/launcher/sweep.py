"""``ranger-hvd sweep CONFIG KEY=V1,V2 ...``: one run per combination of values, then a comparison."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .config import ConfigError, Problem, parse_override


def split_values(text: str) -> list[str]:
    """Splits 'a,b,[c,d],"e,f"' at top-level commas (brackets, braces and quotes group)."""
    out, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [v.strip() for v in out]


@dataclass
class Axis:
    key: str
    values: list[str]   # the value texts, as the user wrote them


def parse_axes(items: list[str]) -> list[Axis]:
    axes: list[Axis] = []
    problems: list[Problem] = []
    seen = set()
    for item in items:
        try:
            key, _ = parse_override(item)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if key in seen:
            problems.append(Problem(key, "given twice; list all its values in one KEY=V1,V2", "sweep"))
            continue
        seen.add(key)
        values = split_values(item.split("=", 1)[1])
        if any(v == "" for v in values):
            problems.append(Problem(key, f"empty value in {item!r}", "sweep"))
            continue
        axes.append(Axis(key, values))
    if problems:
        raise ConfigError(problems)
    return axes


def combinations(axes: list[Axis]) -> list[list[str]]:
    """Each combination as a list of KEY=VALUE overrides, first axis varying slowest."""
    if not axes:
        return [[]]
    return [[f"{a.key}={v}" for a, v in zip(axes, combo)]
            for combo in itertools.product(*(a.values for a in axes))]
