#!/usr/bin/env bash
# qlora (issue 24): llama-8b with a 4-bit base, batch 1 x 2048 and 2 x 2048, against PEFT + bitsandbytes at its
# strongest (bf16 adapters + Liger, gradient checkpointing) and at its defaults (prepare_model_for_kbit_training),
# lorakit through each 4-bit library (bnb, torchao, own) and through `lorakit train`. Output: $OUT/gpu_train.jsonl.
mkdir -p $OUT
export LORAKIT_BENCH_TOKENIZER=${LORAKIT_BENCH_TOKENIZER:-$TOK}  # the cli case's tokenizer (the device has no embedded model)
timeout ${BENCH_S:-${ROUND_S:-290}} python bench/gpu_train.py --out $OUT --no-micro --deadline $(( ${BENCH_S:-${ROUND_S:-290}} - 60 )) --runs \
  ${RUNS:-8b-q4/peft/bf16=1,liger=1 8b-q4/lorakit/lib=bnb,mem=1 8b-q4/lorakit/lib=torchao 8b-q4-b2/lorakit/lib=bnb \
  8b-q4-b2/peft/bf16=1,liger=1 8b-q4/cli 8b-q4/peft/kbit=1 8b-q4/lorakit/lib=own} 2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
