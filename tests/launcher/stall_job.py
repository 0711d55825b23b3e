"""A job whose ranks call different collectives (``job.entry: tests.launcher.stall_job``), as a bug in a
training script would: rank 0 allreduces a tensor named ``test.mismatch.rank0``, every other rank one
named ``test.mismatch.other``. Without Horovod's stall shutdown they would wait for each other forever.
Each rank writes its pid to ``RUN_DIR/pids/rank.N``."""

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank = hvd.rank()
    os.makedirs(os.path.join(args.run_dir, "pids"), exist_ok=True)
    with open(os.path.join(args.run_dir, "pids", f"rank.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    hvd.allreduce(torch.ones(3), name="test.agreed")           # every rank meets here
    print(f"stall job rank {rank}: past the agreed collective", flush=True)
    name = "test.mismatch.rank0" if rank == 0 else "test.mismatch.other"
    hvd.allreduce(torch.ones(3), name=name)
    print(f"stall job rank {rank}: the mismatched collective returned", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
