"""The exchange model (benchmarks/exchange_model.py): its counts on a tiny case, exact, and its fit
recovering known parameters from points it generated itself. No hosts, no Horovod."""

import math
import sys

import pytest

from tests.launcher.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import exchange_model as em  # noqa: E402
from netbench.worker import ring_allreduce_received  # noqa: E402

TINY = em.Workload("tiny", sizes=(1000,), dense_entries=10)   # k = 10 at d = 0.01, one bucket


def test_workload_counts():
    assert (TINY.entries, TINY.k(0.01), TINY.k(0.001), TINY.buckets()) == (1010, 10, 1, 1)
    wl = em.workload("w", [(10,), (64, 32), (5, 5), (1000, 30)])   # parameters() order
    assert wl.sizes == (30_000, 2048) and wl.dense_entries == 35   # backward order; 1-D and small dense
    assert wl.tensors == 4
    big = em.Workload("big", sizes=(4 * 2 ** 20, 3 * 2 ** 20, 4 * 2 ** 20), dense_entries=0)
    assert big.buckets() == 3      # 16 MiB + 12 MiB > 25 MiB: a new bucket; 12 + 16 > 25: another
    assert em.Workload("b", (3 * 2 ** 20, 3 * 2 ** 20), 0).buckets() == 1   # 24 MiB fit in one


@pytest.mark.parametrize("model", ["resnet50", "lstm-lm", "mlp-102"])
def test_buckets_as_the_compressor_cuts_them(model):
    import torch
    from netbench.models import exchange_shapes
    from ranger_hvd.torch.buckets import cut_buckets

    with torch.device("meta"):
        params = [torch.empty(shape) for _, shape in exchange_shapes(model)]
    compressed = [p for p in params if p.dim() >= 2 and p.numel() >= em.MIN_ELEMENTS]
    assert em.model_workload(model).buckets() == len(cut_buckets(compressed[::-1], em.BUCKET))


def test_counts_on_four_ranks_exact():
    assert em.terms("dense", 4, TINY) == {"L": 6, "B": 6060.0, "P": 0.0, "Li": 0.0, "Bi": 0.0}
    assert em.terms("fp16", 4, TINY)["B"] == 3030.0
    # tokens and the 10 small entries: 44 bytes in one fused allreduce, 2(N-1)/N of them received
    assert em.terms("allgather", 4, TINY, 0.01) == {"L": 9, "B": 66.0 + 3 * 10 * 8, "P": 40,
                                                     "Li": 0.0, "Bi": 0.0}
    assert em.terms("global", 4, TINY, 0.01) == {"L": 12, "B": 66.0 + 60.0 + 60.0, "P": 20,
                                                  "Li": 0.0, "Bi": 0.0}
    # the bytes a ring allreduce receives, as the benchmark counts them for dense and fp16
    assert ring_allreduce_received(1010, 4, 4) == em.bytes_received("dense", 4, TINY) == 6060


def test_bytes_grow_as_the_issue_says():
    one_m = em.Workload("1m", sizes=(1_000_000,), dense_entries=0)
    k8 = 10_000 * 8
    for n in (2, 4, 8, 64, 256):
        allgather = em.bytes_received("allgather", n, one_m, 0.01) - 2 * (n - 1) / n * 4
        assert allgather == (n - 1) * k8
        assert em.bytes_received("global", n, one_m, 0.01) - 2 * (n - 1) / n * 4 <= 2 * k8


def test_hierarchical_and_flat_placements():
    # 8 ranks on 2 hosts of 4: across hosts a ring of 2, inside each host one of 4
    t = em.terms("dense", 8, TINY, ranks_per_host=4, hierarchical=True)
    assert t == {"L": 2, "B": 4040.0, "P": 0.0, "Li": 6, "Bi": 6060.0}
    assert em.terms("dense", 8, TINY, ranks_per_host=4) == em.terms("dense", 8, TINY)
    flat = em.terms("global", 8, TINY, 0.01, ranks_per_host=4)
    # the 4 ranks' pairs owned by the other host all leave over this host's link
    assert flat["B"] == pytest.approx(2 * 7 / 8 * 44 + 4 * 4 / 8 * 80 + 7 / 8 * 80)
    hier = em.terms("global", 8, TINY, 0.01, ranks_per_host=4, hierarchical=True)
    assert hier["B"] == pytest.approx(2 * 1 / 2 * 44 + 40 + 40) and hier["L"] == 2 + 2
    # inside the host: a dense ring allreduce of the 4000 compressed bytes, then G's ~k pairs
    assert (hier["Li"], hier["Bi"]) == (9, 2 * 3 / 4 * 4000 + 80) and hier["P"] == 20
    hier = em.terms("allgather", 8, TINY, 0.01, ranks_per_host=4, hierarchical=True)
    assert (hier["L"], hier["B"], hier["P"]) == (2 + 1, 44 + 80, 20)
    assert hier["Bi"] == 2 * 3 / 4 * 4000 + 2 * 80    # then both leaders' pairs
    with pytest.raises(ValueError):
        em.terms("dense", 6, TINY, ranks_per_host=4)


def test_predict_adds_the_terms():
    p = em.Params(alpha=1e-3, beta=1e-6, gamma=1e-7, work={"allgather@0.01": (1e-5, 1e-4)})
    assert p.w("allgather", TINY, 0.01) == pytest.approx(1010e-5 + 1e-4)   # one tensor
    t = em.predict(p, "allgather", 4, TINY, 0.01, ranks_per_core=2)
    assert t == pytest.approx(9e-3 + 306e-6 + 2 * (1010e-5 + 1e-4 + 40e-7))
    p.shared_latency = True    # a message waits for its receiver's turn on a shared core
    assert em.predict(p, "allgather", 4, TINY, 0.01, ranks_per_core=2) == pytest.approx(t + 9e-3)


def test_fit_recovers_known_parameters():
    wls = {"tiny": TINY, "big": em.Workload("big", sizes=(3_000_000, 500_000), dense_entries=5000,
                                            dense_tensors=3),
           "mid": em.Workload("mid", sizes=(200_000,) * 20, dense_entries=100, dense_tensors=20)}
    truth = em.Params(alpha=2e-3, beta=9e-9, gamma=3e-8,
                      work={"dense": (1e-9, 0.0), "allgather@0.01": (8e-9, 2e-4), "global@0.01": (12e-9, 5e-4)})
    runs = []
    for name, wl in wls.items():
        for n in (2, 4, 8):
            figures = {}
            for mode, ex, d in (("dense", "dense", None), ("ranger-0.01", "allgather", 0.01),
                                ("global-0.01", "global", 0.01)):
                s = em.predict(truth, ex, n, wl, d, ranks_per_core=em.ranks_per_core(n, 2))
                figures[mode] = {"median_ms": 1e3 * s}
            runs.append({"kind": "exchange", "hosts": n, "ranks_per_host": 1, "link": "1gbit",
                         "model": name, "figures": figures})
    pts = em.points({"meta": {"cpus": 2}, "runs": runs})
    assert len(pts) == 27
    p, quality = em.fit(pts, wls)
    assert quality["relative_rms"] < 1e-6
    assert p.alpha == pytest.approx(truth.alpha, rel=1e-4) and p.beta == pytest.approx(truth.beta, rel=1e-4)
    assert p.gamma == pytest.approx(truth.gamma, rel=1e-3)
    assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12) for key in truth.work
               for a, b in zip(p.work[key], truth.work[key])), p.work
