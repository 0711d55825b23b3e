"""Property test (issue 31): for every string-valued config key, a generated hostile value (shell
metacharacters, quotes, control characters, leading dashes, Unicode separators) is either refused by
validation (exit 2, the key named) or reaches each program as one unchanged argument.  "Reaches" is
checked on the lines horovodrun 0.28.1 itself builds for ``sh -c`` (made by Horovod's own functions, see
horovod_lines.py), on the sbatch script (``bash -n``, sbatch's own word splitting, ``shlex``) and on
the elastic discovery script.  In-process, no job runs: a few seconds."""

import contextlib
import io
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis")
pytest.importorskip("horovod.runner")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ranger_hvd.launcher import cli  # noqa: E402
from ranger_hvd.launcher.run.command import build_command  # noqa: E402
from ranger_hvd.config import ConfigError, load_config, read_run_config  # noqa: E402
from ranger_hvd.config.checks import mpi_arg_list  # noqa: E402
from ranger_hvd.launcher.run.elastic import hosts_file, script_text  # noqa: E402
from ranger_hvd.launcher.run.rundir import planned_run_dir  # noqa: E402
from ranger_hvd.launcher.slurm.batch import render_sbatch, script_paths_problem  # noqa: E402
from ranger_hvd.config.slurm import owned_option, sbatch_words  # noqa: E402

from .horovod_lines import discovery_line, gloo_rank_lines, mpirun_line, ssh_check_line  # noqa: E402

CHARS = list(" \t\n\r\x00\x01\x1b\x7f\x85\u2028\u00a0;&|$`'\"\\()<>*?[]{}#~!%=:,@^-+.") + list("abzXZ09_é")
PAYLOADS = ["a b;touch MARK;$(touch MARK)", "$(touch MARK)", "`touch MARK`", "x'y\"z", "-oProxyCommand=touch MARK",
            "--help", "a\nb", "%j%%x", "hetjob", "#SBATCH -J x", "\\", "'", "~root", "-", "--", "a\x00b", "\u2028"]
# odd but often valid: these reach the command lines (most hostile values are refused before)
ODD = list("abzXZ09_.-+:@%,=~ $;'\"")
HOSTILE = st.one_of(st.text(st.sampled_from(CHARS), min_size=1, max_size=16), st.sampled_from(PAYLOADS),
                    st.text(st.sampled_from(ODD), min_size=1, max_size=12))
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PYTHON, PROJECT = "/venv/bin/python", "/project"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def outcome(root: Path, cfg: dict, key: str):
    """The resolved config, or None after checking that validation refused it: exit 2, the key named."""
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        return load_config(path, cwd=root)
    except ConfigError as exc:
        assert any(p.path.split("[")[0].startswith(key) for p in exc.problems), (key, exc.problems)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["validate", str(path)]) == 2
        assert key in err.getvalue()
        return None


class Launch:
    """An accepted config's horovodrun command, as a dry run builds it (the dry-run line parses back to it)."""

    def __init__(self, res):
        self.run_dir = str(planned_run_dir(res, now=0).absolute())
        self.cmd = build_command(res, self.run_dir, python=PYTHON, environ={"HOME": "/h"}, uid=0,
                                 project_root=PROJECT)
        assert shlex.split(self.cmd.line) == self.cmd.argv

    def mpirun(self) -> list[str]:
        return words(mpirun_line(self.cmd.argv, self.cmd.env))

    def gloo_rank(self, host: str = "localhost") -> tuple[list[str], str]:
        local, remote = gloo_rank_lines(self.cmd.argv, self.cmd.env, host=host)
        return words(local), remote


def accepted(root: Path, cfg: dict, key: str):
    """Launch of the config, or None when validation refused it (checked as in :func:`outcome`)."""
    res = outcome(root, cfg, key)
    return None if res is None else Launch(res)


def base(**cluster) -> dict:
    return {"job": {"name": "t", "entry": "tests.launcher.tiny_job"},
            "cluster": {"np": 1, "hosts": ["localhost:1"], "preflight": False, **cluster}}


def words(line: str) -> list[str]:
    return shlex.split(line)


def contains(seq: list[str], part: list[str]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def make_file(root: Path, name: str, executable: bool = False):
    """A file named ``name`` in ``root`` (None when no file system takes such a name)."""
    if "\x00" in name or "/" in name or name in (".", ".."):
        return None
    path = root / name
    try:
        path.write_text("#!/bin/sh\necho localhost:1\n")
    except (OSError, ValueError):
        return None
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@FAST
@given(value=HOSTILE, controller=st.sampled_from(["gloo", "mpi"]))
def test_output_dir(root, value, controller):
    out = str(root / ("d" + value))
    if (run := accepted(root, {**base(controller=controller), "output": {"dir": out}}, "output.dir")) is None:
        return
    assert run.run_dir.startswith(os.path.normpath(out) + "/")
    tail = ["--config", f"{run.run_dir}/config.yaml", "--run-dir", run.run_dir]
    if controller == "mpi":
        assert contains(run.mpirun(), ["--output-filename", f"{run.run_dir}/logs"]) and contains(run.mpirun(), tail)
    else:
        assert contains(run.gloo_rank()[0], tail)


@FAST
@given(value=HOSTILE)
def test_env_value(root, value):
    if (run := accepted(root, base(env=[f"V={value}"]), "cluster.env")) is None:
        return
    assert run.cmd.env["V"] == value
    local, remote = run.gloo_rank(host="node7")
    assert f"V={value}" in local
    on_host = words(remote)[-1]          # what the remote shell runs: cd CWD ...; the rank's command
    assert on_host.startswith(f"cd {os.getcwd()} ") and f"V={value}" in words(on_host.split(" ; ", 1)[1])
    run = accepted(root, base(env=[f"V={value}"], controller="mpi"), "cluster.env")
    assert contains(run.mpirun(), ["-x", "V"]) and run.cmd.env["V"] == value


@FAST
@given(value=HOSTILE)
def test_env_name(root, value):
    if (run := accepted(root, base(env=[f"{value}=1"]), "cluster.env")) is not None:
        assert f"{value}=1" in run.gloo_rank()[0]


@FAST
@given(value=HOSTILE)
def test_host(root, value):
    if (run := accepted(root, base(hosts=[f"{value}:1"]), "cluster.hosts")) is not None:
        ssh = words(ssh_check_line(run.cmd.argv, value))
        assert ssh[ssh.index("StrictHostKeyChecking=no") + 1] == value and not value.startswith("-")
        assert f"{value}:1" in run.mpirun()


@FAST
@given(value=HOSTILE)
def test_network_interface(root, value):
    run = accepted(root, base(network_interfaces=[value], controller="mpi"), "cluster.network_interfaces")
    if run is not None:
        assert contains(run.mpirun(), ["btl_tcp_if_include", value])


@FAST
@given(value=HOSTILE, as_string=st.booleans())
def test_mpi_args(root, value, as_string):
    given_args = f"--x {value}" if as_string else ["--x", value]
    if (run := accepted(root, base(controller="mpi", mpi_args=given_args), "cluster.mpi_args")) is not None:
        assert contains(run.mpirun(), mpi_arg_list(given_args))


@FAST
@given(value=HOSTILE, controller=st.sampled_from(["gloo", "mpi"]))
def test_ssh_identity_file(root, value, controller):
    if (key := make_file(root, "k" + value)) is None:
        return
    run = accepted(root, base(controller=controller, ssh_identity_file=str(key)), "cluster.ssh_identity_file")
    if run is None:
        return
    assert contains(words(ssh_check_line(run.cmd.argv, "node7")), ["-i", str(key)])
    if controller == "mpi":   # inside "...", then split at white space by Open MPI
        line = run.mpirun()
        assert line[line.index("plm_rsh_args") + 1].split() == ["-i", str(key)]


@FAST
@given(value=HOSTILE)
def test_ssh_known_hosts_file(root, value):
    if (known := make_file(root, "h" + value)) is None:
        return
    run = accepted(root, base(controller="mpi", ssh_known_hosts_file=str(known)), "cluster.ssh_known_hosts_file")
    if run is not None:
        line = run.mpirun()
        agent = line[line.index("plm_rsh_agent") + 1]
        assert agent.split() == ["ssh", "-o", f"UserKnownHostsFile={known}"]   # Open MPI splits it at spaces


@FAST
@given(value=HOSTILE)
def test_discovery_script(root, value):
    if (script := make_file(root, "s" + value, executable=True)) is None:
        return
    cfg = base(elastic={"min_np": 1, "discovery_script": str(script)})
    del cfg["cluster"]["hosts"]
    if (run := accepted(root, cfg, "cluster.elastic.discovery_script")) is not None:
        assert words(discovery_line(run.cmd.argv)) == [str(script)]


@FAST
@given(value=HOSTILE)
def test_generated_discovery_script_in_a_hostile_run_dir(root, value):
    cfg = {**base(elastic={"min_np": 1}), "output": {"dir": str(root / ("e" + value))}}
    if (run := accepted(root, cfg, "output.dir")) is None:
        return
    assert words(discovery_line(run.cmd.argv)) == [f"{run.run_dir}/elastic/discover-hosts.sh"]
    text = script_text(hosts_file(run.run_dir))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert words(text.splitlines()[-1])[-1] == str(hosts_file(run.run_dir))


@FAST
@given(value=HOSTILE)
def test_paths_only_the_jobs_read(root, value):
    cfg = {**base(), "data": {"dataset": "mnist", "dir": str(root / ("m" + value))}}
    if (res := outcome(root, cfg, "data.dir")) is not None:
        written = root / "run-config.yaml"
        written.write_text(yaml.safe_dump(res.resolved_dict()))
        assert read_run_config(written).data.dir == res.config.data.dir   # the rank reads what was resolved


@FAST
@given(value=HOSTILE, key=st.sampled_from(["job.name", "job.entry"]))
def test_job_names(root, value, key):
    cfg = base()
    cfg["job"][key.split(".")[1]] = value
    if (run := accepted(root, cfg, key)) is None:
        return
    if key == "job.name":
        assert Path(run.run_dir).parent.name == value
    else:
        assert contains(run.cmd.argv, [PYTHON, "-m", value])


SLURM_KEYS = ["partition", "account", "time", "modules", "sbatch_lines", "setup", "output.dir"]


def sbatch_options(script: str) -> list[list[str]]:
    """The words sbatch reads from each #SBATCH line (up to the first command, as sbatch does)."""
    out = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            out.append(sbatch_words(line[len("#SBATCH"):]))
    return out


@pytest.mark.parametrize("key", SLURM_KEYS)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=HOSTILE)
def test_slurm_script(root, value, key):
    slurm = {"time": "10"}
    cfg = {**base(scheduler="slurm", slurm=slurm), "output": {"dir": str(root / "runs")}}
    del cfg["cluster"]["hosts"]
    if key == "output.dir":
        cfg["output"]["dir"] = str(root / ("o" + value))
    elif key in ("modules", "sbatch_lines", "setup"):
        slurm[key] = [{"modules": value, "sbatch_lines": f"--comment={value}", "setup": f"echo {value}"}[key]]
    else:
        slurm[key] = value
    res = outcome(root, cfg, key if key == "output.dir" else f"cluster.slurm.{key}")
    if res is None:
        return
    run_dir = str(planned_run_dir(res, now=0).absolute())
    workdir = str(root / ("w" + value))
    if script_paths_problem(run_dir, workdir):     # launch refuses these before writing the script
        assert any(c in workdir + run_dir for c in "\n\r\t\x00\x01\x1b\x7f\x85\u2028") or "hetjob" in value
        return
    script = render_sbatch(res, run_dir, python=PYTHON, project_root=PROJECT, workdir=workdir)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    options = sbatch_options(script)
    flat = [w for ws in options for w in ws]
    assert f"--output={run_dir.replace('%', '%%')}/slurm-%j.out" in flat
    assert f"--chdir={workdir}" in flat
    assert sum(1 for w in flat if owned_option(w) == "job-name") == 1      # none set twice
    assert words(script.splitlines()[-1]) == ["exec", PYTHON, "-m", "ranger_hvd.launcher.slurm.allocation", run_dir]
    if key in ("partition", "account", "time"):
        assert [f"--{key}={value}"] in options
    if key == "modules":
        assert ["module", "load", value] in [words(line) for line in script.splitlines() if line.startswith("module")]
    if key == "setup":
        assert f"\necho {value}\n" in script
