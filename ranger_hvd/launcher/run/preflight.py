"""Checks every remote host of a multi-host launch before anything starts, the way the chosen controller
will reach it, so a host that would make horovodrun or mpirun fail (after a long wait, with ORTE's
vague "unable to start daemons") is named up front with its fix.

Per host that is not this machine: the ssh port answers (TCP, short timeout); an ssh login in BatchMode
with cluster.ssh_port / cluster.ssh_identity_file succeeds (Gloo: host keys not checked, as horovodrun's
own ssh does; MPI: checked against known_hosts, as mpirun's plain ssh does); the remote side has this
interpreter (sys.executable) and imports ranger_hvd and horovod with the same versions from the same
repository path.  Hosts are checked concurrently with a bounded total time.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ranger_hvd.config import Resolved

TCP_TIMEOUT_S = 3.0
SSH_CONNECT_TIMEOUT_S = 5
HOST_TIMEOUT_S = 25.0      # one host's ssh login and remote imports
TOTAL_TIMEOUT_S = 40.0     # every host together (they run concurrently)
DEFAULT_SSH_PORT = 22

# Printed by the remote side: what it runs and imports (stdout's last line, JSON).
_REMOTE_PROBE = (
    "import json, sys\n"
    "out = {'executable': sys.executable}\n"
    "try:\n"
    "    import ranger_hvd, horovod\n"
    "    out.update(ranger_hvd=ranger_hvd.__version__, horovod=horovod.__version__,\n"
    "               ranger_hvd_file=ranger_hvd.__file__)\n"
    "except Exception as exc:\n"
    "    out['import_error'] = f'{type(exc).__name__}: {exc}'\n"
    "print(json.dumps(out))\n"
)


class PreflightError(Exception):
    """Some hosts cannot run the job; ``problems`` maps each host to why and how to fix it."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__(format_problems(problems))


def format_problems(problems: dict[str, str]) -> str:
    lines = [f"preflight: {len(problems)} host(s) cannot run the job (nothing was started):"]
    lines += [f"  {host}: {why}" for host, why in sorted(problems.items())]
    lines.append("  (skip this check with cluster.preflight=false)")
    return "\n".join(lines)


@dataclass(frozen=True)
class LocalEnv:
    """What every remote host must match."""
    python: str
    project_root: str
    ranger_hvd: str
    horovod: str
    cwd: str


def local_env(project_root: str) -> LocalEnv:
    import horovod

    import ranger_hvd
    return LocalEnv(python=sys.executable, project_root=project_root, ranger_hvd=ranger_hvd.__version__,
                    horovod=horovod.__version__, cwd=os.getcwd())


def local_names() -> set[str]:
    """Names and addresses that mean this machine (horovodrun starts those ranks without ssh)."""
    import psutil

    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                names.add(a.address.split("%")[0])
    return names


def is_local(host: str, names: Optional[set[str]] = None) -> bool:
    names = local_names() if names is None else names
    if host in names or host.startswith("127."):
        return True
    try:   # a name that resolves to one of this machine's addresses (e.g. /etc/hosts)
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return any(i[4][0] in names or i[4][0].startswith("127.") for i in infos)


def ssh_options(res: Resolved, *, check_host_key: bool) -> list[str]:
    """The ssh options of the controller's ssh: horovodrun's (Gloo) skips the host-key check, mpirun's
    (MPI) keeps it, against cluster.ssh_known_hosts_file when that is set."""
    cl = res.config.cluster
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", "-o", "LogLevel=ERROR",
            "-p", str(cl.ssh_port or DEFAULT_SSH_PORT)]
    if cl.ssh_identity_file:
        opts += ["-i", cl.ssh_identity_file]
    if check_host_key:
        opts += ["-o", "StrictHostKeyChecking=yes"]
        if cl.ssh_known_hosts_file:
            opts += ["-o", f"UserKnownHostsFile={cl.ssh_known_hosts_file}"]
    else:
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    return opts


def remote_script(env: LocalEnv) -> str:
    """Shell text run on the host: says plainly when the interpreter is missing.  Like horovodrun's own
    remote command it changes to this working directory when that exists there."""
    py, cwd = shlex.quote(env.python), shlex.quote(env.cwd)
    return (f"cd {cwd} >/dev/null 2>&1; "
            f"[ -x {py} ] || {{ echo '{{\"missing\": \"python\"}}'; exit 0; }}; "
            f"PYTHONPATH={shlex.quote(env.project_root)} exec {py} -c {shlex.quote(_REMOTE_PROBE)}")


def ssh_failure(host: str, port: int, stderr: str, res: Resolved) -> str:
    """The fix for a failed ssh login, from ssh's own words."""
    known = res.config.cluster.ssh_known_hosts_file or "~/.ssh/known_hosts"
    if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr \
            or "host key is known" in stderr:
        return (f"its ssh host key is not in {known} (Open MPI's ssh checks host keys; horovodrun's Gloo "
                f"ssh does not): ssh-keyscan -p {port} {host} >> {known}")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return f"its ssh host key changed: check the host, then ssh-keygen -R '[{host}]:{port}' -f {known}"
    if "Permission denied" in stderr:
        return (f"ssh refused the login ({stderr.strip().splitlines()[-1]}): check cluster.ssh_identity_file "
                f"and {host}'s authorized_keys")
    if "Could not resolve hostname" in stderr:
        return "the name does not resolve: fix cluster.hosts or /etc/hosts"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    return f"ssh -p {port} {host} failed: {last}"


def env_mismatch(host: str, report: dict, env: LocalEnv) -> Optional[str]:
    install = (f"install the environment at {env.project_root} on {host} "
               f"(launch/multihost-ssh.sh sync {host})")
    if report.get("missing") == "python":
        return f"the interpreter {env.python} does not exist there: {install}"
    if "import_error" in report:
        return f"{env.python} cannot import ranger_hvd and horovod ({report['import_error']}): {install}"
    diffs = []
    for key, here in (("ranger_hvd", env.ranger_hvd), ("horovod", env.horovod)):
        if report.get(key) != here:
            diffs.append(f"{key} {report.get(key)} there, {here} here")
    rfile = report.get("ranger_hvd_file", "")
    if not str(rfile).startswith(env.project_root.rstrip("/") + "/"):
        diffs.append(f"ranger_hvd imported from {rfile}, not from {env.project_root}")
    return f"{'; '.join(diffs)}: {install}" if diffs else None


def check_host(host: str, res: Resolved, env: LocalEnv) -> Optional[str]:
    """Why HOST cannot run the job (None: it can)."""
    cl = res.config.cluster
    port = cl.ssh_port or DEFAULT_SSH_PORT
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            pass
    except socket.gaierror as exc:
        return f"the name does not resolve ({exc}): fix cluster.hosts or /etc/hosts"
    except OSError as exc:
        return f"ssh port {port} does not answer ({exc}): start sshd on {host} / check cluster.ssh_port"
    argv = ["ssh", *ssh_options(res, check_host_key=cl.controller == "mpi"), host, remote_script(env)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=HOST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"ssh -p {port} {host} did not finish within {HOST_TIMEOUT_S:.0f} s"
    if r.returncode == 255:
        return ssh_failure(host, port, r.stderr, res)
    lines = r.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    if not report:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the remote check printed nothing usable (exit {r.returncode}: {tail})"
    return env_mismatch(host, report, env)


def remote_hosts(res: Resolved) -> list[str]:
    names = local_names()
    return [h for h, _ in res.hosts if not is_local(h, names)]


def run_preflight(res: Resolved, project_root: str) -> list[str]:
    """Checks every remote host concurrently; returns the hosts checked, raises PreflightError."""
    hosts = remote_hosts(res)
    if not hosts:
        return []
    env = local_env(project_root)
    problems: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=min(16, len(hosts)))
    futures = {pool.submit(check_host, h, res, env): h for h in hosts}
    done, pending = wait(futures, timeout=TOTAL_TIMEOUT_S)
    for fut in done:
        why = fut.result()
        if why:
            problems[futures[fut]] = why
    for fut in pending:
        problems[futures[fut]] = f"no answer within {TOTAL_TIMEOUT_S:.0f} s (ssh hangs?)"
    pool.shutdown(wait=False, cancel_futures=True)
    if problems:
        raise PreflightError(problems)
    return hosts


def default_project_root() -> str:
    import ranger_hvd
    return str(Path(ranger_hvd.__file__).resolve().parents[1])
