#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in ./.venv and installs mxq into it with
# everything the tests, tools and the demo need. torch is installed first, pinned: that version is
# the CPU build available offline on our machines (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MXQ_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
