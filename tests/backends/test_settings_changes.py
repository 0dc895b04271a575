"""C5 and the host-side caches after any settings change between steps (DESIGN.md, "The refresh
protocol"): a run whose groups switch backend, threshold, scope, capturable steps, ratio, or get
a requested refresh or a mask of the user's between steps selects exactly what the reference
backend selects for the same sequence, and freezes exactly the elements of the mask in force.

Histograms kept by a kernel step are for the group's very next step only; a step that does not
collect them (another backend's, the eager refresh of threshold="exact" or scope="global") must
drop them, and a refresh decided on the device must drop the host's isolated-index cache."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epi_kernels import EPIAdamW
from support.devices import CPU_KERNEL_BACKENDS, HAS_EXTENSION, HAS_TRITON
from epi_kernels.backends import cuda_host_harness, triton_interpreted

KERNELS = [b for b, ok in (("triton", HAS_TRITON and triton_interpreted()),
                           ("cuda", HAS_EXTENSION and cuda_host_harness())) if ok]
BACKENDS = ["torch", "compiled", *KERNELS]
N = 96  # elements per tensor: small, the Triton interpreter is slow


def gradient(seed: int, n: int, decades: float = 1.0) -> torch.Tensor:
    """Mixed magnitudes over `decades`, no zeros (so every non-isolated element moves). Over one
    decade the scores stay within the kernels' histogram window, which then answers every
    threshold from its counts; over many, some tensors take the exact repair path instead."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return sign * (0.5 + torch.rand(n, generator=g)) * 10.0 ** (decades * (torch.rand(n, generator=g) - 0.5))


def settings_step(draw_backend, capturable: bool) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "backend": draw_backend,
        "threshold": st.sampled_from(["approx", "exact"]),
        "scope": st.sampled_from(["tensor", "global"]),
        "isolation_ratio": st.sampled_from([0.1, 0.25]),
        "capturable": st.booleans() if capturable else st.just(False),
        "event": st.sampled_from([None, None, "request", "user mask"]) if not capturable else
        st.sampled_from([None, None, "user mask"]),
    })


def run(plan: list[dict], backend_of=lambda s: s["backend"], refresh_interval: int = 1, decades: float = 1.0
        ) -> list[tuple]:
    """Step two tensors through `plan` (one dict of settings and an event per step); per step the
    masks in force, the scores, and which elements the step left unchanged."""
    ps = [torch.nn.Parameter(torch.linspace(-1.0, 1.0, N)), torch.nn.Parameter(torch.linspace(2.0, -2.0, N // 2))]
    opt = EPIAdamW(ps, lr=0.1, weight_decay=0.1, refresh_interval=refresh_interval,
                    importance_beta=0.5)
    group = opt.param_groups[0]
    out = []
    for t, s in enumerate(plan):
        backend = backend_of(s)
        group.update(backend=backend, threshold=s["threshold"], scope=s["scope"],
                     isolation_ratio=s["isolation_ratio"], capturable=s["capturable"] and backend in KERNELS)
        if s["event"] == "request":
            opt.request_refresh()
        elif s["event"] == "user mask" and t:
            for i, p in enumerate(ps):
                opt.set_isolation_mask(p, gradient(1000 * t + i, p.numel()) > 0.3)
        for i, p in enumerate(ps):
            p.grad = gradient(10 * t + i, p.numel(), decades)
        before = [p.detach().clone() for p in ps]
        opt.step()
        out.append(tuple((opt.isolation_mask(p).clone(), opt.state[p]["importance"].clone(), b == p.detach())
                         for p, b in zip(ps, before)))
    return out


@pytest.mark.skipif(not KERNELS, reason="no kernel backend steps CPU tensors here (Triton interpreter, CUDA host harness)")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), capturable=st.booleans(), interval=st.sampled_from([1, 2]), decades=st.sampled_from([1.0, 8.0]))
def test_any_settings_sequence_selects_what_the_reference_selects(data, capturable, interval, decades):
    plan = data.draw(st.lists(settings_step(st.sampled_from(BACKENDS), capturable), min_size=4, max_size=7))
    got = run(plan, refresh_interval=interval, decades=decades)
    want = run(plan, backend_of=lambda s: "torch", refresh_interval=interval, decades=decades)  # (capturable kernel steps decide on the device: same schedule)
    for t, (g_step, w_step) in enumerate(zip(got, want)):
        for i, ((mask, score, unchanged), (w_mask, w_score, _)) in enumerate(zip(g_step, w_step)):
            where = f"step {t + 1}, tensor {i}, plan {plan[:t + 1]}"
            assert torch.equal(score, w_score), f"scores differ at {where}"
            assert torch.equal(mask, w_mask), f"masks differ at {where}: {int(mask.sum())} vs {int(w_mask.sum())} isolated"
            assert torch.equal(mask, unchanged), f"the mask in force is not what the step froze at {where}"


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("switch", ["threshold", "scope", "backend"])
def test_a_step_that_collects_no_histograms_drops_the_kept_ones(backend, switch):
    # a refresh every step, alternating a kernel step (which keeps histograms for the next step)
    # with one that refreshes on the host (threshold="exact", scope="global", or the torch
    # backend): the kernel step after it must not select from the histograms of two steps ago
    other = {"threshold": "exact", "scope": "global", "backend": "torch"}[switch]
    counts = {}
    for name in ("torch", backend):
        g = torch.Generator().manual_seed(3)
        p = torch.nn.Parameter(torch.randn(300, generator=g))
        opt = EPIAdamW([p], isolation_ratio=0.1, refresh_interval=1, backend=name)
        counts[name] = []
        for t in range(6):
            opt.param_groups[0].update(threshold="approx", scope="tensor", backend=name)
            if t % 2:  # (the reference takes the same settings, on its own backend)
                opt.param_groups[0][switch] = other if switch != "backend" else "torch"
            p.grad = torch.randn(300, generator=g) * torch.rand(300, generator=g) * 10
            opt.step()
            counts[name].append(opt.isolation_mask(p).clone())
    for t, (mask, want) in enumerate(zip(counts[backend], counts["torch"])):
        assert torch.equal(mask, want), f"step {t + 1}: {int(mask.sum())} isolated, reference {int(want.sum())}"


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_an_eager_step_after_a_refresh_on_the_device_freezes_the_new_mask(backend):
    # refreshes at steps 2 and 4: step 3 fills the eager backend's isolated-index cache; step 4
    # refreshes on the device (capturable); step 5 is eager again and must freeze step 4's mask
    plan = [dict(backend=b, threshold="approx", scope="tensor", isolation_ratio=0.25, capturable=cap, event=None)
            for b, cap in [("torch", False), ("torch", False), ("torch", False), (backend, True), ("torch", False)]]
    for t, step in enumerate(run(plan, refresh_interval=2)):
        for mask, _, unchanged in step:
            assert torch.equal(mask, unchanged), f"step {t + 1}: the mask in force is not what the step froze"
