"""SwiGLU pass: `act(gate) * up` -> `fxfuse::swiglu`, act = silu, or gelu(approximate='tanh')
(Gemma's `gelu_pytorch_tanh`).

The anchor is the activation node: every silu and gelu is a candidate, rewritten or declined with
a reason (exact-erf gelu, an activation also used elsewhere, broadcasting or mixed dtypes). With
the LoRA pass first, gate and up are `getitem`s of one grouped `fxfuse::lora_linear` (or of its
graph-op form below 2048 tokens); the pass matches the structure and does not care where gate and
up come from.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime.ops import swiglu as swiglu_op  # noqa: F401  (registers torch.ops.fxfuse.swiglu)
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Op, Var, canon, example_value, graphs_of, is_anchor, match_at, module_path

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# (anchor, pattern) per activation kind
RULES = [
    (anchor, Op("mul", (anchor, Var("up")), commutative=True, name="product", label=f"{anchor.kind}(gate) * up"))
    for anchor in (Op("silu", (Var("gate"),), name="act"), Op("gelu", (Var("gate"),), name="act"))
]


def check(m) -> str:
    """The activation's name for the op; declines what the kernels cannot express."""
    attrs = canon(m["act"]).attrs
    if attrs.get("inplace"):
        raise Decline("in-place activation")
    if canon(m["act"]).kind == "silu":
        activation = "silu"
    elif attrs["approximate"] == "tanh":
        activation = "gelu_tanh"
    else:
        raise Decline(f"gelu approximate={attrs['approximate']!r} (only 'tanh' is supported)")
    gate, up, out = example_value(m["gate"]), example_value(m["up"]), example_value(m.root)
    for name, t in (("gate", gate), ("up", up), ("output", out)):
        if not isinstance(t, torch.Tensor):
            raise Decline(f"{name} is not a tensor with a recorded value")
        if t.dtype not in _FLOATS:
            raise Decline(f"{name} dtype {t.dtype} not supported (fp32/fp16/bf16)")
    if gate.shape != up.shape:
        raise Decline(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (broadcasting)")
    if not (gate.dtype == up.dtype == out.dtype):
        raise Decline(f"mixed dtypes: gate {gate.dtype}, up {up.dtype}, output {out.dtype}")
    return activation


class SwigluPass(GraphPass):
    name = "swiglu"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.swiglu", "fxfuse.runtime.kernels.swiglu",
                  "fxfuse.runtime.kernels.rms_norm")
    def __init__(self):
        self.config = {}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                for anchor, pattern in RULES:
                    if is_anchor(anchor, node):
                        stats.sites.append(self._site(gname, sub, node, anchor, pattern))

    def _site(self, gname, gm, node, anchor, pattern) -> Site:
        try:
            m = match_at(pattern, anchor, node)
            activation = check(m)
        except Decline as e:
            return Site(self.name, module_path(node), node.name, gname, False, str(e))
        g = gm.graph
        with g.inserting_before(m.root):
            fused = g.call_function(torch.ops.fxfuse.swiglu.default, (m["gate"], m["up"], activation))
        fused.meta.update({k: v for k, v in m.root.meta.items() if k in ("nn_module_stack", "example_value", "val")})
        m.root.replace_all_uses_with(fused)
        g.erase_node(m.root)
        g.erase_node(m["act"])
        return Site(self.name, module_path(fused), node.name, gname, True, group=fused.name)
