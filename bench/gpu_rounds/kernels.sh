#!/usr/bin/env bash
# kernels (issue 22 step 3): the kernels moved behind kernels/ (ce_chunk, swiglu_lora_fwd/_bwd) still
# match their references on the GPU, and the fast path (which now reaches them through the dispatch) still trains
# like the plain path. Output: $OUT/log, $OUT/junit_*.xml, $OUT/kernel_check_*.json.
export LORAKIT_GPU_TEST_OUT=$OUT
mkdir -p $OUT
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a $OUT/log
timeout ${KERNEL_S:-120} python -m pytest -q -p no:cacheprovider --tb=short --junitxml=$OUT/junit_kernels.xml \
  tests/gpu/test_fast_mlp_gpu.py tests/gpu/test_kernels_gpu.py 2>&1 | tee -a $OUT/log
timeout ${FAST_S:-170} python -m pytest -q -p no:cacheprovider --tb=short --junitxml=$OUT/junit_fast.xml \
  tests/gpu/test_fast_gpu.py 2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
