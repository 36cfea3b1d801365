#!/usr/bin/env bash
# lora (issue 25): where a decode step's adapter time goes. The mixed-adapter kernels of one llama-1b layer (seven
# projections, 64 rows) timed from CUDA graphs: today's gather kernels, the same with other GATHER configs (fewer,
# larger or more, smaller programs), and the folded experiment (the slots' A inside the base matmul, one expand
# launch), the in-place adds the engine runs and the grouped kernels (q/k/v and gate/up: one shrink and one expand
# launch each, triton_lora_group.py). Output: $OUT/gpu_serve_kernels.jsonl, one line per (case, implementation),
# base-only in the same run.
mkdir -p $OUT
timeout ${BENCH_S:-${ROUND_S:-150}} python bench/gpu_serve_kernels.py --out $OUT/gpu_serve_kernels.jsonl --folded --grouped \
  --cases ${CASES:-decode:0,decode:1,decode:32,decode:32:2} \
  --gather "${GATHERS:-BK=128,blocks=1,target=2048;BK=256,blocks=1,target=1024;BM=8,BO=128;BM=2,BO=32;BM=16,BO=64,BK=64,blocks=1,target=4096}" \
  2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
