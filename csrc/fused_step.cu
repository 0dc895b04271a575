// The fused EPI-AdamW step: one pass over memory per element for all tensors of a launch.
//
// A block owns one CHUNK of one tensor; each thread owns groups of 8 consecutive elements (one
// mask byte, read and written by that thread alone), loaded with 16-byte vector loads when every
// column is aligned. Per group: step_group (element.h) does the score EMA, the moments and the
// masked parameter update in fp32; on a refresh step the new mask byte is written and counted;
// on the step before a refresh the new scores go into a shared-memory window histogram, flushed
// once per block with integer atomics. Capturable launches (STEP_DEVICE) read the scalars and the
// refresh/histogram/skip decisions from device memory, so one captured launch serves every step.
#include "device_utils.cuh"

namespace epi {
namespace {

template <class P, class S, bool HIST>
__global__ void __launch_bounds__(THREADS)
fused_step_kernel(Tables t, unsigned flags, StepScalars host_scalars, const float* device_scalars,
                  const int32_t* control, const int32_t* tau_of, const int32_t* origin_of, int64_t* hist_out,
                  int64_t* over_out, int64_t* counts) {
  using PR = typename P::raw;
  using SR = typename S::raw;
  __shared__ int hist[HIST ? WINDOW_BINS : 1];
  if ((flags & STEP_DEVICE) && control[CTRL_SKIP]) return;  // the whole launch: a uniform exit
  flags = flags_in_force(flags, control);
  const bool hist_on = HIST && (flags & STEP_HIST);  // uniform over the launch
  const Chunk ch = load_chunk(t.table, t.chunks);
  const StepScalars c = (flags & STEP_DEVICE) ? scalars_row(device_scalars + ch.tensor * SCALAR_COUNT) : host_scalars;
  PR* p = column<PR>(ch.row, COL_PARAM);
  const PR* g = column<const PR>(ch.row, COL_GRAD);
  PR* m = column<PR>(ch.row, COL_EXP_AVG);
  PR* v = column<PR>(ch.row, COL_EXP_AVG_SQ);
  SR* s = column<SR>(ch.row, COL_IMPORTANCE);
  uint8_t* mask = column<uint8_t>(ch.row, COL_MASK);
  const bool amsgrad = flags & STEP_AMSGRAD, refresh = flags & STEP_REFRESH;
  PR* vmax = column<PR>(ch.row, amsgrad ? COL_MAX_EXP_AVG_SQ : COL_EXP_AVG_SQ);  // v: a global address, unused
  const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) && aligned16(s) &&
                   (!amsgrad || aligned16(vmax));
  const int32_t tau = refresh ? tau_of[ch.tensor] : KEY_NONE;
  const int32_t origin = hist_on ? origin_of[ch.tensor] : 0;
  if (hist_on) zero_shared(hist, WINDOW_BINS);

  int isolated = 0, kept = 0, over = 0;
  const int64_t end = ch.first + CHUNK < ch.numel ? ch.first + CHUNK : ch.numel;
  // Every thread runs the same number of passes (the warp-level histogram needs all lanes).
  for (int64_t i = ch.first + 8 * threadIdx.x; i < ch.first + CHUNK; i += 8 * THREADS) {
    const int valid = group_size(end - i);
    int32_t keys[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (valid > 0) {
      alignas(16) PR pv[8], gv[8], mv[8], vv[8], xv[8];
      alignas(16) SR sv[8];
      load8(pv, p, i, valid, vec);
      load8(gv, g, i, valid, vec);
      load8(mv, m, i, valid, vec);
      load8(vv, v, i, valid, vec);
      if (amsgrad) load8(xv, vmax, i, valid, vec);
      load8(sv, s, i, valid, vec);
      const unsigned old = mask[i >> 3];
      const unsigned bits = step_group<P, S>(pv, gv, mv, vv, xv, sv, old, valid, tau, c, flags, keys);
      if (bits != (1u << valid) - 1) store8(p, pv, i, valid, vec);  // all isolated: nothing to write
      store8(m, mv, i, valid, vec);
      store8(v, vv, i, valid, vec);
      if (amsgrad) store8(vmax, xv, i, valid, vec);
      store8(s, sv, i, valid, vec);
      if (refresh) {
        mask[i >> 3] = static_cast<uint8_t>(bits);
        isolated += __popc(bits);
        kept += __popc(bits & old);
      }
    }
    if (hist_on) {
#pragma unroll
      for (int j = 0; j < 8; ++j) count_in_window(hist, over, keys[j], origin);
    }
  }
  if (refresh) {
    isolated = block_sum(isolated);
    kept = block_sum(kept);
    if (threadIdx.x == 0 && (isolated || kept)) {
      add_count(counts + 2 * static_cast<int64_t>(ch.tensor), isolated);
      add_count(counts + 2 * static_cast<int64_t>(ch.tensor) + 1, kept);
    }
  }
  if (hist_on) {
    flush_histogram(hist_out + static_cast<int64_t>(ch.tensor) * WINDOW_BINS, hist, WINDOW_BINS);
    over = block_sum(over);
    if (threadIdx.x == 0 && over) add_count(over_out + ch.tensor, over);
  }
}

template <class P, class S>
void launch(Tables t, unsigned flags, const StepInputs& in, cudaStream_t stream) {
  if (flags & STEP_HIST)
    fused_step_kernel<P, S, true><<<t.programs, THREADS, 0, stream>>>(
        t, flags, in.scalars, in.device_scalars, in.control, in.tau, in.origin, in.hist, in.over, in.counts);
  else
    fused_step_kernel<P, S, false><<<t.programs, THREADS, 0, stream>>>(
        t, flags, in.scalars, in.device_scalars, in.control, in.tau, in.origin, in.hist, in.over, in.counts);
}

template <class P>
void launch(DType score, Tables t, unsigned flags, const StepInputs& in, cudaStream_t stream) {
  if (score == DTYPE_BF16)
    launch<P, BF16>(t, flags, in, stream);
  else
    launch<P, F32>(t, flags, in, stream);
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
