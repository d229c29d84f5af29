#!/bin/bash
# Twenty-first session, device call 1: where the 1k peaks sit. Allocator traces (events dumped
# for offline reading) of the CUDA-graphs recording step (15.91 GiB), the defaults and the graph
# ops (15.83 against 15.96 last session); the graph ops' speed again with the bit-mask split, and
# their numerics. The three traced runs compile side by side; only the graph-ops row's timed steps
# (after the others have ended) are read for speed.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
FXFUSE_TRACE_DUMP=$OUT/cg.json.gz timeout 300 python bench/bench_lora.py fxfuse-cg 1024 --steps 3 --gpu-gib 79.1 \
  --trace-step 1 --label cg-trace1 > $OUT/a-1k-cg-trace.txt 2>&1 &
A=$!
FXFUSE_TRACE_DUMP=$OUT/default.json.gz timeout 300 python bench/bench_lora.py fxfuse-offload 1024 --steps 4 --gpu-gib 79.1 \
  --trace-step 2 --label default-trace2 > $OUT/a-1k-default-trace.txt 2>&1 &
B=$!
FXFUSE_TRACE_DUMP=$OUT/graph.json.gz timeout 540 python bench/bench_lora.py fxfuse-offload 1024 --steps 7 --gpu-gib 79.1 \
  --trace-step 6 --label graph-ops-2048-trace6 --pass-options '{"lora": {"graph_ops_below": 2048}}' \
  > $OUT/a-1k-graph-trace.txt 2>&1 &
C=$!
wait $A $B
timeout 150 python bench/repro/session19_gpu_numerics.py fxfuse-graph fxfuse > $OUT/a-numerics.txt 2>&1
wait $C
grep -h PEAKLIVE $OUT/a-*.txt | head -80
grep -h '"tok_s"' $OUT/a-*.txt | python3 -c "import sys,json;[print({k:r.get(k) for k in ('variant','tok_s','peak_gb','phase_peaks_gib','step_times','compile_s')}) for r in map(json.loads,sys.stdin)]"
tail -5 $OUT/a-numerics.txt
