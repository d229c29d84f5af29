#!/bin/bash
# Twentieth session, device call 3: graph ops with the in-place accumulate (fxfuse::matmul_acc_) at
# 1k, the third step's memory traced (call 2 peaked at 15.96 GiB in the backward). The in-place op is in
# commit 69cb9c6 only: the next commit dropped it (the peak did not move).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 450 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 --label lora-graph-ops-2048-inplace \
  --pass-options '{"lora": {"graph_ops_below": 2048}}' --trace-step 2 > $OUT/t-1k-graph-inplace.txt 2>&1
