"""benchmarks/bench_revisions.py: the order of launches, the table it builds from launches' results,
and its argument checks. Live launches stay out of the suite (each one is a bench_network run)."""

import json
import subprocess
import sys

import pytest

from tests.launcher.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench_revisions  # noqa: E402

SCRIPT = REPO / "benchmarks" / "bench_revisions.py"


def test_each_revision_goes_first_in_alternate_rounds():
    orders = [bench_revisions.order_of_round(r) for r in range(1, 5)]
    assert orders == [["before", "after"], ["after", "before"]] * 2


def _launch(out, label, round_no, figures):
    d = out / f"{label}-{round_no}"
    d.mkdir(parents=True)
    run = {"hosts": 2, "link": "none", "model": "m",
           "figures": {mode: {"median_ms": step, "overhead_ms": exch} for mode, (step, exch) in figures.items()}}
    (d / "network-results.json").write_text(json.dumps({"meta": {}, "runs": [run]}))


def test_table_lists_every_launch_and_the_mean_ratio(tmp_path):
    _launch(tmp_path, "before", 1, {"compute": (100, 0), "dense": (200, 100)})
    _launch(tmp_path, "before", 2, {"compute": (110, 0), "dense": (240, 130)})
    _launch(tmp_path, "after", 1, {"compute": (100, 0), "dense": (150, 50)})
    _launch(tmp_path, "after", 2, {"compute": (90, 0), "dense": (180, 90)})
    cells = bench_revisions.collect(tmp_path, 2)
    assert cells[(2, "none", "m", "dense")] == {"before": [(200, 100), (240, 130)], "after": [(150, 50), (180, 90)]}
    meta = {"date": "d", "command": "c", "machine": "x", "wall_s": 1.0, "rounds": 2, "before": "A1",
            "after": "B1", "before_sha": "a" * 40, "after_sha": "b" * 40}
    text = bench_revisions.markdown(cells, meta)
    dense = next(line for line in text.splitlines() if "| dense |" in line)
    # per launch, the means (220 and 165), B / A = 0.75, each launch's exchange
    assert dense == "| 2 | none | m | dense | 200 / 240 | 150 / 180 | 220 | 165 | 0.75 | 100 / 130 | 50 / 90 |"
    assert "in the order AB, BA" in text
    bench_revisions.plot(cells, meta, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_exchange_only_launches_have_steps_and_no_exchange_column(tmp_path):
    """--exchange-only runs no compute: the step is the exchange, and no overhead is recorded."""
    for label, round_no, step in (("before", 1, 300), ("before", 2, 320), ("after", 1, 250), ("after", 2, 260)):
        run = {"hosts": 8, "link": "1gbit", "model": "m",
               "figures": {"global-0.01": {"median_ms": step}}}
        d = tmp_path / f"{label}-{round_no}"
        d.mkdir(parents=True)
        (d / "network-results.json").write_text(json.dumps({"meta": {}, "runs": [run]}))
    cells = bench_revisions.collect(tmp_path, 2)
    meta = {"date": "d", "command": "c", "machine": "x", "wall_s": 1.0, "rounds": 2, "before": "A1",
            "after": "B1", "before_sha": "a" * 40, "after_sha": "b" * 40}
    row = next(line for line in bench_revisions.markdown(cells, meta).splitlines() if "global-0.01" in line)
    assert row == "| 8 | 1gbit | m | global-0.01 | 300 / 320 | 250 / 260 | 310 | 255 | 0.82 |  |  |"
    bench_revisions.plot(cells, meta, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_missing_launch_leaves_its_cells_to_the_other(tmp_path):
    _launch(tmp_path, "after", 1, {"dense": (150, 50)})
    cells = bench_revisions.collect(tmp_path, 2)
    assert cells == {(2, "none", "m", "dense"): {"after": [(150, 50)]}}


@pytest.mark.parametrize("args, culprit", [
    (["no-such-rev", "HEAD"], "before 'no-such-rev': not a commit"),
    (["HEAD", "HEAD", "--rounds", "0"], "--rounds 0"),
    (["HEAD", "HEAD", "--", "--out", "x"], "--out: this script sets it"),
])
def test_bad_arguments_exit_2_naming_them(tmp_path, args, culprit):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args[:2], "--out", str(tmp_path / "o"), *args[2:]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert culprit in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
