"""Reading what a run directory holds (``config.yaml``, ``summary.json``, ``slurm.json``, ``metrics.jsonl``)
when the files may be damaged, hand-edited or not what they claim: each reader returns what it could use
and, instead of raising, says in one line what it could not (naming the file).  ``status``, ``report``,
``--wait`` and the live progress skip a bad record and go on."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ranger_hvd.config.problems import ConfigError
from ranger_hvd.config.safety import read_bounded
from ranger_hvd.config.yamlfile import load_yaml
from ranger_hvd.formatting import clip

MAX_JSON_BYTES = 8 << 20      # summary.json, slurm.json
MAX_LINE_BYTES = 1 << 20      # one metrics.jsonl line

_NUMBER_KEYS = ("loss", "bytes_sent", "bytes_dense", "step_time", "time", "bytes_sent_total")
_COUNT_KEYS = ("step", "epoch", "epochs", "steps", "size", "from_step")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def clean_record(rec: Any) -> Optional[dict]:
    """A metrics.jsonl record whose fields have the types the launcher reads (None: unusable).  Counts
    (step, epoch, ...) are non-negative integers, measurements numbers or null, ``metrics`` a mapping
    of names to numbers or null, ``event`` a string."""
    if not isinstance(rec, dict):
        return None
    for k in _COUNT_KEYS:
        if k in rec and rec[k] is not None and not (isinstance(rec[k], int) and not isinstance(rec[k], bool)
                                                    and rec[k] >= 0):
            return None
    if "step" in rec and rec["step"] is None:
        return None
    for k in _NUMBER_KEYS:
        if k in rec and rec[k] is not None and not _is_number(rec[k]):
            return None
    metrics = rec.get("metrics")
    if metrics is not None and not (isinstance(metrics, dict)
                                    and all(isinstance(n, str) and (v is None or _is_number(v))
                                            for n, v in metrics.items())):
        return None
    if "event" in rec and not isinstance(rec["event"], str):
        return None
    return rec


def parse_record(line: bytes | str) -> Optional[dict]:
    """One metrics.jsonl line as a usable record (None: blank, torn, foreign or of the wrong shape)."""
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return clean_record(rec)


@dataclass
class Records:
    records: list[dict] = field(default_factory=list)
    skipped: int = 0            # lines that were not usable records (a torn last line included)

    def steps(self) -> list[dict]:
        return [r for r in self.records if "step" in r]

    def note(self, path: Path) -> Optional[str]:
        return f"{path}: {self.skipped} unreadable line(s) skipped" if self.skipped else None


def read_records(path: Path) -> Records:
    """Every usable record of a metrics.jsonl (missing file: none); unusable lines are counted."""
    out = Records()
    if not Path(path).is_file():      # missing, or not a regular file (a pipe would block)
        return out
    try:
        fh = open(path, "rb")
    except OSError:
        return out
    with fh:
        for line in fh:
            if not line.strip():
                continue
            rec = parse_record(line)
            if rec is None:
                out.skipped += 1
            else:
                out.records.append(rec)
    return out


def read_json_object(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object in ``path``, None) or (None, why not): missing, unreadable, too large, not UTF-8,
    not JSON, or JSON of another shape.  A missing file gives (None, None)."""
    try:
        text = read_bounded(path, "file", MAX_JSON_BYTES)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return None, str(exc)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"{path} is not valid JSON ({str(exc)[:80]})"
    if not isinstance(data, dict):
        return None, f"{path} holds a JSON {type(data).__name__}, not an object"
    return _finite(data), None


def _finite(data: dict) -> dict:
    """Top-level non-finite numbers (JSON's NaN, Infinity) as null: nothing downstream formats them."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


def read_yaml_mapping(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the mapping in a YAML file such as RUN_DIR/config.yaml, None) or (None, why not); bounded like a
    config file.  A missing file gives (None, None)."""
    if not path.exists():
        return None, None
    try:
        data, _ = load_yaml(read_bounded(path, "file"), str(path))
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    except ConfigError as exc:          # names the file and line
        return None, clip("; ".join(str(p) for p in exc.problems), 300)
    except ValueError as exc:
        return None, str(exc)
    if not isinstance(data, dict):
        return None, f"{path} holds no mapping of sections"
    return data, None


def section_value(config: dict, section: str, key: str) -> Any:
    """``config[section][key]`` when both levels are there and mappings, else None."""
    sec = config.get(section)
    return sec.get(key) if isinstance(sec, dict) else None
