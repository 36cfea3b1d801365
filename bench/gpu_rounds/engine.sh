#!/usr/bin/env bash
# engine (issue 25): bench/gpu_serve.py's cases, most important first, each step its own process under its own
# timeout (at most what is left of BUDGET seconds, default 300: the round's), so a slow or broken step leaves the
# later ones their time. Rows: $OUT/gpu_serve.jsonl (one JSON line per case, an "error" row for a failed case);
# console: $OUT/log. STEPS picks and orders the steps; default:
#   main    0,1,8,32 mixed adapters + transformers' compiled static-cache generate (--peer)
#   stacks  two-adapter stacks of 32 adapters vs base-only
#   zipf    1,000 adapters, Zipf(1.0) traffic through 64 slots vs the same requests over 8 adapters
#   http    8 adapters through the real HTTP server and the openai client vs the engine API
#   peft    PEFT's mixed-batch generate(adapter_names=...) with the same 8 adapters vs the engine
#   8b      the llama-8b shape: base-only and 32 mixed adapters
# also: tests (tests/gpu/test_engine_gpu.py), profile (a decode step's kernels at 0 and 32 adapters), compile (0 and
# 32 adapters with LORAKIT_DECODE_COMPILE=1: the step through torch.compile before capture), peer (base-only and
# transformers' compiled static-cache generate alone, which main's budget did not reach on 2026-12-05), ungrouped
# (compile's 32-adapter case with LORAKIT_GROUPED=0: two adapter launches per projection, as before 2026-12-06).
# EXTRA: more arguments for every bench step (e.g. "--rows 32").
PY=${PY:-python}
STEPS=${STEPS:-"main stacks zipf http peft 8b"}
BUDGET=${BUDGET:-${ROUND_S:-300}}
J=$OUT/gpu_serve.jsonl
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used --format=csv 2>&1 | tee -a $OUT/log

step() {  # step NAME CAP COMMAND...: run COMMAND under min(CAP, what is left - 10) seconds, or skip it
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - 10 ))
  local secs=$(( cap < left ? cap : left ))
  if (( secs < 20 )); then echo "=== step $name skipped: ${left}s left" | tee -a $OUT/log; return; fi
  echo "=== step $name (${secs}s) $(date +%T)" | tee -a $OUT/log
  timeout -k 5 $secs "$@" 2>&1 | tee -a $OUT/log | tail -40
  echo "=== step $name rc=${PIPESTATUS[0]} $(date +%T)" | tee -a $OUT/log
}

B="$PY bench/gpu_serve.py --out $J $EXTRA"
for s in $STEPS; do
  case $s in
    tests)   step tests 70 $PY -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py $TESTARGS ;;
    profile) step profile 70 $PY bench/gpu_serve.py --profile 0,32 --cases "" $EXTRA ;;
    main)    step main 130 $B --cases 0,1,8,32 --peer ;;
    stacks)  step stacks 45 $B --cases 0,stack2-32 ;;
    zipf)    step zipf 100 $B --cases zipf-1000 --zipf-slots 64 --zipf-ref 8
             rm -rf /dev/shm/lorakit-bench-* /tmp/lorakit-bench-* ;;  # its adapter folder, if it was cut off
    http)    step http 60 $B --cases 8,http-8 ;;
    peft)    step peft 80 $B --cases 8,peft-8 ;;
    8b)      step 8b 90 $B --shape llama-8b --cases 0,32 ;;
    compile) step compile 150 env LORAKIT_DECODE_COMPILE=1 TORCH_LOGS=graph_breaks,recompiles $B --cases 0,32 ;;
    peer)    step peer 150 $B --cases 0 --peer ;;
    ungrouped) step ungrouped 120 env LORAKIT_DECODE_COMPILE=1 LORAKIT_GROUPED=0 $B --cases 32 ;;
    *)       echo "unknown step $s" | tee -a $OUT/log ;;
  esac
done
