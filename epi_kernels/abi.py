"""The kernel ABI: every layout and constant that Python, the Triton kernels and the CUDA kernels
must agree on, written down once (DESIGN.md, "Kernel ABI").

Imported by the host side (:mod:`epi_kernels.launch`, :mod:`epi_kernels.step_driver`), by the
reference threshold engine (:mod:`epi_kernels.threshold`) and by the Triton kernels (as
``tl.constexpr`` in :mod:`epi_kernels.kernels.tensor_table` and ``threshold_math``). The CUDA
kernels are compiled C++ with their own copies in ``csrc/``; the extension exposes them
(``_C.constants()``) and :func:`check_cuda_constants` compares every one with this module when
the extension loads, so a stale or edited build refuses to run. Pure Python, no imports: this is
the bottom layer.
"""
from __future__ import annotations

__all__ = ["COLUMNS", "CHUNK", "SCALARS", "CONTROL", "FLAGS", "flag_bit", "KEY_NONE", "TIE_NONE",
           "MANTISSA_BITS", "WINDOW_OCTAVES", "BIN_SHIFT", "BIN_WIDTH", "WINDOW_BINS", "WINDOW_KEYS",
           "TOLERANCE_DIVISOR", "TOLERANCE_MIN", "CUDA_RADIX_LEVELS", "TRITON_RADIX_LEVELS",
           "check_cuda_constants"]

# ------------------------------------------------------------------ tables (launch.py builds them)

# Tensor table, int64 [T, len(COLUMNS)]: per tensor the address of each column's tensor (0 for
# max_exp_avg_sq without amsgrad), then its element count.
COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "importance", "mask", "numel")
# Chunk table, int32 [P, 2]: per program (tensor index, chunk index). A chunk is CHUNK consecutive
# elements in logical order, a multiple of 8, so no two programs share a packed mask byte.
CHUNK = 8192

# ------------------------------------------------------------------ what every fused step reads

# Per-tensor step scalars, float32 [T, len(SCALARS)] in device memory, in this order (the formulas
# are step_scalars.step_scalars'): computed on the device from each tensor's step counter, so
# neither the step count nor a tensor lr is ever read on the host.
SCALARS = ("decay", "step_size", "one_minus_beta1", "beta2", "one_minus_beta2", "bc2_sqrt", "eps",
           "importance_beta", "one_minus_importance_beta")
# Control words, int32 [len(CONTROL)] in device memory: whether this step refreshes the masks,
# collects the window histograms for the next step's refresh, or is skipped whole (GradScaler
# found inf/NaN). A refresh or a collection happens where its flag below is set and its word is.
CONTROL = ("refresh", "collect", "skip")
# Step flags, one int32 bit set (bit i is FLAGS[i]) chosen by the host: the score signal (g*g, else
# |g|), maximize, amsgrad, what the step may do (refresh, collect; a host-decided step sets them as
# decided and passes control words that agree; a capturable step sets both and lets its control
# words decide), and v_scores: the scores are the exp_avg_sq column itself (importance="exp_avg_sq";
# the importance column holds exp_avg_sq's address), so there is no score EMA to load or store.
# v_scores selects a compiled variant; the others are read at run time.
FLAGS = ("sq", "maximize", "amsgrad", "refresh", "collect", "v_scores")


def flag_bit(name: str) -> int:
    """The bit of step flag `name`."""
    return 1 << FLAGS.index(name)


# ------------------------------------------------------------------ threshold engine integers

KEY_NONE = 0x7F800000  # key of +inf: above every eligible key, so `key >= KEY_NONE` selects nothing
TIE_NONE = (1 << 63) - 1  # tie cut that cuts nothing: every key equal to tau is isolated
MANTISSA_BITS = 10  # 2**MANTISSA_BITS window bins per octave
WINDOW_OCTAVES = 4  # the window spans [anchor / 2, 8 * anchor)
BIN_SHIFT = 23 - MANTISSA_BITS
BIN_WIDTH = 1 << BIN_SHIFT  # keys per window bin
WINDOW_BINS = WINDOW_OCTAVES << MANTISSA_BITS
WINDOW_KEYS = WINDOW_BINS << BIN_SHIFT  # keys spanned by the window (2**25)
# The count error a selection may have: max(k // TOLERANCE_DIVISOR, TOLERANCE_MIN) (0.5 %).
TOLERANCE_DIVISOR = 200
TOLERANCE_MIN = 4
# Repair digits of the 31-bit key, (shift, bits), most significant first. Any exact split gives the
# same integer (threshold.radix_thresholds); each kernel set picks the one that suits it: CUDA
# counts a digit in shared memory (11/10/10 bits: 2048 int64 scratch counters per tensor), Triton
# with tl.histogram, whose cost grows with the bins (6 then 5 bits: at most 64).
CUDA_RADIX_LEVELS = ((20, 11), (10, 10), (0, 10))
TRITON_RADIX_LEVELS = ((25, 6), (20, 5), (15, 5), (10, 5), (5, 5), (0, 5))


def check_cuda_constants(c: dict) -> None:
    """ImportError unless the extension's compiled constants (``_C.constants()``) are this ABI."""
    expected = {"CHUNK": CHUNK, "TABLE_WIDTH": len(COLUMNS), "SCALAR_COUNT": len(SCALARS),
                "CONTROL_WORDS": len(CONTROL), "KEY_NONE": KEY_NONE, "TIE_NONE": TIE_NONE,
                "MANTISSA_BITS": MANTISSA_BITS, "WINDOW_OCTAVES": WINDOW_OCTAVES, "BIN_SHIFT": BIN_SHIFT,
                "BIN_WIDTH": BIN_WIDTH, "WINDOW_BINS": WINDOW_BINS, "TOLERANCE_DIVISOR": TOLERANCE_DIVISOR,
                "TOLERANCE_MIN": TOLERANCE_MIN, "RADIX_LEVELS": [tuple(x) for x in CUDA_RADIX_LEVELS],
                "RADIX_BINS": 1 << max(bits for _, bits in CUDA_RADIX_LEVELS)}
    expected.update((f"CTRL_{name.upper()}", i) for i, name in enumerate(CONTROL))
    expected.update((f"STEP_{name.upper()}", flag_bit(name)) for name in FLAGS)
    got = {key: [tuple(x) for x in c[key]] if key == "RADIX_LEVELS" and key in c else c.get(key)
           for key in expected}
    wrong = {key: (got[key], value) for key, value in expected.items() if got[key] != value}
    if wrong:
        raise ImportError("epi_kernels._C was built for another kernel ABI than this package "
                          f"(a stale build?): {', '.join(f'{k}={g!r}, expected {e!r}' for k, (g, e) in wrong.items())}")
