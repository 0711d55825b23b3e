"""Schema, errors, overrides and sources: in-process through ``cli.main`` (fast), a few as subprocesses."""

import textwrap

import pytest
import yaml

from ranger_hvd.core.options import RangerOptions
from ranger_hvd.jobs.common import optimizer_momentum
from ranger_hvd.launcher import cli
from ranger_hvd.config import (ConfigError, TrainSection, job_config, load_config, read_run_config,
                                        show_lines)

from .conftest import REPO, assert_refused, run_cli, tree

BASE = {
    "job": {"name": "t", "backend": "torch", "model": "cnn"},
    "data": {"dataset": "digits"},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 0},
    "compression": {"type": "ranger", "density": 0.05, "momentum": 0.9},
    "cluster": {"np": 2, "hosts": ["localhost:2"], "controller": "gloo"},
    "horovod": {"fusion_threshold_mb": 64},
    "output": {"dir": "runs"},
}


def with_(**sections):
    """BASE with sections replaced or merged: with_(train={"epochs": 0}) merges; None deletes a key."""
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for sec, upd in sections.items():
        if isinstance(upd, dict) and isinstance(cfg.get(sec), dict):
            for k, v in upd.items():
                if v is None:
                    cfg[sec].pop(k, None)
                else:
                    cfg[sec][k] = v
        else:
            cfg[sec] = upd
    return yaml.safe_dump(cfg, sort_keys=False)


HOSTFILE_OK = "# two nodes\n\nnode1 slots=2   # first\nnode2 slots=2\n"

# (id, config text or None for BASE, extra files {name: text}, overrides, dotted path, text in message)
INVALID = [
    ("unknown-key-suggest", with_(train={"epoch": 3}), {}, [], "train.epoch", "did you mean 'epochs'"),
    ("unknown-section", with_(compresion={"type": "none"}), {}, [], "compresion", "did you mean 'compression'"),
    ("backend", with_(job={"backend": "pytorch"}), {}, [], "job.backend", "torch, tensorflow"),
    ("model", with_(job={"model": "transformer"}), {}, [], "job.model", "cnn, rnn, gan"),
    ("job-name", with_(job={"name": "bad name/x"}), {}, [], "job.name", "pattern"),
    ("dataset", with_(data={"dataset": "cifar"}), {}, [], "data.dataset", "digits, mnist, synthetic"),
    ("mnist-needs-dir", with_(data={"dataset": "mnist"}), {}, [], "data.dir", "required"),
    ("dir-only-mnist", with_(data={"dir": "/tmp"}), {}, [], "data.dir", "only used with"),
    ("synthetic-samples-only-synthetic", with_(data={"synthetic_samples": 10}), {}, [], "data.synthetic_samples",
     "only used with"),
    ("epochs-zero", with_(train={"epochs": 0}), {}, [], "train.epochs", "greater than or equal to 1"),
    ("batch-size-string", with_(train={"batch_size": "64"}), {}, [], "train.batch_size", "integer"),
    ("lr-negative", with_(train={"lr": -1}), {}, [], "train.lr", "greater than 0"),
    ("max-steps-zero", with_(train={"max_steps": 0}), {}, [], "train.max_steps", "greater than or equal to 1"),
    ("compression-type", with_(compression={"type": "topk"}), {}, [], "compression.type", "none, fp16, ranger"),
    ("density-high", with_(compression={"density": 2}), {}, [], "compression.density", "less than or equal to 1"),
    ("density-zero", with_(compression={"density": 0}), {}, [], "compression.density", "greater than 0"),
    ("momentum-one", with_(compression={"momentum": 1.0}), {}, [], "compression.momentum", "less than 1"),
    ("momentum-twice", with_(train={"momentum": 0.9}), {}, [], "train.momentum",
     "would apply momentum a second time: compression.momentum (0.9) already keeps DGC's momentum"),
    ("momentum-twice-unmasked", with_(train={"momentum": 0.9}, compression={"momentum_masking": False}), {}, [],
     "train.momentum", "compression.momentum (0.9) already keeps the momentum, unmasked, in the compressor"),
    ("momentum-masking-not-bool", with_(compression={"momentum_masking": "maybe"}), {}, [],
     "compression.momentum_masking", "valid boolean"),
    ("inactive-option-bad-value", with_(compression={"type": "fp16", "density": 2}), {}, [],
     "compression.density", "less than or equal to 1 (got 2) (inactive here: compression.type is 'fp16')"),
    ("unknown-option-with-none", with_(compression={"type": "none", "dnsity": 0.1}), {}, [],
     "compression.dnsity", "did you mean 'density'? (compression.type 'none' takes no options"),
    ("override-type-typo", None, {}, ["compression.type=rangr"], "compression.type", "did you mean 'ranger'"),
    ("compression-not-mapping", with_(compression="ranger"), {}, [], "compression", "mapping"),
    ("warmup-start", with_(compression={"warmup_steps": 10, "warmup_start_density": 0.01}), {}, [],
     "compression.warmup_start_density", "at least density"),
    ("value-dtype", with_(compression={"value_dtype": "int8"}), {}, [], "compression.value_dtype", "float16"),
    ("compression-misspelled", with_(compression={"dnsity": 0.1}), {}, [], "compression.dnsity",
     "did you mean 'density'"),
    ("gan-recipe-on-cnn", with_(gan={"r1_penalty": 1.0}), {}, [], "gan.r1_penalty",
     "only used with job.model 'gan' (model is 'cnn')"),
    ("gan-lr-scale-on-rnn", with_(job={"model": "rnn"}, gan={"disc_lr_scale": 2.0}), {}, [], "gan.disc_lr_scale",
     "only used with job.model 'gan' (model is 'rnn')"),
    ("gan-r1-negative", with_(job={"model": "gan"}, gan={"r1_penalty": -0.5}), {}, [], "gan.r1_penalty",
     "greater than or equal to 0"),
    ("gan-lr-scale-zero", None, {}, ["job.model=gan", "gan.disc_lr_scale=0"], "gan.disc_lr_scale", "greater than 0"),
    ("gan-misspelled", with_(job={"model": "gan"}, gan={"r1": 1.0}), {}, [], "gan.r1", "unknown key 'r1' in gan (allowed: r1_penalty, disc_lr_scale)"),
    ("np-exceeds-slots", with_(cluster={"np": 4}), {}, [], "cluster.np", "may not exceed"),
    ("np-zero", with_(cluster={"np": 0}), {}, [], "cluster.np", "greater than or equal to 1"),
    ("hosts-and-hostfile", with_(cluster={"hostfile": "hosts.txt"}), {"hosts.txt": HOSTFILE_OK}, [],
     "cluster.hostfile", "never both"),
    ("host-without-slots", with_(cluster={"hosts": ["localhost"]}), {}, [], "cluster.hosts[0]", "host:slots"),
    ("host-zero-slots", with_(cluster={"hosts": ["a:0"], "np": None}), {}, [], "cluster.hosts[0]", "positive"),
    ("duplicate-host", with_(cluster={"hosts": ["a:1", "a:2"]}), {}, [], "cluster.hosts[1]", "duplicate host"),
    ("hostfile-missing", with_(cluster={"hosts": None, "hostfile": "nope.txt"}), {}, [], "cluster.hostfile",
     "hostfile not found"),
    ("hostfile-bad-line", with_(cluster={"hosts": None, "hostfile": "hosts.txt"}),
     {"hosts.txt": "# c\nnode1 slots=2\nnode2 sluts=2\n"}, [], "cluster.hostfile", "hosts.txt:3"),
    ("hostfile-duplicate", with_(cluster={"hosts": None, "hostfile": "hosts.txt"}),
     {"hosts.txt": "node1 slots=2\n\nnode1 slots=1\n"}, [], "cluster.hostfile", "hosts.txt:3: duplicate host"),
    ("hostfile-bad-slots", with_(cluster={"hosts": None, "hostfile": "hosts.txt"}),
     {"hosts.txt": "node1 slots=x\n"}, [], "cluster.hostfile", "hosts.txt:1: slots must be a positive integer"),
    ("hostfile-no-slots", with_(cluster={"hosts": None, "hostfile": "hosts.txt"}),
     {"hosts.txt": "node1\n"}, [], "cluster.hostfile", "hosts.txt:1: missing 'slots=N'"),
    ("controller", with_(cluster={"controller": "nccl"}), {}, [], "cluster.controller", "gloo, mpi"),
    ("ssh-port", with_(cluster={"ssh_port": 70000}), {}, [], "cluster.ssh_port", "65535"),
    ("identity-missing", with_(cluster={"ssh_identity_file": "no_key"}), {}, [], "cluster.ssh_identity_file",
     "file not found"),
    ("env-name", with_(cluster={"env": ["OK", "BAD-NAME"]}), {}, [], "cluster.env[1]", "NAME or NAME=VALUE"),
    ("mpi-args-with-gloo", with_(cluster={"mpi_args": "--bind-to none"}), {}, [], "cluster.mpi_args", "mpi"),
    ("start-timeout", with_(cluster={"start_timeout": 0}), {}, [], "cluster.start_timeout", "greater than"),
    ("fusion-negative", with_(horovod={"fusion_threshold_mb": -1}), {}, [], "horovod.fusion_threshold_mb",
     "greater than or equal to 0"),
    ("log-level", with_(horovod={"log_level": "VERBOSE"}), {}, [], "horovod.log_level", "WARNING"),
    ("timeline-not-bool", with_(horovod={"timeline": "maybe"}), {}, [], "horovod.timeline", "boolean"),
    ("autotune-subkey", with_(horovod={"autotune_warmup_samples": 3}), {}, [], "horovod.autotune_warmup_samples",
     "autotune: true"),
    ("mark-cycles-needs-timeline", with_(horovod={"timeline_mark_cycles": True}), {}, [],
     "horovod.timeline_mark_cycles", "timeline: true"),
    ("horovod-misspelled", with_(horovod={"fusion_treshold_mb": 1}), {}, [], "horovod.fusion_treshold_mb",
     "did you mean 'fusion_threshold_mb'"),
    ("section-not-mapping", with_(output="runs"), {}, [], "output", "mapping"),
    ("yaml-syntax", "job:\n  name: t\ntrain: {epochs: 1\ncluster: {}\n", {}, [], "(config)", "line"),
    ("yaml-duplicate-key", "train:\n  epochs: 1\n  epochs: 2\n", {}, [], "train.epochs", "duplicate key"),
    ("top-level-list", "- job\n- train\n", {}, [], "(config)", "mapping"),
    ("override-unknown-key", None, {}, ["train.epoch=3"], "train.epoch", "did you mean 'epochs'"),
    ("override-bad-format", None, {}, ["trainepochs"], "trainepochs", "KEY=VALUE"),
    ("override-bad-type", None, {}, ["cluster.np=two"], "cluster.np", "integer"),
    ("override-into-scalar", None, {}, ["train.epochs.x=1"], "train.epochs", "cannot be set inside"),
    ("override-np-too-big", None, {}, ["cluster.np=3"], "cluster.np", "may not exceed"),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_exit_2_names_path_creates_nothing(case, tmp_path, monkeypatch, capsys):
    assert_refused(tmp_path, (*case[:1], case[1] if case[1] is not None else with_(), *case[2:]), monkeypatch, capsys)
    assert len(INVALID) >= 30


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["launch", "nope.yaml"]) == 2
    assert "config file not found: nope.yaml" in capsys.readouterr().err
    assert tree(tmp_path) == set()


def test_yaml_error_names_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text("job:\n  name: t\ntrain: {epochs: 1\ncluster: {}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "exp.yaml"]) == 2
    err = capsys.readouterr().err
    assert "exp.yaml:4" in err and "YAML syntax error at line 4" in err


def test_all_problems_reported_together(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text(with_(train={"epoch": 3}, job={"backend": "jax"}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "exp.yaml"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "train.epoch" in err and "job.backend" in err
    assert "exp.yaml:" in err  # file line of the offending key


@pytest.mark.parametrize("argv", [[], ["launch"], ["launch", "x.yaml", "--bogus"], ["frobnicate"],
                                  ["report"], ["sweep"]])
def test_usage_errors_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert tree(tmp_path) == set()


def test_real_entry_point_exit_codes(tmp_path):
    """Through the console script's module: the exit status really is 2, nothing created."""
    (tmp_path / "exp.yaml").write_text(with_(train={"epoch": 3}))
    before = tree(tmp_path)
    for cmd in (["launch", "exp.yaml"], ["launch", "exp.yaml", "--dry-run"], ["show", "exp.yaml"],
                ["validate", "exp.yaml"], ["sweep", "exp.yaml", "train.lr=0.1,0.2"]):
        r = run_cli(cmd, tmp_path)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "train.epoch" in r.stderr and "did you mean 'epochs'" in r.stderr
    r = run_cli(["launch"], tmp_path)
    assert r.returncode == 2 and "usage:" in r.stderr
    assert tree(tmp_path) == before


def test_override_values_are_yaml_scalars(tmp_path):
    (tmp_path / "exp.yaml").write_text(with_(cluster={"hosts": ["localhost:4"], "np": None}))
    res = load_config(tmp_path / "exp.yaml", ["cluster.np=3", "compression.density=1e-3", "horovod.timeline=true",
                                              "cluster.env=[A, B=2]", "horovod.log_level=INFO"], cwd=tmp_path)
    assert res.np == 3 and isinstance(res.config.cluster.np, int)
    assert res.config.compression.density == 0.001
    assert res.config.horovod.timeline is True
    assert res.config.cluster.env == ["A", "B=2"]


def test_precedence_default_file_override(tmp_path):
    (tmp_path / "exp.yaml").write_text(with_(compression={"density": 0.05}, train={"epochs": 7}))
    res = load_config(tmp_path / "exp.yaml", ["compression.density=0.001"], cwd=tmp_path)
    assert res.config.compression.density == 0.001            # override beats file
    assert res.config.train.epochs == 7                        # file beats default
    assert res.config.compression.min_elements == 1024         # RangerOptions' default
    assert res.sources["compression.density"] == "override"
    assert res.sources["train.epochs"].startswith("file (")
    assert res.sources["train.seed"].startswith("file (")
    assert res.sources["train.momentum"] == "default"
    assert res.sources["compression.min_elements"] == "default"


def test_show_prints_each_value_with_its_source(tmp_path):
    (tmp_path / "exp.yaml").write_text(textwrap.dedent("""\
        job: {name: t}
        train:
          epochs: 7
        compression: {type: ranger, density: 0.05}
        """))
    r = run_cli(["show", "exp.yaml", "compression.density=0.001", "cluster.np=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines() if not ln.startswith("#")}
    assert lines["compression.density"].split("#")[0].strip() == "compression.density: 0.001"
    assert lines["compression.density"].endswith("# override")
    assert "train.epochs: 7" in lines["train.epochs"] and "# file (exp.yaml:3)" in lines["train.epochs"]
    assert "train.lr: 0.05" in lines["train.lr"] and lines["train.lr"].endswith("# default")
    assert "compression.momentum: 0.0" in lines["compression.momentum"]   # RangerOptions' default
    assert lines["cluster.np"].split("#")[0].strip() == "cluster.np: 1"
    assert lines["cluster.hosts"].endswith("# default (localhost:np)")
    assert tree(tmp_path) == {"exp.yaml"}


def test_show_lists_other_types_options_as_inactive(tmp_path):
    (tmp_path / "exp.yaml").write_text("compression: {type: ranger, density: 0.05, momentum: 0.9}\n")
    res = load_config(tmp_path / "exp.yaml", ["compression.type=fp16"], cwd=tmp_path)
    paths = [p for p, _, _ in show_lines(res)]
    assert "compression.type" in paths and "compression.density" not in paths
    r = run_cli(["show", "exp.yaml", "compression.type=fp16"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    head = out.index(next(ln for ln in out if ln.startswith("# inactive")))
    inactive = out[head + 1:]
    assert [ln.split("#")[1].strip() for ln in inactive] == ["compression.density: 0.05", "compression.momentum: 0.9"]
    assert all("compression.type is 'fp16'; file (exp.yaml:1)" in ln for ln in inactive), inactive
    assert "compression.type: fp16" in r.stdout and "# override" in r.stdout


TYPES = ("none", "fp16", "ranger")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_switches_compression_type(path, monkeypatch, capsys):
    """validate CONFIG compression.type=T exits 0 for every type; the run's config keeps only T's options,
    and what the jobs read back from it is the same config."""
    monkeypatch.chdir(REPO)
    rel = str(path.relative_to(REPO))
    for ctype in TYPES:
        code = cli.main(["validate", rel, f"compression.type={ctype}"])
        captured = capsys.readouterr()
        assert code == 0, (ctype, captured.err)
        assert f"compression {ctype})" in captured.out, captured.out
        res = load_config(rel, [f"compression.type={ctype}"])
        written = res.resolved_dict()
        own = {"none": [], "fp16": [], "ranger": list(RangerOptions.model_fields)}[ctype]
        assert sorted(written["compression"]) == sorted(["type", *own]), written["compression"]
        assert job_config(written).model_dump(mode="json") == written
        dropped = {o.path for o in res.inactive}
        file_keys = set(yaml.safe_load(path.read_text()).get("compression", {})) - {"type"}
        assert dropped == ({f"compression.{k}" for k in file_keys} if ctype != "ranger" else set()), dropped


def test_sweep_over_types_validates_on_the_default_config(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = cli.main(["sweep", "configs/cnn-digits.yaml", "compression.type=none,fp16,ranger", "train.epochs=2",
                     "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.count("horovodrun -np 2") == 3


def test_override_of_an_inactive_option_warns(tmp_path, capsys, monkeypatch):
    (tmp_path / "exp.yaml").write_text("compression: {type: fp16}\n")
    res = load_config(tmp_path / "exp.yaml", ["compression.density=0.001"], cwd=tmp_path)
    assert res.warnings == ["compression.density=0.001 has no effect: compression.type is 'fp16'"]
    assert res.config.compression.type == "fp16" and "density" not in res.resolved_dict()["compression"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "exp.yaml", "compression.density=0.001"]) == 0
    assert "has no effect" in capsys.readouterr().err


def test_jobs_read_the_launcher_schema(tmp_path):
    """The jobs validate RUN_DIR/config.yaml with the same models; a bad value names file and line."""
    cfg = job_config({"compression": {"type": "ranger", "density": 0.05, "momentum": 0.9}})
    assert cfg.train.epochs == TrainSection().epochs and optimizer_momentum(cfg) == 0.0
    assert optimizer_momentum(job_config({"compression": {"type": "ranger"}})) == 0.9
    assert optimizer_momentum(job_config({"train": {"momentum": 0.0}})) == 0.0
    assert cfg.compression.options()["density"] == 0.05 and cfg.compression.options()["min_elements"] == 1024
    plain = job_config({"compression": {"type": "fp16"}, "train": {"momentum": 0.5, "max_steps": 7}})
    assert optimizer_momentum(plain) == 0.5 and plain.train.max_steps == 7 and plain.compression.options() == {}
    assert job_config({}).compression.type == "ranger"          # one default, the launcher's
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 2\n  lr: -1\n")
    with pytest.raises(ConfigError) as exc:
        read_run_config(tmp_path / "config.yaml")
    assert [str(p) for p in exc.value.problems] == [
        f"{tmp_path / 'config.yaml'}:3: train.lr: must be greater than 0 (got -1)"]


def test_hostfile_parsing_and_default_np(tmp_path):
    (tmp_path / "hosts.txt").write_text(HOSTFILE_OK)
    (tmp_path / "exp.yaml").write_text(with_(cluster={"hosts": None, "np": None, "hostfile": "hosts.txt"}))
    res = load_config(tmp_path / "exp.yaml", cwd=tmp_path)
    assert res.hosts == [("node1", 2), ("node2", 2)] and res.np == 4
    assert res.config.cluster.hostfile == str(tmp_path / "hosts.txt")  # stored absolute
    assert res.sources["cluster.np"] == "default (total slots)"


def test_hosts_as_comma_string(tmp_path):
    res = load_config(None, ["cluster.hosts=a:1,b:2"], cwd=tmp_path)
    assert res.hosts == [("a", 1), ("b", 2)] and res.np == 3
    assert res.resolved_dict()["cluster"]["hosts"] == ["a:1", "b:2"]


def test_resolved_config_round_trips(tmp_path):
    """RUN_DIR/config.yaml is itself a valid config that resolves to the same thing."""
    (tmp_path / "exp.yaml").write_text(with_())
    res = load_config(tmp_path / "exp.yaml", ["train.epochs=2"], cwd=tmp_path)
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(res.resolved_dict()))
    again = load_config(tmp_path / "resolved.yaml", cwd=tmp_path)
    assert again.resolved_dict() == res.resolved_dict()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    res = load_config(path.relative_to(REPO))
    assert res.np >= 1


def test_default_config_matches_issue():
    res = load_config(REPO / "configs" / "cnn-digits.yaml", cwd=REPO)
    c = res.config
    assert (c.job.name, c.job.backend, c.job.model) == ("cnn-digits", "torch", "cnn")
    assert c.data.dataset == "digits" and c.compression.type == "ranger"
    assert res.np == 2 and res.hosts == [("localhost", 2)] and c.cluster.controller == "gloo"


def test_config_error_is_exception_with_all_problems(tmp_path):
    (tmp_path / "exp.yaml").write_text(with_(train={"epoch": 1, "lr": 0}))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "exp.yaml", cwd=tmp_path)
    assert {p.path for p in exc.value.problems} == {"train.epoch", "train.lr"}


def test_doctor_is_wired(tmp_path):
    r = run_cli(["doctor", "--help"], tmp_path)
    assert r.returncode == 0 and "ranger-hvd doctor" in r.stdout
