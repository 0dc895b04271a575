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

// One radix digit: count it for the eligible keys whose higher digits equal the prefix so far, into
// the tensor's scratch row. MEAN (scope="global"): keys over the tensor's mean, the group's flag and
// prefix (entry 0).
template <class S, bool MEAN>
__global__ void __launch_bounds__(THREADS)
radix_count_kernel(Tables t, int level, const float* means, const int32_t* repair, const int32_t* prefix_of,
                   int64_t* scratch) {
  __shared__ int hist[RADIX_BINS];
  const Chunk ch = load_chunk(t.table, t.chunks);
  const int slot = MEAN ? 0 : ch.tensor;
  if (!repair[slot]) return;
  const int32_t prefix = prefix_of[slot];
  const int nbins = 1 << radix_bits(level);
  zero_shared(hist, nbins);
  for_each_score_key<S, MEAN>(ch, mean_of<MEAN>(means, ch.tensor),
                              [&](int32_t key) { warp_aggregated_increment(hist, radix_digit(key, prefix, level)); });
  flush_histogram(scratch + static_cast<int64_t>(ch.tensor) * RADIX_BINS, hist, nbins);
}

// scope="global": the group's digit counts (scratch row `tensors`) are the sum of the tensors' rows,
// which are cleared unless this is the last level (the tie rule then reads them). A thread per bin.
__global__ void __launch_bounds__(THREADS)
pool_digits_kernel(int tensors, int level, bool last, const int32_t* repair, int64_t* scratch) {
  const int b = blockIdx.x * THREADS + threadIdx.x;
  if (!repair[0] || b >= (1 << radix_bits(level))) return;
  long long total = 0;
  for (int t = 0; t < tensors; ++t) {
    int64_t* count = scratch + static_cast<int64_t>(t) * RADIX_BINS + b;
    total += *count;
    if (!last) *count = 0;
  }
  scratch[static_cast<int64_t>(tensors) * RADIX_BINS + b] = total;
}

// scope="global", one thread: the tie rule in tensor order (group_tie), from the group's flag and
// need (entry 0, left by the last level when the group needs a tie cut) and each tensor's count of
// keys equal to tau (its last-level scratch row at tau's digit). Leaves each tensor's own flag and
// need for the tie pass.
__global__ void group_ties_kernel(int tensors, const int32_t* tau, const int64_t* scratch, int32_t* repair,
                                  int64_t* need, int64_t* cut) {
  const bool flagged = repair[0];
  const int64_t wanted = need[0];
  const int digit = radix_digit(tau[0], tau[0], RADIX_LEVELS - 1);
  int64_t before = 0;
  for (int t = 0; t < tensors; ++t) {
    const int64_t tied = flagged ? scratch[static_cast<int64_t>(t) * RADIX_BINS + digit] : 0;
    repair[t] = flagged && group_tie(wanted, before, tied, need + t, cut + t);
    before += tied;
  }
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
template <class S, bool MEAN>
__global__ void __launch_bounds__(THREADS)
tie_count_kernel(Tables t, const float* means, const int32_t* repair, const int32_t* tau_of, int32_t* chunk_ties,
                 int32_t* first_program) {
  const Chunk ch = load_chunk(t.table, t.chunks);
  if (!repair[ch.tensor]) return;
  const int32_t tau = tau_of[MEAN ? 0 : ch.tensor];
  int tied = 0;
  for_each_score_key<S, MEAN>(ch, mean_of<MEAN>(means, ch.tensor), [&](int32_t key) { tied += key == tau; });
  tied = block_sum(tied);
  if (threadIdx.x == 0) {
    chunk_ties[blockIdx.x] = tied;
    if (ch.first == 0) first_program[ch.tensor] = blockIdx.x;
  }
}

template <class S, bool MEAN>
__global__ void __launch_bounds__(THREADS)
tie_find_kernel(const int64_t* table, const float* means, const int32_t* chunk_ties, const int32_t* first_program, int32_t* repair,
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
    const int32_t tau = tau_of[MEAN ? 0 : t];
    const float mean = mean_of<MEAN>(means, t);
    const int64_t end = (chunk + 1) * CHUNK < numel ? (chunk + 1) * CHUNK : numel;
    for (int64_t base = chunk * CHUNK; base < end; base += 8 * THREADS) {
      const int64_t i = base + 8 * threadIdx.x;
      const int valid = group_size(end - i);
      alignas(16) SR sv[8];
      int32_t keys[8];
      if (valid > 0) load8(sv, s, i, valid, vec);
#pragma unroll
      for (int j = 0; j < 8; ++j) keys[j] = j < valid ? stored_key<MEAN>(S::load(sv[j]), mean) : 0;
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

template <bool MEAN>
void launch_repair(Tables t, int tensors, DType score, const float* means, const int64_t* k, int32_t* repair,
                   int32_t* prefix, int64_t* need, int64_t* scratch, int32_t* tau, int64_t* cut, int32_t* ties,
                   cudaStream_t stream) {
  const int rows = MEAN ? 1 : tensors;  // selections: one per group or per tensor
  int64_t* select_rows = scratch + (MEAN ? static_cast<int64_t>(tensors) * RADIX_BINS : 0);
  for (int level = 0; level < RADIX_LEVELS; ++level) {
    if (t.programs > 0)
      with_score_type(score, [&](auto s) {
        radix_count_kernel<decltype(s), MEAN><<<t.programs, THREADS, 0, stream>>>(t, level, means, repair, prefix, scratch);
      });
    if (MEAN)
      pool_digits_kernel<<<RADIX_BINS / THREADS, THREADS, 0, stream>>>(tensors, level, level == RADIX_LEVELS - 1,
                                                                        repair, scratch);
    radix_select_kernel<<<rows, THREADS, 0, stream>>>(level, k, select_rows, repair, prefix, need, tau);
  }
  if (MEAN) group_ties_kernel<<<1, 1, 0, stream>>>(tensors, tau, scratch, repair, need, cut);
  int32_t *chunk_ties = ties, *first_program = ties + (t.programs > 0 ? t.programs : 0);  // the tie pass
  with_score_type(score, [&](auto s) {
    using S = decltype(s);
    if (t.programs > 0)
      tie_count_kernel<S, MEAN><<<t.programs, THREADS, 0, stream>>>(t, means, repair, tau, chunk_ties, first_program);
    tie_find_kernel<S, MEAN><<<tensors, THREADS, 0, stream>>>(t.table, means, chunk_ties, first_program, repair, need,
                                                               tau, cut);
  });
}

}  // namespace

cudaError_t window_select(int tensors, const int64_t* hist, const int64_t* over, const int32_t* origin,
                          const int64_t* k, int32_t* tau, int32_t* repair, cudaStream_t stream) {
  if (tensors > 0) window_select_kernel<<<tensors, THREADS, 0, stream>>>(hist, over, origin, k, tau, repair);
  return cudaGetLastError();
}

cudaError_t radix_repair(Tables t, int tensors, DType score, const float* means, const int64_t* k, int32_t* repair,
                         int32_t* prefix, int64_t* need, int64_t* scratch, int32_t* tau, int64_t* cut, int32_t* ties,
                         cudaStream_t stream) {
  if (tensors <= 0) return cudaGetLastError();
  if (means) launch_repair<true>(t, tensors, score, means, k, repair, prefix, need, scratch, tau, cut, ties, stream);
  else launch_repair<false>(t, tensors, score, means, k, repair, prefix, need, scratch, tau, cut, ties, stream);
  return cudaGetLastError();
}

}  // namespace epi
