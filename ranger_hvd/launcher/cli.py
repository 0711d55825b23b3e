"""``ranger-hvd``: launch, validate, show, sweep, report and doctor.

Exit status: 0 success, 2 any config or usage error (nothing is created then), 1 the job failed
(128+N when stopped by signal N).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from .command import LaunchCommand, default_command
from .config import ConfigError, Resolved, load_config, show_lines
from .rundir import create_run_dir, planned_run_dir, write_command, write_config, write_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out_console() -> Console:
    """stdout; tables keep their columns when piped or logged (no 80-column squeeze)."""
    c = Console(highlight=False, soft_wrap=True)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = 160
    return c


def _print_config_error(exc: ConfigError, what: str = "invalid config") -> int:
    err = _err_console()
    n = len(exc.problems)
    err.print(f"[bold red]ranger-hvd: {what}[/] ({n} problem{'s' if n != 1 else ''}):", highlight=False)
    for p in exc.problems:
        err.out(f"  {p}", highlight=False)
    return EXIT_USAGE


def _usage_error(msg: str) -> int:
    _err_console().print(f"[bold red]ranger-hvd:[/] {msg}", highlight=False)
    return EXIT_USAGE


def _load(args) -> Resolved:
    return load_config(args.config, args.overrides)


def _warn(res: Resolved) -> None:
    if res.warnings:
        err = _err_console()
        for w in res.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)


def _abs_run_dir(res: Resolved, now: Optional[float] = None) -> Path:
    return planned_run_dir(res, now).absolute()


def _horovodrun_path(cmd: LaunchCommand) -> Optional[str]:
    return shutil.which(cmd.argv[0], path=cmd.env.get("PATH"))


# --------------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    res = _load(args)
    _warn(res)
    hosts = ",".join(f"{h}:{s}" for h, s in res.hosts)
    print(f"ok: {args.config} is valid (job {res.job_name}: {res.config.job.backend}/{res.config.job.model} on "
          f"{res.config.data.dataset}, {res.np} ranks on {hosts}, {res.config.cluster.controller}, "
          f"compression {res.config.compression.type})")
    return EXIT_OK


def cmd_show(args) -> int:
    res = _load(args)
    _warn(res)
    lines = show_lines(res)
    width = max(len(p) + len(v) for p, v, _ in lines) + 2
    print(f"# {args.config}" + (f" with overrides: {' '.join(args.overrides)}" if args.overrides else ""))
    print("# value  # source (default < file < override)")
    for path, value, source in lines:
        left = f"{path}: {value}"
        print(f"{left.ljust(width)}  # {source}")
    return EXIT_OK


def _dry_run(res: Resolved, out=sys.stdout) -> None:
    run_dir = _abs_run_dir(res)
    cmd = default_command(res, str(run_dir))
    out.write(cmd.text())
    out.write(f"# run directory (created by a real launch, not by --dry-run): {run_dir}\n")
    out.flush()


def launch_one(res: Resolved, console: Console, *, stream: bool = False, live: Optional[bool] = None,
               resume_dir: Optional[Path] = None):
    """Creates the run directory (or reuses ``resume_dir``, passing ``--resume`` to the job) and runs the
    job; returns a RunResult (or None if it could not start)."""
    from .supervisor import RunResult, Supervisor

    resume = resume_dir is not None
    probe = default_command(res, str(resume_dir.resolve() if resume else _abs_run_dir(res)), resume=resume)
    if _horovodrun_path(probe) is None:
        console.print(f"[red]error:[/] horovodrun not found on PATH ({probe.env.get('PATH')}); "
                      f"build the environment with launch/setup.sh (see ranger-hvd doctor)", highlight=False)
        return None
    run_dir = resume_dir.resolve() if resume else create_run_dir(res).resolve()
    cmd = default_command(res, str(run_dir), resume=resume)
    write_config(run_dir, res)
    write_command(run_dir, cmd)
    for name in cmd.missing_env:
        console.print(f"[yellow]warning:[/] cluster.env: {name} is not set here, so the ranks do not get it",
                      highlight=False)
    exe = _horovodrun_path(cmd)
    runnable = LaunchCommand(argv=[exe, *cmd.argv[1:]], env=cmd.env, missing_env=cmd.missing_env)
    sup = Supervisor(res, runnable, run_dir, console=console, live=live, stream=stream, resume=resume)
    result: RunResult = sup.run()
    return result


def _resume_problem(run_dir: Path) -> Optional[str]:
    """Why RUN_DIR cannot be resumed (None if it can): it needs config.yaml and checkpoints/rank*.pt."""
    if not run_dir.is_dir():
        return f"{run_dir} is not a directory"
    if not (run_dir / "config.yaml").is_file():
        return f"{run_dir} has no config.yaml (not a run directory of ranger-hvd launch)"
    if not any((run_dir / "checkpoints").glob("rank*.pt")):
        return (f"{run_dir} has no checkpoints/rank*.pt (the run wrote no checkpoint: train.checkpoint false, "
                f"TensorFlow backend, or it stopped before its first epoch ended)")
    return None


def _dry_run_resume(res: Resolved, run_dir: Path, out=sys.stdout) -> None:
    out.write(default_command(res, str(run_dir), resume=True).text())
    out.write(f"# resumes in {run_dir} (--dry-run changes nothing there)\n")
    out.flush()


def cmd_launch(args) -> int:
    resume_dir = None
    if args.resume is not None:
        # `launch --resume RUN_DIR k=v ...`: the first override lands in CONFIG; there is no CONFIG then
        if args.config is not None:
            if "=" not in args.config:
                return _usage_error(f"launch --resume uses RUN_DIR/config.yaml: drop the CONFIG argument "
                                    f"{args.config!r}")
            args.overrides.insert(0, args.config)
        resume_dir = Path(args.resume).absolute()
        problem = _resume_problem(resume_dir)
        if problem:
            return _usage_error(f"cannot resume: {problem}")
        res = load_config(resume_dir / "config.yaml", args.overrides)
        if res.config.job.backend != "torch":
            return _usage_error(f"cannot resume: resume is only supported for the torch backend "
                                f"(job.backend is {res.config.job.backend})")
    elif args.config is None:
        # as argparse does for a missing positional: usage and message on stderr, SystemExit(2)
        args.launch_parser.error("the following arguments are required: CONFIG (or --resume RUN_DIR)")
    else:
        res = _load(args)
    _warn(res)
    if args.dry_run:
        if resume_dir is not None:
            _dry_run_resume(res, resume_dir)
        else:
            _dry_run(res)
        return EXIT_OK
    console = _out_console()
    if resume_dir is not None:
        write_config(resume_dir, res)   # the config this continuation runs with (overrides applied)
    result = launch_one(res, console, stream=args.stream, live=False if args.no_live else None,
                        resume_dir=resume_dir)
    if result is None:
        return EXIT_FAILED
    return result.exit_code


def cmd_sweep(args) -> int:
    from .report import make_report
    from .sweep import combinations, parse_axes

    try:
        axes = parse_axes(args.axes)
    except ConfigError as exc:
        return _print_config_error(exc, "invalid sweep")
    if not axes:
        return _print_config_error(ConfigError([]), "a sweep needs at least one KEY=V1,V2")
    combos = combinations(axes)
    resolved: list[Resolved] = []
    problems = []
    for combo in combos:
        try:
            resolved.append(load_config(args.config, combo))
        except ConfigError as exc:
            for p in exc.problems:
                p.where = (p.where + " " if p.where else "") + f"[{' '.join(combo)}]"
            problems.extend(exc.problems)
    if problems:
        return _print_config_error(ConfigError(problems), "invalid sweep")
    for res in resolved[:1]:
        _warn(res)
    if args.dry_run:
        for combo, res in zip(combos, resolved):
            print(f"# {' '.join(combo)}")
            _dry_run(res)
        return EXIT_OK

    console = _out_console()
    results = []
    interrupted = False
    for i, (combo, res) in enumerate(zip(combos, resolved), 1):
        console.rule(f"sweep run {i}/{len(combos)}: {' '.join(combo)}")
        result = launch_one(res, console, stream=args.stream, live=False if args.no_live else None)
        if result is None:
            return EXIT_FAILED
        results.append((combo, result))
        if result.status == "interrupted":
            interrupted = True
            break

    # comparison: the swept values, status and final numbers
    t = Table(title=f"sweep over {', '.join(a.key for a in axes)}")
    for a in axes:
        t.add_column(a.key)
    for col in ("status", "steps", "final loss", "final metrics", "bytes total", "duration", "run directory"):
        t.add_column(col)
    from .supervisor import _fmt, fmt_bytes

    for combo, r in results:
        s = r.summary
        t.add_row(*[c.split("=", 1)[1] for c in combo], s["status"], str(s.get("steps", "-")),
                  _fmt(s["final_loss"]) if s.get("final_loss") is not None else "-",
                  ", ".join(f"{k}={_fmt(v)}" for k, v in (s.get("final_metrics") or {}).items()) or "-",
                  fmt_bytes(s.get("bytes_sent_total")), f"{s['duration_s']:.1f}s", str(r.run_dir))
    console.print(t)
    first = resolved[0]
    sweep_dir = Path(first.config.output.dir) / first.job_name / ("sweep-" + time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while sweep_dir.exists():
        n += 1
        sweep_dir = sweep_dir.with_name(sweep_dir.name.split("~")[0] + f"~{n}")
    sweep_dir.mkdir(parents=True)
    write_json(sweep_dir / "sweep.json", {
        "config": str(args.config), "axes": {a.key: a.values for a in axes},
        "runs": [{"overrides": combo, "run_dir": str(r.run_dir), "status": r.status, "exit_code": r.exit_code}
                 for combo, r in results]})
    make_report([r.run_dir for _, r in results], out_dir=sweep_dir, console=console,
                title="sweep report")
    if interrupted:
        return results[-1][1].exit_code
    return EXIT_OK if all(r.status == "success" for _, r in results) else EXIT_FAILED


def cmd_report(args) -> int:
    from .report import ReportError, make_report

    try:
        make_report([Path(p) for p in args.run_dirs], out_dir=Path(args.out) if args.out else None,
                    console=_out_console())
    except ReportError as exc:
        _err_console().print(f"[red]ranger-hvd report:[/] {exc}", highlight=False)
        return EXIT_USAGE
    return EXIT_OK


def cmd_doctor(args) -> int:
    try:
        from ranger_hvd import doctor  # written by the project lead; imported lazily
    except ImportError as exc:
        _err_console().print(f"[red]ranger-hvd doctor is not available:[/] {exc}", highlight=False)
        return EXIT_FAILED
    return int(doctor.main(list(args.doctor_args)) or 0)


# --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: usage + message, exit 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ranger-hvd", description="Run ranger_hvd experiments described in YAML with horovodrun.",
                epilog="Exit status: 0 success, 2 config or usage error, 1 job failure. See docs/launcher.md.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add_config(sp, overrides_help="dotted overrides such as compression.density=0.001 cluster.np=4"):
        sp.add_argument("config", metavar="CONFIG", help="experiment YAML")
        sp.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help=overrides_help)

    sp = sub.add_parser("launch", help="start a run (or continue one with --resume RUN_DIR)")
    sp.add_argument("config", metavar="CONFIG", nargs="?", help="experiment YAML (omitted with --resume)")
    sp.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                    help="dotted overrides such as compression.density=0.001 cluster.np=4")
    sp.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue the run in RUN_DIR from its checkpoints (torch jobs): RUN_DIR/config.yaml "
                         "is the base config (overrides such as train.epochs=N apply on top), metrics.jsonl "
                         "is appended to, summary.json rewritten")
    sp.add_argument("--dry-run", action="store_true", help="print the horovodrun command and its environment; "
                                                           "start nothing, create nothing")
    sp.add_argument("--stream", action="store_true", help="show the ranks' output instead of the progress table")
    sp.add_argument("--no-live", action="store_true", help="plain progress lines instead of a live table")
    sp.set_defaults(func=cmd_launch, launch_parser=sp)

    sp = sub.add_parser("validate", help="check a config (and overrides) only")
    add_config(sp)
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("show", help="print the resolved config, each value with its source")
    add_config(sp)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("sweep", help="one run per combination of values, then a comparison")
    sp.add_argument("config", metavar="CONFIG")
    sp.add_argument("axes", metavar="KEY=V1,V2", nargs="*", help="values to sweep (KEY=V is a fixed override)")
    sp.add_argument("--dry-run", action="store_true", help="print each combination's command only")
    sp.add_argument("--stream", action="store_true")
    sp.add_argument("--no-live", action="store_true")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("report", help="table and PNG plots comparing runs")
    sp.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    sp.add_argument("--out", metavar="DIR", help="where to write the PNGs and tables (default: RUN_DIR/report "
                                                 "of the first run)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("doctor", help="check the environment (Horovod build, frameworks, MPI)", add_help=False)
    sp.add_argument("doctor_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_doctor)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # everything after 'doctor' belongs to it (its own --help, --json)
        return cmd_doctor(argparse.Namespace(doctor_args=argv[1:]))
    parser = build_parser()
    # KEY=VALUE items may come after options (`launch cfg.yaml --dry-run a.b=1`): argparse leaves those
    # unparsed, so collect them here; anything else unknown is a usage error (exit 2)
    args, extra = parser.parse_known_args(argv)
    target = "overrides" if hasattr(args, "overrides") else "axes" if hasattr(args, "axes") else None
    if extra:
        if target is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, target).extend(extra)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _print_config_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `ranger-hvd show ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
