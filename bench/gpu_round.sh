#!/usr/bin/env bash
# One GPU round on the device machine, from the repository root: bash bench/gpu_round.sh NAME:SECONDS [...]
# Installs the carried wheels (.whl/*.whl: bitsandbytes, liger-kernel, torchao, and for the engine round's http case
# fastapi, uvicorn, openai and what they import: scripts/gpu_wheels.sh; the device has no network) into
# /tmp/site, then runs bench/gpu_rounds/NAME.sh for each NAME under its own timeout with OUT=$OUT/NAME.
# Carry: .whl and .cache/tok (scripts/gpu_stage.sh makes the tokenizer folder from the embedded model's cache).
# The device returns only a few files from $OUT, so the rounds write under /tmp/gpu-rounds-PID and, after each round,
# everything but weights is packed into $OUT/rounds.tgz (what a cut-off call leaves is the last round's pack).
cd "$(dirname "$0")/.."
BACK=${OUT:-$PWD}
OUT=/tmp/gpu-rounds-$$; mkdir -p $OUT
pack() { tar czf $BACK/rounds.tgz -C $OUT --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD/src:/tmp/site TOK=$PWD/.cache/tok
for spec in "$@"; do
  name=${spec%%:*}; secs=${spec##*:}
  mkdir -p $OUT/$name
  echo "=== $name ($secs s) $(date +%T)" | tee -a $OUT/rounds.log
  OUT=$OUT/$name ROUND_S=$(( secs - 5 )) timeout -k 10 $secs bash bench/gpu_rounds/$name.sh > $OUT/$name/console.txt 2>&1
  echo "=== $name rc=$? $(date +%T)" | tee -a $OUT/rounds.log
  tail -5 $OUT/$name/console.txt
  pack
done
