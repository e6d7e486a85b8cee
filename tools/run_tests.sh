#!/usr/bin/env bash
# Install what is needed (tools/setup_env.sh), then run the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow"`; the 15 slowest tests are listed at
# the end (to keep the suite inside its 20-minute budget).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
