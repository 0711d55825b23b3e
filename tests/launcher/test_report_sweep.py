"""report (tables and PNGs) on fabricated run directories, and sweep orchestration with a stand-in
launch (the real launch path is covered by test_launch.py)."""

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

from ranger_hvd.launcher import cli
from ranger_hvd.launcher.report import load_run, make_report
from ranger_hvd.launcher.supervisor import RunResult

from .conftest import run_cli, tree


def fake_run(root: Path, name: str, density: float, steps: int = 20, status: str = "success",
             metric: str = "accuracy") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "job": {"name": "fake", "backend": "torch", "model": "cnn"},
        "compression": {"type": "ranger", "density": density}, "cluster": {"np": 2},
        "output": {"dir": str(root)}}))
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "epoch": (s - 1) // 10, "loss": 2.0 / s + density, "metrics": {metric: 1 - 1.0 / s},
                      "bytes_sent": int(1e6 * density), "step_time": 0.01, "time": 0.05 * s})
    lines.append({"event": "end", "steps": steps, "metrics": {"eval_" + metric: 0.9}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"torn\": ")
    (run / "summary.json").write_text(json.dumps({"status": status, "np": 2, "duration_s": 1.5}))
    return run


def test_report_table_and_pngs(tmp_path, capsys):
    a = fake_run(tmp_path, "a", 0.01)
    b = fake_run(tmp_path, "b", 0.1, steps=15, status="failed")
    from rich.console import Console
    runs, pngs, out = make_report([a, b], console=Console(width=200))
    assert out == a / "report"                      # default: into the first run directory
    names = sorted(p.name for p in pngs)
    assert names == ["accuracy_vs_step.png", "accuracy_vs_time.png", "bytes_per_step.png",
                     "loss_vs_step.png", "loss_vs_time.png"]
    for p in pngs:
        assert p.stat().st_size > 0
        h, w = mpimg.imread(p).shape[:2]
        assert (w, h) == (700, 450)
    text = (out / "report.txt").read_text()
    assert "density=0.01" in text and "density=0.1" in text   # runs labelled by what differs
    assert "failed" in text and "ranger d=0.01" in text
    printed = capsys.readouterr().out
    assert "final loss" in printed and "accuracy" in printed
    rep = json.loads((out / "report.json").read_text())
    assert [r["steps"] for r in rep["runs"]] == ["20", "15"]


def test_report_gan_metrics_and_out_dir(tmp_path):
    a = fake_run(tmp_path, "g", 0.01, metric="d_loss")
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
        density = res.ranger_options.density
        name = f"d{density}-lr{res.config.train.lr}"
        run = fake_run(Path(res.config.output.dir) / res.job_name, name, density)
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
    sweep_dirs = list((tmp_path / "runs" / "sw").glob("sweep-*"))
    assert len(sweep_dirs) == 1
    meta = json.loads((sweep_dirs[0] / "sweep.json").read_text())
    assert len(meta["runs"]) == 4 and meta["axes"]["train.lr"] == ["0.5", "0.05"]
    assert (sweep_dirs[0] / "loss_vs_step.png").exists() and (sweep_dirs[0] / "report.txt").exists()


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
