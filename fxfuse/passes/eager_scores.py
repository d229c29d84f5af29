"""What the eager-attention passes share: HF's eager attention scores as matched by their rules
(q·kᵀ, a scale that is a number, a mask, softmax, cast, dropout, matmul with v), and the checks
that decline what an attention op would compute differently (eager_attention -> SDPA,
softcap_attention -> fxfuse::chunked_attention). Passes do not import each other; this module is
their common ground.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .pattern import Decline, canon, check_grouped_repeat, example_value, repeat_source


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
    kwargs = {"dropout_p": 0.0, "is_causal": False, "scale": scale_of(m)}
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


def scale_of(m) -> float:
    """The scores' scale from a match's `scaled` (x * scale or x / scale) and `scale`; 1.0 without
    one (SDPA's default would be 1/sqrt(d))."""
    if "scaled" not in m:
        return 1.0
    s = scale_value(m["scale"])
    if canon(m["scaled"]).kind == "div":
        if s == 0:
            raise Decline("scores divided by 0")
        s = 1.0 / s
    return float(s)


def kv_heads(k, v, q: torch.Tensor) -> tuple:
    """(k, v) as the kv heads themselves when both are repeat_kv's grouped copies for q's heads (an
    op that handles GQA then reads no copy), else as they are."""
    rk, rv = repeat_source(k), repeat_source(v)
    if rk and rv:
        try:
            check_grouped_repeat(rk, q)
            check_grouped_repeat(rv, q)
            return rk[0], rv[0]
        except Decline:
            pass  # another expand: read k and v as they are
    return k, v


def replace_attention(g: fx.Graph, root: fx.Node, target, args: tuple, matched: list, kv_ends: tuple) -> fx.Node:
    """Put `target(*args)[0]` (an op returning (output, ...)) in place of the eager attention's final
    matmul `root`; erase the matched nodes and repeat_kv copies left without readers. Returns the op."""
    with g.inserting_before(root):
        op = g.call_function(target, args)
        out = g.call_function(operator.getitem, (op, 0))
    out.meta.update({key: root.meta[key] for key in ("example_value", "val", "stack_trace", "nn_module_stack")
                     if key in root.meta})
    op.meta.update({key: root.meta[key] for key in ("stack_trace", "nn_module_stack") if key in root.meta})
    root.replace_all_uses_with(out)
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in sorted({root, *matched}, key=order.__getitem__, reverse=True):
        if not n.users:
            g.erase_node(n)
    for end in kv_ends:
        chain = repeat_source(end) if isinstance(end, fx.Node) else None
        for n in reversed(chain[1] if chain else []):
            if not n.users:
                g.erase_node(n)
    return op
