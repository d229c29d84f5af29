#!/bin/bash
# Nineteenth session, device call 1: GPU tests (grouped_mm, chunked_attention); 1k defaults; 1k
# without the lora pass (is the fused op's host time what keeps 1k under 4500 tok/s?); 1k with CUDA
# graphs traced at the recording step.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
free -g >> $OUT/gpu.txt
(cd tests && FXFUSE_AUTOTUNE=0 timeout 150 python -m pytest -q gpu/test_grouped_mm_gpu.py kernels/test_chunked_attention.py) > $OUT/o-tests.txt 2>&1
timeout 130 python bench/bench_lora.py fxfuse-offload 1024 --steps 6 --gpu-gib 79.1 > $OUT/o-1k-default.txt 2>&1
timeout 130 python bench/bench_lora.py fxfuse-offload 1024 --steps 6 --gpu-gib 79.1 --label no-lora-pass \
  --passes grouped_mm,mlp_tiling,eager_attention,causal_mask,sdpa_gqa,fused_linear_cross_entropy > $OUT/o-1k-nolora.txt 2>&1
timeout 150 python bench/bench_lora.py fxfuse-cg 1024 --steps 4 --gpu-gib 79.1 --trace-step 1 --label cg-trace1 > $OUT/o-1k-cg-trace1.txt 2>&1
