"""Without a GPU and without the Triton interpreter the op runs its eager reference: the report
counts every such call as a fallback, and the numbers (dropout masks included) equal the kernels'."""
import json
import os
import subprocess
import sys

import torch

import fxfuse
from tiny import tiny_model, tokens

SCRIPT = """
import json, torch, fxfuse
from tiny import tiny_model, tokens
model = fxfuse.optimize(tiny_model(lora_dropout=0.2), compiler="aot_eager", verbose=False)
torch.manual_seed(5)
out = model(input_ids=tokens(), labels=tokens(), use_cache=False)
out.loss.backward()
grad = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
print(json.dumps({"loss": out.loss.item(), "grad": grad.norm().item(),
                  "fallbacks": fxfuse.report(model).runtime_fallbacks}))
"""


def test_reference_fallback_is_counted_and_matches_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(__file__)) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ref["fallbacks"] > 0

    model = fxfuse.optimize(tiny_model(lora_dropout=0.2), compiler="aot_eager", verbose=False)
    torch.manual_seed(5)
    out = model(input_ids=tokens(), labels=tokens(), use_cache=False)
    out.loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    assert fxfuse.report(model).runtime_fallbacks == 0
    assert abs(out.loss.item() - ref["loss"]) < 1e-5 * abs(ref["loss"])
    assert abs(grad.norm().item() - ref["grad"]) < 1e-4 * ref["grad"]
