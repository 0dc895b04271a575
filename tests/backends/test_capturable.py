"""capturable=True with the kernel backends: every decision (refresh, histogram collection, skip on
GradScaler overflow, the AdamW scalars) is made on the device, so the step reads no tensor value on
the host and launches the same kernels every step (what a CUDA graph replay needs). On CPU the
kernels run in Triton's interpreter and the CUDA host harness; the graph capture itself runs on a GPU.
"""
import pytest
import torch

from epi_kernels import EPIAdamW
from support.devices import CPU_KERNEL_BACKENDS, HAS_CUDA, HAS_EXTENSION, HAS_TRITON

EPI = dict(isolation_ratio=0.2, refresh_interval=3, warmup_steps=2, weight_decay=0.1, lr=1e-2)


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5)).to(device, dtype)


def _grads(model, i):
    model.zero_grad()
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(i)).to(next(model.parameters()))
    model(x).square().mean().backward()


def _assert_same(oa, a, ob, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            x, y = sa[key], sb[key].to(sa[key].device)
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all()), key


def _run(backend, capturable, steps, device="cpu", dtype=torch.float32, before=None, **kw):
    """`steps` steps; `before(opt, i)` runs before step i (from 0), if given."""
    model = _model(device, dtype)
    opt = EPIAdamW(model.parameters(), backend=backend, capturable=capturable, **{**EPI, **kw})
    for i in range(steps):
        if before is not None:
            before(opt, i)
        _grads(model, i)
        opt.step()
    return model, opt


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("kw", [{}, dict(amsgrad=True, importance="abs", maximize=True),
                                dict(lr=torch.tensor(1e-2), static=True), dict(dtype=torch.bfloat16),
                                dict(importance="exp_avg_sq", amsgrad=True), dict(scope="global"),
                                dict(scope="global", importance_dtype=torch.bfloat16, amsgrad=True)],
                         ids=["plain", "amsgrad-abs-max", "tensor-lr-static", "bf16-params", "exp_avg_sq-scores",
                              "global", "global-bf16-scores"])
def test_device_decisions_give_the_host_path_results(backend, kw):
    # steps 1-9: refreshes at 2, 5 and 8 (static: at 2 only), histograms collected the step before
    (a, oa), (b, ob) = _run(backend, False, 9, **kw), _run(backend, True, 9, **kw)
    _assert_same(oa, a, ob, b)
    assert int(ob.param_groups[0]["epi_step"]) == 9 and torch.is_tensor(ob.param_groups[0]["epi_step"])
    assert all(int(ob.state[p]["isolated_count"]) > 0 for p in b.parameters())
    assert int(ob.state[b[0].weight]["refresh_step"]) == (2 if kw.get("static") else 8)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_no_host_read_of_any_tensor_value(backend, scope, monkeypatch):
    model = _model()
    opt = EPIAdamW(model.parameters(), backend=backend, capturable=True, scope=scope, **EPI)
    _grads(model, 0)
    opt.step()  # the first step allocates state and the histogram buffers (warm up before a capture)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor([0.0])

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor value")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if inside a capture on a GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for i in range(1, 6):  # a collecting step, a refresh step, plain steps
        _grads(model, i)
        opt.step()
    monkeypatch.undo()
    assert int(opt.param_groups[0]["epi_step"]) == 6 and int(opt.state[model[0].weight]["refresh_step"]) == 5


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_overflow_skips_the_whole_step_on_the_device(backend):
    # a skipped step changes nothing; the run then continues as if it had never happened
    (a, oa) = _run(backend, True, 6)
    model = _model()
    opt = EPIAdamW(model.parameters(), backend=backend, capturable=True, **EPI)
    for i in range(6):
        if i in (1, 4):  # before the first collecting step, and between collect and refresh
            _grads(model, 100 + i)
            opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor([1.0])
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor([0.0])
        _grads(model, i)
        opt.step()
    _assert_same(oa, a, opt, model)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_checkpoint_resume_continues_bit_identically(backend, scope):
    (a, oa) = _run(backend, True, 9, scope=scope)
    model, opt = _run(backend, True, 4, scope=scope)  # saved between a collecting step (4) and a refresh (5)
    saved = opt.state_dict()
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = EPIAdamW(model2.parameters(), backend=backend, capturable=True, scope=scope, **EPI)
    opt2.load_state_dict(saved)
    for i in range(4, 9):
        _grads(model2, i)
        opt2.step()
    _assert_same(oa, a, opt2, model2)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_requested_refresh_lands_the_step_after_next(backend):
    # the request is a device flag (a captured graph's replays see it): the next step collects the
    # histograms, the one after refreshes
    model = _model()
    opt = EPIAdamW(model.parameters(), backend=backend, capturable=True, **{**EPI, "refresh_interval": 100})
    for i in range(4):
        _grads(model, i)
        opt.step()
    opt.request_refresh()
    for i in range(4, 7):
        _grads(model, i)
        opt.step()
    assert int(opt.state[model[0].weight]["refresh_step"]) == 6


_ON_GPU = {"triton": [pytest.mark.gpu, pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="no CUDA device")],
           "cuda": [pytest.mark.gpu, pytest.mark.skipif(not (HAS_EXTENSION and HAS_CUDA), reason="no CUDA device")]}
GPU_CASES = [pytest.param("triton", {}, marks=_ON_GPU["triton"], id="triton"),
             pytest.param("cuda", {}, marks=_ON_GPU["cuda"], id="cuda"),
             pytest.param("triton", {"scope": "global"}, marks=_ON_GPU["triton"], id="triton-global"),
             pytest.param("cuda", {"scope": "global"}, marks=_ON_GPU["cuda"], id="cuda-global")]


@pytest.mark.parametrize("backend,kw", GPU_CASES)
def test_cuda_graph_replays_match_eager_steps(backend, kw):
    # warm up 3 eager steps, capture step 4, replay it for steps 4-12 (refreshes at 5, 8, 11) with
    # fresh gradients copied into the captured ones; compare with 12 eager capturable steps
    (a, oa) = _run(backend, True, 12, device="cuda", **kw)
    model = _model("cuda")
    opt = EPIAdamW(model.parameters(), backend=backend, capturable=True, **EPI, **kw)
    grads = []
    for i in range(12):
        _grads(model, i)
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    for i in range(3):
        for p, g in zip(model.parameters(), grads[i]):
            p.grad = g.clone()
        opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on a stream of its own
        opt.step()
    for i in range(3, 12):
        for p, g in zip(model.parameters(), grads[i]):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    # the capture itself ran no step: the replays did steps 4-12
    _assert_same(oa, a, opt, model)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_switching_between_device_and_host_decisions(backend):
    # torch.compile traces optimizer steps with capturable=True, so compiled and eager steps of one
    # optimizer may alternate: neither kind may use histograms the other left behind
    def switch(opt, i):  # device-decided steps 3, 4, 8, 9: step 7 collects on the host for step 8
        opt.param_groups[0]["capturable"] = i + 1 in (3, 4, 8, 9)

    (a, oa), (b, ob) = _run(backend, False, 10), _run(backend, False, 10, before=switch)
    _assert_same(oa, a, ob, b)
