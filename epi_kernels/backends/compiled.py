"""backend="compiled": the EPI-AdamW step as torch.compile'd loops, one per tensor, called per group of tensors.

The eager torch backend runs torch's AdamW plus separate passes for the score EMA and the masked
restore. Here one function does everything per element (load p, g, m, v, s and the mask bit; update
score and moments; write p only where not isolated), and torch.compile (Inductor's C++ backend on
CPU, Triton on GPU) turns it into one vectorised loop over memory: 36 B per fp32 element.

Math is fp32 whatever the storage dtype, in the order of DESIGN.md section 6 (torch's for-loop
AdamW with every product, sum, quotient and square root rounded on its own; Inductor contracts no
multiply-add on the CPU), so on the CPU results are the kernel backends' bit for bit, and the eager
backend's for bf16/fp16 params; fp32 params agree with the eager backend (torch's own AdamW, whose lerp and
addcmul are fused multiply-adds and whose CPU sqrt is not correctly rounded) to rounding.
The mask is read as 32-bit words, each broadcast over its 32 elements, which keeps the loop
vectorised (a per-byte gather would not be) with 8-lane int32 shifts; 64-bit words cost two 4-lane
int64 vectors per 8 elements (measured on this project's 2-core AMD machine, a 4M-element step with
64-bit words took 1.5-1.7x as long as the same step without a mask, with 32-bit words 1.03x).

Contiguous tensors are stepped up to GROUP_SIZE per compiled call (dynamo unrolls the loop over
the group), flattened: those of EXACT_STEP_NUMEL elements or more with others of their size, by a
kernel compiled for that size (a shape-generic kernel indexes the mask with a modulo by a symbolic
size), smaller ones by one shape-generic kernel. A compiled call costs tens to hundreds of
microseconds on the host (guards, wrappers), more than a small tensor's arithmetic.

Refreshes use compiled copies of the threshold engine's elementwise passes (keys, histogram slots,
packed mask), which return the same integers as the eager ones.

If compilation fails (no usable C++ compiler, an unsupported platform), every function here runs
its uncompiled self instead, with one warning per process.
"""
from __future__ import annotations

import contextlib
import types
import warnings
from typing import Callable

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from ..refresh import RefreshOps
from ..score import score_ema_
from ..step_records import StepHyper, StepTensors
from ..step_scalars import step_scalars
from ..threshold import score_keys, score_slots
from .eager import sqrt_rn
from .registry import Backend, register

__all__ = ["BACKEND", "compiled_step", "COMPILED_REFRESH_OPS"]

_broken: str | None = None  # why compilation failed, once it has


STATIC_NUMEL = 1 << 20  # refresh passes over tensors this large get kernels specialised to their exact size
EXACT_STEP_NUMEL = 1 << 12  # steps of tensors this large too (in groups of one size)
MAX_SIZES = 64  # kernels per function (exact sizes, group layouts; dynamo's default limit, 8, is per function too)
GROUP_SIZE = 8  # tensors per compiled step call: compiling it takes about GROUP_SIZE x one tensor's time


class _CompiledOrEager:
    """Call `fn` compiled with torch.compile; on a compiler failure, warn once and call it
    uncompiled from then on (compiler failures happen before anything is written).

    Large tensors (first argument >= STATIC_NUMEL elements, or as the caller's `exact` says) get a
    kernel compiled for their exact size: measured on this project's 2-core CPU machines, shape-generic kernels ran up to 2x slower
    on them. A model has few distinct large sizes, so few compilations (up to MAX_SIZES per
    function); smaller tensors share one shape-generic kernel, as their cost is mostly the call."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        # the exact-size variant is a copy with its own code object: dynamo keeps compiled entries
        # (and its recompile limit) per code object, so exact sizes cannot crowd out the generic one
        self.variants = {False: fn, True: types.FunctionType(
            fn.__code__.replace(co_name=fn.__name__ + "_exact_size"), fn.__globals__,
            fn.__name__ + "_exact_size", fn.__defaults__, fn.__closure__)}
        self.compiled: dict[bool, Callable] = {}
        self.sizes: set[tuple] = set()  # argument signatures already traced (_signature: exact or generic)

    def __call__(self, *args, exact: bool | None = None, signature: tuple | None = None):
        """`exact`: whether to call the exact-size kernel (default: for >= STATIC_NUMEL elements);
        `signature`: what a caller knows to decide the kernel (default: _signature(args))."""
        global _broken
        if _broken is None:
            static = args[0].numel() >= STATIC_NUMEL if exact is None else exact
            kernel = self.compiled.get(static)
            if kernel is None:
                kernel = self.compiled[static] = torch.compile(self.variants[static], dynamic=not static)
            try:
                signature = _signature(args, static) if signature is None else (static, signature)
                if signature in self.sizes:
                    return kernel(*args)
                with _new_signature():
                    out = kernel(*args)
                self.sizes.add(signature)
                return out
            except Exception as err:  # noqa: BLE001 - decided by _is_compile_error
                if not _is_compile_error(err):
                    raise
                _broken = f"{type(err).__name__}: {err}".splitlines()[0]
                warnings.warn(f"epi_kernels: backend='compiled' could not compile ({_broken}); "
                              "running its steps uncompiled (eager)", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


def _signature(args: tuple, static: bool) -> tuple:
    """What decides which compiled kernel serves `args`: exact shapes and strides for exact-size
    kernels; dtypes, ranks and which sizes are 0 or 1 (dynamo specialises those) for the
    shape-generic ones, whose other sizes are symbols, none tied to another (_new_signature)."""
    def key(a):
        if isinstance(a, (list, tuple)):
            return tuple(key(x) for x in a)
        if not isinstance(a, Tensor):
            return a
        return (a.shape, a.dtype, a.stride()) if static else (a.dtype, tuple(n < 2 for n in a.shape))

    return (static, *(key(a) for a in args))


@contextlib.contextmanager
def _new_signature():
    """While arguments of a new signature are traced: raise dynamo's per-function recompile limit
    (past it dynamo would silently run the function uncompiled), and give every size its own
    symbol (duck sizing would tie equal sizes in a group together, so that each pattern of equal
    sizes along a model's tensor list compiled a graph of its own)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(MAX_SIZES, getattr(cfg, name))}), fx_config.patch(use_duck_shape=False):
        yield


def _is_compile_error(err: Exception) -> bool:
    """True for failures to build the kernel (Inductor, the C++ toolchain); errors of the step
    itself (bad input, a real bug) are not swallowed."""
    from torch._dynamo.exc import BackendCompilerFailed  # noqa: PLC0415 - loaded only on failure

    mod = type(err).__module__ or ""
    return isinstance(err, (BackendCompilerFailed, OSError, ImportError)) or mod.startswith("torch._inductor")


def _tensor_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor | None, vmax: Tensor | None,
                 words: Tensor, hp: Tensor, sq: bool, maximize: bool) -> None:
    """One tensor's step; `words` is its packed mask as int32. hp (fp32[9]): weight-decay factor, step size, 1-beta1, beta2, 1-beta2,
    sqrt(bias correction 2), eps, importance beta, 1-importance beta. No score pass without `s`
    (importance="exp_avg_sq": the scores are `v`)."""
    decay, step_size, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, ib, one_minus_ib = hp.unbind(0)
    shifts = torch.arange(32, dtype=torch.int32, device=p.device)
    isolated = (((words.view(-1, 1) >> shifts) & 1).view(-1)[: p.numel()] != 0).view(p.shape)
    g32 = g.float()
    if s is not None:
        s32 = s.float()
        score_ema_([s32], [g32], ib, one_minus_ib, sq)
        s.copy_(s32)
    if maximize:
        g32 = -g32
    # DESIGN.md section 6, operation for operation: ((1 - beta2) * g) * g, not g * g * (1 - beta2),
    # which overflows from |g| ~ 1.85e19 on and rounds differently from the kernels
    m32 = m.float()
    m32 = m32 + (g32 - m32) * one_minus_b1
    v32 = v.float() * b2 + (one_minus_b2 * g32) * g32
    m.copy_(m32)
    v.copy_(v32)
    if vmax is not None:
        v32 = torch.maximum(vmax.float(), v32)
        vmax.copy_(v32)
    p32 = p.float()
    # compiled, sqrt is the IEEE one (Inductor: the sqrt instruction, libdevice on GPU); run
    # uncompiled (the fallback), torch.sqrt of fp32 CPU tensors is not correctly rounded
    root = v32.sqrt() if torch.compiler.is_compiling() else sqrt_rn(v32)
    update = p32 * decay - (step_size * m32) / (root / bc2_sqrt + eps)
    p.copy_(torch.where(isolated, p32, update))


def _score_words(scores: Tensor, tau: Tensor) -> Tensor:
    """The packed mask ``key(scores) >= tau`` as int64 words, in a form Inductor fuses into one
    vectorised loop: each word is the sum of its 64 shifted bits (the layout of mask.pack_mask;
    eager, mask.py's byte-gathering form is faster)."""
    keys = score_keys(scores)
    pad = (-keys.numel()) % 64
    bits = torch.nn.functional.pad(keys >= tau, (0, pad)).view(-1, 64).to(torch.int64)
    return (bits << torch.arange(64, dtype=torch.int64, device=keys.device)).sum(1)


def _score_mask(scores: Tensor, tau: Tensor) -> Tensor:
    return _score_words_kernel(scores, tau).view(torch.uint8)


def _group_step(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], ss: list[Tensor] | None,
                vmaxs: list[Tensor] | None, words: list[Tensor], hps: Tensor, sq: bool, maximize: bool) -> None:
    """_tensor_step of each tensor of a group (hps: one row of scalars per tensor)."""
    for i in range(len(ps)):
        _tensor_step(ps[i], gs[i], ms[i], vs[i], None if ss is None else ss[i], None if vmaxs is None else vmaxs[i],
                     words[i], hps[i], sq, maximize)


_step_kernel = _CompiledOrEager(_tensor_step)
_group_kernel = _CompiledOrEager(_group_step)
_score_words_kernel = _CompiledOrEager(_score_words)
COMPILED_REFRESH_OPS = RefreshOps(keys=_CompiledOrEager(score_keys), bins=_CompiledOrEager(score_slots),
                                  mask=_score_mask)


def compiled_step(tensors: StepTensors, hyper: StepHyper, plan: None = None) -> None:
    """Step the tensors with the compiled kernels (state in place, like the eager backend), up to
    GROUP_SIZE per call: tensors of EXACT_STEP_NUMEL elements or more with others of their size by
    an exact-size kernel, smaller ones by the shape-generic kernel, each non-contiguous one alone."""
    params, steps = tensors.params, tensors.state_steps
    if not params:
        return
    torch._foreach_add_(steps, 1)
    scalars = step_scalars(steps, steps[0].device, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
                           weight_decay=hyper.weight_decay, eps=hyper.eps, importance_beta=hyper.importance_beta)
    columns = (params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs,
               None if hyper.v_scores else tensors.scores,  # (else the scores are exp_avg_sqs)
               tensors.max_exp_avg_sqs if hyper.amsgrad else None)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if not p.numel():
            continue
        row = [None if c is None else c[i] for c in columns]
        if not all(t is None or t.is_contiguous() for t in row):
            # a tensor of its own: a row view's storage offset would be a symbolic input of the compiled step
            hp = scalars[i].to(p.device, non_blocking=True, copy=True)
            _step_kernel(*row, tensors.masks[i].view(torch.int32), hp, hyper.sq, hyper.maximize, exact=False)
            continue
        # (dynamo specialises sizes 0 and 1: such tensors get exact-size kernels too)
        exact = p.numel() >= EXACT_STEP_NUMEL or p.numel() < 2
        key = (p.device, exact, p.numel() if exact else None, tuple(None if t is None else t.dtype for t in row))
        groups.setdefault(key, []).append(i)
    for key, indices in groups.items():
        device, exact = key[0], key[1]
        for start in range(0, len(indices), GROUP_SIZE):
            group = indices[start:start + GROUP_SIZE]
            # flat (Inductor's loop over a 2-D shape ran 10 % slower), aliases that are not views (a
            # view's ._base would bring its base's sizes into the guards)
            lists = [None if c is None else [c[i].view(-1).detach() for i in group] for c in columns]
            hps = scalars[group].to(device, non_blocking=True)  # (indexing copies: an offset-free tensor)
            _group_kernel(*lists, [tensors.masks[i].view(torch.int32) for i in group], hps, hyper.sq, hyper.maximize,
                          exact=exact, signature=(key, len(group), hyper.sq, hyper.maximize))


BACKEND = register(Backend("compiled", compiled_step, refresh_ops=COMPILED_REFRESH_OPS))
