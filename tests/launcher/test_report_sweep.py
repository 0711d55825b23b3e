"""report (tables and PNGs) on fabricated run directories, and sweep orchestration with a stand-in
launch (the real launch path is covered by test_launch.py)."""

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

from rich.console import Console

from ranger_hvd.launcher import cli
from ranger_hvd.launcher.compare.labels import run_labels
from ranger_hvd.launcher.compare.report import load_run, make_report, table_text
from ranger_hvd.launcher.run.summary import RunResult

from .conftest import run_cli, tree


def fake_run(root: Path, name: str, density: float = 0.01, steps: int = 20, status: str = "success",
             metrics=("accuracy",), compression=None, lr: float = 0.05, momentum: float = 0.0) -> Path:
    """A run directory as a launch leaves it: resolved config, metrics.jsonl (torn last line), summary."""
    run = root / "fake" / name
    run.mkdir(parents=True)
    comp = compression or {"type": "ranger", "density": density, "momentum": 0.0, "min_elements": 1024}
    (run / "config.yaml").write_text(yaml.safe_dump({
        "job": {"name": "fake", "backend": "torch", "model": "cnn"}, "train": {"lr": lr, "epochs": 2, "momentum": momentum},
        "compression": comp, "cluster": {"np": 2}, "output": {"dir": str(root)}}))
    lines = []
    for s in range(1, steps + 1):
        vals = {m: 1 - 1.0 / s for m in metrics}
        if s == steps:
            vals.update({f"eval_{m}": 0.9 for m in metrics})
        lines.append({"step": s, "epoch": (s - 1) // 10, "loss": 2.0 / s + density, "metrics": vals,
                      "bytes_sent": int(1e6 * density), "step_time": 0.01, "time": 0.05 * s})
    lines.append({"event": "end", "steps": steps, "metrics": {"eval_" + m: 0.9 for m in metrics}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"torn\": ")
    (run / "summary.json").write_text(json.dumps({"status": status, "np": 2, "duration_s": 1.5,
                                                  "compression": comp["type"]}))
    return run


def test_report_table_and_pngs(tmp_path, capsys):
    a = fake_run(tmp_path, "a", 0.01)
    b = fake_run(tmp_path, "b", 0.1, steps=15, status="failed")
    runs, pngs, out = make_report([a, b], console=Console(width=100))
    # a comparison of several runs goes to a directory of its own, printed
    assert out.parent == tmp_path / "_reports" and not (a / "report").exists() and not (b / "report").exists()
    names = sorted(p.name for p in pngs)
    assert names == ["accuracy_vs_step.png", "accuracy_vs_time.png", "bytes_per_step.png",
                     "eval_accuracy_vs_step.png", "eval_accuracy_vs_time.png", "loss_vs_step.png",
                     "loss_vs_time.png"]
    for p in pngs:
        assert p.stat().st_size > 0
        h, w = mpimg.imread(p).shape[:2]
        assert (w, h) == (700, 450)
    assert [r.label for r in runs] == ["ranger d=0.01", "ranger d=0.1"]   # only what differs
    text = (out / "report.txt").read_text()
    assert "failed" in text and "ranger d=0.01" in text
    printed = capsys.readouterr().out
    assert "loss" in printed and "accuracy" in printed and f"report: {out}" in printed
    rep = json.loads((out / "report.json").read_text())
    assert [r["steps"] for r in rep["runs"]] == ["20", "15"]
    assert [r["label"] for r in rep["runs"]] == ["ranger d=0.01", "ranger d=0.1"]


def test_one_run_report_goes_into_its_directory(tmp_path):
    a = fake_run(tmp_path, "a")
    runs, _, out = make_report([a], console=Console(width=100))
    assert out == a / "report" and runs[0].label == "fake/a"


RANGER = {"type": "ranger", "density": 0.01, "momentum": 0.9, "min_elements": 1024, "check_finite": True}


@pytest.mark.parametrize("configs,expected", [
    # the three-way comparison: the type, and ranger's headline options
    ([{"compression": {"type": "none"}}, {"compression": {"type": "fp16"}}, {"compression": RANGER}],
     ["none", "fp16", "ranger d=0.01 m=0.9@DGC"]),
    # runs that differ only in momentum
    ([{"compression": RANGER}, {"compression": {**RANGER, "momentum": 0.0}}], ["ranger m=0.9@DGC", "ranger"]),
    # two ranger runs that differ in momentum, beside a dense one
    ([{"compression": {"type": "none"}}, {"compression": RANGER}, {"compression": {**RANGER, "momentum": 0.5}}],
     ["none", "ranger d=0.01 m=0.9@DGC", "ranger d=0.01 m=0.5@DGC"]),
    # a section that also holds other types' options, as null
    ([{"compression": {"type": "none", "density": None, "check_finite": None}}, {"compression": RANGER}],
     ["none", "ranger d=0.01 m=0.9@DGC"]),
    # one momentum, labelled where it is applied: the dense twin's, SGD's after the exchange, in the
    # compressor with and without DGC's masking
    ([{"train": {"momentum": 0.9}, "compression": {"type": "none"}},
      {"train": {"momentum": 0.9}, "compression": {**RANGER, "momentum": 0.0}},
      {"train": {"momentum": 0.0}, "compression": RANGER},
      {"train": {"momentum": 0.0}, "compression": {**RANGER, "momentum_masking": False}}],
     ["none m=0.9", "ranger d=0.01 m=0.9@optimizer", "ranger d=0.01 m=0.9@DGC", "ranger d=0.01 m=0.9@compressor"]),
    ([{"train": {"momentum": 0.0}, "compression": {"type": "fp16"}},
      {"train": {"momentum": 0.0}, "compression": {**RANGER, "momentum": 0.0}}], ["fp16 m=0", "ranger d=0.01 m=0"]),
    # other keys by their last name
    ([{"train": {"lr": 0.1, "momentum": 0.9}, "compression": RANGER},
      {"train": {"lr": 0.2, "momentum": 0.9}, "compression": RANGER}], ["lr=0.1", "lr=0.2"]),
    # a key with the same last name in two sections: the dotted path
    ([{"job": {"name": "a"}, "data": {"name": "x"}}, {"job": {"name": "b"}, "data": {"name": "y"}}],
     ["data.name=x job.name=a", "data.name=y job.name=b"]),
    # identical configs: the run directories tell them apart
    ([{"compression": RANGER}, {"compression": RANGER}], ["fake/1", "fake/2"]),
    ([{"compression": RANGER, "train": {"lr": 0.1}}, {"compression": RANGER, "train": {"lr": 0.1}},
      {"compression": RANGER, "train": {"lr": 0.2}}], ["lr=0.1 (fake/1)", "lr=0.1 (fake/2)", "lr=0.2"]),
], ids=["three-way", "momentum-only", "mixed", "other-types-null", "where-momentum", "no-momentum", "other-keys", "same-last-name", "identical",
        "repeated"])
def test_labels_name_what_differs(configs, expected):
    names = [f"fake/{i}" for i in range(1, len(configs) + 1)]
    assert run_labels(configs, names) == expected


def test_table_is_readable_at_100_columns(tmp_path):
    """GAN metrics, four runs with long labels: every line fits, every run is one line, no cell cut."""
    gan = ("d_loss", "g_loss", "d_real_acc", "d_fake_acc")
    runs = [fake_run(tmp_path, "none", compression={"type": "none"}, metrics=gan, status="failed"),
            fake_run(tmp_path, "fp16", compression={"type": "fp16"}, metrics=gan),
            fake_run(tmp_path, "r1", compression={**RANGER, "warmup_steps": 100}, metrics=gan, lr=0.125),
            fake_run(tmp_path, "r2", compression={**RANGER, "momentum": 0.0}, metrics=gan)]
    loaded, _, out = make_report(runs, console=Console(width=100, file=open(tmp_path / "out.txt", "w")))
    text = table_text(loaded, "runs")
    lines = text.splitlines()
    too_long = [ln for ln in lines if len(ln) > 100]
    assert not too_long, "\n".join(f"{len(ln)}: {ln}" for ln in too_long)
    labels = [run.label for run in loaded]
    assert labels == ["none m=0 lr=0.05", "fp16 m=0 lr=0.05", "ranger d=0.01 m=0.9@DGC warmup_steps=100 lr=0.125",
                      "ranger d=0.01 m=0 lr=0.05"]
    body = lines[lines.index(next(ln for ln in lines if ln.startswith("─"))) + 1:
                 lines.index(next(ln for ln in lines if ln.startswith("train loss:")))]
    starts = [i for i, ln in enumerate(body) if ln.startswith(("none", "fp16", "ranger"))]
    assert len(starts) == 4, text
    for label, i, j in zip(labels, starts, [*starts[1:], len(body)]):
        row = body[i]
        for cell in ("20", "0.11", "0.9", "10.0", "10.0 KB", "1.5s"):   # every number whole, on the first line
            assert f" {cell} " in f" {row} ", (cell, row)
        # a long label wraps at spaces in its own column, and reads the same
        width = next(ln for ln in lines if ln.startswith("run ")).index("status")
        cell_text = " ".join(ln[:width].strip() for ln in body[i:j])
        assert cell_text == label, (cell_text, label)
    header = " ".join(lines[1:lines.index(next(ln for ln in lines if ln.startswith("─")))])
    for col in ("status", "steps", "train", "loss", "eval d", "eval g", "real acc", "fake acc", "ms/step", "sent"):
        assert col in header, header


def test_report_gan_metrics_and_out_dir(tmp_path):
    a = fake_run(tmp_path, "g", 0.01, metrics=("d_loss",))
    r = run_cli(["report", str(a), "--out", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "d_loss_vs_step.png").exists() and not (a / "report").exists()


def test_report_missing_run_dir_is_usage_error(tmp_path):
    r = run_cli(["report", str(tmp_path / "nope")], tmp_path)
    assert r.returncode == 2 and "not a run directory" in r.stderr
    assert tree(tmp_path) == set()


def test_load_run_skips_torn_line(tmp_path):
    run = load_run(fake_run(tmp_path, "a", 0.5, steps=3))
    assert [r["step"] for r in run.records] == [1, 2, 3]


def _fake_launch(results):
    def launch_one(res, console, stream=False, live=None):
        c = res.config.compression
        name = f"{c.type}-{getattr(c, 'density', '')}-lr{res.config.train.lr}"
        run = fake_run(Path(res.config.output.dir), name, getattr(c, "density", 0.0), lr=res.config.train.lr,
                       compression=res.resolved_dict()["compression"], momentum=res.config.train.momentum)
        status = "failed" if res.config.train.lr > 1 else "success"
        summ = json.loads((run / "summary.json").read_text())
        summ.update(status=status, steps=20, final_loss=0.1, final_metrics={"accuracy": 0.9},
                    bytes_sent_total=100, duration_s=1.0)
        (run / "summary.json").write_text(json.dumps(summ))
        results.append(res)
        return RunResult(status=status, exit_code=0 if status == "success" else 1, run_dir=run, summary=summ)
    return launch_one


def test_sweep_runs_every_combination_then_compares(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text("job: {name: sw}\n")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "launch_one", _fake_launch(seen))
    code = cli.main(["sweep", "exp.yaml", "compression.density=0.1,0.01", "train.lr=0.5,0.05", "train.epochs=1"])
    assert code == 0
    combos = [(r.config.compression.density, r.config.train.lr, r.config.train.epochs) for r in seen]
    assert combos == [(0.1, 0.5, 1), (0.1, 0.05, 1), (0.01, 0.5, 1), (0.01, 0.05, 1)]
    out = capsys.readouterr().out
    assert "sweep over compression.density, train.lr, train.epochs" in out
    sweep_dirs = list((tmp_path / "runs" / "_reports").glob("*-sweep"))
    assert len(sweep_dirs) == 1 and f"report: {sweep_dirs[0]}" in out
    meta = json.loads((sweep_dirs[0] / "sweep.json").read_text())
    assert len(meta["runs"]) == 4 and meta["axes"]["train.lr"] == ["0.5", "0.05"]
    assert (sweep_dirs[0] / "loss_vs_step.png").exists() and (sweep_dirs[0] / "report.txt").exists()
    labels = [r["label"] for r in json.loads((sweep_dirs[0] / "report.json").read_text())["runs"]]
    assert labels == ["ranger d=0.1 lr=0.5", "ranger d=0.1 lr=0.05", "ranger d=0.01 lr=0.5", "ranger d=0.01 lr=0.05"]


def test_sweep_over_compression_types_labels_each_type(tmp_path, monkeypatch, capsys):
    """The first comparison anyone runs: a config written for ranger, swept over the three types."""
    (tmp_path / "exp.yaml").write_text("job: {name: sw}\ncompression: {type: ranger, density: 0.01, momentum: 0.9}\n")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "launch_one", _fake_launch(seen))
    assert cli.main(["sweep", "exp.yaml", "compression.type=none,fp16,ranger", "train.epochs=2"]) == 0
    assert [r.config.compression.type for r in seen] == ["none", "fp16", "ranger"]
    assert capsys.readouterr().err == ""        # options of another type are not worth a warning
    sweep_dir = next((tmp_path / "runs" / "_reports").glob("*-sweep"))
    labels = [r["label"] for r in json.loads((sweep_dir / "report.json").read_text())["runs"]]
    # the dense twins keep the momentum, in the optimizer (the one place they have)
    assert labels == ["none m=0.9", "fp16 m=0.9", "ranger d=0.01 m=0.9@DGC"]


def test_sweep_with_a_failed_run_exits_1(tmp_path, monkeypatch):
    (tmp_path / "exp.yaml").write_text("job: {name: sw}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "launch_one", _fake_launch([]))
    assert cli.main(["sweep", "exp.yaml", "train.lr=0.1,5"]) == 1


@pytest.mark.parametrize("axes,path", [(["train.lr=0.1,-1"], "train.lr"), (["train.lrr=0.1,0.2"], "train.lrr"),
                                       (["train.lr=0.1,"], "train.lr"), (["train.lr=1", "train.lr=2"], "train.lr")])
def test_sweep_validates_every_combination_first(tmp_path, monkeypatch, capsys, axes, path):
    (tmp_path / "exp.yaml").write_text("job: {name: sw}\n")
    monkeypatch.chdir(tmp_path)

    def boom(*a, **k):
        raise AssertionError("nothing may start when a combination is invalid")

    monkeypatch.setattr(cli, "launch_one", boom)
    assert cli.main(["sweep", "exp.yaml", *axes]) == 2
    assert f"{path}:" in capsys.readouterr().err
    assert tree(tmp_path) == {"exp.yaml"}
