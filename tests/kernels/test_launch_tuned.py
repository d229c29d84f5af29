"""kernels/lora.py `_launch_tuned`: an autotuned launch goes through the autotuner once per key and
straight to the JITFunction with the tuned config after that. Checked against a stand-in autotuner
(the direct path runs compiled kernels only; tests/gpu/test_fast_launch_gpu.py compares results on a GPU)."""
import inspect
from types import SimpleNamespace

import pytest
import torch
import triton

from fxfuse.runtime.kernels import lora as K


class Tuner:
    """What `_launch_tuned` reads of triton's Autotuner: arg_names, keys, [grid](...), best_config, fn.run."""
    arg_names = ["x", "M", "K_BUCKET", "BLOCK_R"]
    keys = ["K_BUCKET", "BLOCK_R"]

    def __init__(self, pre_hook=None):
        self.tunes, self.direct, self.pre_hook = 0, [], pre_hook
        self.fn = SimpleNamespace(run=self._run)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tunes += 1
            self.best_config = triton.Config({"BLOCK_M": 16 * self.tunes}, num_warps=4, num_stages=2,
                                             pre_hook=self.pre_hook)
            return "tuned"
        return launch

    def _run(self, *args, grid, warmup, **kwargs):
        self.direct.append((args, grid, kwargs))
        return "direct"


def grid(meta):
    return (100 // meta["BLOCK_M"], 1)


def test_tunes_once_per_key_then_launches_the_tuned_config():
    k, x = Tuner(), torch.zeros(2, dtype=torch.bfloat16)
    assert K._launch_tuned(k, grid, (x, 7, 64), {"BLOCK_R": 16}) == "tuned"
    assert K._launch_tuned(k, grid, (x, 9, 64), {"BLOCK_R": 16}) == "direct"  # M is not a key argument
    args, g, kwargs = k.direct[-1]
    assert args == (x, 9, 64) and g == (100 // 16, 1)
    assert kwargs["BLOCK_R"] == 16 and kwargs["BLOCK_M"] == 16 and kwargs["num_warps"] == 4 and kwargs["num_stages"] == 2
    assert k.tunes == 1
    # a new value of a key argument, a new constexpr, a new dtype: each its own key, tuned once
    for args, kwargs in [((x, 7, 128), {"BLOCK_R": 16}), ((x, 7, 64), {"BLOCK_R": 32}),
                         ((x.float(), 7, 64), {"BLOCK_R": 16}),
                         ((torch.nn.Parameter(x.half()), 7, 64), {"BLOCK_R": 16})]:
        before = k.tunes
        assert K._launch_tuned(k, grid, args, kwargs) == "tuned"
        assert K._launch_tuned(k, grid, args, kwargs) == "direct"
        assert k.tunes == before + 1
        assert k.direct[-1][2]["BLOCK_M"] == 16 * k.tunes  # the config tuned for this key


def test_a_config_with_a_pre_hook_always_goes_through_the_autotuner():
    k, x = Tuner(pre_hook=lambda nargs: None), torch.zeros(2)
    for _ in range(3):
        assert K._launch_tuned(k, grid, (x, 7, 64), {"BLOCK_R": 16}) == "tuned"
    assert k.tunes == 3 and not k.direct



def test_a_key_argument_passed_by_keyword_is_still_keyed():
    k, x = Tuner(), torch.zeros(2)
    K._launch_tuned(k, grid, (x, 7, 64), {"BLOCK_R": 16})
    for kb in (64, 128):  # K_BUCKET by keyword: 64 hits nothing tuned for keywords yet, 128 is new
        assert K._launch_tuned(k, grid, (x, 7), {"K_BUCKET": kb, "BLOCK_R": 16}) == "tuned"
        assert K._launch_tuned(k, grid, (x, 7), {"K_BUCKET": kb, "BLOCK_R": 16}) == "direct"
    assert k.tunes == 3


# ------------------------------------------------------------------ `_launch_direct`: the compiled launcher


def _signature(x, M, seed, K_BUCKET, BLOCK_R, BLOCK_M, EXTRA=5):
    """The stand-in kernel's parameters: positional ones, then constexprs (keyword, config, default)."""


class Compiled:
    """What `_launch_direct` reads of a compiled kernel: run, function, packed_metadata, launch_metadata."""

    def __init__(self, tag):
        self.tag, self.launches, self.function, self.packed_metadata = tag, [], f"fn-{tag}", f"meta-{tag}"

    def _init_handles(self):
        pass

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", self.tag, grid, args)

    def run(self, *launch):
        self.launches.append(launch)


class JitTuner(Tuner):
    arg_names = ["x", "M", "seed", "K_BUCKET", "BLOCK_R"]

    def __init__(self):
        super().__init__()
        self.compiled = []
        self.fn = SimpleNamespace(run=self._run, signature=inspect.signature(_signature), pre_run_hooks=[])

    def _run(self, *args, grid, warmup, **kwargs):
        super()._run(*args, grid=grid, warmup=warmup, **kwargs)
        self.compiled.append(Compiled(len(self.compiled)))
        return self.compiled[-1]


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(K.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(K, "_current_device", lambda: 0)  # the launchers' fast getter (CPU builds lack it)
    monkeypatch.setattr(K.torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


def test_direct_launch_passes_the_launcher_every_parameter_in_signature_order(fake_cuda):
    k, x = JitTuner(), torch.zeros(4, dtype=torch.bfloat16)
    assert K._launch_direct(k, grid, (x, 17, 3, 64), {"BLOCK_R": 16}) is None  # the autotuner's launch
    first = K._launch_direct(k, grid, (x, 17, 3, 64), {"BLOCK_R": 16})  # the JITFunction's, plan made
    assert first is k.compiled[0] and len(k.direct) == 1 and not first.launches
    for seed in (3, 5, 2**20 + 3):  # seeds: neither 1 nor a multiple of 16, all i32: one plan
        assert K._launch_direct(k, grid, (x, 17, seed, 64), {"BLOCK_R": 16}) is first
        assert first.launches[-1] == (100 // 16, 1, 1, 1234, "fn-0", "meta-0", None, None, None,
                                      x, 17, seed, 64, 16, 16, 5)  # positional, BLOCK_R, BLOCK_M (config), EXTRA
    assert len(k.direct) == 1 and k.tunes == 1


@pytest.mark.parametrize("change", ["alignment", "dtype", "size", "float for int", "seed one", "seed multiple of 16",
                                    "key argument", "keyword"])
def test_direct_launch_makes_a_new_plan_wherever_triton_or_the_autotuner_could_differ(fake_cuda, change):
    k, base = JitTuner(), torch.zeros(64, dtype=torch.bfloat16)
    x, args, kwargs = base[:32], (base[:32], 17, 3, 64), {"BLOCK_R": 16}
    for _ in range(3):
        K._launch_direct(k, grid, args, kwargs)
    assert len(k.compiled) == 1 and len(k.compiled[0].launches) == 1
    other = {"alignment": ((base[1:33], 17, 3, 64), kwargs), "dtype": ((x.float(), 17, 3, 64), kwargs),
             "size": ((x, 18, 3, 64), kwargs), "float for int": ((x, 17.0, 3, 64), kwargs),
             "seed one": ((x, 17, 1, 64), kwargs), "seed multiple of 16": ((x, 17, 32, 64), kwargs),
             "key argument": ((x, 17, 3, 128), kwargs), "keyword": (args, {"BLOCK_R": 32})}[change]
    for _ in range(3):
        K._launch_direct(k, grid, *other)
    assert len(k.compiled) == 2, "a new plan from the JITFunction"
    assert len(k.compiled[0].launches) == 1 and len(k.compiled[1].launches) >= 1


def test_direct_launch_gives_launch_hooks_their_metadata(fake_cuda):
    k, x = JitTuner(), torch.zeros(4)
    seen = []
    hooks = triton.knobs.runtime.launch_enter_hook
    hooks.add(seen.append)
    try:
        for _ in range(3):
            K._launch_direct(k, grid, (x, 17, 3, 64), {"BLOCK_R": 16})
    finally:
        hooks.remove(seen.append)
    launch = k.compiled[0].launches[-1]
    assert launch[6] == ("metadata", 0, (100 // 16, 1), (x, 17, 3, 64, 16, 16, 5))
    assert launch[7] is hooks and launch[8] is triton.knobs.runtime.launch_exit_hook


def test_a_config_with_a_pre_hook_never_makes_a_plan(fake_cuda):
    k, x = JitTuner(), torch.zeros(4)
    k.pre_hook = lambda nargs: None
    for _ in range(3):
        assert K._launch_direct(k, grid, (x, 17, 3, 64), {"BLOCK_R": 16}) is None
    assert k.tunes == 3 and not k.compiled


def test_fast_launch_mode_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("FXFUSE_FAST_LAUNCH", "yes")
    with pytest.raises(ValueError, match="FXFUSE_FAST_LAUNCH must be 1, jit or 0"):
        K._fast_launch_mode()
    for mode in ("1", "jit", "0"):
        monkeypatch.setenv("FXFUSE_FAST_LAUNCH", mode)
        assert K._fast_launch_mode() == mode


# ------------------------------------------------------------------ `_planned`: a launcher's checks, once


def test_launcher_plans_are_reused_only_for_the_same_call_and_bad_input_still_raises(monkeypatch):
    made = []
    real = K._skinny_plan
    monkeypatch.setattr(K, "_skinny_plan", lambda *a: made.append(a[2:]) or real(*a))
    monkeypatch.setattr(K, "_SKINNY_PLANS", {})
    x, a = torch.randn(8, 16), torch.randn(4, 16)
    for _ in range(3):
        K.skinny_matmul(x, a, scale=2.0)
    assert len(made) == 1
    K.skinny_matmul(x.t().contiguous().t(), a, scale=2.0)  # other strides
    K.skinny_matmul(x, a, scale=3.0)
    monkeypatch.setenv("FXFUSE_LORA_FP32_DOT", "tf32x3")
    K.skinny_matmul(x, a, scale=3.0)
    assert len(made) == 4
    K.skinny_matmul(x, a, p=0.0)
    for bad, why in [(dict(p=False), "dropout p=False"), (dict(p=0.0, seed=-1), "seed -1"),
                     (dict(p=0.0, seed=True), "seed True"), (dict(scale=True), "scale True")]:
        with pytest.raises(ValueError, match=why):
            K.skinny_matmul(x, a, **bad)
    K.skinny_matmul(x, a, split_k=2)
    for bad, why in [(dict(split_k=2.0), "split_k 2.0"), (dict(scale=[2.0]), "scale"), (dict(p=[0.1]), "dropout p")]:
        with pytest.raises(ValueError, match=why):  # 2.0 == 2 as a key; lists are unhashable
            K.skinny_matmul(x, a, **bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        K.skinny_matmul(x, torch.randn(4, 15))
    with pytest.raises(ValueError, match="not a tensor"):
        K.skinny_matmul(x.tolist(), a)


def test_weight_grad_plans_keep_their_checks(monkeypatch):
    monkeypatch.setattr(K, "_WGRAD_PLANS", {})
    g, x = torch.randn(8, 4), torch.randn(8, 16)
    want = g.double().t() @ x.double()
    for _ in range(2):
        torch.testing.assert_close(K.lowrank_weight_grad(g, x).double(), want, rtol=1e-5, atol=1e-5)
    assert len(K._WGRAD_PLANS) == 1
    with pytest.raises(ValueError, match="seed"):
        K.lowrank_weight_grad(g, x, seed=2**31)
    with pytest.raises(ValueError, match="shape mismatch"):
        K.lowrank_weight_grad(g[:7], x)


def test_launch_path_in_force_names_what_runs(monkeypatch):
    monkeypatch.setattr(K, "_INTERPRET", False)
    monkeypatch.setattr(K, "_AUTOTUNE", True)
    for mode, ok, want in [("0", True, "autotuner"), ("jit", True, "jit"), ("1", True, "direct"), ("1", False, "jit")]:
        monkeypatch.setenv("FXFUSE_FAST_LAUNCH", mode)
        monkeypatch.setattr(K, "_DIRECT_LAUNCH_OK", ok)
        assert K.launch_path_in_force() == want
    monkeypatch.setattr(K, "_AUTOTUNE", False)
    assert K.launch_path_in_force() == "fixed config"
