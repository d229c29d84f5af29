"""RMSNorm pass: HF RMSNorm (Llama/Qwen/Mistral form and Gemma form) -> `fxfuse::rms_norm`, with
the residual add that feeds the norm fused in when there is one.

Dynamo traces the two forms as
    Llama:  w * to(x_f * rsqrt(mean(pow(x_f, 2), -1, keepdim) + eps), dtype),  x_f = to?(x, f32)
    Gemma:  to(x_f * rsqrt(mean(pow(x_f, 2), -1, keepdim) + eps) * (1.0 + to?(w, f32)))  (type_as)
The anchor is `rsqrt(mean(pow(.)) + eps)`: every such statistic is a candidate, rewritten or
declined with a reason. Qwen3's q/k norms (over head_dim of a 4-D tensor) are the same pattern
with more leading dims. When x is `residual + out` (the decoder's residual stream, used again
later), the op computes the add too and returns the sum for the add's other users.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime.ops import rms_norm as rms_op  # noqa: F401  (registers torch.ops.fxfuse.rms_norm)
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Lit, Op, Opt, Var, canon, example_value, graphs_of, is_anchor, match_at, module_path

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

X_F32 = Opt("to", Var("x"), name="x_cast")
ANCHOR = Op("rsqrt", (Op("add", (Op("mean", (Op("pow", (X_F32, Var("exponent")), label="square"),), name="mean"),
                                 Var("eps")), commutative=True, label="variance + eps"),), name="rsqrt")
NORMED = Op("mul", (X_F32, ANCHOR), commutative=True, name="normed", label="x * rsqrt(...)")
# (form, pattern): Gemma's is tried first; the Llama pattern would also match inside it, with
# `1 + w` as the weight and the final cast left out.
PATTERNS = [
    ("gemma", Opt("to", Op("mul", (NORMED, Op("add", (Lit("offset"), Opt("to", Var("weight"))), commutative=True,
                                              label="offset + weight")),
                           commutative=True, name="scaled", label="normed * (offset + weight)"), name="out_cast")),
    ("llama", Op("mul", (Var("weight"), Opt("to", NORMED, name="round")), commutative=True, name="scaled",
                 label="weight * normed")),
]


def check(form: str, m) -> dict:
    """Read the site's tensors from dynamo's fake values; decline what the op cannot express."""
    x, w, out = example_value(m["x"]), example_value(m["weight"]), example_value(m.root)
    for name, t in (("input", x), ("weight", w), ("output", out)):
        if not isinstance(t, torch.Tensor):
            raise Decline(f"{name} is not a tensor with a recorded value")
        if t.dtype not in _FLOATS:
            raise Decline(f"{name} dtype {t.dtype} not supported (fp32/fp16/bf16)")
    if x.dim() < 1 or w.dim() != 1 or w.shape[0] != x.shape[-1]:
        raise Decline(f"weight {tuple(w.shape)} is not 1-D of the normalized width {x.shape[-1] if x.dim() else '?'}")
    if tuple(out.shape) != tuple(x.shape):
        raise Decline(f"output shape {tuple(out.shape)} differs from the input's {tuple(x.shape)}")
    mean = canon(m["mean"]).attrs
    dim = mean["dim"]
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not isinstance(dim, int) or dim not in (-1, x.dim() - 1) or mean["keepdim"] is not True or mean["dtype"] is not None:
        raise Decline(f"reduction is not a keepdim mean over the last dim (dim={mean['dim']!r}, "
                      f"keepdim={mean['keepdim']!r})")
    if isinstance(m["exponent"], bool) or m["exponent"] != 2:
        raise Decline(f"the statistic is not a mean of squares (exponent {m['exponent']!r})")
    eps = m["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise Decline(f"eps is not a literal number in the graph ({eps!r})")
    stat = example_value(m["rsqrt"])
    if not isinstance(stat, torch.Tensor) or stat.dtype != torch.float32:
        raise Decline("the statistic is not computed in fp32")
    round_dtype = None
    if form == "llama":
        normed = example_value(m["normed"])
        if normed.dtype != torch.float32:
            raise Decline(f"normalized value computed in {normed.dtype}, not fp32")
        if m.get("round") is not None:
            round_dtype = canon(m["round"]).attrs["dtype"]
            if round_dtype not in _FLOATS:
                raise Decline(f"normalized value cast to {round_dtype}")
    else:
        offset_dt = example_value(m["scaled"]).dtype
        if offset_dt != torch.float32:
            raise Decline(f"Gemma-form weight product computed in {offset_dt}, not fp32")
    offset = float(m["offset"]) if form == "gemma" else 0.0
    return {"eps": float(eps), "offset": offset, "round_dtype": round_dtype, "out_dtype": out.dtype}


def _residual(m, order) -> tuple | None:
    """(residual, x) when the norm's input is `residual + x` of two same-shape, same-dtype tensors
    whose sum the op can return before any of its users; else None (the norm is fused alone)."""
    node = m["x"]
    c = canon(node)
    if c is None or c.kind != "add" or not all(isinstance(a, fx.Node) for a in c.operands):
        return None
    h = example_value(node)
    vals = [example_value(a) for a in c.operands]
    if not all(isinstance(v, torch.Tensor) and v.shape == h.shape and v.dtype == h.dtype for v in vals):
        return None
    first_user = min(order[u] for u in node.users)
    if not isinstance(m["weight"], fx.Node) or order[m["weight"]] > first_user:
        return None
    return c.operands


class RmsNormPass(GraphPass):
    name = "rms_norm"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.rms_norm", "fxfuse.runtime.kernels.rms_norm")

    def __init__(self, fuse_residual: bool = True):
        self.fuse_residual = fuse_residual
        self.config = {"fuse_residual": fuse_residual}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                if not is_anchor(ANCHOR, node):
                    continue
                stats.sites.append(self._site(gname, sub, node))

    def _site(self, gname: str, gm: fx.GraphModule, node: fx.Node) -> Site:
        reasons = []
        for form, pattern in PATTERNS:
            try:
                m = match_at(pattern, ANCHOR, node)
                info = check(form, m)
            except Decline as e:
                reasons.append(f"{form} form: {e}")
                continue
            module = module_path(m.root)
            fused = _replace(gm, m, info, self.fuse_residual)
            return Site(self.name, module, node.name, gname, True, group=fused.name)
        return Site(self.name, module_path(node), node.name, gname, False, "; ".join(reasons))


def _replace(gm: fx.GraphModule, m, info: dict, fuse_residual: bool) -> fx.Node:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    residual = _residual(m, order) if fuse_residual else None
    x = m["x"]
    if residual is not None:
        res, inp = residual
        operands, where = (inp, m["weight"], res), x
    else:
        operands, where = (x, m["weight"], None), m.root
    # after every operand; with a residual, before the sum's first user, otherwise at the root
    with g.inserting_before(min((u for u in where.users), key=order.__getitem__) if residual is not None else m.root):
        fused = g.call_function(torch.ops.fxfuse.rms_norm.default,
                                (*operands, info["eps"], info["offset"], info["round_dtype"], info["out_dtype"]))
        outs = [g.call_function(operator.getitem, (fused, i)) for i in range(2 if residual is not None else 1)]
    fused.meta["nn_module_stack"] = dict(m.root.meta.get("nn_module_stack", {}))
    _set_fake_values(fused, outs)
    m.root.replace_all_uses_with(outs[-1])
    for n in sorted(set(m.nodes), key=order.__getitem__, reverse=True):
        if not n.users:
            g.erase_node(n)
    if residual is not None:
        x.replace_all_uses_with(outs[0])
        g.erase_node(x)
    return fused


def _set_fake_values(fused: fx.Node, outs: list[fx.Node]) -> None:
    args = [example_value(a) for a in fused.args]
    mode = getattr(args[0], "fake_mode", None)
    if mode is None:
        return
    with mode:
        vals = torch.ops.fxfuse.rms_norm.default(*args)
    fused.meta["example_value"] = vals
    for i, out in enumerate(outs):
        out.meta["example_value"] = vals[i]
        out.meta["nn_module_stack"] = fused.meta["nn_module_stack"]
