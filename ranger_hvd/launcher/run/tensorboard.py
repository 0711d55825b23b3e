"""TensorBoard event files of a run, from its ``metrics.jsonl``: ``tensorboard --logdir runs/`` then shows
every run side by side (each under its run directory's path), and a report's ``tensorboard/`` holds one
folder per run named by its label, so ``tensorboard --logdir REPORT_DIR/tensorboard`` names runs as the
report does.

Written by the launcher when a launch ends (reference jobs and user commands alike), with no framework
import: the event file format is TFRecord framing (length, masked CRC-32C, data, masked CRC-32C) around
``tensorflow.Event`` protocol buffers, encoded here by hand for the few fields a scalar needs.  Reading
them needs the ``tensorboard`` package (it comes with TensorFlow installs that include it; ``pip install
tensorboard`` otherwise).

Scalars per step record: ``loss``, each metric (``eval_accuracy`` ...), ``bytes_sent`` and
``step_time``, at the record's step; the wall time is the run's start plus the record's ``time``.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Iterable, Optional

from ranger_hvd.rundir import layout

FILE_PREFIX = "events.out.tfevents."
SCALAR_FIELDS = ("loss", "bytes_sent", "step_time")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1          # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def event(wall_time: float, step: int = 0, *, file_version: Optional[str] = None,
          scalars: Iterable[tuple[str, float]] = ()) -> bytes:
    """One serialized ``Event``: wall_time (1, double), step (2, int64), file_version (3, string),
    summary (5): ``Summary.value`` (1) of ``{tag (1, string), simple_value (2, float)}``."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
                      for tag, value in scalars)
    if values:
        out += _bytes_field(5, values)
    return out


def record(data: bytes) -> bytes:
    """TFRecord framing of one event."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked(header)) + data + struct.pack("<I", _masked(data))


def scalars_of(rec: dict) -> list[tuple[str, float]]:
    """The scalars of one step record: its numeric fields and metrics (None and non-numbers skipped)."""
    out = [(k, float(rec[k])) for k in SCALAR_FIELDS if _is_number(rec.get(k))]
    out += [(name, float(v)) for name, v in (rec.get("metrics") or {}).items() if _is_number(v)]
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def write_events(run_dir: Path, records: list[dict], started: Optional[float] = None) -> Optional[Path]:
    """Replaces ``RUN_DIR/tensorboard/`` 's event file with one holding every step record (None: no step
    record, nothing written)."""
    return write_event_file(Path(run_dir) / layout.TENSORBOARD, records, started)


def write_event_file(out_dir: Path, records: list[dict], started: Optional[float] = None) -> Optional[Path]:
    """Replaces the event file in ``out_dir`` (made if missing) with one holding every step record of
    ``records`` (None: no step record, nothing written)."""
    steps = [r for r in records if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]
    if not steps:
        return None
    started = time.time() if started is None else started
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(FILE_PREFIX + "*"):
        old.unlink()
    path = out_dir / f"{FILE_PREFIX}{int(started)}.{socket.gethostname()}.ranger-hvd"
    chunks = [record(event(started, file_version="brain.Event:2"))]
    for rec in steps:
        t = rec.get("time")
        wall = started + (float(t) if _is_number(t) else 0.0)
        chunks.append(record(event(wall, rec["step"], scalars=scalars_of(rec))))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path
