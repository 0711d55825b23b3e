"""The end-to-end network benchmark (benchmarks/bench_network.py): its quick grid on 2 real test hosts,
its link limits on 3, teardown after Ctrl-C, and its argument checks. Full runs stay out of the suite.

Needs root, ``ip netns``, ``tc`` and sshd for the ``netns`` tests; skipped with the reason otherwise.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launcher.conftest import REPO, needs_horovod

BENCH = REPO / "benchmarks" / "bench_network.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from netbench.hosts import TestHosts, unusable_reason  # noqa: E402
from bench_network import QUICK  # noqa: E402

STEPS = QUICK["steps"]  # timed steps of the quick grid: one round per mode at least, so each leads once

def _skip_unless_usable(prefix):
    why = unusable_reason(prefix)
    if why:
        pytest.skip(why)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


def _bench(args, **kw):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, str(BENCH), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _expected_ranger_bytes(shapes, density):
    """Per rank and step: k int32 indices + k fp32 values + a 4-byte token per compressed tensor
    (2-D or more, >= 1024 entries), the whole fp32 tensor otherwise."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if len(shape) >= 2 and n >= 1024:
            total += math.ceil(density * n) * 8 + 4
        else:
            total += 4 * n
    return total


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
def test_quick_grid_on_two_hosts(tmp_path):
    _skip_unless_usable("rb10t")
    from netbench.models import torch_model

    start = time.time()
    proc = _bench(["--quick", "--out", str(tmp_path), "--prefix", "rb10t", "--net", "10.77.110",
                   "--cycle-time-ms", "5"])
    out, _ = proc.communicate(timeout=300)
    took = time.time() - start
    assert proc.returncode == 0, out[-5000:]
    assert not TestHosts(2, tmp_path, "rb10t", "10.77.110").existing(), "test hosts left behind"

    data = json.loads((tmp_path / "network-results.json").read_text())
    (run,) = data["runs"]
    assert (run["hosts"], run["link"], run["model"]) == (2, "1gbit", "lstm-small")
    assert sorted(run["raw"]["addresses"]) == ["10.77.110.11", "10.77.110.12"], run["raw"]["addresses"]
    # each rank ran pinned to one core, the two on different cores where the machine has two
    cores = run["raw"]["cores"]
    assert all(len(c) == 1 for c in cores), cores
    assert len({c[0] for c in cores}) == min(2, len(os.sched_getaffinity(0))), cores
    assert data["meta"]["pinned"] is True
    # the cycle time reached every rank through horovodrun, and the results say so
    assert data["meta"]["cycle_time_ms"] == 5 and float(run["raw"]["cycle_time_env"]) == 5, run["raw"]
    figures = run["figures"]
    assert list(figures) == ["compute", "dense", "fp16", "floor", "ranger-0.01", "ranger-0.001"]
    # the timed steps were interleaved: round r of every mode ran after round r-1 of every mode
    for rank in run["raw"]["ranks"]:
        rounds = [sorted(rank[mode]["starts_s"][r] for mode in figures) for r in range(STEPS)]
        assert all(a[-1] < b[0] for a, b in zip(rounds, rounds[1:])), rounds
        # and the order rotated: each mode ran first in some round
        firsts = {min(figures, key=lambda m: rank[m]["starts_s"][r]) for r in range(STEPS)}
        assert firsts == set(figures), firsts
    for mode, fig in figures.items():
        for rank in run["raw"]["ranks"]:
            times = rank[mode]["times_s"]
            assert len(times) == STEPS and all(t > 0 for t in times), (mode, times)
        assert fig["p10_ms"] <= fig["median_ms"] <= fig["p90_ms"], (mode, fig)
        assert fig["overhead_ms"] == pytest.approx(fig["median_ms"] - figures["compute"]["median_ms"])

    model, _, _ = torch_model("lstm-small")
    shapes = [tuple(p.shape) for p in model.parameters()]
    numel = sum(math.prod(s) for s in shapes)
    assert figures["dense"]["bytes_per_step"] == 4 * numel == 8_752_384, figures["dense"]
    assert figures["fp16"]["bytes_per_step"] == 2 * numel, figures["fp16"]
    assert figures["floor"]["bytes_per_step"] == 4 * len(shapes), figures["floor"]  # one token each
    for d in (0.01, 0.001):
        fig = figures[f"ranger-{d}"]
        assert fig["bytes_per_step"] == _expected_ranger_bytes(shapes, d), (d, fig["bytes_per_step"])
        assert fig["bytes_reduction"] == pytest.approx(4 * numel / fig["bytes_per_step"])
        prof = fig["profile"]
        # embedding, LSTM input and hidden weights, decoder weight: one allgather each; 3 biases dense
        assert (prof["allgathers_per_step"], prof["dense_allreduces_per_step"]) == (4, 3), prof
        assert prof["compress_ms_per_step"] > 0 and prof["decompress_ms_per_step"] > 0, prof

    md = (tmp_path / "network-results.md").read_text()
    assert "| 2 | 1gbit | lstm-small | ranger d=0.001 |" in md and "Machine:" in md, md[:2000]
    assert "| 2 | 1gbit | lstm-small | hook floor |" in md, md[:3000]
    assert (tmp_path / "network-results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ranger d=0.001" in out  # the printed table
    assert took < 240, f"quick run took {took:.0f} s"


@pytest.mark.netns
def test_three_hosts_and_link_limits(tmp_path):
    _skip_unless_usable("rb10l")
    hosts = TestHosts(3, tmp_path, "rb10l", "10.77.111")
    names = ["rb10l-ns1", "rb10l-ns2", "rb10l-ns3"]

    def qdiscs():
        return [subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "rhvd0"],
                               capture_output=True, text=True, check=True).stdout for ns in names]

    with hosts:
        assert sorted(hosts.existing()) == names
        # the first host reaches every host's sshd with the key (what horovodrun does)
        for addr in hosts.addresses:
            r = subprocess.run([*hosts.run_prefix(), "ssh", "-o", "BatchMode=yes", "-o",
                                "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-p", "2222",
                                "-i", str(hosts.key), addr, "cat", "/etc/hosts"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, (addr, r.stderr)
            assert f"{addr} {os.uname().nodename}" in r.stdout, (addr, r.stdout)
        hosts.set_link("10gbit")
        assert all("tbf" in q and "rate 10Gbit" in q for q in qdiscs()), qdiscs()
        hosts.set_link("1gbit")
        assert all("rate 1Gbit" in q for q in qdiscs()), qdiscs()
        hosts.set_link("none")
        assert not any("tbf" in q for q in qdiscs()), qdiscs()
    assert hosts.existing() == []


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
def test_ctrl_c_removes_hosts_and_ranks(tmp_path):
    _skip_unless_usable("rb10i")
    # Started with SIGINT ignored, as a non-interactive shell starts `cmd &` (CI may): Ctrl-C must
    # still stop it. Steps enough for hours: the interrupt, not the end of the grid, stops the run.
    proc = _bench(["--quick", "--steps", "100000", "--out", str(tmp_path), "--prefix", "rb10i", "--net", "10.77.112"],
                  start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    marker = "10.77.112.11:1,10.77.112.12:1"  # in horovodrun's command line

    def ranks():     # the two Python processes of the ranks, not horovodrun or the ssh commands
        found = [c.split()[1:] for c in _processes_mentioning("netbench.worker --model lstm-small")]  # "pid: cmd"
        return [c for c in found if c[0].endswith(("python", "python3")) and c[1:3] == ["-m", "netbench.worker"]]

    try:
        deadline = time.time() + 120
        while len(ranks()) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert _processes_mentioning(marker), "horovodrun never started"
        assert len(ranks()) == 2, _processes_mentioning("netbench.worker")
        time.sleep(2)     # the ranks are in their steps
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:        # a failed check above: stop the run before reporting it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out, out[-3000:]
    assert TestHosts(2, tmp_path, "rb10i", "10.77.112").existing() == []
    assert _processes_mentioning(marker) == []
    assert _processes_mentioning("netbench.worker --model lstm-small") == []


def test_bad_arguments_exit_2_naming_them(tmp_path):
    proc = _bench(["--models", "resnet50", "vgg99", "--modes", "ranger-2", "hook-0", "hook-0.01",
                   "--hosts", "1", "--cycle-time-ms", "0", "--out", str(tmp_path)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    for culprit in ("--models vgg99", "--modes ranger-2", "--modes hook-0", "--hosts 1",
                    "--cycle-time-ms 0"):
        assert culprit in out, out
    assert "--modes hook-0.01" not in out, out
    assert list(tmp_path.iterdir()) == []


def test_modes_name_the_entry_point():
    from netbench.report import mode_label
    from netbench.worker import parse_mode
    assert parse_mode("ranger-0.01") == ("ranger", 0.01) and parse_mode("hook-0.001") == ("hook", 0.001)
    assert mode_label("ranger-0.01") == "ranger d=0.01"
    assert mode_label("hook-0.001") == "ranger hook d=0.001"
    assert parse_mode("global-0.01") == ("global", 0.01)
    assert parse_mode("ddp") == ("ddp", None) and parse_mode("ddp-0.01") == ("ddp", 0.01)
    assert mode_label("ddp-0.01") == "DDP + ranger_hook d=0.01"
    assert parse_mode("ddpglobal-0.01") == ("ddpglobal", 0.01)
    assert mode_label("ddpglobal-0.01") == "DDP + ranger_hook global top-k d=0.01"
    assert mode_label("global-0.01") == "ranger global top-k d=0.01"
    with pytest.raises(ValueError):
        parse_mode("topk-0.01")


def test_global_top_k_only_on_pytorch_models(tmp_path):
    proc = _bench(["--models", "keras-resnet50", "mlp-102", "--modes", "global-0.01",
                   "--out", str(tmp_path)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "--modes global-0.01: runs on PyTorch models only, not keras-resnet50" in out
    assert "not mlp-102" not in out


def test_exchange_only_arguments(tmp_path):
    proc = _bench(["--exchange-only", "--models", "keras-resnet50", "tensor-1m", "--modes", "floor",
                   "ddp-0.01", "ranger-0.01", "--out", str(tmp_path)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    for culprit in ("--models keras-resnet50: --exchange-only runs PyTorch shapes only",
                    "--modes floor: not an exchange", "--modes ddp-0.01: not an exchange"):
        assert culprit in out, out
    assert "--models tensor-1m" not in out and "--modes ranger-0.01" not in out, out
    proc = _bench(["--models", "tensor-1m", "--ranks-per-host", "3", "--out", str(tmp_path)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--ranks-per-host" in out, out
    proc = _bench(["--models", "tensor-1m", "--out", str(tmp_path)])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--models tensor-1m: only with --exchange-only" in out, out
    assert list(tmp_path.iterdir()) == []


def test_exchange_shapes_are_the_models():
    import torch
    from netbench.models import SPECS, exchange_shapes, torch_model

    for name in ("resnet50", "lstm-lm", "mlp-102"):
        model, _, _ = torch_model(name)
        assert exchange_shapes(name) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        assert len(exchange_shapes(name)) == SPECS[name].tensors
    assert exchange_shapes("tensor-1m") == [("weight", (1000, 1000))]
    del torch


@pytest.mark.netns
@pytest.mark.horovod
@needs_horovod
def test_exchange_only_two_ranks_per_host(tmp_path):
    """2 hosts x 2 ranks, the 1M-entry tensor: each host ran two ranks; bytes received per rank are
    the ring allreduce's for dense, (N-1)·k·8 (+ the 4-byte token) for the allgather and at most
    about 2·k·8 for global top-k; the scaling report and plot are written."""
    _skip_unless_usable("rb33x")
    proc = _bench(["--exchange-only", "--hosts", "2", "--ranks-per-host", "2", "--models", "tensor-1m",
                   "--modes", "dense", "ranger-0.01", "global-0.01", "hier-0.01", "--steps", "2", "--warmup", "1",
                   "--out", str(tmp_path), "--name", "scaling", "--prefix", "rb33x", "--net", "10.77.113"])
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-5000:]
    assert not TestHosts(2, tmp_path, "rb33x", "10.77.113").existing(), "test hosts left behind"
    data = json.loads((tmp_path / "scaling.json").read_text())
    (run,) = data["runs"]
    assert (run["kind"], run["hosts"], run["ranks_per_host"], run["ranks"]) == ("exchange", 2, 2, 4)
    assert sorted(run["raw"]["addresses"]) == ["10.77.113.11"] * 2 + ["10.77.113.12"] * 2
    f = run["figures"]
    assert list(f) == ["dense", "ranger-0.01", "global-0.01", "hier-0.01"]   # no compute-only here
    k8 = 10_000 * 8
    assert f["dense"]["bytes_received_max"] == 2 * 3 * 4_000_000 // 4
    assert f["ranger-0.01"]["bytes_received_max"] == 3 * k8 + 4            # + the token
    assert k8 < f["global-0.01"]["bytes_received_max"] <= 2 * k8
    # hierarchical: the two hosts' leaders exchange k pairs each; the host's dense sum and
    # broadcast are counted apart
    assert f["hier-0.01"]["bytes_received_max"] == k8 + 4
    assert all(r["hier-0.01"]["bytes_received_local_per_step"] > 0 for r in run["raw"]["ranks"])
    assert all(len(r[m]["times_s"]) == 2 for r in run["raw"]["ranks"] for m in f)
    md = (tmp_path / "scaling.md").read_text()
    assert "## Exchange only" in md and "| 2x2 | 4 | 1gbit | tensor-1m | ranger global top-k d=0.01 |" in md
    assert "- met: 1M-entry tensor" not in md and "- MISSED: 1M-entry tensor" not in md   # 1 rank per host only
    assert "2 hosts x 2 ranks, tensor-1m, exchange only: ranger hierarchical d=0.01" in md
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
