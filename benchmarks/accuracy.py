"""Accuracy of compression against dense, at the same epochs: the six reference jobs, one command.

    .venv/bin/python benchmarks/accuracy.py                  # everything (over an hour on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --configs cnn-digits --scales 1 --modes dense,ranger-0.01

For each reference config (CNN, RNN, GAN on PyTorch and TensorFlow) and each mode it runs the real
launcher (``ranger-hvd launch``, 2 ranks, Gloo; ``--np N``: N ranks on this machine, dense included) at
the config's own epochs and at 3x those epochs, then reads each run's ``summary.json``. Modes:

* ``dense``: Horovod's fp32 allreduce; ``fp16``: Horovod's fp16 compression;
* ``ranger-D`` (any 0 < D <= 1, e.g. ``ranger-0.03``): top-k at density D with error feedback, the job's
  momentum applied by SGD to the averaged update;
* ``ranger-D-dgc``: top-k at density D with DGC's momentum correction in the compressor, at the job's
  momentum (the optimizer then runs without); not run for jobs without momentum (the GANs), where it
  would be ``ranger-D`` itself;
* ``ranger-D-local``: the same momentum in the compressor without DGC's factor masking, so the residual
  is error feedback on the local momentum (``compression.momentum_masking: false``); not run for the
  GANs either;
* ``global-D`` (also ``global-D-dgc``, ``global-D-local``): ``ranger-D`` (``-dgc``, ``-local``) with the
  global top-k exchange (``compression.exchange=global_topk``, ``docs/exchange.md``) in place of the
  allgather, on both backends; not run under DDP (``ranger_hook`` has the allgather only);
* ``ddp-MODE`` (``ddp-dense``, ``ddp-fp16``, ``ddp-ranger-D``, ...): MODE with ``cluster.runner=torchrun``:
  the PyTorch jobs under DDP, started by torchrun, the compression as DDP's communication hook (DDP's
  allreduce, ``fp16_compress_hook``, ``ranger_hook``); not run for the TensorFlow configs. Its "vs dense"
  is against ``ddp-dense`` where that ran.

The job's momentum is the config's, wherever the config keeps it (``train.momentum``, or
``compression.momentum`` for a config that ships DGC's); every ranger mode says where it goes, so each
mode means the same thing whatever the config's own choice. ``dense`` and ``fp16`` are the plain
``compression.type`` switch: the launcher gives their optimizer the job's momentum by itself.

Writes ``docs/results/accuracy-results.md`` (``--out``: the table, with machine and date), its
JSON and a PNG of the same name (eval metric per mode, one panel per job), and prints the table; a
sweep of three or more ``ranger-D`` densities also draws ``<out>-curve.png``. ``docs/accuracy.md``
says which committed file came from which command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from accuracy_plots import plot, plot_density
from common import REPO, RESULTS, density_mode

CONFIGS = ["cnn-digits", "cnn-digits-tf", "rnn-digits", "rnn-digits-tf", "gan-digits", "gan-digits-tf"]
DEFAULT_MODES = ["dense", "fp16", "ranger-0.01", "ranger-0.01-dgc", "ranger-0.01-local", "ranger-0.001",
                 "ranger-0.001-dgc", "ranger-0.001-local"]
# The dense twins are the plain switch a user types: the launcher keeps the job's momentum (moving it to the
# optimizer where the config keeps it in the compressor), so a dense row has the Ranger run's settings.
FIXED_MODES = {"dense": ["compression.type=none"], "fp16": ["compression.type=fp16"]}


MOMENTUM_IN_COMPRESSOR = {"dgc": "true", "local": "false"}    # mode suffix: compression.momentum_masking


# mode kind: the compression.exchange it runs ("ranger-D": the allgather, the default)
EXCHANGES = {"ranger": "allgather", "global": "global_topk"}


def _ranger_mode(mode: str) -> tuple[str, float, str] | None:
    """(kind, D, suffix) of ``KIND-D`` (suffix ""), ``KIND-D-dgc`` and ``KIND-D-local`` with KIND
    ``ranger`` or ``global`` and 0 < D <= 1; None for any other name."""
    return density_mode(mode, tuple(EXCHANGES), tuple(MOMENTUM_IN_COMPRESSOR))


DDP_PREFIX = "ddp-"    # the same mode under DDP + the communication hook, started by torchrun


def mode_spec(mode: str) -> list[str] | None:
    """The config overrides of a mode name (``CONFIG`` stands for the job's momentum), or None if the
    name means nothing: ``dense``, ``fp16``, ``ranger-D``, ``ranger-D-dgc`` or ``ranger-D-local`` with
    0 < D <= 1, the same with ``global`` for ``ranger`` (the global top-k exchange), each also with the
    prefix ``ddp-``."""
    if mode.startswith(DDP_PREFIX):
        spec = mode_spec(mode[len(DDP_PREFIX):])
        return None if spec is None else spec + ["cluster.runner=torchrun"]
    if mode in FIXED_MODES:
        return FIXED_MODES[mode]
    parsed = _ranger_mode(mode)
    if parsed is None:
        return None
    spec = ["compression.type=ranger", f"compression.density={mode.split('-')[1]}"]
    if parsed[0] != "ranger":
        spec.append(f"compression.exchange={EXCHANGES[parsed[0]]}")
    if parsed[2]:
        masking = MOMENTUM_IN_COMPRESSOR[parsed[2]]
        return spec + ["compression.momentum=CONFIG", f"compression.momentum_masking={masking}",
                       "train.momentum=0"]
    # the masking back at its default: with no momentum in the compressor it has nothing to mask
    return spec + ["compression.momentum=0", "compression.momentum_masking=true", "train.momentum=CONFIG"]


# What judges a job: (metric in summary.json's final_metrics, higher is better)
METRICS = {"cnn": ("eval_accuracy", True), "rnn": ("eval_accuracy", True),
           "gan": ("eval_fd", False)}


def dense_of(mode: str) -> str:
    """The row a mode's "vs dense" is taken against: ``ddp-dense`` for a DDP mode, else ``dense``."""
    return DDP_PREFIX + "dense" if mode.startswith(DDP_PREFIX) else "dense"


def config_epochs(name: str) -> tuple[str, int, float]:
    """(model, epochs, the job's momentum: the compressor's where the config ships DGC's, else the
    optimizer's) of a reference config."""
    sys.path.insert(0, str(REPO))
    from ranger_hvd.jobs.common import optimizer_momentum
    from ranger_hvd.config import load_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml", [], cwd=REPO).config
    return cfg.job.model, cfg.train.epochs, cfg.compression.compressor_momentum or optimizer_momentum(cfg)


def mode_overrides(mode: str, momentum: float, config: str = "") -> list[str] | None:
    """The overrides of a mode for a job whose momentum is ``momentum`` (None: not applicable, e.g. DGC's
    momentum for a job without momentum, a DDP mode for a TensorFlow ``config``, the global exchange
    under DDP)."""
    spec = mode_spec(mode)
    if "compression.momentum=CONFIG" in spec and momentum == 0:
        return None
    if mode.startswith(DDP_PREFIX) and (config.endswith("-tf") or "compression.exchange=global_topk" in spec):
        return None
    return [x.replace("CONFIG", str(momentum)) for x in spec]


def run_one(name: str, overrides: list[str], mode: str, epochs: int, seed: int, extra: list[str],
            out_root: Path) -> dict:
    """Launches one run through ranger-hvd and reads what it measured."""
    out_dir = out_root / run_name(name, mode, epochs, seed)
    cmd = [str(REPO / ".venv" / "bin" / "ranger-hvd"), "launch", str(REPO / "configs" / f"{name}.yaml"),
           *overrides, f"train.epochs={epochs}", f"train.seed={seed}", *extra, f"output.dir={out_dir}",
           "train.checkpoint=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return read_run(out_dir, proc.returncode, time.monotonic() - started)


def run_name(name: str, mode: str, epochs: int, seed: int) -> str:
    return f"{name}-{mode}-e{epochs}" + (f"-s{seed}" if seed else "")


def combine(runs: list[dict]) -> dict:
    """One table cell from the runs of several seeds: the mean and spread of every metric."""
    ok = [r for r in runs if "failed" not in r]
    if len(ok) < len(runs):
        return next(r for r in runs if "failed" in r) | {"seeds": len(runs), "failed_seeds": len(runs) - len(ok)}
    metrics = {}
    for key in ok[0]["metrics"]:
        values = [r["metrics"][key] for r in ok if isinstance(r["metrics"].get(key), (int, float))]
        if len(values) == len(ok):
            metrics[key] = statistics.fmean(values)
            metrics[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            metrics[key + "_each"] = values
    return {"metrics": metrics, "bytes_per_step": ok[0]["bytes_per_step"], "seeds": len(ok),
            "seconds": statistics.fmean(r["seconds"] for r in ok), "run_dirs": [r["run_dir"] for r in ok]}


def read_run(out_dir: Path, exit_code: int = 0, seconds: float | None = None) -> dict:
    """One run's eval metrics, bytes per step and wall time, from its summary.json."""
    summaries = sorted(out_dir.glob("*/*/summary.json"))
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    seconds = summary.get("duration_s") if seconds is None else seconds
    if exit_code != 0 or summary.get("status") != "success":
        # A run that fails (e.g. diverges to NaN) is a result too: the table says how it ended.
        reason = summary.get("error") or f"exit {exit_code}"
        print(f"{out_dir.name} failed: {reason}", file=sys.stderr)
        return {"failed": str(reason).splitlines()[0][:80], "metrics": {}, "bytes_per_step": None,
                "seconds": seconds or 0.0}
    return {"metrics": summary["final_metrics"], "bytes_per_step": summary["bytes_sent_per_step_mean"],
            "seconds": seconds, "run_dir": str(summaries[-1].parent)}


def table(results: dict, names: list[str], modes: list[str], scales: list[int]) -> str:
    lines = []
    for name in names:
        model, base = results[name]["model"], results[name]["epochs"]
        metric, higher = METRICS[model]
        lines += [f"### {name} ({metric}, {'higher' if higher else 'lower'} is better)", ""]
        head = "| mode |" + "".join(f" {metric} at {base * s} ep | vs dense |" for s in scales)
        head += " bytes sent per step | wall time (s) at each |"
        lines += [head, "|" + "---|" * (2 + 2 * len(scales) + 1)]
        for mode in modes:
            row = f"| {mode} |"
            for s in scales:
                r = results[name]["runs"].get((mode, s))
                d = results[name]["runs"].get((dense_of(mode), s))
                if r is None:
                    row += " - | - |"
                    continue
                if "failed" in r:
                    row += f" failed: {r['failed']} | |"
                    continue
                v = r["metrics"].get(metric)
                dv = d["metrics"].get(metric) if d else None
                delta = "" if v is None or dv is None else (
                    f"{100 * (v - dv):+.1f} pt" if higher else f"{100 * (v - dv) / dv:+.0f} %")
                sd = r["metrics"].get(metric + "_std")
                spread = f" ± {sd:.4f}" if sd and r.get("seeds", 1) > 1 else ""
                row += f" {v:.4f}{spread} | {delta} |" if v is not None else " - | - |"
            first = next((results[name]["runs"].get((mode, s)) for s in scales
                          if results[name]["runs"].get((mode, s))), None)
            bps = first["bytes_per_step"] if first else None
            row += f" {bps:,.0f} |" if bps is not None else " - |"
            row += " " + " / ".join(f"{results[name]['runs'][(mode, s)]['seconds']:.0f}"
                                   for s in scales if (mode, s) in results[name]["runs"]) + " |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


# The accuracy issue's bar: (mode, epochs multiple, allowed gap in points; GAN: allowed ratio to dense)
TARGETS = [("ranger-0.01", 1, 1.0, 1.10), ("ranger-0.01", 3, 0.5, 1.10), ("ranger-0.001", 3, 2.0, None)]


def targets(results: dict, names: list[str]) -> str:
    """Each target of the accuracy issue, met or not, with the figures it was judged on: one line for
    each place of the momentum measured at the target's density (``ranger-D``, ``-dgc``, ``-local``) and
    each exchange (``global-D``: the same bar)."""
    lines = ["### Targets", "", "| job | target | measured | met |", "|---|---|---|---|"]
    for name in names:
        model, base = results[name]["model"], results[name]["epochs"]
        metric, higher = METRICS[model]
        # each target also for the global exchange at the same density (global-0.01 for ranger-0.01)
        judged = [(ddp + kind + plain[len("ranger"):] + suffix, scale, gap_pt, ratio)
                  for plain, scale, gap_pt, ratio in TARGETS for kind in EXCHANGES
                  for ddp in ("", DDP_PREFIX) for suffix in ["", *(f"-{s}" for s in MOMENTUM_IN_COMPRESSOR)]]
        for mode, scale, gap_pt, ratio in judged:
            r, d = results[name]["runs"].get((mode, scale)), results[name]["runs"].get((dense_of(mode), scale))
            if r is None or d is None:
                continue
            v, dv = r["metrics"].get(metric), d["metrics"].get(metric)
            if higher:
                goal = f"{mode} at {base * scale} ep within {gap_pt} pt of {dense_of(mode)}"
                # accuracies are fractions of the eval set: a gap of exactly gap_pt must count as met
                # although 100 * (dv - v) carries float noise (0.97 - 0.96 -> 1.0000000000000009)
                ok = v is not None and dv is not None and 100 * (dv - v) <= gap_pt + 1e-9
                got = "failed" if v is None else f"{v:.4f} vs {dv:.4f} ({100 * (v - dv):+.1f} pt)"
            else:
                if ratio is None:
                    continue
                goal = f"{mode} at {base * scale} ep: {metric} at most {ratio:.2f}x {dense_of(mode)}'s"
                ok = v is not None and dv is not None and v <= ratio * dv
                got = "failed" if v is None else f"{v:.2f} vs {dv:.2f} ({v / dv:.2f}x)"
            lines.append(f"| {name} | {goal} | {got} | {'yes' if ok else 'no'} |")
    return "\n".join(lines) + "\n"


def density_png(out: Path) -> Path:
    return out.with_name(out.stem + "-curve.png")


def density_bar(scale: int) -> tuple:
    """The accuracy issue's bar for d = 0.01 at this many epochs: (allowed points, allowed GAN ratio)."""
    return next(((g, r) for m, sc, g, r in TARGETS if m == "ranger-0.01" and sc == scale), (None, None))


def swept_densities(modes: list[str]) -> dict[float, str]:
    """{density: mode} of the plain ``ranger-D`` modes, densities ascending."""
    parsed = {m: _ranger_mode(m) for m in modes}
    return dict(sorted((p[1], m) for m, p in parsed.items() if p is not None and p[0] == "ranger" and not p[2]))


def _runs_to_json(results: dict) -> dict:
    return {name: {**r, "runs": [[m, s, v] for (m, s), v in r["runs"].items()]}
            for name, r in results.items()}


def _runs_from_json(saved: dict) -> dict:
    return {name: {**r, "runs": {(m, s): v for m, s, v in r["runs"]}} for name, r in saved.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="dense, fp16, ranger-D (any density D), ranger-D-dgc and ranger-D-local, each "
                         "also as ddp-MODE (PyTorch DDP started by torchrun), comma-separated")
    ap.add_argument("--scales", default="1,3", help="multiples of each config's own epochs")
    ap.add_argument("--seeds", default="0", help="train.seed values; each cell is their mean ± stdev")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (e.g. train.lr_schedule=cosine)")
    ap.add_argument("--np", type=int, default=None, metavar="N",
                    help="N ranks on this machine for every run (cluster.np=N, cluster.hosts=localhost:N; "
                         "default: the configs' 2)")
    ap.add_argument("--out", default=str(RESULTS / "accuracy-results.md"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "accuracy"))
    ap.add_argument("--from-runs", metavar="DIR",
                    help="tabulate the run directories an earlier sweep left in DIR, running nothing (a cell "
                         "with no run directory of any seed there is shown as not run)")
    ap.add_argument("--replot", action="store_true",
                    help="redraw the PNG from the JSON beside --out, running nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        saved = json.loads(out.with_suffix(".json").read_text())
        results = _runs_from_json(saved["results"])
        plot(results, saved["names"], saved["modes"], saved["scales"], out.with_suffix(".png"), METRICS,
             saved.get("ranks", 2))
        if len(swept_densities(saved["modes"])) >= 3:
            plot_density(results, saved["names"], swept_densities(saved["modes"]), saved["scales"][0],
                         density_png(out), METRICS, density_bar(saved["scales"][0]))
        return 0
    names, modes = args.configs.split(","), args.modes.split(",")
    scales = [int(s) for s in args.scales.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [m for m in modes if mode_spec(m) is None] + [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown mode or config: {', '.join(unknown)}")
    ranks = args.np or 2
    extra = args.set + ([f"cluster.np={args.np}", f"cluster.hosts=localhost:{args.np}"] if args.np else [])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_root = Path(args.from_runs) if args.from_runs else Path(args.runs) / stamp
    header = (f"# Accuracy against dense at the same epochs\n\nMeasured {datetime.date.today()} on "
              f"{platform.machine()}, {os.cpu_count()} cores, no GPU; {ranks} ranks on one machine over "
              f"Gloo, one thread each. Command: `.venv/bin/python benchmarks/accuracy.py "
              f"--configs {args.configs} --modes {args.modes} --scales {args.scales} --seeds {args.seeds} "
              + (f"--np {args.np} " if args.np else "")
              + "".join(f"--set {x} " for x in args.set)
              + (f"--from-runs {args.from_runs} " if args.from_runs else "")
              + f"--out {out.relative_to(REPO) if out.is_relative_to(REPO) else out}`. Run "
              f"directories: `{out_root.relative_to(REPO) if out_root.is_relative_to(REPO) else out_root}`."
              " Wall times include start-up and were taken on a shared machine."
              + (" Modes ddp-*: the same compression under PyTorch DDP (cluster.runner=torchrun, started by "
                 "torchrun), as a DDP communication hook; vs ddp-dense." if any(m.startswith(DDP_PREFIX)
                                                                              for m in modes) else "")
              + (f" Each cell: mean ± sample stdev over seeds {args.seeds}." if len(seeds) > 1 else "") + "\n\n")
    results = {}
    for name in names:
        model, epochs, momentum = config_epochs(name)
        results[name] = {"model": model, "epochs": epochs, "runs": {}}
        for s in scales:
            for mode in modes:
                overrides = mode_overrides(mode, momentum, name)
                if overrides is None:
                    continue     # the table shows "-": e.g. DGC momentum for a config without momentum
                if args.from_runs and not any((out_root / run_name(name, mode, epochs * s, seed)).exists()
                                              for seed in seeds):
                    continue     # no run of this cell in DIR: not run ("-"), where a missing seed is a failure
                each = [read_run(out_root / run_name(name, mode, epochs * s, seed)) if args.from_runs
                        else run_one(name, overrides, mode, epochs * s, seed, extra, out_root)
                        for seed in seeds]
                r = combine(each)
                results[name]["runs"][(mode, s)] = r
                metric = METRICS[model][0]
                print(f"{name} {mode} {epochs * s} epochs: {metric} {r['metrics'].get(metric)} "
                      f"bytes/step {r['bytes_per_step']} ({r['seconds']:.0f} s)", flush=True)
                # what is measured so far, so that an interrupted sweep still leaves its table
                done = [n for n in names if n in results]
                out.write_text(header + table(results, done, modes, scales))
    text = table(results, names, modes, scales) + "\n" + targets(results, names)
    print(text)
    out.write_text(header + text)
    out.with_suffix(".json").write_text(json.dumps(
        {"names": names, "modes": modes, "scales": scales, "ranks": ranks, "results": _runs_to_json(results)},
        indent=1))
    plot(results, names, modes, scales, out.with_suffix(".png"), METRICS, ranks)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if len(swept_densities(modes)) >= 3:      # a density sweep: the metric against d tells more
        plot_density(results, names, swept_densities(modes), scales[0], density_png(out), METRICS,
                     density_bar(scales[0]))
        print(f"wrote {density_png(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
