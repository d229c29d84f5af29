#!/bin/bash
# Twenty-third session, device call 4: fp16_guard's GPU tests again, now that a LoRA site whose
# output is a residual add's branch writes fp32 (the op's cuBLAS path with mm's fp32 output).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
timeout 220 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp16_guard_gpu.py 2>&1 \
  | tee $OUT/i-gpu-tests.txt | tail -8
