#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV="${MXQ_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
