#!/bin/bash
# Each lever of issue 14 on the SmolLM2 fixture: convert (timed) and evaluate (WikiText-2 test, ctx 2048,
# first 16 chunks), one conversion at a time.   usage: tools/gptq_levers.sh OUTDIR BPW [BPW ...]
set -e
OUT=$1; shift
FIXTURE=$(python "$(dirname "$0")/fixtures.py" smollm2)
TEXT=${MXQ_EVAL_TEXT:-$(dirname "$0")/../../shared/data/wikitext2-test.txt}
mkdir -p "$OUT"
for BPW in "$@"; do
  for METHOD in "default:" "gptq:--quantizer gptq" "rotate:--rotate" "rotgptq:--rotate --quantizer gptq"; do
    NAME=${METHOD%%:*}; FLAGS=${METHOD#*:}
    START=$(date +%s)
    mxq convert "$FIXTURE" -o "$OUT/$NAME-$BPW.mxq" --bpw "$BPW" -q $FLAGS > "$OUT/$NAME-$BPW.log"
    echo "$NAME $BPW convert_seconds $(( $(date +%s) - START ))" | tee -a "$OUT/$NAME-$BPW.log"
    mxq eval "$OUT/$NAME-$BPW.mxq" --text "$TEXT" --ctx 2048 --max-chunks 16 --no-progress --cache-dequantized | tee -a "$OUT/$NAME-$BPW.log"
  done
done
