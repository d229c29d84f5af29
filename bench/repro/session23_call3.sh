#!/bin/bash
# Twenty-third session, device call 3: 128k with the offload allowed 60% of the host's available
# memory (default 50%), so that save_attention keeps every layer's attention output and lse (the
# fourteenth session's 128k run recomputed 5 layers' attention forward for lack of host memory).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/h-nvidia-smi.txt
free -g >> $OUT/h-nvidia-smi.txt
timeout 480 python bench/bench_lora.py fxfuse-offload 131072 --steps 4 --gpu-gib 79.1 --host-fraction 0.6 --progress \
  --label 128k-host0.6 2>&1 | tee $OUT/h-128k-host0.6.txt | grep '^{' | cut -c1-60
