// Window histograms of the stored scores, for tensors whose histogram the fused step did not
// collect on the step before a refresh (checkpoint loaded, no gradient then, or wanted alone).
#include "device_utils.cuh"

namespace epi {
namespace {

template <class S>
__global__ void __launch_bounds__(THREADS)
window_histogram_kernel(Tables t, const int32_t* origin_of, int64_t* hist_out, int64_t* over_out) {
  __shared__ int hist[WINDOW_BINS];
  const Chunk ch = load_chunk(t.table, t.chunks);
  const int32_t origin = origin_of[ch.tensor];
  if (origin <= 0) return;  // no window: the repair path computes this tensor's threshold
  zero_shared(hist, WINDOW_BINS);
  int over = 0;
  for_each_score_key<S>(ch, [&](int32_t key) { count_in_window(hist, over, key, origin); });
  flush_histogram(hist_out + static_cast<int64_t>(ch.tensor) * WINDOW_BINS, hist, WINDOW_BINS);
  over = block_sum(over);
  if (threadIdx.x == 0 && over) add_count(over_out + ch.tensor, over);
}

}  // namespace

cudaError_t window_histogram(Tables t, DType score, const int32_t* origin, int64_t* hist, int64_t* over,
                             cudaStream_t stream) {
  if (t.programs <= 0) return cudaGetLastError();
  if (score == DTYPE_BF16)
    window_histogram_kernel<BF16><<<t.programs, THREADS, 0, stream>>>(t, origin, hist, over);
  else if (score == DTYPE_F16)  // importance="exp_avg_sq" with fp16 params
    window_histogram_kernel<F16><<<t.programs, THREADS, 0, stream>>>(t, origin, hist, over);
  else
    window_histogram_kernel<F32><<<t.programs, THREADS, 0, stream>>>(t, origin, hist, over);
  return cudaGetLastError();
}

}  // namespace epi
