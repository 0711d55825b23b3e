"""Reading why a job failed from its logs: Horovod's stall reports, the jobs' own error lines, and what
ssh / mpirun said when the job never started on a host.

Horovod's coordinator (rank 0) checks every ``horovod.stall_check_warning_time_seconds`` for collectives
that some ranks submitted and others did not, and logs (Horovod 0.28.1, ``stall_inspector.cc``)::

    [... W .../stall_inspector.cc:107] One or more tensors were submitted to be reduced, gathered or
    broadcasted by subset of ranks and are waiting for remainder of ranks for more than 60 seconds. ...
    Missing ranks:
    0: [str.sz, str.t]
    1!: [NoneType.sz]
    One or more rank (marked by "!") is stalled for longer than 300 seconds. Will shutdown.

Each ``R: [names]`` line lists collectives that rank R has not joined; ``!`` marks ranks past the
shutdown limit, and the last sentence appears when Horovod shuts the job down.

Under Gloo, Horovod 0.28.1's stall inspector never reports (measured here: two ranks waiting on
differently named allreduces for 70 s under Gloo printed nothing, with the default limits or with 2 s /
4 s; the same job under MPI was reported and shut down after 4 s). So under Gloo the launcher has
Horovod write its timeline (rank 0, ``RUN_DIR/timeline.json``), where the coordinator records when the
negotiation of each collective starts, which ranks have submitted it, and when it ends; a negotiation
open longer than the shutdown limit is the same finding, and the launcher stops the job itself.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

_HEAD = "One or more tensors were submitted to be reduced, gathered or broadcasted by subset of ranks"
_MISSING_LINE = re.compile(r"^(\d+)(!?): \[(.*)\]\s*$")
_SHUTDOWN = re.compile(r'stalled for longer than (\d+) seconds\. Will shutdown')
_WAITING = re.compile(r"waiting for remainder of ranks for more than (\d+) seconds")
# Open MPI's per-rank files (and horovodrun's own log) prefix each line with "[1,0]<stderr>:" / "[0]<stdout>:"
_PREFIX = re.compile(r"^\[\d+(?:,\d+)?\]<std(?:out|err)>:", re.M)
_JOB_ERROR = re.compile(r"^ranger_hvd\.jobs \(rank (\d+)\): (error|failed): (.*)$", re.M)


@dataclass
class StallReport:
    """One stall report: which ranks have not joined which collectives."""

    missing: dict[int, list[str]] = field(default_factory=dict)   # rank -> collectives it has not joined
    shutdown: bool = False          # Horovod decided to shut the job down
    waited_s: Optional[int] = None  # the warning time the report speaks of
    shutdown_after_s: Optional[int] = None
    by_launcher: bool = False       # found in Horovod's timeline; the launcher stopped the job
    # stalled collectives whose submitting ranks the timeline does not show yet (Horovod flushes it on
    # its next write, which a stalled job never makes)
    unknown: list[str] = field(default_factory=list)

    @property
    def collectives(self) -> dict[str, list[int]]:
        """collective -> the ranks missing from it."""
        out: dict[str, list[int]] = {}
        for rank, names in sorted(self.missing.items()):
            for name in names:
                out.setdefault(name, []).append(rank)
        return out

    def message(self) -> str:
        parts = [f"'{name}' (missing rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
                 for name, ranks in self.collectives.items()]
        parts += [f"'{name}' (ranks not recorded yet)" for name in self.unknown]
        who = "the launcher stopped the job" if self.by_launcher else "Horovod shut the job down"
        what = (f"{who}: ranks stalled for more than "
                f"{self.shutdown_after_s} s (horovod.stall_check_shutdown_time_seconds)" if self.shutdown
                else f"ranks stalled for more than {self.waited_s} s")
        return (f"{what} in collective{'s' if len(parts) > 1 else ''} {'; '.join(parts)}; the ranks called "
                f"different collectives (names or number differ between ranks)")

    def to_json(self) -> dict:
        return {"collectives": self.collectives, "unknown_ranks": list(self.unknown),
                "missing_ranks": {str(r): n for r, n in sorted(self.missing.items())},
                "shutdown": self.shutdown, "waited_s": self.waited_s, "shutdown_after_s": self.shutdown_after_s,
                "source": "launcher (Horovod timeline)" if self.by_launcher else "Horovod stall inspector"}


def parse_stall_reports(text: str) -> list[StallReport]:
    """Every stall report in a log, in order."""
    reports = []
    lines = _PREFIX.sub("", text).splitlines()
    i = 0
    while i < len(lines):
        if _HEAD not in lines[i]:
            i += 1
            continue
        rep = StallReport()
        m = _WAITING.search(lines[i])
        rep.waited_s = int(m.group(1)) if m else None
        i += 1
        while i < len(lines) and not lines[i].startswith("Missing ranks:"):
            i += 1
        i += 1
        while i < len(lines):
            m = _MISSING_LINE.match(lines[i])
            if not m:
                break
            names = [n.strip() for n in m.group(3).split(", ")]
            rep.missing[int(m.group(1))] = [n.removesuffix(" ...") for n in names if n and n != "..."]
            rep.shutdown = rep.shutdown or bool(m.group(2))
            i += 1
        if i < len(lines):
            m = _SHUTDOWN.search(lines[i])
            if m:
                rep.shutdown, rep.shutdown_after_s = True, int(m.group(1))
        if rep.missing:
            reports.append(rep)
    return reports


_EVENT = re.compile(r'\{"(?:name|ph)"[^{}]*(?:\{[^{}]*\}[^{}]*)?\}')


class TimelineWatch:
    """Follows Horovod's timeline (a JSON array rank 0 appends to) and keeps every open negotiation:
    collective name -> (start in seconds since the epoch, ranks that submitted it)."""

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self.offset = 0
        self.base_us: Optional[int] = None
        self.names: dict[int, str] = {}                 # timeline pid -> collective name
        self.stack: dict[int, list[str]] = {}           # open activities per pid
        self.open: dict[int, tuple[float, set[int]]] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        text = data.decode("utf-8", "replace")
        consumed = 0
        for m in _EVENT.finditer(text):
            consumed = m.end()
            try:
                self._event(json.loads(m.group(0)))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
        self.offset += len(text[:consumed].encode("utf-8"))

    def _event(self, ev: dict) -> None:
        pid, ph = ev.get("pid"), ev.get("ph")
        if ph == "M":
            args = ev.get("args") or {}
            if "start_time_since_epoch_in_micros" in args:
                self.base_us = int(args["start_time_since_epoch_in_micros"])
            elif ev.get("name") == "process_name" and "name" in args:
                self.names[pid] = str(args["name"])
        elif ph == "B":
            self.stack.setdefault(pid, []).append(str(ev.get("name")))
            if str(ev.get("name")).startswith("NEGOTIATE") and self.base_us is not None:
                self.open[pid] = ((self.base_us + int(ev.get("ts", 0))) / 1e6, set())
        elif ph == "X" and pid in self.open and str(ev.get("name", "")).isdigit():
            self.open[pid][1].add(int(ev["name"]))
        elif ph == "E" and self.stack.get(pid):
            if self.stack[pid].pop().startswith("NEGOTIATE"):
                self.open.pop(pid, None)

    def stalled(self, now: float, older_than: float) -> Optional[StallReport]:
        """The collectives whose negotiation has been open longer than ``older_than`` seconds."""
        rep = StallReport(shutdown=True, shutdown_after_s=int(older_than), by_launcher=True)
        for pid, (start, ready) in sorted(self.open.items()):
            if now - start <= older_than:
                continue
            name = self.names.get(pid, f"timeline pid {pid}")
            if not ready:           # some rank submitted it, but its mark is still in Horovod's buffer
                rep.unknown.append(name)
                continue
            for rank in range(self.size):
                if rank not in ready:
                    rep.missing.setdefault(rank, []).append(name)
        return rep if rep.missing or rep.unknown else None


class StallWatch:
    """Follows the ranks' log files while a job runs and keeps the latest stall report: Horovod's own
    (stall inspector, in the rank logs) or, given a timeline, one found there after ``limit_s``.

    A log is re-read (its last 256 KB) whenever it grows, so a report whose lines arrive over two
    polls is read whole on the second one."""

    TAIL = 256_000

    def __init__(self, timeline: Optional[str] = None, size: int = 0, limit_s: Optional[float] = None):
        self.sizes: dict[str, int] = {}
        self.latest: Optional[StallReport] = None
        self.shutdown_seen_at: Optional[float] = None
        self.timeline = TimelineWatch(timeline, size) if timeline and limit_s else None
        self.limit_s = limit_s
        self.expired = False        # the timeline showed a stall past the limit: stop the job now

    def poll(self, rank_logs: dict[int, dict[str, str]], now: float) -> Optional[StallReport]:
        if self.timeline is not None and not self.expired:
            self.timeline.poll()
            found = self.timeline.stalled(now, self.limit_s)
            if found is not None:
                self.latest, self.expired = found, True
                return found
        for entry in rank_logs.values():
            # Horovod logs to stdout or stderr depending on the controller
            for path in (entry.get("stderr"), entry.get("stdout")):
                self._read_log(path, now)
        return self.latest

    def _read_log(self, path: Optional[str], now: float) -> None:
        try:
            size = os.path.getsize(path) if path else -1
        except OSError:
            return
        if size <= self.sizes.get(path, 0):
            return
        self.sizes[path] = size
        reports = parse_stall_reports(_tail(path, self.TAIL))
        if reports and not (self.latest is not None and self.latest.by_launcher):
            self.latest = reports[-1]
            if self.latest.shutdown and self.shutdown_seen_at is None:
                self.shutdown_seen_at = now


def _tail(path: str, nbytes: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class JobError:
    """The last line a reference job printed before exiting 1 (see ``ranger_hvd.jobs.__main__``)."""

    rank: int
    message: str
    config: bool     # a config, data or checkpoint problem ("error:"): a restart cannot cure it

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.message}"


def job_error(rank_logs: dict[int, dict[str, str]], prefer_rank: Optional[int] = None) -> Optional[JobError]:
    """The ``ranger_hvd.jobs (rank N): error|failed: ...`` line of the preferred rank, else of the
    lowest rank that printed one."""
    order = sorted(rank_logs)
    if prefer_rank in rank_logs:
        order.remove(prefer_rank)
        order.insert(0, prefer_rank)
    for rank in order:
        path = rank_logs[rank].get("stderr")
        found = _JOB_ERROR.findall(_PREFIX.sub("", _tail(path, 200_000))) if path else []
        if found:
            r, kind, msg = found[-1]
            return JobError(rank=int(r), message=msg.strip(), config=kind == "error")
    return None


# What horovodrun / mpirun / ssh print when the job could not start on a host (no rank ever ran).
_START_FAILURES = (
    (re.compile(r"ssh: connect to host (\S+) port (\d+): ([^\n]+)"),
     lambda m: f"ssh to {m.group(1)} port {m.group(2)} failed: {m.group(3).strip()} (is sshd running there? "
               f"cluster.ssh_port)"),
    (re.compile(r"ssh: Could not resolve hostname (\S+?):? ([^\n]+)"),
     lambda m: f"host {m.group(1)} does not resolve: {m.group(2).strip()}"),
    (re.compile(r"Host key verification failed"),
     lambda m: "ssh refused a host whose key is not in known_hosts (Open MPI's ssh checks host keys; "
               "add them with ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts)"),
    (re.compile(r"Permission denied \(publickey"),
     lambda m: "ssh refused the login (check cluster.ssh_identity_file and the host's authorized_keys)"),
    (re.compile(r"ORTE was unable to reliably start one or more daemons"),
     lambda m: "Open MPI could not start its daemons on the hosts (ORTE); see horovodrun.log"),
)


def start_failure(launcher_log: str) -> Optional[str]:
    """Why the job never started on some host, from horovodrun.log (None if nothing known is there).
    Several findings are joined, most specific first (an ssh error explains ORTE's)."""
    found = []
    for pattern, say in _START_FAILURES:
        m = pattern.search(launcher_log)
        if m:
            found.append(say(m))
    return "; ".join(found) if found else None
