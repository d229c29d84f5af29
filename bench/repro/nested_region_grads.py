"""Repro (regional compilation spike, 2026-12-01): wrapping the Llama decoder layer in
`torch.compiler.nested_compile_region` and compiling with Inductor gives the eager loss but wrong
LoRA gradients on torch 2.13 CPU (max rel. error 24 on 4 tiny layers; aot_eager is exact), with or
without fxfuse. Not yet tried on a GPU (torch 2.11).

    python bench/repro/nested_region_grads.py torch inductor 4     # plain model.compile, no fxfuse
    python bench/repro/nested_region_grads.py - inductor 4         # fxfuse, no passes
    python bench/repro/nested_region_grads.py - aot_eager 4        # exact
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from tiny import loss_and_grads, rel, tiny_model, tokens  # noqa: E402

import fxfuse  # noqa: E402

passes = sys.argv[1].split(",") if sys.argv[1] != "-" else []
compiler, layers = sys.argv[2], int(sys.argv[3])
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

model = tiny_model(gc=False, sizes=dict(num_hidden_layers=layers))
model.enable_input_require_grads()  # layer 0's input must match the others' metadata to share the region
ref = copy.deepcopy(model)
LlamaDecoderLayer.forward = torch.compiler.nested_compile_region(LlamaDecoderLayer.forward)
if passes == ["torch"]:
    model.compile(backend=compiler)
else:
    fxfuse.optimize(model, compiler=compiler, passes=passes, offload_activations=False, verbose=False)
ids = tokens()
loss, grads = loss_and_grads(model, input_ids=ids, labels=ids)
ref_loss, ref_grads = loss_and_grads(ref, input_ids=ids, labels=ids)
print("loss rel", rel(loss, ref_loss), "max grad rel", max(rel(grads[k], ref_grads[k]) for k in ref_grads))
for r, k in sorted(((rel(grads[k], ref_grads[k]), k) for k in ref_grads), reverse=True)[:6]:
    print(f"   {r:.3g} {k}")
