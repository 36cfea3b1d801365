#!/usr/bin/env bash
# docs/mixture.md's study (two tasks, one adapter each, a router over both) through the command line alone:
# the same rows, adapters (r 8, alpha 16, the 7 projections of the top 10 layers, 150 steps of 8, lr 2e-3) and
# router settings (100 steps of 8, lr 2e-3) as bench/mixture_experiment.py, through the one training loop, scored
# on the held-out mixed set with `lorakit eval`. One torch thread; about 12 minutes on a 2-core CPU.
#
#   bench/mixture_cli.sh [OUT_DIR]        (default runs/mixture-cli; needs the embedded model)
# A smoke run of the commands: ADAPTER_STEPS=2 ROUTER_STEPS=2 EVAL_LIMIT=8 bench/mixture_cli.sh /tmp/smoke
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/mixture-cli}
PY=${PYTHON:-python}
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
lorakit() { "$PY" -m lorakit "$@"; }
TARGETS='model\.layers\.(2[0-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)'
LOOP=(--model embedded --threads 1 --template plain --batch-size 8 --lr 2e-3 --warmup-ratio 0 --max-grad-norm 0
      --no-group-by-length --quiet)
SECONDS=0

"$PY" bench/mixture_experiment.py --write-data "$OUT/data"
for task in reverse upper; do
  lorakit train "${LOOP[@]}" --data "$OUT/data/$task.jsonl" --targets "$TARGETS" --r 8 --alpha 16 \
    --weight-decay 0.01 --max-steps "${ADAPTER_STEPS:-150}" -o "$OUT/$task"
done
lorakit train-router "${LOOP[@]}" --adapters "$OUT/reverse,$OUT/upper" --data "$OUT/data/router.jsonl" \
  --max-steps "${ROUTER_STEPS:-100}" --seed 1 -o "$OUT/reverse-upper"
lorakit inspect "$OUT/reverse-upper"

ev() { local name=$1; shift; lorakit eval --model embedded --data "$OUT/data/test.jsonl" --template plain \
         --max-new-tokens 12 --examples 0 --limit "${EVAL_LIMIT:-0}" --json "$OUT/eval_$name.json" "$@"; }
ev reverse --adapter "$OUT/reverse"
ev upper --adapter "$OUT/upper"
ev uniform --adapter "$OUT/reverse:0.5" --adapter "$OUT/upper:0.5"
ev router --adapter "$OUT/reverse-upper"
"$PY" bench/mixture_experiment.py --cli-summary "$OUT" --seconds "$SECONDS"
