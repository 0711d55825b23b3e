"""pydantic's validation errors, said in the config's terms: dotted paths, what is allowed, and the
nearest key for a misspelling."""

from __future__ import annotations

import re
from typing import Callable

from pydantic import ValidationError

from ranger_hvd.config.groups import UNKNOWN_MEMBER
from ranger_hvd.config.problems import Problem, short_repr, suggest
from ranger_hvd.config.schema import GROUPS, section_model


def dotted(loc: tuple) -> str:
    """('cluster', 'hosts', 1) -> 'cluster.hosts[1]', leaving out the tags pydantic adds for unions."""
    out = ""
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        group = next((g for g in GROUPS if i == 0 and part == g.section), None)
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "function-after[...]") or "[" in str(part):
            pass   # a union member's tag (hosts: list or string)
        else:
            out += f".{part}" if out else str(part)
        if group is not None and i + 1 < len(parts) and parts[i + 1] in group.members:
            i += 1   # the config group's member tag
        i += 1
    return out or "(config)"


def _cross_field_path(prefix: str, message: str, fields) -> str:
    """A model-level check names its field first ("warmup_start_density (0.1) must ..."): point at it."""
    m = re.match(r"(\w+) \(", message)
    return f"{prefix}.{m.group(1)}" if prefix and m and m.group(1) in fields else prefix or "(config)"


def problems_from(exc: ValidationError, where: Callable[[str], str], prefix: tuple = (),
                  note: str = "") -> list[Problem]:
    """One Problem per error, located by ``where`` (see sources.Sources); ``prefix`` is prepended to each
    location (errors of a section validated on its own) and ``note`` appended to each message."""
    problems: list[Problem] = []
    seen_paths: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        typ = err["type"]
        path = dotted(loc)
        if typ == "extra_forbidden":
            parent = section_model(loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            group = next((g for g in GROUPS if loc[:1] == (g.section,)), None)
            near = allowed + (group.all_options() if group else [])
            key = loc[-1]
            section = dotted(loc[:-1]) if loc[:-1] else "the top level"
            msg = f"unknown key '{key}' in {section}{suggest(key, near)} (allowed: {', '.join(allowed)})"
            if group is not None and len(loc) == 3:
                own = group.options(loc[1])
                others = [k for k in group.all_options() if k not in own]
                msg = (f"unknown key '{key}' in {section}{suggest(key, near)} ({group.section}.{group.key} "
                       f"'{loc[1]}' takes {', '.join(own) or 'no options'}"
                       + (f"; other types take {', '.join(others)}" if others else "") + ")")
        elif typ == UNKNOWN_MEMBER:
            choices = err["ctx"]["choices"].split(", ")
            raw = err["input"]
            group = next(g for g in GROUPS if loc[:1] == (g.section,))
            if not isinstance(raw, dict):
                path, msg = dotted(loc), f"must be a mapping of keys, got {short_repr(raw)}"
            else:
                got = raw.get(group.key)
                path = f"{dotted(loc)}.{group.key}"
                msg = f"must be one of {', '.join(choices)} (got {short_repr(got)}){suggest(got, choices)}"
        elif typ == "missing":
            msg = "required"
        elif typ == "literal_error":
            choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
            msg = f"must be one of {', '.join(choices)} (got {short_repr(err['input'])}){suggest(err['input'], choices)}"
        elif typ in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"must be a mapping of keys, got {short_repr(err['input'])}"
        elif typ == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            model = section_model(loc)
            path = _cross_field_path(path if loc else "", msg, model.model_fields if model else ())
        else:
            msg = f"{err['msg'].replace('Input should be', 'must be')} (got {short_repr(err.get('input'))})"
        # a union (hosts: list or string) reports each member; keep the first per path
        if path in seen_paths and typ != "extra_forbidden":
            continue
        seen_paths.add(path)
        problems.append(Problem(path, msg + note, where(path)))
    return problems

