"""How one launch reaches many tensors: a table of raw addresses and a table of chunks.

Tensor table, int64 [T, 8]: per tensor the addresses of param, grad, exp_avg, exp_avg_sq,
max_exp_avg_sq (0 without amsgrad), importance and packed mask, then its numel.
Chunk table, int32 [P, 2]: per program the tensor index and the chunk index within that tensor;
a chunk is CHUNK consecutive elements (logical order), so no two programs share a mask byte.
"""
import torch
import triton
import triton.language as tl

COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "importance", "mask", "numel")
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, IMPORTANCE, MASK, NUMEL = (
    tl.constexpr(i) for i in range(len(COLUMNS)))
WIDTH = tl.constexpr(len(COLUMNS))


def chunk_rows(numels: list[int], chunk: int) -> list[tuple[int, int]]:
    """(tensor index, chunk index) for every chunk of every tensor; empty tensors get none."""
    return [(t, c) for t, n in enumerate(numels) for c in range((n + chunk - 1) // chunk)]


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


def to_device(rows, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host-built table on `device` without a host sync: pinned memory, asynchronous copy
    (the caching host allocator keeps the buffer alive until the copy has run)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
