#!/bin/bash
# Twentieth session, device call 2: call 1's graph-ops run ran out of its 200 s while compiling;
# again with 420 s, then the numerics of the graph ops against fp32 eager (4-layer Llama shape).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 420 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 --label lora-graph-ops-2048 \
  --pass-options '{"lora": {"graph_ops_below": 2048}}' > $OUT/s-1k-graph.txt 2>&1
timeout 150 python bench/repro/session19_gpu_numerics.py fxfuse-graph fxfuse > $OUT/s-numerics.txt 2>&1
