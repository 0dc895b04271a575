// Window histograms of the stored scores, for tensors whose histogram the fused step did not
// collect on the step before a refresh (checkpoint loaded, no gradient then, or wanted alone), and
// for scope="global", whose keys are of the scores over their tensor's mean (one row per group).
#include "device_utils.cuh"

namespace epi {
namespace {

// MEAN: every tensor's keys over its mean into row 0 around origin[0]; else each into its own row.
template <class S, bool MEAN>
__global__ void __launch_bounds__(THREADS)
window_histogram_kernel(Tables t, const float* means, const int32_t* origin_of, int64_t* hist_out, int64_t* over_out) {
  __shared__ int hist[WINDOW_BINS];
  const Chunk ch = load_chunk(t.table, t.chunks);
  const int row = MEAN ? 0 : ch.tensor;
  const int32_t origin = origin_of[row];
  if (origin <= 0) return;  // no window: the repair path computes this threshold
  zero_shared(hist, WINDOW_BINS);
  int over = 0;
  for_each_score_key<S, MEAN>(ch, mean_of<MEAN>(means, ch.tensor),
                              [&](int32_t key) { count_in_window(hist, over, key, origin); });
  flush_histogram(hist_out + static_cast<int64_t>(row) * WINDOW_BINS, hist, WINDOW_BINS);
  over = block_sum(over);
  if (threadIdx.x == 0 && over) add_count(over_out + row, over);
}

}  // namespace

cudaError_t window_histogram(Tables t, DType score, const float* means, const int32_t* origin, int64_t* hist,
                             int64_t* over, cudaStream_t stream) {
  if (t.programs <= 0) return cudaGetLastError();
  with_score_type(score, [&](auto s) {
    using S = decltype(s);
    if (means)
      window_histogram_kernel<S, true><<<t.programs, THREADS, 0, stream>>>(t, means, origin, hist, over);
    else
      window_histogram_kernel<S, false><<<t.programs, THREADS, 0, stream>>>(t, means, origin, hist, over);
  });
  return cudaGetLastError();
}

}  // namespace epi
