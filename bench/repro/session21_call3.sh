#!/bin/bash
# Twenty-first session, device call 3: 1k speed, one process after the other on one machine:
# the defaults, then graph_ops_below=2048 (which now compiles its graphs with Inductor's buffer
# reuse off, fxfuse/frontends/backend.py).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 230 python bench/bench_lora.py fxfuse-offload 1024 --steps 6 --gpu-gib 79.1 --label default > $OUT/c-1k-default.txt 2>&1
timeout 350 python bench/bench_lora.py fxfuse-offload 1024 --steps 6 --gpu-gib 79.1 --label graph-ops-2048 \
  --pass-options '{"lora": {"graph_ops_below": 2048}}' > $OUT/c-1k-graph.txt 2>&1
grep -h '"tok_s"' $OUT/c-*.txt | python3 -c "import sys,json;[print({k:r.get(k) for k in ('variant','seq','tok_s','peak_gb','phase_peaks_gib','step_times','fwd_host_s','bwd_host_s','compile_s','loss_last')}) for r in map(json.loads,sys.stdin)]"
grep -h "buffer reuse" $OUT/c-*.txt
