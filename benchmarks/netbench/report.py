"""Figures from the ranks' raw timings; the results file, the plot and the printed table.

Step time of one step = the slowest rank's time for it (steps are synchronous, and compute-only is
limited by the slowest rank as well); a mode's figure is the median over the timed steps, with the
10th and 90th percentiles as its spread. Exchange overhead = median step - median compute-only step.
Every ratio compares figures of the same launch (same hosts, link and model, steps interleaved).
"""

from __future__ import annotations

import statistics

from .models import SPECS

MODE_LABELS = {"compute": "compute only", "dense": "dense fp32", "fp16": "Horovod fp16",
               "floor": "hook floor", "ddp": "DDP fp32"}


def mode_label(mode: str) -> str:
    if mode.startswith("ranger-"):
        return f"ranger d={mode.split('-', 1)[1]}"
    if mode.startswith("hook-"):
        return f"ranger hook d={mode.split('-', 1)[1]}"
    if mode.startswith("pertensor-"):
        return f"ranger hook per tensor d={mode.split('-', 1)[1]} (before)"
    if mode.startswith("ddp-"):
        return f"DDP + ranger_hook d={mode.split('-', 1)[1]}"
    if mode.startswith("ddpglobal-"):
        return f"DDP + ranger_hook global top-k d={mode.split('-', 1)[1]}"
    if mode.startswith("global-"):
        return f"ranger global top-k d={mode.split('-', 1)[1]}"
    if mode.startswith("hier-"):
        return f"ranger hierarchical d={mode.split('-', 1)[1]}"
    if mode.startswith("hierglobal-"):
        return f"ranger hierarchical global top-k d={mode.split('-', 1)[1]}"
    return MODE_LABELS.get(mode, mode)


# What each PyTorch ranger mode does per step, for the plot's legend (the tables keep mode_label)
TORCH_EXCHANGES = {
    "ranger-": "ranger_hvd.torch.DistributedOptimizer: per bucket one allgather + one grouped allreduce",
    "hook-": "hvd.DistributedOptimizer: per bucket one allgather, per tensor one token allreduce",
    "pertensor-": "hvd.DistributedOptimizer with bucket_mb=0: per tensor one allgather + one token allreduce",
}


def plot_label(mode: str, torch_only: bool) -> str:
    """``mode_label``, and on PyTorch models what the ranger mode's exchange does per step."""
    label = mode_label(mode)
    for prefix, what in TORCH_EXCHANGES.items():
        if torch_only and mode.startswith(prefix):
            return f"{label}\n  ({what})"
    return label


def _percentile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _slowest_rank_ms(ranks: list[dict], mode: str) -> list[float]:
    """Each timed step's time in ms: the slowest rank's."""
    return [max(r[mode]["times_s"][i] for r in ranks) * 1e3 for i in range(len(ranks[0][mode]["times_s"]))]


def cell(run: dict) -> tuple:
    """What one launch measured: (kind, hosts, ranks per host, link, model); ``--append`` replaces
    a cell of the same key."""
    return (run.get("kind", "step"), run["hosts"], run.get("ranks_per_host", 1), run["link"], run["model"])


def summarize(raw: dict) -> dict:
    """One launch's raw worker output -> {mode: figures in ms and bytes}, with ratios."""
    ranks = raw["ranks"]
    out = {}
    for mode in ranks[0]:
        s = sorted(_slowest_rank_ms(ranks, mode))
        fig = {"median_ms": statistics.median(s), "p10_ms": _percentile(s, 0.1), "p90_ms": _percentile(s, 0.9),
               "steps": len(s), "bytes_per_step": ranks[0][mode]["bytes_per_step"]}
        if "bytes_received_per_step" in ranks[0][mode]:
            received = [r[mode]["bytes_received_per_step"] for r in ranks]
            fig["bytes_received_max"] = max(received)     # the busiest rank's
            fig["bytes_received_min"] = min(received)
            fig["bytes_received_counted"] = ranks[0][mode]["bytes_received_counted"]
        if "profile" in ranks[0][mode]:
            fig["profile"] = ranks[0][mode]["profile"]
        if "cpu_s" in ranks[0][mode]:   # the busier rank's CPU time of each step, all its threads
            cpu = [max(r[mode]["cpu_s"][i] for r in ranks) * 1e3 for i in range(len(s))]
            fig["cpu_ms"] = statistics.median(cpu)
        out[mode] = fig
    compute = out["compute"]["median_ms"] if "compute" in out else None   # none in exchange only
    dense_bytes = out.get("dense", {}).get("bytes_per_step")
    for mode, fig in out.items():
        if compute is not None:
            fig["overhead_ms"] = fig["median_ms"] - compute
            fig["x_compute"] = fig["median_ms"] / compute
        for base in ("dense", "fp16"):
            if base in out and mode != "compute":
                fig[f"x_{base}"] = fig["median_ms"] / out[base]["median_ms"]
        if dense_bytes and fig["bytes_per_step"]:
            fig["bytes_reduction"] = dense_bytes / fig["bytes_per_step"]
    return out


def _fmt_bytes(b: float) -> str:
    return "0" if not b else (f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB")


def _ratio(fig: dict, key: str) -> str:
    return f"{fig[key]:.2f}x" if key in fig else ""


HEADER = ["hosts", "link", "model", "mode", "step ms (median)", "p10-p90 ms", "compute ms", "exchange ms",
          "step / compute", "step / dense", "step / fp16", "bytes/rank/step", "dense bytes / bytes"]


def _steps(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("kind", "step") == "step"]


def rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for run in _steps(runs):
        if run.get("error"):
            out.append([_where(run), run["link"], run["model"], "FAILED", run["error"][:60]]
                       + [""] * (len(HEADER) - 5))
            continue
        compute = run["figures"]["compute"]["median_ms"]
        for mode, fig in run["figures"].items():
            label = mode_label(mode)
            out.append([_where(run), run["link"], run["model"], label,
                        f"{fig['median_ms']:.0f}", f"{fig['p10_ms']:.0f}-{fig['p90_ms']:.0f}", f"{compute:.0f}",
                        "" if mode == "compute" else f"{fig['overhead_ms']:.0f}",
                        _ratio(fig, "x_compute") if mode != "compute" else "",
                        _ratio(fig, "x_dense"), _ratio(fig, "x_fp16"), _fmt_bytes(fig["bytes_per_step"]),
                        "" if mode == "compute" else (f"{fig['bytes_reduction']:.1f}x" if "bytes_reduction" in fig else "")])
    return out


def profile_rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for run in _steps(runs):
        for mode, fig in (run.get("figures") or {}).items():
            p = fig.get("profile")
            if not p:
                continue
            out.append([_where(run), run["link"], run["model"], mode_label(mode),
                        f"{p['allgathers_per_step']:.0f}", f"{p['dense_allreduces_per_step']:.0f}",
                        f"{p['elements_selected_per_step']:.0f}",
                        f"{p['compress_ms_per_step']:.1f}" if "compress_ms_per_step" in p else "n/a (traced)",
                        f"{p['decompress_ms_per_step']:.1f}" if "decompress_ms_per_step" in p else "n/a (traced)",
                        f"{fig['overhead_ms']:.0f}"])
    return out


PROFILE_HEADER = ["hosts", "link", "model", "mode", "compressed tensors/step", "dense tensors/step",
                  "elements sent/step", "compress ms/step", "decompress ms/step", "exchange ms"]


CPU_HEADER = ["hosts", "link", "model", "mode", "CPU ms/step (median)", "CPU over compute only, ms",
              "step ms (median)"]


def cpu_rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for run in _steps(runs):
        f = run.get("figures") or {}
        if "cpu_ms" not in f.get("compute", {}):
            continue
        for mode, fig in f.items():
            out.append([str(run["hosts"]), run["link"], run["model"], mode_label(mode),
                        f"{fig['cpu_ms']:.0f}",
                        "" if mode == "compute" else f"{fig['cpu_ms'] - f['compute']['cpu_ms']:.0f}",
                        f"{fig['median_ms']:.0f}"])
    return out


TARGET_MODELS = ("resnet50", "lstm-lm", "keras-resnet50")  # the benchmark models the targets name
LARGE_TENSOR_MODEL = "lstm-lm"


def targets(runs: list[dict]) -> list[str]:
    """The issue's targets, each met or missed with its figures (only where the run measured them)."""
    lines = []
    for run in _steps(runs):
        f = run.get("figures")
        if not f or run["hosts"] != 2 or run["model"] not in TARGET_MODELS:
            continue
        where = f"{run['model']}, {run['hosts']} hosts, {run['link']}"
        if run["link"] == "1gbit" and {"ranger-0.001", "fp16"} <= f.keys():
            r, fp16, comp = f["ranger-0.001"]["median_ms"], f["fp16"]["median_ms"], f["compute"]["median_ms"]
            line = (f"- {'met' if r <= fp16 / 3 else 'MISSED'}: {where}: ranger d=0.001 {r:.0f} ms "
                    f"<= fp16/3 ({fp16 / 3:.0f} ms)")
            if comp > fp16 / 3:
                # no exchange can make a step shorter than its compute: say so, and compare exchanges
                line += (f"; fp16/3 is below compute alone ({comp:.0f} ms), so no exchange can meet "
                         f"it here: ranger's exchange is {r - comp:.0f} ms against fp16's "
                         f"{fp16 - comp:.0f} ms ({(r - comp) / (fp16 - comp):.2f}x)")
            lines.append(line)
            lines.append(f"- {'met' if r <= 1.5 * comp else 'MISSED'}: {where}: ranger d=0.001 "
                         f"{r:.0f} ms <= 1.5x compute ({1.5 * comp:.0f} ms)")
        if run["link"] in ("10gbit", "none") and {"ranger-0.01", "dense", "fp16"} <= f.keys():
            r, best = f["ranger-0.01"]["median_ms"], min(f["dense"]["median_ms"], f["fp16"]["median_ms"])
            line = (f"- {'met' if r <= best else 'MISSED'}: {where}: ranger d=0.01 {r:.0f} ms <= "
                    f"min(dense, fp16) {best:.0f} ms")
            if "floor" in f:
                # what any compressor through Horovod's hook pays before it selects or sends anything
                floor, comp = f["floor"]["median_ms"], f["compute"]["median_ms"]
                line += (f"; the hook floor is {floor:.0f} ms ({floor - comp:.0f} ms over compute, what "
                         f"Horovod's per-tensor hook costs): ranger's exchange is {r - comp:.0f} ms, "
                         f"{r - floor:.0f} ms above the floor, against dense's "
                         f"{f['dense']['median_ms'] - floor:.0f} ms above it")
            lines.append(line)
        if "ranger-0.001" in f and "dense" in f and run["model"] == LARGE_TENSOR_MODEL:
            red = f["ranger-0.001"].get("bytes_reduction", 0)
            lines.append(f"- {'met' if red >= 250 else 'MISSED'}: {where}: bytes at d=0.001 are 1/{red:.0f} "
                         f"of dense fp32 (target 1/250 or less)")
    return lines


def markdown(runs: list[dict], meta: dict, plot_name: str) -> str:
    def table(header, body):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in body])

    models = "\n".join(f"- `{name}`: {desc}" for name, desc in meta["models"].items())
    steps, exchanges = _steps(runs), [r for r in runs if r.get("kind") == "exchange"]
    per_host = sorted({r.get("ranks_per_host", 1) for r in runs})
    parts = [
        "# Network benchmark: " + ("exchange and step time" if exchanges and steps else
                                   "exchange time" if exchanges else "step time") + " across test hosts",
        "",
        f"Run on {meta['date']} by `{meta['command']}` in {meta['wall_s']:.0f} s.",
        f"Machine: {meta['machine']}." + (f" Code: {meta['code']}." if meta.get("code") else ""),
        *[f"Cells from an earlier run kept (`--append`): {e['date']}, `{e['command']}`, {e['steps']} timed "
          f"steps after {e['warmup']} warm-up; ranks {'pinned' if e.get('pinned') else 'not pinned'}; "
          f"machine: {e['machine']}." for e in meta.get("earlier", [])],
        "",
        "Each host is a network namespace on one machine (its own address and sshd); every link is the "
        "host's veth into a bridge, limited with `tc qdisc ... tbf rate RATE burst 1mb latency 50ms` on "
        "each host's side (`none`: no limit). Real `horovodrun --gloo` starts "
        + (" or ".join(map(str, per_host)) + " rank(s) per host (ranks of one host talk over its loopback, "
           "not the limited link)" if per_host != [1] else "one rank per host")
        + " over ssh, one thread per rank"
        + (", SGD on one fixed synthetic batch per rank" if steps else "") + ". All ranks share this "
        f"machine's {meta['cpus']} CPU cores, so compute-only time grows with the number of hosts. "
        + ("Each rank and its threads are pinned to one core (rank r on core r mod cores), as a host has "
           "its own CPU; `--no-pin` leaves the placement to the scheduler."
           if meta.get("pinned") else "The scheduler placed the ranks (`--no-pin`): they may share a core "
           "or move between cores, which hosts would not."),
        "",
        *([f"Cells measured in two launches (`--append` with other modes): "
           + "; ".join(sorted({f"{_where(r)} hosts, {r['model']} ({r.get('kind', 'step')}): "
                               f"{r['merged_from']['date']} and {r['date']}" for r in runs if "merged_from" in r}))
           + ". Hierarchical modes run in a launch of their own: the process sets they register "
           "take part in every cycle of Horovod's loop and would slow the flat modes beside them; "
           "ratios between modes of different launches compare launches, not interleaved steps.", ""]
          if any("merged_from" in r for r in runs) else []),
        *(_step_part(runs, meta, plot_name, models, table) if steps else []),
        *(exchange_part(exchanges, meta, plot_name, table, with_plot=not steps, models=models)
          if exchanges else []),
        *(["## Targets of issue 10 (2 hosts; benchmark models only)", "",
           *(targets(runs) or ["- none measured in this run"]), ""] if any(
               r["hosts"] == 2 for r in steps) else []),
        *(["## Targets of issue 33 (item 3)", "", *(scaling_targets(runs) or ["- none measured in this run"]),
           ""] if exchanges else []),
    ]
    return "\n".join(parts)


def _step_part(runs, meta, plot_name, models, table) -> list[str]:
    return [
        "Modes: *dense fp32* is `hvd.DistributedOptimizer` (TF: `hvd.DistributedGradientTape`); "
        "*Horovod fp16* adds `compression=hvd.Compression.fp16`; *ranger d=D* is ranger_hvd's own "
        "entry point (per-rank top-k with error feedback, sent through an allgather): on PyTorch "
        "`ranger_hvd.torch.DistributedOptimizer` with `compression=RangerCompressor(density=D)`, which "
        "hands Horovod groups cut like the compressor's buckets (one allgather and one grouped "
        "allreduce per bucket of up to 25 MB of gradient), on TF "
        "`ranger_hvd.tensorflow.DistributedGradientTape`, which batches each step's tensors into one "
        "grouped allgather and one grouped allreduce. *ranger hook d=D* passes "
        "`compression=RangerCompressor(density=D)` to Horovod's own optimizer or tape (PyTorch: one "
        "allgather per bucket, one token allreduce per tensor; TF: one allgather and one token per "
        "tensor). *ranger hook per tensor d=D (before)* (PyTorch) is the same with `bucket_mb=0`: "
        "one allgather and one token per tensor, the exchange before buckets. *hook floor* passes a compressor that does "
        "nothing: each gradient's first entry goes to Horovod's allreduce and a zero gradient comes "
        "back, so its exchange time is what Horovod's per-parameter hook costs by "
        "itself, a floor for every `compression=` plug-in (`netbench/worker.py`, `TokensOnly`). "
        "*compute only* is the same model, batch and optimizer with no exchange, run in the same "
        "launch.",
        "",
        f"Models ({meta['steps']} timed steps after {meta['warmup']} warm-up steps per mode):",
        models,
        "",
        "Step time of a step is the slowest rank's; figures are medians over the timed steps, spread "
        "10th-90th percentile. *exchange* = step - compute. Ratios compare figures of one launch. "
        "Bytes are what one rank hands to collectives per step (ranger: the compressor's `stats()`; "
        "dense and fp16: numel x itemsize).",
        "",
        "Within a launch every mode has its own model and optimizer; after each one's warm-up the "
        "timed steps are interleaved, one step of every mode per round in an order that rotates, "
        "so a change of load during the launch reaches every mode alike. Compute only has no "
        "collective to wait at; its figure, the slower rank's time of each step, sits a little "
        "above either rank's own median and is the step no synchronous exchange could beat.",
        "",
        table(HEADER, rows(runs)),
        "",
        f"![step times]({plot_name})",
        "",
        "## Where ranger's exchange time goes",
        "",
        "Per step on rank 0: compressed and dense tensors (one allgather and one allreduce each "
        "through Horovod's hook; ranger_hvd's TF tape groups them into one of each), entries sent, "
        "and (PyTorch) the time spent inside "
        "`compress` (error feedback, selection, starting the allgather) and `decompress` (waiting for "
        "the allgather, scatter-add). TF runs the compressor inside a traced function, so its time is "
        "not separable there.",
        "",
        table(PROFILE_HEADER, profile_rows(runs)),
        "",
        *(["## CPU time per step", "",
           "What each step cost the busier rank in CPU time, all its threads together (the "
           "framework's, Horovod's background thread, Gloo's; `time.process_time`), median over the "
           "timed steps. Other work on the machine lengthens step times but hardly the CPU a step "
           "itself uses, so this column shows what an exchange costs where the wall-clock figures "
           "are noisy. Waiting counts where it spins: Horovod's `synchronize` polls its handles in a "
           "loop that yields the core.", "",
           table(CPU_HEADER, cpu_rows(runs)), ""] if cpu_rows(runs) else []),
    ]


def plot(runs: list[dict], path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = sorted({r["hosts"] for r in runs})
    links = list(dict.fromkeys(r["link"] for r in runs))
    # one colour per mode in every panel, whichever modes a panel has
    colours = {m: f"C{i % 10}" for i, m in
               enumerate(dict.fromkeys(m for r in runs for m in (r.get("figures") or {})))}
    # long legends (what each PyTorch ranger mode does) go under their panel
    notes = any("\n" in plot_label(m, True) for m in colours)
    lines = len(colours) * (2 if notes else 0)
    fig, axes = plt.subplots(len(hosts), len(links), squeeze=False,
                             figsize=(max(7.0, (7.5 if notes else 5.5) * len(links)),
                                      (4.4 + 0.16 * lines) * len(hosts)))
    for i, h in enumerate(hosts):
        for j, link in enumerate(links):
            ax = axes[i][j]
            cell = [r for r in runs if r["hosts"] == h and r["link"] == link and r.get("figures")]
            if not cell:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{h} hosts, link {link}: not measured", ha="center", transform=ax.transAxes)
                continue
            models = [r["model"] for r in cell]
            torch_only = all(r["model"] in SPECS and SPECS[r["model"]].framework == "torch"
                             for r in cell)
            modes = list(dict.fromkeys(m for r in cell for m in r["figures"]))
            width = 0.8 / max(1, len(modes))
            for k, mode in enumerate(modes):
                xs, ys, lo, hi = [], [], [], []
                for x, r in enumerate(cell):
                    f = r["figures"].get(mode)
                    if f:
                        xs.append(x + (k - (len(modes) - 1) / 2) * width)
                        ys.append(f["median_ms"])
                        lo.append(f["median_ms"] - f["p10_ms"])
                        hi.append(f["p90_ms"] - f["median_ms"])
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=plot_label(mode, torch_only),
                       color=colours[mode])
            ax.set_xticks(range(len(models)), models)
            ax.set_ylabel("step time, ms (median; bars p10-p90)")
            ax.set_title(f"{h} hosts, link {link if link != 'none' else 'not limited'}")
            if notes:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08))
            else:
                ax.legend(fontsize=7)
    fig.suptitle(f"Step time by exchange mode, one rank per host, Gloo, 1 thread per rank\n"
                 f"{meta['date']}, all hosts on {meta['cpus']} shared CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_table(runs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    console = Console(width=None if sys.stdout.isatty() else 200)
    for title, header, body in (
            ("Step time across test hosts (ms; ratios within one launch)", HEADER, rows(runs)),
            ("Exchange only across test hosts (ms; bytes per step)", EXCHANGE_HEADER,
             exchange_rows([r for r in runs if r.get("kind") == "exchange"]))):
        if not body:
            continue
        t = Table(title=title)
        for h in header:
            t.add_column(h, overflow="fold")
        for r in body:
            t.add_row(*r)
        console.print(t)


# ------------------------------------------------------------------------- exchange only, scaling
def _where(run: dict) -> str:
    rph = run.get("ranks_per_host", 1)
    return str(run["hosts"]) if rph == 1 else f"{run['hosts']}x{rph}"


def _density(mode: str) -> float | None:
    return float(mode.split("-", 1)[1]) if "-" in mode else None


EXCHANGE_HEADER = ["hosts", "ranks", "link", "model", "mode", "exchange ms (median)", "p10-p90 ms",
                   "/ dense", "/ allgather", "sent/rank", "received, busiest rank",
                   "compress ms", "decompress ms", "CPU ms"]


def exchange_rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for run in runs:
        if run.get("error"):
            out.append([_where(run), str(run.get("ranks", run["hosts"])), run["link"], run["model"],
                        "FAILED", run["error"][:60]] + [""] * (len(EXCHANGE_HEADER) - 6))
            continue
        f = run["figures"]
        for mode, fig in f.items():
            p = fig.get("profile", {})
            d = _density(mode)
            allgather = f.get(f"ranger-{d}") if mode.startswith("global-") else None
            out.append([_where(run), str(run.get("ranks", run["hosts"])), run["link"], run["model"],
                        mode_label(mode), f"{fig['median_ms']:.0f}",
                        f"{fig['p10_ms']:.0f}-{fig['p90_ms']:.0f}", _ratio(fig, "x_dense"),
                        f"{fig['median_ms'] / allgather['median_ms']:.2f}x" if allgather else "",
                        _fmt_bytes(fig["bytes_per_step"]), _fmt_bytes(fig.get("bytes_received_max", 0)),
                        f"{p['compress_ms_per_step']:.0f}" if "compress_ms_per_step" in p else "",
                        f"{p['decompress_ms_per_step']:.0f}" if "decompress_ms_per_step" in p else "",
                        f"{fig['cpu_ms']:.0f}" if "cpu_ms" in fig else ""])
    return out


def exchange_part(runs, meta, plot_name, table, with_plot=True, models="") -> list[str]:
    steps = sorted({(r.get("steps", meta["steps"]), r.get("warmup", meta["warmup"])) for r in runs})
    return [
        "## Exchange only",
        "",
        "No model runs: every rank holds parameters of the model's tensor shapes, and before each "
        "step (untimed) fills every `.grad` with fresh synthetic gradients (a window at a random "
        "offset within 4M entries of N(0, 1) numbers drawn once per rank, different on every rank). The timed part is "
        "the exchange as backward drives it: Horovod's per-parameter hook for every parameter in "
        "backward order, then `optimizer.synchronize()` (compress, the collectives, decompress). "
        "A step's time is the slowest rank's; median and 10th-90th percentile over the timed steps "
        f"({', '.join(f'{s} after {w} warm-up' for s, w in steps)} per mode, interleaved as above).",
        "",
        "Modes: *dense fp32* `hvd.DistributedOptimizer`; *Horovod fp16* with "
        "`compression=hvd.Compression.fp16`; *ranger d=D* `ranger_hvd.torch.DistributedOptimizer` with "
        "`RangerCompressor(density=D)` (per-rank top-k, one allgather of (index, value) pairs per "
        "bucket, so every rank receives (N-1)·k·8 bytes); *ranger global top-k d=D* "
        "`hvd.DistributedOptimizer` with `RangerCompressor(density=D, exchange=\"global_topk\")` (an "
        "alltoall of the pairs to the owners of their index ranges, then an allgather of the kept "
        "sums: about 2·k·8 bytes received).",
        "",
        "Tensor shapes (exchange only uses a model's parameter shapes and nothing else):",
        models,
        "",
        "*received, busiest rank*: the most any rank received per step. For ranger modes the "
        "compressor's `stats()[\"bytes_received\"]` (collectives' bytes from other ranks, with the "
        "4-byte tokens and the small tensors that travel dense); for dense and fp16 what a ring "
        "allreduce receives, 2(N-1)/N · numel · itemsize, computed, not counted. *sent/rank* is what "
        "a rank hands to collectives. */ allgather*: global top-k's time over ranger's (allgather) "
        "at the same density. *compress*, *decompress*: time inside the compressor per step "
        "(decompress waits for the collectives). *CPU*: the busiest rank's CPU time per step.",
        "",
        table(EXCHANGE_HEADER, exchange_rows(runs)),
        "",
        *([f"![exchange time and bytes by ranks]({plot_name})", ""] if with_plot else []),
    ]


def _fig(runs, kind, hosts, model, mode, rph=1):
    for r in runs:
        if (r.get("kind", "step"), r["hosts"], r.get("ranks_per_host", 1), r["model"]) == (
                kind, hosts, rph, model) and r.get("figures") and mode in r["figures"]:
            return r["figures"][mode]
    return None


def scaling_targets(runs: list[dict]) -> list[str]:
    """Issue 33 item 3, each met or missed with its figures (where this file measured them)."""
    lines = []
    exch = [r for r in runs if r.get("kind") == "exchange" and r.get("figures")]
    one_m = sorted({r["hosts"] for r in exch if r["model"] == "tensor-1m" and r.get("ranks_per_host", 1) == 1})
    if one_m:
        k = 10_000   # ceil(0.01 * 1e6)
        parts, ok = [], True
        for n in one_m:
            g, a = _fig(exch, "exchange", n, "tensor-1m", "global-0.01"), _fig(exch, "exchange", n, "tensor-1m", "ranger-0.01")
            if g:
                ok &= g["bytes_received_max"] <= 2 * k * 8 * 1.02
                parts.append(f"N={n}: global top-k {g['bytes_received_max']:,.0f} "
                             f"({g['bytes_received_max'] / (k * 8):.2f}·k·8)"
                             + (f", allgather {a['bytes_received_max']:,.0f} "
                                f"({a['bytes_received_max'] / (k * 8):.2f}·k·8; (N-1)·k·8 = {(n - 1) * k * 8:,})"
                                if a else ""))
        lines.append(f"- {'met' if ok else 'MISSED'}: 1M-entry tensor at d=0.01 (k = {k:,}), bytes the "
                     f"busiest rank receives per step at most about 2·k·8 = {2 * k * 8:,} with global "
                     f"top-k, while the allgather grows as (N-1)·k·8: " + "; ".join(parts))
    steps = [r for r in runs if r.get("kind", "step") == "step" and r.get("figures")]
    for n in (4, 8):
        for model in sorted({r["model"] for r in steps if r["hosts"] == n}):
            g, a = _fig(steps, "step", n, model, "global-0.01"), _fig(steps, "step", n, model, "ranger-0.01")
            if g and a:
                lines.append(f"- {'met' if g['median_ms'] < a['median_ms'] else 'MISSED'}: {n} hosts, "
                             f"{model}, whole step at d=0.01: global top-k {g['median_ms']:.0f} ms "
                             f"against the allgather's {a['median_ms']:.0f} ms "
                             f"({g['median_ms'] / a['median_ms']:.2f}x)")
    for n in sorted({r["hosts"] for r in exch}):
        for model in sorted({r["model"] for r in exch if r["hosts"] == n and r["model"] != "tensor-1m"}):
            for d in ("0.01", "0.001"):
                g = _fig(exch, "exchange", n, model, f"global-{d}")
                a = _fig(exch, "exchange", n, model, f"ranger-{d}")
                if g and a:
                    lines.append(f"- (exchange only) {n} hosts, {model}, d={d}: global top-k "
                                 f"{g['median_ms']:.0f} ms, allgather {a['median_ms']:.0f} ms "
                                 f"({g['median_ms'] / a['median_ms']:.2f}x)")
    modes = {m for r in runs for m in (r.get("figures") or {})}
    if not any(m.startswith("hier") for m in modes):
        lines.append("- not measured: hierarchical against flat (no hierarchical exchange in the "
                     "measured code)")
    for r in runs:
        f = r.get("figures") or {}
        if r.get("ranks_per_host", 1) < 2:
            continue
        what = "exchange only" if r.get("kind") == "exchange" else "whole step"
        for flat, hier in (("ranger-0.01", "hier-0.01"), ("global-0.01", "hierglobal-0.01"),
                           ("ranger-0.001", "hier-0.001"), ("global-0.001", "hierglobal-0.001")):
            if flat in f and hier in f:
                h, fl = f[hier]["median_ms"], f[flat]["median_ms"]
                lines.append(f"- {'met' if h < fl else 'MISSED'}: {r['hosts']} hosts x "
                             f"{r['ranks_per_host']} ranks, {r['model']}, {what}: {mode_label(hier)} "
                             f"{h:.0f} ms against flat {fl:.0f} ms ({h / fl:.2f}x)")
    return lines


def plot_scaling(runs: list[dict], path, meta: dict) -> None:
    """Exchange time and bytes received (busiest rank) against the number of ranks, one panel per
    model; whole steps against ranks below, where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exch = [r for r in runs if r.get("kind") == "exchange" and r.get("figures")]
    steps = [r for r in runs if r.get("kind", "step") == "step" and r.get("figures")]
    models = list(dict.fromkeys(r["model"] for r in exch))
    step_models = list(dict.fromkeys(r["model"] for r in steps))
    ncols = max(len(models), len(step_models), 1)
    nrows = 2 + (1 if steps else 0)
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(
        m for r in runs for m in (r.get("figures") or {})))}
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(5.2 * ncols, 4.2 * nrows))

    def curves(ax, cell, model, key, kind):
        for mode in colours:
            for rph, style in ((1, "-o"), (2, "--s")):
                pts = sorted((r.get("ranks", r["hosts"]), r["figures"][mode][key]) for r in cell
                             if r["model"] == model and r.get("ranks_per_host", 1) == rph
                             and mode in r["figures"] and key in r["figures"][mode])
                if pts:
                    ax.plot(*zip(*pts), style, color=colours[mode], ms=4,
                            label=mode_label(mode) + ("" if rph == 1 else f", {rph} ranks/host"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ranks = sorted({r.get("ranks", r["hosts"]) for r in cell if r["model"] == model})
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.minorticks_off()
        ax.set_xlim(ranks[0] / 1.3, ranks[-1] * 1.3)
        ax.set_xlabel("ranks N (hosts x ranks per host)")
        ax.legend(fontsize=6)

    for j in range(ncols):
        for i in range(nrows):
            axes[i][j].set_axis_off()
    for j, model in enumerate(models):
        for i, (key, what) in enumerate((("median_ms", "exchange ms (median, slowest rank)"),
                                         ("bytes_received_max", "bytes received / step (busiest rank)"))):
            ax = axes[i][j]
            ax.set_axis_on()
            curves(ax, exch, model, key, "exchange")
            ax.set_ylabel(what)
            ax.set_title(f"{model}: exchange only", fontsize=9)
    for j, model in enumerate(step_models):
        ax = axes[nrows - 1][j]
        ax.set_axis_on()
        curves(ax, steps, model, "median_ms", "step")
        ax.set_ylabel("step ms (median, slowest rank)")
        ax.set_title(f"{model}: whole steps", fontsize=9)
    links = ", ".join(sorted({r["link"] for r in runs}))
    fig.suptitle(f"Across test hosts (link {links}), Gloo, 1 thread per rank; all ranks on "
                 f"{meta['cpus']} shared CPU cores\n{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
