#!/bin/bash
# Nineteenth session, device call 1: GPU tests (grouped_mm, chunked_attention), 1k with CUDA graphs
# traced at the recording step (1) and a replayed step (3), 1k defaults.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
free -g >> $OUT/gpu.txt
(cd tests && FXFUSE_AUTOTUNE=0 timeout 200 python -m pytest -q gpu/test_grouped_mm_gpu.py kernels/test_chunked_attention.py) > $OUT/o-tests.txt 2>&1
for s in 1 3; do
  timeout 150 python bench/bench_lora.py fxfuse-cg 1024 --steps 5 --gpu-gib 79.1 --trace-step $s --label cg-trace$s > $OUT/o-1k-cg-trace$s.txt 2>&1
done
timeout 150 python bench/bench_lora.py fxfuse-offload 1024 --steps 6 --gpu-gib 79.1 > $OUT/o-1k-default.txt 2>&1
