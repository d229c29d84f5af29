"""Test setup: Triton kernels run in the CPU interpreter when there is no GPU; every session gets a
fresh Inductor/AOTAutograd cache (a warm cache can serve a stale backward after an op changes)."""
import os
import tempfile

import torch

# Decided here, before any test module: with a GPU an unset TRITON_INTERPRET becomes "0", so the kernel
# test modules' own default ("1", for a direct `pytest tests/kernels/...` run) cannot switch the
# interpreter on after fxfuse's kernels were compiled for the GPU (that mix fails every launch).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxfuse-test-inductor-")
os.environ.setdefault("FXFUSE_CACHE_DIR", tempfile.mkdtemp(prefix="fxfuse-test-cache-"))

import pytest  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI (CI=true, as .ci/run runs) draws the same examples every run, so a red CI is reproducible and
# never a new random draw; anywhere else hypothesis explores fresh examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "default")

# Inductor probes the CPU's vector ISA in subprocesses (~12 s per process); trust the host instead.
inductor_config.cpp.vec_isa_ok = True


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from fxfuse.runtime import stats
    torch._dynamo.reset()
    stats.reset()
    # torch's RNG starts from the same state in every test: unseeded tensors do not depend on which
    # tests ran before in the same process (pytest-xdist deals tests to processes by timing)
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
