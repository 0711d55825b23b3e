"""Live progress of a run from its metrics.jsonl: the lines appended so far, one line or a table."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from ranger_hvd.jobs.metrics import parse_line

from .config import Resolved
from .formatting import fmt_bytes, fmt_value


class MetricsTail:
    """Reads the complete lines appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.buf = b""
        self.records: list[dict] = []

    def skip_existing(self) -> None:
        """Start after the lines already there (a resumed run appends to its metrics.jsonl)."""
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            pass

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        new = [rec for rec in map(parse_line, lines) if rec is not None]
        self.records.extend(new)
        return new

    def steps(self) -> list[dict]:
        return [r for r in self.records if "step" in r]


def progress_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec.get('epoch', '?')}/{epochs}", f"step {rec.get('step', '?')}"]
    if "loss" in rec:
        parts.append(f"loss {fmt_value(rec['loss'])}")
    for k, v in (rec.get("metrics") or {}).items():
        parts.append(f"{k} {fmt_value(v)}")
    if rec.get("bytes_sent") is not None:
        parts.append(f"sent {fmt_bytes(rec['bytes_sent'])}/step")
    if rec.get("time") is not None:
        parts.append(f"{float(rec['time']):.1f}s")
    return "  ".join(parts)


def progress_table(res: Resolved, run_dir: Path, tail: MetricsTail, started: float, state: str) -> Table:
    t = Table(title=f"ranger-hvd  {res.job_name}  ({res.np} ranks, {res.config.cluster.controller}, "
                    f"compression {res.config.compression.type})", show_header=True, expand=False)
    for col in ("epoch", "step", "loss", "metrics", "bytes/step", "step time", "elapsed"):
        t.add_column(col)
    steps = tail.steps()
    rec = steps[-1] if steps else {}
    metrics = ", ".join(f"{k}={fmt_value(v)}" for k, v in (rec.get("metrics") or {}).items())
    t.add_row(f"{rec.get('epoch', '-')}/{res.config.train.epochs}", str(rec.get("step", "-")),
              fmt_value(rec["loss"]) if "loss" in rec else "-", metrics or "-",
              fmt_bytes(rec.get("bytes_sent")),
              f"{rec['step_time'] * 1000:.1f} ms" if isinstance(rec.get("step_time"), (int, float)) else "-",
              f"{time.time() - started:.0f}s")
    t.caption = f"{state}  ·  {run_dir}"
    return t
