#!/bin/bash
# Twenty-fourth session, device call 1: where a 128k step goes, kernel by kernel (2 of the 8B's
# layers, in-model rates, for the 128k lower bound in RESULTS), then the 8B shape in fp16 at 4k with
# and without fp16_guard now that the guard also writes o_proj/down_proj outputs in fp32.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/a-nvidia-smi.txt
free -g >> $OUT/a-nvidia-smi.txt
timeout 230 python bench/profile_step.py fxfuse 131072 --layers 2 2>&1 | tee $OUT/a-profile-128k-2layers.txt \
  | grep -E '^(PROFILE|BREAKDOWN)'
GUARD=$(python -c 'import fxfuse; print(",".join(list(fxfuse.DEFAULT_PASSES) + ["fp16_guard"]))')
for v in guard defaults; do
  extra=(); [ $v = guard ] && extra=(--passes "$GUARD")
  timeout 165 python bench/bench_lora.py fxfuse-offload 4096 --steps 7 --gpu-gib 79.1 --dtype fp16 \
    --label "fp16-$v" "${extra[@]}" 2>&1 | tee $OUT/a-4k-fp16-$v.txt | grep '^{' | cut -c1-60
done
