"""A user command for tests/launcher/test_user_command.py (no framework import: starts in a second).

Every rank writes the arguments after the mode to RUN_DIR/argv.rank{R}.json.  ``argv``: then exits 0,
logging nothing.
``restart``: logs steps 1-3 and saves RUN_DIR/checkpoints/rank{R}.json, writes its pid to RUN_DIR/pid.rank{R}
and waits to be killed; a resumed start (RANGER_HVD_RESUME=1) loads the checkpoint, logs steps 4-6 and
exits 0.
"""

import json
import os
import sys
import time

import ranger_hvd.run as run

mode, rank = sys.argv[1], run.this_rank()
base = run.run_dir()
(base / f"argv.rank{rank}.json").write_text(json.dumps(sys.argv[2:]))
if mode == "argv":
    sys.exit(0)

ckpt = run.checkpoint_dir() / f"rank{rank}.json"
if run.resumed():
    first = json.loads(ckpt.read_text())["step"] + 1
    (base / f"resumed.rank{rank}").write_text(str(first))
    for step in range(first, first + 3):
        run.log(step, epoch=1, loss=1.0 / step, accuracy=step / 10)
    sys.exit(0)
for step in range(1, 4):
    run.log(step, epoch=0, loss=1.0 / step, accuracy=step / 10)
run.log(4, epoch=0, loss=0.25, accuracy=0.4)    # after the checkpoint: the restart drops it
ckpt.write_text(json.dumps({"step": 3}))
(base / f"pid.rank{rank}").write_text(str(os.getpid()))
time.sleep(60)                                  # until the test kills rank 1
sys.exit(3)
