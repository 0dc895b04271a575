"""Flat partitions without DeepSpeed: the bit windows a piece's mask is read from and written to,
and the refusal of a tensor a wrapper put in a param group when its layout is unknown (DeepSpeed
itself: tests/distributed/test_deepspeed.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW
from epi_kernels.mask import pack_mask, unpack_mask
from epi_kernels.partitions import piece_bits, put_piece_bits


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n - 1).flatmap(lambda a: st.tuples(st.just(a), st.integers(0, n - a))),
    st.integers(0, 2 ** 32 - 1))))
def test_piece_bits_read_and_write_exactly_their_window(case):
    n, (start, numel), seed = case
    g = torch.Generator().manual_seed(seed)
    whole = torch.rand(n, generator=g) < 0.5
    new = torch.rand(numel, generator=g) < 0.5
    packed = pack_mask(whole)
    assert torch.equal(piece_bits(packed, start, numel), whole[start:start + numel])
    put_piece_bits(packed, start, new)
    expected = whole.clone()
    expected[start:start + numel] = new
    assert torch.equal(unpack_mask(packed, n), expected)
    assert not unpack_mask(packed, packed.numel() * 8)[n:].any()  # the padding bits stay clear


def test_a_tensor_the_group_was_not_given_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = EPIAdamW(model.parameters(), isolation_ratio=0.1)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what a flattening wrapper does
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match=r"param group 0 holds a tensor of shape \(36,\) it was not given"):
        opt.step()
    assert torch.equal(flat, before) and not opt.state and opt.param_groups[0]["epi_step"] == 0


def test_same_shaped_copies_in_place_of_the_parameters_are_whole_tensors():
    """A wrapper that steps fp32 copies of bf16 parameters (DeepSpeed's unfused fp16/bf16 optimizer)
    replaces each parameter by a tensor of its shape: per-tensor selection holds, the copies are
    stepped as ordinary tensors, and the model's parameters answer isolation_mask with their copy's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).bfloat16()
    opt = EPIAdamW(model.parameters(), isolation_ratio=0.25, refresh_interval=1, warmup_steps=1)
    copies = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    opt.param_groups[0]["params"] = copies
    reference = EPIAdamW([torch.nn.Parameter(c.detach().clone()) for c in copies], isolation_ratio=0.25,
                         refresh_interval=1, warmup_steps=1)
    for step in range(3):
        grads = [torch.randn_like(c) * 10.0 ** torch.randint(-3, 3, c.shape) for c in copies]
        for c, r, g in zip(copies, reference.param_groups[0]["params"], grads):
            c.grad, r.grad = g, g.clone()
        opt.step()
        reference.step()
    for p, c, r in zip(model.parameters(), copies, reference.param_groups[0]["params"]):
        assert torch.equal(c, r)
        assert torch.equal(opt.isolation_mask(p), reference.isolation_mask(r)) and opt.isolation_mask(p).any()


def _stepped_copies(one_group_at_a_time: bool):
    """Two param groups whose parameters a wrapper replaced by same-shaped copies (fp32 master
    weights), stepped together or, as DeepSpeed ZeRO 1/2 does, one group at a time with
    `param_groups` set to a list of that group alone."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 4)), torch.nn.Parameter(torch.randn(30))]
    opt = EPIAdamW([{"params": [params[0]]}, {"params": [params[1]], "refresh_interval": 3}],
                   isolation_ratio=0.2, refresh_interval=2, warmup_steps=1)
    copies = [p.detach().clone().requires_grad_() for p in params]
    for group, copy in zip(opt.param_groups, copies):
        group["params"] = [copy]
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        for c in copies:
            c.grad = torch.randn(c.shape, generator=g) * 10 ** torch.randint(-3, 2, c.shape, generator=g).float()
        if one_group_at_a_time:
            groups = opt.param_groups
            for group in groups:
                opt.param_groups = [group]
                opt.step()
            opt.param_groups = groups
        else:
            opt.step()
    return [opt.isolation_mask(p) for p in params], copies, opt.isolation_stats()


def test_a_wrapper_stepping_one_group_at_a_time_changes_nothing():
    # each group keeps its record (what it was given, its schedule) while set aside
    masks, copies, stats = _stepped_copies(False)
    masks_apart, copies_apart, stats_apart = _stepped_copies(True)
    assert all(m.any() for m in masks)  # masks of the model parameters, read through their copies
    assert all(torch.equal(a, b) for a, b in zip(masks + copies, masks_apart + copies_apart))
    assert stats == stats_apart and [s["refresh_step"] for s in stats] == [7, 7]
