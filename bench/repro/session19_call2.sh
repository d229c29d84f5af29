#!/bin/bash
# Nineteenth session, device call 2: 1k with the defaults against 1k with the lora pass declining
# below 2048 tokens (Inductor lowers PEFT's linears): is the fused op's host time 1k's limit?
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 210 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 > $OUT/p-1k-default.txt 2>&1
timeout 210 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 --label lora-min-tokens-2048 \
  --pass-options '{"lora": {"min_tokens": 2048}}' > $OUT/p-1k-min-tokens.txt 2>&1
