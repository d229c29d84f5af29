"""GQA pass: SDPA over `repeat_kv`-expanded keys and values -> SDPA over the kv heads themselves
with `enable_gqa=True`.

HF's sdpa attention repeats k and v up to the query heads (`x[:, :, None].expand(B, Hkv, n, T, D)
.reshape(B, Hkv * n, T, D)`) whenever a tensor mask is present, and while tracing a mask always is.
Once the causal-mask pass has replaced that mask by `is_causal=True`, the repeat is waste: it
writes n copies of k and v (at 320k tokens on Llama-8B, 2 x 2.5 GiB per layer) that the attention
then saves for its backward. Flash attention reads the kv heads directly (query head h uses kv head
h // n, the same grouping as repeat_kv). Its backward still expands dk/dv to the query heads
internally, so the saving is the forward copies and what is saved, not the gradient copies.

Declined with the reason: a tensor mask (SDPA with enable_gqa and a mask runs the math kernel,
O(T^2) memory), fp32 on CUDA (no fused kernel takes fp32 with enable_gqa: math again), head dims
that differ or exceed 256, k and v repeated differently, a repeat that is not the grouped
interleave, and expanded k/v read elsewhere (nothing would be saved). SDPA calls without a
repeat on k and v are not candidates (plain multi-head attention).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .manager import GraphPass, PassStats, Site
from .pattern import Decline, canon, check_grouped_repeat, example_value, graphs_of, module_path, repeat_source, \
    same_size, sdpa_params

_MAX_HEAD_DIM = 256  # flash attention's limit


def _dead_shape_queries(node: fx.Node) -> set:
    """Users of `node` that only ask its size and whose answers nobody reads. Under dynamic shapes HF
    slices the mask with `key.shape[-2]`; once the causal-mask pass dropped the mask, that `size`
    call (and its getitems) stay behind inside checkpoint bodies with no readers."""
    dead = set()
    for u in node.users:
        is_size = (u.op == "call_method" and u.target == "size") or \
            (u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",))
        if is_size and all(i.op == "call_function" and i.target is operator.getitem and not i.users
                           for i in u.users):
            dead.add(u)
    return dead


def check(params: dict, k_src, v_src) -> None:
    """Declines what flash attention with enable_gqa would not run, or run differently."""
    if params.get("attn_mask") is not None:
        raise Decline("a tensor mask: SDPA with enable_gqa and a mask runs the math kernel (O(T^2) memory)")
    if params.get("enable_gqa"):
        raise Decline("enable_gqa is already set")
    if k_src is None or v_src is None:
        raise Decline("only one of k and v is repeated")
    if params["key"] is params["value"]:
        raise Decline("k and v are one tensor")
    q = example_value(params["query"])
    kv, vv = example_value(k_src[0]), example_value(v_src[0])
    k_rep, v_rep = example_value(params["key"]), example_value(params["value"])
    if not all(isinstance(t, torch.Tensor) for t in (q, kv, vv, k_rep, v_rep)):
        raise Decline("q, k or v has no recorded value")
    if q.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise Decline("not 4-D [batch, heads, tokens, head_dim] attention")
    if not (same_size(kv.shape[1], vv.shape[1]) and same_size(kv.shape[2], vv.shape[2])):
        raise Decline(f"k {tuple(kv.shape)} and v {tuple(vv.shape)} differ in heads or tokens")
    for src in (k_src, v_src):
        check_grouped_repeat(src, q)
    n_kv, n_q = kv.shape[1], q.shape[1]
    if not (isinstance(n_kv, int) and isinstance(n_q, int) and n_q % n_kv == 0 and n_q > n_kv):
        raise Decline(f"{n_q} query heads over {n_kv} kv heads is not grouped-query attention")
    if not (same_size(q.shape[-1], kv.shape[-1]) and same_size(kv.shape[-1], vv.shape[-1])):
        raise Decline(f"head dims differ (q {q.shape[-1]}, k {kv.shape[-1]}, v {vv.shape[-1]})")
    if isinstance(kv.shape[-1], int) and kv.shape[-1] > _MAX_HEAD_DIM:
        raise Decline(f"head dim {kv.shape[-1]} > {_MAX_HEAD_DIM}: no fused kernel, SDPA would run the math kernel")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise Decline("fp32 attention on CUDA: no fused kernel takes fp32 with enable_gqa (math kernel)")
    if q.device.type == "cuda" and isinstance(q.shape[-1], int) and q.shape[-1] > 192 \
            and torch.cuda.is_available() and torch.cuda.get_device_capability(q.device) not in ((8, 0), (9, 0)):
        # flash's backward takes head dims over 192 only on sm80/sm90; elsewhere GQA would fall to math
        raise Decline(f"head dim {q.shape[-1]} > 192 on this GPU: flash attention cannot train it (math kernel)")


class SdpaGqaPass(GraphPass):
    name = "sdpa_gqa"
    depends_on = ("fxfuse.passes.pattern",)

    def __init__(self):
        self.config = {}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                c = canon(node)
                if c is None or c.kind != "sdpa":
                    continue
                params = sdpa_params(node)
                k_src, v_src = repeat_source(params.get("key")), repeat_source(params.get("value"))
                if k_src is None and v_src is None:
                    continue  # multi-head attention: nothing repeated
                site = Site(self.name, module_path(node), node.name, gname, False)
                stats.sites.append(site)
                try:
                    check(params, k_src, v_src)
                    others = [v for name, v in params.items() if name not in ("key", "value")]
                    for _, chain in (k_src, v_src):
                        if any(n in others for n in chain):
                            raise Decline(f"repeated k/v {chain[-1].name} is also another SDPA argument")
                        for inner in chain[:-1]:
                            if len(inner.users) != 1:
                                raise Decline(f"repeated k/v intermediate {inner.name} is read elsewhere")
                        users = set(chain[-1].users) - _dead_shape_queries(chain[-1])
                        if users != {node}:
                            raise Decline(f"repeated k/v {chain[-1].name} is read elsewhere: nothing would be saved")
                except Decline as e:
                    site.reason = str(e)
                    continue
                params.update(key=k_src[0], value=v_src[0], enable_gqa=True)
                q, k, v = (params.pop(n) for n in ("query", "key", "value"))
                node.args, node.kwargs = (q, k, v), params
                for _, chain in (k_src, v_src):
                    for query in _dead_shape_queries(chain[-1]):
                        for item in list(query.users):
                            sub.graph.erase_node(item)
                        sub.graph.erase_node(query)
                    for dead in reversed(chain):
                        sub.graph.erase_node(dead)
                site.rewritten, site.group = True, f"{node.name}:enable_gqa"
