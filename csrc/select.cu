// Threshold selection, one block per tensor: the window select (interpolated threshold or a
// repair flag), the repair path's exact radix select over the stored scores, and its tie pass.
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
// prefix and clear the scratch row; the last level writes tau and clears the flag, unless the tensor
// needs a tie cut (radix_finish).
__global__ void __launch_bounds__(THREADS)
radix_select_kernel(int level, const int64_t* k_of, int64_t* scratch, int32_t* repair, int32_t* prefix, int64_t* need,
                    int32_t* tau) {
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
  if (threadIdx.x == 0) radix_finish(level, hit, k_of[t], prefix + t, need + t, tau + t, repair + t);
}

// The tie pass, for the tensors still flagged after the last radix level (their exact threshold is
// shared by more keys than needs_tie_cut allows): cut[t] = 1 + the flat index of the need[t]-th key
// equal to tau[t]. Two launches, both returning at once for unflagged tensors. First every chunk
// counts its keys equal to tau (chunk_ties[program]; the tensor's chunk 0 also records its program
// in first_program[t]), in parallel over the whole tensor; then one block per tensor scans its
// chunks' counts (block prefix scans, THREADS chunks at a time) for the chunk holding the need-th
// tied key, and that chunk's scores a tile of 8 * THREADS elements at a time (a group of 8 per
// thread, as the fused step) for the group, then tied_lanes / nth_lane for the lane. The host harness
// emulates both (python/host_harness.cpp).
template <class S>
__global__ void __launch_bounds__(THREADS)
tie_count_kernel(Tables t, const int32_t* repair, const int32_t* tau_of, int32_t* chunk_ties, int32_t* first_program) {
  const Chunk ch = load_chunk(t.table, t.chunks);
  if (!repair[ch.tensor]) return;
  const int32_t tau = tau_of[ch.tensor];
  int tied = 0;
  for_each_score_key<S>(ch, [&](int32_t key) { tied += key == tau; });
  tied = block_sum(tied);
  if (threadIdx.x == 0) {
    chunk_ties[blockIdx.x] = tied;
    if (ch.first == 0) first_program[ch.tensor] = blockIdx.x;
  }
}

template <class S>
__global__ void __launch_bounds__(THREADS)
tie_find_kernel(const int64_t* table, const int32_t* chunk_ties, const int32_t* first_program, int32_t* repair,
                const int64_t* need_of, const int32_t* tau_of, int64_t* cut) {
  using SR = typename S::raw;
  __shared__ long long found_chunk, found_left;
  const int t = blockIdx.x;
  if (!repair[t]) return;
  const int64_t* row = table + static_cast<int64_t>(t) * TABLE_WIDTH;
  const int64_t numel = row[COL_NUMEL], chunks = (numel + CHUNK - 1) / CHUNK;
  const int32_t* ties = chunk_ties + first_program[t];  // the tensor's chunks are consecutive programs
  if (threadIdx.x == 0) found_chunk = -1;
  int64_t left = need_of[t];  // tied keys still to pass, in flat order (>= 1)
  for (int64_t base = 0; base < chunks; base += THREADS) {
    const int64_t c = base + threadIdx.x;
    const int count = c < chunks ? ties[c] : 0;
    int total;
    const int scan = block_scan(count, total);
    if (left <= total) {  // uniform: this tile of chunks holds it
      if (scan - count < left && left <= scan) found_chunk = c, found_left = left - (scan - count);
      break;
    }
    left -= total;
  }
  __syncthreads();
  const int64_t chunk = found_chunk;
  if (chunk >= 0) {
    left = found_left;
    const SR* s = column<const SR>(row, COL_IMPORTANCE);
    const bool vec = aligned16(s);
    const int32_t tau = tau_of[t];
    const int64_t end = (chunk + 1) * CHUNK < numel ? (chunk + 1) * CHUNK : numel;
    for (int64_t base = chunk * CHUNK; base < end; base += 8 * THREADS) {
      const int64_t i = base + 8 * threadIdx.x;
      const int valid = group_size(end - i);
      alignas(16) SR sv[8];
      int32_t keys[8];
      if (valid > 0) load8(sv, s, i, valid, vec);
#pragma unroll
      for (int j = 0; j < 8; ++j) keys[j] = j < valid ? score_key(S::load(sv[j])) : 0;
      const unsigned tied = tied_lanes(keys, valid, tau);
      const int count = __popc(tied);
      int total;
      const int scan = block_scan(count, total);
      if (left <= total) {  // uniform: this tile holds it
        const int before = scan - count;
        if (before < left && left <= scan) cut[t] = i + nth_lane(tied, static_cast<int>(left - before)) + 1;
        break;
      }
      left -= total;
    }
  }
  __syncthreads();  // every thread has read the flag
  if (threadIdx.x == 0) repair[t] = 0;
}

}  // namespace

cudaError_t window_select(int tensors, const int64_t* hist, const int64_t* over, const int32_t* origin,
                          const int64_t* k, int32_t* tau, int32_t* repair, cudaStream_t stream) {
  if (tensors > 0) window_select_kernel<<<tensors, THREADS, 0, stream>>>(hist, over, origin, k, tau, repair);
  return cudaGetLastError();
}

cudaError_t radix_repair(Tables t, int tensors, DType score, const int64_t* k, int32_t* repair, int32_t* prefix,
                         int64_t* need, int64_t* scratch, int32_t* tau, int64_t* cut, int32_t* ties,
                         cudaStream_t stream) {
  for (int level = 0; level < RADIX_LEVELS && tensors > 0; ++level) {
    if (t.programs > 0) {
      if (score == DTYPE_BF16)
        radix_count_kernel<BF16><<<t.programs, THREADS, 0, stream>>>(t, level, repair, prefix, scratch);
      else if (score == DTYPE_F16)  // importance="exp_avg_sq" with fp16 params
        radix_count_kernel<F16><<<t.programs, THREADS, 0, stream>>>(t, level, repair, prefix, scratch);
      else
        radix_count_kernel<F32><<<t.programs, THREADS, 0, stream>>>(t, level, repair, prefix, scratch);
    }
    radix_select_kernel<<<tensors, THREADS, 0, stream>>>(level, k, scratch, repair, prefix, need, tau);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (tensors > 0) {  // the tie pass
    int32_t *chunk_ties = ties, *first_program = ties + (t.programs > 0 ? t.programs : 0);
    if (score == DTYPE_BF16) {
      if (t.programs > 0) tie_count_kernel<BF16><<<t.programs, THREADS, 0, stream>>>(t, repair, tau, chunk_ties, first_program);
      tie_find_kernel<BF16><<<tensors, THREADS, 0, stream>>>(t.table, chunk_ties, first_program, repair, need, tau, cut);
    } else if (score == DTYPE_F16) {
      if (t.programs > 0) tie_count_kernel<F16><<<t.programs, THREADS, 0, stream>>>(t, repair, tau, chunk_ties, first_program);
      tie_find_kernel<F16><<<tensors, THREADS, 0, stream>>>(t.table, chunk_ties, first_program, repair, need, tau, cut);
    } else {
      if (t.programs > 0) tie_count_kernel<F32><<<t.programs, THREADS, 0, stream>>>(t, repair, tau, chunk_ties, first_program);
      tie_find_kernel<F32><<<tensors, THREADS, 0, stream>>>(t.table, chunk_ties, first_program, repair, need, tau, cut);
    }
  }
  return cudaGetLastError();
}

}  // namespace epi
