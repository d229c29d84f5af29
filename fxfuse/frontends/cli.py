"""The `fxfuse` command: dump / inspect what the passes do to a Hugging Face model, and a demo that
trains a tiny LoRA model eagerly and through fxfuse and compares the losses.

Heavy modules (transformers, peft, fxfuse's passes) are imported inside the commands. The Triton
kernels decide at import time whether they run in the CPU interpreter, so main() sets
TRITON_INTERPRET first when there is no CUDA device (see _use_interpreter_without_cuda).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

PROG = "fxfuse"
META_ABOVE_PARAMS = 1e9  # --device auto: bigger models are traced on meta (nothing allocated)


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


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
    g.add_argument("--passes", default=None, help="comma-separated passes to run (default: all)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Graph-rewriting passes for traced HF models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dump", help="print dynamo's graph(s) before and/or after the passes")
    _model_options(p)
    p.add_argument("--stage", choices=("before", "after", "both"), default="both")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("inspect", help="what the passes rewrote and declined, per site")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--strict", action="store_true", help="exit 1 if any candidate was declined")
    p.set_defaults(func=cmd_inspect)

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
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- shared: model -> traced graphs


def _capture(args):
    """Build the model the options describe and trace it; bad input becomes a UserError."""
    import torch

    from ..runtime import stats as runtime_stats
    from . import hf

    try:
        config = hf.load_config(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
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
        _say(f"building {args.model} ({config.model_type}, {dtype}) on {device}...")
        model = hf.build_model(config, device=device, dtype=dtype, peft=peft)
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # transformers/peft rejecting this config: still the user's input
        raise UserError(f"cannot build {args.model}: {type(e).__name__}: {_first_line(e)}") from None
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    runtime_stats.reset()  # the run-time line then counts this trace's one forward only
    _say(f"tracing {args.model} on {device} (batch {args.batch}, seq {args.seq}"
         f"{', gradient checkpointing' if args.gc else ''})...")
    try:
        cap = hf.capture_graphs(model, seq_len=args.seq, batch=args.batch, gradient_checkpointing=args.gc,
                                passes=passes)
    except (hf.TraceError, ValueError) as e:
        raise UserError(str(e)) from None
    _say(f"traced {len(cap.after)} graph(s) in {cap.seconds:.1f}s")
    return cap, device


def cmd_dump(args) -> int:
    from ..passes.pattern import graphs_of

    cap, _ = _capture(args)
    stages = ("before", "after") if args.stage == "both" else (args.stage,)
    for i, (before, after) in enumerate(zip(cap.before, cap.after)):
        for stage in stages:
            gm = before if stage == "before" else after
            subs = [name for name, _ in graphs_of(gm)][1:]
            extra = f", subgraphs: {', '.join(subs)}" if subs else ""
            print(f"==================== graph {i} {stage} passes{extra} ====================")
            # print_readable includes the subgraph modules (checkpointed layers) as nested classes.
            print(gm.print_readable(print_output=False))
    return 0


def cmd_inspect(args) -> int:
    import json

    from ..passes.pattern import graphs_of

    cap, device = _capture(args)
    rep = cap.report
    if args.json:
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
    declined = sum(sum(s["declined"].values()) for s in summary.values())
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
