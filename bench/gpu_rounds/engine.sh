#!/usr/bin/env bash
# engine: GPU tests (graph decode parity, kernels), a profile of a decode step, the engine bench with its peer
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.used --format=csv 2>&1 | tee -a $OUT/log
timeout 70 $PY -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py $TESTARGS 2>&1 | tail -15 | tee -a $OUT/log
timeout 70 $PY bench/gpu_serve.py --profile 0,32 --cases "" $EXTRA 2>&1 | tee -a $OUT/profile.txt | tail -80 | tee -a $OUT/log
timeout 150 $PY bench/gpu_serve.py --cases 0,1,8,32 --peer --out $OUT/gpu_serve.jsonl $EXTRA 2>&1 | tee -a $OUT/log
