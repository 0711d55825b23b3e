"""``ranger-hvd sweep CONFIG KEY=V1,V2 ...``: one run per combination of values, then a comparison."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from ranger_hvd.config import ConfigError, Problem, Resolved, load_config, parse_override
from ranger_hvd.launcher.compare.report import make_report
from ranger_hvd.launcher.run.rundir import create_report_dir, write_json
from ranger_hvd.launcher.run.summary import RunResult


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


def resolve_combinations(config: str, axes: list[Axis]) -> tuple[list[list[str]], list[Resolved]]:
    """Every combination validated before anything starts; problems name their combination."""
    combos = combinations(axes)
    resolved: list[Resolved] = []
    problems: list[Problem] = []
    for combo in combos:
        try:
            resolved.append(load_config(config, combo))
        except ConfigError as exc:
            for p in exc.problems:
                p.where = (p.where + " " if p.where else "") + f"[{' '.join(combo)}]"
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return combos, resolved


def run_sweep(config: str, axes: list[Axis], combos: list[list[str]], resolved: list[Resolved],
              launch: Callable[..., Optional[RunResult]], console: Console, **launch_options) -> int:
    """Launches each combination in turn (Ctrl-C stops the sweep), then writes the comparison to
    ``output.dir/_reports/<timestamp>-sweep/``: sweep.json, the report table and plots.  Returns the
    exit status: 0 when every run succeeded."""
    results: list[tuple[list[str], RunResult]] = []
    for i, (combo, res) in enumerate(zip(combos, resolved), 1):
        console.rule(f"sweep run {i}/{len(combos)}: {' '.join(combo)}")
        result = launch(res, console, **launch_options)
        if result is None:
            return 1
        results.append((combo, result))
        if result.status == "interrupted":
            break
    sweep_dir = create_report_dir(Path(resolved[0].config.output.dir), "-sweep")
    write_json(sweep_dir / "sweep.json", {
        "config": str(config), "axes": {a.key: a.values for a in axes},
        "runs": [{"overrides": combo, "run_dir": str(r.run_dir), "status": r.status, "exit_code": r.exit_code}
                 for combo, r in results]})
    make_report([r.run_dir for _, r in results], out_dir=sweep_dir, console=console,
                title=f"sweep over {', '.join(a.key for a in axes)}")
    last = results[-1][1]
    if last.status == "interrupted":
        return last.exit_code
    return 0 if all(r.status == "success" for _, r in results) else 1
