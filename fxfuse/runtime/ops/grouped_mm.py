"""`fxfuse::grouped_mm`: the MoE experts' grouped matmul, out[rows of expert i] = input[rows] @ weight[i],
with a backward AOTAutograd can trace.

transformers runs its experts through `torch.ops.transformers.grouped_mm_fallback` wherever
torch's grouped_mm cannot (`_can_use_grouped_mm` in transformers/integrations/moe.py: under
torch.compile weights not in bf16, so fp16 and fp32 training; CUDA below sm80; CPU with torch
<= 2.8, or <= 2.10 with unaligned weights). That op's autograd formula reads the group offsets with
`.tolist()`, which has no value while AOTAutograd traces the backward (DataDependentOutputException): the whole checkpointed MoE layer then
fails to compile and runs eagerly, its LoRA and attention unfused. Here the backward is a custom op
of its own (`fxfuse::grouped_mm_backward`), opaque to the trace, with a fake implementation; it also
skips the weight gradient when the experts are frozen (LoRA), where transformers' formula computes
a [experts, in, out] gradient that is then dropped.

Same math as transformers' fallback, call for call (one torch.mm per non-empty group into a zeroed
output; rows past the last offset stay zero), so the results are bit-identical to it.

`out_dtype=torch.float32` (set by the fp16_guard pass on an fp16 MoE's down projection, whose
products can pass 65504) returns each group's fp32 accumulator instead of rounding it to the input's
dtype; its backward rounds the fp32 gradient to the input's dtype, as the fp16 model's would be.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .lora_graph import mm32

OP = "fxfuse::grouped_mm"
BWD = "fxfuse::grouped_mm_backward"
# Both ops read the offsets on the host (a device sync), which a CUDA graph cannot capture: with the
# tag, Inductor's CUDA graphs (optimize(cudagraphs=True)) leave them out (the graph that calls them,
# or with graph partitioning only their partition, runs uncaptured). Read by torch 2.13's Inductor;
# not checked on 2.11.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _groups(offs: Tensor):
    """(expert, start, end) of each non-empty group; one device-to-host read of the offsets."""
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end != start:
            yield i, start, end
        start = end


def forward_products(input: Tensor, weight: Tensor, offs: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    wide = out_dtype is not None and out_dtype != input.dtype
    if wide and out_dtype != torch.float32:
        raise ValueError(f"fxfuse::grouped_mm: out_dtype {out_dtype}: only float32 (or the input's dtype)")
    out = torch.zeros(input.size(0), weight.size(2), device=input.device, dtype=out_dtype if wide else input.dtype)
    for i, start, end in _groups(offs):
        if wide:
            out[start:end] = mm32(input[start:end], weight[i])
        else:
            torch.mm(input[start:end], weight[i], out=out[start:end])
    return out


def backward_products(grad: Tensor, input: Optional[Tensor], weight: Tensor, offs: Tensor, need_input: bool,
                      need_weight: bool) -> List[Tensor]:
    d_in = torch.zeros(grad.size(0), weight.size(1), device=grad.device, dtype=weight.dtype) if need_input else None
    d_w = torch.zeros_like(weight) if need_weight else None
    for i, start, end in _groups(offs):
        if need_input:
            torch.mm(grad[start:end], weight[i].T, out=d_in[start:end])
        if need_weight:
            torch.mm(input[start:end].T, grad[start:end], out=d_w[i])
    return [t for t in (d_in, d_w) if t is not None]


@torch.library.custom_op(OP, mutates_args=(), tags=_TAGS)
def grouped_mm(input: Tensor, weight: Tensor, offs: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    return forward_products(input, weight, offs, out_dtype)


@grouped_mm.register_fake
def _(input, weight, offs, out_dtype=None):
    return input.new_empty(input.size(0), weight.size(2), dtype=out_dtype or input.dtype)


@torch.library.custom_op(BWD, mutates_args=(), tags=_TAGS)
def grouped_mm_backward(grad: Tensor, input: Optional[Tensor], weight: Tensor, offs: Tensor, need_input: bool,
                        need_weight: bool) -> List[Tensor]:
    """[grad_input] if need_input, then [grad_weight] if need_weight; `input` is only read (and
    only saved by the forward) for the weight gradient."""
    return backward_products(grad, input, weight, offs, need_input, need_weight)


@grouped_mm_backward.register_fake
def _(grad, input, weight, offs, need_input, need_weight):
    d_in = [grad.new_empty(grad.size(0), weight.size(1), dtype=weight.dtype)] if need_input else []
    return d_in + ([torch.empty_like(weight)] if need_weight else [])


def _setup_context(ctx, inputs, output):
    input, weight, offs = inputs[:3]
    # the input ([tokens x top_k, width]) is kept only for the weight gradient: frozen experts need none
    ctx.save_for_backward(input if ctx.needs_input_grad[1] else None, weight, offs)


def _backward(ctx, grad):
    input, weight, offs = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_input or need_weight):
        return None, None, None, None
    grad = grad.to(weight.dtype)  # an fp32 output's gradient, rounded as the 16-bit model's would be
    got = iter(torch.ops.fxfuse.grouped_mm_backward(grad, input, weight, offs, need_input, need_weight))
    return (next(got) if need_input else None), (next(got) if need_weight else None), None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
