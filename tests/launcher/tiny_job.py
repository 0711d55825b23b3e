"""A tiny stand-in for ``ranger_hvd.jobs`` used by the launcher tests (``job.entry: tests.launcher.tiny_job``).

Follows the jobs contract: ``--config RUN_DIR/config.yaml --run-dir RUN_DIR``; rank 0 appends step lines
to ``RUN_DIR/metrics.jsonl`` and one ``{"event": "end"}`` line; every rank prints to stdout/stderr; a
failure exits non-zero.  Each rank writes its pid to ``RUN_DIR/pids/rank.N`` so tests can check that
no worker outlives the launcher.  Behaviour for tests comes from environment variables, which reach
the ranks only through ``cluster.env`` (so they also check the environment plumbing):

  TINY_STEPS        steps per epoch (default 3)
  TINY_SLEEP        seconds per step (default 0)
  TINY_CRASH_RANK   this rank raises at step TINY_CRASH_STEP (default 2) and exits 3
  TINY_IGNORE_TERM  this rank (or "all") ignores SIGTERM, so only SIGKILL stops it
  TINY_EXPECT_ENV   comma-separated NAMES this job checks for; rank 0 records the whole environment
"""

import argparse
import json
import os
import signal
import sys
import time

import yaml


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    size = int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    cfg = yaml.safe_load(open(args.config))
    epochs = int(cfg["train"]["epochs"])
    steps = int(os.environ.get("TINY_STEPS", "3"))
    sleep = float(os.environ.get("TINY_SLEEP", "0"))
    crash_rank = os.environ.get("TINY_CRASH_RANK")
    crash_step = int(os.environ.get("TINY_CRASH_STEP", "2"))
    ignore = os.environ.get("TINY_IGNORE_TERM")
    if ignore is not None and ignore in ("all", str(rank)):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    os.makedirs(os.path.join(args.run_dir, "pids"), exist_ok=True)
    with open(os.path.join(args.run_dir, "pids", f"rank.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    print(f"tiny job rank {rank}/{size} pid {os.getpid()} starting", flush=True)
    print(f"tiny job rank {rank} stderr hello", file=sys.stderr, flush=True)
    if rank == 0:
        with open(os.path.join(args.run_dir, "env.json"), "w") as f:
            json.dump(dict(os.environ), f)

    density = (cfg.get("compression") or {}).get("density") or 1.0
    start = time.time()
    out = open(os.path.join(args.run_dir, "metrics.jsonl"), "a") if rank == 0 else None
    step = 0
    for epoch in range(epochs):
        for _ in range(steps):
            step += 1
            if crash_rank is not None and int(crash_rank) == rank and step == crash_step:
                print(f"tiny job rank {rank}: about to fail at step {step}", file=sys.stderr, flush=True)
                raise SystemExit(3)
            t0 = time.time()
            time.sleep(sleep)
            loss = 1.0 / (step + 1) + density
            if out:
                out.write(json.dumps({"step": step, "epoch": epoch, "loss": loss,
                                      "metrics": {"accuracy": 1.0 - loss / 2},
                                      "bytes_sent": int(1000 * density * 100), "step_time": time.time() - t0,
                                      "time": time.time() - start}) + "\n")
                out.flush()
    if out:
        out.write(json.dumps({"event": "end", "steps": step, "time": time.time() - start, "size": size,
                              "metrics": {"eval_accuracy": 0.5}}) + "\n")
        out.close()
    print(f"tiny job rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
