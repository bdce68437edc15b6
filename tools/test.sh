#!/usr/bin/env bash
# Set up the environment and run the whole test suite, fast and slow (real-model) tiers: what CI runs.
# A plain `python -m pytest` runs the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV="${MXQ_VENV:-.venv}"
started=$(date +%s)
status=0
"$VENV/bin/python" -m pytest -q -m "slow or not slow" "$@" || status=$?
echo "test suite: $(( $(date +%s) - started )) s"
exit $status
