"""The "cuda" kernel set (backend="cuda"): :class:`epi_kernels.launch.Kernels` with the CUDA C++
kernels of the extension ``epi_kernels._C`` (built from csrc/ and python/), run by the custom ops
of :mod:`epi_kernels.ops`.

The extension takes raw device addresses and the current CUDA stream, so it needs no torch headers;
every call raises RuntimeError with the CUDA error when a launch fails. Its submodule ``_C.host`` is
the host harness: the same launch functions emulated on the CPU, block after block, with the
kernels' own ``__host__ __device__`` element and threshold functions. With ``EPI_CUDA_HOST=1`` the
"cuda" backend steps CPU tensors through it (the tests do, on machines without a GPU), as Triton's
interpreter does for the "triton" backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C
from ..abi import check_cuda_constants
from ..launch import Launch, StepFlags

__all__ = ["CudaKernels", "kernels_for", "DTYPE_CODES", "KERNELS", "HOST_KERNELS"]

_K = _C.constants()
check_cuda_constants(_K)  # the one check of the compiled constants against the kernel ABI
DTYPE_CODES = {torch.float32: _K["DTYPE_F32"], torch.bfloat16: _K["DTYPE_BF16"], torch.float16: _K["DTYPE_F16"]}


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _require_int64(what: str, **counts: Tensor | None) -> None:
    """The kernels write counts through raw pointers as int64: a narrower buffer would be overrun."""
    wrong = {name: t.dtype for name, t in counts.items() if t is not None and t.dtype != torch.int64}
    if wrong:
        raise TypeError(f"{what}: count buffers must be int64, got {wrong}")


class CudaKernels:
    """:class:`epi_kernels.launch.Kernels` with the launch functions of `ops`: ``_C`` (CUDA
    tensors, on the current stream) or ``_C.host`` (CPU tensors, the host harness)."""

    def __init__(self, ops, on_gpu: bool) -> None:
        self.ops, self.on_gpu = ops, on_gpu

    def _stream(self, device: torch.device) -> tuple[int, ...]:
        return (torch.cuda.current_stream(device).cuda_stream,) if self.on_gpu else ()

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor,
                         means: Tensor | None = None) -> None:
        _require_int64("window_histogram", hist=hist, over=over)
        self.ops.window_histogram(launch.table.data_ptr(), launch.chunks.data_ptr(), launch.programs,
                                  DTYPE_CODES[launch.score_dtype], _address(means), origin.data_ptr(),
                                  hist.data_ptr(), over.data_ptr(), *self._stream(launch.device))

    def means(self, launch: Launch, gate: Tensor, sums: Tensor, means: Tensor) -> None:
        _require_int64("means", sums=sums)
        self.ops.score_means(launch.table.data_ptr(), launch.chunks.data_ptr(), launch.programs, launch.tensors,
                             DTYPE_CODES[launch.score_dtype], gate.data_ptr(), sums.data_ptr(), means.data_ptr(),
                             *self._stream(launch.device))

    def raw_thresholds(self, launch: Launch, means: Tensor, tau: Tensor, lo: Tensor, hi: Tensor) -> None:
        self.ops.raw_thresholds(launch.tensors, means.data_ptr(), tau.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                                *self._stream(launch.device))

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor, cut: Tensor, gate: Tensor | None = None,
               means: Tensor | None = None) -> None:
        """Window select, repair, then the tie pass: `cut` (int64 [T], filled with TIE_NONE by the
        caller) gets the tie cut of each tensor the repair path answered with too many keys tied at tau.
        With `means` (scope="global") one selection over the group, the tie rule in tensor order."""
        _require_int64("select", hist=hist, over=over, k=k, cut=cut)
        stream = self._stream(launch.device)
        pooled = means is not None
        self.ops.window_select(1 if pooled else launch.tensors, hist.data_ptr(), over.data_ptr(), origin.data_ptr(),
                               k.data_ptr(), tau.data_ptr(), repair.data_ptr(), *stream)
        # the repair kernels clear flags as tensors finish; int64 counts (k, need, scratch; a tensor may
        # exceed 2^31 elements), int32 prefix; pooled: the group's flag and need in entry 0 of [T] (the
        # tie rule leaves each tensor's there) and the group's digit counts in an extra scratch row
        window_flags = repair if gate is None else repair * gate
        flags, need = launch.zeros(), launch.zeros(dtype=torch.int64)
        flags[:window_flags.numel()] = window_flags
        need[:k.numel()] = k
        prefix, scratch = launch.zeros(), torch.zeros(launch.tensors + pooled, _K["RADIX_BINS"], dtype=torch.int64,
                                                      device=launch.device)
        # the tie pass's per-chunk counts (at most CHUNK each) and first programs: int32, written before read
        ties = torch.empty(launch.programs + launch.tensors, dtype=torch.int32, device=launch.device)
        self.ops.radix_repair(launch.table.data_ptr(), launch.chunks.data_ptr(), launch.programs, launch.tensors,
                              DTYPE_CODES[launch.score_dtype], _address(means), k.data_ptr(), flags.data_ptr(),
                              prefix.data_ptr(), need.data_ptr(), scratch.data_ptr(), tau.data_ptr(), cut.data_ptr(),
                              ties.data_ptr(), *stream)

    def fused_step(self, launch: Launch, flags: StepFlags, scalars: Tensor, control: Tensor, tau, cut, origin, hist,
                   over, counts, above=None) -> None:
        """`cut` (int64 [T], or None when not refreshing): the tie cuts a refresh applies with `tau`
        and `above` (int32 [T]; None: tau + 1)."""
        _require_int64("fused_step", hist=hist, over=over, counts=counts, cut=cut)
        # the kernel would read through a null address
        if flags.refresh and (tau is None or cut is None or counts is None):
            raise ValueError("fused_step: a refreshing step needs tau, cut and counts")
        if flags.collect and (origin is None or hist is None or over is None):
            raise ValueError("fused_step: a collecting step needs origin, hist and over")
        if scalars.dtype != torch.float32 or control.dtype != torch.int32:
            raise TypeError(f"fused_step: scalars must be float32 and control int32, got {scalars.dtype}, {control.dtype}")
        self.ops.fused_step(launch.table.data_ptr(), launch.chunks.data_ptr(), launch.programs,
                            DTYPE_CODES[launch.param_dtype], DTYPE_CODES[launch.score_dtype], flags.bits(),
                            scalars.data_ptr(), control.data_ptr(),
                            *(_address(t) for t in (tau, cut, above, origin, hist, over, counts)),
                            *self._stream(launch.device))


KERNELS = CudaKernels(_C, on_gpu=True)
HOST_KERNELS = CudaKernels(_C.host, on_gpu=False)


def kernels_for(device: torch.device) -> CudaKernels:
    """The kernel set for tensors on `device`: the extension on CUDA tensors, its host harness on CPU ones."""
    return KERNELS if device.type == "cuda" else HOST_KERNELS
