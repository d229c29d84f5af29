"""kernels/lora.py `_launch_tuned`: an autotuned launch goes through the autotuner once per key and
straight to the JITFunction with the tuned config after that. Checked against a stand-in autotuner
(the direct path runs compiled kernels only; tests/gpu/test_fast_launch_gpu.py compares results on a GPU)."""
from types import SimpleNamespace

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
