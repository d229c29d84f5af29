"""On a CUDA device: the autotuned kernels launched with their tuned config through the JITFunction
(kernels/lora.py `_launch_tuned`) or through the compiled kernel's launcher (`_launch_direct`) give
bit-identical results to the autotuner's own launch, across
shapes, dtypes and operands whose alignment differs (which changes Triton's specialisation, not
the tuned config's key)."""
import pytest
import torch

from fxfuse.runtime.kernels import lora as K

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)"),
              # FXFUSE_AUTOTUNE=0 (bench/run_gpu.sh's default for GPU tests) launches fixed configs: no fast path
              pytest.mark.skipif(not K._AUTOTUNE, reason="kernels not autotuned (FXFUSE_AUTOTUNE=0)")]


def _both(monkeypatch, fn):
    """fn's result through the autotuner, and through each fast path (the compiled launcher "1", the
    JITFunction "jit"): a fast path's first call of a key may go through the autotuner or make its
    plan, so the third is the one compared."""
    monkeypatch.setenv("FXFUSE_FAST_LAUNCH", "0")
    slow = fn()
    fast = []
    for mode in ("jit", "1"):
        monkeypatch.setenv("FXFUSE_FAST_LAUNCH", mode)
        fn(), fn()
        fast.append(fn())
    return slow, fast


@pytest.mark.parametrize("m,k,r,xdtype", [(256, 4096, 16, torch.bfloat16), (1000, 333, 7, torch.float32),
                                          (77, 4096, 48, torch.float16), (4096, 1024, 128, torch.bfloat16)])
def test_direct_launch_matches_the_autotuner(monkeypatch, m, k, r, xdtype):
    g = torch.Generator("cuda").manual_seed(m + k + r)
    base = torch.randn(m + 1, k + 1, device="cuda", generator=g).to(xdtype)
    a = torch.randn(r, k, device="cuda", generator=g) * 0.05
    for x in (base[:m, :k], base[1:, 1:]):  # aligned, then offset by one element (misaligned rows)
        direct_before = len(K._skinny_kernel._fxfuse_fast[1]) if hasattr(K._skinny_kernel, "_fxfuse_fast") else 0
        plans_before = len(K._skinny_kernel.__dict__.get("_fxfuse_plans", ()))
        slow, fast = _both(monkeypatch, lambda: K.skinny_matmul(x, a, split_k=1))
        for got in fast:
            assert torch.equal(slow, got)
        assert len(K._skinny_kernel._fxfuse_fast[1]) >= max(direct_before, 1)  # the fast path remembered a config
        if K._DIRECT_LAUNCH_OK:  # a plan per alignment: the compiled launcher ran
            assert len(K._skinny_kernel._fxfuse_plans) > plans_before
        ref = x.double() @ a.double().t()
        assert (fast[1].double() - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3
        gm = torch.randn(m, r, device="cuda", generator=g)
        slow, fast = _both(monkeypatch, lambda: K.lowrank_weight_grad(gm, x, split_m=1))
        for got in fast:
            assert torch.equal(slow, got)


def test_the_tuned_kernels_expose_what_the_fast_path_reads():
    for kern in (K._skinny_kernel, K._lowrank_wgrad_kernel, K._fused_lora_kernel, K._skinny_group_kernel):
        assert set(kern.keys) <= set(kern.arg_names) and hasattr(kern.fn, "run")
