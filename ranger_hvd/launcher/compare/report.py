"""Compares runs: a table (rich, readable at 100 columns) and PNG plots of loss and each metric over
steps and over wall time, and bytes sent per step.  Runs are labelled by what differs (labels.py); the
report's ``tensorboard/`` holds each run's scalars under its label."""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ranger_hvd.formatting import clip, fmt_bytes
from ranger_hvd.launcher.compare.labels import run_labels
from ranger_hvd.launcher.run.rundir import create_report_dir
from ranger_hvd.launcher.run.tensorboard import write_event_file
from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import read_json_object, read_records, read_yaml_mapping, section_value


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    records: list[dict]
    label: str = ""
    notes: list[str] = field(default_factory=list)   # what could not be read (damaged files), one line each


def load_run(path: Path) -> Run:
    """A run directory's files, each read defensively: a damaged file is left out with a note."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"not a run directory: {path}")
    cfg_p, sum_p, met_p = path / layout.CONFIG, path / layout.SUMMARY, path / layout.METRICS
    if not (cfg_p.exists() or sum_p.exists() or met_p.exists()):
        raise ReportError(f"not a run directory (no config.yaml, summary.json or metrics.jsonl): {path}")
    config, bad_config = read_yaml_mapping(cfg_p)
    summary, bad_summary = read_json_object(sum_p)
    metrics = read_records(met_p)
    notes = [n for n in (bad_config, bad_summary, metrics.note(met_p)) if n]
    # the end line belongs to the summary
    return Run(path=path, config=config or {}, summary=summary or {}, records=metrics.steps(), notes=notes)


def label_runs(runs: list[Run]) -> None:
    names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    fallbacks = [r.summary.get("compression") if isinstance(r.summary.get("compression"), str) else None
                 for r in runs]
    for run, label in zip(runs, run_labels([r.config for r in runs], names, fallbacks)):
        run.label = clip(label, 160)


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(xs) -> Optional[float]:
    xs = [x for x in (_num(v) for v in xs) if x is not None]
    return sum(xs) / len(xs) if xs else None


def metric_names(runs: list[Run]) -> list[str]:
    """Every numeric metric in the runs' step lines, in order of appearance."""
    names: list[str] = []
    for r in runs:
        for rec in r.records:
            for k, v in (rec.get("metrics") or {}).items():
                if k not in names and _num(v) is not None:
                    names.append(k)
    return names


def table_metrics(runs: list[Run]) -> list[str]:
    """The metrics the table shows: the held-out ones (eval_*) where the runs have them."""
    names = metric_names(runs)
    held_out = [n for n in names if n.startswith("eval_")]
    return held_out or names


def _final(run: Run, name: str) -> Optional[float]:
    """The last value of a metric in a run's step lines."""
    for rec in reversed(run.records):
        v = _num((rec.get("metrics") or {}).get(name))
        if v is not None:
            return v
    return None


def rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per run.  Status is a column only when some run did not succeed."""
    names = table_metrics(runs)
    show_status = any(r.summary.get("status", "success") != "success" for r in runs)
    header = ["run", *(["status"] if show_status else []), "steps", "train loss", *names, "ms/step", "sent", "time"]
    out = []
    for r in runs:
        last = r.records[-1] if r.records else {}
        sent = [b for b in (_num(x.get("bytes_sent")) for x in r.records) if b is not None]
        step_time = _mean(x.get("step_time") for x in r.records)
        loss = _num(last.get("loss"))
        duration = _num(r.summary.get("duration_s")) or _num(last.get("time"))
        row = [r.label, *([clip(str(r.summary.get("status", "-")), 20)] if show_status else []),
               str(last.get("step", "-")), f"{loss:.4g}" if loss is not None else "-"]
        for n in names:
            v = _final(r, n)
            row.append(f"{v:.4g}" if v is not None else "-")
        row += [f"{step_time * 1000:.1f}" if step_time is not None else "-",
                fmt_bytes(sum(sent) / len(sent)) if sent else "-",
                f"{duration:.1f}s" if duration is not None else "-"]
        out.append(row)
    return header, out


def table_caption(runs: list[Run]) -> str:
    metrics = table_metrics(runs)
    held_out = "held-out " if metrics and metrics[0].startswith("eval_") else ""
    return (f"train loss: rank 0's last batch; {held_out}metrics at the end; ms/step: mean step time; "
            "sent: mean gradient bytes rank 0 sent per step; time: the whole run")


HEADER_WIDTH = 8   # a longer header wraps at its spaces ('_' in metric names counts as one)


def rich_table(runs: list[Run], title: str = "runs") -> Table:
    """Number columns are as wide as their widest value (or header, up to HEADER_WIDTH), so numbers are
    never cut; the run column takes the rest and wraps its labels at spaces."""
    header, body = rows(runs)
    t = Table(title=title, caption=table_caption(runs), box=box.SIMPLE_HEAD, show_edge=False,
              padding=0, title_justify="left", caption_justify="left")
    for i, h in enumerate(header):
        if h == "run":
            t.add_column(h, overflow="fold", min_width=min(20, max(len(r[i]) for r in body)))
        else:
            width = max(min(len(h), HEADER_WIDTH), *(len(r[i]) for r in body))
            t.add_column(h.replace("_", " "), justify="left" if h == "status" else "right", width=width)
    for row in body:
        t.add_row(*row)
    return t


def table_text(runs: list[Run], title: str, width: int = 100) -> str:
    """The table as plain text, as it prints at ``width`` columns."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(rich_table(runs, title))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


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


def default_out_dir(runs: list[Run]) -> Path:
    """RUN_DIR/report for one run; for several, a directory of its own under the first run's output.dir
    (``output.dir/_reports/<timestamp>``), so that no run holds a comparison of others."""
    if len(runs) == 1:
        return runs[0].path / "report"
    out_root = section_value(runs[0].config, "output", "dir")
    if not (isinstance(out_root, str) and Path(out_root).is_absolute()):
        out_root = runs[0].path.resolve().parents[1]   # output.dir/<job.name>/<timestamp>
    return create_report_dir(Path(out_root))


def tensorboard_name(label: str) -> str:
    """A run's label as a folder name TensorBoard shows: spaces and anything unusual become '_'."""
    return re.sub(r"[^A-Za-z0-9._=@,+-]", "_", label)[:120].strip("._") or "run"


def write_labelled_events(runs: list[Run], out_dir: Path) -> list[Path]:
    """``out_dir/<label>/events...`` for each run with step records, so ``tensorboard --logdir out_dir``
    names the runs as this report does (the event files are small: copies, not links)."""
    written, used = [], set()
    for run in runs:
        name = tensorboard_name(run.label)
        while name in used:
            name += "_"
        used.add(name)
        path = write_event_file(out_dir / name, run.records, _started(run.summary))
        if path is not None:
            written.append(path)
    return written


def _started(summary: dict) -> Optional[float]:
    try:
        return time.mktime(time.strptime(str(summary.get("started_at")), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def make_report(run_dirs: list[Path], out_dir: Optional[Path] = None, console: Optional[Console] = None,
                title: str = "runs") -> tuple[list[Run], list[Path], Path]:
    """Loads the runs, prints the table, writes report.txt, report.json and PNGs; returns what it wrote."""
    console = console or Console()
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise ReportError("no run directories given")
    label_runs(runs)
    for run in runs:
        for note in run.notes:
            console.print(f"[yellow]warning:[/] {escape(note)} (left out of the report)", highlight=False)
    out = Path(out_dir) if out_dir else default_out_dir(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    console.print(rich_table(runs, title))
    if len(runs) > 1:
        for run in runs:
            console.print(f"  {run.label}: {run.path}", highlight=False, soft_wrap=True)
    (out / "report.txt").write_text(table_text(runs, title)
                                    + "".join(f"{r.label}: {r.path}\n" for r in runs))
    header, body = rows(runs)
    (out / "report.json").write_text(json.dumps(
        {"runs": [dict(zip(header, row), label=run.label, path=str(run.path), status=run.summary.get("status"),
                       bytes_sent_total=sum(_num(x.get("bytes_sent")) or 0 for x in run.records))
                  for row, run in zip(body, runs)]}, indent=2) + "\n")
    pngs = plot(runs, out)
    write_labelled_events(runs, out / layout.TENSORBOARD)
    console.print(f"report: {out} ({len(pngs)} plots)", highlight=False, soft_wrap=True)
    return runs, pngs, out
