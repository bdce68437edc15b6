#!/usr/bin/env bash
# Set up the environment and run the whole test suite, fast and slow (real-model) tiers: what CI runs.
# A plain `python -m pytest` runs the fast tier only; the few `heavy` tests run with `python -m pytest -m heavy`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV="${MXQ_VENV:-.venv}"
started=$(date +%s)
status=0
"$VENV/bin/python" -m pytest -q -m "not heavy" --durations=25 "$@" || status=$?  # both tiers; `-m heavy` runs the rest
echo "test suite: $(( $(date +%s) - started )) s"
exit $status
