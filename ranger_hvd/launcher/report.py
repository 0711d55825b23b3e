"""Compares runs: a table (rich) and PNG plots of loss and each metric over steps and over wall time,
and bytes sent per step."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.table import Table

from .rundir import read_metrics
from .supervisor import fmt_bytes


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    records: list[dict]
    label: str = ""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d if not isinstance(d, list) else tuple(d)
    return out


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"not a run directory: {path}")
    cfg_p, sum_p, met_p = path / "config.yaml", path / "summary.json", path / "metrics.jsonl"
    if not (cfg_p.exists() or sum_p.exists() or met_p.exists()):
        raise ReportError(f"not a run directory (no config.yaml, summary.json or metrics.jsonl): {path}")
    config = {}
    if cfg_p.exists():
        try:
            config = yaml.safe_load(cfg_p.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    summary = {}
    if sum_p.exists():
        try:
            summary = json.loads(sum_p.read_text())
        except json.JSONDecodeError:
            summary = {}
    records = [r for r in read_metrics(met_p) if "step" in r]   # step lines; the "end" line is in summary
    return Run(path=path, config=config, summary=summary, records=records)


_IGNORED_DIFF = ("output.dir",)


def label_runs(runs: list[Run]) -> None:
    """Labels runs by the config values that differ between them (or by their directory)."""
    flats = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    differing = [k for k in keys if k not in _IGNORED_DIFF
                 and len({repr(f.get(k)) for f in flats}) > 1]
    for run, flat in zip(runs, flats):
        if differing and len(runs) > 1:
            run.label = ", ".join(f"{k.split('.', 1)[-1] if k.startswith(('compression.', 'train.', 'cluster.')) else k}"
                                  f"={flat.get(k)}" for k in differing[:4])
        else:
            run.label = f"{run.path.parent.name}/{run.path.name}"
    seen: dict[str, int] = {}
    for run in runs:  # make labels unique
        if run.label in seen:
            seen[run.label] += 1
            run.label = f"{run.label} #{seen[run.label]}"
        else:
            seen[run.label] = 1


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(xs) -> Optional[float]:
    xs = [x for x in (_num(v) for v in xs) if x is not None]
    return sum(xs) / len(xs) if xs else None


def metric_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for rec in r.records:
            for k, v in (rec.get("metrics") or {}).items():
                if k not in names and _num(v) is not None:
                    names.append(k)
    return names


def rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    names = metric_names(runs)
    header = ["run", "status", "compression", "np", "steps", "final loss", *names,
              "step time", "bytes/step", "bytes total", "duration"]
    out = []
    for r in runs:
        last = r.records[-1] if r.records else {}
        comp = r.config.get("compression", {}) if isinstance(r.config, dict) else {}
        ctype = comp.get("type", r.summary.get("compression", "-"))
        if ctype == "ranger" and comp.get("density") is not None:
            ctype = f"ranger d={comp['density']:g}"
        bytes_list = [b for b in (_num(x.get("bytes_sent")) for x in r.records) if b is not None]
        st = _mean(x.get("step_time") for x in r.records)
        lv = _num(last.get("loss"))
        duration = _num(r.summary.get("duration_s")) or _num(last.get("time"))
        row = [r.label, str(r.summary.get("status", "-")), str(ctype),
               str(r.summary.get("np", (r.config.get("cluster") or {}).get("np", "-"))),
               str(last.get("step", "-")),
               f"{lv:.4g}" if lv is not None else "-"]
        for n in names:
            v = _num((last.get("metrics") or {}).get(n))
            row.append(f"{v:.4g}" if v is not None else "-")
        row += [f"{st * 1000:.1f} ms" if st is not None else "-",
                fmt_bytes(sum(bytes_list) / len(bytes_list)) if bytes_list else "-",
                fmt_bytes(sum(bytes_list)) if bytes_list else "-",
                f"{duration:.1f}s" if duration is not None else "-"]
        out.append(row)
    return header, out


def rich_table(runs: list[Run], title: str = "runs") -> Table:
    header, body = rows(runs)
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="left" if h in ("run", "status", "compression") else "right")
    for row in body:
        t.add_row(*row)
    return t


def plain_table(runs: list[Run]) -> str:
    header, body = rows(runs)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines) + "\n"


def _series(run: Run, x_key: str, y_get) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in run.records:
        x, y = _num(rec.get(x_key)), _num(y_get(rec))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    series = [("loss", "loss", lambda r: r.get("loss"))]
    for n in metric_names(runs):
        series.append((n, n, lambda r, n=n: (r.get("metrics") or {}).get(n)))
    series.append(("bytes_sent", "bytes sent per step", lambda r: r.get("bytes_sent")))
    for name, ylabel, getter in series:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        for x_key, xlabel, suffix in (("step", "step", "step"), ("time", "wall time (s)", "time")):
            if name == "bytes_sent" and x_key == "time":
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
            drew = False
            for run in runs:
                xs, ys = _series(run, x_key, getter)
                if xs:
                    ax.plot(xs, ys, label=run.label, marker="." if len(xs) < 50 else None)
                    drew = True
            if not drew:
                plt.close(fig)
                continue
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if name == "bytes_sent":
                ax.set_title("bytes sent per step")
            else:
                ax.set_title(f"{ylabel} vs {xlabel}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / ("bytes_per_step.png" if name == "bytes_sent" else f"{safe}_vs_{suffix}.png")
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def make_report(run_dirs: list[Path], out_dir: Optional[Path] = None, console: Optional[Console] = None,
                title: str = "runs") -> tuple[list[Run], list[Path], Path]:
    """Loads the runs, prints the table, writes report.txt, report.json and PNGs; returns what it wrote."""
    console = console or Console()
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise ReportError("no run directories given")
    label_runs(runs)
    out = Path(out_dir) if out_dir else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    console.print(rich_table(runs, title))
    (out / "report.txt").write_text(plain_table(runs))
    header, body = rows(runs)
    (out / "report.json").write_text(json.dumps(
        {"runs": [dict(zip(header, r), path=str(run.path)) for r, run in zip(body, runs)]}, indent=2) + "\n")
    pngs = plot(runs, out)
    console.print(f"report: {out} ({len(pngs)} plots)", highlight=False)
    return runs, pngs, out
