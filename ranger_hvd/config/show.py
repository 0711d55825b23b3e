"""``ranger-hvd show``: every resolved value with where it came from, then the inactive options."""

from __future__ import annotations

from typing import Any

import yaml

from ranger_hvd.config.resolve import Resolved, leaf_paths


def yaml_text(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


_ABSENT = object()


def show_lines(res: Resolved) -> list[tuple[str, str, str]]:
    """(dotted path, value as YAML, source) for every leaf of the resolved config."""
    resolved = res.resolved_dict()
    # a key set aside while its section stays (horovod.* under cluster.runner torchrun) runs at its default
    set_aside = {o.path: o.reason for o in res.inactive}
    out = []
    for leaf in leaf_paths(res.config):
        node: Any = resolved
        for part in leaf.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:   # a user command's config leaves out what only the reference jobs read
            source = f"default ({set_aside[leaf]})" if leaf in set_aside else res.sources.get(leaf, "default")
            out.append((leaf, yaml_text(node), source))
    return out


def inactive_lines(res: Resolved) -> list[tuple[str, str, str]]:
    """(dotted path, value as YAML, why inactive and where it was given) of each dropped option."""
    return [(o.path, yaml_text(o.value), f"{o.reason}; {res.sources.get(o.path, 'default')}")
            for o in res.inactive]


def show_text(res: Resolved, title: str) -> str:
    lines = show_lines(res)
    dropped = inactive_lines(res)
    width = max(len(p) + len(v) for p, v, _ in lines + dropped) + 2
    out = [f"# {title}", "# value  # source (default < file < override)"]
    out += [f"{f'{p}: {v}'.ljust(width)}  # {s}" for p, v, s in lines]
    if dropped:
        out.append("# inactive: options of a type not selected; checked, then left out of the run's config.yaml")
        out += [f"{f'# {p}: {v}'.ljust(width)}  # {s}" for p, v, s in dropped]
    return "\n".join(out) + "\n"
