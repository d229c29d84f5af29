"""The `fxfuse` command: dump (text, DOT, SVG, HTML) / diff / inspect / explain what the passes do
to a Hugging Face model, and a demo that trains a tiny LoRA model eagerly and through fxfuse and
compares the losses.

Tables use rich on a terminal and plain text otherwise (pipes, files, tests); long steps name
themselves on stderr (a rich spinner on a terminal, one line per step otherwise).

Heavy modules (transformers, peft, fxfuse's passes) are imported inside the commands. The Triton
kernels decide at import time whether they run in the CPU interpreter, so main() sets
TRITON_INTERPRET first when there is no CUDA device (see _use_interpreter_without_cuda).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

PROG = "fxfuse"
FORMATS = ("text", "dot", "svg", "html")
META_ABOVE_PARAMS = 1e9  # --device auto: bigger models are traced on meta (nothing allocated)


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


class _Progress:
    """Names the long step on stderr: a rich spinner on a terminal, one line per step otherwise."""

    def __init__(self):
        self._console = self._status = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                self._console = Console(stderr=True)
            except ImportError:
                pass

    def step(self, text: str, detail: bool = False) -> None:
        """detail: a sub-step, shown by the spinner only (one line each would drown the log)."""
        if self._console is None:
            if not detail:
                _say(f"{text}...")
        elif self._status is None:
            self._status = self._console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def done(self, text: str) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        _say(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.stop()


def _rich_console():
    """A rich console for stdout when it is a terminal, else None (plain text)."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def _use_interpreter_without_cuda(argv: Optional[Sequence[str]]) -> None:
    """Without CUDA, run the Triton kernels in the CPU interpreter (unless the user chose).

    Triton reads TRITON_INTERPRET when a kernel is decorated, which includes its own standard
    library at `import triton`. The console script imports this module through fxfuse/__init__.py,
    which already imports the kernels and triton; then the only way to switch is to start the
    process again with the variable set (command line only: an in-process caller gets a note).
    """
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fxfuse.frontends.cli", *sys.argv[1:]])
    os.environ.pop("TRITON_INTERPRET")
    _say("note: no CUDA device and triton was imported before TRITON_INTERPRET could be set; "
         "fused ops will run their eager reference (set TRITON_INTERPRET=1 to run the kernels)")


# ---------------------------------------------------------------- argument parsing


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (llama-tiny, qwen2-tiny, mistral-tiny, llama-8b), an HF model "
                                 "directory with config.json, or a config.json file")
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--device", choices=("auto", "cpu", "meta"), default="auto",
                   help=f"where to build the (random-weight) model; auto: meta above {META_ABOVE_PARAMS:.0e} params")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--no-peft", action="store_true", help="trace the bare model (no LoRA adapters)")
    g.add_argument("--peft-r", type=int, default=8, metavar="R", help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    g.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    g.add_argument("--targets", default=None,
                   help="comma-separated target modules (default: all of q/k/v/o/gate/up/down_proj present)")
    g.add_argument("--rslora", action="store_true", help="use_rslora")
    g.add_argument("--dora", action="store_true", help="use_dora")
    g = p.add_argument_group("trace")
    g.add_argument("--gc", action="store_true", help="enable gradient checkpointing (non-reentrant)")
    g.add_argument("--seq", type=int, default=16, help="sequence length of the traced batch (default 16)")
    g.add_argument("--batch", type=int, default=1, help="batch size of the traced batch (default 1)")
    g.add_argument("--passes", default=None, help="comma-separated passes to run (default: the defaults of fxfuse.optimize; "
                                     "'all' runs every registered pass)")
    g.add_argument("--pass-options", default=None, metavar="JSON",
                   help='constructor options by pass, as fxfuse.optimize(pass_options=...), e.g. '
                        '\'{"lora": {"graph_ops_below": 0}}\' (keep the fused op at any length)')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Graph-rewriting passes for traced HF models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dump", help="dynamo's graph(s) before / after the passes, as text or pictures")
    _model_options(p)
    p.add_argument("--stage", choices=("before", "after", "both", "each"), default="both",
                   help="both (default): before and after all passes; each: before, then after every pass")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default, stdout); dot (stdout unless -o); svg, html (files; need Graphviz's "
                        "`dot`, else .dot files are written instead). Pictures group nodes by decoder layer "
                        "and highlight what the passes added (green) and removed (red)")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="output file (text and dot: default stdout); several svg/dot pictures get "
                        "-graphN-STAGE suffixes (default for svg/html: fxfuse-MODEL.svg/.html here)")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("diff", help="what each pass changed: nodes removed/added, ops per type before/after")
    _model_options(p)
    p.add_argument("--nodes", action="store_true", help="also list the removed and added nodes")
    p.add_argument("--json", action="store_true", help="print the diff as JSON on stdout")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("inspect", help="what the passes rewrote and declined, per site")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--strict", action="store_true", help="exit 1 if any candidate was declined")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("explain", help="why a node/site was or was not rewritten (which check declined)")
    _model_options(p)
    p.add_argument("--node", required=True, metavar="NAME",
                   help="a graph node name (as in `dump`) or an HF module path (e.g. model.layers.0.mlp.up_proj)")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON on stdout")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="train llama-tiny + LoRA eagerly and through fxfuse; compare losses")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative loss difference (default 1e-4)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _use_interpreter_without_cuda(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage/help; return instead of exiting
        return int(e.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- shared: model -> traced graphs


def _capture(args, progress: "_Progress"):
    """Build the model the options describe and trace it; bad input becomes a UserError."""
    import torch

    from ..runtime import stats as runtime_stats
    from . import hf

    try:
        config = hf.load_config(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    if hf.has_weights(args.model):
        _say(f"note: weights in {args.model} are not loaded (random weights): graphs and rewrites depend on "
             "shapes and dtypes only")
    if args.peft_r < 1 or args.seq < 1 or args.batch < 1:
        raise UserError("--peft-r, --seq and --batch must be positive")
    dtype = getattr(torch, args.dtype)
    device = args.device
    try:
        if device == "auto":
            n = sum(p.numel() for p in hf.build_model(config, device="meta", dtype=dtype).parameters())
            device = "meta" if n > META_ABOVE_PARAMS else "cpu"
        peft = None
        if not args.no_peft:
            peft = {"r": args.peft_r, "dropout": args.dropout, "use_rslora": args.rslora, "use_dora": args.dora}
            if args.alpha is not None:
                peft["alpha"] = args.alpha
            if args.targets:
                peft["target_modules"] = [t.strip() for t in args.targets.split(",") if t.strip()]
        progress.step(f"building {args.model} ({config.model_type}, {dtype}) on {device}")
        model = hf.build_model(config, device=device, dtype=dtype, peft=peft)
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # transformers/peft rejecting this config: still the user's input
        raise UserError(f"cannot build {args.model}: {type(e).__name__}: {_first_line(e)}") from None
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    if passes == ["all"]:
        from .optimize import PASSES
        passes = list(PASSES)
    pass_options = None
    if args.pass_options:
        try:
            pass_options = json.loads(args.pass_options)
        except json.JSONDecodeError as e:
            raise UserError(f"--pass-options is not JSON: {e}") from None
        if not isinstance(pass_options, dict) or not all(isinstance(v, dict) for v in pass_options.values()):
            raise UserError('--pass-options must map pass names to option objects, e.g. \'{"lora": {"group": false}}\'')
    runtime_stats.reset()  # the run-time line then counts this trace's one forward only
    tracing = (f"tracing {args.model} on {device} (batch {args.batch}, seq {args.seq}"
               f"{', gradient checkpointing' if args.gc else ''})")
    progress.step(tracing)
    try:
        cap = hf.capture_graphs(model, seq_len=args.seq, batch=args.batch, gradient_checkpointing=args.gc,
                                passes=passes, pass_options=pass_options, progress=lambda what: progress.step(f"{tracing}: {what}", detail=True))
    except (hf.TraceError, ValueError) as e:
        raise UserError(str(e)) from None
    progress.done(f"traced {len(cap.after)} graph(s) in {cap.seconds:.1f}s")
    return cap, device


def cmd_dump(args) -> int:
    from ..passes.pattern import graphs_of
    from . import stages as stage_views

    if args.output is not None:
        from pathlib import Path

        parent = Path(args.output).parent
        if not Path(args.output).is_dir() and not parent.is_dir():
            raise UserError(f"cannot write {args.output}: no such directory {parent}")
    with _Progress() as progress:
        cap, _ = _capture(args, progress)
    if args.format != "text":
        return _dump_pictures(args, stage_views.pictures(cap, args.stage))
    out = []
    for i, stages in enumerate(cap.stages):
        picked = {"before": stages[:1], "after": stages[-1:], "both": [stages[0], stages[-1]], "each": stages}
        for k, (name, gm) in enumerate(picked[args.stage]):
            title = "before passes" if name == "before" else \
                "after passes" if args.stage != "each" else f"after pass {name}"
            subs = [n for n, _ in graphs_of(gm)][1:]
            extra = f", subgraphs: {', '.join(subs)}" if subs else ""
            out.append(f"==================== graph {i} {title}{extra} ====================")
            # print_readable includes the subgraph modules (checkpointed layers) as nested classes.
            out.append(gm.print_readable(print_output=False))
    if args.output is None:
        print("\n".join(out))
    else:
        _write(args.output, "\n".join(out) + "\n")
    return 0


def _write(path, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    _say(f"wrote {path}")


def _output_paths(args, pictures, ext: str) -> list:
    """One path per picture: -o as given for a single picture, else with -graphN-STAGE suffixes."""
    from pathlib import Path

    base = Path(args.output) if args.output else Path(f"fxfuse-{_model_stem(args.model)}{ext}")
    if base.is_dir():
        base = base / f"fxfuse-{_model_stem(args.model)}{ext}"
    if len(pictures) == 1:
        return [base.with_suffix(ext)]
    return [base.with_name(f"{base.stem}-{p.title.replace('graph ', 'graph').replace(' ', '-')}{ext}")
            for p in pictures]


def _model_stem(spec: str) -> str:
    from pathlib import Path

    path = Path(spec)
    return (path.parent.name if path.name == "config.json" else path.stem or path.name) or "model"


def _dump_pictures(args, pictures) -> int:
    from . import graphviz as gv

    if args.format == "dot" and args.output is None:
        for pic in pictures:
            print(gv.to_dot(pic))
        return 0
    if args.format == "html":
        path = _output_paths(args, pictures[:1], ".html")[0]
        try:
            with _Progress() as progress:
                progress.step(f"rendering {len(pictures)} graph picture(s) with Graphviz")
                page = gv.html_page(f"fxfuse dump {args.model}", _html_intro(args), pictures)
        except gv.GraphvizMissing as e:
            return _dot_fallback(args, pictures, e)
        _write(path, page)
        return 0
    paths = _output_paths(args, pictures, "." + args.format)
    for pic, path in zip(pictures, paths):
        text = gv.to_dot(pic)
        if args.format == "svg":
            try:
                text = gv.render_svg(text)
            except gv.GraphvizMissing as e:
                return _dot_fallback(args, pictures, e)
        _write(path, text)
    return 0


def _dot_fallback(args, pictures, why) -> int:
    from . import graphviz as gv

    paths = _output_paths(args, pictures, ".dot")
    for pic, path in zip(pictures, paths):
        _write(path, gv.to_dot(pic))
    _say(f"{why}: wrote {len(paths)} .dot file(s) instead of {args.format}: {', '.join(map(str, paths))}; "
         f"render one with `dot -Tsvg {paths[0]} -o {paths[0].with_suffix('.svg')}`")
    return 0


def _html_intro(args) -> str:
    import html

    import shlex

    return (f"<p>Model <code>{html.escape(args.model)}</code>; made by "
            f"<code>fxfuse {html.escape(shlex.join(args.argv))}</code>.</p>")


def cmd_inspect(args) -> int:
    import json

    from ..passes.pattern import graphs_of

    with _Progress() as progress:
        cap, device = _capture(args, progress)
    rep = cap.report
    console = None if args.json else _rich_console()
    if console is not None:
        _rich_report(console, args, device, cap)
    elif args.json:
        out = {"model": args.model, "device": device, "peft": not args.no_peft, "gradient_checkpointing": args.gc,
               **rep.to_dict(),
               "graphs": [{"index": g.index, "nodes_before": g.nodes_before, "nodes_after": g.nodes_after,
                           "subgraphs": [n for n, _ in graphs_of(gm)][1:]}
                          for g, gm in zip(rep.graphs, cap.after)]}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"model {args.model} on {device}, traced in {cap.seconds:.1f}s")
        for g, gm in zip(rep.graphs, cap.after):
            subs = [n for n, _ in graphs_of(gm)][1:]
            print(f"graph {g.index}: {g.nodes_before} -> {g.nodes_after} nodes"
                  + (f" ({len(subs)} subgraphs: {', '.join(subs)})" if subs else ""))
        print(rep.table(sites=True))
    declined = sum(len(p.declined) for g in rep.graphs for p in g.passes)
    return 1 if args.strict and declined else 0


def _rich_report(console, args, device, cap) -> None:
    """The inspect report as rich tables: passes (with each pass's own columns), declined reasons,
    the run (graphs, breaks, recompiles, run-time calls and fallbacks), and every site."""
    from collections import Counter

    from rich.table import Table

    from ..runtime import stats as runtime_stats
    from .graphviz import short

    rep = cap.report
    columns = rep.columns()
    extra = list(dict.fromkeys(c for cols in columns.values() for c in cols))
    t = Table(title=f"fxfuse passes on {args.model} ({device}, traced in {cap.seconds:.1f}s)")
    for c in ("pass", "candidates", "rewritten", "declined", *extra):
        t.add_column(c, justify="left" if c == "pass" else "right")
    for name, s in rep.summary().items():
        declined = sum(s["declined"].values())
        t.add_row(name, str(s["candidates"]), f"[green]{s['rewritten']}[/]",
                  f"[red]{declined}[/]" if declined else "0", *(f"{columns[name].get(c, '-'):g}"
                                                             if c in columns[name] else "-" for c in extra))
    console.print(t)
    reasons = Counter((s.pass_name, s.check, s.reason) for s in rep.sites() if not s.rewritten)
    if reasons:
        t = Table(title="declined")
        for c in ("pass", "sites", "check", "reason"):
            t.add_column(c, justify="right" if c == "sites" else "left")
        for (name, check, reason), n in reasons.items():
            t.add_row(name, str(n), check, reason)
        console.print(t)
    snap = runtime_stats.snapshot()
    t = Table(title="run")
    for c in ("graphs", "graph breaks", "recompiles", "kernel calls", "run-time fallbacks"):
        t.add_column(c, justify="right")
    t.add_row(str(len(rep.graphs)), str(sum(rep.graph_breaks.values())), str(rep.recompiles),
              str(sum(snap["kernel_calls"].values())), str(rep.runtime_fallbacks))
    console.print(t)
    for reason, n in rep.graph_breaks.items():
        console.print(f"  graph break x{n}: {reason}")
    for what, n in snap["fallbacks"].items():
        console.print(f"  fallback x{n}: {what}")
    for err in rep.errors:
        console.print(f"  [red]PASS ERROR[/] (graph compiled without fxfuse rewrites): {err}")
    for g in rep.graphs:
        console.print(f"graph {g.index}: {g.nodes_before} -> {g.nodes_after} nodes")
    t = Table(title="sites")
    for c in ("pass", "graph", "status", "module", "node / reason"):
        t.add_column(c, overflow="fold")
    for s in rep.sites():
        t.add_row(s.pass_name, s.graph, "[green]rewritten[/]" if s.rewritten else "[red]declined[/]", short(s.module),
                  s.detail())
    console.print(t)


def cmd_diff(args) -> int:
    import json

    from . import stages as stage_views

    with _Progress() as progress:
        cap, _ = _capture(args, progress)
    changes = stage_views.diff(cap)
    if args.json:
        print(json.dumps({"model": args.model, "passes": cap.report.pass_names, "diff": changes}, indent=2))
        return 0
    for d in changes:
        print(f"graph {d['graph']}, pass {d['pass']}: {d['nodes_before']} -> {d['nodes_after']} nodes "
              f"({len(d['removed'])} removed, {len(d['added'])} added)")
        if d["ops"]:
            width = max(len(op) for op in d["ops"])
            print(f"  {'op':<{width}} {'before':>7} {'after':>7} {'change':>7}")
            for op, (b, a) in d["ops"].items():
                print(f"  {op:<{width}} {b:>7} {a:>7} {a - b:>+7}")
        else:
            print("  no op counts changed")
        if args.nodes:
            for what in ("removed", "added"):
                if d[what]:
                    print(f"  {what}: {', '.join(d[what])}")
    return 0


def cmd_explain(args) -> int:
    import json

    from . import stages as stage_views

    with _Progress() as progress:
        cap, _ = _capture(args, progress)
    try:
        found = stage_views.explain(cap, args.node)
    except LookupError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    for f in found:
        where = f"graph {f['graph']}" + (f" ({f['subgraph']})" if f["subgraph"] != "<top>" else "")
        print(f"{f['node']} in {where}" + (f", module {f['module']}" if f["module"] else ""))
        if f.get("op"):
            print(f"  op: {f['op']}" + (f", value {f['value']}" if f.get("value") else ""))
        if f["candidate"]:
            status = "REWRITTEN" if f["rewritten"] else "DECLINED"
            print(f"  pass {f['pass']}: candidate, {status}: {f['why']}")
        else:
            print(f"  {f['why']}")
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    import copy

    import torch

    import fxfuse

    from . import hf
    from ..runtime import stats as runtime_stats

    if args.steps < 1:
        raise UserError("--steps must be positive")
    torch._dynamo.reset()
    runtime_stats.reset()
    torch.manual_seed(0)
    eager = hf.build_model(hf.load_config("llama-tiny"), device="cpu", dtype=torch.float32, peft={"r": 8})
    # PEFT starts lora_B at zero, so the low-rank path would contribute nothing; random B makes
    # the comparison exercise it (forward and backward).
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    fused = copy.deepcopy(eager)
    eager.train()
    fused.train()
    gen = torch.Generator().manual_seed(1)
    vocab = eager.config.vocab_size
    batches = [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(args.steps)]

    fxfuse.optimize(fused, compiler=args.compiler)
    losses = {}
    for label, model in (("eager", eager), ("fxfuse", fused)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[label] = []
        t0 = time.perf_counter()
        for step, ids in enumerate(batches):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[label].append(loss.item())
            if label == "fxfuse" and step == 0:
                _say(f"first fxfuse step (compile included) took {time.perf_counter() - t0:.1f}s")
        _say(f"{label}: {args.steps} steps in {time.perf_counter() - t0:.1f}s")

    print(f"{'step':>4} {'eager loss':>14} {'fxfuse loss':>14} {'rel diff':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(losses["eager"], losses["fxfuse"])):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{i:>4} {a:>14.8f} {b:>14.8f} {rel:>10.2e}")
    print(f"max relative loss difference: {worst:.2e} (tolerance {args.tolerance:.0e})")
    rep = fxfuse.report(fused)
    print(rep.table(sites=True))
    summary = rep.summary()
    # a site below a pass's size threshold (mlp_tiling at short context) is declined by design
    declined = sum(1 for s in rep.sites() if not s.rewritten and s.check != "size")
    rewritten = sum(s["rewritten"] for s in summary.values())
    problems = []
    if not worst <= args.tolerance:  # also catches NaN
        problems.append(f"losses differ by {worst:.2e} relative (> {args.tolerance:.0e})")
    if declined:
        problems.append(f"{declined} site(s) declined")
    if not rewritten:
        problems.append("nothing was rewritten")
    if problems:
        print(f"{PROG}: demo FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"demo OK: {rewritten} LoRA sites rewritten, losses match within {args.tolerance:.0e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
