// Threshold selection, one block per tensor: the window select (interpolated threshold or a
// repair flag) and the repair path's exact radix select over the stored scores.
#include "device_utils.cuh"

namespace epi {
namespace {

// select_bin (threshold_math.h) by a whole block: each thread sums its slice, a suffix scan gives
// the keys beyond each slice, and the one thread whose slice holds the k-th largest key
// (slice_holds_kth) runs select_bin on it. The result is returned to every thread. The host
// harness emulates this decomposition (python/host_harness.cpp, sliced_select_bin).
__device__ BinHit block_select(const int64_t* counts, int nbins, int64_t above, int64_t k) {
  __shared__ long long suffix[THREADS];
  __shared__ BinHit result;
  const int per = nbins / THREADS, lo = threadIdx.x * per;
  long long sum = 0;
  for (int j = 0; j < per; ++j) sum += counts[lo + j];
  suffix[threadIdx.x] = sum;
  if (threadIdx.x == 0) result = BinHit{-1, 0, 0};
  __syncthreads();
  for (int o = 1; o < THREADS; o <<= 1) {  // inclusive suffix sums
    long long add = threadIdx.x + o < THREADS ? suffix[threadIdx.x + o] : 0;
    __syncthreads();
    suffix[threadIdx.x] += add;
    __syncthreads();
  }
  const long long beyond = above + suffix[threadIdx.x] - sum;  // keys above this slice
  if (slice_holds_kth(beyond, sum, above, k)) {
    BinHit hit = select_bin(counts + lo, per, beyond, k);
    hit.bin += lo;
    result = hit;
  }
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(THREADS)
window_select_kernel(const int64_t* hist, const int64_t* over, const int32_t* origin, const int64_t* k,
                     int32_t* tau, int32_t* repair) {
  const int t = blockIdx.x;
  const BinHit hit = block_select(hist + static_cast<int64_t>(t) * WINDOW_BINS, WINDOW_BINS, over[t], k[t]);
  if (threadIdx.x == 0) window_finish(origin[t], hit, k[t], tau + t, repair + t);
}

// One radix digit: count it for the eligible keys whose higher digits equal the prefix so far.
template <class S>
__global__ void __launch_bounds__(THREADS)
radix_count_kernel(Tables t, int level, const int32_t* repair, const int32_t* prefix_of, int64_t* scratch) {
  __shared__ int hist[RADIX_BINS];
  const Chunk ch = load_chunk(t.table, t.chunks);
  if (!repair[ch.tensor]) return;
  const int32_t prefix = prefix_of[ch.tensor];
  const int nbins = 1 << radix_bits(level);
  zero_shared(hist, nbins);
  for_each_score_key<S>(ch, [&](int32_t key) { warp_aggregated_increment(hist, radix_digit(key, prefix, level)); });
  flush_histogram(scratch + static_cast<int64_t>(ch.tensor) * RADIX_BINS, hist, nbins);
}

// Choose this level's digit (k clipped to the eligible keys on the first level), append it to the
// prefix and clear the scratch row; the last level writes tau and clears the flag.
__global__ void __launch_bounds__(THREADS)
radix_select_kernel(int level, int64_t* scratch, int32_t* repair, int32_t* prefix, int64_t* need, int32_t* tau) {
  const int t = blockIdx.x;
  if (!repair[t]) return;
  int64_t* row = scratch + static_cast<int64_t>(t) * RADIX_BINS;
  const int nbins = 1 << radix_bits(level);
  int64_t k = need[t];
  if (level == 0) {
    long long total = 0;
    for (int b = threadIdx.x; b < nbins; b += THREADS) total += row[b];
    __shared__ long long eligible;
    total = block_sum(total);
    if (threadIdx.x == 0) eligible = total;
    __syncthreads();
    k = k < eligible ? k : eligible;
  }
  const BinHit hit = block_select(row, nbins, 0, k);
  for (int b = threadIdx.x; b < nbins; b += THREADS) row[b] = 0;
  if (threadIdx.x == 0) radix_finish(level, hit, prefix + t, need + t, tau + t, repair + t);
}

}  // namespace

cudaError_t window_select(int tensors, const int64_t* hist, const int64_t* over, const int32_t* origin,
                          const int64_t* k, int32_t* tau, int32_t* repair, cudaStream_t stream) {
  if (tensors > 0) window_select_kernel<<<tensors, THREADS, 0, stream>>>(hist, over, origin, k, tau, repair);
  return cudaGetLastError();
}

cudaError_t radix_repair(Tables t, int tensors, DType score, int32_t* repair, int32_t* prefix, int64_t* need,
                         int64_t* scratch, int32_t* tau, cudaStream_t stream) {
  for (int level = 0; level < RADIX_LEVELS && tensors > 0; ++level) {
    if (t.programs > 0) {
      if (score == DTYPE_BF16)
        radix_count_kernel<BF16><<<t.programs, THREADS, 0, stream>>>(t, level, repair, prefix, scratch);
      else
        radix_count_kernel<F32><<<t.programs, THREADS, 0, stream>>>(t, level, repair, prefix, scratch);
    }
    radix_select_kernel<<<tensors, THREADS, 0, stream>>>(level, scratch, repair, prefix, need, tau);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

}  // namespace epi
