"""Score tensors for threshold tests (the contract distributions, adversarial inputs, ties) and the
float oracle they are checked against; shared by the reference-engine and kernel tests."""
import torch

SLACK = lambda k: max(0.005 * k, 4)  # noqa: E731  C4/C5's allowed count error


def tau_value(tau: int) -> float:
    return torch.tensor(tau, dtype=torch.int32).view(torch.float32).item()


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest positive finite score (float oracle)."""
    s = scores.reshape(-1).float()
    s = s[(s > 0) & s.isfinite()]
    return torch.topk(s, min(k, s.numel())).values.min()


def n_selected(scores: torch.Tensor, tau: int) -> int:
    s = scores.reshape(-1).float()
    return int(((s >= tau_value(tau)) & s.isfinite() & (s > 0)).sum())


def gen(dist: str, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if dist == "halfnormal":
        x = z.abs()
    elif dist.startswith("lognormal"):
        x = (float(dist.split("_")[1]) * z).exp()
    elif dist.startswith("pareto"):
        x = (1 - u) ** (-1 / float(dist.split("_")[1]))
    elif dist == "uniform":
        x = u
    elif dist == "ema":  # EMA of squared gradients with heterogeneous per-element scale
        sigma = (2 * torch.randn(n, generator=g, dtype=torch.float64)).exp()
        x = torch.zeros(n, dtype=torch.float64)
        for _ in range(20):
            x = 0.9 * x + 0.1 * (sigma * torch.randn(n, generator=g, dtype=torch.float64)) ** 2
    else:
        raise ValueError(dist)
    return x.float()


DISTS = ["halfnormal", "lognormal_0.25", "lognormal_1", "lognormal_2", "pareto_1.5", "pareto_3", "uniform", "ema"]
RATIOS = [0.01, 0.05, 0.1, 0.2]


def adversarial(g):
    n = 5000
    yield "mixture", torch.cat([torch.rand(n, generator=g), 1e6 * torch.rand(50, generator=g), torch.zeros(300)])
    yield "discrete", torch.randint(0, 5, (n,), generator=g).float()
    yield "two_values", torch.tensor([1.0] * 3000 + [1.0000001] * 2000)
    yield "denormals", torch.rand(n, generator=g) * 1e-40
    yield "huge", torch.rand(n, generator=g) * 3e38
    yield "with_nonfinite", torch.cat([torch.rand(n, generator=g), torch.tensor([float("nan"), float("inf")] * 100)])


def tie_inputs(g):
    yield "constant", torch.full((4096,), 0.3)
    yield "bf16_valued", gen("halfnormal", 1 << 15, g).bfloat16().float()
    yield "bf16_tensor", gen("lognormal_1", 1 << 15, g).bfloat16()
    yield "few_levels", torch.randint(1, 4, (10000,), generator=g).float()
