#!/bin/bash
# Twentieth session, device call 1: the LoRA op's math as graph ops (LoraPass(graph_ops_below)):
# GPU tests of the split path, numerics against fp32 eager, then 1k with the graph ops and defaults.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
FXFUSE_AUTOTUNE=0 timeout 150 python -m pytest -x -q -s tests/gpu/test_lora_graph_gpu.py > $OUT/r-gpu-tests.txt 2>&1
timeout 200 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 --label lora-graph-ops-2048 \
  --pass-options '{"lora": {"graph_ops_below": 2048}}' > $OUT/r-1k-graph.txt 2>&1
timeout 200 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 > $OUT/r-1k-default.txt 2>&1
