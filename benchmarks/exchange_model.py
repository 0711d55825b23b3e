"""A latency-bandwidth model of each exchange, fitted to the measured exchange-only points and
extended to N = 8..256 ranks.

    python benchmarks/exchange_model.py                       # docs/results/network-scaling.json ->
                                                               # docs/results/exchange-model.{md,json,png}
    python benchmarks/exchange_model.py --results R.json --out DIR

Per step, one rank's exchange costs

    T = alpha * L + beta * B + s * (W + gamma * P)

- L: message latencies in sequence (a ring allreduce 2(N-1) per collective, a ring allgather and a
  pairwise alltoall N-1 each);
- B: bytes over the busiest host link (1 rank per host: what a rank receives; dense 2(N-1)/N*n*itemsize,
  allgather (N-1)*k*8, global top-k about 2(N-1)/N*k*8);
- W: the exchange's own CPU work per rank (error feedback, selection, casts, copies),
  a * (entries of the model) + b * (its tensors), a and b per exchange and density; P: pairs a rank scatter-adds (N*k for the allgather, about k for global top-k),
  gamma per pair;
- s: ranks per core. On the test machine all N ranks share its cores (s = N / cores when N > cores);
  on a cluster every rank has its own (s = 1).

alpha, beta, gamma and the a's and b's are fitted together by non-negative least squares on relative error
to every measured exchange-only point (one rank per host). The predictions for N = 8..256 use s = 1
and three placements: one rank per host; 8 ranks per host sending flat (every collective runs over all
N ranks; a ring crosses each host link once in each direction, so the busiest link carries what one
rank receives, except global top-k's alltoall, where all 8 ranks' pairs for other hosts leave by one
link); and 8 ranks per host hierarchical as ``RangerCompressor(hierarchical=True)`` does it (each compressed
gradient summed densely inside the host, the host's leader runs the sparse exchange among the N/8
leaders, then hands the exchanged pairs to the host's other ranks; dense and fp16 as Horovod's hierarchical
allreduce: inside the host, then across hosts on 1/8 of the tensor each). The intra-host link is an
assumption, not a measurement (``--intra-gbps``, ``--intra-latency-us``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

PAIR = 8                     # bytes of one (int32 index, fp32 value) pair
FUSION = 64 * 2 ** 20        # Horovod's fusion buffer: dense tensors travel in chunks of this
BUCKET = 25 * 2 ** 20        # RangerCompressor's default bucket_mb, in gradient bytes
MIN_ELEMENTS = 1024          # RangerCompressor's default: smaller tensors (and 1-D ones) go dense
EXCHANGES = ("dense", "fp16", "allgather", "global")
MODE_OF = {"dense": "dense", "fp16": "fp16", "ranger": "allgather", "global": "global"}
LABEL = {"dense": "dense fp32 (ring allreduce)", "fp16": "Horovod fp16 (ring allreduce)",
         "allgather": "ranger allgather of k pairs", "global": "ranger global top-k"}
PLACEMENTS = {"1/host": (1, False), "8/host flat": (8, False), "8/host hier": (8, True)}


@dataclass(frozen=True)
class Workload:
    """What a model's gradients are to the exchange."""
    name: str
    sizes: tuple[int, ...]          # entries of each compressed tensor, in backward order
    dense_entries: int              # entries of the tensors that always travel dense (1-D, small)
    dense_tensors: int = 0          # how many those are

    @property
    def tensors(self) -> int:
        return len(self.sizes) + self.dense_tensors

    @property
    def entries(self) -> int:
        return sum(self.sizes) + self.dense_entries

    def k(self, density: float) -> int:
        """Pairs one rank sends per step: k = ceil(d*n) of each compressed tensor."""
        return sum(max(1, math.ceil(density * n)) for n in self.sizes)

    def buckets(self) -> int:
        """Buckets of compressed tensors at RangerCompressor's default 25 MB (as ``cut_buckets``)."""
        count, used = 0, 0
        for n in self.sizes:
            if count == 0 or used + 4 * n > BUCKET:
                count, used = count + 1, 0
            used += 4 * n
        return count


def workload(name: str, shapes: list[tuple[int, ...]]) -> Workload:
    """A workload from parameter shapes in ``model.parameters()`` order."""
    sizes, dense, count = [], 0, 0
    for shape in reversed(shapes):
        n = math.prod(shape)
        if len(shape) >= 2 and n >= MIN_ELEMENTS:
            sizes.append(n)
        else:
            dense, count = dense + n, count + 1
    return Workload(name, tuple(sizes), dense, count)


def model_workload(name: str) -> Workload:
    from netbench.models import exchange_shapes

    return workload(name, [shape for _, shape in exchange_shapes(name)])


@dataclass
class Link:
    alpha: float     # s per message
    beta: float      # s per byte


@dataclass
class Params:
    alpha: float                     # s per message between hosts
    beta: float                      # s per byte over a host's link
    gamma: float                     # s per pair scatter-added
    # "exchange@density" -> (s per entry of the model, s per tensor): W = a*entries + b*tensors
    work: dict = field(default_factory=dict)
    intra: Link = field(default_factory=lambda: Link(5e-6, 1 / 10e9))   # inside a host (assumed)
    # whether a message's latency grows with the ranks sharing a core (a message waits for its
    # receiver to be scheduled): the fit tries both and keeps the better
    shared_latency: bool = False

    def w(self, exchange: str, wl: Workload, density: float | None = None) -> float:
        """The exchange's CPU work per step on one rank with a core of its own, in s."""
        per_entry, per_tensor = self.work.get(wkey(exchange, density), (0.0, 0.0))
        return per_entry * wl.entries + per_tensor * wl.tensors


def terms(exchange: str, n_ranks: int, wl: Workload, density: float | None = None,
          ranks_per_host: int = 1, hierarchical: bool = False) -> dict:
    """The model's counts for one step of one rank: L (latencies between hosts), B (bytes over the
    busiest host link), P (pairs scatter-added), and inside a host Li, Bi (hierarchical only)."""
    N, R = n_ranks, ranks_per_host
    if N % R:
        raise ValueError(f"{N} ranks do not fill hosts of {R}")
    H = N // R if hierarchical else N       # ranks of the collective that crosses hosts
    n = wl.entries
    # the small dense tensors (and the 4-byte tokens) of the sparse exchanges: one fused allreduce
    small_bytes = 4 * wl.dense_entries + 4 * len(wl.sizes)
    out = {"L": 0.0, "B": 0.0, "P": 0.0, "Li": 0.0, "Bi": 0.0}
    if exchange in ("dense", "fp16"):
        size = n * (4 if exchange == "dense" else 2)
        chunks = math.ceil(size / FUSION)
        out["L"] = chunks * 2 * (H - 1)
        out["B"] = 2 * (H - 1) / H * size
        if hierarchical:   # reduce-scatter and allgather inside the host; across hosts 1/R each
            out["Li"] = chunks * 2 * (R - 1)
            out["Bi"] = 2 * (R - 1) / R * size
        return out
    k = wl.k(density)
    b = wl.buckets()
    out["L"] = 2 * (H - 1)                      # the fused allreduce of tokens and small tensors
    out["B"] = 2 * (H - 1) / H * small_bytes
    if hierarchical:
        # RangerCompressor(hierarchical=True): each compressed gradient is summed densely over the
        # host (a ring allreduce inside it), the host's leader runs the sparse exchange among the H
        # leaders and hands the exchanged pairs to the host's other ranks (H*k for the allgather,
        # the ~k of G for global top-k), which scatter them as the leader does
        out["Li"] = b * 3 * (R - 1)
        out["Bi"] = 2 * (R - 1) / R * 4 * sum(wl.sizes) + (H if exchange == "allgather" else 1) * k * PAIR
    if exchange == "allgather":
        # ring allgather per bucket: every link carries every other member's k pairs
        out["L"] += b * (H - 1)
        out["B"] += (H - 1) * k * PAIR
        out["P"] = H * k
        return out
    if exchange == "global":
        # per bucket: alltoall of the pairs to their owners, allgather of the kept sums; each
        # member receives about (H-1)/H of its share of k pairs in each
        out["L"] += 2 * b * (H - 1)
        kept = (H - 1) / H * k * PAIR
        # flat with R ranks per host: the R ranks' pairs owned by other hosts all leave over the
        # host's link ((N-R)/N of each rank's k); one rank per host, or the leaders: (H-1)/H
        sent = (R * (N - R) / N if not hierarchical else (H - 1) / H) * k * PAIR
        out["B"] += sent + kept
        out["P"] = 2 * k                        # the owner's sums, then G
        return out
    raise ValueError(f"unknown exchange {exchange!r}")


def predict(p: Params, exchange: str, n_ranks: int, wl: Workload, density: float | None = None,
            ranks_per_host: int = 1, hierarchical: bool = False, ranks_per_core: float = 1.0) -> float:
    """Seconds of one step's exchange."""
    t = terms(exchange, n_ranks, wl, density, ranks_per_host, hierarchical)
    latency = p.alpha * t["L"] * (ranks_per_core if p.shared_latency else 1.0)
    return (latency + p.beta * t["B"] + p.intra.alpha * t["Li"] + p.intra.beta * t["Bi"]
            + ranks_per_core * (p.w(exchange, wl, density) + p.gamma * t["P"]))


def bytes_received(exchange: str, n_ranks: int, wl: Workload, density: float | None = None) -> float:
    """Bytes one rank receives per step, one rank per host (what ``B`` is there)."""
    return terms(exchange, n_ranks, wl, density)["B"]


# ------------------------------------------------------------------------------------------ fit
def points(results: dict, ranks_per_host: int = 1) -> list[dict]:
    """Measured exchange-only points with this many ranks per host: (exchange, density, model, N,
    seconds, hierarchical)."""
    out = []
    cores = results["meta"].get("cpus", 2)
    for run in results["runs"]:
        if (run.get("kind") != "exchange" or not run.get("figures")
                or run.get("ranks_per_host", 1) != ranks_per_host):
            continue
        for mode, fig in run["figures"].items():
            kind, _, d = mode.partition("-")
            hierarchical = kind.startswith("hier")
            kind = {"hier": "ranger", "hierglobal": "global"}.get(kind, kind)
            if kind not in MODE_OF:
                continue
            out.append({"exchange": MODE_OF[kind], "density": float(d) if d else None,
                        "model": run["model"], "ranks": run.get("ranks", run["hosts"]),
                        "ranks_per_host": ranks_per_host, "hierarchical": hierarchical,
                        "link": run["link"], "seconds": fig["median_ms"] / 1e3, "cores": cores,
                        "bytes_received": fig.get("bytes_received_max")})
    return out


def ranks_per_core(n_ranks: int, cores: int) -> float:
    return max(1.0, n_ranks / cores)


def wkey(exchange: str, density: float | None) -> str:
    """W has its constants per exchange and density (selection costs depend on k)."""
    return exchange if density is None else f"{exchange}@{density:g}"


def fit(pts: list[dict], workloads: dict[str, Workload], beta: float | None = None) -> tuple[Params, dict]:
    """alpha, beta, gamma and W's two constants per exchange and density, all non-negative, by least
    squares on relative error, once with a fixed latency per message and once with one that grows
    with the ranks sharing a core; the better fit is kept. Returns the parameters and the fit's
    quality (both variants' errors); each point gets the model's time as ``model_s``. ``beta``
    given: that time per byte (the link's nominal rate), not fitted."""
    fits = [_fit(pts, workloads, shared, beta) for shared in (False, True)]
    p, quality = min(fits, key=lambda f: f[1]["relative_rms"])
    quality["relative_rms_fixed_latency"] = fits[0][1]["relative_rms"]
    quality["relative_rms_shared_latency"] = fits[1][1]["relative_rms"]
    for q in pts:
        q["model_s"] = predict(p, q["exchange"], q["ranks"], workloads[q["model"]], q["density"],
                               ranks_per_core=ranks_per_core(q["ranks"], q["cores"]))
    return p, quality


def _fit(pts, workloads, shared_latency: bool, beta: float | None = None) -> tuple[Params, dict]:
    import numpy as np
    from scipy.optimize import nnls

    keys = sorted({wkey(q["exchange"], q["density"]) for q in pts})
    rows = []
    for q in pts:
        wl = workloads[q["model"]]
        t = terms(q["exchange"], q["ranks"], wl, q["density"])
        s = ranks_per_core(q["ranks"], q["cores"])
        row = [t["L"] * (s if shared_latency else 1.0), t["B"], s * t["P"]]
        for key in keys:
            mine = key == wkey(q["exchange"], q["density"])
            row += [s * wl.entries if mine else 0.0, s * wl.tensors if mine else 0.0]
        if beta is not None:   # the bytes' time is known: what is left to fit
            row[1], rest = 0.0, 1.0 - beta * t["B"] / q["seconds"]
        else:
            rest = 1.0
        rows.append([v / q["seconds"] for v in row] + [rest])
    a = np.array(rows)
    a, b = a[:, :-1], a[:, -1]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)   # columns of similar size for nnls
    x, _ = nnls(a / scale, b)
    x = x / scale
    if beta is not None:
        x[1] = beta
    p = Params(alpha=float(x[0]), beta=float(x[1]), gamma=float(x[2]),
               work={key: (float(x[3 + 2 * i]), float(x[4 + 2 * i])) for i, key in enumerate(keys)},
               shared_latency=shared_latency)
    rel = [predict(p, q["exchange"], q["ranks"], workloads[q["model"]], q["density"],
                   ranks_per_core=ranks_per_core(q["ranks"], q["cores"])) / q["seconds"] - 1 for q in pts]
    return p, {"relative_rms": float(np.sqrt(np.mean(np.square(rel)))),
               "worst": float(max(rel, key=abs))}


# ------------------------------------------------------------------------------------------ output
RANKS = (8, 16, 32, 64, 128, 256)


def table(p: Params, wls: dict[str, Workload], densities=(0.01, 0.001)) -> list[dict]:
    out = []
    for model, wl in wls.items():
        for d in densities:
            for place, (R, hier) in PLACEMENTS.items():
                for N in RANKS:
                    times = {ex: predict(p, ex, N, wl, None if ex in ("dense", "fp16") else d,
                                            ranks_per_host=R, hierarchical=hier) for ex in EXCHANGES}
                    out.append({"model": model, "density": d, "placement": place, "ranks": N,
                                "ms": {ex: 1e3 * t for ex, t in times.items()},
                                "fastest": min(times, key=times.get)})
    return out


def crossovers(rows: list[dict]) -> list[str]:
    """Where global top-k overtakes the allgather, per model, density and placement."""
    lines = []
    for (model, d, place) in dict.fromkeys((r["model"], r["density"], r["placement"]) for r in rows):
        cell = [r for r in rows if (r["model"], r["density"], r["placement"]) == (model, d, place)]
        wins = [r["ranks"] for r in cell if r["ms"]["global"] < r["ms"]["allgather"]]
        fastest = ", ".join(f"{r['ranks']}: {r['fastest']}" for r in cell)
        first = (f"global top-k beats the allgather from N = {wins[0]}" if wins
                 else "the allgather beats global top-k at every N up to 256")
        lines.append(f"- {model}, d={d:g}, {place}: {first}; fastest exchange by N: {fastest}")
    return lines


def hier_vs_flat(rows: list[dict]) -> list[str]:
    """With 8 ranks per host: from which N the hierarchical exchange beats the flat one."""
    lines = []
    for (model, d) in dict.fromkeys((r["model"], r["density"]) for r in rows):
        parts = []
        for ex in ("allgather", "global"):
            flat = {r["ranks"]: r["ms"][ex] for r in rows
                    if (r["model"], r["density"], r["placement"]) == (model, d, "8/host flat")}
            hier = {r["ranks"]: r["ms"][ex] for r in rows
                    if (r["model"], r["density"], r["placement"]) == (model, d, "8/host hier")}
            wins = [n for n in flat if hier[n] < flat[n]]
            parts.append(f"{LABEL[ex]}: " + (f"hierarchical wins from N = {wins[0]} ("
                                             f"{hier[wins[0]]:.0f} against {flat[wins[0]]:.0f} ms)"
                                             if wins else "flat wins at every N"))
        lines.append(f"- {model}, d={d:g}, 8 ranks per host: " + "; ".join(parts))
    return lines


def plot(p: Params, wls: dict[str, Workload], pts: list[dict], path: Path, cores: int,
         link: str, low_alpha: float = 1e-4) -> None:
    """One row per model; columns: d = 0.01 and 0.001 with the fitted parameters (and the measured
    points, with the model as it applies to the test machine through them), then the same with a
    cluster's latency assumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [(d, q, name) for q, name in ((p, f"fitted alpha {p.alpha * 1e3:.2f} ms"),
                                             (replace(p, alpha=low_alpha),
                                              f"alpha {low_alpha * 1e3:g} ms assumed"))
                for d in (0.01, 0.001)]
    fig, axes = plt.subplots(len(wls), len(variants), squeeze=False,
                             figsize=(5.0 * len(variants), 4.3 * len(wls) + 1.4))
    colours = {ex: f"C{i}" for i, ex in enumerate(EXCHANGES)}
    styles = {"1/host": "-", "8/host flat": "--", "8/host hier": ":"}
    xs = list(range(8, 257, 8))
    for i, (model, wl) in enumerate(wls.items()):
        for j, (d, q, name) in enumerate(variants):
            ax = axes[i][j]
            for ex in EXCHANGES:
                dens = None if ex in ("dense", "fp16") else d
                for place, (R, hier) in PLACEMENTS.items():
                    ys = [1e3 * predict(q, ex, N, wl, dens, ranks_per_host=R, hierarchical=hier)
                          for N in xs]
                    ax.plot(xs, ys, styles[place], color=colours[ex], lw=1.4,
                            label=f"{LABEL[ex]}, {place}" if i == j == 0 else None)
                meas = sorted((m["ranks"], 1e3 * m["seconds"]) for m in pts
                              if m["model"] == model and m["exchange"] == ex and m["density"] == dens)
                if meas and q is p:
                    # the test machine: all ranks on its cores, the model through the measured points
                    small = list(range(2, max(n for n, _ in meas) + 1))
                    ys = [1e3 * predict(q, ex, N, wl, dens, ranks_per_core=ranks_per_core(N, cores))
                          for N in small]
                    ax.plot(small, ys, "-", color=colours[ex], lw=0.7, alpha=0.6)
                    ax.plot(*zip(*meas), "o", color=colours[ex], ms=5, mec="black", mew=0.5,
                            label=f"measured: {LABEL[ex]} (test hosts)" if i == j == 0 else None)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("ranks N")
            ax.set_ylabel("exchange ms per step")
            ax.set_title(f"{model}, d = {d:g} ({wl.k(d):,} pairs/rank), {name}", fontsize=8)
            ax.grid(True, which="both", alpha=0.2)
    fig.legend(loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"Exchange time per step, model (lines: solid 1 rank/host, dashed 8 ranks/host flat, "
                 f"dotted 8 ranks/host hierarchical; every rank on its own core) and measured test "
                 f"hosts (dots: link {link}, all ranks on {cores} shared cores; thin lines: the model "
                 f"with that sharing)\n1/beta = "
                 f"{1 / p.beta / 1e6 if p.beta else float('inf'):.0f} MB/s; inside a host "
                 f"{p.intra.alpha * 1e6:.0f} us, {1 / p.intra.beta / 1e9:.0f} GB/s assumed",
                 fontsize=8)
    fig.tight_layout(rect=(0, 1.3 / (4.3 * len(wls) + 1.4), 1, 1))
    fig.savefig(path, dpi=85)
    plt.close(fig)


def markdown(p: Params, quality: dict, pts: list[dict], rows: list[dict], wls: dict[str, Workload],
             meta: dict, source: str, png: str, low_alpha: float = 1e-4, two: list | None = None) -> str:
    def tab(header, body):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in body])

    wls_all = {**wls, **{q["model"]: model_workload(q["model"]) for q in two or []}}
    fit_rows = [[q["model"], q["exchange"] + ("" if q["density"] is None else f" d={q['density']:g}"),
                 str(q["ranks"]), f"{1e3 * q['seconds']:.0f}", f"{1e3 * q['model_s']:.0f}",
                 f"{q['model_s'] / q['seconds']:.2f}"] for q in pts]
    pred_rows = [[r["model"], f"{r['density']:g}", r["placement"], str(r["ranks"])]
                 + [f"{r['ms'][ex]:.0f}" for ex in EXCHANGES] + [r["fastest"]] for r in rows]
    work = [[key, f"{1e9 * a:.2f}", f"{1e6 * b:.0f}"]
            + [f"{1e3 * p.w(key.split('@')[0], wl, float(key.split('@')[1]) if '@' in key else None):.0f}"
               for wl in wls.values()] for key, (a, b) in sorted(p.work.items())]
    return "\n".join([
        "# A model of the exchange time, fitted to the test hosts",
        "",
        f"Made by `python benchmarks/exchange_model.py --results {source}` from the exchange-only "
        f"points of [{Path(source).name}]({Path(source).with_suffix('.md').name}) ({meta.get('date', '')}; "
        f"machine: {meta.get('machine', '')}).",
        "",
        "T = alpha·L + beta·B + s·(W + gamma·P) per step and rank (`benchmarks/exchange_model.py` "
        "says what each count is for each exchange). L: latencies in sequence between hosts; B: "
        "bytes over the busiest host link; W: the exchange's own CPU work per rank, a·(entries) + "
        "b·(tensors) with a and b per exchange and density; P: pairs scatter-added; s: ranks per "
        "core (the test "
        f"machine: N/{meta.get('cpus', 2)} once N exceeds its cores; a cluster: 1). Fitted by "
        "non-negative least squares on relative error over every measured point:",
        "",
        f"- alpha = {p.alpha * 1e3:.3f} ms per message"
        + (" with a core of its own; on the test machine times the ranks per core (a message waits "
           "for its receiver to be scheduled). That fit's relative RMS error: "
           f"{quality['relative_rms_shared_latency']:.2f}, against "
           f"{quality['relative_rms_fixed_latency']:.2f} with one latency for every N"
           if p.shared_latency else
           " (Horovod's negotiation and Gloo's TCP on the test hosts, whose ranks share cores; a "
           "latency that grows with the ranks per core fitted worse: relative RMS error "
           f"{quality['relative_rms_shared_latency']:.2f} against "
           f"{quality['relative_rms_fixed_latency']:.2f})"),
        f"- beta = {p.beta * 1e9:.2f} ns per byte ({1 / p.beta / 1e6 if p.beta else float('inf'):.0f} MB/s; "
        + ("fitted; the link is 1 Gbit/s = 125 MB/s)" if quality.get("beta") == "fitted" else
           f"not fitted: {quality.get('beta', 'given')}; `--fit-beta` fits it too)"),
        f"- gamma = {p.gamma * 1e9:.2f} ns per pair scatter-added",
        f"- relative RMS error over the {len(pts)} points: {quality['relative_rms']:.2f} (worst "
        f"{quality['worst']:+.2f})",
        f"- assumed inside a host (hierarchical placements only): {p.intra.alpha * 1e6:.0f} us per "
        f"message, {1 / p.intra.beta / 1e9:.0f} GB/s",
        "",
        "W = a·(entries of the model) + b·(its tensors), per step on one rank with a core of its own:",
        "",
        tab(["exchange", "a, ns per entry", "b, us per tensor"] + [f"W {m}, ms" for m in wls], work),
        "",
        "Measured against fitted (test hosts, s = N/cores):",
        "",
        tab(["model", "exchange", "N", "measured ms", "model ms", "model / measured"], fit_rows),
        "",
        f"![model and measured points]({png})",
        "",
        *(["Not fitted: the points with 2 ranks per host (their 2 ranks talk over the host's "
           "loopback, on the same shared cores), against the model with the assumed intra-host link:",
           "", tab(["model", "exchange", "N", "placement", "measured ms", "model ms"],
                   [[q["model"], q["exchange"] + ("" if q["density"] is None else f" d={q['density']:g}"),
                     str(q["ranks"]),
                     "2/host hier" if q["hierarchical"] else "2/host flat", f"{1e3 * q['seconds']:.0f}",
                     f"{1e3 * predict(p, q['exchange'], q['ranks'], wls_all[q['model']], q['density'], ranks_per_host=2, hierarchical=q['hierarchical'], ranks_per_core=ranks_per_core(q['ranks'], q['cores'])):.0f}"]
                    for q in two]), ""] if two else []),
        "## Predicted, N = 8 to 256 (every rank its own core)",
        "",
        "Placements: *1/host* one rank per host; *8/host flat* 8 ranks per host, every collective "
        "over all N ranks (for dense, fp16 and the allgather the same curve as 1/host: a ring "
        "crosses each host link once each way); *8/host hier* 8 ranks per host as "
        "`RangerCompressor(hierarchical=True)` does it: a dense sum of each compressed gradient "
        "inside the host, the sparse exchange among the N/8 host leaders, the exchanged pairs "
        "handed to the host's other ranks (dense and fp16: Horovod's hierarchical allreduce). The "
        "intra-host link is assumed, not measured; the measured hierarchical points (2 ranks per "
        "host) are in the scaling results, compared below with this model at 2 ranks per host.",
        "",
        *crossovers(rows),
        *hier_vs_flat(rows),
        "",
        f"The fitted alpha is the test hosts' own (ranks sharing cores, Horovod's negotiation); with "
        f"alpha = {low_alpha * 1e3:g} ms instead (an assumption for hosts with cores of their own), "
        "everything else as fitted:",
        "",
        *crossovers(table(replace(p, alpha=low_alpha), wls)),
        *hier_vs_flat(table(replace(p, alpha=low_alpha), wls)),
        "",
        "Predicted times with the fitted parameters (ms):",
        "",
        tab(["model", "d", "placement", "N"] + [f"{ex} ms" for ex in EXCHANGES] + ["fastest"], pred_rows),
        "",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", type=Path, default=REPO / "docs/results/network-scaling.json")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results")
    ap.add_argument("--models", nargs="+", default=["lstm-lm", "resnet50"],
                    help="models predicted for N = 8..256 (default lstm-lm resnet50)")
    ap.add_argument("--intra-gbps", type=float, default=80.0, help="assumed link inside a host, Gbit/s "
                    "(default 80, 10 GB/s)")
    ap.add_argument("--intra-latency-us", type=float, default=5.0, help="assumed latency inside a host")
    ap.add_argument("--fit-beta", action="store_true", help="fit the time per byte too (default: the "
                    "link's nominal rate, 1 Gbit/s for --link-gbps 1)")
    ap.add_argument("--link-gbps", type=float, default=1.0, help="the test hosts' link rate (default 1)")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    pts = points(results)
    if not pts:
        print(f"no exchange-only points in {args.results}", file=sys.stderr)
        return 1
    wls = {m: model_workload(m) for m in sorted({q["model"] for q in pts} | set(args.models))}
    p, quality = fit(pts, wls, None if args.fit_beta else 8 / (args.link_gbps * 1e9))
    quality["beta"] = "fitted" if args.fit_beta else f"the link's nominal {args.link_gbps:g} Gbit/s"
    p.intra = Link(args.intra_latency_us * 1e-6, 8 / (args.intra_gbps * 1e9))
    rows = table(p, {m: wls[m] for m in args.models})
    args.out.mkdir(parents=True, exist_ok=True)
    link = ", ".join(sorted({q["link"] for q in pts}))
    plot(p, {m: wls[m] for m in args.models}, pts, args.out / "exchange-model.png",
         results["meta"].get("cpus", 2), link)
    try:
        source = str(args.results.resolve().relative_to(REPO))
    except ValueError:
        source = str(args.results)
    (args.out / "exchange-model.md").write_text(
        markdown(p, quality, pts, rows, {m: wls[m] for m in args.models}, results["meta"], source,
                 "exchange-model.png", two=points(results, 2)))
    (args.out / "exchange-model.json").write_text(json.dumps({
        "source": source, "params": {"alpha_s": p.alpha, "beta_s_per_byte": p.beta,
                                     "gamma_s_per_pair": p.gamma,
                                     "work_s_per_entry_and_tensor": p.work,
                                     "latency_grows_with_ranks_per_core": p.shared_latency,
                                     "intra": asdict(p.intra)},
        "fit": quality, "points": pts, "predicted": rows,
        "workloads": {m: {"entries": w.entries, "compressed_tensors": len(w.sizes), "buckets": w.buckets(),
                          "k": {str(d): w.k(d) for d in (0.01, 0.001)}} for m, w in wls.items()}},
        indent=1))
    print("\n".join(crossovers(rows) + hier_vs_flat(rows)))
    print(f"alpha {p.alpha * 1e3:.3f} ms, beta {p.beta * 1e9:.2f} ns/B, gamma {p.gamma * 1e9:.2f} ns/pair, "
          f"rel. RMS {quality['relative_rms']:.2f}; {args.out / 'exchange-model.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
