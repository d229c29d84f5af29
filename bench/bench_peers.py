"""The peers' LoRA baselines in bench_lora.py's harness and JSON format: hf (HF+PEFT, sdpa), liger
(Liger-Kernel's Llama patches: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) and compile
(torch.compile(model), Inductor). Same workload, arguments and output as bench_lora.py, so the peer
and fxfuse rows of one run compare line by line.

    python bench/bench_peers.py liger 1024,4096,16384 [bench_lora.py options]

Liger is not on the GPU image: bench/run_gpu.sh installs the wheel carried in .whl/ into /tmp/site.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_lora  # noqa: E402

PEERS = ("hf", "liger", "compile")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PEERS:
        sys.exit(f"usage: bench_peers.py {{{'|'.join(PEERS)}}} SEQS [bench_lora.py options]")
    if argv[0] == "liger":
        # Patches transformers' Llama classes; must run before the model is built (as the anchor does).
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
        argv = ["hf", *argv[1:], "--label", "liger"]
    return bench_lora.main(argv)


if __name__ == "__main__":
    sys.exit(main())
