#!/bin/bash
# Twenty-second session, device call 1: causal attention split over the key range at 64k/128k
# (bench/bench_split_attention.py), then the GPU tests touched by the meta-device fix of lora_graph.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FXFUSE_AUTOTUNE=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/a-split-attention.txt
python -c "import torch; print(torch.__version__, torch.backends.cudnn.version())" | tee -a $OUT/a-split-attention.txt
timeout 200 python bench/bench_split_attention.py --seqs 32768,65536,131072 --chunks 16384,32768,65536 2>&1 \
  | tee -a $OUT/a-split-attention.txt
set -o pipefail
timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu/test_lora_graph_gpu.py tests/gpu/test_gpu_training.py 2>&1 \
  | tee $OUT/a-gpu-tests.txt | tail -8
