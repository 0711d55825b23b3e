"""``ranger-hvd``: launch, validate, show, sweep, report and doctor.

Exit status: 0 success, 2 any config or usage error (nothing is created then), 1 the job failed
(128+N when stopped by signal N).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console

from ranger_hvd.launcher.run.command import default_command
from ranger_hvd.config import ConfigError, Resolved, load_config, show_text
from ranger_hvd.config.problems import problem_lines
from ranger_hvd.launcher.run.launch import launch_one, planned_abs_run_dir, resume_problem
from ranger_hvd.launcher.run.preflight import PreflightError
from ranger_hvd.launcher.run.rundir import RunDirError
from ranger_hvd.rundir import layout

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
    for line in problem_lines(exc.problems):
        err.out(f"  {line}", highlight=False)
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


# --------------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    res = _load(args)
    _warn(res)
    el = res.config.cluster.elastic
    hosts = ",".join(f"{h}:{s}" for h, s in res.hosts) or (
        "the hosts of the discovery script" if el is not None else "a Slurm allocation")
    ranks = f"{res.np} ranks" + ("" if el is None else f" (elastic: {el.min_np} to {el.max_np or 'all slots'})")
    job = res.config.job
    what = (f"{job.backend} command {shlex.join(job.command)}" if job.command
            else f"{job.backend}/{job.model} on {res.config.data.dataset}")
    how = "torchrun + DDP" if res.config.cluster.runner == "torchrun" else res.config.cluster.controller
    print(f"ok: {args.config} is valid (job {res.job_name}: {what}, {ranks} on {hosts}, {how}, "
          f"compression {res.config.compression.type})")
    for reason in dict.fromkeys(o.reason for o in res.inactive):   # one line per reason, in order
        print(f"inactive ({reason}), left out of the run's config: "
              + ", ".join(f"{o.path}={o.value}" for o in res.inactive if o.reason == reason))
    return EXIT_OK


def cmd_show(args) -> int:
    res = _load(args)
    _warn(res)
    title = f"{args.config}" + (f" with overrides: {' '.join(args.overrides)}" if args.overrides else "")
    sys.stdout.write(show_text(res, title))
    return EXIT_OK


def _dry_run(res: Resolved, out=None) -> None:
    out = out or sys.stdout
    run_dir = planned_abs_run_dir(res)
    cmd = default_command(res, str(run_dir))
    out.write(cmd.text())
    out.write(f"# run directory (created by a real launch, not by --dry-run): {run_dir}\n")
    _dry_run_elastic(res, run_dir, out)
    out.flush()


def _dry_run_elastic(res: Resolved, run_dir: Path, out) -> None:
    """The discovery files a real launch writes, in elastic mode."""
    from ranger_hvd.launcher.run.elastic import discovery_script, hosts_file, hosts_text

    el = res.config.cluster.elastic
    if el is None or el.discovery_script is not None:
        return
    out.write(f"# elastic: {discovery_script(res, run_dir)} prints the hosts listed in {hosts_file(run_dir)}:\n")
    out.write("".join(f"#   {line}\n" for line in hosts_text(res).splitlines() if not line.startswith("#")))


def _dry_run_resume(res: Resolved, run_dir: Path, out=None) -> None:
    out = out or sys.stdout
    out.write(default_command(res, str(run_dir), resume=True).text())
    out.write(f"# resumes in {run_dir} (--dry-run changes nothing there)\n")
    _dry_run_elastic(res, run_dir, out)
    out.flush()


def _preflight_failed(exc: PreflightError) -> int:
    _err_console().out(f"error: {exc}", highlight=False)   # host names and paths, no rich markup
    return EXIT_USAGE


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
        problem = resume_problem(resume_dir)
        if problem:
            return _usage_error(f"cannot resume: {problem}")
        res = load_config(resume_dir / layout.CONFIG, args.overrides)
    elif args.config is None:
        # as argparse does for a missing positional: usage and message on stderr, SystemExit(2)
        args.launch_parser.error("the following arguments are required: CONFIG (or --resume RUN_DIR)")
    else:
        res = _load(args)
    _warn(res)
    if res.config.cluster.scheduler == "slurm":
        from ranger_hvd.launcher.slurm.cli import launch_slurm

        return launch_slurm(res, dry_run=args.dry_run, wait=args.wait, resume_dir=resume_dir,
                            out=_out_console(), err=_err_console())
    if args.dry_run:
        if resume_dir is not None:
            _dry_run_resume(res, resume_dir)
        else:
            _dry_run(res)
        return EXIT_OK
    console = _out_console()
    # launch_one writes config.yaml (overrides applied) once the preflight passed
    try:
        result = launch_one(res, console, stream=args.stream, live=False if args.no_live else None,
                            resume_dir=resume_dir)
    except PreflightError as exc:
        return _preflight_failed(exc)
    if result is None:
        return EXIT_FAILED
    return result.exit_code


def cmd_sweep(args) -> int:
    from ranger_hvd.launcher.compare.sweep import parse_axes, resolve_combinations, run_sweep

    try:
        axes = parse_axes(args.axes)
        if not axes:
            raise ConfigError([])
        combos, resolved = resolve_combinations(args.config, axes)
    except ConfigError as exc:
        return _print_config_error(exc, "invalid sweep" if exc.problems else "a sweep needs at least one KEY=V1,V2")
    seen: set[str] = set()
    for combo, res in zip(combos, resolved):   # each warning once; tagged when only some runs have it
        everywhere = [w for w in res.warnings if all(w in r.warnings for r in resolved)]
        for w in res.warnings:
            if w not in seen:
                seen.add(w)
                _err_console().print(f"[yellow]warning:[/] {w}" + ("" if w in everywhere else f" [{' '.join(combo)}]"),
                                     highlight=False)
    if any(res.config.cluster.scheduler == "slurm" for res in resolved):
        return _usage_error("sweep runs its combinations here, one after the other: with cluster.scheduler "
                            "slurm submit each one with ranger-hvd launch instead")
    if args.dry_run:
        for combo, res in zip(combos, resolved):
            print(f"# {' '.join(combo)}")
            _dry_run(res)
        return EXIT_OK
    try:
        return run_sweep(args.config, axes, combos, resolved, launch_one, _out_console(), stream=args.stream,
                         live=False if args.no_live else None)
    except PreflightError as exc:
        return _preflight_failed(exc)


def cmd_report(args) -> int:
    from ranger_hvd.launcher.compare.report import ReportError, make_report

    try:
        make_report([Path(p) for p in args.run_dirs], out_dir=Path(args.out) if args.out else None,
                    console=_out_console())
    except ReportError as exc:
        _err_console().print(f"[red]ranger-hvd report:[/] {exc}", highlight=False)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_status(args) -> int:
    from ranger_hvd.launcher.slurm.cli import cmd_status

    return cmd_status(args)


def cmd_doctor(args) -> int:
    try:
        from ranger_hvd import doctor  # imported only for this command
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
                    help="continue the run in RUN_DIR from its latest complete checkpoint set: RUN_DIR/config.yaml "
                         "is the base config (overrides such as train.epochs=N apply on top), metrics.jsonl "
                         "is appended to, summary.json rewritten")
    sp.add_argument("--dry-run", action="store_true", help="print the horovodrun command and its environment; "
                                                           "start nothing, create nothing")
    sp.add_argument("--stream", action="store_true", help="show the ranks' output instead of the progress table")
    sp.add_argument("--no-live", action="store_true", help="plain progress lines instead of a live table")
    sp.add_argument("--wait", action="store_true", help="cluster.scheduler slurm: follow the submitted job until "
                                                        "it ends and exit with its status")
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
                                                 "for one run, output.dir/_reports/<timestamp> for several)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("status", help="state of runs: the Slurm job (for cluster.scheduler slurm), status, progress")
    sp.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    sp.set_defaults(func=_cmd_status)

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
    except RunDirError as exc:   # output.dir checked out, yet mkdir failed (a read-only or full file system)
        return _usage_error(f"output.dir: {exc} (nothing was created)")
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
