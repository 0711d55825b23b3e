"""``python -m ranger_hvd.jobs --config RUN_DIR/config.yaml --run-dir RUN_DIR [--resume]`` (every rank)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranger_hvd.jobs",
                                     description="Run a ranger_hvd reference job on this rank.")
    parser.add_argument("--config", required=True, help="resolved config YAML (the launcher's config.yaml)")
    parser.add_argument("--run-dir", default=None,
                        help="where rank 0 writes metrics.jsonl (default: the config's directory)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint set under RUN_DIR/checkpoints")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.config))

    from ranger_hvd.jobs.ddp import under_torchrun, write_own_rank_logs

    if under_torchrun():   # cluster.runner torchrun: RUN_DIR/logs/rank.N/ as under horovodrun's Gloo
        write_own_rank_logs(run_dir)

    from ranger_hvd.jobs import ConfigError, DataError, run_config_file
    from ranger_hvd.rundir.checkpoint import CheckpointError

    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    try:
        run_config_file(args.config, run_dir, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"ranger_hvd.jobs (rank {rank}): error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"ranger_hvd.jobs (rank {rank}): interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as exc:  # noqa: BLE001 - any failure must give a non-zero exit
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return 0
        traceback.print_exc()
        print(f"ranger_hvd.jobs (rank {rank}): failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    from ranger_hvd.jobs.ddp import exit_without_teardown, under_torchrun

    if under_torchrun():
        exit_without_teardown(code)
    sys.exit(code)
