"""Config -> horovodrun argv and environment (a pure function), and ``launch --dry-run``."""

import shlex
import sys

import pytest

from ranger_hvd.launcher.run.command import build_command
from ranger_hvd.config import load_config

from .conftest import REPO, run_cli, tree

RD = "/runs/t/20250101-000000"
PY = "/venv/bin/python"
ENVIRON = {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "SECRET_TOKEN": "s3cret",
           "FOO": "foo-value", "OMP_NUM_THREADS": "8", "HOROVOD_FUSION_THRESHOLD": "1", "PYTHONPATH": "/extra"}
# on by default: a stalled job ends after 300 s (the warning time is horovodrun's own default, 60 s);
# under Gloo the launcher reads stalls from Horovod's timeline
STALL_MPI = ["--stall-check-shutdown-time-seconds", "300"]
STALL = [*STALL_MPI, "--timeline-filename", f"{RD}/timeline.json"]
TAIL = [PY, "-m", "ranger_hvd.jobs", "--config", f"{RD}/config.yaml", "--run-dir", RD]


def build(tmp_path, text, overrides=(), uid=1000, environ=ENVIRON):
    (tmp_path / "exp.yaml").write_text(text)
    res = load_config(tmp_path / "exp.yaml", list(overrides), cwd=tmp_path)
    return build_command(res, RD, python=PY, environ=environ, uid=uid, project_root="/repo",
                         venv_bin="/venv/bin")


def test_local(tmp_path):
    cmd = build(tmp_path, "job: {name: t}\n")
    assert cmd.argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo",
                        "--output-filename", f"{RD}/logs", *STALL, *TAIL]
    assert cmd.env == {"PATH": "/venv/bin:/usr/bin:/bin", "PYTHONPATH": "/repo:/extra", "HOME": "/home/u",
                       "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


def test_local_np_override_sizes_localhost(tmp_path):
    cmd = build(tmp_path, "job: {name: t}\n", ["cluster.np=4"])
    assert cmd.argv[:6] == ["horovodrun", "-np", "4", "-H", "localhost:4", "--gloo"]


def test_hosts_ssh_and_nics(tmp_path):
    (tmp_path / "key").write_text("k")
    cmd = build(tmp_path, "cluster:\n  hosts: [alpha:2, beta.example.com:1]\n  np: 3\n  ssh_port: 2222\n"
                          "  ssh_identity_file: key\n  network_interfaces: [eth0, eth1]\n  start_timeout: 90\n")
    assert cmd.argv == ["horovodrun", "-np", "3", "-H", "alpha:2,beta.example.com:1", "--gloo",
                        "-p", "2222", "-i", str(tmp_path / "key"), "--network-interfaces", "eth0,eth1",
                        "--start-timeout", "90", "--output-filename", f"{RD}/logs", *STALL,
                        PY, "-m", "ranger_hvd.jobs", "--config", f"{RD}/config.yaml", "--run-dir", RD]


def test_hostfile(tmp_path):
    (tmp_path / "hosts").write_text("# cluster\nnode1 slots=2\n\nnode2 slots=1  # small one\n")
    cmd = build(tmp_path, "cluster: {hostfile: hosts, np: 2}\n")
    # horovodrun 0.28.1's own --hostfile parser fails on comments and blank lines: hosts travel as -H
    assert cmd.argv == ["horovodrun", "-np", "2", "-H", "node1:2,node2:1", "--gloo",
                        "--output-filename", f"{RD}/logs", *STALL, *TAIL]


def test_hostfile_np_defaults_to_total_slots(tmp_path):
    (tmp_path / "hosts").write_text("node1 slots=2\nnode2 slots=3\n")
    cmd = build(tmp_path, "cluster: {hostfile: hosts}\n")
    assert cmd.argv[1:5] == ["-np", "5", "-H", "node1:2,node2:3"]


def test_mpi_as_root_adds_open_mpi_env(tmp_path):
    cmd = build(tmp_path, "cluster: {controller: mpi, mpi_args: '--bind-to none'}\n", uid=0)
    assert cmd.argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--mpi",
                        "--output-filename", f"{RD}/logs", *STALL_MPI, "--mpi-args=--bind-to none", *TAIL]
    assert cmd.env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and cmd.env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


def test_mpi_not_root_adds_nothing(tmp_path):
    cmd = build(tmp_path, "cluster: {controller: mpi}\n", uid=1000)
    assert "--mpi" in cmd.argv
    assert not any(k.startswith("OMPI_") for k in cmd.env)


def test_gloo_as_root_adds_nothing(tmp_path):
    cmd = build(tmp_path, "cluster: {controller: gloo}\n", uid=0)
    assert not any(k.startswith("OMPI_") for k in cmd.env)


def test_tunables(tmp_path):
    cmd = build(tmp_path, """\
horovod:
  fusion_threshold_mb: 32
  cycle_time_ms: 2.5
  cache_capacity: 512
  hierarchical_allreduce: false
  hierarchical_allgather: true
  timeline: true
  timeline_mark_cycles: true
  autotune: true
  autotune_log: true
  autotune_warmup_samples: 2
  autotune_steps_per_sample: 5
  autotune_bayes_opt_max_samples: 10
  autotune_gaussian_process_noise: 0.5
  stall_check: false
  gloo_timeout_seconds: 60
  thread_affinity: 1
  tcp: true
  log_level: DEBUG
  log_timestamp: false
  prefix_output_with_timestamp: true
  disable_cache: true
  verbose: true
""")
    assert cmd.argv == [
        "horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--output-filename", f"{RD}/logs",
        "--fusion-threshold-mb", "32", "--cycle-time-ms", "2.5", "--cache-capacity", "512",
        "--no-hierarchical-allreduce", "--hierarchical-allgather",
        "--timeline-filename", f"{RD}/timeline.json", "--timeline-mark-cycles",
        "--autotune", "--autotune-log-file", f"{RD}/autotune.csv", "--autotune-warmup-samples", "2",
        "--autotune-steps-per-sample", "5", "--autotune-bayes-opt-max-samples", "10",
        "--autotune-gaussian-process-noise", "0.5", "--no-stall-check", "--gloo-timeout-seconds", "60",
        "--thread-affinity", "1", "--tcp", "--log-level", "DEBUG", "--log-without-timestamp",
        "--prefix-output-with-timestamp", "--disable-cache", "--verbose", *TAIL]


def test_issue_example_tunables(tmp_path):
    cmd = build(tmp_path, "horovod: {fusion_threshold_mb: 64, cycle_time_ms: 5, timeline: false, autotune: false, "
                          "log_level: WARNING}\n")
    assert cmd.argv[8:] == ["--fusion-threshold-mb", "64", "--cycle-time-ms", "5", *STALL, "--log-level", "WARNING",
                            *TAIL]


def test_environment_is_minimal(tmp_path):
    cmd = build(tmp_path, "cluster: {env: [FOO, OMP_NUM_THREADS=1, NOT_SET_ANYWHERE]}\n")
    assert cmd.env == {"PATH": "/venv/bin:/usr/bin:/bin", "PYTHONPATH": "/repo:/extra", "HOME": "/home/u",
                       "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "FOO": "foo-value", "OMP_NUM_THREADS": "1"}
    assert cmd.missing_env == ["NOT_SET_ANYWHERE"]
    assert "SECRET_TOKEN" not in cmd.env and "HOROVOD_FUSION_THRESHOLD" not in cmd.env


def test_job_entry_is_configurable(tmp_path):
    cmd = build(tmp_path, "job: {entry: tests.launcher.tiny_job}\n")
    assert cmd.argv[-7:-4] == [PY, "-m", "tests.launcher.tiny_job"]


def test_pure(tmp_path):
    a = build(tmp_path, "cluster: {np: 1}\n")
    b = build(tmp_path, "cluster: {np: 1}\n")
    assert a == b


# ---- through the CLI -------------------------------------------------------------------------------
def test_dry_run_prints_one_copy_pasteable_line_and_env(tmp_path):
    (tmp_path / "exp.yaml").write_text("job: {name: t}\ncluster: {controller: mpi, env: [OMP_NUM_THREADS=1]}\n"
                                       "horovod: {timeline: true}\n")
    r = run_cli(["launch", "exp.yaml", "--dry-run", "compression.density=0.001"], tmp_path,
                env={"SECRET_TOKEN": "x"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("horovodrun ")
    argv = shlex.split(lines[0])
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir.startswith(str(tmp_path / "runs" / "t") + "/")
    assert argv == ["horovodrun", "-np", "2", "-H", "localhost:2", "--mpi", "--output-filename", f"{run_dir}/logs",
                    "--timeline-filename", f"{run_dir}/timeline.json", *STALL_MPI,
                    sys.executable, "-m", "ranger_hvd.jobs", "--config", f"{run_dir}/config.yaml",
                    "--run-dir", run_dir]
    env = dict(ln.strip("# ").split("=", 1) for ln in lines[2:] if "=" in ln and not ln.startswith("# run"))
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)
    assert "SECRET_TOKEN" not in env
    import os
    if os.getuid() == 0:
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert tree(tmp_path) == {"exp.yaml"}  # started nothing, created nothing


def test_dry_run_quotes_awkward_values(tmp_path):
    (tmp_path / "exp.yaml").write_text("cluster: {controller: mpi, mpi_args: '-x A=\"b c\" --bind-to none'}\n")
    r = run_cli(["launch", "exp.yaml", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[0])
    # a string of mpirun arguments is split as a shell would, then each word quoted for horovodrun's sh -c
    assert "--mpi-args=-x 'A=b c' --bind-to none" in argv


def test_sweep_dry_run_lists_every_combination(tmp_path):
    (tmp_path / "exp.yaml").write_text("job: {name: t}\n")
    r = run_cli(["sweep", "exp.yaml", "compression.density=0.1,0.01", "cluster.np=1,2", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(ln) for ln in r.stdout.splitlines() if ln.startswith("horovodrun")]
    assert len(cmds) == 4
    assert [c[2] for c in cmds] == ["1", "2", "1", "2"]
    assert tree(tmp_path) == {"exp.yaml"}


def test_default_config_dry_run_from_repo(tmp_path):
    r = run_cli(["launch", str(REPO / "configs" / "cnn-digits.yaml"), "--dry-run", f"output.dir={tmp_path}"],
                tmp_path)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[0])
    assert argv[:6] == ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]
    assert "--fusion-threshold-mb" in argv and "--cycle-time-ms" in argv
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("text,expected", [("a,b", ["a", "b"]), ("[a:1,b:1],[c:2]", ["[a:1,b:1]", "[c:2]"]),
                                           ("'x,y',z", ["'x,y'", "z"]), ("0.1", ["0.1"])])
def test_sweep_value_split(text, expected):
    from ranger_hvd.launcher.compare.sweep import split_values
    assert split_values(text) == expected


def test_stall_limits(tmp_path):
    """Configurable, on by default; a shutdown shorter than the warning time (which Horovod silently
    ignores) and limits given with the check off are config errors naming the key."""
    cmd = build(tmp_path, "horovod: {stall_check_warning_time_seconds: 5, stall_check_shutdown_time_seconds: 12}\n")
    assert cmd.argv[8:14] == ["--stall-check-warning-time-seconds", "5", "--stall-check-shutdown-time-seconds", "12",
                              "--timeline-filename", f"{RD}/timeline.json"]
    cmd = build(tmp_path, "horovod: {stall_check_shutdown_time_seconds: 0}\n")     # warn only
    assert not any(a.startswith("--stall") or a == "--no-stall-check" for a in cmd.argv)
    assert "--no-stall-check" in build(tmp_path, "horovod: {stall_check: false}\n").argv
    from ranger_hvd.config import ConfigError
    for text, path in (("horovod: {stall_check_warning_time_seconds: 30, stall_check_shutdown_time_seconds: 10}",
                        "horovod.stall_check_shutdown_time_seconds"),
                       ("horovod: {stall_check: false, stall_check_warning_time_seconds: 30}",
                        "horovod.stall_check_warning_time_seconds")):
        with pytest.raises(ConfigError) as exc:
            build(tmp_path, text + "\n")
        assert [p.path for p in exc.value.problems] == [path], str(exc.value)
    r = run_cli(["validate", "exp.yaml"], tmp_path)
    assert r.returncode == 2 and "horovod.stall_check_warning_time_seconds" in r.stderr, r.stderr
    # the run's config.yaml spells out the default limits; with the check off it must still validate
    from ranger_hvd.config import job_config
    (tmp_path / "off.yaml").write_text("horovod: {stall_check: false}\n")
    res = load_config(tmp_path / "off.yaml", cwd=tmp_path)
    assert job_config(res.resolved_dict()).horovod.stall_check is False
