"""How one launch reaches many tensors, read from Triton: the address and chunk tables that
:mod:`epi_kernels.launch` builds, the control words and per-tensor scalars every fused step reads,
and the step flags, all laid out by :mod:`epi_kernels.abi`."""
import triton
import triton.language as tl

from .. import abi

PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, IMPORTANCE, MASK, NUMEL = (
    tl.constexpr(abi.COLUMNS.index(c)) for c in abi.COLUMNS)
WIDTH = tl.constexpr(len(abi.COLUMNS))
CTRL_REFRESH, CTRL_COLLECT, CTRL_SKIP = (tl.constexpr(abi.CONTROL.index(w)) for w in ("refresh", "collect", "skip"))
SCALARS = tl.constexpr(len(abi.SCALARS))
SQ, MAXIMIZE, REFRESH, COLLECT = (tl.constexpr(abi.flag_bit(f)) for f in ("sq", "maximize", "refresh", "collect"))


@triton.jit
def load_chunk(table_ptr, chunk_ptr, CHUNK: tl.constexpr):
    """(tensor index, its table row pointer, first element, numel) of this program's chunk; the
    index is int64, so that offsets like tid * WINDOW_BINS cannot overflow."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_ptr + 2 * pid).to(tl.int64)
    first = tl.load(chunk_ptr + 2 * pid + 1).to(tl.int64) * CHUNK
    row = table_ptr + tid * WIDTH
    return tid, row, first, tl.load(row + NUMEL)


@triton.jit
def column(row, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Typed pointer to the tensor in column `col` of a table row. ALIGNED: the host checked that
    the address is a multiple of 16 bytes (launch.Launch.aligned); the compiler cannot see that in
    an address read from memory, and needs it for 128-bit vector accesses."""
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr
