"""Supervisor pieces that need no real job: failure parsing (Gloo and Open MPI texts), rank log
layouts, incremental metrics reading, and a launch when horovodrun is missing."""

import json

from ranger_hvd.launcher import cli
from ranger_hvd.launcher.run import launch
from ranger_hvd.launcher.run.progress import MetricsTail
from ranger_hvd.launcher.run.ranklogs import find_failed_rank, rank_log_files

from .conftest import tree

GLOO_LOG = """[1]<stderr>:boom
Process 1 exit with status code 3.
Terminating remaining workers after failure of Process 1.
Process 0 exit with status code 1.
RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing the job to be terminated. The first process to do so was:
Process name: 1
Exit code: 3
"""

MPI_LOG = """--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[24119,1],2]
  Exit code:    7
--------------------------------------------------------------------------
"""


def test_failed_rank_from_gloo_and_mpi_reports():
    assert find_failed_rank(GLOO_LOG, {}) == (1, 3)
    assert find_failed_rank("Process 0 exit with status code 9.\n", {}) == (0, 9)
    assert find_failed_rank(MPI_LOG, {}) == (2, 7)


def _torchrun_report(root: tuple[int, int], others: list[tuple[int, int]]) -> str:
    """torchrun's ChildFailedError report (torch 2.x layout) with a root cause and other failures."""
    def entry(i, rank, code):
        sig = "  (SIGKILL)" if code == -9 else " "
        return (f"[{i}]:\n  time      : 2026-12-07_15:09:43\n  host      : localhost\n"
                f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: 1358{rank}){sig}\n"
                f"  error_file: <N/A>\n  traceback : ...\n")
    return ("ranger_hvd.jobs FAILED\n" + "-" * 60 + "\nFailures:\n"
            + "".join(entry(i + 1, r, c) for i, (r, c) in enumerate(others)) + "-" * 60
            + "\nRoot Cause (first observed failure):\n" + entry(0, *root) + "=" * 60 + "\n")


def test_failed_rank_from_torchrun_prefers_the_rank_killed_by_a_signal():
    # rank 1 SIGKILLed; rank 0 exited 1 on the broken connection and torchrun saw it first
    assert find_failed_rank(_torchrun_report((0, 1), [(1, -9)]), {}) == (1, -9)
    assert find_failed_rank(_torchrun_report((1, -9), [(0, 1)]), {}) == (1, -9)
    # torchrun's agent SIGTERMs the surviving rank 0, which may be listed first: the SIGKILLed rank 1 is the cause
    assert find_failed_rank(_torchrun_report((0, -15), [(1, -9)]), {}) == (1, -9)
    assert find_failed_rank(_torchrun_report((1, -9), [(0, -15)]), {}) == (1, -9)
    assert find_failed_rank(_torchrun_report((0, -15), []), {}) == (0, -15)
    # no signal among them: torchrun's root cause
    assert find_failed_rank(_torchrun_report((2, 1), [(0, 1)]), {}) == (2, 1)
    assert find_failed_rank(_torchrun_report((0, 3), []), {}) == (0, 3)


def test_failed_rank_falls_back_to_traceback(tmp_path):
    err = tmp_path / "stderr"
    err.write_text("Traceback (most recent call last):\n  ...\nValueError: x\n")
    assert find_failed_rank("nothing useful", {0: {}, 3: {"stderr": str(err)}}) == (3, None)
    assert find_failed_rank("nothing useful", {}) == (None, None)


def test_rank_log_files_gloo_and_mpi_layouts(tmp_path):
    for rel in ("logs/rank.0/stdout", "logs/rank.0/stderr", "logs/rank.1/stderr"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    g = rank_log_files(tmp_path)
    assert set(g) == {0, 1} and g[0]["stdout"].endswith("logs/rank.0/stdout") and "stdout" not in g[1]
    mpi = tmp_path / "m"
    for r in ("00", "01", "10"):
        (mpi / "logs" / "1" / f"rank.{r}").mkdir(parents=True)
        (mpi / "logs" / "1" / f"rank.{r}" / "stderr").write_text("y")
    m = rank_log_files(mpi)
    assert sorted(m) == [0, 1, 10] and m[10]["stderr"].endswith("logs/1/rank.10/stderr")


def test_metrics_tail_reads_only_complete_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    t = MetricsTail(p)
    assert t.poll() == []
    p.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2')
    assert t.poll() == [{"step": 1}]
    with open(p, "a") as f:
        f.write(', "loss": 0.5}\nnot json\n' + json.dumps({"step": 3}) + "\n")
    assert t.poll() == [{"step": 2, "loss": 0.5}, {"step": 3}]
    assert [r["step"] for r in t.records] == [1, 2, 3]


def test_missing_horovodrun_exit_1_creates_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "exp.yaml").write_text("job: {name: t}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "horovodrun_path", lambda cmd: None)
    assert cli.main(["launch", "exp.yaml"]) == 1
    assert "horovodrun not found" in capsys.readouterr().out
    assert tree(tmp_path) == {"exp.yaml"}
