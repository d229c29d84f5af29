"""Causal-mask pass: an SDPA call whose boolean mask is provably the causal mask (or all-true)
calls SDPA with `is_causal=True` (or no mask) instead.

While tracing, transformers always materialises the attention mask ([B, 1, Tq, Tkv] bool, built
from aranges, position_ids and the padding mask) because it cannot look at data. A tensor mask
keeps SDPA off its flash backend: at 16k tokens the masked kernel is much slower than flash, and the
mask itself costs Tq*Tkv bytes. The pass proves what the mask is by evaluating its producer cone in
the top-level graph:
  * producers that are not full [Tq, Tkv] tensors (aranges, position ids, per-row vectors), and
    full ones up to `eval_limit` elements, are evaluated on the CPU with real values;
  * a comparison of a q-side vector with a kv-side vector (`kv_idx <= q_idx`, `seg[q] == seg[kv]`)
    is kept symbolic as a pair of vectors and classified: equal strictly-increasing vectors under
    `q >= kv` are the causal mask; equal constant vectors under `==` are all-true;
  * `&` of such terms is a conjunction; device moves and expands keep the value.
With symbolic sizes (dynamic shapes) nothing can be evaluated; the producers are then interpreted
in an affine algebra (see `affine_op`). Anything else (a graph input such as a padding
`attention_mask` or packed `position_ids`, sliding windows, other float masks) is declined with the
reason and the mask is left in place. HF's additive eager mask, `where(mask, 0, finfo.min)` (what
the eager_attention pass hands SDPA), is analysed through its boolean `mask`: where that is causal
or all-true every row keeps a key, and adding -3.4e38 then equals excluding (see
`additive_mask_source`).
The mask then has no users: its subgraph input and its producers are removed.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .manager import GraphPass, PassStats
from .mask_analysis import SDPA, classify, drop_unused_masks, mask_verdict, masked_sdpa_sites, size_eq, sym
from .pattern import Decline, example_value, match_at, sdpa_params


class CausalMaskPass(GraphPass):
    name = "causal_mask"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.passes.mask_analysis")

    def __init__(self, eval_limit: int = 1 << 20):
        self.eval_limit = eval_limit
        self.config = {"eval_limit": eval_limit}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        verdicts: dict[fx.Node, Any] = {}  # top-level mask node -> verdict or Decline
        cones: dict[fx.Node, set] = {}
        for sub, node, site in masked_sdpa_sites(gm, stats, self.name):
            try:
                match_at(SDPA, SDPA, node)
                verdict = self._verdict(gm, sub, node, verdicts, cones)
            except Decline as e:
                site.reason = str(e)
                continue
            params = sdpa_params(node)
            q, k = example_value(params["query"]), example_value(params["key"])
            if verdict == "causal" and not size_eq(sym(q.shape[-2]), sym(k.shape[-2])):
                site.reason = "causal mask with Tq != Tkv (SDPA's is_causal is top-left aligned)"
                continue
            if params.get("is_causal"):
                site.reason = "SDPA already has is_causal=True and a mask"
                continue
            params.update(attn_mask=None, is_causal=verdict == "causal")
            q, k, v = (params.pop(n) for n in ("query", "key", "value"))
            node.args, node.kwargs = (q, k, v), params
            # the SDPA call is rewritten in place: the group names that call and what it became
            site.rewritten, site.group = True, f"{node.name}:{'is_causal' if verdict == 'causal' else 'no mask'}"
        proven = {top: cones[top] for top, v in verdicts.items() if not isinstance(v, Decline)}
        drop_unused_masks(gm, proven)

    def _verdict(self, gm, sub, node, verdicts, cones) -> str:
        return mask_verdict(gm, sub, node, verdicts, cones, self.eval_limit, classify)
