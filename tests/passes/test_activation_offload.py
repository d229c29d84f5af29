"""The activation-offload partitioner: which saved activations it moves to the host and why it
declines the others, op counts in the forward and backward graphs, and loss/gradients equal to the
same build without it. On the CPU the ops are plain copies (devices=("cpu",) opts in): the graph
plumbing is what is tested here; tests/gpu/test_offload_gpu.py runs the stream path."""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils.checkpoint import checkpoint

import fxfuse
from fxfuse.frontends.backend import PartitionPolicies
from fxfuse.passes.activation_offload import ActivationOffload
from fxfuse.passes.manager import PassStats
from tiny import clone, loss_and_grads, rel, tiny_model, tokens

OFF, BACK = torch.ops.fxfuse.offload.default, torch.ops.fxfuse.reload.default
WAIT = torch.ops.fxfuse.reload_wait.default


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def layer(x, w):
    return x + torch.tanh(x @ w)  # a residual "decoder layer"


def stack(x, ws, use_checkpoint=True):
    for w in ws:
        x = checkpoint(layer, x, w, use_reentrant=False) if use_checkpoint else layer(x, w)
    return (x * x).sum()


def compiled(fn, offload, graphs, stats):
    def keep(name):
        def compiler(gm, _):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler
    # through dynamo, so that checkpoint() becomes a tagged region, as in a real model
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                           partition_fn=PartitionPolicies(offload=offload).partition_fn(stats.append))
    return torch.compile(fn, backend=backend, fullgraph=True)


def offloaded_grads_match_eager(fn, inputs, graphs, stats):
    """Runs fn compiled with the offload (and its policies) on CPU tensors, then eagerly: the
    gradients of every input agree."""
    compiled(fn, ActivationOffload(min_bytes=0, devices=("cpu",)), graphs, stats)(*inputs).backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    fn(*inputs).backward()
    assert all(torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6) for g, t in zip(got, inputs))


@pytest.mark.parametrize("layers", [1, 3, 6])
def test_checkpointed_stack_offloads_every_layer_input_but_the_first_read(layers):
    torch.manual_seed(0)
    x = torch.randn(33, 17, requires_grad=True)
    ws = [(torch.randn(17, 17) / 5).requires_grad_() for _ in range(layers)]
    graphs, stats = {}, []
    fn = compiled(lambda x, *ws: stack(x, ws), ActivationOffload(min_bytes=0, devices=("cpu",)), graphs, stats)
    loss = fn(x, *ws)
    loss.backward()
    got = [x.grad.clone()] + [w.grad.clone() for w in ws]
    for t in [x, *ws]:
        t.grad = None
    stack(x, ws).backward()
    want = [x.grad] + [w.grad for w in ws]
    assert all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want))
    # saved activations: the inputs of layers 2..n (layer 1's input is a graph input)
    (st,) = [s for s in stats if s.name == "activation_offload"]
    moved = layers - 1 - (1 if layers > 1 else 0)  # the one the backward reads first stays
    assert st.rewritten == moved, [(s.node, s.reason) for s in st.sites]
    assert count(graphs["fw"], OFF) == moved and count(graphs["bw"], BACK) == moved
    if layers > 1:
        assert any("read first by the backward" in s.reason for s in st.declined)
    # each host tensor is a forward output and a backward input (positional hand-over intact)
    fw_outs = graphs["fw"].graph.find_nodes(op="output")[0].args[0]
    assert sum(1 for n in fw_outs if getattr(n, "target", None) is OFF) == moved
    # the last copy of the chain waits for every copy; each other copy waits for the one `lag`
    # back, and keeps its source alive up to there
    offs = [n for n in graphs["fw"].graph.nodes if n.target is OFF]
    lag = ActivationOffload().config["lag"]
    if offs:
        assert [n.args[3] for n in offs] == [False] * (len(offs) - 1) + [True]
        sources = [n.args[0] for n in offs]
        for i, n in enumerate(offs[:-1]):
            assert n.args[1] == ([sources[i - lag]] if i >= lag else [])
        assert offs[-1].args[1] == sources[max(len(offs) - 1 - lag, 0):-1]
        # each copy reads the previous one's output: the order is a data dependency
        assert all(n.args[2] is p for p, n in zip(offs, offs[1:]))


def _reload_reach(lead, n_layers=9, **kw):
    """(reloads, reads, graph order) of a checkpointed stack: each reload with the read it serves
    (its index among `reads`, the backward positions where the saved activations are first read,
    the one kept on the device included)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(n_layers)]
    graphs, stats = {}, []
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), lead=lead, **kw)
    compiled(lambda x, *ws: stack(x, ws), offload, graphs, stats)(x, *ws).backward()
    bw = graphs["bw"].graph
    order = {n: i for i, n in enumerate(bw.nodes)}
    kept = {s.node for s in stats[-1].sites if "read first by the backward" in s.reason}
    assert len(kept) == 1
    kept_ph = next(n for n in bw.find_nodes(op="placeholder") if n.name in kept)
    reloads = [n for n in bw.nodes if n.target is BACK]

    def read(n):  # a reload's first reader, its wait aside
        return min(order[u] for u in n.users if u.target is not WAIT)

    reads = sorted({read(n) for n in reloads + [kept_ph]})
    assert len(reads) == len(reloads) + 1  # one activation per read in this stack
    return [(n, reads.index(read(n))) for n in reloads], reads, order


def _assert_reach(reloads, reads, order, reach):
    """A reload serving read r sits right before read t: t = r - reach, and for the backward's first
    reads (fewer than `reach` before them) r - 2 where r >= 2 (the reach lead 2 gave them), else r."""
    near = min(2, reach)
    for node, r in reloads:
        t = r - reach if r >= reach else r - near if r >= near else r
        assert order[node] < reads[t], (node, r, t)
        assert t == 0 or order[node] > reads[t - 1], (node, r, t)


@pytest.mark.parametrize("lead", [1, 2, 4])
def test_reload_runs_lead_layers_ahead_of_its_first_use(lead):
    reloads, reads, order = _reload_reach(lead)
    assert len(reloads) == 7
    _assert_reach(reloads, reads, order, lead)


@pytest.mark.parametrize("wait_at_use", [True, False])
def test_reload_waits_right_before_the_first_read_not_at_the_issue(wait_at_use):
    """wait_at_use: each reload is issued without a wait (third argument False) and one
    `reload_wait` of it sits right before its first reader, nothing else reading it earlier; off:
    the reload waits itself (True) and there is no reload_wait."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(6)]
    graphs, stats = {}, []
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), wait_at_use=wait_at_use)
    compiled(lambda x, *ws: stack(x, ws), offload, graphs, stats)(x, *ws).backward()
    bw = graphs["bw"].graph
    nodes = list(bw.nodes)
    reloads = [n for n in nodes if n.target is BACK]
    assert len(reloads) == 4
    assert [n.args[2] for n in reloads] == [not wait_at_use] * 4
    waits = [n for n in nodes if n.target is WAIT]
    if not wait_at_use:
        assert not waits
        return
    assert len(waits) == 4 and {w.args[0] for w in waits} == set(reloads)
    for w in waits:
        readers = [u for u in w.args[0].users if u is not w]
        first = min(readers, key=nodes.index)
        assert nodes.index(w) < nodes.index(first)
        # nothing but other reloads and waits between the wait and the first reader
        between = nodes[nodes.index(w) + 1:nodes.index(first)]
        assert all(n.target in (BACK, WAIT) for n in between), between


def _inductor_step(**config):
    """One compiled step of a 6-layer checkpointed stack through fxfuse's Inductor backend with the
    offload (CPU): its inputs and Inductor's generated code."""
    from torch._inductor.utils import run_and_get_code
    from fxfuse.frontends.backend import make_backend
    from fxfuse.frontends.report import Report
    from fxfuse.passes.manager import PassManager

    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(6)]
    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    manager = PassManager([])
    torch._dynamo.reset()
    report = Report(manager_uuid=manager.uuid(), pass_names=[p.name for p in PartitionPolicies(offload=offload).policies])
    fn = torch.compile(lambda x, *ws: stack(x, ws), fullgraph=True,
                       backend=make_backend(manager, report, "inductor", offload=offload))
    with torch._inductor.config.patch(fx_graph_cache=False, **config):
        _, code = run_and_get_code(lambda: fn(x, *ws).backward())
    return x, ws, code


def test_inductor_keeps_each_wait_right_before_its_first_reader():
    """Inductor's scheduler keeps the partitioner's order: in the generated backward each
    reload_wait comes after every reload issued before it and right before the first kernel that
    reads its buffer. With the peak-memory reordering off: that pass picks the cheapest of several
    orders by its memory estimate (on a 6-layer CPU toy it hoists every reload; on the 8B backward
    graph it kept the given order, bench/RESULTS.md)."""
    import re
    _, _, code = _inductor_step(reorder_for_peak_memory=False)
    (bw,) = [c for c in code if "reload_wait" in c]
    lines = [ln.strip() for ln in bw[bw.index("def call"):].splitlines()]
    alias = {}  # Inductor renames an extern kernel's output (buf1 = buf0; del buf0)
    for ln in lines:
        m = re.fullmatch(r"(buf\d+) = (buf\d+)", ln)
        if m:
            alias[m.group(1)] = m.group(2)
    waits = [(i, re.search(r"reload_wait\.default\((\w+)\)", ln).group(1)) for i, ln in enumerate(lines)
             if "reload_wait.default(" in ln]
    assert len(waits) == 4
    for i, buf in waits:
        names = {buf, alias.get(buf, buf)}
        reads = [j for j, ln in enumerate(lines) if j > i and any(re.search(rf"\b{n}\b", ln) for n in names)
                 and not ln.startswith("del ")]
        first = reads[0]
        # between the wait and the first reader: only other waits, reloads and Inductor bookkeeping
        between = [ln for ln in lines[i + 1:first] if ln and not ln.startswith(("#", "del ", "assert_", "buf"))
                   and "reload" not in ln]
        assert not between, (buf, between)


def test_inductor_compiles_the_reload_wait_and_gradients_match_eager():
    """Inductor lowers the mutating `reload_wait` (a fallback kernel with a mutation output) and the
    step's gradients equal eager's. Inductor's peak-memory reordering may move a wait up to its
    reload (the wait holds no memory): then it waits at the issue, as wait_at_use=False does."""
    x, ws, code = _inductor_step()
    got = [t.grad.clone() for t in (x, *ws)]
    for t in (x, *ws):
        t.grad = None
    stack(x, ws).backward()
    assert all(torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6) for g, t in zip(got, (x, *ws)))
    # the partitioned graphs call the run-time twins (runtime/ops/twins.py), not the custom ops
    assert sum(c.count("torch.ops.fxfuse_rt.reload_wait.default(") for c in code) == 4
    assert sum(c.count("torch.ops.fxfuse_rt.reload.default(") for c in code) == 4
    assert not any("torch.ops.fxfuse." in c for c in code)


# each activation of the stack is one read of 8 x 16 fp32 = 512 bytes
@pytest.mark.parametrize("lead_bytes, reach", [(4 * 512, 4), (4 * 512 - 1, 3), (3 * 512, 3), (3 * 512 - 1, 2), (0, 2)])
def test_reload_reach_shrinks_while_what_it_holds_exceeds_lead_bytes(lead_bytes, reach):
    """lead 4, but a reload issued early holds its device copy longer: fewer reads ahead while the
    activations reloaded in between exceed lead_bytes, never fewer than MIN_LEAD (2)."""
    reloads, reads, order = _reload_reach(4, lead_bytes=lead_bytes)
    _assert_reach(reloads, reads, order, reach)


def test_declines_without_checkpointing_and_what_is_small_or_on_the_wrong_device():
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(3)]

    def reasons(offload, use_checkpoint=True):
        graphs, stats = {}, []
        compiled(lambda x, *ws: stack(x, ws, use_checkpoint), offload, graphs, stats)(x, *ws).backward()
        assert count(graphs["fw"], OFF) == stats[-1].rewritten
        return stats[-1].rewritten, {s.reason for s in stats[-1].declined}

    n, why = reasons(ActivationOffload(min_bytes=0, devices=("cpu",)), use_checkpoint=False)
    assert n == 0 and any("no checkpointed regions" in r for r in why)
    n, why = reasons(ActivationOffload(min_bytes=1 << 20, devices=("cpu",)))
    assert n == 0 and any("below min_bytes" in r for r in why)
    n, why = reasons(ActivationOffload(min_bytes=0))  # cuda only: these live on the CPU
    assert n == 0 and any("not on an offloaded device type" in r for r in why)


@pytest.mark.parametrize("fraction, moved", [(0.5, 1), (0.75, 2), (0.9, 3)])
def test_host_budget_is_a_fraction_of_the_available_memory(monkeypatch, fraction, moved):
    from fxfuse.passes import activation_offload as ao
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(5)]  # 3 offloadable layer inputs
    one = 8 * 16 * 4
    monkeypatch.setattr(ao, "_host_bytes_available", lambda: 3 * one + one // 2)  # 3.5 activations
    graphs, stats = {}, []
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), host_fraction=fraction)
    compiled(lambda x, *ws: stack(x, ws), offload, graphs, stats)(x, *ws).backward()
    (st,) = [s for s in stats if s.name == "activation_offload"]
    assert st.rewritten == moved == count(graphs["fw"], OFF)
    assert sum("host memory" in s.reason for s in st.declined) == 3 - moved


def test_bad_options_are_errors():
    with pytest.raises(ValueError):
        ActivationOffload(min_bytes=-1)
    for bad in (0, 0.95, -1):
        with pytest.raises(ValueError, match="host_fraction"):
            ActivationOffload(host_fraction=bad)
    model = tiny_model()
    with pytest.raises(ValueError, match="AOTAutograd"):
        fxfuse.optimize(clone(model), compiler="eager", offload_activations=True, verbose=False)
    with pytest.raises(ValueError, match="do not combine"):
        fxfuse.optimize(clone(model), compiler="aot_eager", cudagraphs=True, offload_activations=True, verbose=False)
    with pytest.raises(ValueError, match="offload_activations must be"):
        fxfuse.optimize(clone(model), offload_activations="yes", verbose=False)


@pytest.mark.parametrize("gc", [True, False])
def test_tiny_llama_with_offload_equals_eager(gc):
    ref = tiny_model("llama", gc=gc, sizes=dict(num_hidden_layers=3))
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False,
                          offload_activations=ActivationOffload(min_bytes=0, devices=("cpu",)))
    ids = tokens(2, 16)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    assert g_ref.keys() == g_opt.keys() and all(rel(g_opt[n], g_ref[n]) < 1e-5 for n in g_ref)
    s = fxfuse.report(opt).summary()["activation_offload"]
    if gc:  # decoder layers 1 and 2 read their inputs from the host (layer 2's is read first: kept)
        assert s["rewritten"] >= 1, s
        mib = fxfuse.report(opt).columns()["activation_offload"]["MiB offloaded"]
        assert mib > 0
    else:
        assert s["rewritten"] == 0 and any("no checkpointed regions" in r for r in s["declined"])


def test_default_is_on_for_cuda_models_only_and_true_reports_cpu_declines():
    cpu = fxfuse.optimize(tiny_model("llama", gc=True), compiler="aot_eager", verbose=False)
    assert "activation_offload" not in fxfuse.report(cpu).pass_names  # "auto": nothing to offload to
    opt = fxfuse.optimize(tiny_model("llama", gc=True), compiler="aot_eager", verbose=False, offload_activations=True)
    ids = tokens(2, 16)
    loss_and_grads(opt, input_ids=ids, labels=ids)
    s = fxfuse.report(opt).summary()["activation_offload"]
    assert s["rewritten"] == 0 and any("not on an offloaded device type" in r for r in s["declined"])


def test_uuid_follows_the_config():
    a, b = ActivationOffload(), ActivationOffload(min_bytes=0)
    assert a.uuid() == ActivationOffload().uuid() and a.uuid() != b.uuid()
    st = PassStats("activation_offload", a.uuid())
    assert st.rewritten == 0


def test_inductor_caches_graphs_compiled_with_the_offload_partitioner(monkeypatch, tmp_path):
    """Inductor deep-copies its config (the partitioner in it) and pickles it into the FX graph cache
    key; a copy that cannot be pickled makes every graph bypass the cache (seen on the H200)."""
    from torch._dynamo.utils import counters
    from fxfuse.frontends.backend import make_backend
    from fxfuse.frontends.report import Report
    from fxfuse.passes.manager import PassManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    manager = PassManager([])
    ws = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    x = torch.randn(4, 8)
    reports = []
    for run in range(2):  # the second run stands for a second process: dynamo state reset, disk cache kept
        torch._dynamo.reset()
        counters.clear()
        report = Report(manager_uuid=manager.uuid(), pass_names=[p.name for p in PartitionPolicies(offload=offload).policies])
        fn = torch.compile(stack, backend=make_backend(manager, report, "inductor", offload=offload), fullgraph=True)
        with torch._inductor.config.patch(fx_graph_cache=True):
            fn(x, ws).backward()
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0, dict(counters["inductor"])
        assert counters["aot_autograd"]["autograd_cache_hit"] == run, dict(counters["aot_autograd"])
        reports.append(report)
    assert reports[0].summary()["activation_offload"]["rewritten"] >= 1
    # from the cache the partitioner does not run: the report says so instead of showing 0 sites
    assert reports[1].columns()["activation_offload"] == {"graphs from cache": 1}
    assert "graphs from cache" in reports[1].table()
    # a pickled copy (what a compile subprocess would get) still answers its uuid
    import pickle
    from fxfuse.frontends.backend import PolicyPartitioner
    part = PolicyPartitioner(PartitionPolicies(offload=offload), lambda stats: None)
    assert pickle.loads(pickle.dumps(part)).uuid() == part.uuid()
    assert part.uuid().startswith(PartitionPolicies(offload=offload).uuid())
    assert offload.uuid() in part.uuid()


def test_inference_graphs_are_not_reported_as_offload_cache_hits(monkeypatch, tmp_path):
    from fxfuse.frontends.backend import make_backend
    from fxfuse.frontends.report import Report
    from fxfuse.passes.manager import PassManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    manager = PassManager([])
    ws = [torch.randn(8, 8) for _ in range(3)]
    for run in range(2):
        torch._dynamo.reset()
        report = Report(manager_uuid=manager.uuid(), pass_names=[p.name for p in PartitionPolicies(offload=offload).policies])
        fn = torch.compile(stack, backend=make_backend(manager, report, "inductor", offload=offload), fullgraph=True)
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
            fn(torch.randn(4, 8), ws)
        assert report.columns()["activation_offload"] == {}, (run, report.columns())


def test_host_pool_pins_asked_sizes_and_reuses_only_unused_blocks():
    """The caching host allocator rounds to powers of two (a 2.5 GiB input pinned 4 GiB); the pool
    pins what is asked (here page=1: exact bytes), and a block goes out again only when no tensor
    still reads it, and only for a request it fits within max_slack."""
    from fxfuse.runtime.ops.offload import HostPool
    registered, unregistered = [], []
    pool = HostPool(register=lambda b: registered.append(b.numel()), unregister=lambda b: unregistered.append(b.numel()),
                    page=1, max_slack=2.0, available=lambda: None)
    a = torch.randn(5, 3)  # 60 bytes: a power-of-two allocator would take 64
    h1 = pool.take(a)
    h1.copy_(a)
    assert registered == [60] and h1.shape == a.shape and h1.dtype == a.dtype and h1.is_contiguous()
    h2 = pool.take(a)  # h1 is alive: a second block
    assert registered == [60, 60] and h2.data_ptr() != h1.data_ptr()
    h2.copy_(a * 2)
    assert torch.equal(h1, a)  # writing h2 did not touch h1
    ptr = h1.data_ptr()
    view = h1[1:]  # a view keeps the block in use
    del h1
    assert pool.take(torch.empty(2, 2)).data_ptr() != ptr and len(registered) == 3
    del view
    small = pool.take(torch.empty(4, dtype=torch.float64))  # 32 bytes: fits the free 60-byte block (slack 2)
    assert len(registered) == 3 and small.dtype == torch.float64 and small.data_ptr() == ptr
    tiny = pool.take(torch.empty(2))  # 8 bytes: the free 16-byte block, not a 60-byte one
    assert len(registered) == 3 and tiny.data_ptr() != ptr
    del tiny
    assert pool.take(torch.empty(1)).numel() == 1 and registered[-1] == 4  # 4 bytes: 16 is over slack 2
    assert pool.pinned_bytes == 60 + 60 + 16 + 4
    del small
    assert pool.release() == 60 + 16 + 4 and sorted(unregistered) == [4, 16, 60]
    assert pool.pinned_bytes == 60  # h2's block is still in use


def test_host_pool_refuses_to_pin_the_host_out():
    """A new block must leave `reserve` of the host's available memory: a plan sized on a bigger
    host (or cached) gets a clear error instead of the process being killed. Reused blocks need no
    new memory and are not checked."""
    from fxfuse.runtime.ops.offload import HostPool
    left = [10 << 20]
    pool = HostPool(register=lambda b: None, unregister=lambda b: None, page=1,
                    available=lambda: left[0], reserve=4 << 20)
    h = pool.take(torch.empty(5 << 18))  # 5 MiB: leaves 5 MiB >= the 4 MiB reserve
    left[0] -= 5 << 20
    with pytest.raises(RuntimeError, match=r"pinning another 2 MiB would leave 3 MiB.*host_fraction"):
        pool.take(torch.empty(2 << 18))
    del h
    assert pool.take(torch.empty(5 << 18)).numel() == 5 << 18  # the free block again: no new memory
    unknown = HostPool(register=lambda b: None, unregister=lambda b: None, available=lambda: None)
    assert unknown.take(torch.empty(4)).numel() == 4  # where meminfo cannot be read: no check


def test_host_pool_steady_state_checks_few_blocks_per_take(monkeypatch):
    """A training step takes its blocks in the same order every step: once warm, each take finds a
    free block after checking about one (a whole scan per take made a step's host cost quadratic in
    the offloads: ~12 ms at 160). Sizes repeat per layer, as in a model."""
    from fxfuse.runtime.ops import offload
    pool = offload.HostPool(register=lambda b: None, unregister=lambda b: None, page=64, available=lambda: None)
    shapes = [(64,), (96,), (64,), (40, 3)] * 40  # 160 offloads a step, 3 distinct sizes
    for _ in range(2):  # warm-up steps: the pool grows to one block per live host tensor
        held = [pool.take(torch.empty(s)) for s in shapes]
        del held
    assert len(pool.blocks) == len(shapes)
    calls = [0]
    real = offload._use_count
    monkeypatch.setattr(offload, "_use_count", lambda b: calls.__setitem__(0, calls[0] + 1) or real(b))
    for _ in range(3):
        held = [pool.take(torch.empty(s)) for s in shapes]
        assert len({h.data_ptr() for h in held}) == len(shapes)  # distinct blocks, no new ones
        del held
    assert len(pool.blocks) == len(shapes)
    assert calls[0] <= 3 * len(shapes) * 2, calls[0]
    # blocks still in use (a tensor kept from the previous step) are skipped, never handed out again
    kept = [pool.take(torch.empty(s)) for s in shapes[:7]]
    held = [pool.take(torch.empty(s)) for s in shapes[7:]]
    for k in kept:
        k.fill_(7)
    fresh = pool.take(torch.empty(64))  # every 256-byte block is taken: a new one
    assert len(pool.blocks) == len(shapes) + 1
    ptrs = {h.data_ptr() for h in kept + held + [fresh]}
    assert len(ptrs) == len(shapes) + 1
    del held, fresh
    again = [pool.take(torch.empty(s)) for s in shapes[7:]]
    assert not {h.data_ptr() for h in again} & {k.data_ptr() for k in kept}
    assert all(bool((k == 7).all()) for k in kept)


def test_host_pool_blocks_are_page_aligned_whole_pages():
    from fxfuse.runtime.ops.offload import HostPool
    pool = HostPool(register=lambda b: None, unregister=lambda b: None, page=64, available=lambda: None)
    for n in (1, 15, 16, 17, 100):
        h = pool.take(torch.empty(n))
        assert h.data_ptr() % 64 == 0 and h.numel() == n
    assert all(b.numel() % 64 == 0 and b.data_ptr() % 64 == 0 for b, _ in pool.blocks)


def test_big_activations_wait_for_the_previous_copy_only():
    """lag_bytes: copies whose sources exceed it are not left in flight (at 320k tokens a layer
    input is 2.5 GiB; keeping 3 alive would cost 5 GiB more)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    ws = [(torch.randn(16, 16) / 4).requires_grad_() for _ in range(6)]
    graphs, stats = {}, []
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), lag_bytes=0)
    compiled(lambda x, *ws: stack(x, ws), offload, graphs, stats)(x, *ws).backward()
    offs = [n for n in graphs["fw"].graph.nodes if n.target is OFF]
    assert len(offs) >= 3
    sources = [n.args[0] for n in offs]
    assert [n.args[1] for n in offs] == [[]] + [[s] for s in sources[:-1]]


def attention_block(x, w, heads=2):
    """A fused q/k/v projection split with unbind, as some models write it."""
    b, t, d = x.shape
    qkv = (x @ w).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return x + o.transpose(1, 2).reshape(b, t, d)


def test_fused_qkv_split_by_unbind_is_saved_whole_and_offloaded(monkeypatch):
    from fxfuse.passes import save_attention as policy
    counted = []
    real = policy._bytes_read_back
    monkeypatch.setattr(policy, "_bytes_read_back", lambda marks, bw: counted.append(real(marks, bw)) or counted[-1])
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, requires_grad=True)
    ws = [(torch.randn(16, 48) / 4).requires_grad_() for _ in range(3)]

    def fn(x, *ws):
        for w in ws:
            x = checkpoint(attention_block, x, w, use_reentrant=False)
        return (x * x).sum()
    graphs, stats = {}, []
    offloaded_grads_match_eager(fn, [x, *ws], graphs, stats)
    (sa,) = [s for s in stats if s.name == "save_attention"]
    assert sa.rewritten == 3, [(s.node, s.reason) for s in sa.sites]
    # the budget counts the fused projection, read by the backward through unbind's items: its
    # [2, 8, 48] fp32 bytes per layer (the three layers' outputs first, then their q/k/v)
    assert counted[-3:] == [2 * 8 * 48 * 4] * 3, counted
    (off,) = [s for s in stats if s.name == "activation_offload"]
    assert not any("view" in s.reason for s in off.declined), [(s.node, s.reason) for s in off.declined]
    fw_mms = count(graphs["fw"], torch.ops.aten.mm.default)
    bw_mms = count(graphs["bw"], torch.ops.aten.mm.default)
    # dX and dW per layer, no recomputed forward mm: the fused q/k/v (not its unbind views) came back
    assert fw_mms == 3 and bw_mms == 3 * 2


def test_the_layer_inputs_get_the_host_budget_before_the_policy_saved_tensors(monkeypatch):
    from fxfuse.passes import activation_offload as ao
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model(gc=True, sizes={"num_hidden_layers": 3})
    # room for the layer inputs ([2, 16, 64] fp32) and the small tensors, not for the attention blocks
    monkeypatch.setattr(ao, "_host_bytes_available", lambda: 2 * (3 * 2 * 16 * 64 * 4))
    fxfuse.optimize(model, compiler="aot_eager", verbose=False,
                    offload_activations=ActivationOffload(min_bytes=0, devices=("cpu",)))
    x = tokens()
    loss_and_grads(model, input_ids=x, labels=x)
    sites = fxfuse.report(model).sites("activation_offload")
    moved = [s for s in sites if s.rewritten]
    # the two layer inputs (residual adds) are moved; what else fits is small (a norm's rsqrt)
    # both offloadable layer inputs (the residual adds feeding layers 1 and 2) are moved, while the
    # attention blocks save_attention chose (read earlier by the backward) are what is left out
    assert {"add_6", "add_12"} <= {s.node for s in moved}, [(s.node, s.reason) for s in sites]
    assert sum("host memory" in s.reason for s in sites) >= 10


@torch.library.custom_op("fxfuse_test::qkv_and_mlp", mutates_args=())
def qkv_and_mlp(x: torch.Tensor, w: torch.Tensor, wm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A parallel block's grouped projection: q, k, v and the MLP's up projection from one input."""
    q, k, v = (x @ w).chunk(3, -1)
    return q.contiguous(), k.contiguous(), v.contiguous(), x @ wm


@qkv_and_mlp.register_fake
def _(x, w, wm):
    d = w.shape[1] // 3
    return (x.new_empty(*x.shape[:-1], d), x.new_empty(*x.shape[:-1], d), x.new_empty(*x.shape[:-1], d),
            x.new_empty(*x.shape[:-1], wm.shape[1]))


def _qkv_and_mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _qkv_and_mlp_backward(ctx, dq, dk, dv, dm):
    x, w, wm = ctx.saved_tensors
    dqkv = torch.cat([dq, dk, dv], -1)
    dx = dqkv @ w.T + dm @ wm.T
    flat = x.reshape(-1, x.shape[-1])
    return dx, flat.T @ dqkv.reshape(-1, w.shape[1]), flat.T @ dm.reshape(-1, wm.shape[1])


qkv_and_mlp.register_autograd(_qkv_and_mlp_backward, setup_context=_qkv_and_mlp_setup)


def parallel_block(x, w, wm, heads=2):
    b, t, d = x.shape
    q, k, v, m = qkv_and_mlp(x, w, wm)
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return x + o.transpose(1, 2).reshape(b, t, d) + torch.nn.functional.silu(m)[..., :d]


def test_a_producer_that_also_computes_a_large_mlp_output_keeps_q_k_v_recomputed():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, requires_grad=True)
    ws = [((torch.randn(16, 48) / 4).requires_grad_(), (torch.randn(16, 128) / 4).requires_grad_()) for _ in range(2)]
    flat = [t for pair in ws for t in pair]

    def fn(x, *flat):
        for w, wm in zip(flat[::2], flat[1::2]):
            x = checkpoint(parallel_block, x, w, wm, use_reentrant=False)
        return (x * x).sum()
    graphs, stats = {}, []
    offloaded_grads_match_eager(fn, [x, *flat], graphs, stats)
    (sa,) = [s for s in stats if s.name == "save_attention"]
    # the output and lse are saved; q/k/v are recomputed, as their producer's MLP output would be saved too
    assert sa.candidates == 2 and sa.rewritten == 2, [(s.node, s.reason) for s in sa.sites]
    assert sa.columns["q/k/v saved too"] == 0
    assert all(s.reason.startswith("output and lse saved; q/k/v recomputed: ") and "also computes" in s.reason
               and "attention does not read" in s.reason for s in sa.sites)
