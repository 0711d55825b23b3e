"""Odd and hostile input (issue 31): every case is a clear error with exit 2 that names the key and leaves
nothing behind, or, for odd but valid values, works.  In-process through ``cli.main`` (fast); the real
launches with such values are in test_hostile_launch.py, the generated values in test_hostile_property.py."""

import json
import os

import pytest
import yaml

from ranger_hvd.launcher import cli
from ranger_hvd.config import ConfigError, load_config
from ranger_hvd.config.safety import MAX_CONFIG_BYTES
from ranger_hvd.launcher.quoting import sbatch_path, sbatch_word
from ranger_hvd.launcher.slurm.batch import render_sbatch
from ranger_hvd.config.slurm import owned_option, sbatch_words
from ranger_hvd.launcher.run.supervisor import ran_the_job

from .conftest import assert_refused, tree

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "job: {name: *i}\n"
SLURM = ["cluster.scheduler=slurm"]


def _big_hostfile(tmp_path):
    return {"hosts.txt": "node1 slots=1\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1)}


# (id, config text, extra files {name: text or bytes}, overrides, dotted path named, text in the message)
CASES = [
    # shell metacharacters where horovodrun, ssh or mpirun would have run them
    ("env-name-newline", 'cluster: {env: ["rhvdpwn\\n=1"]}\n', {}, [], "cluster.env[0]", "control characters (\\n)"),
    ("env-name-shell", None, {}, ["cluster.env=['A;touch X=1']"], "cluster.env[0]", "NAME or NAME=VALUE"),
    ("env-value-newline", 'cluster: {env: ["A=x\\ntouch X"]}\n', {}, [], "cluster.env[0]", "control characters"),
    ("host-option", None, {}, ["cluster.hosts=[-Fssh.cfg:1]", "cluster.preflight=false"], "cluster.hosts[0]",
     "not starting with '-'"),
    ("host-trailing-newline", 'cluster: {hosts: ["node1\\n:1"]}\n', {}, [], "cluster.hosts[0]", "control characters"),
    ("host-shell", None, {}, ["cluster.hosts=['a;touch X:1']"], "cluster.hosts[0]", "bad host name"),
    ("hostfile-option-host", "cluster: {hostfile: hosts.txt}\n", {"hosts.txt": "-oProxyCommand=x slots=1\n"}, [],
     "cluster.hostfile", "hosts.txt:1: bad host name"),
    ("hostfile-form-feed", "cluster: {hostfile: hosts.txt}\n", {"hosts.txt": "node1 slots=1\x0cnode2 slots=1\n"},
     [], "cluster.hostfile", "control characters"),
    ("hostfile-not-utf8", "cluster: {hostfile: hosts.txt}\n", {"hosts.txt": b"node1 slots=1\n\xff\xfe\n"}, [],
     "cluster.hostfile", "is not UTF-8 text (byte 0xff on line 2)"),
    ("hostfile-too-big", "cluster: {hostfile: hosts.txt}\n", _big_hostfile, [], "cluster.hostfile", "larger than"),
    ("hostfile-huge-slots", "cluster: {hostfile: hosts.txt}\n", {"hosts.txt": "node1 slots=99999999999\n"}, [],
     "cluster.hostfile", "positive integer up to 65536"),
    ("nic-trailing-newline", 'cluster: {network_interfaces: ["eth0\\n"]}\n', {}, [],
     "cluster.network_interfaces[0]", "control characters"),
    ("nic-shell", None, {}, ["cluster.network_interfaces=[eth0;touch]"], "cluster.network_interfaces[0]",
     "bad interface name"),
    ("identity-file-shell", None, {"k;touch X": "key"}, ["cluster.ssh_identity_file=k;touch X"],
     "cluster.ssh_identity_file", "pastes this path unquoted"),
    ("known-hosts-space-mpi", None, {"k h": ""}, ["cluster.controller=mpi", "cluster.ssh_known_hosts_file=k h"],
     "cluster.ssh_known_hosts_file", "only letters, digits"),
    ("mpi-args-unbalanced", None, {}, ["cluster.controller=mpi", "cluster.mpi_args=-x 'A"], "cluster.mpi_args",
     "cannot split"),
    ("output-dir-newline", 'output: {dir: "runs\\n#SBATCH -J x"}\n', {}, [], "output.dir", "control characters"),
    ("output-dir-colon-mpi", None, {}, ["cluster.controller=mpi", "output.dir=a:nocopy"], "output.dir",
     "Open MPI"),
    ("tab-in-job-name", 'job: {name: "a\\tb"}\n', {}, [], "job.name", "control characters (\\t)"),
    ("key-control-char", '"tr\\u2028ain": {epochs: 1}\n', {}, [], "(config)", "a key holds control characters"),
    ("nul-in-value", 'data: {dir: "a\\0b"}\n', {}, [], "data.dir", "control characters (\\x00)"),
    # names: whole-string grammars
    ("partition-newline", 'cluster: {scheduler: slurm, slurm: {partition: "gpu\\n"}}\n', {}, [],
     "cluster.slurm.partition", "control characters"),
    ("account-shell", None, {}, [*SLURM, "cluster.slurm.account=a;b"], "cluster.slurm.account", "bad account"),
    ("module-shell", None, {}, [*SLURM, "cluster.slurm.modules=['m$(x)']"], "cluster.slurm.modules[0]",
     "bad module name"),
    # Slurm: the options the launcher owns, in every spelling; the setup lines must be shell
    ("sbatch-abbreviated", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[--outp=x]"],
     "cluster.slurm.sbatch_lines[0]", "--outp (sbatch reads it as --output)"),
    ("sbatch-chd", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[--chd=/]"], "cluster.slurm.sbatch_lines[0]",
     "--chdir"),
    ("sbatch-glued-short", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[-Jx]"], "cluster.slurm.sbatch_lines[0]",
     "--job-name"),
    ("sbatch-short-N3", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[-N3]"], "cluster.slurm.sbatch_lines[0]",
     "--nodes"),
    ("sbatch-part", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[--part=a]"], "cluster.slurm.sbatch_lines[0]",
     "--partition"),
    ("sbatch-flag-cluster", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=[-vJx]"],
     "cluster.slurm.sbatch_lines[0]", "--job-name"),
    ("sbatch-second-word", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=['--mem=4G --ti=5']"],
     "cluster.slurm.sbatch_lines[0]", "--time"),
    ("sbatch-hetjob", None, {}, [*SLURM, "cluster.slurm.sbatch_lines=['--mem=4G hetjob']"],
     "cluster.slurm.sbatch_lines[0]", "heterogeneous"),
    ("setup-unbalanced-quote", None, {}, [*SLURM, "cluster.slurm.setup=[\"echo 'x\"]"], "cluster.slurm.setup",
     "bash -n"),
    ("time-bad", None, {}, [*SLURM, "cluster.slurm.time=1h"], "cluster.slurm.time", "bad time limit"),
    ("time-negative", None, {}, [*SLURM, "cluster.slurm.time=-5"], "cluster.slurm.time", "at least 0"),
    # bounded work
    ("alias-bomb", BOMB, {}, [], "(config)", "each alias (*name) counted as what it stands for"),
    ("deep-nesting", "job: " + "[" * 600 + "]" * 600 + "\n", {}, [], "(config)", "nested too deeply"),
    ("long-string", None, {}, ["output.dir=" + "d" * 5000], "output.dir", "more than the 4096 allowed"),
    ("long-list", "cluster:\n  env:\n" + "".join(f"  - V{i}=1\n" for i in range(4100)), {}, [], "cluster.env",
     "more than 4096 entries"),
    ("not-utf8-config", b"job: {name: \"\xe9t\xe9\"}\n", {}, [], "(config)", "not UTF-8 text (byte 0xe9 on line 1)"),
    ("yaml-int-too-long", "train: {epochs: " + "9" * 60 + "}\n", {}, [], "(config)", "at most 40 digits"),
    # paths
    ("job-name-300", None, {}, ["job.name=" + "n" * 300], "job.name", "at most 100 characters"),
    ("output-dir-component-300", None, {}, ["output.dir=" + "d" * 300], "output.dir", "longer than 255 bytes"),
    ("output-dir-is-file", None, {"afile": "x"}, ["output.dir=afile"], "output.dir", "is a file, not a directory"),
    ("output-dir-below-file", None, {"afile": "x"}, ["output.dir=afile/runs"], "output.dir",
     "is a file, so no directory can be created below it"),
    # numbers: finite, 64-bit, within what the jobs can use
    ("lr-inf", None, {}, ["train.lr=.inf"], "train.lr", "finite number"),
    ("lr-1e400", None, {}, ["train.lr=1e400"], "train.lr", "finite number"),
    ("lr-nan", "train: {lr: .nan}\n", {}, [], "train.lr", "finite number"),
    ("cycle-time-inf", None, {}, ["horovod.cycle_time_ms=.inf"], "horovod.cycle_time_ms", "finite number"),
    ("density-nan", None, {}, ["compression.density=.nan"], "compression.density", "finite number"),
    ("seed-2-32", None, {}, ["train.seed=4294967296"], "train.seed", "less than 4294967296"),
    ("seed-plus-rank", None, {}, ["train.seed=4294967295"], "train.seed", "must stay below 2**32"),
    ("np-huge", None, {}, ["cluster.np=99999999999999999999999"], "cluster.np", "out of range"),
    ("np-too-many", None, {}, ["cluster.np=70000"], "cluster.np", "less than or equal to 65536"),
    ("octal-is-not-an-int-here", None, {}, ["train.batch_size=0b11"], "train.batch_size", "integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_exit_2_naming_the_key_and_creates_nothing(case, tmp_path, monkeypatch, capsys):
    assert_refused(tmp_path, (*case[:1], case[1] or "job: {name: t}\n", *case[2:]), monkeypatch, capsys)
    assert len(CASES) >= 50


def test_devices_and_pipes_are_refused_without_reading(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo")     # nobody writes it: reading would wait forever
    for source in ("/dev/zero", "fifo"):
        assert cli.main(["validate", source]) == 2
        assert f"config file {source} is not a regular file" in capsys.readouterr().err
        (tmp_path / "exp.yaml").write_text(f"cluster: {{hostfile: {source}}}\n")
        assert cli.main(["validate", "exp.yaml"]) == 2
        assert f"cluster.hostfile: hostfile {tmp_path / source if source == 'fifo' else source} is not a regular file" \
            in capsys.readouterr().err


def test_many_problems_are_listed_up_to_a_limit(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text("cluster:\n  env:\n" + "".join(f"  - 'bad name {i}'\n" for i in range(500)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "exp.yaml"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].strip() == "... and 450 more" and len(lines) == 52   # header, 50 problems, the count


@pytest.mark.parametrize("text, expected", [
    ("train: {batch_size: 010}\n", ("train", "batch_size", 10)),           # YAML 1.2: decimal, not octal 8
    ("train: {batch_size: 0o10}\n", ("train", "batch_size", 8)),
    ("train: {batch_size: 0x10}\n", ("train", "batch_size", 16)),
    ("train: {lr: 1e-3}\n", ("train", "lr", 0.001)),
    ("job: {name: 2024-01-01}\n", ("job", "name", "2024-01-01")),        # no timestamps
])
def test_yaml_1_2_numbers(tmp_path, text, expected):
    (tmp_path / "exp.yaml").write_text(text)
    res = load_config(tmp_path / "exp.yaml", cwd=tmp_path)
    section, key, value = expected
    got = getattr(getattr(res.config, section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("written, expected", [
    ("30", "30"), ("'30'", "30"), ("5:30", "5:30"), ("2:00:00", "2:00:00"), ("1-12", "1-12"),
    ("1-12:30", "1-12:30"), ("1-12:30:05", "1-12:30:05"), ("UNLIMITED", "UNLIMITED"), ("infinite", "infinite"),
    ("0", "0"),
])
def test_every_documented_slurm_time_form(tmp_path, written, expected):
    # YAML 1.1 would read 2:00:00 as 7200 and 5:30 as 330
    (tmp_path / "exp.yaml").write_text(f"cluster: {{scheduler: slurm, slurm: {{time: {written}}}}}\n")
    res = load_config(tmp_path / "exp.yaml", cwd=tmp_path)
    script = render_sbatch(res, "/r", python="/p", project_root="/root", workdir="/w")
    assert f"#SBATCH --time={expected}\n" in script
    res = load_config(None, ["cluster.scheduler=slurm", f"cluster.slurm.time={written}"], cwd=tmp_path)
    assert res.config.cluster.slurm.time == expected


@pytest.mark.parametrize("word, owned", [
    ("--outp=x", "output"), ("--o", "output"), ("--chd", "chdir"), ("--workdir=/", "workdir"), ("-Jx", "job-name"),
    ("-N3", "nodes"), ("-vJx", "job-name"), ("-HJ", "job-name"), ("--part=a", "partition"), ("--nt=2", "ntasks"),
    ("--tasks-per-node=2", "tasks-per-node"), ("--ti", "time"), ("--acc=x", "account"),
    ("--mem=4G", None), ("--gres=gpu:1", None), ("--exclusive", None), ("-xJ", None),   # -x's value is "J"
    ("--time-min=5", None), ("--mail-type=END", None), ("--ntasks-per-core=1", None),
])
def test_owned_options_in_any_spelling(word, owned):
    assert owned_option(word) == owned


@pytest.mark.parametrize("text", ["a b", "o'q\"d", "back\\slash", "hash#mark", "pct%j", "tab\tx", "$(x);`y`"])
def test_sbatch_words_read_back_what_sbatch_word_wrote(text):
    assert sbatch_words(sbatch_word(text)) == [text]
    assert sbatch_words("--output=" + sbatch_path(text, "slurm-%j.out")) == [
        "--output=" + text.replace("%", "%%") + "/slurm-%j.out"]


def test_sbatch_words_follow_sbatch():
    assert sbatch_words("--comment='a b' -J\"x y\" z # -N 3") == ["--comment=a b", "-Jx y", "z"]
    with pytest.raises(ValueError):
        sbatch_words("--comment='a b")


def test_a_job_that_ran_nothing_is_not_a_success():
    assert not ran_the_job([])
    assert not ran_the_job([{"event": "resume", "from_step": 3}])
    assert ran_the_job([{"step": 1, "epoch": 0, "loss": 1.0}])
    assert ran_the_job([{"event": "end", "steps": 0}])   # a resumed job with nothing left to do


def _damaged_run(root):
    run = root / "runs" / "t" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"job": {"name": "t"}, "train": {"epochs": [2]}}))
    (run / "summary.json").write_text("[1, 2, 3]\n")
    (run / "slurm.json").write_bytes(b"\xff\xfe\x00garbage")
    good = {"step": 1, "epoch": 0, "loss": 0.5, "metrics": {"accuracy": 0.75}, "bytes_sent": 10, "time": 1.0}
    lines = [json.dumps(good).encode(), b"\x00\xff\xfe binary", b'{"step": "one"}', b'{"step": 2, "metrics": [1]}',
             b'{"step": 3, "time": "soon"}', b"[1, 2]", b'{"step": 4, "epoch": true}', b"{" * 5000]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return run


def test_status_and_report_flag_damaged_files_and_go_on(tmp_path, monkeypatch, capsys):
    run = _damaged_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", str(run)]) == 0
    captured = capsys.readouterr()
    assert "step 1" in captured.out and "(damaged)" in captured.out
    assert f"{run}/summary.json holds a JSON list, not an object" in captured.err
    assert f"{run}/metrics.jsonl: 7 unreadable line(s) skipped" in captured.err
    assert f"{run}/slurm.json is not UTF-8 text" in captured.err
    (run / "config.yaml").write_bytes(b"train: {epochs: 2}\n\xff\n")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "is not UTF-8 text" in captured.out and "7 unreadable line(s) skipped" in captured.out
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["steps"] == "1"


def test_resume_of_a_damaged_run_directory_is_exit_2(tmp_path, monkeypatch, capsys):
    run = _damaged_run(tmp_path)
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "step-00000001" / "rank0.pt").write_bytes(b"x")
    (run / "config.yaml").write_bytes(b"job: {name: t}\n\xff\n")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert cli.main(["launch", "--resume", str(run)]) == 2
    assert "config.yaml is not UTF-8 text (byte 0xff on line 2)" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_output_dir_that_cannot_be_created_is_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text("job: {name: t, entry: tests.launcher.tiny_job}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["launch", "exp.yaml", "output.dir=/proc/ranger-hvd-test/runs"]) == 2
    err = capsys.readouterr().err
    # root may write to /proc as far as access() knows, and then mkdir fails; anyone else is told up front
    assert "output.dir: cannot create /proc/ranger-hvd-test" in err or "output.dir: '/proc' is not writable" in err
    assert tree(tmp_path) == {"exp.yaml"}


def test_config_error_never_renders_a_whole_huge_value(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["cluster.hosts=" + "h" * 4000 + ":x"], cwd=tmp_path)
    assert len(str(exc.value)) < 300


def test_horovodrun_that_exits_0_without_running_the_job_is_failed(tmp_path):
    from io import StringIO

    from rich.console import Console

    from ranger_hvd.launcher.run.command import LaunchCommand
    from ranger_hvd.launcher.run.supervisor import Supervisor

    res = load_config(None, ["job.entry=tests.launcher.tiny_job"], cwd=tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # what an mpirun line cut short by an injected ';' looked like: the shell's last command exits 0
    cmd = LaunchCommand(argv=["true"], env={"PATH": "/usr/bin:/bin"})
    result = Supervisor(res, cmd, run_dir, console=Console(file=StringIO()), live=False).run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.status == summary["status"] == "failed" and result.exit_code == 1
    assert "never ran" in summary["error"]


def test_launch_refuses_paths_horovodrun_would_paste_into_a_remote_shell(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from ranger_hvd.launcher.run.launch import launch_problem

    res = load_config(None, ["cluster.hosts=[192.0.2.7:1]", "cluster.np=1"], cwd=tmp_path)
    assert launch_problem(res, Path("/runs/t/1")) is None
    monkeypatch.setattr("os.getcwd", lambda: "/home/me/my project;x")
    problem = launch_problem(res, Path("/runs/t/1"))
    assert problem.path == "cluster.hosts" and "working directory" in problem.message
    local = load_config(None, ["cluster.controller=mpi"], cwd=tmp_path)
    assert launch_problem(local, Path("/runs/t/1")) is None        # no remote host: nothing goes over ssh
    problem = launch_problem(local, Path("/old:runs/t/1"))          # launch --resume of a moved run
    assert problem.path == "output.dir" and "Open MPI" in problem.message
    # a Slurm job on several nodes: horovodrun reaches the others over ssh from the submit directory
    monkeypatch.undo()
    args = ["exp.yaml", "--dry-run", "cluster.scheduler=slurm", "cluster.slurm.nodes=2", "cluster.np=2",
            f"output.dir={tmp_path}/runs"]
    for workdir, code in ((tmp_path / "plain", 0), (tmp_path / "my project", 2)):
        workdir.mkdir()
        (workdir / "exp.yaml").write_text("job: {name: t}\n")
        monkeypatch.chdir(workdir)
        assert cli.main(["launch", *args]) == code
        assert tree(workdir) == {"exp.yaml"}
    assert "cluster.slurm.nodes: horovodrun starts other hosts" in capsys.readouterr().err


def test_report_into_a_file_is_exit_2(tmp_path, monkeypatch, capsys):
    run = _damaged_run(tmp_path)
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert cli.main(["report", str(run), "--out", "afile/rep"]) == 2
    assert "cannot write the report into afile/rep" in capsys.readouterr().err
    assert tree(tmp_path) == before
