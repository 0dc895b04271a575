"""torch.compile of a whole training step with EPIAdamW.step inside, for every backend (the
kernel backends on CPU in their emulations, on CUDA tensors when a GPU is present) and both
scopes (scope="global": the kernel backends' in-step selection, traced through its custom ops)."""
import pytest
import torch

from epi_kernels import EPIAdamW
from support.devices import KERNEL_BACKENDS

EPI = dict(lr=3e-3, isolation_ratio=0.1, refresh_interval=3, warmup_steps=2)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("case", [pytest.param(("torch", "cpu"), id="torch"), *KERNEL_BACKENDS])
def test_torch_compiled_training_step_with_the_optimizer_inside(case, scope):
    # the step counter and schedule run outside dynamo's graphs (else every step would recompile),
    # the kernels are traced as custom ops: after the first refresh cycles no new graph is compiled
    from torch._dynamo.utils import counters

    backend, device = case

    def run(compile_it):
        torch.manual_seed(0)
        torch._dynamo.reset()
        counters.clear()
        model = torch.nn.Linear(8, 6).to(device)
        opt = EPIAdamW(model.parameters(), backend=backend, scope=scope, **EPI)

        def step(x):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step) if compile_it else step
        graphs = []
        for i in range(12):
            fn(torch.randn(4, 8, generator=torch.Generator().manual_seed(i)).to(device))
            graphs.append(counters["stats"]["unique_graphs"])
        return model, opt, graphs

    (a, oa, _), (b, ob, graphs) = run(False), run(True)
    assert ob.param_groups[0]["epi_step"] == 12 and ob.isolation_mask(b.weight).any()
    assert 0 < graphs[5] == graphs[-1], graphs  # steps 7-12 (refreshes at 8 and 11) compile nothing
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(oa.isolation_mask(p), ob.isolation_mask(q))
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)  # compiled forward/backward round differently
