"""Hosts and slots: ``host:slots`` entries of ``cluster.hosts`` and ``host slots=N`` lines of a hostfile."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ranger_hvd.config.problems import Problem, short_repr
from ranger_hvd.config.safety import control_chars, read_text_problem

# a host name or IPv4 address, whole (fullmatch): never a leading '-' (ssh would read an option)
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")
MAX_SLOTS = 65536
HOST_RULE = "letters, digits, '.', '-', '_' only, not starting with '-' or '.'"


def host_problem(host: str) -> Optional[str]:
    if HOST_RE.fullmatch(host):
        return None
    return f"bad host name {short_repr(host)}: {HOST_RULE}"


def slots_problem(slots: Optional[str]) -> Optional[str]:
    if slots is None or not re.fullmatch(r"[0-9]{1,6}", slots) or not 1 <= int(slots) <= MAX_SLOTS:
        return f"slots must be a positive integer up to {MAX_SLOTS} (got {short_repr(slots)})"
    return None


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
    why = host_problem(host) or slots_problem(slots)
    if why:
        problems.append(Problem(path, why, where))
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
            problems.append(Problem(p, f"duplicate host {short_repr(got[0])} (also {path}[{seen[got[0]]}])", where(p)))
            continue
        seen[got[0]] = i
        hosts.append(got)
    return hosts


def parse_hostfile(path: Path, cfg_path: str, where: str, problems: list[Problem]) -> list[tuple[str, int]]:
    """Reads 'host slots=N' lines ('#' comments and blank lines allowed); problems name FILE:LINE."""
    text, why = read_text_problem(path, "hostfile", str(path))
    if text is None:
        problems.append(Problem(cfg_path, why, where))
        return []
    hosts: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    # lines end at '\n' only (str.splitlines would also split at form feeds and Unicode separators)
    for n, raw in enumerate(text.split("\n"), 1):
        if len(problems) >= 100:
            break
        raw = raw.removesuffix("\r")
        bad = control_chars(raw, allowed="\t")
        if bad:
            problems.append(Problem(cfg_path, f"{path}:{n}: control characters ({', '.join(bad)}) in "
                                              f"{short_repr(raw)}", where))
            continue
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)(?:\s+slots\s*=\s*(\S+))?", line)
        if not m:
            problems.append(Problem(cfg_path, f"{path}:{n}: expected 'HOST slots=N', got {short_repr(raw.strip())}",
                                    where))
            continue
        host, slots = m.group(1), m.group(2)
        if host_problem(host):
            problems.append(Problem(cfg_path, f"{path}:{n}: {host_problem(host)}", where))
        elif slots is None:
            problems.append(Problem(cfg_path, f"{path}:{n}: missing 'slots=N' for host {short_repr(host)}", where))
        elif slots_problem(slots):
            problems.append(Problem(cfg_path, f"{path}:{n}: {slots_problem(slots)}", where))
        elif host in first_line:
            problems.append(Problem(cfg_path, f"{path}:{n}: duplicate host {short_repr(host)} (first on line "
                                              f"{first_line[host]})",
                                    where))
        else:
            first_line[host] = n
            hosts.append((host, int(slots)))
    if not hosts and not problems:
        problems.append(Problem(cfg_path, f"{path}: no hosts in hostfile", where))
    return hosts
