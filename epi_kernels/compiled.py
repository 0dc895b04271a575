"""backend="compiled": the EPI-AdamW step of one tensor as a single torch.compile'd loop.

The eager torch backend runs torch's AdamW plus separate passes for the score EMA and the masked
restore. Here one function does everything per element (load p, g, m, v, s and the mask bit; update
score and moments; write p only where not isolated), and torch.compile (Inductor's C++ backend on
CPU, Triton on GPU) turns it into one vectorised loop over memory: 36 B per fp32 element.

Math is fp32 whatever the storage dtype, in the order of torch's for-loop AdamW, so results agree
with the eager backend to rounding (not to the bit: the fused loop rounds intermediates once).
The mask is read as 64-bit words, each broadcast over its 64 elements, which keeps the loop
vectorised (a per-byte gather would not be).

If compilation fails (no usable C++ compiler, an unsupported platform), the step falls back to the
eager backend with a warning, once per process.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = ["compiled_epi_adamw"]

_kernel: Callable | None = None
_broken: str | None = None  # why compilation failed, once it has


def _tensor_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, vmax: Tensor | None,
                 words: Tensor, hp: Tensor, sq: bool, maximize: bool) -> None:
    """One tensor's step. hp (fp32[10]): weight-decay factor, step size, 1-beta1, beta2, 1-beta2,
    sqrt(bias correction 2), eps, importance beta, 1-importance beta, unused."""
    decay, step_size, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, ib, one_minus_ib, _ = hp.unbind(0)
    shifts = torch.arange(64, dtype=torch.int64, device=p.device)
    isolated = (((words.view(-1, 1) >> shifts) & 1).view(-1)[: p.numel()] != 0).view(p.shape)
    g32 = g.float()
    s.copy_(s.float() * ib + (g32 * g32 if sq else g32.abs()) * one_minus_ib)
    if maximize:
        g32 = -g32
    m32 = m.float()
    m32 = m32 + (g32 - m32) * one_minus_b1
    v32 = v.float() * b2 + g32 * g32 * one_minus_b2
    m.copy_(m32)
    v.copy_(v32)
    if vmax is not None:
        v32 = torch.maximum(vmax.float(), v32)
        vmax.copy_(v32)
    p32 = p.float()
    update = p32 * decay - step_size * m32 / (v32.sqrt() / bc2_sqrt + eps)
    p.copy_(torch.where(isolated, p32, update))


def _value(x) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def compiled_epi_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, importances,
                       masks, *, importance_beta, importance, amsgrad, beta1, beta2, lr, weight_decay, eps,
                       maximize, eager: Callable, **eager_kwargs) -> None:
    """Step each tensor with the compiled kernel; if compiling fails, `eager` steps the rest."""
    lr, beta1, beta2 = _value(lr), _value(beta1), _value(beta2)
    done = 0
    while _broken is None and done < len(params):
        p, step_t = params[done], state_steps[done]
        step = _value(step_t) + 1
        if p.numel():
            hp = torch.tensor([1 - lr * weight_decay, lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2,
                               (1 - beta2 ** step) ** 0.5, eps, importance_beta, 1 - importance_beta, 0.0],
                              dtype=torch.float32, device=p.device)
            vmax = max_exp_avg_sqs[done] if amsgrad else None
            tensors = [p, grads[done], exp_avgs[done], exp_avg_sqs[done], importances[done], vmax]
            if all(t is None or t.is_contiguous() for t in tensors):
                tensors = [None if t is None else t.view(-1) for t in tensors]  # one graph for all shapes
            if not _call(*tensors, masks[done].view(torch.int64), hp, importance == "sq", maximize):
                break  # nothing of this tensor was written: the eager path takes over from here
        step_t += 1
        done += 1
    if done < len(params):
        rest = slice(done, None)
        eager(params[rest], grads[rest], exp_avgs[rest], exp_avg_sqs[rest],
              max_exp_avg_sqs[rest] if amsgrad else [], state_steps[rest], importances[rest], masks[rest],
              None, importance_beta=importance_beta, importance=importance, amsgrad=amsgrad, beta1=beta1,
              beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize, **eager_kwargs)


def _call(p, g, m, v, s, vmax, words, hp, sq, maximize) -> bool:
    """Run the compiled kernel; False (with a one-time warning) if it cannot be compiled here."""
    global _kernel, _broken
    if _kernel is None:
        _kernel = torch.compile(_tensor_step, dynamic=True)
    try:
        _kernel(p, g, m, v, s, vmax, words, hp, sq, maximize)
        return True
    except Exception as err:  # noqa: BLE001 - decided by _is_compile_error
        if not _is_compile_error(err):
            raise
        _broken = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"epi_kernels: backend='compiled' could not compile ({_broken}); "
                      "falling back to the eager torch backend", RuntimeWarning, stacklevel=4)
        return False


def _is_compile_error(err: Exception) -> bool:
    """True for failures of the compiler stack (dynamo, inductor, the C++ toolchain)."""
    mod = type(err).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.compiler")) or isinstance(
        err, (OSError, ImportError, NotImplementedError))
