"""What a config error is: a :class:`Problem` names a dotted path and what is allowed there, and a
:class:`ConfigError` carries every problem found, so the user can fix them all at once."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass
class Problem:
    path: str            # dotted path such as "train.epochs" or "cluster.hosts[1]"; "(config)": the whole file
    message: str
    where: str = ""      # "file.yaml:3", "override", "sweep" or ""

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.path}: {self.message}" if self.path else f"{prefix}{self.message}"


class ConfigError(ValueError):
    """Every problem of a config; ``str()`` lists them one per line.  A plain message is one problem
    that belongs to no single key (e.g. a checkpoint that does not match the config)."""

    def __init__(self, problems: list[Problem] | str):
        self.problems = [Problem("", problems)] if isinstance(problems, str) else problems
        super().__init__("\n".join(str(p) for p in self.problems))


def suggest(word: Any, choices: Iterable[Any]) -> str:
    """'; did you mean X?' for the nearest of ``choices``, or ''."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
