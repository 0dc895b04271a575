"""How one launch reaches many tensors: the address and chunk tables that
:mod:`epi_kernels.launch` builds (and documents), read from Triton."""
import triton
import triton.language as tl

from ..launch import COLUMNS

PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, IMPORTANCE, MASK, NUMEL = (
    tl.constexpr(i) for i in range(len(COLUMNS)))
WIDTH = tl.constexpr(len(COLUMNS))


@triton.jit
def load_chunk(table_ptr, chunk_ptr, CHUNK: tl.constexpr):
    """(tensor index, its table row pointer, first element, numel) of this program's chunk."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_ptr + 2 * pid)
    first = tl.load(chunk_ptr + 2 * pid + 1).to(tl.int64) * CHUNK
    row = table_ptr + tid * WIDTH
    return tid, row, first, tl.load(row + NUMEL)


@triton.jit
def column(row, col, DTYPE: tl.constexpr):
    """Typed pointer to the tensor in column `col` of a table row."""
    return tl.load(row + col).to(tl.pointer_type(DTYPE))
