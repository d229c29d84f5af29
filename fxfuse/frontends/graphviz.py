"""Pictures of traced graphs for `fxfuse dump`: DOT text with the nodes grouped by HF module (one
cluster per decoder layer, one sub-cluster per module inside it), the nodes a pass added
highlighted and the nodes a pass removes marked; SVG through Graphviz's `dot`; one self-contained
HTML page whose decoder layers fold open and shut.

Everything here reads graph structure only (nodes, their module stacks and fake values), so the
pictures of a new pass's output need no change here.
"""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..passes.pattern import canon, example_value, graphs_of, module_path

# The first ModuleList item of a module path (`...layers.3`, `...h.3`): a decoder layer.
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_PARAM = re.compile(r"_(parameters|buffers)_(\w+?)_$")
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}
ADDED_FILL, REMOVED_FILL = "#9be59b", "#f5b7b1"


class GraphvizMissing(RuntimeError):
    """Graphviz's `dot` is not installed (the caller falls back to writing .dot files)."""


@dataclass
class Picture:
    """One graph at one stage: `added` are the keys of nodes new at this stage (highlighted),
    `removed` the keys of nodes the next stage erases (marked). Keys are "graph/node"."""
    title: str
    gm: fx.GraphModule
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)


def node_keys(gm: fx.GraphModule) -> set[str]:
    return {f"{g}/{n.name}" for g, sub in graphs_of(gm) for n in sub.graph.nodes}


def module_of(node: fx.Node) -> str:
    """The HF module a node came from, or "" (module_path falls back to the node's name)."""
    return module_path(node) if node.meta.get("nn_module_stack") else ""


def layer_of(module: str) -> str:
    m = _LAYER.match(module)
    return m.group(1) if m else ""


def short(path: str) -> str:
    """A module path without PEFT's wrapper prefix (`base_model.model.`)."""
    return path.removeprefix("base_model.model.")


# ---------------------------------------------------------------- graph model


@dataclass
class _Node:
    key: str
    label: str
    tooltip: str
    layer: str
    part: str  # the layer's child module (self_attn, mlp, ...) or ""
    kind: str  # "added" | "removed" | "input" | "op"


@dataclass
class _View:
    nodes: dict[str, _Node] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)


def _op_label(n: fx.Node) -> str:
    c = canon(n)
    if c is not None:
        return c.kind
    t = n.target
    if n.op == "call_method":
        return f".{t}"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t).removeprefix("torch.ops.").removesuffix(".default")
    return getattr(t, "__name__", str(t))


def _value_label(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"[{','.join(map(str, v.shape))}] {_DTYPES.get(v.dtype, str(v.dtype).removeprefix('torch.'))}"
    if isinstance(v, (tuple, list)):
        return f"{len(v)} outputs"
    return ""


def _view(pic: Picture) -> _View:
    view = _View()
    subgraph_calls = {}  # subgraph name -> the node that calls it
    graphs = list(graphs_of(pic.gm))
    for gname, sub in graphs:
        layers_here = Counter(layer_of(module_of(n)) for n in sub.graph.nodes)
        default_layer = layers_here.most_common(1)[0][0] if gname != "<top>" and layers_here else ""
        for n in sub.graph.nodes:
            if n.op == "get_attr" and isinstance(getattr(sub, str(n.target), None), fx.GraphModule):
                continue  # a subgraph handle: the subgraph's own nodes are drawn instead
            key = f"{gname}/{n.name}"
            module = module_of(n)
            layer = layer_of(module) or default_layer
            rest = module[len(layer) + 1:] if layer and module.startswith(layer + ".") else ""
            value = _value_label(example_value(n))
            if n.op in ("placeholder", "get_attr"):
                m = _PARAM.search(n.name)
                tail = ".".join(short(module).split(".")[-2:]) if module else ""
                label = f"{tail}.{m.group(2)}" if m and tail else n.name
                kind = "input"
            else:
                label = _op_label(n)
                kind = "op"
            if key in pic.added:
                kind = "added"
            elif key in pic.removed:
                kind = "removed"
            tooltip = f"{n.name} ({n.op} {n.target})" + (f" in {short(module)}" if module else "")
            view.nodes[key] = _Node(key, label + (f"\n{value}" if value else ""), tooltip, layer,
                                    rest.split(".")[0] if rest else "", kind)
            for a in _node_args(n):
                if isinstance(a, fx.Node) and a.op == "get_attr" and isinstance(
                        getattr(sub, str(a.target), None), fx.GraphModule):
                    subgraph_calls[str(a.target) if gname == "<top>" else f"{gname}.{a.target}"] = (key, n, gname)
                else:
                    view.edges.append((f"{gname}/{a.name}", key))
    # A higher-order op (checkpoint) passes its operands to the subgraph's placeholders in order
    # and returns what the subgraph's output returns.
    for gname, sub in graphs:
        if gname not in subgraph_calls:
            continue
        call_key, call, parent = subgraph_calls[gname]
        operands = [a for a in call.args[1:] if isinstance(a, fx.Node)]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(operands) == len(placeholders):
            view.edges += [(f"{parent}/{a.name}", f"{gname}/{p.name}") for a, p in zip(operands, placeholders)]
        out = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
        view.edges.append((f"{gname}/{out.name}", call_key))
    view.edges = [(a, b) for a, b in dict.fromkeys(view.edges) if a in view.nodes and b in view.nodes]
    return view


def _node_args(n: fx.Node) -> list:
    out: list = []
    fx.node.map_arg((n.args, n.kwargs), out.append)
    return out


# ---------------------------------------------------------------- DOT


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dom_id(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", key)


_STYLE = {
    "op": 'shape=box style="rounded,filled" fillcolor="#ffffff"',
    "input": 'shape=ellipse style=filled fillcolor="#eeeeee" fontsize=8 color="#999999"',
    "added": f'shape=box style="rounded,filled,bold" fillcolor="{ADDED_FILL}" penwidth=2',
    "removed": f'shape=box style="rounded,filled,dashed" fillcolor="{REMOVED_FILL}"',
}
_CLASS = {"op": "op", "input": "input", "added": "rewritten", "removed": "removed"}


def _node_line(n: _Node, href: str = "") -> str:
    extra = f" href={_q(href)} target=_self" if href else ""
    return (f"  {_q(n.key)} [label={_q(n.label)} tooltip={_q(n.tooltip)} id={_q(_dom_id(n.key))} "
            f"class={_q(_CLASS[n.kind])} {_STYLE[n.kind]}{extra}];")


def _header(title: str) -> list[str]:
    return [f"digraph {_q(title)} {{",
            f"  label={_q(title)} labelloc=t fontname=Helvetica fontsize=12 rankdir=TB nodesep=0.15 ranksep=0.25;",
            "  node [fontname=Helvetica fontsize=9 height=0.25 margin=\"0.06,0.02\"];",
            "  edge [color=\"#777777\" arrowsize=0.5];"]


def _layer_summary(nodes: list[_Node]) -> str:
    kinds = Counter(n.kind for n in nodes)
    bits = [f"{len(nodes)} nodes"]
    if kinds["added"]:
        bits.append(f"{kinds['added']} rewritten")
    if kinds["removed"]:
        bits.append(f"{kinds['removed']} removed")
    return ", ".join(bits)


def to_dot(pic: Picture) -> str:
    """The whole graph: one cluster per decoder layer, a sub-cluster per module inside it."""
    view = _view(pic)
    lines = _header(pic.title)
    by_layer: dict[str, dict[str, list[_Node]]] = defaultdict(lambda: defaultdict(list))
    for n in view.nodes.values():
        by_layer[n.layer][n.part].append(n)
    for i, (layer, parts) in enumerate(by_layer.items()):
        if layer:
            members = [n for ns in parts.values() for n in ns]
            lines.append(f"  subgraph {_q(f'cluster_{i}')} {{ label={_q(short(layer) + ': ' + _layer_summary(members))} "
                         f"id={_q('layer:' + layer)} class=\"layer\" style=rounded color=\"#5577aa\";")
        for j, (part, nodes) in enumerate(parts.items()):
            nested = bool(layer and part and len(nodes) > 1)
            if nested:
                lines.append(f"  subgraph {_q(f'cluster_{i}_{j}')} {{ label={_q(part)} id={_q(_dom_id(f'part:{layer}.{part}'))} class=\"part\" style=dashed color=\"#aaaaaa\";")
            lines += [_node_line(n) for n in nodes]
            if nested:
                lines.append("  }")
        if layer:
            lines.append("  }")
    lines += [f"  {_q(a)} -> {_q(b)};" for a, b in view.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def overview_dot(pic: Picture, anchor) -> tuple[str, list[tuple[str, list[_Node]]]]:
    """The graph with every decoder layer folded into one node that links to `anchor(layer)`.
    Returns the DOT text and the layers (name, nodes) in graph order."""
    view = _view(pic)
    layers: dict[str, list[_Node]] = defaultdict(list)
    for n in view.nodes.values():
        if n.layer:
            layers[n.layer].append(n)
    lines = _header(pic.title)
    for n in view.nodes.values():
        if not n.layer:
            lines.append(_node_line(n))
    for layer, nodes in layers.items():
        kinds = Counter(n.kind for n in nodes)
        fill = ADDED_FILL if kinds["added"] else REMOVED_FILL if kinds["removed"] else "#dde6f5"
        lines.append(f"  {_q('layer:' + layer)} [label={_q(short(layer) + chr(10) + _layer_summary(nodes))} "
                     f"id={_q(_dom_id('layer:' + layer))} class=\"layer\" shape=box3d style=filled "
                     f"fillcolor={_q(fill)} href={_q('#' + anchor(layer))} target=_self fontsize=10];")
    folded = {n.key: f"layer:{n.layer}" if n.layer else n.key for n in view.nodes.values()}
    edges = dict.fromkeys((folded[a], folded[b]) for a, b in view.edges if folded[a] != folded[b])
    lines += [f"  {_q(a)} -> {_q(b)};" for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n", list(layers.items())


def layer_dot(pic: Picture, layer: str, nodes: list[_Node]) -> str:
    """One decoder layer's nodes, with the values it reads from outside as grey inputs."""
    view = _view(pic)
    inside = {n.key for n in nodes}
    lines = _header(f"{pic.title}: {short(layer)}")
    by_part: dict[str, list[_Node]] = defaultdict(list)
    for n in nodes:
        by_part[n.part].append(n)
    for j, (part, ns) in enumerate(by_part.items()):
        nested = bool(part and len(ns) > 1)
        if nested:
            lines.append(f"  subgraph {_q(f'cluster_{j}')} {{ label={_q(part)} style=dashed color=\"#aaaaaa\";")
        lines += [_node_line(n) for n in ns]
        if nested:
            lines.append("  }")
    for a, b in view.edges:
        if b in inside:
            if a not in inside:
                src = view.nodes[a]
                lines.append(f"  {_q(a)} [label={_q(src.label.split(chr(10))[0])} {_STYLE['input']} "
                             f"class=\"external\" tooltip={_q('from outside this layer: ' + src.tooltip)}];")
            lines.append(f"  {_q(a)} -> {_q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- rendering


def dot_binary() -> Optional[str]:
    return shutil.which("dot")


def render_svg(dot_text: str) -> str:
    exe = dot_binary()
    if exe is None:
        raise GraphvizMissing("Graphviz's `dot` was not found on PATH (Debian/Ubuntu: apt-get install graphviz)")
    res = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dot failed: {res.stderr.strip()}")
    return res.stdout


def _inline(svg: str) -> str:
    """An SVG document as an element in a scroll box (no XML prolog or doctype): big layers stay
    at a readable size instead of shrinking to the page width."""
    return f'<div class="svgbox">{svg[svg.index("<svg"):]}</div>'


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table.report{border-collapse:collapse;margin:.5em 0} table.report td,table.report th{border:1px solid #ccc;padding:2px 8px}
table.report td.n{text-align:right} .legend span{padding:1px 6px;margin-right:8px;border:1px solid #999}
details.layer{margin:.3em 0 .3em 1em} details.layer>summary{cursor:pointer;font-family:monospace}
details.layer.changed>summary{font-weight:bold} .svgbox{overflow:auto;max-height:90vh;border:1px solid #eee}
.controls button{margin-right:.5em}
"""

_JS = """
function setAll(open){document.querySelectorAll('details.layer').forEach(function(d){d.open=open;});}
function openTarget(){var id=decodeURIComponent(location.hash.slice(1));var d=id&&document.getElementById(id);
 if(d&&d.tagName==='DETAILS'){d.open=true;d.scrollIntoView();}}
window.addEventListener('hashchange',openTarget);window.addEventListener('load',openTarget);
"""


def html_page(title: str, intro_html: str, pictures: list[Picture]) -> str:
    """One self-contained page: per picture an overview with the layers folded, then every layer
    as a <details> block with its own picture (open the changed ones from the overview)."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
             f"<h1>{html.escape(title)}</h1>", intro_html,
             f'<p class="legend"><span style="background:{ADDED_FILL}">added by a pass (rewritten)</span>'
             f'<span style="background:{REMOVED_FILL}">removed by the next pass</span>'
             '<span style="background:#dde6f5">decoder layer (click to open)</span></p>',
             '<p class="controls"><button onclick="setAll(true)">open all layers</button>'
             '<button onclick="setAll(false)">close all layers</button></p>']
    for p_i, pic in enumerate(pictures):
        def anchor(layer, p_i=p_i):
            return f"p{p_i}-{_dom_id(layer)}"
        dot_text, layers = overview_dot(pic, anchor)
        parts.append(f'<section class="graph" id="p{p_i}"><h2>{html.escape(pic.title)}</h2>')
        parts.append(_inline(render_svg(dot_text)))
        for layer, nodes in layers:
            changed = any(n.kind in ("added", "removed") for n in nodes)
            parts.append(f'<details class="layer{" changed" if changed else ""}" id="{anchor(layer)}">'
                         f"<summary>{html.escape(short(layer))}: {html.escape(_layer_summary(nodes))}</summary>")
            parts.append(_inline(render_svg(layer_dot(pic, layer, nodes))))
            parts.append("</details>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
