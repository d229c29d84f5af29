"""The run-time twins (fxfuse_rt::<name>) of fxfuse's custom ops: one per op, the same schema, the
same results, cheaper to call; `retarget` swaps a graph's calls and nothing else."""
import pytest
import torch
import torch.fx as fx

import fxfuse  # noqa: F401  (registers the ops and their twins)
from fxfuse.runtime.ops import twins
from fxfuse.runtime.ops.lora import lora_linear_reference


def _fxfuse_ops():
    from torch._library.custom_ops import OPDEFS
    return sorted(q for q in list(OPDEFS) if q.startswith("fxfuse::"))


def test_every_fxfuse_op_has_a_twin_with_its_schema():
    names = _fxfuse_ops()
    assert {"fxfuse::lora_linear", "fxfuse::lora_linear_backward", "fxfuse::offload", "fxfuse::reload",
            "fxfuse::reload_wait", "fxfuse::linear_cross_entropy"} <= set(names)
    for q in names:
        op = getattr(torch.ops.fxfuse, q.split("::")[1]).default
        twin = twins.twin_of(op)
        assert twin is not None, q
        assert str(twin._schema) == str(op._schema).replace("fxfuse::", "fxfuse_rt::", 1)


def test_twin_gives_the_ops_results_and_fake_shapes():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 24)
    ws = [torch.randn(n, 24) for n in (24, 8, 8)]
    As = [torch.randn(4, 24) for _ in ws]
    Bs = [torch.randn(w.shape[0], 4) for w in ws]
    args = (x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.0] * 3, None, torch.float32)
    op = torch.ops.fxfuse.lora_linear.default
    twin = twins.twin_of(op)
    with torch.no_grad():
        got, want = twin(*args), op(*args)
    ref = lora_linear_reference(*args)
    assert len(got) == len(want) == 4
    for g, w, r in zip(got, want, ref):
        assert g.shape == w.shape and torch.equal(g, w)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = twin(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                      [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
                      for a in args])
    assert [tuple(f.shape) for f in fake] == [tuple(w.shape) for w in want]


def test_retarget_swaps_only_fxfuse_calls():
    def f(x):
        host = torch.ops.fxfuse.offload.default(x, [], None, True)
        back = torch.ops.fxfuse.reload.default(host, x.device, True)
        return torch.relu(back) + x

    gm = fx.symbolic_trace(f)
    before = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert twins.retarget(gm) == 2
    after = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    swap = {torch.ops.fxfuse.offload.default: torch.ops.fxfuse_rt.offload.default,
            torch.ops.fxfuse.reload.default: torch.ops.fxfuse_rt.reload.default}
    assert after == [swap.get(t, t) for t in before] and len(set(before) & set(swap)) == 2
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), torch.relu(x) + x)
    assert twins.retarget(gm) == 0


def test_twins_can_be_switched_off_at_compile_time(monkeypatch):
    def f(x):
        return torch.ops.fxfuse.reload.default(x, x.device, True)

    gm = fx.symbolic_trace(f)
    monkeypatch.setenv("FXFUSE_OP_TWINS", "0")
    assert twins.retarget(gm) == 0
    assert any(n.target is torch.ops.fxfuse.reload.default for n in gm.graph.nodes)
    # the switch feeds Inductor's cache key: graphs compiled with and without twins do not mix
    from fxfuse.frontends.backend import PartitionPolicies, PolicyPartitioner
    from fxfuse.passes.activation_offload import ActivationOffload
    part = PolicyPartitioner(PartitionPolicies(offload=ActivationOffload()), lambda stats: None)
    off_uuid = part.uuid()
    monkeypatch.setenv("FXFUSE_OP_TWINS", "1")
    assert part.uuid() != off_uuid
    monkeypatch.setenv("FXFUSE_OP_TWINS", "yes")
    with pytest.raises(ValueError, match="FXFUSE_OP_TWINS"):
        twins.retarget(gm)


def test_a_torch_without_the_private_attributes_leaves_the_custom_ops_in_place(monkeypatch):
    """Registration reads CustomOpDef's private attributes: if torch moves them, fxfuse warns, says
    why, and compiled graphs keep the custom ops (nothing fails to import)."""
    monkeypatch.setattr(twins, "_twins", dict(twins._twins))
    monkeypatch.setattr(twins, "unavailable", None)
    monkeypatch.setattr(twins, "_maybe_get_opdef", lambda qualname: object())
    with pytest.warns(UserWarning, match="twins of the custom ops not registered"):
        twins._register_all()
    assert twins.unavailable and "changed CustomOpDef" in twins.unavailable and not twins._twins

    def f(x):
        return torch.ops.fxfuse.reload.default(x, x.device, True)

    gm = fx.symbolic_trace(f)
    assert twins.retarget(gm) == 0
