#!/bin/bash
# Twenty-third session, device call 1: the fp16_guard pass on a GPU (its GPU tests through Inductor,
# then the 8B shape in fp16 at 4k with and without it: what carrying the stream in fp32 costs).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/f-nvidia-smi.txt
timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp16_guard_gpu.py 2>&1 \
  | tee $OUT/f-gpu-tests.txt | tail -8
GUARD=$(python -c 'import fxfuse; print(",".join(list(fxfuse.DEFAULT_PASSES) + ["fp16_guard"]))')
for v in defaults guard; do
  extra=(); [ $v = guard ] && extra=(--passes "$GUARD")
  timeout 170 python bench/bench_lora.py fxfuse-offload 4096 --steps 7 --gpu-gib 79.1 --dtype fp16 \
    --label "fp16-$v" "${extra[@]}" 2>&1 | tee $OUT/f-4k-fp16-$v.txt | grep '^{' | cut -c1-60
done
