"""Runs several reference jobs in one ``horovodrun`` launch (process start and imports are the slow part).

Usage: ``python tests/jobs/multi_worker.py JOBS.json`` where JOBS.json is ``[{"config": {...},
"run_dir": "...", "resume": false}, ...]``; each rank runs ``ranger_hvd.jobs.run_job`` on every entry in
order (``resume`` optional: continue from the run directory's checkpoints).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ranger_hvd.jobs import run_job  # noqa: E402

for entry in json.loads(Path(sys.argv[1]).read_text()):
    run_job(entry["config"], entry["run_dir"], resume=entry.get("resume", False))
