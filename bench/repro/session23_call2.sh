#!/bin/bash
# Twenty-third session, device call 2: 2k, between the two LoRA forms' measured lengths (1k graph
# ops, 4k fused op): the default (fused op at 2048 tokens, since graph_ops_below=2048) against
# graph ops there (graph_ops_below=4096), one cold process each. (Run first with a 200 s limit, which
# the graph ops' cold compile overran; the graph row is from a rerun of its command on the same machine.)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
for v in fused graph; do
  opts=(); [ $v = graph ] && opts=(--pass-options '{"lora": {"graph_ops_below": 4096}}')
  timeout 470 python bench/bench_lora.py fxfuse-offload 2048 --steps 9 --gpu-gib 79.1 \
    --label "2k-$v" "${opts[@]}" 2>&1 | tee $OUT/g-2k-$v.txt | grep '^{' | cut -c1-60
done
