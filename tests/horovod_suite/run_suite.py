"""Runs Horovod's own optimizer, tape and Keras-optimizer tests plain and with RangerCompressor injected.

    python -m tests.horovod_suite.run_suite --horovod-tests DIR [--np 2] [--density 1.0 0.01]
                                            [--files torch tensorflow keras] [-k EXPR]

``DIR`` holds Horovod v0.28.1's ``test/parallel/`` and ``test/utils/`` (Horovod's code is never part
of this repository; get it from Horovod's repository). Test-only imports that the project environment
lacks (``mock``, ``parameterized``) may sit in ``DIR/_pydeps``
(``pip install --target DIR/_pydeps mock parameterized``).

**Selection.** From each file, every test method whose body names one of Horovod's distributed
factories (``DistributedOptimizer``, ``DistributedGradientTape``, ``PartialDistributedGradientTape``,
``PartialDistributedOptimizer``), found by reading the file's syntax tree, plus a test that calls such
a test (``test_broadcast_state_gpu``). These are the tests of the entry points that take
``compression=``; the collective-op tests never reach a compressor. ``-k`` narrows it further.

**Runs.** Each file runs under ``horovodrun -np N --gloo`` once plain and once per density, with
``tests.horovod_suite.inject`` loaded as a pytest plugin: it injects ``RangerCompressor`` wherever a
test builds one of those factories without compression, and records each rank's outcomes. A per-test
timeout (pytest-timeout, thread method) ends a hung rank; the job is then relaunched with the tests
not yet finished, so one hang or crash costs one test, not the file. A test passes when it passes on
every rank.

Prints one table per file and writes ``docs/results/horovod-suite.md`` (with the machine, the
versions and, for each test that passes plain but fails injected, the reason) from
``docs/results/horovod-suite.json``, which keeps each file's latest results: running one file updates
its section and leaves the others.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.horovod_suite.inject import FACTORY_NAMES

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
RESULTS_MD = REPO / "docs" / "results" / "horovod-suite.md"

FILES = {  # key: (path under DIR, framework, extra environment)
    "torch": ("test/parallel/test_torch.py", "torch", {}),
    "tensorflow": ("test/parallel/test_tensorflow.py", "tensorflow", {"TF_USE_LEGACY_KERAS": "1"}),
    "keras": ("test/parallel/test_tensorflow2_keras.py", "tensorflow", {"TF_USE_LEGACY_KERAS": "1"}),
}
DEFAULT_OPTIONS = {"min_elements": 1, "compress_1d": True}
PASSING = {"passed"}
SHIMS: dict[str, set] = {}  # file key -> compatibility shims the plugin reported applying
console = Console(width=160)


# ----------------------------------------------------------------------------------------- selection

def _is_parameterized(func: ast.FunctionDef) -> bool:
    for deco in func.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr == "expand":
            return True
    return False


def _names_used(func: ast.FunctionDef) -> tuple[set[str], set[str]]:
    """Attribute and bare names used in the body, and the ``self.<method>`` names it calls."""
    used, self_calls = set(), set()
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                self_calls.add(node.attr)
        elif isinstance(node, ast.Name):
            used.add(node.id)
    return used, self_calls


def select_tests(path: Path) -> dict:
    """The test methods of ``path`` that build a Horovod distributed optimizer or tape."""
    tree = ast.parse(path.read_text())
    tests = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for func in cls.body:
            if isinstance(func, ast.FunctionDef) and func.name.startswith("test"):
                tests[func.name] = (func, *_names_used(func))
    chosen = {name for name, (_, used, _) in tests.items() if used & set(FACTORY_NAMES)}
    chosen |= {name for name, (_, _, calls) in tests.items() if calls & chosen}
    ordered = [name for name in tests if name in chosen]
    return {"names": ordered,
            "parameterized": [name for name in ordered if _is_parameterized(tests[name][0])]}


# --------------------------------------------------------------------------------------------- runs

def _env(framework: str, extra: dict, out_dir: Path, select: dict, exclude: list[str],
         density: float | None, options: dict, horovod_tests: Path, hide: list[str]) -> dict:
    env = dict(os.environ)
    pythonpath = [str(REPO)]
    if (horovod_tests / "_pydeps").is_dir():
        pythonpath.append(str(horovod_tests / "_pydeps"))
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(pythonpath + [p for p in [env.get("PYTHONPATH")] if p]),
        "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "60", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120",
        "RANGER_SUITE_FRAMEWORK": framework, "RANGER_SUITE_OUT": str(out_dir),
        "RANGER_SUITE_SELECT": json.dumps(select), "RANGER_SUITE_EXCLUDE": json.dumps(exclude),
        "RANGER_SUITE_DENSITY": "" if density is None else repr(density),
        "RANGER_SUITE_OPTIONS": json.dumps(options),
        "RANGER_SUITE_HIDE_TORCH_OPTIMIZERS": ",".join(hide),
    })
    env.update(extra)
    return env


def _read_events(out_dir: Path, np: int) -> list[list[dict]]:
    ranks = []
    for rank in range(np):
        path = out_dir / f"rank{rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        ranks.append([json.loads(line) for line in lines if line.strip()])
    return ranks


def _combine(per_rank: list[dict | None]) -> dict:
    """One test's outcome over all ranks: failed if any rank failed, passed if all passed."""
    outcomes = [d["outcome"] for d in per_rank]
    failed = [d for d in per_rank if d["outcome"] not in ("passed", "skipped")]
    injected = max(d.get("injected", 0) for d in per_rank)
    if failed:
        return {"outcome": failed[0]["outcome"], "reason": failed[0]["reason"], "injected": injected}
    if all(o == "skipped" for o in outcomes):
        return {"outcome": "skipped", "reason": per_rank[0]["reason"], "injected": injected}
    if all(o == "passed" for o in outcomes):
        return {"outcome": "passed", "reason": "", "injected": injected}
    return {"outcome": "skipped", "reason": "skipped on some ranks: " +
            "; ".join(d["reason"] for d in per_rank if d["outcome"] == "skipped"), "injected": injected}


def _crash_reason(output: str) -> str:
    for marker in ("Timeout (", "Stall", "Segmentation fault", "Aborted", "Killed"):
        for line in output.splitlines():
            if marker in line:
                return " ".join(line.split())[:300]
    tail = [line for line in output.splitlines() if line.strip()]
    return " ".join((tail[-1] if tail else "no output").split())[:300]


def run_mode(key: str, horovod_tests: Path, select: dict, np: int, density: float | None,
             options: dict, kexpr: str | None, timeout: int, log_dir: Path, hide: list[str]) -> dict:
    """Runs one file in one mode until every selected test has an outcome; returns them by node id."""
    rel, framework, extra = FILES[key]
    test_file = horovod_tests / rel
    results: dict[str, dict] = {}
    order: list[str] = []
    crashed_once: set[str] = set()
    launch = 0
    while True:
        launch += 1
        out_dir = Path(tempfile.mkdtemp(prefix=f"suite-{key}-"))
        cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo",
               str(VENV_BIN / "python"), "-m", "pytest", "-p", "tests.horovod_suite.inject",
               "-p", "no:cacheprovider", "-q", "-rN", "--rootdir", str(test_file.parent),
               f"--timeout={timeout}", "--timeout-method=thread", "-W", "ignore::DeprecationWarning"]
        if kexpr:
            cmd += ["-k", kexpr]
        cmd.append(str(test_file))
        env = _env(framework, extra, out_dir, select, sorted(results), density, options, horovod_tests,
                   hide)
        remaining = max(1, len(select["names"]) * 2 - len(results))
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=test_file.parent, env=env, capture_output=True, text=True,
                                  timeout=timeout * remaining + 300)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
                else (exc.stdout or "")
            rc = "timeout"
        mode = "plain" if density is None else f"d={density:g}"
        log = log_dir / f"{key}-{mode}-launch{launch}.log"
        log.write_text(f"$ {shlex.join(cmd)}\n# exit {rc} after {time.monotonic() - started:.0f}s\n"
                       + output)
        ranks = _read_events(out_dir, np)
        shutil.rmtree(out_dir, ignore_errors=True)

        for event in (e for r in ranks for e in r if e["event"] == "shims"):
            SHIMS.setdefault(key, set()).update(event["applied"])
        collected = next((e["nodeids"] for r in ranks for e in r if e["event"] == "collected"), None)
        if collected == [] and not results and not order:
            errors = [line for line in output.splitlines() if "E   " in line]
            reason = " ".join((errors[0].split("E   ", 1)[1] if errors else f"exit {rc}").split())
            return {name: {"outcome": "error (collection)", "reason": reason[:300], "injected": 0}
                    for name in select["names"]}
        if collected is not None:
            order += [n for n in collected if n not in order]
        done = [{e["nodeid"]: e for e in r if e["event"] == "done"} for r in ranks]
        starts = [[e["nodeid"] for e in r if e["event"] == "start"] for r in ranks]
        progress = False
        for nodeid in order:
            if nodeid in results:
                continue
            if all(nodeid in d for d in done):
                results[nodeid] = _combine([d[nodeid] for d in done])
                results[nodeid]["retried"] = nodeid in crashed_once
                progress = True
        # The first test some rank started and did not finish is the one that hung or crashed. It
        # gets one more try, first in a fresh job: Horovod's torch tests shut Horovod down after each
        # test and init it again in the next, and that re-init aborts now and then under Gloo on a
        # loaded machine, plain or not.
        unfinished = [n for n in order if n not in results and any(n in s for s in starts)]
        if unfinished:
            culprit = unfinished[0]
            reason = _crash_reason(output)
            if culprit not in crashed_once:
                crashed_once.add(culprit)
                console.print(f"    {_short(culprit)}: job ended during the test ({reason}); "
                              "running it again in a fresh job")
            else:
                results[culprit] = {
                    "outcome": "crash", "reason": f"job ended during the test, twice: {reason}",
                    "injected": max((d.get(culprit, {}).get("injected", 0) for d in done), default=0)}
            progress = True
        left = [n for n in order if n not in results]
        if collected is None and not results:
            raise RuntimeError(f"{key} ({mode}): the job collected nothing (exit {rc}); see {log}")
        if not left or not progress:
            for nodeid in left:
                results[nodeid] = {"outcome": "not run", "reason": f"launch ended (exit {rc})",
                                   "injected": 0}
            return {n: results[n] for n in order}


# ------------------------------------------------------------------------------------------ reports

CELL = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "crash": "CRASH", "not run": "not run"}


def _cell(result: dict | None, injected_mode: bool) -> str:
    if result is None:
        return "-"
    text = CELL.get(result["outcome"], result["outcome"].upper())
    if injected_mode and result["outcome"] != "skipped":
        text += f" ({result['injected']})"
    if result.get("retried"):
        text += " *"
    return text


def _short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def print_table(key: str, entry: dict) -> None:
    modes = entry["modes"]
    table = Table(title=f"{FILES[key][0]} ({len(entry['tests'])} tests)")
    table.add_column("test")
    for mode in modes:
        table.add_column(mode, justify="center")
    for nodeid in entry["tests"]:
        table.add_row(_short(nodeid), *[_cell(entry["results"][m].get(nodeid), m != "plain")
                                        for m in modes])
    console.print(table)
    console.print("  " + summary_line(entry))


def summary_line(entry: dict) -> str:
    parts = []
    for mode in entry["modes"]:
        res = entry["results"][mode].values()
        count = {o: sum(r["outcome"] == o for r in res) for o in ("passed", "failed", "skipped")}
        other = len(res) - sum(count.values())
        parts.append(f"{mode}: {count['passed']} pass, {count['failed']} fail, {count['skipped']} skip"
                     + (f", {other} crash/not run" if other else ""))
    return "; ".join(parts)


def regressions(entry: dict) -> list[tuple[str, str, dict]]:
    """(test, mode, result) for each test that passes plain and does not pass injected."""
    out = []
    plain = entry["results"].get("plain", {})
    for nodeid in entry["tests"]:
        if plain.get(nodeid, {}).get("outcome") not in PASSING:
            continue
        for mode in entry["modes"]:
            result = entry["results"][mode].get(nodeid)
            if mode != "plain" and result and result["outcome"] not in PASSING:
                out.append((nodeid, mode, result))
    return out


def _machine() -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import cpu_model

    return f"{platform.node()}, {os.cpu_count()} CPUs ({cpu_model()}), {platform.platform()}, no GPU used"


def _versions(framework_keys) -> str:
    code = ("import importlib.metadata as m\n"
            "out=[]\n"
            "for p in ['horovod','torch','tensorflow','tf_keras']:\n"
            "    try: out.append(f'{p} {m.version(p)}')\n"
            "    except Exception: pass\n"
            "print(', '.join(out))")
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True)
    return f"Python {platform.python_version()}, " + proc.stdout.strip()


def write_markdown(store: dict, path: Path) -> None:
    lines = ["# Horovod's own tests with RangerCompressor injected", "",
             "Generated by `tests/horovod_suite/run_suite.py` (do not edit by hand). Each of Horovod's",
             "test files runs under `horovodrun --gloo` plain and with `RangerCompressor` injected",
             "(`tests/horovod_suite/inject.py`) wherever a test builds `DistributedOptimizer`,",
             "`DistributedGradientTape`, `PartialDistributedGradientTape` or",
             "`PartialDistributedOptimizer` without compression. Selected: every test method that",
             "names one of those factories. A cell is the outcome on all ranks; in an injected column",
             "`(n)` is how many factory calls got the compressor in that test. CRASH: the job ended",
             "(hang past the per-test timeout, or a dead rank) while the test ran, in two jobs. `*`:",
             "the first job ended during the test and it ran again, first in a fresh job (Horovod's",
             "torch tests shut Horovod down after every test and init it again; that re-init aborts",
             "now and then under Gloo on a loaded machine, in plain runs as in injected ones).", ""]
    for key in FILES:
        entry = store.get(key)
        if entry is None:
            continue
        lines += [f"## `{FILES[key][0]}`", "",
                  f"- command: `{entry['command']}`", f"- date: {entry['date']}",
                  f"- machine: {entry['machine']}", f"- versions: {entry['versions']}",
                  f"- Horovod test source: {entry['source']}",
                  f"- compressor: `RangerCompressor(density=d, {entry['options']})`",
                  f"- per-test timeout: {entry['timeout']} s; wall time {entry['wall_s']:.0f} s"]
        if entry.get("shims"):
            lines.append("- compatibility shims in all runs (tf-keras is Keras 2, what Horovod 0.28.1 "
                         "targets; the standalone `keras` here is Keras 3): "
                         + "; ".join(f"`{s}`" for s in entry["shims"]))
        if entry.get("hidden"):
            lines.append(f"- hidden from the tests' sweeps over every `torch.optim` optimizer, in all "
                         f"runs: {', '.join(entry['hidden'])} (newer than Horovod's tests; Muon "
                         "refuses 1-D parameters)")
        lines += ["",
                  "| test | " + " | ".join(entry["modes"]) + " |",
                  "| --- |" + " --- |" * len(entry["modes"])]
        for nodeid in entry["tests"]:
            cells = [_cell(entry["results"][m].get(nodeid), m != "plain") for m in entry["modes"]]
            lines.append(f"| `{_short(nodeid)}` | " + " | ".join(cells) + " |")
        lines += ["", f"Summary: {summary_line(entry)}.", ""]
        regs = regressions(entry)
        if regs:
            lines += ["Passes plain, fails injected:", ""]
            for nodeid, mode, result in regs:
                lines.append(f"- `{_short(nodeid)}` ({mode}, {result['outcome']}): {result['reason']}")
        else:
            lines.append("Every test that passes plain passes injected.")
        skipped = [(n, r) for n, r in entry["results"].get("plain", {}).items()
                   if r["outcome"] == "skipped"]
        if skipped:
            lines += ["", "Skipped plain (and so not judged):", ""]
            lines += [f"- `{_short(n)}`: {r['reason']}" for n, r in skipped]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------- main

def _parse_options(items: list[str]) -> dict:
    options = dict(DEFAULT_OPTIONS)
    for item in items:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value not in ("",) else True
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horovod-tests", required=True, type=Path,
                        help="folder holding Horovod's test/parallel and test/utils")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--density", type=float, nargs="+", default=[1.0, 0.01])
    parser.add_argument("--files", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument("-k", dest="kexpr", help="pytest -k expression narrowing the selection")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help=f"RangerCompressor option (default {DEFAULT_OPTIONS}; "
                             "min_elements=1024 compress_1d=false gives the library defaults)")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout in seconds")
    parser.add_argument("--hide-torch-optimizer", nargs="*", default=["Muon"], metavar="NAME",
                        help="torch.optim classes newer than Horovod's tests, kept out of their "
                             "sweeps over every optimizer in plain and injected runs (default Muon)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain run")
    parser.add_argument("--results", type=Path, default=RESULTS_MD,
                        help="markdown results (a .json of the same name keeps every file's results)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    horovod_tests = args.horovod_tests.resolve()
    options = _parse_options(args.option)
    store_path = args.results.with_suffix(".json")
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    log_dir = Path(tempfile.mkdtemp(prefix="horovod-suite-logs-"))
    command = "python -m tests.horovod_suite.run_suite " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    source = (horovod_tests / "PROVENANCE.txt")
    source = ("; ".join(line.strip() for line in source.read_text().splitlines() if line.strip())
              if source.exists() else f"Horovod test files in {horovod_tests}")
    console.print(f"logs: {log_dir}")

    exit_code = 0
    for key in args.files:
        path = horovod_tests / FILES[key][0]
        if not path.exists():
            console.print(f"[red]{path} is missing[/red]")
            return 2
        select = select_tests(path)
        console.print(f"[bold]{FILES[key][0]}[/bold]: {len(select['names'])} test functions "
                      f"selected: {', '.join(select['names'])}")
        modes = ([] if args.no_plain else [None]) + list(args.density)
        started = time.monotonic()
        entry = {"command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": _machine(), "versions": _versions([key]), "source": source,
                 "options": ", ".join(f"{k}={v!r}" for k, v in options.items()),
                 "timeout": args.timeout, "modes": [], "results": {}, "tests": [],
                 "hidden": args.hide_torch_optimizer if FILES[key][1] == "torch" else []}
        for density in modes:
            mode = "plain" if density is None else f"d={density:g}"
            t0 = time.monotonic()
            results = run_mode(key, horovod_tests, select, args.np, density, options, args.kexpr,
                               args.timeout, log_dir, args.hide_torch_optimizer)
            console.print(f"  {mode}: {len(results)} tests in {time.monotonic() - t0:.0f} s")
            entry["modes"].append(mode)
            entry["results"][mode] = results
            entry["tests"] += [n for n in results if n not in entry["tests"]]
        entry["wall_s"] = time.monotonic() - started
        entry["shims"] = sorted(SHIMS.get(key, ()))
        print_table(key, entry)
        for nodeid, mode, result in regressions(entry):
            console.print(f"  [red]passes plain, fails {mode}[/red]: {_short(nodeid)}: "
                          f"{result['outcome']}: {result['reason']}")
            exit_code = 1
        store[key] = entry
        if not args.no_write:
            store_path.parent.mkdir(parents=True, exist_ok=True)
            store_path.write_text(json.dumps(store, indent=1) + "\n")
            write_markdown(store, args.results)
    if not args.no_write:
        console.print(f"wrote {args.results} and {store_path}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
