"""Hosts and slots: ``host:slots`` entries of ``cluster.hosts`` and ``host slots=N`` lines of a hostfile."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .problems import Problem, short_repr

HOST_RE = re.compile(r"^[\w.-]+$")


def split_list(value) -> list[str]:
    """A list, or a comma-separated string, as a list of non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value)


def parse_host_entry(entry: Any, path: str, where: str, problems: list[Problem]) -> Optional[tuple[str, int]]:
    """('host', slots) from 'host:slots', or None with a problem added."""
    if not isinstance(entry, str) or ":" not in entry:
        problems.append(Problem(path, f"must be 'host:slots' such as 'localhost:2' (got {short_repr(entry)})", where))
        return None
    host, _, slots = entry.strip().rpartition(":")
    if not HOST_RE.match(host):
        problems.append(Problem(path, f"bad host name {host!r}: letters, digits, '.', '-', '_' only", where))
        return None
    if not slots.isdigit() or int(slots) < 1:
        problems.append(Problem(path, f"slots must be a positive integer (got {slots!r} in {entry!r})", where))
        return None
    return host, int(slots)


def parse_host_list(entries: list, path: str, where, problems: list[Problem]) -> list[tuple[str, int]]:
    """Every entry of ``cluster.hosts``; problems name ``cluster.hosts[i]``."""
    if not entries:
        problems.append(Problem(path, "must list at least one 'host:slots' entry", where(path)))
    hosts: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        p = f"{path}[{i}]"
        got = parse_host_entry(entry, p, where(p), problems)
        if got is None:
            continue
        if got[0] in seen:
            problems.append(Problem(p, f"duplicate host {got[0]!r} (also {path}[{seen[got[0]]}])", where(p)))
            continue
        seen[got[0]] = i
        hosts.append(got)
    return hosts


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
        if not HOST_RE.match(host):
            problems.append(Problem(cfg_path, f"{path}:{n}: bad host name {host!r}", where))
        elif slots is None:
            problems.append(Problem(cfg_path, f"{path}:{n}: missing 'slots=N' for host {host!r}", where))
        elif not slots.isdigit() or int(slots) < 1:
            problems.append(Problem(cfg_path, f"{path}:{n}: slots must be a positive integer (got {slots!r})", where))
        elif host in first_line:
            problems.append(Problem(cfg_path, f"{path}:{n}: duplicate host {host!r} (first on line {first_line[host]})",
                                    where))
        else:
            first_line[host] = n
            hosts.append((host, int(slots)))
    if not hosts and not problems:
        problems.append(Problem(cfg_path, f"{path}: no hosts in hostfile", where))
    return hosts
