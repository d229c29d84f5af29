"""Shared matching machinery: canonical views of dynamo nodes, patterns as data, a matcher.

Dynamo records the same operation many ways (`torch._C._nn.linear` or `F.linear`, `operator.mul`
or `x.mul(...)`, `x.to(torch.float32)` or `x.to(dtype=...)`, positional or keyword arguments).
`canon(node)` folds them into one (kind, operands, attrs) view, so a pattern is written once.

A pattern is a tree of `Op` / `Opt` / `Var` / `Lit` values matched top-down from a root node. A
pass names one `Op` as its anchor: candidates are the nodes that match the anchor sub-pattern, and
the matcher walks from each anchor up to the root, so every candidate gets either a match or a
reason it was declined.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx

# ---------------------------------------------------------------- canonical node views

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}
_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_DROPOUT = {torch.nn.functional.dropout, torch.dropout, torch.ops.aten.dropout.default}
_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
         torch.ops.aten.scaled_dot_product_attention.default}
_DIV = {operator.truediv, torch.div, torch.true_divide}
_TANH = {torch.tanh, torch.nn.functional.tanh}
_CROSS_ENTROPY = {torch.nn.functional.cross_entropy}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
_POW = {operator.pow, torch.pow}
_RSQRT = {torch.rsqrt}
_MEAN = {torch.mean}
_SILU = {torch.nn.functional.silu}
_GELU = {torch.nn.functional.gelu}
_MATMUL = {torch.matmul, operator.matmul}
_SOFTMAX = {torch.nn.functional.softmax, torch.softmax}
_TRANSPOSE = {torch.transpose}


@dataclass
class Canon:
    kind: str
    operands: tuple
    attrs: dict = field(default_factory=dict)


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def canon(node: Any) -> Optional[Canon]:
    """The canonical view of a node, or None for anything the patterns do not speak about."""
    if not isinstance(node, fx.Node):
        return None
    t = node.target
    if node.op == "call_function":
        if t in _LINEAR:
            return Canon("linear", (_arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")))
        if t in _ADD and "alpha" not in node.kwargs and len(node.args) == 2:
            return Canon("add", tuple(node.args))
        if t in _MUL and len(node.args) == 2:
            return Canon("mul", tuple(node.args))
        if t in _DIV and len(node.args) == 2 and not node.kwargs:
            return Canon("div", tuple(node.args))
        if t in _TANH and len(node.args) == 1 and not node.kwargs:
            return Canon("tanh", (node.args[0],))
        if t in _CROSS_ENTROPY:
            names = ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
            defaults = (None, None, -100, None, "mean", 0.0)
            return Canon("cross_entropy", (_arg(node, 0, "input"), _arg(node, 1, "target")),
                         {k: _arg(node, 2 + i, k, d) for i, (k, d) in enumerate(zip(names, defaults))})
        if t in _DROPOUT:
            train_kw = "training" if t is torch.nn.functional.dropout else "train"
            return Canon("dropout", (_arg(node, 0, "input"),),
                         {"p": _arg(node, 1, "p", 0.5), "training": _arg(node, 2, train_kw, True),
                          "inplace": _arg(node, 3, "inplace", False)})
        if t in _SDPA:
            return Canon("sdpa", tuple(_arg(node, i, n) for i, n in enumerate(("query", "key", "value", "attn_mask"))),
                         {"dropout_p": _arg(node, 4, "dropout_p", 0.0), "is_causal": _arg(node, 5, "is_causal", False),
                          "scale": _arg(node, 6, "scale"), "enable_gqa": node.kwargs.get("enable_gqa", False)})
        if t in _POW and len(node.args) == 2:
            return Canon("pow", tuple(node.args))
        if t in _RSQRT and len(node.args) == 1:
            return Canon("rsqrt", tuple(node.args))
        if t in _MEAN:
            return _mean(node)
        if t in _SILU:
            return Canon("silu", (_arg(node, 0, "input"),), {"inplace": _arg(node, 1, "inplace", False)})
        if t in _GELU:
            return Canon("gelu", (_arg(node, 0, "input"),), {"approximate": _arg(node, 1, "approximate", "none")})
        if t in _MATMUL and len(node.args) == 2 and not node.kwargs:
            return Canon("matmul", tuple(node.args))
        if t in _SOFTMAX:
            return _softmax(node)
        if t in _TRANSPOSE and len(node.args) == 3 and not node.kwargs:
            return Canon("transpose", (node.args[0],), {"dims": tuple(node.args[1:])})
    if node.op == "call_method":
        if t == "matmul" and len(node.args) == 2 and not node.kwargs:
            return Canon("matmul", tuple(node.args))
        if t == "softmax":
            return _softmax(node)
        if t == "transpose" and len(node.args) == 3 and not node.kwargs:
            return Canon("transpose", (node.args[0],), {"dims": tuple(node.args[1:])})
        if t == "pow" and len(node.args) == 2 and not node.kwargs:
            return Canon("pow", tuple(node.args))
        if t == "rsqrt" and len(node.args) == 1 and not node.kwargs:
            return Canon("rsqrt", tuple(node.args))
        if t == "mean":
            return _mean(node)
        if t == "type_as" and len(node.args) == 2 and not node.kwargs:
            # a cast to the other tensor's dtype (Gemma's RMSNorm ends with `.type_as(x)`)
            other = example_value(node.args[1])
            if isinstance(other, torch.Tensor):
                return Canon("to", (node.args[0],), {"dtype": other.dtype})
            return None
        if t == "add" and len(node.args) == 2 and not node.kwargs:
            return Canon("add", tuple(node.args))
        if t == "mul" and len(node.args) == 2 and not node.kwargs:
            return Canon("mul", tuple(node.args))
        if t in ("div", "truediv") and len(node.args) == 2 and not node.kwargs:
            return Canon("div", tuple(node.args))
        if t == "tanh" and len(node.args) == 1 and not node.kwargs:
            return Canon("tanh", (node.args[0],))
        if t in ("view", "reshape") and len(node.args) >= 2 and not node.kwargs:
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return Canon("view", (node.args[0],), {"shape": tuple(shape)})
        if t in _CAST_METHODS and len(node.args) == 1:
            return Canon("to", (node.args[0],), {"dtype": _CAST_METHODS[t]})
        if t == "type" and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
            return Canon("to", (node.args[0],), {"dtype": node.args[1]})  # x.type(dtype) (GPT-2)
        if t == "to":
            if set(node.kwargs) - {"dtype", "non_blocking", "copy"}:
                return None  # a device move (or memory format change), not a pure cast
            dtype = node.kwargs.get("dtype")
            extra = [a for a in node.args[1:] if a is not None]
            if dtype is None and len(extra) == 1 and isinstance(extra[0], torch.dtype):
                dtype = extra[0]
            elif extra:
                return None  # device moves and other overloads are not casts
            if isinstance(dtype, torch.dtype):
                return Canon("to", (node.args[0],), {"dtype": dtype})
    return None


def _softmax(node: fx.Node) -> Optional[Canon]:
    """F.softmax(input, dim, _stacklevel, dtype); torch.softmax(input, dim, *, dtype); x.softmax(dim, dtype)."""
    if len(node.args) > 4 or set(node.kwargs) - {"dim", "dtype", "_stacklevel"}:
        return None
    dtype_pos = 3 if node.target is torch.nn.functional.softmax else 2
    return Canon("softmax", (node.args[0],), {"dim": _arg(node, 1, "dim"), "dtype": _arg(node, dtype_pos, "dtype")})


def _mean(node: fx.Node) -> Optional[Canon]:
    if len(node.args) > 3 or set(node.kwargs) - {"dim", "keepdim", "dtype"}:
        return None
    return Canon("mean", (node.args[0],), {"dim": _arg(node, 1, "dim"), "keepdim": _arg(node, 2, "keepdim", False),
                                           "dtype": node.kwargs.get("dtype")})


def example_value(node: Any) -> Any:
    """The fake value dynamo (`example_value`) or AOT (`val`) recorded for a node."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def module_path(node: fx.Node) -> str:
    """The HF module a node came from (innermost entry of nn_module_stack), for reports."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_module_path(str(path))
    return node.name


def _clean_module_path(path: str) -> str:
    for junk in ("L['self'].", "L['self']", "self."):
        path = path.replace(junk, "")
    path = path.replace("._modules['", ".").replace("']", "").replace("['", ".")
    # newer dynamo spells submodule access through the instance dict
    path = path.replace("__dict__._modules.", "").replace(".__dict__.", ".")
    return path.strip(".")


# ---------------------------------------------------------------- patterns as data


class Pat:
    label = "value"


@dataclass
class Var(Pat):
    """Any operand (node or literal); a second use of the same name must see the same value."""
    name: str
    where: Optional[Callable[[Any], bool]] = None
    label: str = "value"


@dataclass
class Lit(Pat):
    """A Python number captured from the graph (a literal such as the LoRA scaling)."""
    name: str
    label: str = "literal number"


@dataclass
class Op(Pat):
    """An operation of canonical `kind` whose operands match `args` (None operand matches None)."""
    kind: str
    args: tuple
    name: Optional[str] = None
    commutative: bool = False
    label: str = ""

    def __post_init__(self):
        self.label = self.label or self.kind


@dataclass
class Opt(Pat):
    """An optional single-operand op (a cast, a dropout) around `inner`."""
    kind: str
    inner: Pat
    name: Optional[str] = None

    @property
    def label(self):
        return f"optional {self.kind}"


class Match(dict):
    """Captures by name; `.nodes` are the graph nodes consumed by Op/Opt patterns (to be replaced)."""

    def __init__(self):
        super().__init__()
        self.nodes: list[fx.Node] = []
        self.root: Optional[fx.Node] = None

    def copy_state(self):
        return dict(self), list(self.nodes)

    def restore(self, state):
        self.clear()
        self.update(state[0])
        self.nodes[:] = state[1]


class Decline(Exception):
    """A candidate that does not fit; str(self) is the reason shown in reports."""


def _bind(m: Match, name: str, value: Any) -> None:
    if name in m and m[name] is not value:
        raise Decline(f"'{name}' must be the same value in both places, found {_show(m[name])} and {_show(value)}")
    m[name] = value


def _show(v: Any) -> str:
    if isinstance(v, fx.Node):
        c = canon(v)
        return f"`{v.name}`" + (f" ({c.kind})" if c else f" ({v.op} {getattr(v.target, '__name__', v.target)})")
    return repr(v)


def match_pat(pat: Pat, value: Any, m: Match) -> None:
    """Match `pat` against `value`, filling `m`; raises Decline with a reason on mismatch."""
    if pat is None:
        if value is not None:
            raise Decline(f"expected no operand, found {_show(value)}")
        return
    if isinstance(pat, Var):
        if pat.where is not None and not pat.where(value):
            raise Decline(f"{_show(value)} is not a valid {pat.label}")
        _bind(m, pat.name, value)
        return
    if isinstance(pat, Lit):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            why = f"expected a {pat.label}, found {_show(value)}"
            if isinstance(value, fx.Node) and value.op == "call_method" and value.target == "item":
                # torch.compile(dynamic=True) turns Python float attributes into graph inputs
                why += " (a symbolic number: compile with dynamic=None, the default, to keep it a constant)"
            raise Decline(why)
        _bind(m, pat.name, value)
        return
    if isinstance(pat, Opt):
        c = canon(value)
        if c is not None and c.kind == pat.kind:
            state = m.copy_state()
            try:
                if pat.name:
                    _bind(m, pat.name, value)
                m.nodes.append(value)
                match_pat(pat.inner, c.operands[0], m)
                return
            except Decline as through:
                m.restore(state)
                try:
                    match_pat(pat.inner, value, m)
                    return
                except Decline:
                    raise through from None  # the deeper mismatch is the informative one
        match_pat(pat.inner, value, m)
        return
    if isinstance(pat, Op):
        c = canon(value)
        if c is None or c.kind != pat.kind:
            raise Decline(f"expected {pat.label}, found {_show(value)}")
        if len(c.operands) != len(pat.args):
            raise Decline(f"{_show(value)} has {len(c.operands)} operands, pattern wants {len(pat.args)}")
        orders = [c.operands]
        if pat.commutative:
            orders.append(tuple(reversed(c.operands)))
        reason = None
        for ops in orders:
            state = m.copy_state()
            try:
                if pat.name:
                    _bind(m, pat.name, value)
                m.nodes.append(value)
                for sub, operand in zip(pat.args, ops):
                    match_pat(sub, operand, m)
                return
            except Decline as e:
                reason = reason or str(e)
                m.restore(state)
        raise Decline(reason)
    raise TypeError(f"unknown pattern element {pat!r}")


def _path_to(pat: Pat, target: Pat) -> Optional[list[Pat]]:
    """Pattern elements from `pat` down to `target` (inclusive), or None."""
    if pat is target:
        return [pat]
    children = ()
    if isinstance(pat, Op):
        children = pat.args
    elif isinstance(pat, Opt):
        children = (pat.inner,)
    for ch in children:
        if isinstance(ch, Pat):
            sub = _path_to(ch, target)
            if sub is not None:
                return [pat] + sub
    return None


def find_root(pattern: Pat, anchor: Op, node: fx.Node) -> fx.Node:
    """Walk from a node matching `anchor` up to the node the pattern's root must match.

    Inner nodes must have exactly one user (the pattern is a tree); optional wrappers are taken
    when the only user is of their kind.
    """
    path = _path_to(pattern, anchor)
    if path is None:
        raise ValueError("anchor is not part of the pattern")
    current = node
    for parent in reversed(path[:-1]):
        users = list(current.users)
        if isinstance(parent, Opt):
            if len(users) == 1 and (c := canon(users[0])) is not None and c.kind == parent.kind:
                current = users[0]
            continue
        if len(users) != 1:
            raise Decline(f"{_show(current)} has {len(users)} users; the pattern needs it to feed "
                          f"one {parent.label} only")
        current = users[0]
    return current


def check_convex(m: Match) -> None:
    """Every replaced node except the root may only be used inside the match."""
    inside = set(m.nodes)
    for n in m.nodes:
        if n is m.root:
            continue
        for u in n.users:
            if u not in inside:
                raise Decline(f"{_show(n)} is also used by {_show(u)} outside the pattern (not convex)")


def match_at(pattern: Pat, anchor: Op, node: fx.Node) -> Match:
    """Match `pattern` around a node that matched `anchor`; raises Decline with the reason."""
    root = find_root(pattern, anchor, node)
    m = Match()
    m.root = root
    match_pat(pattern, root, m)
    if node not in m.nodes:
        raise Decline(f"the pattern matched at {_show(root)} but not through this site")
    check_convex(m)
    return m


def is_anchor(anchor: Op, node: fx.Node) -> bool:
    try:
        match_pat(anchor, node, Match())
        return True
    except Decline:
        return False


# ---------------------------------------------------------------- walking graphs and subgraphs


def graphs_of(gm: fx.GraphModule, prefix: str = "") -> Iterator[tuple[str, fx.GraphModule]]:
    """The graph and every subgraph module (checkpoint bodies `wrap_body_N`, other HOP bodies)."""
    yield prefix or "<top>", gm
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            yield from graphs_of(child, f"{prefix}.{name}" if prefix else name)


def sdpa_params(node: fx.Node) -> dict:
    """An SDPA call's arguments by name, positional or keyword (for passes that rewrite the call)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    params = dict(zip(names, node.args))
    params.update(node.kwargs)
    return params


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Ops per canonical kind (or target name) over the graph and all subgraphs, for tests/diffs."""
    counts: dict[str, int] = {}
    for _, g in graphs_of(gm):
        for n in g.graph.nodes:
            if n.op not in ("call_function", "call_method"):
                continue
            c = canon(n)
            key = c.kind if c else (n.target if isinstance(n.target, str) else _target_name(n.target))
            counts[key] = counts.get(key, 0) + 1
    return counts


def _target_name(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverloadPacket) or isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


# ---------------------------------------------------------------- repeat_kv (GQA) as data

_FULL = slice(None, None, None)
# repeat_kv, as data: x[:, :, None, :, :] -> .expand(B, Hkv, n, T, D) -> .reshape(B, Hkv * n, T, D)
REPEAT_KV = (
    ("getitem", lambda n: n.op == "call_function" and n.target is operator.getitem
     and n.args[1] == (_FULL, _FULL, None, _FULL, _FULL)),
    ("expand", lambda n: n.op == "call_method" and n.target == "expand"),
    ("reshape", lambda n: n.op == "call_method" and n.target in ("reshape", "view")),
)


def repeat_source(node) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(kv, [getitem, expand, reshape]) when `node` is repeat_kv(kv), else None."""
    chain = []
    cur = node
    for _, is_step in reversed(REPEAT_KV):
        if not isinstance(cur, fx.Node) or not is_step(cur):
            return None
        chain.append(cur)
        cur = cur.args[0]
    return cur, chain[::-1]


def same_size(a, b) -> bool:
    """Sizes equal: ints by value, symbolic sizes by expression."""
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def check_grouped_repeat(found: tuple, q: torch.Tensor) -> None:
    """Declines a repeat_source() chain that is not the grouped interleave of [B, Hkv, T, D] kv heads up to
    q's heads (query head h reads kv head h // n): the result must be [B, Hq, T, D] and the expand must grow
    only the inserted axis."""
    src_node, chain = found
    src, rep, grown = example_value(src_node), example_value(chain[2]), example_value(chain[1])
    if not all(isinstance(t, torch.Tensor) for t in (src, rep, grown)) or src.dim() != 4 or grown.dim() != 5:
        raise Decline("repeat_kv without recorded 4-D values")
    if not all(same_size(a, b) for a, b in zip(rep.shape, (src.shape[0], q.shape[1], src.shape[2], src.shape[3]))):
        raise Decline(f"repeat {tuple(src.shape)} -> {tuple(rep.shape)} does not give the {q.shape[1]} query heads")
    n = q.shape[1] // src.shape[1] if isinstance(q.shape[1], int) and isinstance(src.shape[1], int) else None
    want = (src.shape[0], src.shape[1], n, src.shape[2], src.shape[3])
    if not all(w is not None and same_size(g, w) for g, w in zip(grown.shape, want)):
        raise Decline(f"expand to {tuple(grown.shape)} is not repeat_kv's (B, Hkv, n, T, D)")
