"""What each pass did to the captured graphs, for `fxfuse dump/diff/explain`: read from the
snapshots `hf.capture_graphs` keeps after every pass and from the passes' `Site` records, so a new
pass shows up here without changes."""
from __future__ import annotations

import difflib
from typing import Optional

from ..passes.pattern import count_ops, example_value, graphs_of
from .graphviz import Picture, module_of, node_keys, short


def pictures(cap, stage: str) -> list[Picture]:
    """stage: before | after | both | each. Nodes new at a stage are highlighted; in a picture of
    the graph before the passes (or before the next pass, for `each`) the nodes that go away are."""
    out = []
    for i, stages in enumerate(cap.stages):
        keys = [node_keys(gm) for _, gm in stages]
        first, last = keys[0], keys[-1]
        if stage in ("before", "both"):
            out.append(Picture(f"graph {i} before passes", stages[0][1], removed=first - last))
        if stage in ("after", "both"):
            out.append(Picture(f"graph {i} after passes", stages[-1][1], added=last - first))
        if stage == "each":
            for k, (name, gm) in enumerate(stages):
                title = f"graph {i} before passes" if k == 0 else f"graph {i} after pass {name}"
                added = keys[k] - keys[k - 1] if k else set()
                removed = keys[k] - keys[k + 1] if k + 1 < len(keys) else set()
                out.append(Picture(title, gm, added=added, removed=removed))
    return out


def diff(cap) -> list[dict]:
    """Per graph and pass: node counts, nodes removed/added ("graph/node" keys), and the op counts
    that changed (op -> [before, after])."""
    out = []
    for i, stages in enumerate(cap.stages):
        for (_, prev), (name, cur) in zip(stages, stages[1:]):
            kp, kc = node_keys(prev), node_keys(cur)
            ops_p, ops_c = count_ops(prev), count_ops(cur)
            ops = {op: [ops_p.get(op, 0), ops_c.get(op, 0)] for op in sorted(set(ops_p) | set(ops_c))
                   if ops_p.get(op, 0) != ops_c.get(op, 0)}
            out.append({"graph": i, "pass": name, "nodes_before": len(kp), "nodes_after": len(kc),
                        "removed": sorted(kp - kc), "added": sorted(kc - kp), "ops": ops})
    return out


def _site_matches(site, name: str) -> bool:
    return name in (site.node, site.module, short(site.module)) or site.module.endswith("." + name)


def explain(cap, name: str) -> list[dict]:
    """Every site (a pass's candidate) and every graph node called `name` (a node name, or an HF
    module path, full or without PEFT's prefix): what each pass did to it and why.
    Raises LookupError listing close names when nothing matches."""
    found = []
    for i, (stages, record) in enumerate(zip(cap.stages, cap.report.graphs)):
        sites = [s for p in record.passes for s in p.sites]
        matched_sites = [s for s in sites if _site_matches(s, name)]
        for s in matched_sites:
            members = [t.module for t in sites if s.rewritten and t.group == s.group and t.graph == s.graph]
            found.append({
                "graph": i, "subgraph": s.graph, "node": s.node, "module": short(s.module), "pass": s.pass_name,
                "candidate": True, "rewritten": s.rewritten,
                "why": (f"rewritten into `{s.group}`, which computes {len(members)} site(s): "
                        + ", ".join(short(m) for m in members)) if s.rewritten
                else f"declined by {s.check or 'the pass'}: {s.reason}",
            })
        site_nodes = {(s.graph, s.node) for s in matched_sites}
        for gname, sub in graphs_of(stages[0][1]):
            for n in sub.graph.nodes:
                if n.name != name or (gname, n.name) in site_nodes:
                    continue
                found.append(_explain_node(i, gname, n, stages, sites))
        before = node_keys(stages[0][1])
        for gname, sub in graphs_of(stages[-1][1]):
            for n in sub.graph.nodes:
                if n.name == name and f"{gname}/{n.name}" not in before:
                    found.append(_explain_new_node(i, gname, n, stages, sites))
    if not found:
        names = {n.name for st in cap.stages for _, g in graphs_of(st[0][1]) for n in g.graph.nodes}
        names |= {short(s.module) for s in cap.report.sites()}
        close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.6)
        raise LookupError(f"no node, site or module called {name!r} in the traced graphs"
                          + (f"; close: {', '.join(close)}" if close else ""))
    return found


def _explain_new_node(i: int, gname: str, node, stages, sites) -> dict:
    key = f"{gname}/{node.name}"
    added_by = next(name for name, gm in stages[1:] if key in node_keys(gm))
    members = [short(s.module) for s in sites if s.group == node.name and s.graph == gname]
    return {"graph": i, "subgraph": gname, "node": node.name, "module": short(module_of(node)), "candidate": False,
            "pass": added_by, "op": f"{node.op} {node.target}",
            "why": f"added by pass {added_by}" + (f"; it computes the site(s) {', '.join(members)}" if members else "")}


def _explain_node(i: int, gname: str, node, stages, sites) -> dict:
    """A node that no pass took as a candidate: which pass removed it (as part of whose site)."""
    key = f"{gname}/{node.name}"
    module = module_of(node)
    value = example_value(node)
    entry = {"graph": i, "subgraph": gname, "node": node.name, "module": short(module), "candidate": False,
             "op": f"{node.op} {getattr(node.target, '__name__', node.target)}",
             "value": str(tuple(value.shape)) + f" {value.dtype}" if hasattr(value, "shape") else None}
    removed_by: Optional[str] = None
    for (_, _), (pass_name, gm) in zip(stages, stages[1:]):
        if key not in node_keys(gm):
            removed_by = pass_name
            break
    if removed_by is None:
        entry["why"] = ("no pass took it as a candidate (it is not the anchor of any pass's pattern) "
                        "and no pass removed it: it reaches the compiler unchanged")
        return entry
    owners = [s for s in sites if s.pass_name == removed_by and s.graph == gname and s.rewritten
              and module and (module == s.module or module.startswith(s.module + "."))]
    entry["pass"] = removed_by
    entry["why"] = f"removed by pass {removed_by}" + (
        f" as part of the site at {short(owners[0].module)} (node {owners[0].node}), rewritten into "
        f"`{owners[0].group}`" if owners else " (not a candidate itself: part of a rewritten match)")
    return entry
