#!/usr/bin/env bash
# qdata (issue 24's real-data goal): the chat rows (bench/gpu_train_data.py, 40 steps) on the llama-8b shape with a
# 4-bit base on both sides (q4=1): PEFT + bitsandbytes + Liger with gradient checkpointing, lorakit's loop with the
# base in NF4 (bitsandbytes on CUDA) and every layer recomputed, then PEFT + bitsandbytes at its defaults.
mkdir -p $OUT
timeout ${BENCH_S:-${ROUND_S:-280}} python bench/gpu_train_data.py --out $OUT --tokenizer $TOK --shape llama-8b \
  --deadline $(( ${BENCH_S:-${ROUND_S:-280}} - 70 )) \
  --runs ${RUNS:-classify40/peft-liger/q4=1 classify40/lorakit/q4=1 classify40/peft/q4=1} 2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
