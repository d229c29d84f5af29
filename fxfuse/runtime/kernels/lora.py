"""Triton kernels for LoRA: skinny matmuls, the fused base+low-rank GEMM, and
the low-rank weight gradient.

LoRA forward / backward in terms of these launchers (``s`` = scaling,
``drop`` = inverted dropout with probability ``p`` and a fixed ``seed``)::

    XA = skinny_matmul(X, A, p=p, seed=seed)                     # drop(X) A^T   [M, R]
    Y  = fused_lora_matmul(X, W, XA, B, scale=s, bias=bias)      # X W^T + s XA B^T
    g  = skinny_matmul(dY, B.t())                                # dY B          [M, R]
    dB = skinny_matmul(dY.t(), XA.t(), scale=s)                  # s dY^T XA     [N, R]
    dA = lowrank_weight_grad(g, X, scale=s, p=p, seed=seed)      # s g^T drop(X) [R, K]
    dX = fused_lora_matmul(dY, W.t(), g, A.t(), scale=s, p=p, seed=seed)

Conventions shared by every kernel here:

* Operands may have arbitrary strides (transposed views are read in place).
* Everything accumulates in fp32.  When both dot operands share a 16-bit
  dtype on a GPU the dot runs natively on tensor cores with an fp32
  accumulator: the product of two 16-bit floats is exact in fp32.  A bf16/fp32
  pair (bf16 activations against fp32 adapters: every skinny LoRA dot) splits
  the fp32 operand into three bf16 pieces whose sum is it to ~2^-24 relative
  and runs three native bf16 dots (bf16x3, the default): near-fp32 accuracy at
  bf16 tensor-core speed, with no conversion of the big bf16 tile.  With
  ``FXFUSE_LORA_FP32_DOT=tf32x3`` (or ``split_fp32=False``), and for the other
  mixed pairs (fp16 is never split: fp16 pieces would underflow), both tiles
  are upcast to fp32 and run tf32x3.  The interpreter (whose bf16
  arithmetic is broken) splits the same way but upcasts the pieces and runs
  exact fp32 dots.
* Dropout contract (all kernels and :func:`dropout_mask` agree bit-exactly):
  element ``(m, k)`` of a logical ``[M, K]`` matrix is kept iff
  ``tl.rand(seed, m * K + k) >= p`` with the index computed in int64.  The
  mask zeroes elements (exact in any dtype); the ``1 / (1 - p)`` factor is
  folded into the fp32 output scale.

Every launcher has a ``check_<name>`` twin that returns ``None`` when the call
is supported and a short human reason otherwise; launchers raise
``ValueError(reason)`` and never guess a fallback.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import List, Optional, Union

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - triton is a hard dependency
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"triton is not importable ({exc})"

from .. import env
from ..cuda_fast import current_device as _current_device
from .host_math import cdiv, next_power_of_2

__all__ = [
    "triton_available",
    "dropout_mask",
    "dropout",
    "skinny_matmul",
    "check_skinny_matmul",
    "skinny_matmul_group",
    "check_skinny_matmul_group",
    "fused_lora_matmul",
    "check_fused_lora_matmul",
    "lowrank_weight_grad",
    "check_lowrank_weight_grad",
    "MAX_RANK",
]

# Triton decides interpreter-vs-compiled when a kernel is decorated, so this
# module does too: read the flag once, at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FXFUSE_AUTOTUNE=0 launches each kernel's first GPU config without tuning: the GPU fuzz suite
# draws many shapes and would otherwise spend minutes autotuning each new one.
_AUTOTUNE = os.environ.get("FXFUSE_AUTOTUNE", "1") != "0"

MAX_RANK = 128
# Precision of fp32 dots when tf32 is not allowed: "tf32x3" on the GPU (three tf32
# tensor-core passes, ~fp32 accuracy); exact "ieee" ran on CUDA cores and made the skinny
# LoRA dots compute-bound on the H100 (bench/RESULTS.md). The interpreter is exact either way.
_FP32_DOT_PRECISION = "ieee" if _INTERPRET else "tf32x3"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SEED = 2**31


# --------------------------------------------------------------------------
# Availability and argument checking
# --------------------------------------------------------------------------

_CUDA_READY = False  # set once CUDA was found usable: that does not change within a process


def triton_available(device: Union[torch.device, str, None]) -> Optional[str]:
    """None when the kernels can run on ``device``, else the reason why not."""
    global _CUDA_READY
    if _CUDA_READY and type(device) is torch.device and device.type == "cuda":
        return None  # the hot path: every launch asks (host time is the 4k step's limit)
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    device = torch.device(device) if device is not None else torch.device("cpu")
    if _INTERPRET:
        return None  # the interpreter runs on any device (via host copies)
    if device.type != "cuda":
        return f"tensor on {device.type} and TRITON_INTERPRET is not set"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    _CUDA_READY = True
    return None


def _check_tensor(name: str, t, ndim: int = 2) -> Optional[str]:
    if not isinstance(t, torch.Tensor):
        return f"{name} is not a tensor ({type(t).__name__})"
    if t.dim() != ndim:
        return f"{name} is not {ndim}-D (got {t.dim()}-D)"
    if t.dtype not in _SUPPORTED_DTYPES:
        return f"{name} dtype {t.dtype} not supported"
    return None


def _check_common(tensors: dict, p: float, seed: int, scale: float) -> Optional[str]:
    """Checks shared by every launcher: types, ranks, devices, p, seed."""
    for name, (t, ndim) in tensors.items():
        reason = _check_tensor(name, t, ndim)
        if reason:
            return reason
    devices = {t.device for t, _ in tensors.values()}
    if len(devices) > 1:
        return f"tensors on different devices ({', '.join(sorted(map(str, devices)))})"
    reason = triton_available(next(iter(devices)))
    if reason:
        return reason
    if not _real(p) or not (0.0 <= float(p) < 1.0):
        return f"dropout p={p!r} not in [0, 1)"
    if not _integral(seed) or not (0 <= seed < _MAX_SEED):
        return f"seed {seed!r} not an int in [0, 2**31)"
    return _check_scale(scale)


def _check_scale(scale) -> Optional[str]:
    if not _real(scale) or not math.isfinite(float(scale)):
        return f"scale {scale!r} is not a finite number"
    return None


# exact types first: numbers.Real / Integral are ABC checks, slow on a launch's hot path; bools are
# numbers to Python but never a valid p, seed or scale
def _real(v) -> bool:
    return type(v) is float or (not isinstance(v, bool) and isinstance(v, numbers.Real))


def _integral(v) -> bool:
    return type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Integral))


def _check_rank(r: int) -> Optional[str]:
    if r < 1:
        return f"rank {r} < 1"
    if r > MAX_RANK:
        return f"rank {r} > {MAX_RANK}"
    return None


# --------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------

def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(max(int(n), 1)))


def _bucket(n: int) -> int:
    """Autotune key for a size that changes call to call (token counts):
    retune per power-of-two bucket instead of per exact value."""
    return next_power_of_2(max(int(n), 1))


def _fp32_dot_env() -> str:
    """FXFUSE_LORA_FP32_DOT=bf16x3 (default) | tf32x3: how a bf16/fp32 dot keeps fp32 accuracy. Read
    per launch, so one process can compare both. bf16x3 measured faster than tf32x3 on 9 of 12
    GPU-bound launch shapes (1.06-3.6x) and 5-12% slower on 2 (H200, bench/RESULTS.md); the 8B 4k
    training step was no slower (median 0.3497 s against 0.3537 s, 12 interleaved steps each in one
    process, lower in 2 of 3 rounds)."""
    mode = env.get("FXFUSE_LORA_FP32_DOT", "bf16x3")
    if mode not in ("bf16x3", "tf32x3"):
        raise ValueError(f"FXFUSE_LORA_FP32_DOT must be bf16x3 or tf32x3, not {mode!r}")
    return mode


def _dot_mode(a: torch.dtype, b: torch.dtype, allow_tf32: bool, split: Optional[bool] = None):
    """(UPCAST, input_precision, SPLIT) for a dot of operands of dtypes ``a``/``b``.

    Native 16-bit dots when both operands share the dtype (and, for bf16, only when compiled: the
    interpreter's bf16 is broken). bf16 against fp32 with ``split`` True (None: FXFUSE_LORA_FP32_DOT)
    and tf32 not allowed splits the fp32 operand into three bf16 pieces: SPLIT = 1 (first operand)
    or 2 (second), see ``_split_dot``. Otherwise both operands go to fp32 and ``input_precision``
    decides ieee vs tf32 (tf32x3 on a GPU).
    """
    native = a == b and a in (torch.float16, torch.bfloat16)
    if native and a == torch.bfloat16 and _INTERPRET:
        native = False
    if native:
        return False, "tf32", 0  # Triton's default; precision only affects fp32 operands
    precision = "tf32" if allow_tf32 else _FP32_DOT_PRECISION
    if split is None:
        split = _fp32_dot_env() == "bf16x3"
    if split and not allow_tf32 and {a, b} == {torch.bfloat16, torch.float32}:
        # the interpreter upcasts the pieces (exact fp32 dots); a GPU dots them natively
        return _INTERPRET, "ieee", (1 if a == torch.float32 else 2)
    return True, precision, 0


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else _current_device()
        if index not in _SMS:
            _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _SMS[index]
    return 4  # interpreter: keep the split heuristics small and deterministic


class _on_device:
    """Make ``device`` current for the launch (Triton launches on the current
    CUDA device, which need not be the tensors' device)."""

    def __init__(self, device: torch.device):
        # no device switch when it is current already (two CUDA calls a launch otherwise)
        current = device.type != "cuda" or device.index is None or device.index == _current_device()
        self.ctx = None if current else torch.cuda.device(device)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _maybe_autotune(configs, key, interp_meta: dict, **kwargs):
    """Autotune on GPU; under the interpreter (where autotune cannot enumerate
    drivers) return the bare kernel and remember one fixed config for it."""

    safe = _safe_config(configs)

    def deco(fn):
        if _INTERPRET:
            fn._fixed_meta = dict(interp_meta)
            return fn
        if not _AUTOTUNE:
            # Smallest shared-memory footprint first, the others as fallbacks: fp32 operands double
            # the tiles, and the autotuner (which skips configs that do not fit) is not there.
            metas = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                     for c in [*sorted(configs, key=_smem_footprint), safe]]
            fn._fixed_meta, fn._fallback_metas = metas[0], metas[1:]
            return fn
        tuned = triton.autotune(configs=[*configs, safe], key=key, **kwargs)(fn)
        tuned._fixed_meta = {}
        return tuned

    return deco


def _safe_config(configs):
    """A last config that fits any device's shared memory at every rank (<= 128) and dtype: one stage,
    32-wide K tiles, 64-wide M/N tiles. Without it an fp32 rank-128 launch can exceed every tuned
    config's shared memory (measured on an H200: 384 KiB asked, 227 KiB there)."""
    meta = dict(min(configs, key=_smem_footprint).kwargs)
    meta.update({k: min(meta[k], 64) for k in ("BLOCK_M", "BLOCK_N") if k in meta})
    if "BLOCK_K" in meta:  # only where the kernel has one (a config may name nothing else)
        meta["BLOCK_K"] = min(meta["BLOCK_K"], 32)
    return triton.Config(meta, num_warps=4, num_stages=1)


def _smem_footprint(cfg) -> int:
    """Elements staged in shared memory by a config's pipelined K loop (x and w tiles)."""
    meta = cfg.kwargs
    return cfg.num_stages * meta.get("BLOCK_K", 1) * (meta.get("BLOCK_M", 1) + meta.get("BLOCK_N", 0))


def _fast_launch_mode() -> str:
    """FXFUSE_FAST_LAUNCH (read per launch, so one process can compare them): "1" (default) launches a
    tuned kernel's compiled binary straight (`_launch_direct`; Triton versions it was checked on,
    else "jit"); "jit" calls the JITFunction with the tuned config (`_launch_tuned`); "0" sends
    every launch through Triton's autotuner."""
    mode = env.get("FXFUSE_FAST_LAUNCH", "1")
    if mode not in ("1", "jit", "0"):
        raise ValueError(f"FXFUSE_FAST_LAUNCH must be 1, jit or 0, not {mode!r}")
    return mode


def launch_path_in_force() -> str:
    """How an autotuned LoRA kernel launches now: "interpreter", "fixed config" (FXFUSE_AUTOTUNE=0),
    "autotuner", "jit" or "direct" (what bench rows record)."""
    if _INTERPRET:
        return "interpreter"
    if not _AUTOTUNE:
        return "fixed config"
    mode = _fast_launch_mode()
    return {"0": "autotuner", "jit": "jit"}.get(mode, "direct" if _DIRECT_LAUNCH_OK else "jit")


def _launch(kernel, grid, *args, **kwargs):
    """kernel[grid](...): tuned on the GPU (then straight to the tuned config, `_launch_tuned`), else
    with its fixed config, where a config that does not fit the device's shared memory (raised at
    load, before anything runs) passes to the next one."""
    if not _INTERPRET and _AUTOTUNE:
        mode = _fast_launch_mode()
        if mode != "0":
            if mode == "1" and _DIRECT_LAUNCH_OK:
                return _launch_direct(kernel, grid, args, kwargs)
            return _launch_tuned(kernel, grid, args, kwargs)
    # Tried in order on every launch (a config that failed for one shape may fit the next; Triton
    # caches the failed compile, so retrying it is cheap).
    metas = [kernel._fixed_meta, *getattr(kernel, "_fallback_metas", ())]
    for i, meta in enumerate(metas):
        try:
            return kernel[grid](*args, **kwargs, **meta)
        except triton.runtime.errors.OutOfResources:
            if i == len(metas) - 1:
                raise


def _launch_tuned(kernel, grid, args, kwargs, want_compiled: bool = False):
    """An autotuned launch without the autotuner's per-call layer (~20 us of host time a launch on
    the H200 host, bench/launch_cost.py; a 4k step makes ~750 of them and its host is its limit).

    The autotuner picks a config per key (its `key` arguments' values and every tensor's dtype) and
    then calls the kernel's JITFunction with it. Here a miss goes through the autotuner (which tunes
    when it must) and remembers its pick under a key that holds at least as much (the key arguments,
    every constexpr passed, every tensor's dtype); a hit calls the JITFunction with that config, as
    the autotuner would. Specialisation (alignment, dtypes) stays with the JITFunction.
    With `want_compiled` it returns (the JITFunction's compiled kernel, the config), or None when the
    launch went through the autotuner."""
    fast = kernel.__dict__.get("_fxfuse_fast")
    if fast is None:
        names = list(kernel.arg_names)
        fast = kernel._fxfuse_fast = ([(names.index(k), k) for k in kernel.keys], {})
    key_args, picks = fast
    # a key argument positional or by keyword; every keyword (tensors by dtype); every positional
    # tensor's dtype (Parameters too)
    key = (tuple(args[i] if i < len(args) else kwargs.get(name) for i, name in key_args),
           tuple((k, v.dtype if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    cfg = picks.get(key)
    if cfg is None:
        out = kernel[grid](*args, **kwargs)
        if kernel.best_config.pre_hook is None:  # a config with a hook keeps the autotuner's path
            picks[key] = kernel.best_config.all_kwargs()
        return None if want_compiled else out
    out = kernel.fn.run(*args, grid=grid({**kwargs, **cfg}) if callable(grid) else grid, warmup=False,
                        **kwargs, **cfg)
    return (out, cfg) if want_compiled else out


# Triton versions whose compiled-kernel launcher `_launch_direct` was checked against (bit-equal
# results, tests/gpu/test_fast_launch_gpu.py); others take the JITFunction path.
_DIRECT_LAUNCH_OK = triton is not None and triton.__version__.startswith("3.6.")


_VARYING_ARGS = ("seed",)  # ints that change call to call (dropout seeds): keyed as Triton specialises them


def _spec_key(a):
    """What of one argument decides Triton's specialisation of a kernel (a superset): of an int, whether
    it is 0 or 1, whether 16 divides it and whether it fits 32 and 64 bits; anything else by value."""
    if type(a) is int:
        return a == 0, a == 1, a & 15 == 0, (a >> 31) in (0, -1), (a >> 63) in (0, -1)
    return type(a), a


def _launch_direct(kernel, grid, args, kwargs):
    """A tuned launch that calls the compiled kernel's launcher itself, as `JITFunction.run` would after
    binding the arguments, keying its cache and checking globals (~20 us of host time on the H200
    host: bench/launch_cost.py). The plan for a call (compiled kernel, config, the constexpr values
    that follow the positional arguments) is keyed by the device, every positional argument (a
    tensor by dtype and 16-byte alignment, a seed by `_spec_key`, anything else by value) and every
    keyword, so a plan is reused only where Triton would pick the same compiled kernel and the
    autotuner the same config; anything else (a first call, a config with a pre-hook, a kernel with
    pre-run hooks) goes the JITFunction way and makes the plan. Launch hooks (profilers) still get
    their metadata."""
    device = _current_device()
    plans = kernel.__dict__.get("_fxfuse_plans")
    if plans is None:
        return _plan_direct(kernel, grid, args, kwargs, None)
    key = [(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a for a in args]
    for i in kernel._fxfuse_varying:
        if i < len(key):
            key[i] = _spec_key(key[i])
    key.append(device)
    key.append(tuple(map(type, args)))  # 1 == 1.0 == True as keys; Triton specialises each differently
    key.append(tuple((k, (v.dtype, v.data_ptr() & 15 == 0) if isinstance(v, torch.Tensor) else v)
                     for k, v in kwargs.items()))
    key = tuple(key)
    plan = plans.get(key)
    if plan is None:
        return _plan_direct(kernel, grid, args, kwargs, key)
    compiled, cfg, tail = plan
    g = grid({**kwargs, **cfg}) if callable(grid) else grid
    stream = torch._C._cuda_getCurrentRawStream(device)
    enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
    if enter.calls or leave.calls:
        meta = compiled.launch_metadata(g, stream, *args, *tail)
    else:
        meta = enter = leave = None  # no hooks: the launcher calls nothing
    compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, meta, enter, leave, *args, *tail)
    return compiled


def _plan_direct(kernel, grid, args, kwargs, key):
    """The JITFunction launch of `_launch_tuned`, remembering what `_launch_direct` needs."""
    got = _launch_tuned(kernel, grid, args, kwargs, want_compiled=True)
    if "_fxfuse_plans" not in kernel.__dict__:
        kernel._fxfuse_varying = tuple(i for i, name in enumerate(kernel.arg_names) if name in _VARYING_ARGS)
        kernel._fxfuse_plans = {}
    plans = kernel._fxfuse_plans
    if got is None:
        return None
    compiled, cfg = got
    if hasattr(compiled, "result"):  # Triton's asynchronous compile mode
        compiled = compiled.result()
    if key is None or kernel.fn.pre_run_hooks:
        return compiled
    compiled._init_handles()
    # the parameters after the positional ones, in signature order: keywords, the config's
    # constexprs, defaults (what JITFunction.run's binder passes the launcher)
    given = {**kwargs, **cfg}
    tail = []
    for name, param in list(kernel.fn.signature.parameters.items())[len(args):]:
        if name in given:
            tail.append(given[name])
        elif param.default is not param.empty:
            tail.append(param.default)
        else:
            raise TypeError(f"{getattr(kernel.fn, '__name__', kernel.fn)}: no value for parameter {name!r}")
    _remember(plans, key, (compiled, cfg, tuple(tail)))
    return compiled


def _cfg(num_warps: int, num_stages: int, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Interpreter configs: small enough that the fuzz shapes (<= ~100) still span
# several blocks and loop steps (exercising edges, swizzle and split logic),
# big enough to keep the per-step interpreter overhead low.
_INTERP_SKINNY = dict(BLOCK_M=32, BLOCK_K=32)
_INTERP_FUSED = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_INTERP_WGRAD = dict(BLOCK_M=32, BLOCK_K=32)


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _keep(seed, p, rows, cols, n_cols):
        """Dropout keep-mask of logical elements (rows, cols) of a matrix with
        ``n_cols`` columns: the one definition every kernel uses."""
        idx = rows.to(tl.int64) * n_cols + cols
        return tl.rand(seed, idx) >= p

    @triton.jit
    def _bf16_pieces(t):
        """fp32 ``t`` as three bf16 pieces, t ~= hi + mid + lo to ~2^-24 relative: each remainder is
        exact in fp32, and each piece keeps the next 8 significant bits."""
        hi = t.to(tl.bfloat16)
        rem = t - hi.to(tl.float32)
        mid = rem.to(tl.bfloat16)
        lo = (rem - mid.to(tl.float32)).to(tl.bfloat16)
        return hi, mid, lo

    @triton.jit
    def _split_dot(a, b, acc, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """acc + a @ b in fp32. SPLIT 0: one dot (operands upcast to fp32 when UPCAST). SPLIT 1 / 2:
        the first / second operand is fp32 and the other bf16: three dots against its bf16 pieces,
        smallest first (products of bf16 are exact in fp32, so only the accumulation rounds)."""
        if SPLIT == 0:
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        elif SPLIT == 1:
            hi, mid, lo = _bf16_pieces(a)
            if UPCAST:
                b = b.to(tl.float32)
                acc = tl.dot(lo.to(tl.float32), b, acc, input_precision=PRECISION)
                acc = tl.dot(mid.to(tl.float32), b, acc, input_precision=PRECISION)
                acc = tl.dot(hi.to(tl.float32), b, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(lo, b, acc)
                acc = tl.dot(mid, b, acc)
                acc = tl.dot(hi, b, acc)
        else:
            hi, mid, lo = _bf16_pieces(b)
            if UPCAST:
                a = a.to(tl.float32)
                acc = tl.dot(a, lo.to(tl.float32), acc, input_precision=PRECISION)
                acc = tl.dot(a, mid.to(tl.float32), acc, input_precision=PRECISION)
                acc = tl.dot(a, hi.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, lo, acc)
                acc = tl.dot(a, mid, acc)
                acc = tl.dot(a, hi, acc)
        return acc

    @triton.jit
    def _dropout_mask_kernel(out_ptr, numel, p, seed, BLOCK: tl.constexpr):
        # Flat index == m * K + k for a contiguous [M, K] output.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = tl.rand(seed, offs) >= p
        tl.store(out_ptr + offs, keep.to(tl.uint8), mask=offs < numel)


# Philox-4x32-10 constants, as used by tl.rand / tl.randint.
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = np.uint64(0xFFFFFFFF)


def _tl_rand_numpy(seed: int, idx: np.ndarray) -> np.ndarray:
    """Host re-implementation of ``tl.rand(seed, idx)`` for int64 ``idx``, so
    masks can be built where no Triton kernel can run (e.g. a CPU fallback).
    Bit-exact with the device version (tested)."""
    idx = idx.astype(np.uint64)
    c0, c1 = idx & _M32, idx >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(0)
    a, b = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B)
    for _ in range(10):
        pa, pb = a * c0, b * c2  # 32x32 -> 64-bit products, exact in uint64
        c0, c1, c2, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0, pb & _M32,
                          (pa >> np.uint64(32)) ^ c3 ^ k1, pa & _M32)
        k0 = (k0 + np.uint64(_PHILOX_KEY_A)) & _M32
        k1 = (k1 + np.uint64(_PHILOX_KEY_B)) & _M32
    x = c0.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x).astype(np.int32)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def dropout_mask(shape_m: int, shape_k: int, p: float, seed: int,
                 device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Keep-mask (bool ``[shape_m, shape_k]``) of the dropout contract:
    ``keep[m, k] = tl.rand(seed, m * shape_k + k) >= p``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    m, k = int(shape_m), int(shape_k)
    if p <= 0.0 or m * k == 0:
        return torch.ones((m, k), dtype=torch.bool, device=device)
    if triton_available(device) is None:
        out = torch.empty((m, k), dtype=torch.uint8, device=device)
        block = 1024
        with _on_device(device):
            _dropout_mask_kernel[(cdiv(m * k, block),)](out, m * k, float(p), int(seed),
                                                                BLOCK=block)
        return out.view(torch.bool)
    rand = _tl_rand_numpy(int(seed), np.arange(m * k, dtype=np.int64))
    keep = torch.from_numpy((rand >= np.float32(p)).reshape(m, k))
    return keep.to(device)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of a 2-D ``x`` under the dropout contract (reference
    helper; computed in fp32, returned in ``x.dtype``)."""
    if p <= 0.0:
        return x
    keep = dropout_mask(x.shape[0], x.shape[1], p, seed, x.device)
    return torch.where(keep, x.float() / (1.0 - p), 0.0).to(x.dtype)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------

if triton is not None:

    # skinny configs; the grouped kernel tunes over the first four. The last three won products of
    # the 8B layer's backward in bench/skinny_sweep.py (H200: e.g. dB of k/v with 32-row tiles).
    _SKINNY_CONFIGS = [
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
        _cfg(4, 3, BLOCK_M=128, BLOCK_K=64),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
        _cfg(8, 3, BLOCK_M=256, BLOCK_K=64),
        _cfg(4, 5, BLOCK_M=64, BLOCK_K=64),
        _cfg(8, 4, BLOCK_M=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=32, BLOCK_K=256),
    ]

    @_maybe_autotune(
        configs=_SKINNY_CONFIGS,
        # every variant that changes the work per tile is its own key: a config tuned for one dot
        # mode (bf16x3, tf32x3) is not reused for the other, nor one tuned for a row-major x (g, xa)
        # for a transposed one (dB), nor one tuned for 2 splits of K for 8
        key=["M_BUCKET", "K_BUCKET", "TUNE_LAYOUT", "TUNE_SPLITS", "BLOCK_R", "SPLIT", "UPCAST", "HAS_DROPOUT",
             "ATOMIC"],
        interp_meta=_INTERP_SKINNY,
        reset_to_zero=["out_ptr"],  # split-K accumulates atomically
    )
    @triton.jit(do_not_specialize=["TUNE_LAYOUT", "TUNE_SPLITS"])  # key-only: no variant per value
    def _skinny_kernel(
        x_ptr, a_ptr, out_ptr,
        M, K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
        scale, p, seed,
        M_BUCKET, K_BUCKET, TUNE_LAYOUT, TUNE_SPLITS,
        BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[M, R] (+)= scale * drop(x)[M, K] @ a[R, K]^T.

        Grid (M blocks, K splits).  Each split reduces a contiguous run of
        whole BLOCK_K steps; with more than one split the partial sums are
        atomically added into a zeroed output. TUNE_LAYOUT and TUNE_SPLITS
        (`_tune_layout`, the split count) only key the autotuner."""
        _skinny_tile(x_ptr, a_ptr, out_ptr, M, K, R,
                     stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
                     scale, p, seed, tl.program_id(0),
                     BLOCK_R, HAS_DROPOUT, UPCAST, PRECISION, SPLIT, ATOMIC, BLOCK_M, BLOCK_K)

    @triton.jit
    def _skinny_tile(
        x_ptr, a_ptr, out_ptr, M, K, R,
        stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
        scale, p, seed, pid_m,
        BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program's [BLOCK_M, R] block of the skinny product, over its share of K (program id 1
        picks the split): the loop both skinny kernels run."""
        pid_k = tl.program_id(1)
        k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1))
        k_begin = pid_k * k_steps * BLOCK_K
        k_end = tl.minimum(K, k_begin + k_steps * BLOCK_K)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < R
        # int64 row/col offsets: big operands can exceed 2**31 elements.
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
        a_ptrs = a_ptr + offs_k.to(tl.int64)[:, None] * stride_ak + offs_r.to(tl.int64)[None, :] * stride_ar

        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_mask = offs_k < k_end
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _keep(seed, p, offs_m[:, None], offs_k[None, :], K)
                xt = tl.where(keep, xt, tl.zeros_like(xt))
            acc = _split_dot(xt, at, acc, SPLIT, UPCAST, PRECISION)
            offs_k += BLOCK_K
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak

        acc = acc * scale
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r.to(tl.int64)[None, :] * stride_or
        out_mask = m_mask[:, None] & r_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
        else:
            tl.store(out_ptrs, acc, mask=out_mask)

    # One launch for up to three skinny products of a LoRA group's backward (g_i = s·dy_i·B_i and
    # dB_i = s·dy_iᵀ·xa_i): per problem its pointers, sizes and strides. Its integers are not
    # specialised, so every problem's values have one type and the branches that pick them merge.
    _GROUP_INTS = [f"{n}{j}" for j in range(3) for n in ("M", "K", "R", "sxm", "sxk", "sar", "sak", "som", "sor")]

    @_maybe_autotune(
        configs=_SKINNY_CONFIGS[:4],
        key=["M_BUCKET", "K_BUCKET", "TUNE_LAYOUT", "TUNE_SPLITS", "BLOCK_R", "SPLIT", "UPCAST", "ATOMIC"],
        interp_meta=_INTERP_SKINNY,
        reset_to_zero=["o0", "o1", "o2"],  # split-K accumulates atomically
    )
    @triton.jit(do_not_specialize=_GROUP_INTS + ["TUNE_LAYOUT", "TUNE_SPLITS"])
    def _skinny_group_kernel(
        x0, a0, o0, M0, K0, R0, sxm0, sxk0, sar0, sak0, som0, sor0, scale0,
        x1, a1, o1, M1, K1, R1, sxm1, sxk1, sar1, sak1, som1, sor1, scale1,
        x2, a2, o2, M2, K2, R2, sxm2, sxk2, sar2, sak2, som2, sor2, scale2,
        M_BUCKET, K_BUCKET, TUNE_LAYOUT, TUNE_SPLITS,
        PROBLEMS: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """o_j[M_j, R_j] (+)= scale_j * x_j[M_j, K_j] @ a_j[R_j, K_j]^T for j < PROBLEMS.

        Grid (Σ_j M blocks of problem j, K splits): a program finds its problem from its M block,
        then runs `_skinny_kernel`'s loop (without dropout)."""
        pid = tl.program_id(0)
        nb0 = tl.cdiv(M0, BLOCK_M)
        nb1 = tl.cdiv(M1, BLOCK_M)
        if pid < nb0:
            x_ptr, a_ptr, out_ptr, M, K, R, scale = x0, a0, o0, M0, K0, R0, scale0
            stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or = sxm0, sxk0, sar0, sak0, som0, sor0
            pid_m = pid
        elif pid < nb0 + nb1:  # an unused slot has M = 0: no blocks
            x_ptr, a_ptr, out_ptr, M, K, R, scale = x1, a1, o1, M1, K1, R1, scale1
            stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or = sxm1, sxk1, sar1, sak1, som1, sor1
            pid_m = pid - nb0
        else:
            x_ptr, a_ptr, out_ptr, M, K, R, scale = x2, a2, o2, M2, K2, R2, scale2
            stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or = sxm2, sxk2, sar2, sak2, som2, sor2
            pid_m = pid - nb0 - nb1
        _skinny_tile(x_ptr, a_ptr, out_ptr, M, K, R,
                     stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
                     scale, 0.0, 0, pid_m,
                     BLOCK_R, False, UPCAST, PRECISION, SPLIT, ATOMIC, BLOCK_M, BLOCK_K)

    @_maybe_autotune(
        configs=[
            _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        ],
        key=["M_BUCKET", "N", "K", "BLOCK_R"],
        interp_meta=_INTERP_FUSED,
    )
    @triton.jit
    def _fused_lora_kernel(
        x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, out_ptr,
        M, N, K, R,
        stride_xm, stride_xk, stride_wn, stride_wk,
        stride_am, stride_ar, stride_bn, stride_br,
        stride_bias, stride_om, stride_on,
        scale, p, seed,
        M_BUCKET,
        BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        UPCAST: tl.constexpr, BASE_PRECISION: tl.constexpr, LOWRANK_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out = x @ w^T (+ bias) + keep * scale * (xa @ b^T), rounded once.

        The low-rank product is computed first, masked and scaled, and then
        used as the initial value of the single fp32 accumulator of the base
        GEMM: one accumulator (no extra registers for a second tile) and one
        rounding to the output dtype at the end."""
        # Group-M swizzle: consecutive programs share W tiles in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % group_m
        pid_n = (pid % group_size) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # Rows/cols past the edge are wrapped instead of masked so the main
        # loop only needs a K mask; their results are never stored.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)

        # ---- low-rank part, fp32 (R is padded to BLOCK_R with masks) ----
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_mask = offs_r < R - r0
            rr = (r0 + offs_r).to(tl.int64)
            xa = tl.load(xa_ptr + rows[:, None] * stride_am + rr[None, :] * stride_ar,
                         mask=r_mask[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + rr[:, None] * stride_br + cols[None, :] * stride_bn,
                         mask=r_mask[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(xa, bt, acc, input_precision=LOWRANK_PRECISION)
        acc = acc * scale
        if HAS_DROPOUT:
            acc = tl.where(_keep(seed, p, offs_m[:, None], offs_n[None, :], N), acc, 0.0)

        # ---- base GEMM on top ----
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + cols[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=BASE_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @_maybe_autotune(
        configs=[
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
            _cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
            _cfg(8, 3, BLOCK_M=64, BLOCK_K=256),
            _cfg(4, 3, BLOCK_M=128, BLOCK_K=64),
            _cfg(8, 3, BLOCK_M=128, BLOCK_K=128),
            # winners of bench/skinny_sweep.py at the 8B layer's dA products (H200)
            _cfg(4, 5, BLOCK_M=64, BLOCK_K=64),
            _cfg(4, 3, BLOCK_M=32, BLOCK_K=64),
            _cfg(4, 4, BLOCK_M=32, BLOCK_K=128),
        ],
        key=["M_BUCKET", "K", "TUNE_LAYOUT", "TUNE_SPLITS", "BLOCK_R", "SPLIT", "UPCAST", "HAS_DROPOUT", "ATOMIC"],
        interp_meta=_INTERP_WGRAD,
        reset_to_zero=["out_ptr"],  # split-M accumulates atomically
    )
    @triton.jit(do_not_specialize=["TUNE_LAYOUT", "TUNE_SPLITS"])  # key-only: no variant per value
    def _lowrank_wgrad_kernel(
        g_ptr, x_ptr, out_ptr,
        M, K, R,
        stride_gm, stride_gr, stride_xm, stride_xk, stride_or, stride_ok,
        scale, p, seed,
        M_BUCKET, TUNE_LAYOUT, TUNE_SPLITS,
        BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[R, K] (+)= scale * g[M, R]^T @ drop(x)[M, K].

        Grid (K blocks, M splits): M (tokens) is long and R*K small, so each
        program reduces a contiguous run of whole BLOCK_M steps of M for one
        K block; with more than one split, partial sums are atomically added
        into a zeroed output. TUNE_LAYOUT and TUNE_SPLITS only key the
        autotuner."""
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        m_steps = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1))
        m_begin = pid_s * m_steps * BLOCK_M
        m_end = tl.minimum(M, m_begin + m_steps * BLOCK_M)

        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        offs_m = m_begin + tl.arange(0, BLOCK_M)
        k_mask = offs_k < K
        r_mask = offs_r < R
        g_ptrs = g_ptr + offs_r.to(tl.int64)[:, None] * stride_gr + offs_m.to(tl.int64)[None, :] * stride_gm
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk

        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            m_mask = offs_m < m_end
            gt = tl.load(g_ptrs, mask=r_mask[:, None] & m_mask[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _keep(seed, p, offs_m[:, None], offs_k[None, :], K)
                xt = tl.where(keep, xt, tl.zeros_like(xt))
            acc = _split_dot(gt, xt, acc, SPLIT, UPCAST, PRECISION)
            offs_m += BLOCK_M
            g_ptrs += BLOCK_M * stride_gm
            x_ptrs += BLOCK_M * stride_xm

        acc = acc * scale
        out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_k.to(tl.int64)[None, :] * stride_ok
        out_mask = r_mask[:, None] & k_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
        else:
            tl.store(out_ptrs, acc, mask=out_mask)


# --------------------------------------------------------------------------
# skinny_matmul
# --------------------------------------------------------------------------

def check_skinny_matmul(x, a, *, scale=1.0, p=0.0, seed=0, split_k=None, **_) -> Optional[str]:
    reason = _check_common({"x": (x, 2), "a": (a, 2)}, p, seed, scale)
    if reason:
        return reason
    if x.shape[1] != a.shape[1]:
        return f"shape mismatch: x {tuple(x.shape)} vs a {tuple(a.shape)} (need x[M,K], a[R,K])"
    reason = _check_rank(a.shape[0])
    if reason:
        return reason
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        return f"split_k {split_k!r} must be a positive int"
    return None


DETERMINISTIC_MAX_SPLIT = 2  # two partial sums added atomically to a zeroed output: the same bits in either order


def _split_cap(split: int, deterministic: bool) -> int:
    """A launcher's split, capped at DETERMINISTIC_MAX_SPLIT under torch.use_deterministic_algorithms
    (an explicit split too)."""
    return min(split, DETERMINISTIC_MAX_SPLIT) if deterministic else split


# FXFUSE_LORA_SPLITS -> the least reduction length one split keeps: (skinny K, weight-grad rows)
_SPLIT_RULES = {"fill": (1024, 512), "legacy": (2048, 1024)}


def _split_rule() -> tuple:
    """FXFUSE_LORA_SPLITS=fill (default) | legacy, read when a launcher plans a call shape (the plan
    caches key it). legacy is the rule before 2026-12-02 (K/2048, M/1024), kept so that one process
    can compare the two (bench/runtime_ab.py --toggle)."""
    rule = env.get("FXFUSE_LORA_SPLITS", "fill")
    if rule not in _SPLIT_RULES:
        raise ValueError(f"FXFUSE_LORA_SPLITS must be one of {sorted(_SPLIT_RULES)}, not {rule!r}")
    return _SPLIT_RULES[rule]


def _skinny_split(m: int, k: int, device: torch.device, deterministic: bool = False) -> int:
    """Split K when there are too few M blocks to fill the GPU (~2 programs per SM), each split
    keeping at least 1024 of K (dB = dYᵀ·XA: M is out_features, K the token count). The legacy cap of
    K/2048 ran 16-64 programs on an H200's 132 SMs at the 8B layer's 4k shapes
    (bench/skinny_sweep.py); the sweep's best splits there ranged from 1 to 8 by product, so this
    is a rule of thumb, not each product's best. Deterministic mode caps it (`_split_cap`)."""
    m_blocks = cdiv(m, 128)
    target = 2 * _num_sms(device)
    if m_blocks == 0 or m_blocks >= target:  # nothing to do, or enough row blocks
        return 1
    split = max(1, min(cdiv(target, m_blocks), k // _split_rule()[0]))
    return _split_cap(split, deterministic)


def skinny_matmul(x: torch.Tensor, a: torch.Tensor, *, scale: float = 1.0, p: float = 0.0,
                  seed: int = 0, allow_tf32: bool = False,
                  split_k: Optional[int] = None, split_fp32: Optional[bool] = None) -> torch.Tensor:
    """``out[M, R] = scale * drop(x)[M, K] @ a[R, K]^T`` in float32.

    ``R`` (the LoRA rank) is 1..128.  Dropout (``p > 0``) is applied to ``x``
    with the module's dropout contract over ``x``'s logical ``[M, K]`` shape.
    fp32 (or mixed-dtype) dots keep ~fp32 accuracy unless ``allow_tf32``
    (module docstring: bf16x3, tf32x3, or exact under the interpreter).
    ``split_k`` overrides the split-K heuristic (``>1`` adds partial sums
    atomically; past 2 their order, so the last bits, can change run to run;
    under torch.use_deterministic_algorithms every split is capped at 2).
    ``split_fp32`` picks the dot of a bf16/fp32 pair: True bf16x3, False
    tf32x3, None the FXFUSE_LORA_FP32_DOT default (bf16x3)."""
    reason, plan = _planned(_SKINNY_PLANS, _skinny_plan, x, a, scale, p, allow_tf32, split_k, split_fp32,
                            torch.are_deterministic_algorithms_enabled())
    if reason is None and not _seed_ok(seed):
        reason = check_skinny_matmul(x, a, scale=scale, p=p, seed=seed, split_k=split_k)
    if reason:
        raise ValueError(reason)
    m, k, r, split_k, atomic, _, meta = plan
    out = (torch.zeros if atomic or k == 0 else torch.empty)((m, r), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return out
    grid = lambda cfg: (cdiv(m, cfg["BLOCK_M"]), split_k)
    with _on_device(x.device):
        _launch(_skinny_kernel, grid, *_skinny_args(x, a, out, seed, plan), **meta)
    return out


def _skinny_args(x, a, out, seed, plan) -> tuple:
    """`_skinny_kernel`'s positional arguments for a `_skinny_plan` plan (bench/skinny_sweep.py too)."""
    m, k, r, _, _, launch_args, _ = plan
    return (x, a, out, m, k, r, *launch_args[:4], r, 1, *launch_args[4:6], int(seed), *launch_args[6:])


def _skinny_plan(x, a, scale, p, allow_tf32, split_k, split_fp32, deterministic=False):
    """(reason, None) for an unsupported call, else (None, what `skinny_matmul` launches with)."""
    reason = check_skinny_matmul(x, a, scale=scale, p=p, split_k=split_k)
    if reason:
        return reason, None
    (m, k), r = x.shape, a.shape[0]
    if split_k is None:
        split_k = _skinny_split(m, k, x.device, deterministic)
    split_k = _split_cap(max(1, min(split_k, cdiv(k, 16))), deterministic)
    launch_args = (x.stride(0), x.stride(1), a.stride(0), a.stride(1),  # the output's strides are (r, 1)
                   *_scale_and_p(scale, p), _bucket(m), _bucket(k), _tune_layout(x, a), split_k)
    meta = _skinny_meta(x.dtype, a.dtype, r, p, allow_tf32, split_fp32, split_k > 1)
    return None, (m, k, r, split_k, split_k > 1, launch_args, meta)


def _scale_and_p(scale, p) -> tuple:
    """The kernels' scale (dropout's 1 / (1 - p) folded in) and p, as floats."""
    return float(scale) / (1.0 - float(p)), float(p)


def _skinny_meta(a_dtype, b_dtype, r: int, p, allow_tf32: bool, split_fp32, atomic: bool) -> dict:
    """The constexprs the skinny and weight-gradient kernels share: rank tile, dropout, dot mode, atomics."""
    upcast, precision, split = _dot_mode(a_dtype, b_dtype, allow_tf32, split_fp32)
    return dict(BLOCK_R=_pow2_at_least(r), HAS_DROPOUT=p > 0, UPCAST=upcast, PRECISION=precision, SPLIT=split,
                ATOMIC=atomic)


_SKINNY_PLANS: dict = {}
_WGRAD_PLANS: dict = {}
_PLANS_MAX = 4096  # per cache (a launcher's, a kernel's direct plans); past it they are dropped and rebuilt


def _planned(cache: dict, make, x, y, scale, p, *rest):
    """make(x, y, scale, p, *rest) -> (reason, plan), remembered for later calls with the same shapes,
    strides, dtypes and devices of x and y, the same scale, p (values and types: True is not 1) and
    rest, and the same FXFUSE_LORA_FP32_DOT and FXFUSE_LORA_SPLITS: a launcher's checks and
    heuristics (~10 us of Python a launch) then run once per such call. Only supported calls are
    remembered: a bad one raises with its reason every time. Anything that is not a tensor goes straight to `make` (and its checks)."""
    try:
        key = (x.shape, x.stride(), x.dtype, x.device, y.shape, y.stride(), y.dtype, y.device,
               type(scale), scale, type(p), p, *rest, *map(type, rest), env.get("FXFUSE_LORA_FP32_DOT"),
               env.get("FXFUSE_LORA_SPLITS"))
        got = cache.get(key)  # hashing raises for unhashable values: their checks reject them
    except (AttributeError, TypeError):
        return make(x, y, scale, p, *rest)
    if got is None:
        got = make(x, y, scale, p, *rest)
        if got[0] is None:
            _remember(cache, key, got)
    return got


def _remember(cache: dict, key, value) -> None:
    """cache[key] = value, dropping every entry first once there are _PLANS_MAX (a new shape every
    call would otherwise grow it without bound)."""
    if len(cache) >= _PLANS_MAX:
        cache.clear()
    cache[key] = value


def _seed_ok(seed) -> bool:
    """The fast form of `_check_common`'s seed rule (an int in [0, 2**31)), for launchers whose other
    checks a plan remembers; False sends them to their full check, which names the problem."""
    return type(seed) is int and 0 <= seed < _MAX_SEED


GROUP_MAX = 3  # problems per skinny_matmul_group launch


def check_skinny_matmul_group(xs, as_, scales) -> Optional[str]:
    if not 1 <= len(xs) <= GROUP_MAX or len(as_) != len(xs) or len(scales) != len(xs):
        return f"1 to {GROUP_MAX} problems, each with x, a and scale (got {len(xs)}, {len(as_)}, {len(scales)})"
    for j, (x, a, s) in enumerate(zip(xs, as_, scales)):
        reason = check_skinny_matmul(x, a, scale=s)
        if reason:
            return f"problem {j}: {reason}"
    if len({x.dtype for x in xs}) > 1 or len({a.dtype for a in as_}) > 1:
        return "the problems' x (and a) do not share one dtype"
    if len({x.device for x in (*xs, *as_)}) > 1:
        return "the problems are on different devices"
    return None


def skinny_matmul_group(xs, as_, scales, *, side_by_side: bool = False, split_k: Optional[int] = None,
                        split_fp32: Optional[bool] = None) -> List[torch.Tensor]:
    """``[scale_j * x_j[M_j, K_j] @ a_j[R_j, K_j]^T for each j]`` in float32, in one launch (up to
    GROUP_MAX problems, no dropout; ``skinny_matmul`` computes each one the same way). With
    ``side_by_side`` (every M_j equal) the outputs are column blocks of one [M, ΣR_j] tensor, which
    comes last in the returned list. K is split (``skinny_matmul``'s heuristic over all problems'
    rows and the largest K; ``split_k`` overrides) when their M blocks are too few to fill the GPU;
    then every problem accumulates atomically (past 2 splits not bitwise deterministic; capped at 2
    under torch.use_deterministic_algorithms), also one that alone would not have been split.
    Integer arguments below 2**31 (every LoRA shape) keep the branches that pick a problem's values
    of one type."""
    reason = check_skinny_matmul_group(xs, as_, scales)
    if reason is None and split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        reason = f"split_k {split_k!r} must be a positive int"
    if reason:
        raise ValueError(reason)
    if side_by_side and len({x.shape[0] for x in xs}) > 1:
        raise ValueError("side_by_side needs every problem's M equal")
    dev, n = xs[0].device, len(xs)
    ms, ks, rs = [x.shape[0] for x in xs], [x.shape[1] for x in xs], [a.shape[0] for a in as_]
    deterministic = torch.are_deterministic_algorithms_enabled()
    if split_k is None:
        split_k = _skinny_split(sum(ms), max(ks), dev, deterministic)
    split_k = _split_cap(max(1, min(split_k, cdiv(max(ks), 16))), deterministic)
    atomic = split_k > 1 or min(ks) == 0
    alloc = torch.zeros if atomic else torch.empty
    if side_by_side:
        base = alloc((ms[0], sum(rs)), dtype=torch.float32, device=dev)
        offs = [sum(rs[:j]) for j in range(n)]
        outs = [base[:, o:o + r] for o, r in zip(offs, rs)]
    else:
        outs = [alloc((m, r), dtype=torch.float32, device=dev) for m, r in zip(ms, rs)]
    if sum(ms) == 0 or max(ks) == 0:
        return outs + ([base] if side_by_side else [])
    upcast, precision, split = _dot_mode(xs[0].dtype, as_[0].dtype, False, split_fp32)
    slots = []
    for j in range(GROUP_MAX):
        x, a, o = (xs[j], as_[j], outs[j]) if j < n else (xs[0], as_[0], outs[0])
        m = ms[j] if j < n else 0  # an unused slot has no M blocks
        slots += [x, a, o, m, x.shape[1], a.shape[0], x.stride(0), x.stride(1), a.stride(0), a.stride(1),
                  o.stride(0), o.stride(1), float(scales[j]) if j < n else 0.0]
    grid = lambda meta: (sum(cdiv(m, meta["BLOCK_M"]) for m in ms), split_k)
    with _on_device(dev):
        _launch(_skinny_group_kernel, grid, *slots, _bucket(max(ms)), _bucket(max(ks)), _tune_layout(xs[0], as_[0]),
                split_k,
                PROBLEMS=n, BLOCK_R=_pow2_at_least(max(rs)), UPCAST=upcast, PRECISION=precision, SPLIT=split,
                ATOMIC=atomic)
    return outs + ([base] if side_by_side else [])


# --------------------------------------------------------------------------
# fused_lora_matmul
# --------------------------------------------------------------------------

def check_fused_lora_matmul(x, w, xa, b, *, scale=1.0, bias=None, p=0.0, seed=0,
                            out_dtype=None, **_) -> Optional[str]:
    tensors = {"x": (x, 2), "w": (w, 2), "xa": (xa, 2), "b": (b, 2)}
    if bias is not None:
        tensors["bias"] = (bias, 1)
    reason = _check_common(tensors, p, seed, scale)
    if reason:
        return reason
    (m, k), (n, k2), (m2, r), (n2, r2) = x.shape, w.shape, xa.shape, b.shape
    if k != k2:
        return f"shape mismatch: x {tuple(x.shape)} vs w {tuple(w.shape)} (need x[M,K], w[N,K])"
    if m != m2 or n != n2 or r != r2:
        return (f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}, xa {tuple(xa.shape)}, "
                f"b {tuple(b.shape)} (need xa[M,R], b[N,R])")
    if bias is not None and bias.shape[0] != n:
        return f"shape mismatch: bias {tuple(bias.shape)} vs N={n}"
    reason = _check_rank(r)
    if reason:
        return reason
    if out_dtype is not None and out_dtype not in _SUPPORTED_DTYPES:
        return f"out_dtype {out_dtype} not supported"
    return None


def fused_lora_matmul(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, *,
                      scale: float, bias: Optional[torch.Tensor] = None, p: float = 0.0,
                      seed: int = 0, out_dtype: Optional[torch.dtype] = None,
                      allow_tf32_lowrank: bool = False) -> torch.Tensor:
    """``out[M, N] = x @ w^T (+ bias) + keep(m, n) * scale * (xa @ b^T) / (1 - p)``.

    ``keep`` (only when ``p > 0``) follows the dropout contract over the
    logical ``[M, N]`` output; this is the backward ``dX`` of LoRA with
    dropout.  Accumulates in one fp32 tile and rounds once to ``out_dtype``
    (default ``x.dtype``).

    The base product runs natively when x/w share a 16-bit dtype (fp32
    accumulate), else in fp32 with tf32 iff
    ``torch.backends.cuda.matmul.allow_tf32`` (as ``F.linear`` would).  The
    low-rank product always runs in fp32 (xa/b are typically fp32 adapters
    over a bf16 base) and in exact ieee fp32 unless ``allow_tf32_lowrank``
    is set (faster, ~1e-3 relative error on the low-rank term)."""
    reason = check_fused_lora_matmul(x, w, xa, b, scale=scale, bias=bias, p=p, seed=seed,
                                     out_dtype=out_dtype)
    if reason:
        raise ValueError(reason)
    (m, k), n, r = x.shape, w.shape[0], xa.shape[1]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    upcast, base_precision, _ = _dot_mode(x.dtype, w.dtype, torch.backends.cuda.matmul.allow_tf32,
                                          split=False)
    kernel = _fused_lora_kernel
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
    with _on_device(x.device):
        _launch(kernel, grid,
            x, w, xa, b, bias if bias is not None else x, out,
            m, n, k, r,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            xa.stride(0), xa.stride(1), b.stride(0), b.stride(1),
            bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
            float(scale) / (1.0 - float(p)), float(p), int(seed),
            _bucket(m),
            # R <= 128 is looped in chunks of at most 64 to bound registers/smem.
            BLOCK_R=min(_pow2_at_least(r), 64), HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0,
            UPCAST=upcast, BASE_PRECISION=base_precision,
            LOWRANK_PRECISION="tf32" if allow_tf32_lowrank else _FP32_DOT_PRECISION,
        )
    return out


# --------------------------------------------------------------------------
# lowrank_weight_grad
# --------------------------------------------------------------------------

def check_lowrank_weight_grad(g, x, *, scale=1.0, p=0.0, seed=0, split_m=None, **_) -> Optional[str]:
    reason = _check_common({"g": (g, 2), "x": (x, 2)}, p, seed, scale)
    if reason:
        return reason
    if g.shape[0] != x.shape[0]:
        return f"shape mismatch: g {tuple(g.shape)} vs x {tuple(x.shape)} (need g[M,R], x[M,K])"
    reason = _check_rank(g.shape[1])
    if reason:
        return reason
    if split_m is not None and (not isinstance(split_m, int) or split_m < 1):
        return f"split_m {split_m!r} must be a positive int"
    return None


def _wgrad_split(m: int, k: int, device: torch.device, deterministic: bool = False) -> int:
    """Enough M splits for ~2 waves of programs, each keeping at least 512 rows so atomics stay a
    small fraction of the traffic (bench/skinny_sweep.py, the 8B layer's 4k dA products: the best
    splits were 2 to 16, and 1024 rows a split had capped them at 4). Deterministic mode caps it
    (`_split_cap`)."""
    k_blocks = cdiv(k, 128)
    if k_blocks == 0:
        return 1
    split = max(1, min(cdiv(2 * _num_sms(device), k_blocks), m // _split_rule()[1]))
    return _split_cap(split, deterministic)


def _tune_layout(x: torch.Tensor, y: torch.Tensor) -> int:
    """Which operands are row-major (unit stride along their last dim), as an autotune key: one
    config does not suit a row-major and a transposed read of the same shape."""
    return int(x.stride(-1) == 1) + 2 * int(y.stride(-1) == 1)


def lowrank_weight_grad(g: torch.Tensor, x: torch.Tensor, *, scale: float = 1.0, p: float = 0.0,
                        seed: int = 0, allow_tf32: bool = False,
                        split_m: Optional[int] = None, split_fp32: Optional[bool] = None) -> torch.Tensor:
    """``out[R, K] = scale * g[M, R]^T @ drop(x)[M, K]`` in float32 (dA of LoRA).

    M (tokens) is split across programs whose partial sums are atomically
    added into a zeroed output (past 2 splits not bitwise deterministic; capped
    at 2 under torch.use_deterministic_algorithms); ``split_m`` overrides the
    heuristic.  Dots keep ~fp32 accuracy unless both operands share a 16-bit
    dtype, or ``allow_tf32``; ``split_fp32`` as in :func:`skinny_matmul`."""
    reason, plan = _planned(_WGRAD_PLANS, _wgrad_plan, g, x, scale, p, allow_tf32, split_m, split_fp32,
                            torch.are_deterministic_algorithms_enabled())
    if reason is None and not _seed_ok(seed):
        reason = check_lowrank_weight_grad(g, x, scale=scale, p=p, seed=seed, split_m=split_m)
    if reason:
        raise ValueError(reason)
    m, k, r, split_m, atomic, _, meta = plan
    out = (torch.zeros if atomic or m == 0 else torch.empty)((r, k), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return out
    grid = lambda cfg: (cdiv(k, cfg["BLOCK_K"]), split_m)
    with _on_device(x.device):
        _launch(_lowrank_wgrad_kernel, grid, *_wgrad_args(g, x, out, seed, plan), **meta)
    return out


def _wgrad_args(g, x, out, seed, plan) -> tuple:
    """`_lowrank_wgrad_kernel`'s positional arguments for a `_wgrad_plan` plan (bench/skinny_sweep.py too)."""
    m, k, r, _, _, launch_args, _ = plan
    return (g, x, out, m, k, r, *launch_args[:4], k, 1, *launch_args[4:6], int(seed), *launch_args[6:])


def _wgrad_plan(g, x, scale, p, allow_tf32, split_m, split_fp32, deterministic=False):
    """(reason, None) for an unsupported call, else (None, what `lowrank_weight_grad` launches with)."""
    reason = check_lowrank_weight_grad(g, x, scale=scale, p=p, split_m=split_m)
    if reason:
        return reason, None
    (m, r), k = g.shape, x.shape[1]
    if split_m is None:
        split_m = _wgrad_split(m, k, x.device, deterministic)
    split_m = _split_cap(max(1, min(split_m, cdiv(m, 16))), deterministic)
    launch_args = (g.stride(0), g.stride(1), x.stride(0), x.stride(1),  # the output's strides are (k, 1)
                   *_scale_and_p(scale, p), _bucket(m), _tune_layout(g, x), split_m)
    meta = _skinny_meta(g.dtype, x.dtype, r, p, allow_tf32, split_fp32, split_m > 1)
    return None, (m, k, r, split_m, split_m > 1, launch_args, meta)
