#!/bin/bash
# Device call: profile the LoRA step of a few 8B-shaped layers for several variants.
#   run(command="bash bench/profile.sh")   env: SEQ (4096), LAYERS (2), VARIANTS (compile fxfuse-lora)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
for v in ${VARIANTS:-compile fxfuse-lora}; do
  timeout ${VT:-240} python3 bench/profile_step.py "$v" "${SEQ:-4096}" --layers "${LAYERS:-2}" 2>&1 \
    | grep -v "Warning\|warn(" | tee -a "${OUT:-/tmp}/profile.txt" | grep -E "PROFILE|Self CUDA|^-|lora|triton|gemm|Name|Error|error" | head -60
done
