"""What an attention mask is, proven from its producers in the graph: the machinery the causal-mask and
sliding-window passes share (fxfuse/passes/causal_mask.py says how the proof goes).

While tracing, transformers materialises the attention mask ([B, 1, Tq, Tkv] bool) from aranges,
position_ids and the padding mask. `MaskEval` evaluates a mask node's producer cone on the CPU where it
is small, keeps a [Tq, Tkv] comparison as its q-side and kv-side vectors (`Pair`), and with symbolic
sizes interprets the producers in an affine algebra (`Aff`, `SymCmp`). `classify` names causal and
all-true masks; `mask_verdict` runs a judge once per top-level mask; `drop_unused_masks` removes a
proven mask's subgraph inputs and producers once nothing reads them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from .manager import PassStats, Site
from .pattern import Decline, Op, Var, canon, example_value, graphs_of, module_path

SDPA = Op("sdpa", (Var("q"), Var("k"), Var("v"), Var("mask")), name="sdpa", label="scaled_dot_product_attention")

# comparison -> the same comparison with its operands swapped
_FLIP = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt", "eq": "eq", "ne": "ne"}
_COMPARE = {
    operator.le: "le", operator.ge: "ge", operator.lt: "lt", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    torch.le: "le", torch.ge: "ge", torch.lt: "lt", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
}
_COMPARE_METHODS = {"le", "ge", "lt", "gt", "eq", "ne", "__le__", "__ge__", "__lt__", "__gt__", "__eq__", "__ne__"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and"}
_KEEP_METHODS = {"expand", "contiguous", "clone"}  # value-preserving on a mask
_HOPS = {"tag_activation_checkpoint"}
_MAX_EVAL = 1 << 26  # elements of any evaluated producer that is not a [B, H, Tq, Tkv] tensor


@dataclass
class Pair:
    """op(q_side, kv_side): a [.., Tq, Tkv] comparison kept as its two small operands."""
    op: str
    q_side: torch.Tensor  # varies along the batch and query axes only
    kv_side: torch.Tensor  # varies along the batch and key axes only


@dataclass
class Conj:
    """Elementwise AND of terms (small tensors and Pairs)."""
    terms: list


class MaskEval:
    """Evaluates a mask node's producer cone; records the cone for clean-up."""

    def __init__(self, limit: int):
        self.limit = limit
        self.memo: dict[fx.Node, Any] = {}
        self.cone: set[fx.Node] = set()

    def value(self, node: Any) -> Any:
        if isinstance(node, (list, tuple)):
            return type(node)(self.value(a) for a in node)
        if isinstance(node, dict):
            return {k: self.value(v) for k, v in node.items()}
        if isinstance(node, torch.device):
            return torch.device("cpu")  # evaluated here; device moves do not change values
        if not isinstance(node, fx.Node):
            return node
        if node not in self.memo:
            self.memo[node] = self._eval(node)
            self.cone.add(node)
        return self.memo[node]

    def _eval(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if isinstance(example_value(node), torch.SymInt):
                return Sym(str(example_value(node)))
            raise Decline(f"mask depends on graph input {node.name!r} (padding mask or packed position_ids)")
        if node.op not in ("call_function", "call_method"):
            raise Decline(f"mask producer {node.op} {node.target} not analysed")
        args, kwargs = self.value(node.args), self.value(node.kwargs)
        flat = [*args, *kwargs.values()]
        flat += [b for a in flat if isinstance(a, (list, tuple)) for b in a]
        if any(isinstance(a, (Sym, Aff, SymCmp)) for a in flat):
            return affine_op(node, args, kwargs)
        if any(isinstance(a, (Pair, Conj)) for a in flat):
            return self._symbolic(node, args, kwargs)
        ev = example_value(node)
        if isinstance(ev, torch.Tensor):
            if any(not isinstance(s, int) for s in ev.shape):
                raise Decline(f"mask producer {node.name} has symbolic sizes but no symbolic operand")
            if ev.numel() > self.limit and ev.dim() == 4 and ev.shape[-1] > 1 and ev.shape[-2] > 1:
                return self._large(node, args)
            if ev.numel() > _MAX_EVAL:
                raise Decline(f"mask producer {node.name} has {ev.numel()} elements: too large to evaluate")
        return self._run(node, args, kwargs)

    def _run(self, node: fx.Node, args, kwargs) -> Any:
        if node.op == "call_method":
            self_arg, *rest = args
            return getattr(self_arg, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)

    def _compare_kind(self, node: fx.Node) -> Optional[str]:
        if node.op == "call_function":
            return _COMPARE.get(node.target)
        if node.target in _COMPARE_METHODS:
            return node.target.strip("_")
        return None

    def _large(self, node: fx.Node, args) -> Any:
        """A node too large to evaluate: only a q-side vs kv-side comparison is understood."""
        kind = self._compare_kind(node)
        if kind is None or len(args) != 2 or not all(isinstance(a, torch.Tensor) for a in args):
            raise Decline(f"mask op {node.name} ({_name(node)}) on a full [Tq, Tkv] tensor is not analysed")
        a, b = (_as4d(t) for t in args)
        if _varies(a) <= {0, 2} and _varies(b) <= {0, 3}:
            return Pair(kind, a, b)
        if _varies(a) <= {0, 3} and _varies(b) <= {0, 2}:
            return Pair(_FLIP[kind], b, a)
        raise Decline(f"mask comparison {node.name} does not compare a query-side with a key-side vector")

    def _symbolic(self, node: fx.Node, args, kwargs) -> Any:
        t = node.target
        if _is_and(node):
            if len(args) != 2 or kwargs:
                raise Decline(f"mask op {node.name} ({_name(node)}) has unexpected arguments")
            return Conj([term for a in args for term in (a.terms if isinstance(a, Conj) else [a])])
        if node.op == "call_method" and (t in _KEEP_METHODS or (t == "to" and _is_device_move(node))):
            return args[0]
        raise Decline(f"mask op {node.name} ({_name(node)}) on a full [Tq, Tkv] tensor is not analysed")


def _is_and(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _AND) or (node.op == "call_method" and node.target in _AND_METHODS)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_device_move(node: fx.Node) -> bool:
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return all(isinstance(a, (torch.device, str)) or a is None for a in rest) and canon(node) is None


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _varies(t: torch.Tensor) -> set[int]:
    return {i for i, s in enumerate(t.shape) if s > 1}


def rows(side: torch.Tensor, axis: int, batch: int) -> torch.Tensor:
    """A [B, 1, Tq, 1] / [B, 1, 1, Tkv] vector as [batch, T]."""
    v = side.squeeze(1).squeeze(1 if axis == 3 else 2) if side.dim() == 4 else side
    return v.expand(batch, v.shape[-1]) if v.shape[0] == 1 else v


# ---------------------------------------------------------------- symbolic sizes (dynamic shapes)
# With symbolic sizes nothing can be evaluated, but HF's mask producers are affine in the indices:
# aranges, offsets, expands, first-element slices, `diff` of an arange, constant comparisons and
# gathers. An integer tensor is kept as Aff (value at index i = c + sum(coefs[k] * i[k])); a
# comparison of two non-constant Affs as SymCmp. Anything outside this algebra is declined.


@dataclass(frozen=True)
class Sym:
    """A symbolic size (a SymInt graph input), compared by its expression."""
    expr: str


def size_eq(a, b) -> bool:
    return (isinstance(a, int) and isinstance(b, int) and a == b) or str(a) == str(b)


def sym(v):
    if isinstance(v, torch.SymInt):
        return Sym(str(v))
    return v


@dataclass
class Aff:
    """Integer tensor whose element at index i is c + sum(coefs[k] * i[k])."""
    shape: tuple
    coefs: tuple
    c: int

    def __post_init__(self):
        # an axis of size 1 only ever has index 0: its coefficient does not matter
        self.coefs = tuple(0 if size_eq(n, 1) else a for n, a in zip(self.shape, self.coefs))

    @property
    def constant(self) -> bool:
        return not any(self.coefs)

    def left_pad(self, ndim: int) -> "Aff":
        k = ndim - len(self.shape)
        return Aff((1,) * k + self.shape, (0,) * k + self.coefs, self.c)


@dataclass
class SymCmp:
    """`diff <op> 0` elementwise, op in ge/gt/eq/ne."""
    op: str
    diff: Aff


def _as_aff(v) -> Aff:
    if isinstance(v, Aff):
        return v
    if isinstance(v, bool) or isinstance(v, int):
        return Aff((), (), int(v))
    if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.numel() > 0:
        t = v.to(torch.int64)
        coefs = tuple(int(t.narrow(k, 1, 1).flatten()[0] - t.flatten()[0]) if n > 1 else 0
                      for k, n in enumerate(t.shape))
        fit = t.flatten()[0] + sum(a * torch.arange(n).view([-1 if j == k else 1 for j in range(t.dim())])
                                   for k, (n, a) in enumerate(zip(t.shape, coefs)))
        if torch.equal(torch.as_tensor(fit).expand(t.shape), t):
            return Aff(tuple(t.shape), coefs, int(t.flatten()[0]))
    raise Decline(f"mask operand {type(v).__name__} is not an affine index tensor")


def _broadcast(*shapes) -> tuple:
    ndim = max(len(s) for s in shapes)
    out = []
    for k in range(ndim):
        sizes = [s[k - ndim + len(s)] for s in shapes if k - ndim + len(s) >= 0]
        big = [n for n in sizes if not size_eq(n, 1)]
        if any(not size_eq(n, big[0]) for n in big):
            raise Decline(f"mask operands do not broadcast: {shapes}")
        out.append(big[0] if big else 1)
    return tuple(out)


def _combine(a: Aff, b: Aff, sign: int) -> Aff:
    shape = _broadcast(a.shape, b.shape)
    a, b = a.left_pad(len(shape)), b.left_pad(len(shape))
    return Aff(shape, tuple(x + sign * y for x, y in zip(a.coefs, b.coefs)), a.c + sign * b.c)


_NORMALISE = {"ge": ("ge", 1), "gt": ("gt", 1), "le": ("ge", -1), "lt": ("gt", -1), "eq": ("eq", 1), "ne": ("ne", 1)}


def _compare(kind: str, a, b):
    op, sign = _NORMALISE[kind]
    d = _combine(_as_aff(a), _as_aff(b), -1)
    if sign < 0:
        d = Aff(d.shape, tuple(-x for x in d.coefs), -d.c)
    if d.constant:
        truth = {"ge": d.c >= 0, "gt": d.c > 0, "eq": d.c == 0, "ne": d.c != 0}[op]
        return Aff(d.shape, d.coefs, int(truth))
    return SymCmp(op, d)


def _basic_index(x: Aff, index: tuple) -> Aff:
    shape, coefs, c, k = [], [], x.c, 0
    for item in index:
        if item is None:
            shape.append(1)
            coefs.append(0)
            continue
        if not isinstance(item, slice) or item.step not in (None, 1) or k >= len(x.shape):
            raise Decline(f"mask indexing {index} is not analysed")
        n, a = x.shape[k], x.coefs[k]
        start = item.start or 0
        if item.start is not None and not isinstance(item.start, int) or start < 0:
            raise Decline(f"mask indexing {index} is not analysed")
        if item.stop is None:
            if start != 0:
                raise Decline(f"mask indexing {index} is not analysed")
            size = n
        elif isinstance(item.stop, int) and item.stop > start:
            size = item.stop - start  # as long as the axis is that long, which a slice of a size>=1 axis is
            if start + size > 1 and not (isinstance(n, int) and n >= start + size):
                raise Decline(f"mask indexing {index} may run past a symbolic size")
        else:
            raise Decline(f"mask indexing {index} is not analysed")
        shape.append(size)
        coefs.append(a)
        c += a * start
        k += 1
    shape += x.shape[k:]
    coefs += x.coefs[k:]
    return Aff(tuple(shape), tuple(coefs), c)


def affine_op(node: fx.Node, args, kwargs):
    """One producer op over symbolic operands, in the affine algebra, or Decline."""
    t, method = node.target, node.op == "call_method"
    args = tuple(sym(a) for a in args)
    what = f"mask op {node.name} ({_name(node)}) with symbolic sizes is not analysed"
    if not method and t is torch.arange:
        if len(args) != 1 or set(kwargs) - {"device", "dtype"} or kwargs.get("dtype") not in (None, torch.int64):
            raise Decline(what)
        return Aff((args[0],), (1,), 0)
    if (not method and t in (operator.add, operator.sub, torch.add, torch.sub)) or t in ("add", "sub", "__add__", "__sub__"):
        if len(args) != 2 or kwargs:
            raise Decline(what)
        return _combine(_as_aff(args[0]), _as_aff(args[1]), 1 if _name(node).strip("_") == "add" else -1)
    if method and t == "unsqueeze":
        x, d = _as_aff(args[0]), args[1]
        d = d if d >= 0 else d + len(x.shape) + 1
        return Aff(x.shape[:d] + (1,) + x.shape[d:], x.coefs[:d] + (0,) + x.coefs[d:], x.c)
    if not method and t is operator.getitem:
        x, index = args
        index = index if isinstance(index, tuple) else (index,)
        if all(i is None or isinstance(i, slice) for i in index):
            return _basic_index(_as_aff(x), index)
        # advanced indexing: one index tensor per axis; the result broadcasts the indices
        x = _as_aff(x)
        if len(index) != len(x.shape):
            raise Decline(what)
        idx = [_as_aff(i) for i in index]
        shape = _broadcast(*(i.shape for i in idx))
        out = Aff(shape, (0,) * len(shape), x.c)
        for a, i in zip(x.coefs, idx):
            out = _combine(out, Aff(i.shape, tuple(a * v for v in i.coefs), a * i.c), 1)
        return out
    if method and t == "expand":
        x = args[0]
        sizes = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else tuple(args[1])
        if isinstance(x, (SymCmp, Conj)):
            return x
        x = _as_aff(x).left_pad(len(sizes))
        shape = tuple(x.shape[k] if size_eq(n, -1) else n for k, n in enumerate(sizes))
        for old, new in zip(x.shape, shape):
            if not size_eq(old, 1) and not size_eq(old, new):
                raise Decline(what)
        return Aff(shape, x.coefs, x.c)
    if not method and t is torch.diff:
        x, prepend, dim = args[0], kwargs.get("prepend"), kwargs.get("dim", -1)
        if len(args) != 1 or kwargs.get("n", 1) != 1 or prepend is None or kwargs.keys() - {"prepend", "dim"}:
            raise Decline(what)
        x, p = _as_aff(x), _as_aff(prepend).left_pad(len(_as_aff(x).shape))
        d = dim if dim >= 0 else dim + len(x.shape)
        a = x.coefs[d]
        # x[0] - prepend must equal the step a, with prepend varying like x on the other axes
        same_elsewhere = all(p.coefs[k] == x.coefs[k] for k in range(len(x.shape)) if k != d)
        if not (size_eq(p.shape[d], 1) and same_elsewhere and x.c - p.c == a):
            raise Decline("mask: position differences are not constant (packed sequences?)")
        return Aff(x.shape, (0,) * len(x.shape), a)
    kind = _COMPARE.get(t) if not method else (t.strip("_") if t in _COMPARE_METHODS else None)
    if kind is not None:
        if len(args) != 2 or kwargs:
            raise Decline(what)
        return _compare(kind, args[0], args[1])
    if method and t == "cumsum":
        x, d = _as_aff(args[0]), args[1] if len(args) > 1 else kwargs.get("dim")
        if not x.constant or not isinstance(d, int):
            raise Decline(what)
        d = d if d >= 0 else d + len(x.shape)
        coefs = tuple(x.c if k == d else 0 for k in range(len(x.shape)))
        return Aff(x.shape, coefs, x.c)
    if method and t == "new_ones" and args[1:] in ((), ((),)) and set(kwargs) <= {"dtype", "device"}:
        return Aff((), (), 1)
    if _is_and(node):
        terms = [term for a in args for term in (a.terms if isinstance(a, Conj) else [a])]
        return Conj(terms)
    if method and (t in _KEEP_METHODS or (t == "to" and _is_device_move(node))):
        return args[0]
    raise Decline(what)


def classify(value: Any, mask_shape: tuple) -> str:
    """'causal' or 'none' (all true) for an evaluated mask, else Decline with what it is."""
    b, _, tq, tkv = mask_shape
    terms = value.terms if isinstance(value, Conj) else [value]
    causal = False
    for term in terms:
        if isinstance(term, (Aff, SymCmp)):
            causal |= _classify_affine(term, mask_shape)
            continue
        if isinstance(term, torch.Tensor):
            term = term.to(torch.bool)
            if bool(term.all()):
                continue
            full = torch.ones(tq, tkv, dtype=torch.bool).tril().expand(mask_shape)
            if tq == tkv and term.shape[-2:] == (tq, tkv) and torch.equal(term.expand(mask_shape), full):
                causal = True
                continue
            raise Decline("mask has masked positions that are not the causal pattern")
        q, kv = rows(term.q_side, 2, b), rows(term.kv_side, 3, b)
        same = q.shape == kv.shape and torch.equal(q, kv)
        constant_rows = bool((q == q[:, :1]).all()) and bool((kv == kv[:, :1]).all())
        if same and constant_rows and term.op in ("eq", "le", "ge"):
            continue
        if same and term.op == "ge" and tq == tkv and bool((q[:, 1:] > q[:, :-1]).all()):
            causal = True  # kv_idx <= q_idx over one strictly increasing index
            continue
        what = "packed-sequence segments" if term.op == "eq" else "a window or offset"
        raise Decline(f"mask term q {term.op} kv is not causal ({what}?)")
    return "causal" if causal else "none"


def _classify_affine(term, mask_shape: tuple) -> bool:
    """True for the causal term, False for an all-true one; Decline otherwise."""
    if isinstance(term, Aff):
        if term.constant and term.c != 0:
            return False
        raise Decline("mask term is not all-true (constant false or index-valued)")
    d = term.diff.left_pad(4)
    if len(d.shape) != 4:
        raise Decline("mask term is not 4-D [batch, head, q, kv]")
    if term.op == "ge" and d.coefs == (0, 0, 1, -1) and d.c == 0:
        if not size_eq(sym(mask_shape[2]), sym(mask_shape[3])):
            raise Decline("causal mask with Tq != Tkv (SDPA's is_causal is top-left aligned)")
        return True  # q - kv >= 0
    what = "a window or offset" if term.op in ("ge", "gt") else "packed-sequence segments"
    raise Decline(f"mask term {term.op} over indices {d.coefs} + {d.c} is not causal ({what}?)")


def masked_sdpa_sites(gm: fx.GraphModule, stats: PassStats, pass_name: str):
    """(graph, node, site) for each SDPA call with a mask in `gm` and its subgraphs; the site (not yet
    rewritten) is recorded in `stats` first."""
    for gname, sub in graphs_of(gm):
        for node in list(sub.graph.nodes):
            c = canon(node)
            if c is None or c.kind != "sdpa" or c.operands[3] is None:
                continue
            site = Site(pass_name, module_path(node), node.name, gname, False)
            stats.sites.append(site)
            yield sub, node, site


def mask_verdict(gm, sub, node, verdicts: dict, cones: dict, eval_limit: int, judge) -> Any:
    """judge(evaluated mask, its shape) for an SDPA node's mask, once per top-level mask (`verdicts`
    keeps it, or the Decline; `cones` the producers to drop once proven). Raises the Decline."""
    mask = canon(node).operands[3]
    ev = example_value(mask)
    if not isinstance(ev, torch.Tensor) or ev.dim() != 4:
        raise Decline("mask is not a 4-D tensor")
    if ev.dtype != torch.bool and not ev.is_floating_point():
        raise Decline(f"mask dtype {ev.dtype} is neither boolean nor additive float")
    top = top_level(gm, sub, mask)
    if top not in verdicts:
        evaluator = MaskEval(eval_limit)
        extra: set = set()
        try:
            source = top
            if ev.dtype != torch.bool:
                source, extra = additive_mask_source(top)
            verdicts[top] = judge(evaluator.value(source), tuple(example_value(source).shape))
        except Decline as e:
            verdicts[top] = e
        except Exception as e:  # an op we could not evaluate: decline, never guess
            verdicts[top] = Decline(f"mask evaluation failed: {type(e).__name__}: {e}")
        cones[top] = evaluator.cone | extra
    if isinstance(verdicts[top], Decline):
        raise verdicts[top]
    return verdicts[top]


# An additive mask adds at most this to a masked score. HF's eager masks add finfo(dtype).min
# (-3.4e38 in fp32 and bf16): exp(score + that - rowmax) is exactly 0 in fp32 for any finite score,
# so where every row keeps a key (causal, all-true) the additive mask equals the boolean one.
# fp16's min (-65504) is not far enough below fp16 scores for that to hold: declined.
_ADDITIVE_MASKED_MAX = -1e30


def additive_mask_source(node: fx.Node) -> tuple[fx.Node, set]:
    """(boolean mask, nodes to drop with it) for HF's additive mask `where(mask, 0, very negative)`;
    Decline for any other float mask."""
    if not (node.op == "call_function" and node.target is torch.where and len(node.args) == 3 and not node.kwargs):
        raise Decline("additive float mask not of the form where(mask, 0, finfo.min): not analysed")
    cond, keep, masked = node.args
    extra = {node}
    if isinstance(keep, fx.Node):
        # HF passes the zero as torch.tensor(0.0, device=..., dtype=...)
        if not (keep.op == "call_function" and keep.target is torch.tensor and keep.args[:1] == (0.0,)
                and len(keep.args) == 1):
            raise Decline("additive mask keeps a value that is not 0")
        extra.add(keep)
    elif keep != 0:
        raise Decline(f"additive mask keeps {keep!r}, not 0")
    if isinstance(masked, bool) or not isinstance(masked, (int, float)) or masked > _ADDITIVE_MASKED_MAX:
        raise Decline(f"additive mask adds {masked!r} where masked: not far enough below the scores to equal "
                      f"a boolean mask (needs <= {_ADDITIVE_MASKED_MAX:g}, e.g. fp32/bf16 finfo.min)")
    cv = example_value(cond)
    if not isinstance(cv, torch.Tensor) or cv.dtype != torch.bool or cv.dim() != 4:
        raise Decline("additive mask's condition is not a 4-D boolean tensor")
    return cond, extra


def _hop_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Subgraph attribute name -> the higher-order-op calls that run it."""
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") in _HOPS:
            body = n.args[0]
            if isinstance(body, fx.Node) and body.op == "get_attr":
                calls.setdefault(body.target, []).append(n)
    return calls


def top_level(gm: fx.GraphModule, sub: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Follow a subgraph placeholder to the top-level node its checkpoint call passes in."""
    if sub is gm:
        return node
    if node.op != "placeholder":
        raise Decline(f"mask is computed inside the subgraph ({node.name}): not analysed")
    for attr, calls in _hop_calls(gm).items():
        if getattr(gm, attr) is sub:
            if len(calls) != 1:
                raise Decline("subgraph is called from several places")
            index = [n for n in sub.graph.nodes if n.op == "placeholder"].index(node)
            return calls[0].args[1 + index]
    raise Decline("mask comes from a subgraph this pass cannot follow to the top level")


def decline_input_masks(gm: fx.GraphModule, sub: fx.GraphModule, mask) -> None:
    """Declines a mask whose producers read a graph input (a padding mask, packed position_ids): it
    can mask every key of a query row (left padding), where eager attends uniformly and torch's fused
    CPU SDPA returns wrong gradients. A mask the analysis cannot follow or evaluate for another
    reason is not declined here. For passes that replace eager attention by a fused kernel."""
    if not isinstance(mask, fx.Node):
        return
    try:
        MaskEval(1 << 20).value(top_level(gm, sub, mask))
    except Decline as e:
        if str(e).startswith("mask depends on graph input"):
            raise Decline(f"{e}: a query row may have every key masked, where torch's fused SDPA "
                          "gives wrong gradients (eager attends uniformly)") from None
    except Exception:
        return


def drop_unused_masks(gm: fx.GraphModule, proven: dict[fx.Node, set]) -> None:
    """Remove the subgraph inputs that carried a proven mask and no longer have readers, then the
    mask's producers that have no users left."""
    for attr, calls in _hop_calls(gm).items():
        sub = getattr(gm, attr)
        if len(calls) != 1 or not isinstance(sub, fx.GraphModule):
            continue
        call = calls[0]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        drop = {i for i, p in enumerate(placeholders) if not p.users and call.args[1 + i] in proven}
        if not drop:
            continue
        for i in drop:
            sub.graph.erase_node(placeholders[i])
        operands = call.args[1:1 + len(placeholders)]
        call.args = (call.args[0], *[a for i, a in enumerate(operands) if i not in drop],
                     *call.args[1 + len(placeholders):])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cone = sorted(set().union(*proven.values()) if proven else set(), key=order.__getitem__, reverse=True)
    for n in cone:
        if not n.users and n.op in ("call_function", "call_method"):
            gm.graph.erase_node(n)
