"""Live progress of a run from its metrics.jsonl: the lines appended so far, one line or a table."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from rich.table import Table

from ranger_hvd.config import Resolved
from ranger_hvd.formatting import fmt_bytes, fmt_value
from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import parse_record


class MetricsTail:
    """Reads the complete lines appended to metrics.jsonl since the last call.

    A resumed job rewrites the file once (dropping the steps a failed run took after its checkpoint)
    and marks where it continues with an ``{"event": "resume"}`` line: when the file is replaced, it is
    read again from the start and only the records after the last such line count as this launch's.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.inode: Optional[int] = None
        self.buf = b""
        self.records: list[dict] = []

    def skip_existing(self) -> None:
        """Start after the lines already there (a resumed run appends to its metrics.jsonl)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        self.offset, self.inode = st.st_size, st.st_ino

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                if self.inode is not None and ino != self.inode:
                    self.offset, self.buf, self.records = 0, b"", []
                self.inode = ino
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        new: list[dict] = []
        for rec in map(parse_record, lines):   # a torn or damaged line is skipped
            if rec is None:
                continue
            if rec.get("event") == layout.RESUME_EVENT:
                self.records, new = [], []
                continue
            new.append(rec)
        self.records.extend(new)
        return new

    def steps(self) -> list[dict]:
        return [r for r in self.records if "step" in r]


def planned_epochs(res: Resolved) -> Optional[int]:
    """train.epochs of a reference job; None for a user command, whose script decides."""
    return None if res.config.job.command else res.config.train.epochs


def progress_line(rec: dict, epochs: Optional[int]) -> str:
    parts = [f"epoch {rec.get('epoch', '?')}/{epochs}"] if epochs is not None else (
        [f"epoch {rec['epoch']}"] if rec.get("epoch") is not None else [])
    parts.append(f"step {rec.get('step', '?')}")
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
    epochs = planned_epochs(res)
    t.add_row(f"{rec.get('epoch', '-')}" + ("" if epochs is None else f"/{epochs}"), str(rec.get("step", "-")),
              fmt_value(rec["loss"]) if "loss" in rec else "-", metrics or "-",
              fmt_bytes(rec.get("bytes_sent")),
              f"{rec['step_time'] * 1000:.1f} ms" if isinstance(rec.get("step_time"), (int, float)) else "-",
              f"{time.time() - started:.0f}s")
    t.caption = f"{state}  ·  {run_dir}"
    return t
