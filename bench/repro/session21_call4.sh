#!/bin/bash
# Twenty-first session, device call 4: GPU tests touched by the graph-ops default (graph_ops_below=2048).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
set -o pipefail
timeout 330 python -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_training.py tests/gpu/test_lora_graph_gpu.py \
  tests/gpu/test_mlp_tiling_gpu.py 2>&1 | tee $OUT/d-gpu-tests.txt | tail -15
