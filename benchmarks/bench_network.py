"""End-to-end benchmark: step time of real models across test hosts with limited links.

Creates N test hosts (network namespaces with sshd, ``launch/netns-hosts.sh``), limits every link
with ``tc tbf``, runs real ``horovodrun --gloo`` across them (one rank per host, one thread per rank)
and measures, per step, compute-only time, step time (median, 10th-90th percentile), exchange
overhead and bytes per rank, for dense fp32, Horovod fp16 and ranger at each density. The hosts are
removed afterwards, also after a failure, Ctrl-C or SIGTERM. Needs root.

    python benchmarks/bench_network.py            # full grid -> benchmarks/network-results.{md,json,png}
    python benchmarks/bench_network.py --quick    # 1 small model, 2 hosts, 1 Gbit/s, few steps (~1 min)
    python benchmarks/bench_network.py --hosts 2 --links 1gbit none --models resnet50
    python benchmarks/bench_network.py --exchange-only --hosts 2 4 8 --links 1gbit \
        --models lstm-lm resnet50 tensor-1m --name network-scaling --out docs/results

``--exchange-only`` builds no model: every rank fills the gradients of the model's tensor shapes
with synthetic values (untimed) and times only the exchange (Horovod's per-parameter hooks in
backward order, then ``synchronize``), and reports bytes received per rank as well.
``--ranks-per-host 2`` starts two ranks in each test host (they talk over the host's loopback,
not the limited link).

Exit status: 0 when every launch produced figures, 1 when some failed (their error is in the
results), 2 for bad arguments or when test hosts cannot be created here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from machine import cpu_and_load  # noqa: E402
from netbench import report  # noqa: E402
from netbench.hosts import HostsError, TestHosts, interrupt_on_signals  # noqa: E402
from netbench.models import EXCHANGE_ONLY, SPECS  # noqa: E402
from netbench.worker import parse_mode  # noqa: E402

FULL = {"hosts": [2, 3], "links": ["1gbit", "10gbit", "none"],
        "models": ["resnet50", "lstm-lm", "keras-resnet50"],
        "modes": ["dense", "fp16", "floor", "ranger-0.01", "ranger-0.001"], "steps": 20, "warmup": 3}
QUICK = {"hosts": [2], "links": ["1gbit"], "models": ["lstm-small"],
         "modes": ["dense", "fp16", "floor", "ranger-0.01", "ranger-0.001"], "steps": 6, "warmup": 2}
EXCHANGE = {"hosts": [2, 4, 8], "links": ["1gbit"], "models": ["lstm-lm", "resnet50", "tensor-1m"],
            "modes": ["dense", "fp16", "ranger-0.01", "global-0.01", "ranger-0.001", "global-0.001"],
            "steps": 10, "warmup": 2}
EXCHANGE_KINDS = ("dense", "fp16", "ranger", "hook", "pertensor", "global", "hier", "hierglobal")
LINK_WORDS = {"none": "none", "1gbit": "1 Gbit/s", "10gbit": "10 Gbit/s"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="the small grid a test runs (default output in a temp dir)")
    p.add_argument("--hosts", type=int, nargs="+", help=f"host counts (default {FULL['hosts']})")
    p.add_argument("--links", nargs="+", help=f"tc rates or none (default {FULL['links']})")
    p.add_argument("--models", nargs="+", help=f"of {sorted(SPECS)} (default {FULL['models']})")
    p.add_argument("--modes", nargs="+", help=f"dense, fp16, floor, ranger-D, hook-D, pertensor-D, "
                   f"global-D, ddp, ddp-D, ddpglobal-D, hier-D, hierglobal-D (hierarchical: --ranks-per-host 2) "
                   f"(default {FULL['modes']})")
    p.add_argument("--exchange-only", action="store_true", help="no model and no compute: synthetic "
                   "gradients of each model's tensor shapes, only the exchange timed (defaults: "
                   f"hosts {EXCHANGE['hosts']}, models {EXCHANGE['models']}, modes {EXCHANGE['modes']}, "
                   f"{EXCHANGE['steps']} steps)")
    p.add_argument("--ranks-per-host", type=int, default=1, choices=(1, 2),
                   help="ranks started in each test host (default 1)")
    p.add_argument("--name", default="network-results",
                   help="results files are NAME.{md,json,png} in --out (default network-results)")
    p.add_argument("--steps", type=int, help="timed steps per mode (default 20; quick 6)")
    p.add_argument("--warmup", type=int, help="warm-up steps per mode (default 3; quick 2)")
    p.add_argument("--out", type=Path, help="directory of network-results.{md,json,png} "
                   "(default benchmarks/; quick: a new temp dir)")
    p.add_argument("--prefix", default="rbench", help="namespace name prefix (default rbench)")
    p.add_argument("--net", default="10.78.0", help="first three parts of the hosts' addresses (default 10.78.0)")
    p.add_argument("--append", action="store_true", help="keep the other cells of an existing "
                   "NAME.json in --out (same kind, hosts, ranks per host, link and model: replaced, or "
                   "merged where the modes differ (compute only aside): the cell then holds the "
                   "modes of both launches)")
    p.add_argument("--no-pin", action="store_true", help="let the scheduler place the ranks (default: "
                   "each rank on its own core, rank r on core r mod cores, as on separate hosts)")
    p.add_argument("--cycle-time-ms", type=float, help="Horovod's cycle time, the same for every mode "
                   "(horovodrun --cycle-time-ms; default: Horovod's own)")
    p.add_argument("--launch-timeout", type=float, default=1800, help="seconds per horovodrun launch")
    args = p.parse_args(argv)
    base = QUICK if args.quick else EXCHANGE if args.exchange_only else FULL
    for key in ("hosts", "links", "models", "modes", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    errors = []
    errors += [f"--hosts {h}: give 2 to 9" for h in args.hosts if not 2 <= h <= 9]
    errors += [f"--models {m}: not one of {sorted(SPECS)}" for m in args.models if m not in SPECS]
    errors += [f"--models {m}: only with --exchange-only" for m in args.models
               if m in EXCHANGE_ONLY and not args.exchange_only]
    if args.exchange_only:
        errors += [f"--models {m}: --exchange-only runs PyTorch shapes only" for m in args.models
                   if m in SPECS and SPECS[m].framework != "torch"]
    errors += [f"--modes {mode}: hierarchical, needs --ranks-per-host 2" for mode in args.modes
               if mode.startswith("hier") and args.ranks_per_host < 2]
    if args.exchange_only:
        errors += [f"--modes {mode}: not an exchange (--exchange-only takes dense, fp16, ranger-D, "
                   "hook-D, pertensor-D, global-D)" for mode in args.modes
                   if mode.split("-", 1)[0] not in EXCHANGE_KINDS]
    errors += [f"--modes {mode}: runs on PyTorch models only, not {m}"
               for mode in args.modes if mode.startswith(("global-", "ddp", "pertensor-", "hier"))
               for m in args.models if m in SPECS and SPECS[m].framework != "torch"]
    for mode in args.modes:
        try:
            kind, density = parse_mode(mode)
            if kind == "compute" or (density is not None and not 0 < density <= 1):
                raise ValueError
        except ValueError:
            errors.append(f"--modes {mode}: give dense, fp16, floor, ddp, ranger-D, hook-D, "
                          "pertensor-D, global-D, ddp-D, ddpglobal-D, hier-D or hierglobal-D with 0 < D <= 1")
    errors += [f"--links {x}: give a tc rate such as 1gbit or 500mbit, or none" for x in args.links
               if x != "none" and not (x[:1].isdigit() and x.rstrip("0123456789.").endswith("bit"))]
    if args.cycle_time_ms is not None and not args.cycle_time_ms > 0:
        errors.append(f"--cycle-time-ms {args.cycle_time_ms:g}: give a time above 0")
    if args.steps < 1 or args.warmup < 1:
        errors.append("--steps and --warmup must be at least 1")
    if errors:
        p.error("; ".join(errors))
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="ranger-hvd-bench-")) if args.quick else HERE
    return args


def machine() -> tuple[str, int]:
    import torch

    versions = f"Python {platform.python_version()}, PyTorch {torch.__version__}"
    try:
        from importlib.metadata import version

        versions += f", TensorFlow {version('tensorflow')}, Horovod {version('horovod')}"
    except Exception:
        pass
    return f"{cpu_and_load()}; {versions}", os.cpu_count()


def code_version() -> str:
    """The measured commit: ``git rev-parse HEAD`` of this checkout (with ``+ changes`` when the
    tree differs from it), else $RANGER_HVD_COMMIT (an exported tree has no git)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "ranger_hvd"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes in ranger_hvd/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RANGER_HVD_COMMIT", "unknown")


def _show_progress(log, shown: int, console) -> int:
    """Prints rank 0's new "[bench]" lines of the launch's output; returns the lines seen so far."""
    log.flush()
    log.seek(0)
    text = log.read()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines.pop()  # a line still being written
    for line in lines[shown:]:
        if line.startswith("[0]") and "[bench]" in line:
            console.print("   " + line.split("[bench]", 1)[1].strip(), highlight=False)
    return len(lines)


def launch(hosts: TestHosts, model: str, args, json_path: Path, console) -> dict:
    """One horovodrun across the hosts: compute-only and every mode for one model (exchange only:
    every mode for each of the comma-separated models, ``raw["ranks"]`` keyed by model)."""
    venv_bin = Path(sys.executable).parent
    env = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": f"{REPO}:{HERE}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "TF_USE_LEGACY_KERAS": "1", "HOROVOD_STALL_CHECK_TIME_SECONDS": "120",
           "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600"}
    argv = [*hosts.run_prefix(), str(venv_bin / "horovodrun"), *hosts.horovodrun_args(args.ranks_per_host),
            "--start-timeout", "300",
            *([] if args.cycle_time_ms is None else ["--cycle-time-ms", str(args.cycle_time_ms)]),
            sys.executable, "-m", "netbench.worker", "--model", model,
            "--modes", ",".join(args.modes), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--json", str(json_path), *([] if args.no_pin else ["--pin"]),
            *(["--exchange-only"] if args.exchange_only else [])]
    json_path.unlink(missing_ok=True)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline, shown = time.monotonic() + args.launch_timeout, 0
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"horovodrun did not finish in {args.launch_timeout:.0f} s "
                                       "(--launch-timeout)")
                time.sleep(1)
                shown = _show_progress(log, shown, console)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # horovodrun and its ssh; ranks go with the hosts
            proc.wait()
            raise
        _show_progress(log, shown, console)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0 or not json_path.exists():
        raise RuntimeError(f"horovodrun exited {proc.returncode}: {output[-3000:]}")
    raw = json.loads(json_path.read_text())
    expected = hosts.addresses * args.ranks_per_host
    if sorted(raw["addresses"]) != sorted(expected):
        raise RuntimeError(f"ranks ran at {raw['addresses']}, expected {args.ranks_per_host} on each of "
                           f"{hosts.addresses}")
    return raw


def main(argv=None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    from rich.console import Console

    console = Console(stderr=True)
    args.out.mkdir(parents=True, exist_ok=True)
    description, cpus = machine()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/bench_network.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": description, "cpus": cpus, "steps": args.steps, "warmup": args.warmup,
            "code": code_version(),
            "pinned": not args.no_pin, "cycle_time_ms": args.cycle_time_ms,
            "exchange_only": args.exchange_only, "ranks_per_host": args.ranks_per_host,
            "models": {m: f"{SPECS[m].framework}, {SPECS[m].description}; batch: {SPECS[m].input}"
                       + (f"; {SPECS[m].tensors} tensors" if SPECS[m].tensors else "")
                       + f", {SPECS[m].params:,} parameters" for m in args.models}}
    runs: list[dict] = []
    start = time.time()
    failed = interrupted = False
    results_json = args.out / f"{args.name}.json"
    previous = json.loads(results_json.read_text()) if args.append and results_json.exists() else None
    partial_json = args.out / f"{args.name}.partial.json"  # what is measured so far
    try:
        with tempfile.TemporaryDirectory(prefix="ranger-hvd-bench-state-") as state:
            for count in args.hosts:
                hosts = TestHosts(count, Path(state) / f"h{count}", args.prefix, args.net)
                with hosts:
                    for link in args.links:
                        hosts.set_link(link)
                        # exchange only: every model in one launch (a launch of 8 ranks on a small
                        # machine takes minutes to start), split into one run per model below
                        launches = [",".join(args.models)] if args.exchange_only else args.models
                        for model in launches:
                            what = "exchange only" if args.exchange_only else "steps"
                            console.print(f"[bold]{count} hosts x {args.ranks_per_host} ranks, link {link}, "
                                          f"{model}, {what}[/bold] ...")
                            run = {"hosts": count, "ranks_per_host": args.ranks_per_host,
                                   "ranks": count * args.ranks_per_host,
                                   "kind": "exchange" if args.exchange_only else "step",
                                   "link": link, "model": model, "date": meta["date"],
                                   "steps": args.steps, "warmup": args.warmup}
                            t0 = time.time()
                            cells = [dict(run, model=m) for m in model.split(",")]
                            try:
                                raw = launch(hosts, model, args, Path(state) / "worker.json", console)
                                for cell in cells:
                                    one = raw if not args.exchange_only else dict(
                                        raw, model=cell["model"], ranks=[r[cell["model"]] for r in raw["ranks"]])
                                    cell["figures"] = report.summarize(one)
                                    cell["raw"] = one
                            except RuntimeError as exc:
                                failed = True
                                for cell in cells:
                                    cell["error"] = str(exc)
                                console.print(f"[red]failed:[/red] {str(exc)[-1500:]}")
                                hosts.down()      # stray ranks die with their namespaces
                                hosts.__enter__()
                                hosts.set_link(link)
                            for cell in cells:
                                cell["wall_s"] = time.time() - t0   # of the whole launch
                            runs.extend(cells)
                            partial_json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    except HostsError as exc:
        console.print(f"[red]cannot create the test hosts:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: test hosts removed; writing what was measured[/yellow]")
    meta["wall_s"] = time.time() - start
    if interrupted:
        meta["command"] += "  (interrupted before the end)"
    if not runs:
        return 130 if interrupted else 1
    if args.append and previous:
        for run in runs:
            # a cell measured before with other modes: both launches' modes in one cell (what
            # cannot share a launch, e.g. hierarchical modes, whose process sets slow every mode)
            old = next((o for o in previous["runs"] if report.cell(o) == report.cell(run)), None)
            if old and old.get("figures") and run.get("figures") and (
                    set(old["figures"]) & set(run["figures"])) <= {"compute"}:
                run["figures"] = {**old["figures"], **run["figures"]}
                run["merged_from"] = {"date": old["date"], "raw": old.get("raw")}
        keys = {report.cell(r) for r in runs}
        kept = [r for r in previous["runs"] if report.cell(r) not in keys]
        dates = {r["date"] for r in kept} | {r["merged_from"]["date"] for r in kept + runs
                                             if "merged_from" in r}
        if dates:
            meta["earlier"] = [e for e in previous["meta"].get("earlier", []) if e["date"] in dates]
            if previous["meta"]["date"] in dates:
                meta["earlier"].append({k: previous["meta"][k] for k in
                                        ("date", "command", "machine", "wall_s", "steps", "warmup", "pinned",
                                         "exchange_only", "ranks_per_host", "code")
                                        if k in previous["meta"]})
            meta["models"] = {**{r["model"]: previous["meta"]["models"][r["model"]] for r in kept},
                              **meta["models"]}
        runs = kept + runs
    order = {link: i for i, link in enumerate(FULL["links"])}
    runs.sort(key=lambda r: (r.get("kind", "step"), r["hosts"], r.get("ranks_per_host", 1),
                             order.get(r["link"], len(order)), r["link"], r["model"]))
    results_json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    if any(r.get("kind") == "exchange" for r in runs):
        report.plot_scaling(runs, args.out / f"{args.name}.png", meta)
    else:
        report.plot(runs, args.out / f"{args.name}.png", meta)
    (args.out / f"{args.name}.md").write_text(report.markdown(runs, meta, f"{args.name}.png"))
    partial_json.unlink(missing_ok=True)
    report.print_table(runs)
    console.print(f"results: {args.out / (args.name + '.md')}")
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
