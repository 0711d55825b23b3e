"""The accuracy sweep's arithmetic: seeds averaged, failures kept, targets judged at their edges.

benchmarks/accuracy.py turns run directories into the committed tables; these tests feed it
summary.json files written here and check what it concludes, so a claim in the table cannot come from
a wrong mean, a dropped failure or an off-by-one comparison.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.launcher.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy  # noqa: E402


def _summary(run_dir, status="success", **fields):
    path = run_dir / "cnn-digits" / "20261127-000000" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": status, **fields}))
    return path


def test_read_run_takes_metrics_bytes_and_time_from_summary(tmp_path):
    path = _summary(tmp_path, final_metrics={"eval_accuracy": 0.97}, bytes_sent_per_step_mean=12072.0,
                    duration_s=11.5)
    run = accuracy.read_run(tmp_path)
    assert run == {"metrics": {"eval_accuracy": 0.97}, "bytes_per_step": 12072.0, "seconds": 11.5,
                   "run_dir": str(path.parent)}


def test_read_run_keeps_a_failed_run_with_its_reason(tmp_path):
    _summary(tmp_path, status="failed", error="NonFiniteGradientError: non-finite gradient\nmore")
    run = accuracy.read_run(tmp_path, exit_code=1, seconds=3.0)
    assert run["failed"] == "NonFiniteGradientError: non-finite gradient"
    assert run["metrics"] == {} and run["bytes_per_step"] is None
    # no summary at all (the launch never started): the exit code is the reason
    assert accuracy.read_run(tmp_path / "missing", exit_code=2)["failed"] == "exit 2"


def test_combine_is_the_mean_and_sample_stdev_over_seeds():
    values = [0.95, 0.97, 0.99]
    runs = [{"metrics": {"eval_accuracy": v, "eval_loss": 1 - v}, "bytes_per_step": 100.0,
             "seconds": 10.0 + i, "run_dir": f"r{i}"} for i, v in enumerate(values)]
    cell = accuracy.combine(runs)
    assert cell["metrics"]["eval_accuracy"] == pytest.approx(statistics.fmean(values))
    assert cell["metrics"]["eval_accuracy_std"] == pytest.approx(0.02)  # sample, not population
    assert cell["metrics"]["eval_accuracy_each"] == values
    assert cell["seeds"] == 3 and cell["seconds"] == pytest.approx(11.0)
    assert cell["run_dirs"] == ["r0", "r1", "r2"]


def test_combine_reports_a_cell_failed_if_any_seed_failed():
    runs = [{"metrics": {"eval_accuracy": 0.9}, "bytes_per_step": 1.0, "seconds": 1.0, "run_dir": "a"},
            {"failed": "diverged", "metrics": {}, "bytes_per_step": None, "seconds": 1.0}]
    cell = accuracy.combine(runs)
    assert cell["failed"] == "diverged" and cell["failed_seeds"] == 1 and cell["seeds"] == 2


def _results(model, dense, ranger, scale):
    cell = lambda v: {"metrics": {accuracy.METRICS[model][0]: v}, "bytes_per_step": 1.0,  # noqa: E731
                      "seconds": 1.0, "seeds": 1}
    return {"cnn-x": {"model": model, "epochs": 5,
                    "runs": {("dense", scale): cell(dense), ("ranger-0.01", scale): cell(ranger)}}}


@pytest.mark.parametrize("dense, ranger, met", [
    (0.9700, 0.9600, "yes"),     # exactly the allowed 1 point
    (0.9700, 0.9599, "no"),      # just past it
    (0.9600, 0.9700, "yes"),     # ahead of dense
])
def test_targets_judge_accuracy_gaps_in_points(dense, ranger, met):
    lines = accuracy.targets(_results("cnn", dense, ranger, 1), ["cnn-x"]).splitlines()
    (row,) = [line for line in lines if line.startswith("| cnn-x |")]
    assert row.endswith(f"| {met} |"), row
    assert "within 1.0 pt of dense" in row and "at 5 ep" in row


@pytest.mark.parametrize("dense, ranger, met", [(5.0, 5.5, "yes"), (5.0, 5.51, "no"), (5.0, 4.0, "yes")])
def test_targets_judge_gan_scores_as_a_ratio_to_dense(dense, ranger, met):
    lines = accuracy.targets(_results("gan", dense, ranger, 3), ["cnn-x"]).splitlines()
    (row,) = [line for line in lines if line.startswith("| cnn-x |")]
    assert row.endswith(f"| {met} |"), row
    assert "at 15 ep" in row and "1.10x" in row


def test_targets_judge_each_place_of_the_momentum_measured():
    results = _results("cnn", 0.9700, 0.9500, 1)
    runs = results["cnn-x"]["runs"]
    runs[("ranger-0.01-local", 1)] = {**runs[("ranger-0.01", 1)], "metrics": {"eval_accuracy": 0.9650}}
    rows = [line for line in accuracy.targets(results, ["cnn-x"]).splitlines() if line.startswith("| cnn-x |")]
    assert len(rows) == 2      # no -dgc run, no line for it
    assert rows[0].startswith("| cnn-x | ranger-0.01 at") and rows[0].endswith("| no |")
    assert rows[1].startswith("| cnn-x | ranger-0.01-local at") and rows[1].endswith("| yes |")


def test_table_shows_spread_only_over_several_seeds_and_the_gap_to_dense():
    results = _results("cnn", 0.97, 0.96, 1)
    results["cnn-x"]["runs"][("ranger-0.01", 1)] |= {"seeds": 3}
    results["cnn-x"]["runs"][("ranger-0.01", 1)]["metrics"]["eval_accuracy_std"] = 0.0123
    text = accuracy.table(results, ["cnn-x"], ["dense", "ranger-0.01"], [1])
    assert "| dense | 0.9700 | +0.0 pt |" in text
    assert "| ranger-0.01 | 0.9600 ± 0.0123 | -1.0 pt |" in text


def test_mode_names_carry_any_density_and_each_mode_says_where_the_jobs_momentum_goes():
    assert accuracy.mode_overrides("ranger-0.03", 0.9) == [
        "compression.type=ranger", "compression.density=0.03", "compression.momentum=0",
        "compression.momentum_masking=true", "train.momentum=0.9"]
    assert accuracy.mode_overrides("ranger-0.3-dgc", 0.9) == [
        "compression.type=ranger", "compression.density=0.3", "compression.momentum=0.9",
        "compression.momentum_masking=true", "train.momentum=0"]
    assert accuracy.mode_overrides("ranger-0.01-local", 0.9) == [
        "compression.type=ranger", "compression.density=0.01", "compression.momentum=0.9",
        "compression.momentum_masking=false", "train.momentum=0"]
    assert accuracy.mode_overrides("ranger-0.01-local", 0.0) is None
    assert accuracy.mode_overrides("ranger-0.3-dgc", 0.0) is None      # no momentum to move: not run
    assert accuracy.mode_overrides("ranger-0.3", 0.0)[-3:] == [
        "compression.momentum=0", "compression.momentum_masking=true", "train.momentum=0.0"]
    assert accuracy.mode_overrides("dense", 0.9) == ["compression.type=none"]      # the plain switch
    assert accuracy.mode_overrides("fp16", 0.5) == ["compression.type=fp16"]


@pytest.mark.parametrize("name", accuracy.CONFIGS)
@pytest.mark.parametrize("mode", ["dense", "fp16", "ranger-0.01", "ranger-0.01-dgc", "ranger-0.01-local"])
def test_every_mode_puts_the_jobs_momentum_in_one_place_on_every_shipped_config(name, mode):
    """The modes mean the same on every config, whether it ships momentum in the optimizer or DGC's in
    the compressor: the launcher accepts the overrides and the momentum ends where the mode says."""
    from ranger_hvd.config import load_config

    model, _, momentum = accuracy.config_epochs(name)
    overrides = accuracy.mode_overrides(mode, momentum)
    if overrides is None:
        assert mode.endswith(("-dgc", "-local")) and momentum == 0
        return
    from ranger_hvd.jobs.common import optimizer_momentum

    cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides, cwd=REPO).config
    inside, outside = cfg.compression.compressor_momentum, optimizer_momentum(cfg)   # what the job applies
    if mode.endswith(("-dgc", "-local")):
        assert (inside, outside) == (momentum, 0)
        assert cfg.compression.momentum_masking is mode.endswith("-dgc")
    else:
        assert (inside, outside) == (0, momentum)
    assert momentum == (0.0 if model == "gan" else 0.9)


@pytest.mark.parametrize("name", ["ranger", "ranger-0", "ranger-1.5", "ranger-x", "ranger-0.1-sgd", "topk-0.1",
                                  "ranger-0.1-dgc-dgc", "ranger-0.1-global", "ranger-0.1-local-dgc"])
def test_mode_names_that_mean_nothing_are_refused(name):
    assert accuracy.mode_spec(name) is None
    with pytest.raises(SystemExit):
        accuracy.main(["--modes", f"dense,{name}", "--configs", "cnn-digits"])


def test_a_density_sweep_is_read_from_the_plain_ranger_modes_only():
    modes = ["dense", "ranger-0.1", "ranger-0.01-dgc", "fp16", "ranger-0.001", "ranger-0.03"]
    swept = accuracy.swept_densities(modes)
    assert list(swept.items()) == [(0.001, "ranger-0.001"), (0.03, "ranger-0.03"), (0.1, "ranger-0.1")]
    assert accuracy.density_png(Path("docs/results/x.md")) == Path("docs/results/x-curve.png")


@pytest.mark.parametrize("name", ["cnn-digits", "rnn-digits", "gan-digits"])
@pytest.mark.parametrize("mode", ["ddp-dense", "ddp-fp16", "ddp-ranger-0.01"])
def test_ddp_modes_are_the_same_modes_under_torchrun_on_the_pytorch_configs(name, mode):
    """``ddp-MODE`` is MODE's overrides plus the launcher's switch alone: the launcher accepts them on every
    shipped PyTorch config, which then runs under torchrun with the same compression and momentum."""
    from ranger_hvd.config import load_config

    _, _, momentum = accuracy.config_epochs(name)
    plain = accuracy.mode_overrides(mode.removeprefix("ddp-"), momentum, name)
    overrides = accuracy.mode_overrides(mode, momentum, name)
    assert overrides == plain + ["cluster.runner=torchrun"]
    ddp = load_config(REPO / "configs" / f"{name}.yaml", overrides, cwd=REPO).config
    hvd = load_config(REPO / "configs" / f"{name}.yaml", plain, cwd=REPO).config
    assert ddp.cluster.runner == "torchrun" and hvd.cluster.runner == "horovodrun"
    assert ddp.compression == hvd.compression and ddp.train == hvd.train
    assert accuracy.mode_overrides(mode, momentum, name + "-tf") is None   # DDP is PyTorch's


def test_ddp_rows_are_compared_with_ddp_dense():
    results = _results("cnn", 0.97, 0.96, 1)
    runs = results["cnn-x"]["runs"]
    runs[("ddp-dense", 1)] = {**runs[("dense", 1)], "metrics": {"eval_accuracy": 0.95}}
    runs[("ddp-ranger-0.01", 1)] = {**runs[("dense", 1)], "metrics": {"eval_accuracy": 0.9455}}
    text = accuracy.table(results, ["cnn-x"], ["dense", "ranger-0.01", "ddp-dense", "ddp-ranger-0.01"], [1])
    assert "| ddp-dense | 0.9500 | +0.0 pt |" in text and "| ddp-ranger-0.01 | 0.9455 | -0.4 pt |" in text
    rows = [line for line in accuracy.targets(results, ["cnn-x"]).splitlines() if "ddp-ranger-0.01 at" in line]
    assert rows == ["| cnn-x | ddp-ranger-0.01 at 5 ep within 1.0 pt of ddp-dense | 0.9455 vs 0.9500 (-0.4 pt) | yes |"]


@pytest.mark.parametrize("config", accuracy.CONFIGS)
def test_dense_rows_from_the_plain_switch_equal_the_explicit_momentum(config):
    """The dense and fp16 rows come from ``compression.type=none|fp16`` alone; they resolve to the very
    config the committed tables were made with (the job's momentum given to the optimizer by hand)."""
    from ranger_hvd.config import load_config
    from ranger_hvd.jobs.common import optimizer_momentum

    path = accuracy.REPO / "configs" / f"{config}.yaml"
    _, _, momentum = accuracy.config_epochs(config)
    for ctype in ("none", "fp16"):
        plain = load_config(path, [f"compression.type={ctype}"], cwd=accuracy.REPO)
        by_hand = load_config(path, [f"compression.type={ctype}", f"train.momentum={momentum}"], cwd=accuracy.REPO)
        assert optimizer_momentum(plain.config) == optimizer_momentum(by_hand.config) == momentum, config
        # the rest is the same config (train.momentum: null means the default the job applies, 0.9)
        a, b = plain.resolved_dict(), by_hand.resolved_dict()
        a["train"]["momentum"] = b["train"]["momentum"] = None
        assert a == b, config


@pytest.mark.parametrize("name", accuracy.CONFIGS)
@pytest.mark.parametrize("suffix", ["", "-dgc", "-local"])
def test_global_modes_are_the_ranger_modes_with_the_global_exchange(name, suffix):
    """``global-D[-SUFFIX]`` is ``ranger-D[-SUFFIX]`` plus ``compression.exchange=global_topk`` alone; the
    launcher accepts it on every shipped config, on 4 ranks as ``--np 4`` sets them."""
    from ranger_hvd.config import load_config

    _, _, momentum = accuracy.config_epochs(name)
    plain = accuracy.mode_overrides(f"ranger-0.01{suffix}", momentum, name)
    overrides = accuracy.mode_overrides(f"global-0.01{suffix}", momentum, name)
    if plain is None:                   # no momentum to move (the GAN): neither runs
        assert overrides is None and momentum == 0
        return
    assert sorted(overrides) == sorted(plain + ["compression.exchange=global_topk"])
    four = ["cluster.np=4", "cluster.hosts=localhost:4"]
    glob = load_config(REPO / "configs" / f"{name}.yaml", overrides + four, cwd=REPO).config
    ranger = load_config(REPO / "configs" / f"{name}.yaml", plain + four, cwd=REPO).config
    assert glob.compression.exchange == "global_topk" and ranger.compression.exchange == "allgather"
    assert glob.train == ranger.train and glob.cluster.np == 4
    assert accuracy.mode_overrides(f"ddp-global-0.01{suffix}", momentum, name) is None  # DDP: allgather only


@pytest.mark.parametrize("name", ["global", "global-0", "global-1.5", "global-0.1-ddp", "global-0.1-global"])
def test_global_mode_names_that_mean_nothing_are_refused(name):
    assert accuracy.mode_spec(name) is None


def test_global_modes_stay_out_of_the_density_sweep_and_meet_the_same_targets():
    assert accuracy.swept_densities(["ranger-0.1", "global-0.01", "global-0.3"]) == {0.1: "ranger-0.1"}
    results = _results("cnn", 0.9700, 0.9500, 1)
    runs = results["cnn-x"]["runs"]
    runs[("global-0.01", 1)] = {**runs[("ranger-0.01", 1)], "metrics": {"eval_accuracy": 0.9650}}
    rows = [line for line in accuracy.targets(results, ["cnn-x"]).splitlines() if "global-0.01 at" in line]
    assert rows == ["| cnn-x | global-0.01 at 5 ep within 1.0 pt of dense | 0.9650 vs 0.9700 (-0.5 pt) | yes |"]


def test_np_runs_every_mode_on_that_many_ranks_and_says_so(tmp_path, monkeypatch):
    launched = []

    def fake_run(name, overrides, mode, epochs, seed, extra, out_root):
        launched.append((mode, extra))
        return {"metrics": {"eval_accuracy": 0.9}, "bytes_per_step": 1.0, "seconds": 1.0, "run_dir": "r"}

    monkeypatch.setattr(accuracy, "run_one", fake_run)
    monkeypatch.setattr(accuracy, "plot", lambda *a, **k: None)
    out = tmp_path / "x.md"
    accuracy.main(["--configs", "cnn-digits", "--modes", "dense,global-0.01", "--scales", "1", "--np", "4",
                   "--set", "train.lr=0.1", "--runs", str(tmp_path), "--out", str(out)])
    assert launched == [(m, ["train.lr=0.1", "cluster.np=4", "cluster.hosts=localhost:4"])
                        for m in ("dense", "global-0.01")]      # dense too: "vs dense" at the same ranks
    assert "; 4 ranks on one machine" in out.read_text() and "--np 4 --set train.lr=0.1" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["ranks"] == 4


def test_from_runs_shows_a_cell_without_any_run_directory_as_not_run(tmp_path, monkeypatch):
    """``--from-runs`` over several sweeps' directories: a mode one config never ran is "-", while a
    missing seed of a cell that ran stays a failure."""
    monkeypatch.setattr(accuracy, "plot", lambda *a, **k: None)
    for mode, seed in (("dense", 0), ("dense", 1), ("global-0.01", 0)):
        _summary(tmp_path / accuracy.run_name("cnn-digits", mode, 5, seed), final_metrics={"eval_accuracy": 0.9},
                 bytes_sent_per_step_mean=1.0, duration_s=1.0)
    out = tmp_path / "x.md"
    accuracy.main(["--configs", "cnn-digits", "--modes", "dense,global-0.01,global-0.04", "--scales", "1",
                   "--seeds", "0,1", "--from-runs", str(tmp_path), "--out", str(out)])
    runs = accuracy._runs_from_json(json.loads(out.with_suffix(".json").read_text())["results"])["cnn-digits"]["runs"]
    assert runs[("dense", 1)]["seeds"] == 2 and ("global-0.04", 1) not in runs
    assert runs[("global-0.01", 1)]["failed_seeds"] == 1
    assert "| global-0.04 | - | - |" in out.read_text()
