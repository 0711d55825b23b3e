#!/usr/bin/env bash
# The run command: sets up .venv (seconds when it exists) and runs the main job, the default reference
# job (configs/cnn-digits.yaml: a PyTorch CNN on the offline digits data, 2 workers, Ranger compression).
# Extra arguments are dotted overrides or flags for `ranger-hvd launch`, e.g. train.epochs=2 --dry-run
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
exec "$root/.venv/bin/ranger-hvd" launch "$root/configs/cnn-digits.yaml" "$@"
