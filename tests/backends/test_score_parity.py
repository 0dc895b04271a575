"""C7 over a long run: the score EMA is rounded the same way in every backend, so for the same
gradients (random fp32 of mixed magnitudes) scores, thresholds, tie cuts and masks stay bit-identical
across the four backends for hundreds of steps and a dozen refreshes, with fp32 and bf16 scores.
Parameters agree to rounding only (the torch backend's AdamW is torch's own), and are not compared:
test_kernel_backends.py does that."""
import pytest
import torch

from epi_kernels import EPIAdamW
from support.devices import CPU_KERNEL_BACKENDS
from support.gradients import mixed_gradient

STEPS, SHAPES = 300, [(60, 50), (700,), (1,)]
ENTRIES = ("importance", "isolation_mask", "threshold_bits", "isolated_count", "threshold_exact", "isolation_k")


def _run(backend, **kw):
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    opt = EPIAdamW(params, lr=1e-3, isolation_ratio=0.1, refresh_interval=25, backend=backend, **kw)
    history = []
    for step in range(STEPS):
        for p in params:
            p.grad = mixed_gradient(p.shape, g)
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:  # the step of each refresh, and the last one
            history.append([[opt.state[p][e].clone() for e in ENTRIES] for p in params])
    return history


@pytest.mark.slow  # 300 steps per case: minutes in Triton's interpreter
@pytest.mark.parametrize("kw", [{}, {"importance_dtype": torch.bfloat16}, {"importance": "abs"}],
                         ids=["fp32-sq", "bf16-sq", "fp32-abs"])
@pytest.mark.parametrize("backend", ["compiled"] + CPU_KERNEL_BACKENDS)
def test_scores_and_masks_bit_identical_to_the_reference_over_a_long_run(backend, kw):
    ref, out = _run("torch", **kw), _run(backend, **kw)
    for step, (a, b) in enumerate(zip(ref, out)):
        for i, (ea, eb) in enumerate(zip(a, b)):
            for name, x, y in zip(ENTRIES, ea, eb):
                assert torch.equal(x, y), (step, i, name)
    assert int(ref[-1][0][3]) > 0  # something was isolated
