"""Elastic mode on the launcher's side: the host discovery script, and the resize events for summary.json.

Without ``cluster.elastic.discovery_script`` the launcher writes two files into the run directory:

* ``elastic/hosts``: one ``host:slots`` line per host of ``cluster.hosts`` (``#`` comments allowed).
  Edit it while the job runs: a removed line takes the host away (horovodrun stops its workers and
  the others continue), an added one offers a new host;
* ``elastic/discover-hosts.sh``: what horovodrun runs (about once a second) to learn the hosts; it
  prints the hosts file without comments and blank lines.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from ranger_hvd.config import Resolved
from ranger_hvd.launcher.quoting import for_horovodrun
from ranger_hvd.rundir import layout

ELASTIC_DIR = "elastic"
HOSTS_FILE = "hosts"
SCRIPT_FILE = "discover-hosts.sh"


def hosts_file(run_dir) -> Path:
    return Path(run_dir) / ELASTIC_DIR / HOSTS_FILE


def discovery_script(res: Resolved, run_dir) -> str:
    """The script horovodrun runs: the user's, or the one written into the run directory."""
    el = res.config.cluster.elastic
    if el is not None and el.discovery_script is not None:
        return el.discovery_script
    return str(Path(run_dir) / ELASTIC_DIR / SCRIPT_FILE)


def hosts_text(res: Resolved) -> str:
    lines = ["# hosts offered to the elastic job, one host:slots per line; edit while it runs:",
             "# a removed line takes the host away, an added one offers a new host"]
    return "\n".join(lines + [f"{h}:{s}" for h, s in res.hosts]) + "\n"


def script_text(hosts_path) -> str:
    return ("#!/bin/sh\n"
            "# horovodrun's host discovery (elastic mode), written by ranger-hvd: the hosts file without\n"
            "# comments and blank lines, one host:slots line per available host\n"
            f"exec sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' {shlex.quote(str(hosts_path))}\n")


def write_discovery_files(run_dir, res: Resolved) -> Optional[Path]:
    """Writes elastic/hosts and elastic/discover-hosts.sh (executable) unless the config names its own
    script or elastic mode is off; returns the script's path (None when nothing was written)."""
    el = res.config.cluster.elastic
    if el is None or el.discovery_script is not None:
        return None
    hosts = hosts_file(run_dir)
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(hosts_text(res))
    script = Path(discovery_script(res, run_dir))
    script.write_text(script_text(hosts))
    os.chmod(script, 0o755)
    return script


LOCAL_HOSTS = ("localhost", "127.0.0.1")


def only_local_hosts(res: Resolved) -> bool:
    return bool(res.hosts) and all(h in LOCAL_HOSTS for h, _ in res.hosts)


def elastic_flags(res: Resolved, run_dir) -> list[str]:
    """horovodrun's elastic arguments (empty when elastic mode is off)."""
    el = res.config.cluster.elastic
    if el is None:
        return []
    a = ["--min-np", str(el.min_np)]
    if res.config.cluster.network_interfaces is None and only_local_hosts(res):
        # horovodrun's elastic driver waits for a second host to find the common interfaces unless told
        a += ["--network-interfaces", "lo"]
    if el.max_np is not None:
        a += ["--max-np", str(el.max_np)]
    # horovodrun runs the script through sh -c, with its path as the whole command line
    a += ["--host-discovery-script", for_horovodrun(discovery_script(res, run_dir))]
    if el.slots_per_host is not None:
        a += ["--slots-per-host", str(el.slots_per_host)]
    if el.reset_limit is not None:
        a += ["--reset-limit", str(el.reset_limit)]
    if el.elastic_timeout is not None:
        a += ["--elastic-timeout", str(el.elastic_timeout)]
    return a


def elastic_summary(res: Resolved, records: list[dict]) -> Optional[dict]:
    """summary.json's ``elastic`` entry: the bounds and every resize the job recorded in metrics.jsonl."""
    el = res.config.cluster.elastic
    if el is None:
        return None
    events = [r for r in records if r.get("event") == layout.RESET_EVENT]
    end = next((r for r in reversed(records) if r.get("event") == layout.END_EVENT), None)
    return {"min_np": el.min_np, "max_np": el.max_np, "start_np": res.np,
            "final_size": (end or {}).get("size"), "resets": len(events), "events": events}
