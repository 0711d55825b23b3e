"""``hierarchical=True``: a dense sum per host, one sparse exchange among the hosts' leaders.

One launch of 2 hosts x 2 ranks (``horovodrun -H localhost:2,127.0.0.1:2``: two host names, both
started on this machine) checks the math; the refusals are checked without a launch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("horovod.torch")

from ranger_hvd import core  # noqa: E402
from ranger_hvd.torch import RangerCompressor  # noqa: E402
from ranger_hvd.torch.hierarchical import (HierarchicalHosts, HostLayout, HostLayoutError,  # noqa: E402
                                           check_layout, host_process_sets, layout_from_places,
                                           normalize_hosts, process_sets_for)
from tests.hvdrun import run_workers  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "hier_scenario.py"
TWO_BY_TWO = "localhost:2,127.0.0.1:2"


# ---------------------------------------------------------------------------------- one launch
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_workers(WORKER, tmp_path_factory.mktemp("hier"), np=4, hosts=TWO_BY_TWO,
                       env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"}, timeout=400)


@pytest.mark.horovod
def test_hosts_found_and_registered_sets_reused(runs):
    """The worker registered host_process_sets(2) at hvd.init: the compressor uses those."""
    for rep in runs:
        lay = rep["layout"]
        assert lay["hosts"] == [[0, 1], [2, 3]]
        assert lay["leader"] == (0 if rep["rank"] < 2 else 2)
        assert lay["is_leader"] == (rep["local_rank"] == 0)
        assert lay["local"] == lay["hosts"][rep["rank"] // 2]
        assert lay["cross"] == ([0, 2] if lay["is_leader"] else None)
        registered = lay["registered"]
        assert sorted(registered) == ["[0, 1]", "[0, 2]", "[2, 3]"]
        assert lay["static"] == [registered[str(lay["local"])]] + (
            [registered["[0, 2]"]] if lay["is_leader"] else [])


@pytest.mark.horovod
@pytest.mark.parametrize("case, exchange", [
    ("equal_average", "allgather"), ("equal_average", "global_topk"),
    ("equal_sum", "allgather"), ("equal_sum", "global_topk"),
    ("equal_groups", "allgather"), ("equal_mixed", "allgather")])
def test_density_one_equals_plain_horovod(runs, case, exchange):
    """d = 1 gives the average over all 4 ranks, step after step. Within float rounding, not bit
    for bit: Gloo's ring adds the 4 gradients in its own order, ours adds (g0 + g1) + (g2 + g3).
    ``equal_mixed`` gives hosts [[0, 1, 2], [3]]: a host of 3 ranks and a leader alone."""
    for rep in runs:
        r = rep[case]
        assert r["moved"] > 1e-3
        assert max(r[exchange]["diffs"]) <= 1e-6, r
    # the broadcast hands every rank of a host the leader's bits, and the leaders add alike
    assert len({rep[case][exchange]["digest"] for rep in runs}) == 1


@pytest.mark.horovod
@pytest.mark.parametrize("exchange", ["allgather", "global"])
def test_drain_delivers_every_gradient_once(runs, exchange):
    """3 steps of gradients, then zeros until the leaders' residuals are empty (the allgather run
    groups the ranks as hosts [[0, 2], [1, 3]]: any partition works)."""
    leaders = {"allgather": (0, 1), "global": (0, 2)}[exchange]
    for rep in runs:
        d = rep[f"drain_{exchange}"]
        assert d["leader"] == (rep["rank"] in leaders)
        assert d["held"] == [d["leader"]] * 2, d        # residuals live on the leaders only
        assert d["residual"] == 0.0, d
        assert d["error"] < 1e-6, d


@pytest.mark.horovod
def test_inf_on_a_rank_voids_the_step_everywhere(runs):
    for rep in runs:
        nf = rep["nonfinite"]
        assert nf["finite_after_inf"] is False           # every rank's average shows the Inf
        if rep["rank"] == 2:   # the Inf's host: its leader's residual is what it was, bit for bit
            assert nf["unchanged"] is True
        elif rep["rank"] == 0:   # the other host takes back what it sent: e + (g0 + g1), exactly
            assert nf["holds_step_back"] is True
        else:
            assert nf["no_residual"] is True


@pytest.mark.horovod
def test_bytes_per_rank_the_sparse_exchange_has_one_member_per_host(runs):
    """100,000 entries at d = 0.01: k = 1,000 pairs of 8 bytes, plus the 4-byte token."""
    k, pair, n = 1000, 8, 100_000
    for rep in runs:
        leader = rep["local_rank"] == 0
        b = rep["bytes"]
        # flat: each rank receives the 3 other ranks' pairs
        assert all(s["bytes_received"] == 3 * k * pair + 4 for s in b["flat-allgather"]), b
        for s in b["hier-allgather"]:
            # hierarchical: a leader receives the other leader's pairs; the others only the token
            assert s["bytes_received"] == (k * pair + 4 if leader else 4), s
            assert s["bytes_sent"] == (k * pair + 4 if leader else 4), s
            # within the host: the dense sum (both ranks), then the leader hands over both hosts' pairs
            assert s["bytes_sent_local"] == (4 * n + 2 * k * pair if leader else 4 * n), s
            assert s["bytes_received_local"] == (4 * n if leader else 4 * n + 2 * k * pair), s
        for s in b["hier-global_topk"]:
            assert (s["bytes_received"] <= 1.2 * k * pair + 4) if leader else (s["bytes_received"] == 4), s
            # G, about k pairs, is what the leader hands over within the host
            shared = s["bytes_sent_local" if leader else "bytes_received_local"] - 4 * n
            assert 0.9 * k * pair <= shared <= 1.1 * k * pair, s


# ---------------------------------------------------------------------------------- refusals, no launch
def test_hosts_must_cover_every_rank_once():
    assert check_layout([[0, 1], [2, 3]], 4) == HostLayout(((0, 1), (2, 3)), 4)
    assert check_layout([[3, 1], [2], [0]], 4).leaders == (0, 1, 2)
    with pytest.raises(HostLayoutError, match=r"do not cover rank\(s\) \[3\]"):
        check_layout([[0, 1], [2]], 4)
    with pytest.raises(HostLayoutError, match=r"rank 1 is in hosts\[0\] and in hosts\[1\]"):
        check_layout([[0, 1], [1, 2, 3]], 4)
    with pytest.raises(HostLayoutError, match=r"rank 2 is twice in hosts\[1\]"):
        check_layout([[0, 1], [2, 2, 3]], 4)
    with pytest.raises(HostLayoutError, match=r"hosts\[1\] holds rank 4, but the job has 4 ranks"):
        check_layout([[0, 1], [2, 4]], 4)


def test_one_rank_per_host_is_refused():
    with pytest.raises(HostLayoutError, match="each of the 3 rank.s. is alone on its host"):
        check_layout([[0], [1], [2]], 3)
    with pytest.raises(HostLayoutError, match="alone on its host"):
        layout_from_places([("a", 0, 1), ("b", 0, 1)])
    # mixed hosts are fine: the lone rank leads its own host
    assert layout_from_places([("a", 0, 2), ("b", 0, 1), ("a", 1, 2)]).hosts == ((0, 2), (1,))


def test_host_names_must_agree_with_horovods_local_ranks():
    with pytest.raises(HostLayoutError, match=r"ranks \[0, 1\] name host 'a'.*hosts=\[\[0, 1\]"):
        layout_from_places([("a", 0, 2), ("a", 0, 2), ("b", 0, 2), ("b", 1, 2)])


def test_hosts_argument_is_checked_when_given():
    assert normalize_hosts([[1, 0], (3, 2)]) == ((0, 1), (2, 3))
    assert [p.ranks for p in host_process_sets(2, size=4)] == [[0, 1], [2, 3], [0, 2]]
    assert [p.ranks for p in host_process_sets([[0, 1, 2], [3]], size=4)] == [[0, 1, 2], [0, 3]]
    with pytest.raises(HostLayoutError, match="5 ranks do not make hosts of 2 ranks each"):
        host_process_sets(2, size=5)

    class Set:   # what normalize_hosts reads of a Horovod ProcessSet
        ranks = [2, 3]

    assert normalize_hosts([[0, 1], Set()]) == ((0, 1), (2, 3))
    for bad, message in [("0,1", "must be a list of hosts"), ([[0, 1], []], r"hosts\[1\] is empty"),
                         ([[0, "1"]], r"hosts\[0\] holds '1'"), ([[0, True]], r"hosts\[0\] holds True"),
                         ([[0, 1], 2], r"hosts\[1\] must be a list of ranks"), ([], "hosts is empty")]:
        with pytest.raises(HostLayoutError, match=message):
            RangerCompressor(hierarchical=True, hosts=bad)
    with pytest.raises(core.OptionsError, match="pass hierarchical=True too"):
        RangerCompressor(hosts=[[0, 1], [2, 3]])
    with pytest.raises(core.OptionsError, match="hierarchical=True needs selection 'topk'"):
        RangerCompressor(hierarchical=True, selection="random")


def test_hierarchical_refuses_a_partial_optimizer_and_elastic(monkeypatch):
    class Subset:   # an initialised process set of some ranks, as the optimizer would hold it
        process_set_id, ranks = 3, [0, 1]

    hier = HierarchicalHosts(RangerCompressor(hierarchical=True))
    with pytest.raises(HostLayoutError, match=r"process set of ranks \[0, 1\]: give DistributedOptimizer "
                                              "the global process set"):
        hier.setup(Subset())
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    with pytest.raises(HostLayoutError, match="does not run under elastic horovodrun"):
        hier.setup(None)


@pytest.fixture
def horovod_alone():
    import horovod.torch as hvd

    hvd.init()   # one process, size 1, static process sets only; shut down for the other tests
    yield hvd
    hvd.shutdown()


def test_one_process_and_missing_process_sets_are_refused(horovod_alone):
    import torch

    w = torch.nn.Parameter(torch.ones(40, 50))
    w.grad = torch.ones(40, 50)
    comp = RangerCompressor(hierarchical=True, min_elements=100, named_parameters=[("w", w)])
    with pytest.raises(HostLayoutError, match="each of the 1 rank.s. is alone on its host"):
        comp.compress(w.grad)
    # the sets of a 2-rank host and its leader are not registered, and Horovod is not dynamic
    with pytest.raises(HostLayoutError, match=r"HOROVOD_DYNAMIC_PROCESS_SETS=1 .* register them at "
                                              r"start-up: hvd.init\(process_sets=\[hvd.ProcessSet\(\[0, 1\]\), "
                                              r"hvd.ProcessSet\(\[0\]\)\]\)"):
        process_sets_for(HostLayout(((0, 1),), 2))


def test_the_ddp_hook_refuses_hierarchical():
    import torch

    from ranger_hvd.torch.ddp import RangerHookState

    with pytest.raises(ValueError, match="hierarchical=True is for Horovod's compression= hook"):
        RangerHookState(torch.nn.Linear(2, 2).named_parameters(), hierarchical=True)


def test_config_reaches_the_launcher(tmp_path):
    from ranger_hvd.config import load_config
    from ranger_hvd.launcher.run.command import build_command

    (tmp_path / "exp.yaml").write_text(
        "job: {name: t}\ncluster: {hosts: ['localhost:2', '127.0.0.1:2'], np: 4}\n"
        "compression: {type: ranger, hierarchical: true}\n")
    res = load_config(tmp_path / "exp.yaml", [], cwd=tmp_path)
    assert res.config.compression.options()["hierarchical"] is True
    cmd = build_command(res, "/runs/t", python="/p/python", environ={}, uid=1000, project_root="/r")
    assert cmd.env["HOROVOD_DYNAMIC_PROCESS_SETS"] == "1"
    flat = load_config(tmp_path / "exp.yaml", ["compression.hierarchical=false"], cwd=tmp_path)
    assert "HOROVOD_DYNAMIC_PROCESS_SETS" not in build_command(
        flat, "/runs/t", python="/p/python", environ={}, uid=1000, project_root="/r").env


@pytest.mark.parametrize("extra, message", [
    ("job: {name: t, backend: tensorflow}\n", "runs on job.backend 'torch' only so far"),
    ("job: {name: t}\ncluster: {runner: torchrun, np: 2}\n", "hierarchical runs under horovodrun so far"),
    ("job: {name: t}\ncluster: {hosts: ['a:1', 'b:1', 'c:2'], np: 2}\n", "the 2 rank(s) go one per host"),
])
def test_config_refuses_what_hierarchical_cannot_run(tmp_path, extra, message):
    from ranger_hvd.config import ConfigError, load_config

    (tmp_path / "exp.yaml").write_text(extra + "compression: {type: ranger, hierarchical: true}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "exp.yaml", [], cwd=tmp_path)
    found = [p for p in exc.value.problems if p.path == "compression.hierarchical"]
    assert len(found) == 1 and message in found[0].message, [str(p) for p in exc.value.problems]
