"""Your own training script through the launcher (``job.command``, issue 32) and ``ranger_hvd.run``.

Real launches (Gloo, and MPI for the arguments): the example's sweep over none, fp16 and ranger with
its report; hostile arguments arriving unchanged; a command killed with SIGKILL restarted from its own
checkpoint; plain horovodrun with RANGER_HVD_CONFIG.  In-process: bad command configs (exit 2, nothing
created) and ``compression()`` with and without a run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import CLI, REPO, VENV_BIN, assert_refused, needs_horovod, run_cli, tree

EXAMPLES = REPO / "examples"
SCRIPT = Path(__file__).with_name("user_script.py")
HOSTILE = ["a b", "x'y\"z", "; echo pwned > /tmp/ranger-hvd-pwned", "$(id)", "`id`", "*", "", "--", "\\n", "é"]


def _write(root: Path, cfg: dict, name: str = "exp.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _only_run(root: Path, job: str) -> Path:
    (run,) = list((root / "runs" / job).iterdir())
    return run


# --------------------------------------------------------------------------------------------------
# refused configs: exit 2 naming the key, nothing created, nothing started
CASES = [
    ("missing-script", "job: {command: [python, nothere.py]}\n", {}, [], "job.command[1]", "nothere.py does not exist"),
    ("shell-string", "job: {command: python train.py --lr 0.1}\n", {"train.py": ""}, [], "job.command",
     "not a shell string"),
    ("number-item", "job: {command: [python, train.py, --lr, 0.1]}\n", {"train.py": ""}, [], "job.command",
     "item 3 is 0.1 (float): every argument must be a string"),
    ("empty-list", "job: {command: []}\n", {}, [], "job.command", "at least 1 item"),
    ("script-is-dir", "job: {command: [python, sub]}\n", lambda root: (root / "sub").mkdir() or {}, [], "job.command[1]",
     "is not a regular file"),
    ("program-not-on-path", "job: {command: [no-such-program-rhvd, x]}\n", {}, [], "job.command[0]", "not on PATH"),
    ("train-key", "job: {command: [python, train.py]}\ntrain: {epochs: 3, max_restarts: 1}\n", {"train.py": ""}, [],
     "train.epochs", "means nothing for a user command"),
    ("data-key", "job: {command: [python, train.py]}\ndata: {dataset: digits}\n", {"train.py": ""}, [],
     "data.dataset", "means nothing for a user command"),
    ("gan-key", "job: {command: [python, train.py]}\ngan: {r1_penalty: 1}\n", {"train.py": ""}, [],
     "gan.r1_penalty", "means nothing for a user command"),
    ("model-key", "job: {command: [python, train.py], model: rnn}\n", {"train.py": ""}, [], "job.model",
     "means nothing for a user command"),
    ("train-override", "job: {command: [python, train.py]}\n", {"train.py": ""}, ["train.lr=0.1"], "train.lr",
     "means nothing for a user command"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_command_config_is_exit_2_naming_the_key(case, tmp_path, monkeypatch, capsys):
    assert_refused(tmp_path, case, monkeypatch, capsys)


def test_command_resolves_against_the_config_folder_and_keeps_launcher_keys(tmp_path):
    from ranger_hvd.launcher.run.command import build_command
    from ranger_hvd.config import load_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.py").write_text("")
    _write(tmp_path / "cfg", {"job": {"command": ["python", "train.py", *HOSTILE]}, "train": {"max_restarts": 2}})
    res = load_config("cfg/exp.yaml", cwd=tmp_path)
    assert res.job_name == "train" and res.config.train.max_restarts == 2
    d = res.resolved_dict()
    assert "data" not in d and "gan" not in d and d["train"] == {"max_restarts": 2} and "model" not in d["job"]
    cmd = build_command(res, "/runs/x", python="/venv/bin/python", environ={}, uid=1000, project_root="/repo")
    assert cmd.argv[-len(HOSTILE) - 2:] == ["/venv/bin/python", str(tmp_path / "cfg" / "train.py"), *HOSTILE]
    assert cmd.env["RANGER_HVD_RUN_DIR"] == "/runs/x" and cmd.env["RANGER_HVD_CONFIG"] == "/runs/x/config.yaml"


# --------------------------------------------------------------------------------------------------
def test_compression_outside_a_run_names_the_variable(monkeypatch):
    import ranger_hvd.run as run

    monkeypatch.delenv("RANGER_HVD_CONFIG", raising=False)
    with pytest.raises(run.RunError, match="RANGER_HVD_CONFIG is not set"):
        run.compression()
    with pytest.raises(run.RunError, match="step must be a non-negative integer"):
        run.log(-1, loss=1.0)


@needs_horovod
def test_compression_follows_the_config(tmp_path, monkeypatch):
    import horovod.torch as hvd

    import ranger_hvd.run as run
    from ranger_hvd.torch import RangerCompressor

    got = {}
    for ctype in ("none", "fp16", "ranger"):
        cfg = _write(tmp_path, {"job": {"command": ["python", "-c", "pass"]},
                                "compression": {"type": ctype, **({"density": 0.05} if ctype == "ranger" else {})}},
                     f"{ctype}.yaml")
        monkeypatch.setenv("RANGER_HVD_CONFIG", str(cfg))
        got[ctype] = run.compression()
    assert got["none"] is hvd.Compression.none and got["fp16"] is hvd.Compression.fp16
    assert isinstance(got["ranger"], RangerCompressor) and got["ranger"].options.density == 0.05


@pytest.mark.horovod
@needs_horovod
def test_plain_horovodrun_with_the_config_gets_the_same_compressor(tmp_path):
    """Under horovodrun, no launcher: RANGER_HVD_CONFIG alone gives each rank the config's compressor."""
    probe = tmp_path / "probe.py"
    probe.write_text("import horovod.torch as hvd, ranger_hvd.run as run\nhvd.init()\nc = run.compression()\n"
                     "print('PROBE', hvd.rank(), type(c).__name__, c.options.density, run.run_dir(), flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), RANGER_HVD_CONFIG=str(EXAMPLES / "torch.yaml"),
               OMP_NUM_THREADS="1")
    env.pop("RANGER_HVD_RUN_DIR", None)
    r = subprocess.run([str(VENV_BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                        str(probe)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = sorted(line.split("PROBE ", 1)[1] for line in r.stdout.splitlines() if "PROBE " in line)
    assert lines == ["0 RangerCompressor 0.01 None", "1 RangerCompressor 0.01 None"], r.stdout + r.stderr


# --------------------------------------------------------------------------------------------------
@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("config,script,epochs", [("torch.yaml", "torch_digits", 2), ("tf.yaml", "tf_digits", 1)])
def test_example_sweep_none_fp16_ranger_and_report(config, script, epochs, tmp_path):
    """The examples (PyTorch, TensorFlow/Keras): ordinary Horovod scripts changed in three lines."""
    r = run_cli(["sweep", EXAMPLES / config, "compression.type=none,fp16,ranger",
                 f"job.command=[python, {script}.py, --epochs, '{epochs}']",
                 f"output.dir={tmp_path / 'runs'}", "--no-live"], tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = sorted((tmp_path / "runs" / script).iterdir())
    assert len(runs) == 3
    types = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "success" and summary["metrics_logged"] is True, summary
        types.append(summary["compression"])
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [s["epoch"] for s in steps] == list(range(epochs))
        assert all({"loss", "step", "time"} <= set(s) and {"eval_loss", "eval_accuracy"} == set(s["metrics"])
                   for s in steps), steps
        assert steps[-1]["metrics"]["eval_accuracy"] > 0.5
        assert (run / "script" / f"{script}.py").read_bytes() == (EXAMPLES / f"{script}.py").read_bytes()
        assert summary["tensorboard"] == str(run / "tensorboard")
        assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert types == ["none", "fp16", "ranger"]
    ranger_steps = [json.loads(x) for x in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < s["bytes_sent"] < s["bytes_dense"] for s in ranger_steps), ranger_steps
    table = r.stdout[r.stdout.index("sweep over compression.type"):]
    # the script's optimizer holds its momentum (not the config): no label claims one for it
    for label in ("none", "fp16", "ranger d=0.01"):
        assert f"\n{label} " in table and "m=" not in table, table
    (report,) = (tmp_path / "runs" / "_reports").iterdir()       # the sweep's own report on the three runs
    assert {"eval_accuracy_vs_step.png", "loss_vs_step.png", "bytes_per_step.png"} <= {p.name for p in report.iterdir()}
    assert all(f"\n{label} " in (report / "report.txt").read_text() for label in ("none", "fp16", "ranger d=0.01"))


@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("controller", ["mpi"])   # gloo: in the restart test below
def test_hostile_arguments_arrive_unchanged_and_no_metrics_is_said(controller, tmp_path):
    cfg = _write(tmp_path, {"job": {"name": "args", "command": ["python", str(SCRIPT), "argv", *HOSTILE]},
                            "cluster": {"np": 2, "controller": controller}, "output": {"dir": "runs"}})
    r = run_cli(["launch", cfg, "--no-live"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    run = _only_run(tmp_path, "args")
    for rank in (0, 1):
        assert json.loads((run / f"argv.rank{rank}.json").read_text()) == HOSTILE
    assert not Path("/tmp/ranger-hvd-pwned").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["records"] == 0 and summary["metrics_logged"] is False
    assert "no metrics were logged" in r.stdout, r.stdout


@pytest.mark.horovod
@needs_horovod
def test_command_killed_by_sigkill_is_restarted_from_its_checkpoint(tmp_path):
    cfg = _write(tmp_path, {"job": {"name": "restart", "command": ["python", str(SCRIPT), "restart", *HOSTILE]},
                            "train": {"max_restarts": 1}, "cluster": {"np": 2}, "output": {"dir": "runs"}})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*CLI, "launch", str(cfg), "--no-live"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and killed is None and proc.poll() is None:
            # both ranks saved their checkpoint (a set torn by the kill is the script's own business)
            pid_files = sorted((tmp_path / "runs").glob("restart/*/pid.rank*"))
            if len(pid_files) == 2 and all(p.read_text() for p in pid_files):
                killed = int(pid_files[1].read_text())
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, out
    assert proc.returncode == 0, out
    assert "restart 1/1" in out, out
    run = _only_run(tmp_path, "restart")
    assert (run / "resumed.rank0").read_text() == (run / "resumed.rank1").read_text() == "4"
    assert json.loads((run / "argv.rank1.json").read_text()) == HOSTILE     # under Gloo
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "step" in x] == [1, 2, 3, 4, 5, 6], records
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "success" and summary["max_restarts"] == 1
    (restart,) = summary["restarts"]
    assert restart["failed_rank"] == 1 and restart["resumed"] is True, restart
    assert restart["error"] == "rank 1 was killed by SIGKILL", restart


# --------------------------------------------------------------------------------------------------
def test_run_config_round_trip_resume_and_slurm_dry_run(tmp_path):
    """The run's config.yaml of a user command is itself valid (what the Slurm allocation side and --resume load) and
    gives the same command; --resume needs something in checkpoints/; a Slurm dry-run creates nothing."""
    from ranger_hvd.launcher.run.command import build_command
    from ranger_hvd.config import load_config
    from ranger_hvd.launcher.run.rundir import copy_script, write_config

    (tmp_path / "train.py").write_text("print('hi')\n")
    cfg = _write(tmp_path, {"job": {"command": ["python", "train.py", "a b"]}, "train": {"max_restarts": 1},
                            "output": {"dir": str(tmp_path / "runs")}})
    res = load_config(cfg)
    run = tmp_path / "runs" / "train" / "20260101-000000"
    run.mkdir(parents=True)
    write_config(run, res)
    copy_script(run, res)
    assert (run / "script" / "train.py").read_text() == "print('hi')\n"
    assert (run / "script" / "SOURCE").read_text().startswith(f"{tmp_path / 'train.py'} sha256 ")
    again = load_config(run / "config.yaml")
    kw = dict(python="/py", environ={}, uid=1000, project_root="/repo")
    assert build_command(again, str(run), **kw).argv == build_command(res, str(run), **kw).argv

    r = run_cli(["launch", "--resume", run, "--dry-run"], tmp_path)
    assert r.returncode == 2 and "nothing in checkpoints/" in r.stderr, r.stdout + r.stderr
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.pt").write_text("x")
    r = run_cli(["launch", "--resume", run, "--dry-run"], tmp_path)
    assert r.returncode == 0 and "RANGER_HVD_RESUME=1" in r.stdout and "--resume" not in r.stdout.splitlines()[0]

    before = tree(tmp_path)
    r = run_cli(["launch", cfg, "cluster.scheduler=slurm", "cluster.slurm.partition=debug", "--dry-run"], tmp_path,
                env={"PATH": "/nonexistent"})   # no Slurm needed to look at the script
    assert r.returncode == 0, r.stderr
    assert "-m ranger_hvd.launcher.slurm.allocation" in r.stdout and "#SBATCH --job-name=train" in r.stdout, r.stdout
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_switching_to_a_dense_type_keeps_the_momentum(config):
    """Every shipped config: the none and fp16 twins train with the momentum of the Ranger run, wherever
    the Ranger run applies it (the optimizer, or the compressor)."""
    from ranger_hvd.jobs.common import optimizer_momentum
    from ranger_hvd.config import load_config

    path = REPO / "configs" / config
    ranger = load_config(path, ["compression.type=ranger"], cwd=REPO).config
    momentum = optimizer_momentum(ranger) + ranger.compression.compressor_momentum
    for ctype in ("none", "fp16"):
        res = load_config(path, [f"compression.type={ctype}"], cwd=REPO)
        assert optimizer_momentum(res.config) == momentum, (ctype, res.sources["train.momentum"])
    # an override of train.momentum still wins
    assert load_config(path, ["compression.type=none", "train.momentum=0.5"], cwd=REPO).config.train.momentum == 0.5


def test_dense_twin_of_a_user_command_warns_that_compressor_momentum_is_dropped(tmp_path):
    from ranger_hvd.config import load_config

    (tmp_path / "train.py").write_text("")
    cfg = _write(tmp_path, {"job": {"command": ["python", "train.py"]},
                            "compression": {"type": "ranger", "momentum": 0.9}})
    assert load_config(cfg).warnings == []
    (warning,) = load_config(cfg, ["compression.type=none"]).warnings
    assert "compression.momentum=0.9 is inactive" in warning and "script's optimizer" in warning


def test_elastic_user_command_on_tensorflow_is_not_refused(tmp_path):
    """Only the TensorFlow reference jobs lack an elastic mode; a script may use Horovod's elastic API."""
    from ranger_hvd.launcher.run.command import build_command
    from ranger_hvd.config import ConfigError, load_config

    (tmp_path / "train.py").write_text("")
    cfg = _write(tmp_path, {"job": {"backend": "tensorflow", "command": ["python", "train.py"]},
                            "cluster": {"hosts": ["localhost:3"], "elastic": {"min_np": 2}}})
    res = load_config(cfg)
    argv = build_command(res, "/runs/x", python="/py", environ={}, uid=1000, project_root="/repo").argv
    assert "--min-np" in argv and argv[-2:] == ["/py", str(tmp_path / "train.py")]
    with pytest.raises(ConfigError, match="no elastic mode"):
        load_config(cfg, ["job.command=null"])
