"""Ranks that call different collectives: Horovod's stall check (on by default, limits from the
``horovod:`` section) ends the job with exit 1, and the launcher names the collective and the ranks
missing from it, on stdout and in summary.json."""

import json
import time

import pytest

from ranger_hvd.launcher.run.stall import StallWatch, parse_stall_reports, start_failure

from .conftest import needs_horovod, run_cli
from .test_launch import gone, processes_mentioning

REPORT = """\
[2026-11-27 16:00:00.000001: E /tmp/pip/horovod/common/stall_inspector.cc:107] One or more tensors were \
submitted to be reduced, gathered or broadcasted by subset of ranks and are waiting for remainder of ranks \
for more than 2 seconds. This may indicate that different ranks are trying to submit different tensors or \
that only subset of ranks is submitting tensors, which will cause deadlock. 
Missing ranks:
0!: [NoneType.sz]
1!: [a, b, c, d, e, f ...]
One or more rank (marked by "!") is stalled for longer than 5 seconds. Will shutdown.
"""


def test_parse_stall_report():
    warn = REPORT.replace("!:", ":").split("\nOne or more rank")[0] + "\n"
    reps = parse_stall_reports("noise\n" + warn + "more noise\n" + REPORT)
    assert [r.shutdown for r in reps] == [False, True]
    rep = reps[1]
    assert rep.missing == {0: ["NoneType.sz"], 1: ["a", "b", "c", "d", "e", "f"]}
    assert rep.collectives["NoneType.sz"] == [0] and rep.collectives["f"] == [1]
    assert rep.waited_s == 2 and rep.shutdown_after_s == 5
    msg = rep.message()
    assert "'NoneType.sz' (missing rank 0)" in msg and "horovod.stall_check_shutdown_time_seconds" in msg


def test_stall_watch_follows_the_logs(tmp_path):
    """A warning first, the shutdown report later: the watch notes when the shutdown was first seen."""
    err = tmp_path / "stderr"
    logs = {0: {"stderr": str(err)}, 1: {"stderr": str(tmp_path / "missing")}}
    err.write_text("starting\n" + REPORT.replace("!:", ":").split("\nOne or more rank")[0] + "\n")
    watch = StallWatch()
    first = watch.poll(logs, now=1.0)
    assert first is not None and not first.shutdown and watch.shutdown_seen_at is None
    assert watch.poll(logs, now=1.5) is first                  # nothing new: the same report
    with open(err, "a") as f:
        f.write(REPORT)
    rep = watch.poll(logs, now=2.0)
    assert rep.shutdown and set(rep.missing) == {0, 1} and watch.shutdown_seen_at == 2.0
    watch.poll(logs, now=3.0)
    assert watch.shutdown_seen_at == 2.0


@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_mismatched_collectives_end_with_exit_1_naming_the_collective(tmp_path, controller):
    (tmp_path / "exp.yaml").write_text(
        "job: {name: stall, entry: tests.launcher.stall_job}\n"
        f"cluster: {{np: 2, controller: {controller}}}\n"
        "horovod: {stall_check_warning_time_seconds: 2, stall_check_shutdown_time_seconds: 4}\n")
    t0 = time.time()
    r = run_cli(["launch", "exp.yaml", "--no-live"], tmp_path, timeout=180)
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    run = next((tmp_path / "runs" / "stall").iterdir())
    s = json.loads((run / "summary.json").read_text())
    # the collectives are named, each with the rank that never joined it. Under Gloo the launcher reads
    # them from Horovod's timeline, which has not flushed the mark of the last rank to arrive yet: that
    # collective is named with its ranks unknown
    stall = s["stall"]
    expected = {"allreduce.test.mismatch.rank0": [1], "allreduce.test.mismatch.other": [0]}
    if controller == "mpi":
        assert stall["collectives"] == expected, stall
        assert stall["source"] == "Horovod stall inspector"
    else:
        known, unknown = stall["collectives"], stall["unknown_ranks"]
        assert known and all(expected[name] == ranks for name, ranks in known.items()), stall
        assert sorted([*known, *unknown]) == sorted(expected), stall
        assert stall["source"] == "launcher (Horovod timeline)"
    assert stall["shutdown"] is True and stall["shutdown_after_s"] == 4
    for name, ranks in stall["collectives"].items():
        assert f"'{name}' (missing rank {ranks[0]})" in s["error"], s["error"]
    assert all(f"'{name}'" in s["error"] for name in expected), s["error"]
    assert "stalled:" in out and "allreduce.test.mismatch.rank0" in out
    assert s["status"] == "failed" and s["exit_code"] == 1
    # start-up (imports, rendezvous) plus the limit: the stall itself ends within a few seconds of it
    stalled_for = s["duration_s"]
    assert stalled_for < 60, f"the stalled job ran {stalled_for:.1f} s (wall {took:.1f} s) with a 4 s limit"
    for rank in (0, 1):
        assert gone(int((run / "pids" / f"rank.{rank}").read_text()))
    assert not processes_mentioning(str(run))


def test_start_failure_patterns():
    log = ("ssh not successful for host node7:\nssh: connect to host node7 port 2299: Connection refused\n"
           "--------\nORTE was unable to reliably start one or more daemons.\n")
    assert start_failure(log) == ("ssh to node7 port 2299 failed: Connection refused (is sshd running there? "
                                  "cluster.ssh_port); Open MPI could not start its daemons on the hosts (ORTE); "
                                  "see horovodrun.log")
    assert "known_hosts" in start_failure("Host key verification failed.\r\n")
    assert "cluster.ssh_identity_file" in start_failure("root@b: Permission denied (publickey,password).")
    assert start_failure("ssh: Could not resolve hostname nohost: Name or service not known") == \
        "host nohost does not resolve: Name or service not known"
    assert start_failure("all good") is None


@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_host_without_sshd_puts_the_cause_in_summary(tmp_path, controller):
    """127.0.0.2 is not this machine to horovodrun, and nothing listens on the port: the launch fails
    before any rank starts, and summary.json says why instead of "error": null."""
    (tmp_path / "exp.yaml").write_text(
        "job: {name: nossh, entry: tests.launcher.tiny_job}\n"
        f"cluster: {{hosts: ['127.0.0.2:2'], ssh_port: 29111, controller: {controller}}}\n")
    r = run_cli(["launch", "exp.yaml", "--no-live"], tmp_path, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    s = json.loads(next((tmp_path / "runs" / "nossh").iterdir()).joinpath("summary.json").read_text())
    assert s["status"] == "failed" and s["failed_rank"] is None
    assert s["error"].startswith("ssh to 127.0.0.2 port 29111 failed: Connection refused"), s["error"]
    assert "cause: ssh to 127.0.0.2 port 29111" in r.stdout, r.stdout
