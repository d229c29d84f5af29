"""`fxfuse dump --format dot|svg|html --stage each`, `diff`, `explain`, inspect's rich tables and the
per-pass report columns, on tiny models. A toy pass registered for one test shows that a new pass
appears in every view without CLI changes.

The SVG/HTML tests need Graphviz's `dot`; they skip (saying so) only when it is not installed,
and fail instead when FXFUSE_REQUIRE_DOT=1 (CI sets it after installing graphviz). The .dot
fallback is tested either way.
"""
import io
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

import fxfuse
import torch

from fxfuse.frontends import cli
from fxfuse.frontends.cli import main
from fxfuse.passes.manager import GraphPass, Site

SVG = "{http://www.w3.org/2000/svg}"
LORA_OPS = 8  # llama-tiny: 2 layers x (qkv, o, gate/up, down)


def run(capsys, *argv):
    # The views are checked on the fused op's nodes (what 2048 tokens and more get; the default
    # graph ops at these 16 tokens are checked in test_cli.py).
    if argv and argv[0] in ("dump", "diff", "inspect", "explain") and "--pass-options" not in argv:
        argv = (*argv, "--pass-options", '{"lora": {"graph_ops_below": 0}}')
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def needs_dot():
    if shutil.which("dot") is None:
        if os.environ.get("FXFUSE_REQUIRE_DOT") == "1":
            pytest.fail("FXFUSE_REQUIRE_DOT=1 but Graphviz's `dot` is not on PATH")
        pytest.skip("Graphviz's `dot` is not installed (apt-get install graphviz); SVG/HTML not checked")


def svg_nodes(root, cls):
    """(id, label text) of the SVG node groups with the given class."""
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == f"node {cls}":
            out.append((g.get("id"), " ".join(t.text or "" for t in g.iter(f"{SVG}text"))))
    return out


def test_dump_text_each_stage(capsys):
    rc, out, err = run(capsys, "dump", "llama-tiny", "--stage", "each")
    assert rc == 0, err
    before, *stages = out.split("graph 0 after pass ")
    assert "graph 0 before passes" in before and "lora_linear" not in before
    names = [s.split()[0] for s in stages]
    assert names == list(fxfuse.DEFAULT_PASSES)
    first = names.index("lora")
    for stage in stages[:first]:
        assert "lora_linear" not in stage
    for stage in stages[first:]:  # the LoRA ops appear with the lora pass and stay in every later stage
        assert stage.count("torch.ops.fxfuse.lora_linear.default(") == LORA_OPS


def test_dump_svg_highlights_rewritten_and_removed(capsys, tmp_path):
    needs_dot()
    rc, _, err = run(capsys, "dump", "llama-tiny", "--passes", "lora", "--format", "svg", "-o", str(tmp_path / "g.svg"))
    assert rc == 0, err
    before = ET.parse(tmp_path / "g-graph0-before-passes.svg").getroot()
    after = ET.parse(tmp_path / "g-graph0-after-passes.svg").getroot()
    added = svg_nodes(after, "rewritten")
    assert sum("fxfuse.lora_linear" in text for _, text in added) == LORA_OPS
    assert not svg_nodes(after, "removed") and not svg_nodes(before, "rewritten")
    removed = svg_nodes(before, "removed")
    assert sum(text.startswith("linear ") for _, text in removed) == 2 * 7 * 3  # base, A, B per site
    layers = [g.get("id") for g in after.iter(f"{SVG}g") if g.get("class") == "cluster layer"]
    assert layers == ["layer:base_model.model.model.layers.0", "layer:base_model.model.model.layers.1"]
    # every highlighted node sits inside a decoder-layer cluster (their labels count them)
    labels = [" ".join(t.text or "" for t in g.iter(f"{SVG}text")) for g in after.iter(f"{SVG}g")
              if g.get("class") == "cluster layer"]
    assert sum(int(re.search(r"(\d+) rewritten", lab).group(1)) for lab in labels) == len(added)


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.details, self.external, self.hrefs = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details":
            self.details.append(a["id"])
        if tag in ("script", "img", "link", "iframe") and (a.get("src") or a.get("href")):
            self.external.append((tag, a))
        if tag == "a" and (a.get("href") or a.get("xlink:href")):
            self.hrefs.append(a.get("href") or a.get("xlink:href"))


def test_dump_html_is_self_contained_with_collapsible_layers(capsys, tmp_path):
    needs_dot()
    out_file = tmp_path / "page.html"
    rc, _, err = run(capsys, "dump", "llama-tiny", "--gc", "--passes", "lora", "--format", "html", "-o", str(out_file))
    assert rc == 0, err
    page = out_file.read_text()
    parser = _PageParser()
    parser.feed(page)
    assert not parser.external, parser.external  # no CDN, no files beside it
    assert len(parser.details) == 4  # 2 stages x 2 decoder layers, each folded in a <details>
    assert parser.hrefs and all(h.startswith("#") and h[1:] in parser.details for h in parser.hrefs)
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]
    assert len(svgs) == 2 + 4  # an overview per stage, a picture per layer
    rewritten = [n for s in svgs for n in svg_nodes(s, "rewritten")]
    assert sum("fxfuse.lora_linear" in text for _, text in rewritten) == LORA_OPS
    assert all(i.startswith("wrap_body_") for i, _ in rewritten)  # checkpointed layers are drawn


def test_dot_fallback_without_graphviz(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `dot` anywhere
    rc, out, err = run(capsys, "dump", "llama-tiny", "--passes", "lora", "--stage", "after", "--format", "svg",
                       "-o", str(tmp_path / "g.svg"))
    assert rc == 0, err
    assert "`dot` was not found" in err and "apt-get install graphviz" in err and "instead of svg" in err
    dot_file = tmp_path / "g.dot"
    text = dot_file.read_text()
    assert text.startswith("digraph") and not (tmp_path / "g.svg").exists()
    rewritten = [line for line in text.splitlines() if 'class="rewritten"' in line]
    assert sum('label="fxfuse.lora_linear' in line for line in rewritten) == LORA_OPS
    assert all('label="fxfuse.lora_linear' in line or 'label="getitem' in line for line in rewritten)
    monkeypatch.undo()
    if shutil.which("dot"):  # the fallback file is valid DOT
        assert ET.fromstring(cli_render(text)).tag == f"{SVG}svg"


def cli_render(dot_text):
    from fxfuse.frontends.graphviz import render_svg
    return render_svg(dot_text)


def test_dump_bad_output_path(capsys, tmp_path):
    rc, out, err = run(capsys, "dump", "llama-tiny", "--format", "svg", "-o", str(tmp_path / "no" / "g.svg"))
    assert rc == 2 and out == "" and "fxfuse: error: cannot write" in err and "no such directory" in err
    assert "tracing" not in err  # checked before the slow part


def test_dump_dot_to_stdout(capsys):
    rc, out, err = run(capsys, "dump", "llama-tiny", "--stage", "after", "--format", "dot")
    assert rc == 0, err
    assert out.startswith('digraph "graph 0 after passes"')
    assert out.count('label="fxfuse.lora_linear') == LORA_OPS


def test_diff_per_pass(capsys):
    rc, out, err = run(capsys, "diff", "llama-tiny", "--gc", "--passes", "lora", "--json")
    assert rc == 0, err
    (d,) = json.loads(out)["diff"]
    assert d["pass"] == "lora" and d["graph"] == 0
    assert d["ops"]["fxfuse.lora_linear.default"] == [0, LORA_OPS]
    assert d["ops"]["linear"][0] - d["ops"]["linear"][1] == 2 * 7 * 3
    assert d["nodes_before"] - len(d["removed"]) + len(d["added"]) == d["nodes_after"]
    assert sum(k.endswith("/lora_linear_default") for k in d["added"]) == 2  # one per checkpointed layer
    assert all(k.startswith("wrap_body_") for k in d["removed"])
    rc, out, err = run(capsys, "diff", "llama-tiny", "--passes", "lora", "--nodes")
    assert rc == 0, err
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("fxfuse.lora_linear"))
    assert row[1:] == ["0", str(LORA_OPS), f"+{LORA_OPS}"]
    assert "removed: <top>/linear" in out


def test_explain_rewritten_absorbed_untouched_and_unknown(capsys):
    rc, out, err = run(capsys, "explain", "llama-tiny", "--node", "model.layers.1.mlp.up_proj")
    assert rc == 0, err
    assert "pass lora: candidate, REWRITTEN" in out
    assert "model.layers.1.mlp.gate_proj" in out  # the other member of the fused gate/up op
    rc, out, err = run(capsys, "explain", "llama-tiny", "--node", "linear_1", "--json")  # q_proj's lora_A linear
    (f,) = json.loads(out)
    assert not f["candidate"] and f["pass"] == "lora" and "removed by pass lora as part of the site at " \
        "model.layers.0.self_attn.q_proj" in f["why"]
    rc, out, err = run(capsys, "explain", "llama-tiny", "--node", "rsqrt")
    assert rc == 0 and "reaches the compiler unchanged" in out
    rc, out, err = run(capsys, "explain", "llama-tiny", "--node", "linear_")
    assert rc == 2 and out == "" and "no node, site or module called 'linear_'" in err and "close: linear_" in err


def test_explain_declined_names_the_check(capsys, tmp_path):
    from transformers import LlamaConfig

    # rank 160 fits under in_features 256 (a LoRA candidate) but exceeds the kernel limit.
    LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(tmp_path)
    rc, out, err = run(capsys, "explain", str(tmp_path), "--device", "meta", "--peft-r", "160",
                       "--node", "model.layers.0.self_attn.o_proj")
    assert rc == 0, err
    assert "pass lora: candidate, DECLINED: declined by check(): rank 160 > 128 (kernel limit)" in out


def test_inspect_rich_tables(capsys, monkeypatch):
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(cli, "_rich_console", lambda: Console(file=buf, width=240, color_system=None))
    rc, _, err = run(capsys, "inspect", "llama-tiny")
    assert rc == 0, err
    text = buf.getvalue()
    header = next(line for line in text.splitlines() if "candidates" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == \
        ["pass", "candidates", "rewritten", "declined", "fused ops"]
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith("lora "))
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["lora", "14", "14", "0", str(LORA_OPS)]
    assert "graph breaks" in text and "run-time fallbacks" in text and "recompiles" in text


class ToyRsqrtPass(GraphPass):
    """For the test only: rsqrt(x) -> pow(x, -0.5) in the top graph, declines the rest, and adds
    its own report column."""
    name = "toy"

    def __init__(self):
        self.config = {}

    def run(self, gm, stats):
        first = True
        for node in list(gm.graph.nodes):
            if node.target is not torch.rsqrt:
                continue
            stats.add("rsqrt seen")
            if not first:
                stats.sites.append(Site(self.name, "", node.name, "<top>", False, "toy: only the first",
                                        check="toy check"))
                continue
            first = False
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.pow, (node.args[0], -0.5))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            stats.sites.append(Site(self.name, "", node.name, "<top>", True, group=new.name))


def test_a_new_pass_shows_up_everywhere(capsys, monkeypatch):
    from fxfuse.frontends import optimize

    monkeypatch.setitem(optimize.PASSES, "toy", ToyRsqrtPass)
    monkeypatch.setattr(optimize, "DEFAULT_PASSES", ("lora", "toy"))
    rep = json.loads(run(capsys, "inspect", "llama-tiny", "--json")[1])
    assert rep["passes"]["toy"] == {"candidates": 5, "rewritten": 1, "declined": {"toy: only the first": 4}}
    assert rep["pass_columns"] == {"lora": {"fused ops": LORA_OPS}, "toy": {"rsqrt seen": 5}}
    assert rep["recompiles"] == 0
    rc, out, _ = run(capsys, "inspect", "llama-tiny")
    assert re.search(r"^toy\s+5\s+1\s+4\s+-\s+5$", out, flags=re.M)  # its column; lora's is "-"
    diff = json.loads(run(capsys, "diff", "llama-tiny", "--json")[1])["diff"]
    assert [d["pass"] for d in diff] == ["lora", "toy"]
    assert {op: a - b for op, (b, a) in diff[1]["ops"].items()} == {"pow": 1, "rsqrt": -1}
    (f,) = json.loads(run(capsys, "explain", "llama-tiny", "--node", "rsqrt_1", "--json")[1])
    assert f["pass"] == "toy" and not f["rewritten"] and f["why"] == "declined by toy check: toy: only the first"
