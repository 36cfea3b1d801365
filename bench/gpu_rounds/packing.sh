#!/usr/bin/env bash
# packing (issue 23): the real-data bench (bench/gpu_train_data.py), then the packed-rows GPU tests.
mkdir -p $OUT
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" 2>&1 | tee -a $OUT/log
BS=${BENCH_S:-$(( ${ROUND_S:-285} - ${TEST_S:-75} ))}  # the bench's share of the round; the tests get TEST_S
timeout $BS python bench/gpu_train_data.py --out $OUT --tokenizer $TOK --deadline $(( BS - 50 )) \
  --runs ${RUNS:-classify/peft-liger/prof=1 classify/lorakit/prof=1 long/peft-liger long/lorakit/prof=1 classify/peft} 2>&1 | tee -a $OUT/log
timeout ${TEST_S:-75} python -m pytest -q -p no:warnings --tb=short tests/gpu/test_packing_gpu.py 2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
