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
from ranger_hvd.launcher.command import build_command  # noqa: E402
from ranger_hvd.launcher.config import ConfigError, load_config, read_run_config  # noqa: E402
from ranger_hvd.launcher.config.checks import mpi_arg_list  # noqa: E402
from ranger_hvd.launcher.elastic import hosts_file, script_text  # noqa: E402
from ranger_hvd.launcher.rundir import planned_run_dir  # noqa: E402
from ranger_hvd.launcher.slurm import render_sbatch, script_paths_problem  # noqa: E402
from ranger_hvd.launcher.slurm_config import owned_option, sbatch_words  # noqa: E402

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


def base(**cluster) -> dict:
    return {"job": {"name": "t", "entry": "tests.launcher.tiny_job"},
            "cluster": {"np": 1, "hosts": ["localhost:1"], "preflight": False, **cluster}}


def command(res):
    run_dir = str(planned_run_dir(res, now=0).absolute())
    return run_dir, build_command(res, run_dir, python=PYTHON, environ={"HOME": "/h"}, uid=0, project_root=PROJECT)


def words(line: str) -> list[str]:
    return shlex.split(line)


def contains(seq: list[str], part: list[str]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def check_common(cmd) -> None:
    assert shlex.split(cmd.line) == cmd.argv          # the dry-run line is the argv


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
    res = outcome(root, {**base(controller=controller), "output": {"dir": str(root / ("d" + value))}}, "output.dir")
    if res is None:
        return
    run_dir, cmd = command(res)
    assert run_dir.startswith(os.path.normpath(str(root / ("d" + value))) + "/")
    check_common(cmd)
    tail = ["--config", f"{run_dir}/config.yaml", "--run-dir", run_dir]
    if controller == "mpi":
        line = words(mpirun_line(cmd.argv, cmd.env))
        assert contains(line, ["--output-filename", f"{run_dir}/logs"]) and contains(line, tail)
    else:
        local, _ = gloo_rank_lines(cmd.argv, cmd.env)
        assert contains(words(local), tail)


@FAST
@given(value=HOSTILE)
def test_env_value(root, value):
    res = outcome(root, base(env=[f"V={value}"]), "cluster.env")
    if res is None:
        return
    _, cmd = command(res)
    assert cmd.env["V"] == value
    local, remote = gloo_rank_lines(cmd.argv, cmd.env, host="node7")
    assert f"V={value}" in words(local)
    on_host = words(remote)[-1]          # what the remote shell runs: cd CWD ...; the rank's command
    assert on_host.startswith(f"cd {os.getcwd()} ") and f"V={value}" in words(on_host.split(" ; ", 1)[1])
    res = outcome(root, base(env=[f"V={value}"], controller="mpi"), "cluster.env")
    _, cmd = command(res)
    assert contains(words(mpirun_line(cmd.argv, cmd.env)), ["-x", "V"]) and cmd.env["V"] == value


@FAST
@given(value=HOSTILE)
def test_env_name(root, value):
    res = outcome(root, base(env=[f"{value}=1"]), "cluster.env")
    if res is not None:
        _, cmd = command(res)
        assert f"{value}=1" in words(gloo_rank_lines(cmd.argv, cmd.env)[0])


@FAST
@given(value=HOSTILE)
def test_host(root, value):
    res = outcome(root, base(hosts=[f"{value}:1"]), "cluster.hosts")
    if res is None:
        return
    _, cmd = command(res)
    ssh = words(ssh_check_line(cmd.argv, value))
    assert ssh[ssh.index("StrictHostKeyChecking=no") + 1] == value and not value.startswith("-")
    assert f"{value}:1" in words(mpirun_line(cmd.argv, cmd.env))


@FAST
@given(value=HOSTILE)
def test_network_interface(root, value):
    res = outcome(root, base(network_interfaces=[value], controller="mpi"), "cluster.network_interfaces")
    if res is not None:
        _, cmd = command(res)
        assert contains(words(mpirun_line(cmd.argv, cmd.env)), ["btl_tcp_if_include", value])


@FAST
@given(value=HOSTILE, as_string=st.booleans())
def test_mpi_args(root, value, as_string):
    given_args = f"--x {value}" if as_string else ["--x", value]
    res = outcome(root, base(controller="mpi", mpi_args=given_args), "cluster.mpi_args")
    if res is None:
        return
    _, cmd = command(res)
    check_common(cmd)
    expected = mpi_arg_list(given_args)
    assert contains(words(mpirun_line(cmd.argv, cmd.env)), expected)


@FAST
@given(value=HOSTILE, controller=st.sampled_from(["gloo", "mpi"]))
def test_ssh_identity_file(root, value, controller):
    key = make_file(root, "k" + value)
    if key is None:
        return
    res = outcome(root, base(controller=controller, ssh_identity_file=str(key)), "cluster.ssh_identity_file")
    if res is None:
        return
    _, cmd = command(res)
    assert contains(words(ssh_check_line(cmd.argv, "node7")), ["-i", str(key)])
    if controller == "mpi":   # inside "...", then split at white space by Open MPI
        line = words(mpirun_line(cmd.argv, cmd.env))
        assert line[line.index("plm_rsh_args") + 1].split() == ["-i", str(key)]


@FAST
@given(value=HOSTILE)
def test_ssh_known_hosts_file(root, value):
    known = make_file(root, "h" + value)
    if known is None:
        return
    res = outcome(root, base(controller="mpi", ssh_known_hosts_file=str(known)), "cluster.ssh_known_hosts_file")
    if res is None:
        return
    _, cmd = command(res)
    line = words(mpirun_line(cmd.argv, cmd.env))
    agent = line[line.index("plm_rsh_agent") + 1]
    assert agent.split() == ["ssh", "-o", f"UserKnownHostsFile={known}"]   # Open MPI splits it at spaces


@FAST
@given(value=HOSTILE)
def test_discovery_script(root, value):
    script = make_file(root, "s" + value, executable=True)
    if script is None:
        return
    cfg = base(elastic={"min_np": 1, "discovery_script": str(script)})
    del cfg["cluster"]["hosts"]
    res = outcome(root, cfg, "cluster.elastic.discovery_script")
    if res is not None:
        _, cmd = command(res)
        assert words(discovery_line(cmd.argv)) == [str(script)]


@FAST
@given(value=HOSTILE)
def test_generated_discovery_script_in_a_hostile_run_dir(root, value):
    cfg = {**base(elastic={"min_np": 1}), "output": {"dir": str(root / ("e" + value))}}
    res = outcome(root, cfg, "output.dir")
    if res is None:
        return
    run_dir, cmd = command(res)
    assert words(discovery_line(cmd.argv)) == [f"{run_dir}/elastic/discover-hosts.sh"]
    text = script_text(hosts_file(run_dir))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert words(text.splitlines()[-1])[-1] == str(hosts_file(run_dir))


@FAST
@given(value=HOSTILE)
def test_paths_only_the_jobs_read(root, value):
    cfg = {**base(), "data": {"dataset": "mnist", "dir": str(root / ("m" + value))}}
    res = outcome(root, cfg, "data.dir")
    if res is None:
        return
    written = root / "run-config.yaml"
    written.write_text(yaml.safe_dump(res.resolved_dict()))
    assert read_run_config(written).data.dir == res.config.data.dir   # the rank reads what was resolved


@FAST
@given(value=HOSTILE, key=st.sampled_from(["job.name", "job.entry"]))
def test_job_names(root, value, key):
    cfg = base()
    cfg["job"][key.split(".")[1]] = value
    res = outcome(root, cfg, key)
    if res is None:
        return
    run_dir, cmd = command(res)
    check_common(cmd)
    if key == "job.name":
        assert Path(run_dir).parent.name == value
    else:
        assert contains(cmd.argv, [PYTHON, "-m", value])


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
    assert words(script.splitlines()[-1]) == ["exec", PYTHON, "-m", "ranger_hvd.launcher.slurm_run", run_dir]
    if key in ("partition", "account", "time"):
        assert [f"--{key}={value}"] in options
    if key == "modules":
        assert ["module", "load", value] in [words(line) for line in script.splitlines() if line.startswith("module")]
    if key == "setup":
        assert f"\necho {value}\n" in script
