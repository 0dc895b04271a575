"""What the benchmarks measure, shared by the runner (bench/run.py) and the pytest-benchmark files.

Bytes-per-element model of one optimizer step (reads + writes of every state tensor, once):

    AdamW:  2*P (param r/w) + G (grad) + 4*M (exp_avg, exp_avg_sq r/w)
    EPI:    AdamW + 2*S (score r/w) + 1/8 (one mask bit)

P, G, M, S are the element sizes of param, grad, moments (torch keeps them in the param dtype) and
score. fp32 everywhere: AdamW 28 B, EPI 36.125 B (ideal EPI/AdamW time ratio 1.29).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from epi_kernels import EPIAdamW, available_backends
from epi_kernels import threshold as th
from epi_kernels import backends as registry
from epi_kernels.refresh import refresh_masks
from epi_kernels.state import init_epi_state
from epi_kernels.threshold import isolation_k

from bench.thresholds import radix_threshold, window_thresholds

MiB = 1 << 20


# ------------------------------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Case:
    """A set of parameter tensors to step: a name and the shapes."""
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def flat(n: int, name: str) -> Case:
    return Case(name, ((n,),))


def model_mix(total: int = 25_000_000, width: int = 512) -> Case:
    """A small transformer's tensors: an embedding, then per layer 4 attention and 2 MLP matrices,
    2 norm vectors and biases (many small tensors, a few large ones), scaled to about `total`."""
    layer = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)] + [(width,)] * 2 + [(4 * width,)]
    per_layer = sum(math.prod(s) for s in layer)
    vocab = 8192
    layers = max(1, (total - vocab * width) // per_layer)
    shapes = ((vocab, width),) + tuple(layer) * layers + ((width,),)
    return Case(f"mix-{sum(math.prod(s) for s in shapes) / 1e6:.0f}M", shapes)


def llama_mix(layers: int = 6, vocab: int = 8192, hidden: int = 512, intermediate: int = 1376) -> Case:
    """A small Llama's tensors: embedding, per layer q/k/v/o, gate/up/down and two RMSNorm weights,
    the final norm and an untied output head. Default: 57 tensors, 27.4M parameters."""
    layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)] + [(hidden,)] * 2
    shapes = ((vocab, hidden),) + tuple(layer) * layers + ((hidden,), (vocab, hidden))
    return Case(f"llama-{sum(math.prod(s) for s in shapes) / 1e6:.0f}M", shapes)


def seven_tensors() -> Case:
    """25.2M parameters in 7 large tensors: embedding and head (8192 x 1024), q/k/v/o (1024 x 1024)
    and one 1024 x 4096 matrix."""
    return Case("7x-25M", ((8192, 1024), (8192, 1024)) + ((1024, 1024),) * 4 + ((1024, 4096),))


def runnable_backends(device: str) -> list[str]:
    """Backends that can step tensors on `device` here (Triton on CPU only in its interpreter)."""
    out = []
    for b in available_backends():
        try:
            registry.get(b).check_device(torch.device(device))
        except RuntimeError:
            continue
        out.append(b)
    return out


def kernel_backends() -> list[str]:
    """The kernel backends installed here ("triton" if Triton is, "cuda" if the extension is)."""
    return [b for b in available_backends() if registry.get(b).refreshes_in_step]


def dry_cases() -> list[Case]:
    """Tiny tensors for a dry run (the GPU code paths on CPU, in Triton's interpreter)."""
    return [Case("dry-3x", ((1 << 14,), (1000,), (3, 7)))]


def cpu_cases(quick: bool) -> list[Case]:
    return [flat(MiB, "1M")] if quick else [flat(MiB, "1M"), flat(25 * MiB, "25M"), model_mix(), llama_mix(), seven_tensors()]


def gpu_cases(quick: bool) -> list[Case]:
    # the mix has a 135M-parameter model's ~270 tensors: there the host's per-tensor work shows
    return [flat(MiB, "1M")] if quick else [flat(MiB, "1M"), flat(16 * MiB, "16M"), flat(128 * MiB, "128M"),
                                            model_mix(135_000_000, 576)]


def make_params(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with fixed gradients (the same numbers for every contender)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g)).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ------------------------------------------------------------------------------------ bytes model

def bytes_per_element(param_dtype: torch.dtype, score_dtype: torch.dtype | None, mask: bool = True) -> float:
    """Bytes moved per element by one step (module docstring); score_dtype None: no score of its
    own (plain AdamW, or with `mask` EPI with importance="exp_avg_sq": AdamW + the mask bit)."""
    P = torch.empty((), dtype=param_dtype).element_size()
    adamw = 2 * P + P + 4 * P
    if score_dtype is None:
        return adamw + (1 / 8 if mask else 0)
    return adamw + 2 * torch.empty((), dtype=score_dtype).element_size() + 1 / 8


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Optimizer state bytes (every tensor in opt.state, step counters included) per parameter."""
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    total = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t))
    return total / numel


# ------------------------------------------------------------------------------------ contenders

class HandWrittenEPI:
    """The EPI step as a user would write it with separate PyTorch ops and torch.kthvalue per tensor
    (torch.topk on CUDA): the unfused baseline, same semantics, a bool mask per tensor, no fusion."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 isolation_ratio=0.01, importance_beta=0.99, refresh_interval=100, warmup_steps=100):
        self.params, self.lr, self.betas, self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.ratio, self.beta, self.t = isolation_ratio, importance_beta, 0
        self.interval, self.warmup = refresh_interval, warmup_steps
        self.state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), s=torch.zeros_like(p, dtype=torch.float32),
                           mask=torch.zeros_like(p, dtype=torch.bool)) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            g, s = p.grad, st["s"]
            if self.t >= self.warmup and (self.t - self.warmup) % self.interval == 0 and p.numel():
                k = isolation_k(self.ratio, p.numel())
                if k and p.is_cuda:  # kthvalue on CUDA runs one thread block per slice: minutes
                    tau = s.flatten().topk(k, sorted=False).values.min()
                elif k:
                    tau = torch.kthvalue(s.flatten(), p.numel() - k + 1).values
                    st["mask"] = (s >= tau) & (s > 0)
            s.mul_(self.beta).addcmul_(g.float(), g.float(), value=1 - self.beta)
            st["m"].lerp_(g, 1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
            denom = st["v"].sqrt() / math.sqrt(bc2) + self.eps
            new = p * (1 - self.lr * self.wd) - (self.lr / bc1) * st["m"] / denom
            p.copy_(torch.where(st["mask"], p, new))


def contender_backend(kind: str) -> str:
    """The backend of an "epi-<backend>[-v|-global]" contender."""
    return kind.removeprefix("epi-").removesuffix("-v").removesuffix("-global")


def contender(kind: str, params, refresh: bool):
    """An optimizer over `params`: "adamw-foreach", "adamw-fused", "unfused", "epi-<backend>",
    "epi-<backend>-v" (importance="exp_avg_sq": AdamW's second moment is the score), or
    "epi-<backend>-global" (scope="global").

    EPI runs with isolation_ratio=0.01 ("epi-torch" with foreach=True, as its AdamW baseline). Normal steps: one refresh happened at step 2 (so a real
    mask is applied) and none follows. Refresh steps: refresh_interval=1, every step refreshes."""
    if kind == "adamw-foreach":
        return torch.optim.AdamW(params, foreach=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, fused=True)
    schedule = dict(refresh_interval=1, warmup_steps=1) if refresh else dict(refresh_interval=10**9, warmup_steps=2)
    if kind == "unfused":
        return HandWrittenEPI(params, **schedule)
    backend = contender_backend(kind)
    impl = dict(foreach=True) if backend == "torch" else {}  # eager: torch's foreach AdamW inside
    if kind.endswith("-v"):
        impl["importance"] = "exp_avg_sq"
    if kind.endswith("-global"):
        impl["scope"] = "global"
    return EPIAdamW(params, isolation_ratio=0.01, backend=backend, **impl, **schedule)


def threshold_contenders(n: int, device: str, backends) -> dict[str, Callable[[], object]]:
    """The refresh of one n-element tensor (keys, window threshold, packed mask, popcount, overlap)
    per backend, the threshold engine's parts alone, and the exact selectors, on scores
    distributed like an EMA of g^2 with k = 1 %. The previous threshold is the current k-th
    largest, so the window path answers (as between ordinary refreshes)."""
    scores = torch.randn(n, generator=torch.Generator().manual_seed(0)).pow(2).to(device)
    k = isolation_k(0.01, n)
    keys = th.score_keys(scores)
    anchor = radix_threshold([keys], k)
    state = {}
    init_epi_state(state, scores, torch.float32)
    state["importance"] = scores

    def refresh(backend):
        state["threshold_bits"].fill_(anchor)
        refresh_masks([state], isolation_ratio=0.01, scope="tensor", threshold="approx",
                      ops=registry.get(backend).refresh_ops)

    in_step = [b for b in backends if registry.get(b).refreshes_in_step]
    fns = {f"refresh ({b})": (lambda b=b: refresh(b)) for b in backends if b not in in_step}
    for b in in_step:  # refresh inside the step: the threshold kernels alone
        fns[f"threshold kernels ({b})"] = lambda b=b: window_thresholds(b, [scores], [k], [anchor])
    fns = {**fns,
           "window threshold": lambda: th.approx_threshold([keys], k, anchor),
           "radix threshold (repair)": lambda: radix_threshold([keys], k),
           "torch.kthvalue": lambda: scores.kthvalue(n - k + 1),
           "torch.topk": lambda: scores.topk(k, sorted=False)}
    if device.startswith("cuda"):
        fns.pop("torch.kthvalue")  # one thread block per slice on CUDA: minutes at this size
    return fns


# ---------------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call takes (wall clock; the device is synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict[str, float]:
    """Median and spread of timing samples (seconds in, milliseconds out)."""
    ms = sorted(1e3 * s for s in samples)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q[0], "q3_ms": q[2],
            "n": len(ms)}


def ratio_summary(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and range of per-round ratios a/b (interleaved rounds)."""
    r = sorted(x / y for x, y in zip(a, b))
    return {"median": statistics.median(r), "min": r[0], "max": r[-1]}


def machine_info(device: str) -> dict[str, object]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=False).stdout.strip() or None
    except OSError:
        rev = None
    try:
        import triton  # noqa: PLC0415 - optional
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "git_rev": rev, "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info
