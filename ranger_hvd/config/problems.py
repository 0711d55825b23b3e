"""What a config error is: a :class:`Problem` names a dotted path and what is allowed there, and a
:class:`ConfigError` carries every problem found, so the user can fix them all at once."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from ranger_hvd.formatting import clip, short_repr

__all__ = ["ConfigError", "Problem", "clip", "problem_lines", "short_repr", "suggest"]

MAX_MESSAGE = 2000
MAX_SHOWN = 50      # problems listed one per line; the rest are counted


@dataclass
class Problem:
    path: str            # dotted path such as "train.epochs" or "cluster.hosts[1]"; "(config)": the whole file
    message: str
    where: str = ""      # "file.yaml:3", "override", "sweep" or ""

    def __str__(self) -> str:
        # bounded whatever the input: a path or message built from a huge key or value is cut short
        prefix = f"{clip(self.where, 300)}: " if self.where else ""
        message = clip(self.message, MAX_MESSAGE)
        return f"{prefix}{clip(self.path, 300)}: {message}" if self.path else f"{prefix}{message}"


class ConfigError(ValueError):
    """Every problem of a config; ``str()`` lists them one per line.  A plain message is one problem
    that belongs to no single key (e.g. a checkpoint that does not match the config)."""

    def __init__(self, problems: list[Problem] | str):
        self.problems = [Problem("", problems)] if isinstance(problems, str) else problems
        super().__init__("\n".join(problem_lines(self.problems)))


def suggest(word: Any, choices: Iterable[Any]) -> str:
    """'; did you mean X?' for the nearest of ``choices``, or ''."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{near[0]}'?" if near else ""


def problem_lines(problems: list[Problem]) -> list[str]:
    """One line per problem, at most MAX_SHOWN of them, then how many more there are."""
    lines = [str(p) for p in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"... and {len(problems) - MAX_SHOWN} more")
    return lines
