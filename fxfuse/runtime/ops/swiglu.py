"""`fxfuse::swiglu`: out = act(gate) · up with act = silu (SwiGLU) or tanh-gelu (GeGLU, Gemma).

HF's rounding points are kept: act(gate) is rounded to the I/O dtype before the product. The
backward (`fxfuse::swiglu_backward`, its own custom op) recomputes the activation from the saved
gate and up; no other tensor is saved.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import stats
from ..kernels import swiglu as K

OP = "fxfuse::swiglu"
BWD = "fxfuse::swiglu_backward"



def _activation(activation: str):
    if activation == "silu":
        return torch.nn.functional.silu
    return lambda g: torch.nn.functional.gelu(g, approximate="tanh")


def swiglu_reference(gate, up, activation):
    return _activation(activation)(gate) * up


def _derivative(activation: str, g: Tensor) -> Tensor:
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    c = 0.7978845608028654
    t = torch.tanh(c * (g + 0.044715 * g ** 3))
    return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)


def swiglu_backward_reference(dy, gate, up, activation):
    g, d = gate.float(), dy.float()
    a = _activation(activation)(g).to(gate.dtype).float()
    return [(d * up.float() * _derivative(activation, g)).to(gate.dtype), (d * a).to(up.dtype)]


@torch.library.custom_op(OP, mutates_args=())
def swiglu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    return stats.dispatch(OP, gate.device, K.swiglu_forward, swiglu_reference, (gate, up, activation))


@swiglu.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op(BWD, mutates_args=())
def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor, activation: str) -> List[Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    return list(stats.dispatch(BWD, gate.device, K.swiglu_backward, swiglu_backward_reference, (dy, gate, up, activation)))


@swiglu_backward.register_fake
def _(dy, gate, up, activation):
    return [gate.new_empty(gate.shape), up.new_empty(up.shape)]


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.fxfuse.swiglu_backward(dy, gate, up, ctx.activation)
    return dg, du, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
