"""Two revisions of ranger_hvd side by side on the network benchmark: did a change make steps faster?

One launch of ``bench_network.py`` moves by tens of ms from run to run, more than many changes are
worth, so a before/after claim needs both revisions measured on one machine in one sitting, in
turns. This script checks each revision out into a temporary git worktree, runs that revision's own
``benchmarks/bench_network.py`` (its code on the ranks: ``PYTHONPATH`` is the worktree) with the
same arguments, alternating the order every round (A B, B A, A B, ...) so a drift of the machine's
load reaches both alike, and writes a table of every round's medians and a plot:

    python benchmarks/bench_revisions.py 6424373 HEAD --rounds 2 -- \\
        --hosts 2 --links none 10gbit --models keras-resnet50 --modes dense ranger-0.01 ranger-0.001 \\
        --steps 10 --warmup 2

writes ``docs/results/revisions/revisions.{md,json,png}`` (``--out`` to change) and keeps each
launch's own results under ``<out>/<label>-<round>/``. ``--summarize`` rebuilds the table and plot
from those without running anything. Needs root, as ``bench_network.py`` does; both revisions must
have ``benchmarks/bench_network.py`` accepting the arguments after ``--``.

Exit status: 0 when every launch produced figures, 1 when one failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS  # noqa: E402
from machine import cpu_and_load  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("before", help="git revision A (the baseline)")
    p.add_argument("after", help="git revision B (the change)")
    p.add_argument("--rounds", type=int, default=2, help="launches of each revision (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS / "revisions", help="results directory "
                   "(default docs/results/revisions)")
    p.add_argument("--summarize", action="store_true", help="only rebuild the table and plot from "
                   "the launches already in --out")
    p.epilog += "\nArguments after -- go to bench_network.py (all but --out, --append, --quick)."
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1:]  # after --: bench_network.py's arguments
    errors = []
    if args.rounds < 1:
        errors.append(f"--rounds {args.rounds}: give 1 or more")
    errors += [f"{flag}: this script sets it" for flag in ("--out", "--append", "--quick")
               if flag in args.bench_args]
    for label in ("before", "after"):
        rev = getattr(args, label)
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", rev + "^{commit}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            errors.append(f"{label} {rev!r}: not a commit of {REPO}")
        else:
            setattr(args, label + "_sha", found.stdout.strip())
    if errors:
        p.error("; ".join(errors))
    return args


def order_of_round(round_no: int) -> list[str]:
    """A B in odd rounds, B A in even ones: each revision goes first as often as the other."""
    return ["before", "after"] if round_no % 2 == 1 else ["after", "before"]


def run_all(args, console) -> bool:
    ok = True
    with tempfile.TemporaryDirectory(prefix="ranger-hvd-revisions-") as tmp:
        trees = {}
        try:
            for label in ("before", "after"):
                trees[label] = Path(tmp) / label
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet",
                                str(trees[label]), getattr(args, label + "_sha")], check=True)
            for round_no in range(1, args.rounds + 1):
                for label in order_of_round(round_no):
                    out = args.out / f"{label}-{round_no}"
                    out.mkdir(parents=True, exist_ok=True)
                    argv = [sys.executable, str(trees[label] / "benchmarks" / "bench_network.py"),
                            *args.bench_args, "--out", str(out)]
                    console.print(f"[bold]round {round_no}, {label} ({getattr(args, label)})[/bold]: "
                                  + shlex.join(argv[1:]))
                    with open(out / "log", "w") as log:
                        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
                    console.print(f"   exit {rc}, {time.strftime('%H:%M:%S')}")
                    ok &= rc == 0
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    return ok


def collect(out: Path, rounds: int) -> dict:
    """{(hosts, link, model, mode): {label: [median ms of each round]}} and the exchange ms alike."""
    cells: dict = {}
    for label in ("before", "after"):
        for round_no in range(1, rounds + 1):
            path = out / f"{label}-{round_no}" / "network-results.json"
            if not path.exists():
                continue
            for run in json.loads(path.read_text())["runs"]:
                for mode, fig in run.get("figures", {}).items():
                    cell = cells.setdefault((run["hosts"], run["link"], run["model"], mode), {})
                    cell.setdefault(label, []).append((fig["median_ms"], fig.get("overhead_ms")))
    return cells


def markdown(cells: dict, meta: dict) -> str:
    lines = [
        "# Two revisions side by side on the network benchmark",
        "",
        f"Run on {meta['date']} by `{meta['command']}` in {meta['wall_s']:.0f} s.",
        f"Machine: {meta['machine']}.",
        f"A = `{meta['before']}` ({meta['before_sha'][:10]}), B = `{meta['after']}` "
        f"({meta['after_sha'][:10]}); {meta['rounds']} launches each, in the order "
        + ", ".join("".join("A" if lb == "before" else "B" for lb in order_of_round(r))
                    for r in range(1, meta["rounds"] + 1))
        + ". Each launch is one `bench_network.py` run of that revision (its launch directory "
        "holds its own results file). Figures: median step ms of each launch (the slower rank's "
        "time of each step), then the mean over launches; *exchange* = step - compute only, of the "
        "same launch (with `--exchange-only` no compute runs: the step is the exchange).",
        "",
        "| hosts | link | model | mode | A: step ms per launch | B: step ms per launch | A mean | B mean "
        "| B / A | A exchange ms | B exchange ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (hosts, link, model, mode), by in sorted(cells.items()):
        a, b = by.get("before", []), by.get("after", [])
        mean = lambda xs, i: statistics.fmean(x[i] for x in xs) if xs and xs[0][i] is not None else None  # noqa: E731
        fmt = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
        am, bm = mean(a, 0), mean(b, 0)
        ratio = f"{bm / am:.2f}" if am and bm else ""
        # exchange only (--exchange-only) times no compute: its step is the exchange
        exch = (lambda xs: "" if mode == "compute" or not xs or any(x[1] is None for x in xs) else
                " / ".join(f"{x[1]:.0f}" for x in xs))
        lines.append(f"| {hosts} | {link} | {model} | {mode} | {' / '.join(fmt(x[0]) for x in a)} "
                     f"| {' / '.join(fmt(x[0]) for x in b)} | {fmt(am)} | {fmt(bm)} | {ratio} "
                     f"| {exch(a)} | {exch(b)} |")
    lines += ["", "![A against B](revisions.png)", ""]
    return "\n".join(lines)


def plot(cells: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(cells)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) + 2), 4.2))
    width = 0.38
    for shift, label, color in ((-width / 2, "before", "#999999"), (width / 2, "after", "#1f77b4")):
        xs = [i + shift for i in range(len(keys))]
        per = [[m for m, _ in cells[k].get(label, [])] for k in keys]
        ax.bar(xs, [statistics.fmean(v) if v else 0 for v in per], width,
               label=f"{'A' if label == 'before' else 'B'} = {meta[label]} ({meta[label + '_sha'][:7]})",
               color=color)
        for x, v in zip(xs, per):
            ax.plot([x] * len(v), v, "k.", ms=4)  # each launch's median
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{model}\n{link}, {hosts} hosts\n{'compute only' if mode == 'compute' else mode}" for hosts, link, model, mode in keys],
                       fontsize=7)
    ax.set_ylabel("median step, ms")
    ax.set_title(f"Step time, revision A against B ({meta['date']})\n"
                 "bars: mean over launches; dots: each launch's median", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / "revisions.json"
    start = time.time()
    ok = True
    if args.summarize:
        if not meta_path.exists():
            console.print(f"[red]--summarize: no {meta_path} (run without --summarize first)[/red]")
            return 2
        meta = json.loads(meta_path.read_text())["meta"]
    else:
        meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python benchmarks/bench_revisions.py "
                           + shlex.join(argv if argv is not None else sys.argv[1:]),
                "machine": cpu_and_load(), "rounds": args.rounds,
                "before": args.before, "after": args.after,
                "before_sha": args.before_sha, "after_sha": args.after_sha}
        ok = run_all(args, console)
        meta["wall_s"] = time.time() - start
    cells = collect(args.out, meta["rounds"])
    if not cells:
        console.print("[red]no launch produced figures[/red]")
        return 1
    meta_path.write_text(json.dumps({"meta": meta, "cells": [
        {"hosts": h, "link": lk, "model": m, "mode": mode,
         **{label: [{"median_ms": s, "exchange_ms": e} for s, e in by.get(label, [])]
            for label in ("before", "after")}}
        for (h, lk, m, mode), by in sorted(cells.items())]}, indent=1))
    (args.out / "revisions.md").write_text(markdown(cells, meta))
    plot(cells, meta, args.out / "revisions.png")
    console.print(f"results: {args.out / 'revisions.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
