#!/bin/bash
# Twenty-fourth session, device call 2: the fp16_guard GPU tests with the new branch sources (MoE
# down projections through fxfuse::grouped_mm, plain linears through linear32) and the grouped_mm
# GPU tests (the op's new out_dtype).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/b-nvidia-smi.txt
timeout 500 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp16_guard_gpu.py tests/gpu/test_grouped_mm_gpu.py 2>&1 \
  | tee $OUT/b-gpu-tests.txt | tail -15
