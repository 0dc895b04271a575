"""Bad input: a clear error naming the problem, and no optimizer or model state changed."""
import numpy as np
import pytest
import torch

from epi_kernels import EPIAdamW


@pytest.mark.parametrize("arg,value", [
    ("isolation_ratio", -0.1), ("isolation_ratio", 1.0), ("isolation_ratio", float("nan")),
    ("isolation_ratio", "0.1"), ("refresh_interval", 0), ("refresh_interval", 2.5),
    ("refresh_interval", True), ("warmup_steps", -1), ("warmup_steps", 1.5),
    ("importance_beta", 1.0), ("importance_beta", -0.5), ("importance", "cube"),
    ("scope", "layer"), ("threshold", "fast"), ("static", "yes"),
    ("importance_dtype", torch.float16), ("backend", "tpu"), ("backend", "CUDA"),
])
def test_invalid_epi_hyperparameter_names_the_argument(arg, value):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        EPIAdamW([p], **{arg: value})
    opt = EPIAdamW([p])
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=f"Invalid {arg}"):  # per-group overrides are checked too
        opt.add_param_group({"params": [q], arg: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("arg,value", [
    ("isolation_ratio", float("inf")), ("isolation_ratio", np.float64("nan")), ("isolation_ratio", np.float32("-inf")),
    ("isolation_ratio", True), ("importance_beta", float("nan")), ("importance_beta", np.float64("inf")),
    ("refresh_interval", np.float64(100)), ("refresh_interval", np.bool_(True)), ("warmup_steps", np.float32(2)),
])
def test_non_finite_and_non_integral_numbers_are_rejected(arg, value):
    with pytest.raises(ValueError, match=f"Invalid {arg}"):
        EPIAdamW([torch.nn.Parameter(torch.zeros(3))], **{arg: value})


@pytest.mark.parametrize("betas", [(float("nan"), 0.999), (0.9, np.float64("inf")), (np.float32("nan"), 0.9)])
def test_non_finite_betas_are_rejected(betas):
    with pytest.raises(ValueError, match="Invalid beta parameter at index"):
        EPIAdamW([torch.nn.Parameter(torch.zeros(3))], betas=betas)


@pytest.mark.parametrize("arg,value,plain", [
    ("refresh_interval", np.int64(100), 100), ("warmup_steps", np.int32(0), 0),
    ("isolation_ratio", np.float64(0.25), 0.25), ("importance_beta", np.float32(0.5), 0.5),
    ("lr", np.float64(1e-3), 1e-3), ("eps", np.float32(1e-8), float(np.float32(1e-8))),
    ("weight_decay", np.int64(0), 0.0), ("betas", (np.float64(0.9), np.float16(0.5)), (0.9, 0.5)),
    ("amsgrad", np.int8(1), True),
])
def test_numpy_scalars_are_accepted_wherever_numbers_are(arg, value, plain):
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = EPIAdamW([p], **{arg: value})
    opt.add_param_group({"params": [q], arg: value})
    for group in opt.param_groups:  # stored as plain Python numbers: state dicts load weights_only
        assert group[arg] == plain and type(group[arg]) is type(plain)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()


def test_invalid_group_override_names_the_group():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid isolation_ratio: 1.5 .* in param group 1$"):
        EPIAdamW([{"params": [p]}, {"params": [q], "isolation_ratio": 1.5}])
    opt = EPIAdamW([p])
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -1 .*in param group 1$"):
        opt.add_param_group({"params": [q], "weight_decay": -1})


@pytest.mark.parametrize("backend,missing", [("cuda", "_has_extension"), ("triton", "_has_triton")])
def test_backend_missing_from_this_installation_is_named(backend, missing, monkeypatch):
    from epi_kernels import backends

    monkeypatch.setattr(backends.get(backend), "available", lambda: False)  # (as `missing` would say)
    with pytest.raises(ValueError, match=f"Invalid backend: '{backend}' is not available in this installation"):
        EPIAdamW([torch.nn.Parameter(torch.zeros(3))], backend=backend)


def test_differentiable_is_rejected():
    with pytest.raises(ValueError, match="differentiable"):
        EPIAdamW([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


def _two_groups():
    good = torch.nn.Parameter(torch.randn(5))
    good.grad = torch.randn(5)
    return good


def _assert_untouched(opt, good, good_before):
    assert torch.equal(good, good_before)
    assert len(opt.state) == 0
    assert all(g["epi_step"] == 0 for g in opt.param_groups)


def test_sparse_gradient_raises_before_any_state_changes():
    good = _two_groups()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = EPIAdamW([{"params": [good]}, {"params": emb.parameters()}])
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _assert_untouched(opt, good, before)


def test_complex_parameter_raises_before_any_state_changes():
    good = _two_groups()
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    z.grad = torch.randn(4, dtype=torch.complex64)
    opt = EPIAdamW([{"params": [good]}, {"params": [z]}])
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="complex parameters"):
        opt.step()
    _assert_untouched(opt, good, before)


def test_capturable_on_cpu_raises_before_any_state_changes():
    good = _two_groups()
    opt = EPIAdamW([good], capturable=True)
    before = good.detach().clone()
    with pytest.raises(RuntimeError, match="capturable"):
        opt.step()
    _assert_untouched(opt, good, before)


def test_tensor_lr_with_foreach_rejected_like_adamw():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        EPIAdamW([p], lr=torch.tensor(0.01), foreach=True)


def test_tensor_lr_works():
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    epi = EPIAdamW([p], lr=torch.tensor(0.01), isolation_ratio=0.0)
    ref = torch.optim.AdamW([q], lr=torch.tensor(0.01))
    for _ in range(3):
        p.grad, q.grad = torch.full((4,), 0.5), torch.full((4,), 0.5)
        epi.step()
        ref.step()
    assert torch.equal(p, q)


def test_cuda_graph_capture_is_refused_before_anything_changes(monkeypatch):
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = EPIAdamW([p])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if inside a capture on a GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="can be captured in a CUDA graph only with capturable=True"):
        opt.step()
    assert torch.equal(p, torch.ones(4)) and not opt.state and opt.param_groups[0]["epi_step"] == 0


def test_a_group_holding_a_tensor_twice_is_refused():
    # torch deprecates it; stepped twice per step, the scores of the kernels and the reference differed
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="parameter 2 in param group 0 appears in it twice"):
        EPIAdamW([p, q, p])
    opt = EPIAdamW([q])
    with pytest.raises(ValueError, match="parameter 1 in param group 1 appears in it twice"):
        opt.add_param_group({"params": (t for t in [p, p])})
    assert len(opt.param_groups) == 1


def test_introspection_of_a_tensor_the_optimizer_does_not_hold_raises():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = EPIAdamW([p])
    stranger = torch.nn.Parameter(torch.zeros(3))
    for call in (lambda: opt.isolation_mask(stranger), lambda: opt.set_isolation_mask(stranger, torch.zeros(3, dtype=torch.bool))):
        with pytest.raises(ValueError, match="not a parameter of this optimizer"):
            call()
    for call in (lambda: opt.isolation_mask(3), lambda: opt.set_isolation_mask("p", torch.zeros(3, dtype=torch.bool))):
        with pytest.raises(TypeError, match="must be a parameter \\(a tensor\\)"):
            call()
    assert not opt.state


@pytest.mark.parametrize("mask", [torch.ones(3, dtype=torch.bool).to_sparse(), torch.ones(3, dtype=torch.bool, device="meta"),
                                  torch.ones(3), torch.ones(1, 3, dtype=torch.bool), [True, False, True]])
def test_a_bad_mask_is_refused_before_state_is_created(mask):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = EPIAdamW([p])
    with pytest.raises(ValueError, match="mask must be a dense bool tensor of shape \\(3,\\)"):
        opt.set_isolation_mask(p, mask)
    assert not opt.state


@pytest.mark.parametrize("name", ["amsgrad", "maximize", "static", "foreach", "capturable"])
def test_numpy_bools_are_flags(name):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = EPIAdamW([p], **{name: np.bool_(False)})
    assert opt.param_groups[0][name] is False


@pytest.mark.parametrize("lr", [torch.tensor(True), torch.tensor(1), torch.tensor([1e-3, 1e-3]), torch.tensor(1e-3 + 0j)])
def test_a_tensor_lr_must_be_one_real_floating_point_element(lr):
    with pytest.raises(ValueError, match="Invalid learning rate.*Tensor lr must be (1-element|a floating-point tensor)"):
        EPIAdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)
