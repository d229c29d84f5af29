"""The `fxfuse` command line: dump / inspect on built-in and local configs, errors, and the demo.

Most tests call main() in-process (capsys); one runs the installed console script. Tiny models
trace on CPU in a few seconds; llama-8b traces on the meta device (nothing allocated).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fxfuse.frontends.cli import main

ALL_7 = 2 * 7  # llama-tiny: 2 layers x q/k/v/o/gate/up/down


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def inspect_json(capsys, *argv):
    rc, out, err = run(capsys, "inspect", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def lora_summary(rep):
    return rep["passes"]["lora"]


OP = ("--pass-options", '{"lora": {"graph_ops_below": 0}}')  # the fused op at any length
GRAPH_OP_CALL = "fxfuse_runtime_ops_lora_graph_lora_linear_graph("


def test_dump_shows_lora_linear_only_after(capsys):
    rc, out, err = run(capsys, "dump", "llama-tiny", *OP)  # default: before and after
    assert rc == 0, err
    assert "tracing llama-tiny" in err  # progress goes to stderr
    before, after = out.split("graph 0 after passes")
    assert "graph 0 before passes" in before
    assert "lora_linear" not in before and "lora_B" in before
    assert after.count("torch.ops.fxfuse.lora_linear.default(") == 8  # 2 x (qkv, o, gate/up, down)


def test_short_inputs_get_graph_ops_by_default_and_long_ones_the_op(capsys):
    """LoraPass's default graph_ops_below=2048: 16 tokens become graph ops, 2048 the fused op."""
    rc, out, err = run(capsys, "dump", "llama-tiny", "--stage", "after")
    assert rc == 0, err
    assert out.count(GRAPH_OP_CALL) == 8 and "torch.ops.fxfuse.lora_linear" not in out
    rc, out, err = run(capsys, "dump", "llama-tiny", "--stage", "after", "--seq", "2048")
    assert rc == 0, err
    assert out.count("torch.ops.fxfuse.lora_linear.default(") == 8 and GRAPH_OP_CALL not in out


def test_bad_pass_options_are_user_errors(capsys):
    for bad, why in (("{", "not JSON"), ('{"lora": 1}', "must map pass names"),
                     ('{"lora": {"nope": 1}}', "bad options for pass 'lora'")):
        rc, _, err = run(capsys, "inspect", "llama-tiny", "--pass-options", bad)
        assert rc == 2 and why in err, err


def test_inspect_rewrites_all_sites_with_module_names(capsys):
    rc, out, err = run(capsys, "inspect", "llama-tiny")
    assert rc == 0, err
    row = next(line for line in out.splitlines() if line.startswith("lora "))
    assert row.split()[1:4] == [str(ALL_7), str(ALL_7), "0"]
    assert "0 graph break(s)" in out
    for layer in (0, 1):  # per-site rows carry HF module names
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"base_model.model.model.layers.{layer}.self_attn.{proj} " in out
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"base_model.model.model.layers.{layer}.mlp.{proj} " in out


def test_inspect_json(capsys):
    rep = inspect_json(capsys, "llama-tiny", "--peft-r", "4")
    assert lora_summary(rep) == {"candidates": ALL_7, "rewritten": ALL_7, "declined": {}}
    assert rep["graphs_compiled"] == 1 and rep["graph_breaks"] == 0
    lora_sites = [s for s in rep["sites"] if s["pass_name"] == "lora"]
    assert len(lora_sites) == ALL_7 and all(s["rewritten"] for s in lora_sites)


@pytest.mark.parametrize("name", ["qwen2-tiny", "mistral-tiny"])
def test_other_architectures(capsys, name):  # qwen2 has q/k/v biases
    assert lora_summary(inspect_json(capsys, name))["rewritten"] == ALL_7


def test_gradient_checkpointing_still_rewrites_all(capsys):
    rep = inspect_json(capsys, "llama-tiny", "--gc")
    assert lora_summary(rep) == {"candidates": ALL_7, "rewritten": ALL_7, "declined": {}}
    assert rep["graphs"][0]["subgraphs"] == ["wrap_body_0", "wrap_body_1"]
    assert {s["graph"] for s in rep["sites"] if s["pass_name"] == "lora"} == {"wrap_body_0", "wrap_body_1"}


def test_no_peft_has_no_candidates(capsys):
    assert lora_summary(inspect_json(capsys, "llama-tiny", "--no-peft"))["candidates"] == 0


def test_llama_8b_on_meta(capsys):
    rep = inspect_json(capsys, "llama-8b", "--seq", "16")
    assert rep["device"] == "meta"
    assert lora_summary(rep) == {"candidates": 224, "rewritten": 224, "declined": {}}


def test_dora_sites_are_declined_with_reasons(capsys):
    # DoRA's forward graph-breaks in every layer (PEFT's dequantize check), so this is the slow one.
    rc, out, err = run(capsys, "inspect", "llama-tiny", "--dora", "--strict")
    assert rc == 1, err  # --strict: something was declined
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("lora "))
    candidates, rewritten, declined = map(int, row.split()[1:4])
    assert candidates > 0 and rewritten == 0 and declined == candidates
    assert any(line.strip().startswith("declined x") for line in lines)
    site_rows = [line.split(None, 3) for line in lines if line.split()[:2] == ["lora", "declined"]]
    assert len(site_rows) == candidates and all(len(r) == 4 and r[3].strip() for r in site_rows)  # a reason each


def test_local_config_dir_and_file(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(tmp_path)
    assert lora_summary(inspect_json(capsys, str(tmp_path)))["rewritten"] == 7
    rc, out, err = run(capsys, "dump", str(tmp_path / "config.json"), "--stage", "after", "--targets", "q_proj,v_proj",
                       *OP)
    assert rc == 0, err
    assert out.count("torch.ops.fxfuse.lora_linear.default(") == 1  # q and v share the input: one group


@pytest.mark.parametrize("spec, message", [
    ("llama-huge", "unknown model 'llama-huge'"),
    ("./does/not/exist", "no such file or directory"),
])
def test_bad_model_names(capsys, spec, message):
    rc, out, err = run(capsys, "inspect", spec)
    assert rc == 2 and out == ""
    assert err.startswith("fxfuse: error: ") and message in err and "Traceback" not in err
    if spec == "llama-huge":
        assert "llama-tiny" in err  # lists the built-ins


def test_bad_config_files(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "inspect", str(tmp_path / "empty"))
    assert rc == 2 and "has no config.json" in err
    (tmp_path / "broken.json").write_text("{not json")
    rc, _, err = run(capsys, "dump", str(tmp_path / "broken.json"))
    assert rc == 2 and "invalid JSON" in err
    (tmp_path / "alien.json").write_text('{"model_type": "not-a-model"}')
    rc, _, err = run(capsys, "inspect", str(tmp_path / "alien.json"))
    assert rc == 2 and "unknown model_type 'not-a-model'" in err


def test_model_that_does_not_trace(capsys, tmp_path):
    from transformers import LlamaConfig

    # 4 query heads over 3 kv heads: builds, but attention cannot broadcast.
    LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=3, vocab_size=64).save_pretrained(tmp_path)
    rc, out, err = run(capsys, "inspect", str(tmp_path))
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("fxfuse: error: model does not trace: ") and "Traceback" not in err


def test_bad_options_exit_2(capsys):
    assert run(capsys, "inspect", "llama-tiny", "--passes", "nope")[0] == 2
    rc, _, err = run(capsys, "inspect")  # argparse: missing MODEL
    assert rc == 2 and "usage:" in err


def test_demo_aot_eager(capsys):
    rc, out, err = run(capsys, "demo", "--steps", "3", "--compiler", "aot_eager")
    assert rc == 0, out + err
    assert "max relative loss difference" in out and "demo OK" in out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]) == 3


def test_console_script(tmp_path):
    """The installed `fxfuse` script, as a user runs it (without TRITON_INTERPRET set)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(tmp_path)
    script = Path(sys.executable).with_name("fxfuse")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fxfuse.frontends.cli"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd + ["inspect", str(tmp_path), "--json", *OP], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert lora_summary(rep)["rewritten"] == 7
    assert rep["runtime"]["fallbacks"] == {}  # without CUDA the CLI put the kernels in the interpreter
