// The fused EPI-AdamW step: one pass over memory per element for all tensors of a launch.
//
// A block owns one CHUNK of one tensor; each thread owns groups of 8 consecutive elements (one
// mask byte, read and written by that thread alone), loaded with 16-byte vector loads when every
// column is aligned. Per group: step_group (element.h) does the score EMA, the moments and the
// masked parameter update in fp32; on a refresh step the new mask byte (from the tensor's threshold
// and tie cut) is written and counted; on the step before a refresh the new scores go into a
// shared-memory window histogram, flushed once per block with integer atomics. Every launch reads
// its scalars and the refresh/collect/skip decisions from device memory (the host only says what a
// step may do), so one captured launch serves every step.
#include "device_utils.cuh"

namespace epi {
namespace {

// What every thread of a block reads, kept in shared memory and re-read (volatile) where it is used
// instead of being held in registers across the loop: the 40 fp32 values of a group (48 with
// amsgrad) must fit in the register budget (FUSED_MIN_BLOCKS below) with everything else.
struct BlockState {
  const int64_t* row;  // the tensor's table row: column addresses
  int64_t first, end;  // elements [first, end) of the chunk that exist
  StepScalars scalars;
  int32_t tau, above, origin;  // above: the threshold from the tie cut on
  int cut;         // the tensor's tie cut as an offset in the chunk: below_cut(first, cut, CHUNK)
  int tensor;
  unsigned flags;  // in force (the control words applied)
  int vec;         // every column 16-byte aligned
};

// The tensor in column `col`, read from the table row at the point of use (a global address).
template <class T>
__device__ __forceinline__ T* column_at(const volatile BlockState& b, int col) {
  return column<T>(b.row, col);
}

// The stores of a group after step_group. Its index, size and alignment are read again from the
// block state rather than kept in registers through the arithmetic.
template <class P, class S, bool SCORE>
__device__ __forceinline__ void store_group(const volatile BlockState& b, int pass, const typename P::raw* pv,
                                            const typename P::raw* mv, const typename P::raw* vv,
                                            const typename P::raw* xv, const typename S::raw* sv, unsigned bits) {
  using PR = typename P::raw;
  using SR = typename S::raw;
  const int64_t i = b.first + 8 * (threadIdx.x + pass * THREADS);
  const int valid = group_size(b.end - i);
  const bool vec = b.vec;
  const unsigned f = b.flags;
  if (bits != (1u << valid) - 1) store8(column_at<PR>(b, COL_PARAM), pv, i, valid, vec);  // all isolated: nothing to write
  store8(column_at<PR>(b, COL_EXP_AVG), mv, i, valid, vec);
  store8(column_at<PR>(b, COL_EXP_AVG_SQ), vv, i, valid, vec);
  if (f & STEP_AMSGRAD) store8(column_at<PR>(b, COL_MAX_EXP_AVG_SQ), xv, i, valid, vec);
  if constexpr (SCORE) store8(column_at<SR>(b, COL_IMPORTANCE), sv, i, valid, vec);
  if (f & STEP_REFRESH) column_at<uint8_t>(b, COL_MASK)[i >> 3] = static_cast<uint8_t>(bits);
}

// Blocks per SM the fused step's register budget must allow (__launch_bounds__): 4 (64 registers a
// thread, 50 % occupancy) on sm_80/sm_90. ptxas for sm_100/sm_120 needs up to 78 registers for the
// same code and spills 16-32 bytes a thread into local memory at 64, so there the budget is 3 blocks
// (at most 85 registers; no spills): 37.5 % occupancy on sm_100 (2048 threads per SM), 50 % on
// sm_120 (1536). The grid does not depend on it: a block per chunk.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
constexpr int FUSED_MIN_BLOCKS = 3;
#else
constexpr int FUSED_MIN_BLOCKS = 4;
#endif

// SCORE: the importance column is a score EMA of its own; without it (STEP_V_SCORES, S = P) the
// scores are exp_avg_sq: no score is loaded or stored, and v's new values are what COLLECT counts.
template <class P, class S, bool HIST, bool SCORE>
__global__ void __launch_bounds__(THREADS, FUSED_MIN_BLOCKS)
fused_step_kernel(Tables t, unsigned flags, const float* scalars, const int32_t* control, const int32_t* tau_of, const int64_t* cut_of, const int32_t* above_of, const int32_t* origin_of,
                  int64_t* hist_out, int64_t* over_out, int64_t* counts) {
  using PR = typename P::raw;
  using SR = typename S::raw;
  __shared__ int hist[HIST ? WINDOW_BINS + 1 : 1];  // + 1: `over` (slot OVER), counted like a bin
  __shared__ BlockState state;
  if (control[CTRL_SKIP]) return;  // the whole launch: a uniform exit
  flags = flags_in_force(flags, control);
  const bool hist_on = HIST && (flags & STEP_COLLECT);  // uniform over the launch
  const bool amsgrad = flags & STEP_AMSGRAD, refresh = flags & STEP_REFRESH;
  const Chunk ch = load_chunk(t.table, t.chunks);
  if (threadIdx.x == 0) {
    state.row = ch.row;
    state.first = ch.first;
    state.end = ch.first + CHUNK < ch.numel ? ch.first + CHUNK : ch.numel;
    state.scalars = scalars_row(scalars + ch.tensor * SCALAR_COUNT);
    state.tau = refresh ? tau_of[ch.tensor] : KEY_NONE;
    state.above = !refresh ? KEY_NONE : above_of ? above_of[ch.tensor] : state.tau + 1;
    state.cut = below_cut(ch.first, refresh ? cut_of[ch.tensor] : TIE_NONE, static_cast<int>(CHUNK));
    state.origin = hist_on ? origin_of[ch.tensor] : 0;
    state.flags = flags;
    state.tensor = ch.tensor;
    const int64_t* r = ch.row;
    state.vec = aligned16(column<void>(r, COL_PARAM)) && aligned16(column<void>(r, COL_GRAD)) &&
                aligned16(column<void>(r, COL_EXP_AVG)) && aligned16(column<void>(r, COL_EXP_AVG_SQ)) &&
                aligned16(column<void>(r, COL_IMPORTANCE)) &&
                (!amsgrad || aligned16(column<void>(r, COL_MAX_EXP_AVG_SQ)));
  }
  if (hist_on) zero_shared(hist, WINDOW_BINS + 1);  // (its __syncthreads publishes `state` too)
  else __syncthreads();
  const volatile BlockState& b = state;

  int isolated_kept = 0;  // isolated + (kept << 16): at most 8 * CHUNK / THREADS = 256 each per thread
  // Every thread runs the same number of passes (the warp-level histogram needs all lanes).
#pragma unroll 1
  for (int pass = 0; pass < CHUNK / (8 * THREADS); ++pass) {
    const int64_t i = b.first + 8 * (threadIdx.x + pass * THREADS);
    const int valid = group_size(b.end - i);
    alignas(16) SR sv[8];
    if (valid > 0) {
      const bool vec = b.vec;
      const unsigned f = b.flags;
      int32_t keys[8];  // unused: recomputed from the stored scores below (fewer live registers)
      alignas(16) PR pv[8], gv[8], mv[8], vv[8], xv[8];
      // every load of the group before its first store (the compiler may not move loads across
      // stores to other columns: the addresses could alias)
      load8(pv, column_at<const PR>(b, COL_PARAM), i, valid, vec);
      load8(gv, column_at<const PR>(b, COL_GRAD), i, valid, vec);
      load8(mv, column_at<const PR>(b, COL_EXP_AVG), i, valid, vec);
      load8(vv, column_at<const PR>(b, COL_EXP_AVG_SQ), i, valid, vec);
      if (f & STEP_AMSGRAD) load8(xv, column_at<const PR>(b, COL_MAX_EXP_AVG_SQ), i, valid, vec);
      if constexpr (SCORE) load8(sv, column_at<const SR>(b, COL_IMPORTANCE), i, valid, vec);
      // the mask byte in force: on a refresh the new one (the tie cut as the number of this group's
      // lanes below it), counted at once, so that the old byte is not held through the arithmetic
      unsigned bits = column_at<const uint8_t>(b, COL_MASK)[i >> 3];
      if (f & STEP_REFRESH) {
        const int lanes = below_cut(8 * (static_cast<int>(threadIdx.x) + pass * THREADS), static_cast<int>(b.cut), 8);
        const unsigned old = bits;
        if constexpr (SCORE) bits = refresh_bits<S>(sv, valid, b.tau, b.above, lanes);
        else bits = refresh_bits<P>(vv, valid, b.tau, b.above, lanes);  // the start-of-step v
        isolated_kept += __popc(bits) + (__popc(bits & old) << 16);
      }
      step_group<P, S, SCORE>(pv, gv, mv, vv, xv, sv, bits, valid, b.scalars, f, keys);
      store_group<P, S, SCORE>(b, pass, pv, mv, vv, xv, sv, bits);
      if constexpr (!SCORE) {  // (S = P) the histogram below counts the new v
EPI_UNROLL
        for (int j = 0; j < 8; ++j) sv[j] = vv[j];
      }
    }
    if (HIST && (b.flags & STEP_COLLECT)) {  // uniform over the launch
      const int32_t origin = b.origin;
      const int valid = group_size(b.end - (b.first + 8 * (threadIdx.x + pass * THREADS)));
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int slot = window_slot(j < valid ? score_key(S::load(sv[j])) : 0, origin);
        warp_aggregated_increment(hist, slot);  // BELOW (-1) is not counted
      }
    }
  }
  // the tensor and the flags from the block state again: not held in registers through the loop
  const int64_t tensor = b.tensor;
  if (b.flags & STEP_REFRESH) {
    const int isolated = block_sum(isolated_kept & 0xFFFF), kept = block_sum(isolated_kept >> 16);
    if (threadIdx.x == 0 && (isolated || kept)) {
      add_count(counts + 2 * tensor, isolated);
      add_count(counts + 2 * tensor + 1, kept);
    }
  }
  if (HIST && (b.flags & STEP_COLLECT)) {
    flush_histogram(hist_out + tensor * WINDOW_BINS, hist, WINDOW_BINS);  // (syncs the block first)
    if (threadIdx.x == 0 && hist[OVER]) add_count(over_out + tensor, hist[OVER]);
  }
}

template <class P, class S, bool SCORE>
void launch(Tables t, unsigned flags, const StepInputs& in, cudaStream_t stream) {
  if (flags & STEP_COLLECT)
    fused_step_kernel<P, S, true, SCORE><<<t.programs, THREADS, 0, stream>>>(
        t, flags, in.scalars, in.control, in.tau, in.cut, in.above, in.origin, in.hist, in.over,
        in.counts);
  else
    fused_step_kernel<P, S, false, SCORE><<<t.programs, THREADS, 0, stream>>>(
        t, flags, in.scalars, in.control, in.tau, in.cut, in.above, in.origin, in.hist, in.over,
        in.counts);
}

template <class P>
void launch(DType score, Tables t, unsigned flags, const StepInputs& in, cudaStream_t stream) {
  if (flags & STEP_V_SCORES)
    launch<P, P, false>(t, flags, in, stream);  // the scores are exp_avg_sq: the param dtype
  else if (score == DTYPE_BF16)
    launch<P, BF16, true>(t, flags, in, stream);
  else
    launch<P, F32, true>(t, flags, in, stream);
}

}  // namespace

cudaError_t fused_step(Tables t, DType param, DType score, unsigned flags, const StepInputs& in, cudaStream_t stream) {
  if (t.programs <= 0) return cudaGetLastError();
  switch (param) {
    case DTYPE_BF16: launch<BF16>(score, t, flags, in, stream); break;
    case DTYPE_F16: launch<F16>(score, t, flags, in, stream); break;
    default: launch<F32>(score, t, flags, in, stream);
  }
  return cudaGetLastError();
}

}  // namespace epi
