// The integer steps of the threshold engine, for kernels and host harness alike.
//
// epi_kernels/threshold.py documents the algorithm and is the reference: keys are the fp32 bit
// patterns of |score| (0 for zero and non-finite scores), a window of WINDOW_BINS bins of
// BIN_WIDTH keys starts one octave below the previous threshold, the bin holding the k-th largest
// key is found by a scan from the top, the threshold is interpolated inside it with integer math,
// and tensors the window cannot answer get an exact MSB-first radix select. The constants must
// equal epi_kernels/abi.py's: _C.constants() exposes them and the package checks them when it loads
// the extension (epi_kernels/kernel_sets/cuda_kernels.py).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#include "hd.h"
#include "rounding.h"

namespace epi {

constexpr int32_t KEY_NONE = 0x7F800000;  // key of +inf: no eligible key reaches it
constexpr int64_t TIE_NONE = INT64_MAX;    // tie cut that cuts nothing: every key equal to tau is isolated
constexpr int MANTISSA_BITS = 10;
constexpr int WINDOW_OCTAVES = 4;
constexpr int BIN_SHIFT = 23 - MANTISSA_BITS;
constexpr int32_t BIN_WIDTH = 1 << BIN_SHIFT;
constexpr int WINDOW_BINS = WINDOW_OCTAVES << MANTISSA_BITS;
constexpr int32_t WINDOW_KEYS = WINDOW_BINS << BIN_SHIFT;  // keys spanned by the window (2^25)

// Repair digits, most significant first: (shift, bits) of the 31-bit key. Any exact radix split
// gives the same integer as threshold.radix_thresholds; 11/10/10 bits keep the scratch histogram of
// a tensor at 2048 counters.
constexpr int RADIX_LEVELS = 3;
EPI_HD constexpr int radix_shift(int level) { return level == 0 ? 20 : level == 1 ? 10 : 0; }
EPI_HD constexpr int radix_bits(int level) { return level == 0 ? 11 : 10; }
constexpr int RADIX_BINS = 1 << 11;  // scratch counters per tensor

EPI_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

EPI_HD float from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// threshold.score_keys for one fp32 score.
EPI_HD int32_t score_key(float s) {
  int32_t bits = static_cast<int32_t>(float_bits(s) & 0x7FFFFFFFu);
  return bits >= KEY_NONE ? 0 : bits;
}

// threshold.window_origin: one octave below the anchor, bin aligned, at least BIN_WIDTH; 0 means
// "no window" (no previous threshold), which sends the tensor to the repair path.
EPI_HD int32_t window_origin(int32_t anchor) {
  if (anchor >= KEY_NONE) return 0;
  int32_t origin = ((anchor - (1 << 23)) >> BIN_SHIFT) << BIN_SHIFT;
  return origin < BIN_WIDTH ? BIN_WIDTH : origin;
}

// Where a key goes in the window histogram of `origin`: a bin in [0, WINDOW_BINS), OVER for an
// eligible key at or above the window end, or BELOW (not counted: only the k-th largest matters).
constexpr int BELOW = -1, OVER = WINDOW_BINS;
EPI_HD int window_slot(int32_t key, int32_t origin) {
  int32_t rel = key - origin;  // origin >= BIN_WIDTH > 0, so rel >= 0 implies an eligible key
  if (key <= 0 || origin <= 0 || rel < 0) return BELOW;
  return rel >= WINDOW_KEYS ? OVER : rel >> BIN_SHIFT;
}

// Radix digit of `key` at `level`, or -1 when the key is ineligible or its higher digits differ from
// those chosen so far (`prefix`).
EPI_HD int radix_digit(int32_t key, int32_t prefix, int level) {
  int high = radix_shift(level) + radix_bits(level);
  if (key <= 0 || (key >> high) != (prefix >> high)) return -1;
  return (key >> radix_shift(level)) & ((1 << radix_bits(level)) - 1);
}

struct BinHit {
  int bin;       // -1: the k-th largest is not in these bins
  int64_t need;  // keys still to take from `bin`
  int64_t count; // keys in `bin`
};

// threshold.select_bin over counts[0, n) with `above` keys beyond the last bin: scan from the top
// for the highest bin b with C(b) = above + sum(counts[b:]) >= k. The select kernel runs it on one
// thread's slice of bins, with `above` the keys beyond that slice.
EPI_HD BinHit select_bin(const int64_t* counts, int n, int64_t above, int64_t k) {
  if (k < 1 || above >= k) return {-1, 0, 0};
  int64_t run = above;
  for (int b = n - 1; b >= 0; --b) {
    int64_t c = counts[b];
    if (run + c >= k) return {b, k - run, c};
    run += c;
  }
  return {-1, 0, 0};
}

// A block scans counts[0, nbins) in slices, one per thread (select.cu): the slice holding the k-th
// largest key is the one with fewer than k keys beyond it (`beyond`, including `above`) and at
// least k counting its own `sum`.
EPI_HD bool slice_holds_kth(int64_t beyond, int64_t sum, int64_t above, int64_t k) {
  return k >= 1 && above < k && beyond < k && beyond + sum >= k;
}

// threshold.tolerance: the largest count error accepted from interpolation, max(k / 200, 4).
constexpr int64_t TOLERANCE_DIVISOR = 200, TOLERANCE_MIN = 4;
EPI_HD int64_t tolerance(int64_t k) {
  return k / TOLERANCE_DIVISOR > TOLERANCE_MIN ? k / TOLERANCE_DIVISOR : TOLERANCE_MIN;
}

// threshold.window_threshold after select_bin: the interpolated threshold, or KEY_NONE when the
// window cannot answer (no window, k-th largest outside it, or a bin too coarse) and the tensor
// needs the repair path.
EPI_HD int32_t window_tau(int32_t origin, BinHit hit, int64_t k) {
  if (origin <= 0 || hit.bin < 0 || hit.count - 1 > tolerance(k)) return KEY_NONE;
  int64_t bin_hi = static_cast<int64_t>(origin) + (static_cast<int64_t>(hit.bin + 1) << BIN_SHIFT);
  int64_t step_down = (hit.need * BIN_WIDTH + hit.count - 1) / hit.count;  // ceil
  return static_cast<int32_t>(bin_hi - step_down);
}

// The window select of one tensor: its threshold, or KEY_NONE and a repair flag (k >= 1).
EPI_HD void window_finish(int32_t origin, BinHit hit, int64_t k, int32_t* tau, int32_t* repair) {
  *tau = window_tau(origin, hit, k);
  *repair = k >= 1 && *tau == KEY_NONE;
}

// threshold.needs_tie_cut in the repair's terms: after its last level, `count` keys equal the exact
// threshold and the top k (`k` as given, not clipped) takes `need` of them, so `key >= tau` would
// select count - need keys more than k. (With k clipped to the eligible keys, need == count.)
EPI_HD bool needs_tie_cut(int64_t k, int64_t need, int64_t count) { return count - need > tolerance(k); }

// One repair level of one tensor, after select_bin on its digit counts: append the digit to the
// prefix; with no eligible key isolate nothing; after the last digit the prefix is the threshold,
// and the flag stays set (for the tie pass) when the tensor needs a tie cut, with `need` the number
// of keys equal to the threshold that it isolates. `k` is the tensor's k, before any clipping.
EPI_HD void radix_finish(int level, BinHit hit, int64_t k, int32_t* prefix, int64_t* need, int32_t* tau,
                         int32_t* repair) {
  *prefix |= hit.bin << radix_shift(level);
  *need = hit.need;
  if (hit.bin < 0) {
    *tau = KEY_NONE;
    *repair = 0;
  } else if (level == RADIX_LEVELS - 1) {
    *tau = *prefix;
    *repair = needs_tie_cut(k, hit.need, hit.count);
  }
}

// scope="global"'s tie rule (threshold.tie_cuts) for one tensor, in tensor order, after the group's
// repair found that `wanted` of the keys equal to its threshold complete the top k: `before` of the
// tied keys lie in earlier tensors, `tied` in this one. Returns whether the tensor needs a tie cut
// (then *need is the number of its tied keys to isolate); a tensor whose tied keys are all isolated
// keeps `cut` as it is (TIE_NONE), one with none isolated gets cut 0.
EPI_HD bool group_tie(int64_t wanted, int64_t before, int64_t tied, int64_t* need, int64_t* cut) {
  const int64_t left = wanted - before;
  if (left <= 0) *cut = 0;
  *need = left;
  return left > 0 && left < tied;
}

// The refresh's rule for element i (flat index in its tensor) under threshold tau, tie cut `cut`
// and `above`: isolated iff key >= tie_threshold(tau, above, i, cut). For a tensor's own selection
// above = tau + 1 (tau <= KEY_NONE: no overflow), so key > tau, or key == tau and i < cut; for
// scope="global" tau and above are the tensor's raw thresholds lo and hi (smallest_raw_key).
// cut = TIE_NONE gives `key >= tau`. `I`: int64_t for element indices, int for lanes within a group
// (below_cut: 32-bit compares in the fused step).
template <class I>
EPI_HD int32_t tie_threshold(int32_t tau, int32_t above, I i, I cut) { return i >= cut ? above : tau; }

// scope="global" (epi_kernels/normalise.py defines it): each tensor's scores are divided by its
// mean, the mean of its eligible scores computed from exact integer sums per exponent field.
constexpr int EXPONENTS = 256;  // one sum per fp32 exponent field (255, non-finite, stays 0)

// The key a selection compares: of the score itself, or with MEAN (scope="global") of the score
// over its tensor's mean, one IEEE division (0/0 and s/0 are non-finite, so a mean of 0 makes every key
// ineligible).
template <bool MEAN>
EPI_HD int32_t stored_key(float s, float mean) { return score_key(MEAN ? div_rn(s, mean) : s); }

// A key's exponent field and significand: the score is significand * 2^(max(field, 1) - 150).
EPI_HD int key_field(int32_t key) { return key >> 23; }
EPI_HD uint32_t key_significand(int32_t key) {
  return static_cast<uint32_t>(key & 0x7FFFFF) | (key_field(key) > 0 ? 0x800000u : 0u);
}

// normalise.mean_of_sums: the fp64 sum of sums[e] * 2^(max(e, 1) - 150) for e = 0..254 in that order
// (each product is exact, so a contracted multiply-add rounds the same), one fp64 division by the
// tensor's numel, rounding to fp32; 0 for an empty tensor.
EPI_HD float mean_of_sums(const int64_t* sums, int64_t numel) {
  double total = 0.0;
  for (int e = 0; e < EXPONENTS - 1; ++e) total += static_cast<double>(sums[e]) * ldexp(1.0, (e > 1 ? e : 1) - 150);
  return numel > 0 ? static_cast<float>(total / static_cast<double>(numel)) : 0.0f;
}

// The smallest raw key r >= 1 whose quotient over `mean` has a key >= target (KEY_NONE if none:
// target >= KEY_NONE, or mean <= 0). Division by a positive mean is monotone, so key(s / mean) >=
// target exactly when score_key(s) >= that r: the fused step compares raw keys. A 31-step binary
// search with the selection's own division; an overflowing quotient counts as reaching every target
// (no quotient of a tensor's own scores overflows: it stays below twice the tensor's size).
EPI_HD int32_t smallest_raw_key(float mean, int32_t target) {
  int32_t lo = 1, hi = KEY_NONE;  // the answer lies in [lo, hi]
  for (int step = 0; step < 31; ++step) {
    const int32_t mid = lo + (hi - lo) / 2;
    const bool reached = static_cast<int32_t>(float_bits(div_rn(from_bits(static_cast<uint32_t>(mid)), mean)) & 0x7FFFFFFFu) >= target;
    hi = reached ? mid : hi;
    lo = reached ? lo : mid + 1;
  }
  return mean > 0.0f && target < KEY_NONE ? hi : KEY_NONE;
}

// How many of the n elements starting at index `first` lie below the cut: clamp(cut - first, 0, n).
// For the group of 8 starting at `first` and j in [0, 8), tie_threshold(tau, above, first + j, cut) ==
// tie_threshold(tau, above, j, below_cut(first, cut, 8)): the fused step compares lane numbers (32 bits)
// per element, not indices. below_cut(o, below_cut(f, cut, n), 8) == below_cut(f + o, cut, 8) for
// 0 <= o <= n - 8: a chunk's cut is kept as a 32-bit offset. `I`: int64_t or int.
template <class I>
EPI_HD int below_cut(I first, I cut, int n) {
  return cut <= first ? 0 : cut - first >= n ? n : static_cast<int>(cut - first);
}

// The tie pass: bit j set for each of the `valid` lanes of a group whose key equals tau.
EPI_HD unsigned tied_lanes(const int32_t* keys, int valid, int32_t tau) {
  unsigned bits = 0;
EPI_UNROLL
  for (int j = 0; j < 8; ++j) bits |= static_cast<unsigned>(j < valid && keys[j] == tau) << j;
  return bits;
}

// The lane of the r-th (1-based) set bit of `bits`, which holds at least r.
EPI_HD int nth_lane(unsigned bits, int r) {
  int j = 0;
  for (; j < 8; ++j) {
    r -= (bits >> j) & 1;
    if (r == 0) break;
  }
  return j;
}

}  // namespace epi
