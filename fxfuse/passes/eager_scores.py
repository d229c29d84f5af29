"""What the eager-attention passes share: HF's eager attention scores as matched by their rules
(q·kᵀ, a scale that is a number, a mask, softmax, cast, dropout, matmul with v), and the checks
that decline what an attention op would compute differently (eager_attention -> SDPA,
softcap_attention -> fxfuse::chunked_attention). Passes do not import each other; this module is
their common ground.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .pattern import Decline, canon, example_value


def is_number(v) -> bool:
    """A scale: a Python number, or a 0-d `torch.full([], number)` (GPT-2 divides by one)."""
    return scale_value(v) is not None


def scale_value(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if (isinstance(v, fx.Node) and v.op == "call_function" and v.target is torch.full and len(v.args) == 2
            and tuple(v.args[0]) == () and isinstance(v.args[1], (int, float)) and not isinstance(v.args[1], bool)):
        return float(v.args[1])
    return None


def last_two(dims, ndim: int) -> bool:
    return len(dims) == 2 and {d % ndim for d in dims if isinstance(d, int)} == {ndim - 2, ndim - 1}


def check(m) -> dict:
    """SDPA keyword arguments (scale, attn_mask) for a match of the eager rules; declines what SDPA
    would compute differently."""
    q, k, v = (example_value(m[n]) for n in ("q", "k", "v"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise Decline("q, k or v has no recorded tensor value")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise Decline(f"q/k/v are {q.dim()}/{k.dim()}/{v.dim()}-D (SDPA here takes [batch, heads, tokens, dim])")
    if not last_two(canon(m["kt"]).attrs["dims"], k.dim()):
        raise Decline(f"k is transposed over dims {canon(m['kt']).attrs['dims']}, not the last two")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise Decline(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} differ or are not floating")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise Decline(f"batch/head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                      "(broadcasting matmul)")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise Decline(f"shapes do not chain: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    attrs = canon(m["softmax"]).attrs
    if not isinstance(attrs["dim"], int) or attrs["dim"] % 4 != 3:
        raise Decline(f"softmax over dim {attrs['dim']}, not the key dim")
    if attrs["dtype"] not in (None, torch.float32):
        raise Decline(f"softmax in {attrs['dtype']}")
    weights = example_value(m.get("cast") or m["softmax"])
    if weights.dtype != q.dtype:
        raise Decline(f"attention weights in {weights.dtype} meet v in {v.dtype}")
    if "drop" in m:
        d = canon(m["drop"]).attrs
        if d["inplace"] or (d["p"] != 0 and d["training"] is not False):
            raise Decline(f"attention dropout p={d['p']} in training: SDPA would draw another mask than eager")
    kwargs = {"dropout_p": 0.0, "is_causal": False}
    if "scaled" in m:
        s = scale_value(m["scale"])
        if canon(m["scaled"]).kind == "div":
            if s == 0:
                raise Decline("scores divided by 0")
            s = 1.0 / s
        kwargs["scale"] = s
    else:
        kwargs["scale"] = 1.0  # SDPA's default would be 1/sqrt(d)
    mask = m.get("mask")
    if mask is not None:
        mv = example_value(mask)
        if not isinstance(mv, torch.Tensor):
            raise Decline("the mask is not a tensor")
        if mv.dtype != q.dtype:
            raise Decline(f"mask dtype {mv.dtype} is not q's {q.dtype} (eager promotes the scores; SDPA "
                          "requires the same dtype)")
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            if tuple(torch.broadcast_shapes(tuple(mv.shape), scores)) != scores:
                raise Decline(f"mask {tuple(mv.shape)} would broadcast the scores {scores}")
        except RuntimeError:
            raise Decline(f"mask {tuple(mv.shape)} does not broadcast to the scores {scores}") from None
        kwargs["attn_mask"] = mask
    return kwargs
