"""Per-rank checkpoints of the reference jobs, shared by both backends (no framework imported here).

Layout: ``RUN_DIR/checkpoints/step-SSSSSSSS/rank{r}.{pt|pkl}``, one directory per save point (the global
step after which it was written: the end of an epoch, or the step where ``train.max_steps`` stopped the
run). Every rank writes only its own file, through a temporary name and a rename, so a file that
exists is complete. A *set* is complete when every rank's file of that step exists; a rank that died
while the others saved leaves a torn set, which is never loaded: on resume the ranks gather the steps
each of them holds and continue from the latest step that all of them hold.

Each rank keeps its two newest files. When a rank writes step S, every rank has already passed a
collective after writing the previous save point (training steps and the evaluation allreduce lie in
between), so that previous set is complete and stays on disk until S's set is known to be complete.

Every collective here carries a fixed name and is reached by every rank the same number of times, so a
rank with a problem and a rank without one always meet (``allgather_object`` without a name is named
after the object's type: ``None`` and a ``str`` would never meet and both ranks would spin forever).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

from ranger_hvd.rundir import layout
from ranger_hvd.rundir.records import parse_record

FORMAT = 2


class CheckpointError(Exception):
    """No checkpoint set to resume from, or this rank's file cannot be used; the message names the file."""

EXTENSIONS = {"torch": "pt", "tensorflow": "pkl"}
_SET_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / layout.CHECKPOINTS


def set_dir(run_dir, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{int(step):08d}"


def rank_file(run_dir, step: int, rank: int, backend: str) -> Path:
    return set_dir(run_dir, step) / f"rank{rank}.{EXTENSIONS[backend]}"


def saved_steps(run_dir) -> list[int]:
    """Steps with a checkpoint directory under RUN_DIR (complete or not), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _SET_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append(int(m.group(1)))
    return sorted(found)


def own_steps(run_dir, rank: int, backend: str) -> list[int]:
    """Steps for which this rank's file exists on this host, oldest first."""
    return [s for s in saved_steps(run_dir) if rank_file(run_dir, s, rank, backend).is_file()]


def complete_steps(run_dir, size: int, backend: str) -> list[int]:
    """Steps whose files of all ``size`` ranks are visible from here (a shared or single file system)."""
    return [s for s in saved_steps(run_dir)
            if all(rank_file(run_dir, s, r, backend).is_file() for r in range(size))]


def has_any_checkpoint(run_dir) -> bool:
    return any(any(set_dir(run_dir, s).glob("rank*.*")) for s in saved_steps(run_dir))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name next to ``path``, then rename: a crash mid-write leaves no
    file at ``path`` (and so no complete-looking set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prune(run_dir, rank: int, backend: str, keep: int = 2) -> None:
    """Deletes this rank's files older than its ``keep`` newest, and set directories left empty."""
    for step in own_steps(run_dir, rank, backend)[:-keep]:
        try:
            rank_file(run_dir, step, rank, backend).unlink()
        except FileNotFoundError:
            pass
        try:
            set_dir(run_dir, step).rmdir()    # only succeeds once every rank's file is gone
        except OSError:
            pass


def _agree_on_errors(allgather_object, err: Optional[str], name: str) -> None:
    """Every rank learns every rank's problem; all raise together, so none waits in a collective."""
    errors = list(allgather_object(err, name=name))
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        if err:
            raise CheckpointError(err)
        rank, first = bad[0]
        raise CheckpointError(f"rank {rank} cannot resume: {first}")


def load_for_resume(run_dir, *, rank: int, size: int, backend: str, model: str, compression: str,
                    allgather_object, read: Callable[[Path], dict]) -> dict:
    """This rank's state from the latest checkpoint set that every rank holds.

    ``read(path)`` loads one file (``torch.load`` or pickle). Raises :class:`CheckpointError` on every rank,
    naming the file, when any rank cannot resume. Exactly two named collectives, on every rank.
    """
    mine: list[int] = []
    err = None
    if run_dir is None:
        err = "resume needs a run directory (--run-dir)"
    else:
        mine = own_steps(run_dir, rank, backend)
        if not mine:
            err = (f"no checkpoint of this rank under {checkpoint_root(run_dir)} "
                   f"(expected step-*/rank{rank}.{EXTENSIONS[backend]}; was the run saved with "
                   f"train.checkpoint: true and did it finish an epoch?)")
    held = [list(steps) for steps in allgather_object(mine, name="ranger_hvd.rundir.checkpoint.steps")]
    common = set(held[0]).intersection(*held[1:]) if held else set()
    step = max(common) if common else None
    if err is None and step is None:
        torn = ", ".join(f"rank {r}: {steps or 'none'}" for r, steps in enumerate(held))
        err = (f"no checkpoint set under {checkpoint_root(run_dir)} is complete (steps each rank holds: "
               f"{torn})")

    state = None
    if err is None:
        path = rank_file(run_dir, step, rank, backend)
        try:
            state = read(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            err = f"cannot resume: checkpoint {path} is unreadable ({type(exc).__name__}: {exc})"
        else:
            err = _check_state(state, path, rank=rank, size=size, step=step, backend=backend, model=model,
                               compression=compression)
    _agree_on_errors(allgather_object, err, "ranger_hvd.rundir.checkpoint.load")
    return state


def _check_state(state, path: Path, *, rank: int, size: int, step: int, backend: str, model: str,
                 compression: str) -> Optional[str]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return f"cannot resume: {path} is not a ranger_hvd job checkpoint (format {FORMAT})"
    if state.get("size") != size:
        return (f"cannot resume: checkpoint {path} was written by a run with {state.get('size')} ranks, "
                f"this run has {size} (cluster.np must stay the same)")
    got = (state.get("backend"), state.get("model"), state.get("compression"))
    if got != (backend, model, compression):
        return (f"cannot resume: checkpoint {path} holds backend={got[0]} model={got[1]} "
                f"compression={got[2]}, the config says backend={backend} model={model} "
                f"compression={compression}")
    if state.get("rank") != rank or int(state["loop"]["step"]) != step:
        return f"cannot resume: checkpoint {path} holds rank {state.get('rank')} step {state['loop']['step']}"
    return None


def header(*, rank: int, size: int, backend: str, model: str, compression: str) -> dict:
    """The fields :func:`load_for_resume` checks, to put in every checkpoint."""
    return {"format": FORMAT, "rank": rank, "size": size, "backend": backend, "model": model,
            "compression": compression}


def save(run_dir, *, rank: int, backend: str, state: dict, write: Callable[[Path, dict], None]) -> Path:
    """Writes this rank's file of the save point ``state["loop"]["step"]`` and prunes older ones."""
    path = rank_file(run_dir, int(state["loop"]["step"]), rank, backend)
    write_atomic(path, lambda tmp: write(tmp, state))
    prune(run_dir, rank, backend)
    return path


def trim_metrics(run_dir, step: int, *, attempt_note: Optional[dict] = None) -> int:
    """Before a resumed run writes on: drops the step lines after ``step`` that a failed run wrote
    after its last checkpoint (the resumed run takes those steps again), and appends a
    ``{"event": "resume", "from_step": step}`` line. Rewritten through a rename, so a reader that
    follows the file sees a new file. Returns how many lines were dropped."""
    path = Path(run_dir) / layout.METRICS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    kept, dropped = [], 0
    for line in lines:
        rec = parse_record(line)
        if rec is None:
            dropped += 1          # a line cut short by the crash (or of no use to any reader)
            continue
        if isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    event = {"event": layout.RESUME_EVENT, "from_step": int(step), "dropped_lines": dropped, **(attempt_note or {})}
    kept.append(json.dumps(event))

    def write(tmp: Path) -> None:
        tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")

    write_atomic(path, write)
    return dropped
