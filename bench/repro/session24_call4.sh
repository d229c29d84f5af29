#!/bin/bash
# Twenty-fourth session, device call 4: the fp16_guard GPU tests after the sweep's fixes (gpt-oss's
# in-place expert bias, Llama 4's bmm experts through bmm32, graph-break declines).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/d-nvidia-smi.txt
timeout 330 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp16_guard_gpu.py 2>&1 \
  | tee $OUT/d-gpu-tests.txt | tail -4
