// Device helpers shared by the kernels: the tensor and chunk tables, 16-byte vector loads of the
// eight elements behind one mask byte, block reductions and warp-aggregated histogram increments.
#pragma once
#include <cstdint>

#include "epi_kernels.h"

namespace epi {

constexpr unsigned FULL = 0xFFFFFFFFu;

// The chunk a block works on: tensor index, table row, first element and the tensor's numel.
struct Chunk {
  int tensor;
  const int64_t* row;
  int64_t first, numel;
};

__device__ __forceinline__ Chunk load_chunk(const int64_t* table, const int32_t* chunks) {
  Chunk c;
  c.tensor = chunks[2 * blockIdx.x];
  c.row = table + static_cast<int64_t>(c.tensor) * TABLE_WIDTH;
  c.first = static_cast<int64_t>(chunks[2 * blockIdx.x + 1]) * CHUNK;
  c.numel = c.row[COL_NUMEL];
  return c;
}

// Elements of a group of 8 that exist when `left` elements of the tensor remain from its start.
__device__ __forceinline__ int group_size(int64_t left) { return left <= 0 ? 0 : left >= 8 ? 8 : static_cast<int>(left); }

// The tensor in column `col` of a table row. The address comes from memory, so without the
// assumption the compiler would access it through generic loads and stores (LD/ST, which check the
// address space at run time) instead of global ones (LDG/STG). Only for columns that are in use:
// an unused column holds 0, which is not a global address.
template <class T>
__device__ __forceinline__ T* column(const int64_t* row, int col) {
  T* ptr = reinterpret_cast<T*>(row[col]);
  __builtin_assume(__isGlobal(ptr));
  return ptr;
}

// Elements [i, i + 8) of `base`: two or one 16-byte loads when the group is whole and `vec`
// (every column 16-byte aligned), else scalar loads of the lanes that exist (zeros beyond). Plain
// loads, not __ldg: the step writes p, m, v and s in the same kernel, and the read-only path is
// only promised for data no thread writes.
template <class T>
__device__ __forceinline__ void load8(T* out, const T* base, int64_t i, int valid, bool vec) {
  if (vec && valid == 8) {
#pragma unroll
    for (int j = 0; j < 8; j += 16 / sizeof(T))
      *reinterpret_cast<uint4*>(out + j) = *reinterpret_cast<const uint4*>(base + i + j);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = j < valid ? base[i + j] : T(0);
  }
}

template <class T>
__device__ __forceinline__ void store8(T* base, const T* in, int64_t i, int valid, bool vec) {
  if (vec && valid == 8) {
#pragma unroll
    for (int j = 0; j < 8; j += 16 / sizeof(T))
      *reinterpret_cast<uint4*>(base + i + j) = *reinterpret_cast<const uint4*>(in + j);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < valid) base[i + j] = in[j];
  }
}

// Calls visit(key) for each of the 8 lanes of every group of the chunk's stored scores, with key 0
// for lanes past the tensor's end (ineligible), so that every thread of a warp makes the same calls.
// The keys are stored_key<MEAN>: with MEAN (scope="global") of the scores over the tensor's `mean`.
template <class S, bool MEAN, class Visit>
__device__ __forceinline__ void for_each_score_key(const Chunk& ch, float mean, Visit&& visit) {
  using SR = typename S::raw;
  const SR* s = column<const SR>(ch.row, COL_IMPORTANCE);
  const bool vec = (reinterpret_cast<uintptr_t>(s) & 15) == 0;
  const int64_t end = ch.first + CHUNK < ch.numel ? ch.first + CHUNK : ch.numel;
  for (int64_t i = ch.first + 8 * threadIdx.x; i < ch.first + CHUNK; i += 8 * THREADS) {
    const int valid = group_size(end - i);
    alignas(16) SR sv[8];
    if (valid > 0) load8(sv, s, i, valid, vec);
#pragma unroll
    for (int j = 0; j < 8; ++j) visit(j < valid ? stored_key<MEAN>(S::load(sv[j]), mean) : 0);
  }
}

// A tensor's mean for stored_key<MEAN> (scope="global"), and 1 (unused) for its own selection.
template <bool MEAN>
__device__ __forceinline__ float mean_of(const float* means, int tensor) { return MEAN ? means[tensor] : 1.0f; }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Sum over the block; every thread must call it. The result is valid in thread 0. int for a block's
// own counts (at most CHUNK), long long for sums of global int64 counts.
template <class T>
__device__ __forceinline__ T block_sum(T x) {
  __shared__ T warp_sums[THREADS / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(FULL, x, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = x;
  __syncthreads();
  x = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0;
  if (threadIdx.x < 32) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(FULL, x, o);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return x;
}

// Inclusive prefix sum of x over the block, in thread order, and the block's `total` (valid in every
// thread); every thread must call it.
__device__ __forceinline__ int block_scan(int x, int& total) {
  __shared__ int warp_sums[THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(FULL, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  total = 0;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) {
    const int y = warp_sums[w];
    x += w < warp ? y : 0;
    total += y;
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return x;
}

// hist[bin] += 1 for every lane with bin >= 0: lanes of a warp with the same bin add their count
// in one shared-memory atomic (scores near the threshold fall into few bins). All lanes call it.
__device__ __forceinline__ void warp_aggregated_increment(int* hist, int bin) {
  if (!__any_sync(FULL, bin >= 0)) return;
  unsigned peers = __match_any_sync(FULL, bin);
  if (bin >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + bin, __popc(peers));
}

// A block's exponent sums in shared memory as two 32-bit words per field (a chunk's sum of one field
// reaches 2^37): 32-bit shared atomics are native, 64-bit ones a compare-and-swap loop.
struct SharedSums {
  unsigned low[EXPONENTS], high[EXPONENTS];
};

// sums[key_field(key)] += key_significand(key). The lanes of a warp with the same field add their
// significands first (each below 2^24: 32 of them fit 32 bits), so one shared-memory atomic serves
// them all (scores cluster in few exponents); a carry out of the low word goes to the high word.
// All lanes call it.
__device__ __forceinline__ void add_significand(SharedSums& sums, int32_t key) {
  const int field = key_field(key);
  const unsigned peers = __match_any_sync(FULL, field);
  const unsigned total = __reduce_add_sync(peers, key_significand(key));  // the lanes of one field
  if ((threadIdx.x & 31) == __ffs(peers) - 1 && total) {
    const unsigned before = atomicAdd(sums.low + field, total);
    if (before + total < before) atomicAdd(sums.high + field, 1u);
  }
}

// Count a key into a block's window histogram (shared) or, above the window, into `over`.
__device__ __forceinline__ void count_in_window(int* hist, int& over, int32_t key, int32_t origin) {
  const int slot = window_slot(key, origin);
  over += slot == OVER;
  warp_aggregated_increment(hist, slot == OVER ? BELOW : slot);
}

__device__ __forceinline__ void zero_shared(int* hist, int n) {
  for (int b = threadIdx.x; b < n; b += THREADS) hist[b] = 0;
  __syncthreads();
}

// *dst += x for a global int64 counter and a non-negative 32-bit block count: the 64-bit atomic on
// unsigned long long gives the right two's-complement sum.
__device__ __forceinline__ void add_count(int64_t* dst, int x) {
  atomicAdd(reinterpret_cast<unsigned long long*>(dst), static_cast<unsigned long long>(static_cast<unsigned>(x)));
}

// Add a block's shared histogram (32-bit: a block counts at most CHUNK keys) into a global int64
// one: integer atomics give the same sums in any order (deterministic); empty bins are skipped.
__device__ __forceinline__ void flush_histogram(int64_t* dst, const int* hist, int n) {
  __syncthreads();
  for (int b = threadIdx.x; b < n; b += THREADS)
    if (hist[b]) add_count(dst + b, hist[b]);
}

// f(S{}) with S the storage type of the score dtype code (F16: importance="exp_avg_sq" with fp16
// params), for the launchers of kernels templated on it.
template <class F>
void with_score_type(DType score, F&& f) {
  if (score == DTYPE_BF16) f(BF16{});
  else if (score == DTYPE_F16) f(F16{});
  else f(F32{});
}

}  // namespace epi
