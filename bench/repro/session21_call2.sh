#!/bin/bash
# Twenty-first session, device call 2: the same traced 1k runs as call 1 with Inductor's buffer
# reuse off (torch._inductor.config.allow_buffer_reuse=False). Call 1's traces showed [1024, 14336]
# buffers that Inductor keeps, dead, across layers to reuse them later (alive at the peaks of the
# CUDA-graphs and graph-ops builds). Also the 4k defaults' peak with reuse off. Four cold processes
# compile side by side, so only memory is read here (and the CUDA-graph replays' time).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
NR='{"allow_buffer_reuse": false}'
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
FXFUSE_TRACE_DUMP=$OUT/cg.json.gz timeout 420 python bench/bench_lora.py fxfuse-cg 1024 --steps 3 --gpu-gib 79.1 \
  --trace-step 1 --label cg-noreuse-trace1 --inductor-config "$NR" > $OUT/b-1k-cg-noreuse.txt 2>&1 &
FXFUSE_TRACE_DUMP=$OUT/default.json.gz timeout 420 python bench/bench_lora.py fxfuse-offload 1024 --steps 4 --gpu-gib 79.1 \
  --trace-step 2 --label default-noreuse-trace2 --inductor-config "$NR" > $OUT/b-1k-default-noreuse.txt 2>&1 &
FXFUSE_TRACE_DUMP=$OUT/graph.json.gz timeout 540 python bench/bench_lora.py fxfuse-offload 1024 --steps 5 --gpu-gib 79.1 \
  --trace-step 4 --label graph-ops-2048-noreuse-trace4 --pass-options '{"lora": {"graph_ops_below": 2048}}' \
  --inductor-config "$NR" > $OUT/b-1k-graph-noreuse.txt 2>&1 &
timeout 420 python bench/bench_lora.py fxfuse-offload 4096 --steps 4 --gpu-gib 79.1 --label default-noreuse \
  --inductor-config "$NR" > $OUT/b-4k-default-noreuse.txt 2>&1 &
wait
grep -h '"tok_s"' $OUT/b-*.txt | python3 -c "import sys,json;[print({k:r.get(k) for k in ('variant','seq','tok_s','peak_gb','phase_peaks_gib','step_times','compile_s')}) for r in map(json.loads,sys.stdin)]"
grep -h "PEAKLIVE baseline" $OUT/b-*.txt
