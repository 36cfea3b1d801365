#!/usr/bin/env bash
# fsdp1 (issue 28 on one GPU): FSDP2 with --offload params in a world-1 group on CUDA: the same losses and adapter
# as without offload, and a lower allocated peak (tests/gpu/test_fsdp_offload_gpu.py). Output: $OUT/log, junit.
mkdir -p $OUT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout ${TEST_S:-150} python -m pytest -q -p no:cacheprovider --tb=short --junitxml=$OUT/junit_fsdp1.xml \
  tests/gpu/test_fsdp_offload_gpu.py 2>&1 | tee -a $OUT/log
echo done | tee -a $OUT/log
