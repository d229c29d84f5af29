#!/bin/bash
# Twenty-fourth session, device call 3: the fp16_guard GPU tests again (linear32 now has its own
# backward: call 2 found that torch 2.11 has no derivative for mm's out_dtype overload), then the
# full 32-layer 128k step's idle gaps (host_fraction 0.6, as the 3306 tok/s run): how much of the
# step the compute stream waits, and on what.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/c-nvidia-smi.txt
timeout 230 python -m pytest -q -p no:cacheprovider tests/gpu/test_fp16_guard_gpu.py 2>&1 \
  | tee $OUT/c-gpu-tests.txt | tail -4
unset FXFUSE_AUTOTUNE
timeout 340 python bench/profile_step.py fxfuse 131072 --layers 32 --warm 0 --timed 1 --gaps --gaps-only \
  --host-fraction 0.6 --gpu-gib 79.1 2>&1 | tee $OUT/c-gaps-128k-32layers.txt | grep -vi warn | tail -40
