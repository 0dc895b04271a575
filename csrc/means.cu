// scope="global" (epi_kernels/normalise.py defines it, bit for bit): each tensor's mean score, from
// exact integer sums of its keys' significands per exponent field, and the raw-key form of the
// group's threshold on mean-normalised keys, which the fused step applies.
#include "device_utils.cuh"

namespace epi {
namespace {

// A block adds its chunk's significands per exponent field in shared memory, then into the tensor's
// int64 sums with 64-bit integer atomics: the same sums in any order. Nothing where *gate is 0 (a
// capturable step that does not refresh).
template <class S>
__global__ void __launch_bounds__(THREADS)
exponent_sums_kernel(Tables t, const int32_t* gate, int64_t* sums_out) {
  __shared__ SharedSums sums;
  if (!*gate) return;
  const Chunk ch = load_chunk(t.table, t.chunks);
  for (int e = threadIdx.x; e < EXPONENTS; e += THREADS) sums.low[e] = sums.high[e] = 0;
  __syncthreads();
  for_each_score_key<S, false>(ch, 1.0f, [&](int32_t key) { add_significand(sums, key); });
  __syncthreads();
  unsigned long long* out = reinterpret_cast<unsigned long long*>(sums_out + static_cast<int64_t>(ch.tensor) * EXPONENTS);
  for (int e = threadIdx.x; e < EXPONENTS; e += THREADS) {
    const unsigned long long sum = static_cast<unsigned long long>(sums.high[e]) << 32 | sums.low[e];
    if (sum) atomicAdd(out + e, sum);
  }
}

// One thread per tensor: mean_of_sums, the fixed fp64 sequence.
__global__ void __launch_bounds__(THREADS)
mean_kernel(const int64_t* table, int tensors, const int64_t* sums, float* means) {
  const int t = blockIdx.x * THREADS + threadIdx.x;
  if (t < tensors)
    means[t] = mean_of_sums(sums + static_cast<int64_t>(t) * EXPONENTS, table[static_cast<int64_t>(t) * TABLE_WIDTH + COL_NUMEL]);
}

// One thread per tensor: the raw keys of the group threshold tau[0] (lo) and of tau[0] + 1 (hi).
__global__ void __launch_bounds__(THREADS)
raw_threshold_kernel(int tensors, const float* means, const int32_t* tau, int32_t* lo, int32_t* hi) {
  const int t = blockIdx.x * THREADS + threadIdx.x;
  if (t < tensors) {
    lo[t] = smallest_raw_key(means[t], tau[0]);
    hi[t] = smallest_raw_key(means[t], tau[0] + 1);
  }
}

int blocks_for(int tensors) { return (tensors + THREADS - 1) / THREADS; }

}  // namespace

cudaError_t score_means(Tables t, int tensors, DType score, const int32_t* gate, int64_t* sums, float* means,
                        cudaStream_t stream) {
  if (t.programs > 0)
    with_score_type(score, [&](auto s) {
      exponent_sums_kernel<decltype(s)><<<t.programs, THREADS, 0, stream>>>(t, gate, sums);
    });
  if (tensors > 0) mean_kernel<<<blocks_for(tensors), THREADS, 0, stream>>>(t.table, tensors, sums, means);
  return cudaGetLastError();
}

cudaError_t raw_thresholds(int tensors, const float* means, const int32_t* tau, int32_t* lo, int32_t* hi,
                           cudaStream_t stream) {
  if (tensors > 0) raw_threshold_kernel<<<blocks_for(tensors), THREADS, 0, stream>>>(tensors, means, tau, lo, hi);
  return cudaGetLastError();
}

}  // namespace epi
