"""Where each value came from: a default, a line of the config file, or an override."""

from __future__ import annotations

import re


class Sources:
    """Answers "where was PATH given?" for a config built from ``fname`` (lines of its keys) and
    ``override_keys`` (the dotted keys given as KEY=VALUE).  An override of a mapping covers every key
    below it, and a key inside a list (``cluster.hosts[1]``) is where the list is."""

    def __init__(self, fname: str = "", lines: dict[str, int] | None = None, override_keys=()):
        self.fname = fname
        self.override_keys = set(override_keys)
        # an override replaces the whole subtree, so file lines below it no longer apply
        self.lines = {k: v for k, v in (lines or {}).items()
                      if not any(k.startswith(o + ".") for o in self.override_keys)}

    def __call__(self, path: str) -> str:
        """"file.yaml:3", "override" or "" (a default)."""
        base = re.sub(r"\[\d+\]", "", path)
        if any(k.startswith(base + ".") for k in self.override_keys):
            return "override"
        probe = base
        while probe:
            if probe in self.override_keys:
                return "override"
            if probe in self.lines:
                return f"{self.fname}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return ""

    def describe(self, path: str) -> str:
        """"default", "file (x.yaml:3)" or "override", for ``show``."""
        if self(path) == "override":
            return "override"
        if path in self.lines:      # only the key itself: a section's line says nothing of its defaults
            return f"file ({self.fname}:{self.lines[path]})"
        return "default"
