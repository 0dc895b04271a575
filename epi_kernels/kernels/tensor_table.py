"""How one launch reaches many tensors: the address and chunk tables that
:mod:`epi_kernels.launch` builds (and documents), read from Triton; also the layout of a
capturable step's device inputs (control words, per-tensor scalars)."""
import triton
import triton.language as tl

from ..launch import COLUMNS, CONTROL, SCALAR_COUNT

PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, IMPORTANCE, MASK, NUMEL = (
    tl.constexpr(i) for i in range(len(COLUMNS)))
WIDTH = tl.constexpr(len(COLUMNS))
CTRL_REFRESH, CTRL_HIST, CTRL_SKIP = (tl.constexpr(CONTROL.index(w)) for w in ("refresh", "hist", "skip"))
SCALARS = tl.constexpr(SCALAR_COUNT)


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
