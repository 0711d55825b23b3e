#!/usr/bin/env bash
# The test command: sets up .venv (seconds when it exists) and runs the whole test suite.
# Extra arguments go to pytest, e.g. launch/test.sh tests/torch -x
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TF_CPP_MIN_LOG_LEVEL=2
# The 15 slowest tests are listed at the end: the suite is meant to stay under 20 minutes on 2 cores.
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
