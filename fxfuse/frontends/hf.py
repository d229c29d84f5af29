"""Hugging Face helpers for the CLI: tiny built-in configs, models with random weights (optionally
on the meta device), PEFT LoRA, and capturing dynamo's graphs before/after the fxfuse passes
without compiling anything."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)

# name -> (model_type, config kwargs). Tiny ones run on CPU in seconds; llama-8b is meant for
# the meta device (real shapes, no memory).
BUILTINS: dict[str, tuple[str, dict]] = {
    "llama-tiny": ("llama", dict(_TINY)),
    "qwen2-tiny": ("qwen2", dict(_TINY)),  # Qwen2 has q/k/v biases
    "mistral-tiny": ("mistral", dict(_TINY, sliding_window=None)),
    "llama-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}


def load_config(spec: str):
    """A built-in name, an HF model directory holding config.json, or a config.json file."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec in BUILTINS:
        model_type, kwargs = BUILTINS[spec]
        return AutoConfig.for_model(model_type, **kwargs)
    path = Path(spec)
    looks_like_path = path.suffix == ".json" or "/" in spec or spec.startswith(".")
    if not path.exists():
        if looks_like_path:
            raise ValueError(f"no such file or directory: {spec}")
        raise ValueError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTINS)}) "
                         "and no such local path")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{spec}: directory has no config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{file}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file}: no 'model_type' field, cannot tell which architecture it is")
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{file}: unknown model_type {model_type!r} (not known to transformers)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)  # what from_pretrained does, minus the hub
    except Exception as e:  # a config class rejecting its own fields
        raise ValueError(f"{file}: invalid {model_type} config ({type(e).__name__}: {e})") from None


def has_weights(spec: str) -> bool:
    """Whether a local model directory holds weight files (which the CLI does not load)."""
    path = Path(spec)
    if spec in BUILTINS or not path.is_dir():
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def build_model(config, device: str = "cpu", dtype: torch.dtype = torch.float32,
                peft: Optional[dict] = None) -> torch.nn.Module:
    """Random-weight causal LM (on meta nothing is allocated), optionally wrapped in PEFT LoRA.

    peft keys: r, alpha, dropout, target_modules, use_rslora, use_dora.
    """
    from transformers import AutoModelForCausalLM

    if device not in ("cpu", "meta", "cuda"):
        raise ValueError(f"device must be cpu, cuda or meta, not {device!r}")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if peft is not None:
            model = _add_lora(model, peft)
    return model


def _add_lora(model: torch.nn.Module, opts: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = opts.get("target_modules") or [t for t in LLAMA_LINEARS if t in present]
    missing = [t for t in targets if t not in present]
    if missing or not targets:
        raise ValueError(f"LoRA target modules {missing or targets} not found in the model")
    r = int(opts.get("r", 8))
    cfg = LoraConfig(r=r, lora_alpha=opts.get("alpha", 2 * r), lora_dropout=opts.get("dropout", 0.0),
                     target_modules=list(targets), use_rslora=opts.get("use_rslora", False),
                     use_dora=opts.get("use_dora", False), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


@dataclass
class Capture:
    """Graphs dynamo produced (before = pristine copies, after = rewritten) and the Report that
    the CLI prints, built from the passes' stats exactly as optimize() builds it."""
    before: list[fx.GraphModule] = field(default_factory=list)
    after: list[fx.GraphModule] = field(default_factory=list)
    stats: list = field(default_factory=list)  # list[list[PassStats]], one entry per graph
    # Per graph: ("before", graph), then (pass name, graph after that pass) in the order they ran.
    stages: list[list[tuple[str, fx.GraphModule]]] = field(default_factory=list)
    report: object = None
    seconds: float = 0.0


def _one_line(e: BaseException) -> str:
    """The innermost exception's first line; dynamo's fake-tensor failures hide the real error
    in their explanation ("... got RuntimeError('...')"), so add that."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines() or [""]
    out = f"{type(e).__name__}: {lines[0]}"
    for line in lines[1:]:
        if line.strip().startswith("Explanation:") and ": got " in line:
            out += " (got " + line.split(": got ", 1)[1].strip() + ")"
            break
    return out


class TraceError(RuntimeError):
    """The model does not go through dynamo (message is one line, for the CLI)."""


def capture_graphs(model: torch.nn.Module, seq_len: int = 16, batch: int = 1, gradient_checkpointing: bool = False,
                   passes: Optional[Iterable[str]] = None,
                   progress: Optional[Callable[[str], None]] = None,
                   pass_options: Optional[dict] = None) -> Capture:
    """Trace one training-mode forward (with loss) through dynamo; run the passes on each graph.

    The backend returns the rewritten graph's forward, so nothing is compiled by Inductor; on a
    meta-device model the inputs are on meta too and the run costs no memory. Every stage (before
    the passes, after each pass) is kept in `Capture.stages`; progress(text) names the step.
    """
    from ..passes.pattern import graphs_of
    from .optimize import build_manager
    from .report import Report

    manager = build_manager(passes, keep_logits=False, pass_options=pass_options)  # as optimize() would
    report = Report(manager_uuid=manager.uuid(), pass_names=[p.name for p in manager.passes])
    cap = Capture(report=report)

    def nodes(gm):
        return sum(len(g.graph.nodes) for _, g in graphs_of(gm))

    def backend(gm: fx.GraphModule, example_inputs):
        index = len(cap.after)
        stages = [("before", copy.deepcopy(gm))]
        cap.before.append(stages[0][1])
        cap.stages.append(stages)
        n_before = nodes(gm)

        def after_pass(name, g):
            stages.append((name, copy.deepcopy(g)))
            if progress is not None:
                progress(f"graph {index}: pass {name} done")

        if progress is not None:
            progress(f"graph {index}: running passes on {n_before} nodes")
        stats = manager.run(gm, after_pass=after_pass)
        cap.after.append(gm)
        cap.stats.append(stats)
        report.add_graph(n_before, nodes(gm), stats)
        return gm.forward

    if gradient_checkpointing:
        # Non-reentrant checkpointing is what dynamo turns into wrap_body subgraphs. HF also hooks
        # the embeddings to call requires_grad_() on their output, which only reentrant
        # checkpointing needs and which breaks the graph in three: drop that hook.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    model.train()  # LoRA fine-tuning is what the passes target (and HF checkpoints only in train)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq_len), device=device) if device.type != "meta" \
        else torch.zeros(batch, seq_len, dtype=torch.long, device=device)

    torch._dynamo.reset()
    report.start()
    compiled = torch.compile(model, backend=backend, fullgraph=False)
    t0 = time.perf_counter()
    try:
        compiled(input_ids=input_ids, labels=input_ids, use_cache=False)
    except Exception as e:
        raise TraceError(f"model does not trace: {_one_line(e)}") from e
    finally:
        torch._dynamo.reset()
    cap.seconds = time.perf_counter() - t0
    return cap
