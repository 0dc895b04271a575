// Per-element math of the fused step, for kernels and host harness alike.
//
// The order of operations is the one the Triton kernel and the eager reference use
// (epi_kernels/kernels/fused_step.py): every product, sum, quotient and square root is rounded
// separately (no fused multiply-add), math is fp32 whatever the storage dtype, and results are
// rounded to storage with round-to-nearest-even. The score therefore comes out bit-identical to
// the eager reference's, which keeps masks identical across backends.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"
#include "rounding.h"
#include "threshold_math.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

namespace epi {

// torch.maximum: NaN wins.
EPI_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// Storage dtypes: raw element type plus exact conversions to and from fp32.
struct F32 {
  using raw = float;
  EPI_HD static float load(float x) { return x; }
  EPI_HD static float store(float x) { return x; }
};
struct BF16 {
  using raw = uint16_t;
  EPI_HD static float load(uint16_t x) { return from_bits(static_cast<uint32_t>(x) << 16); }
  EPI_HD static uint16_t store(float x) {  // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u = float_bits(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
  }
};
struct F16 {
  using raw = uint16_t;
  EPI_HD static float load(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return from_bits(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
      float v = static_cast<float>(man) * 5.9604644775390625e-8f;
      return sign ? -v : v;
    }
    return from_bits(sign | ((exp + 112) << 23) | (man << 13));
#endif
  }
  EPI_HD static uint16_t store(float x) {  // round to nearest even (IEEE), as __float2half_rn
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(x));
#else
    uint32_t u = float_bits(x), sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00);  // NaN
    if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal multiple of 2^-24
      float v = from_bits(a) * 16777216.0f;  // exact scaling by 2^24
      uint32_t q = static_cast<uint32_t>(v);  // truncate, then round half to even
      float rest = v - static_cast<float>(q);
      if (rest > 0.5f || (rest == 0.5f && (q & 1))) ++q;
      return static_cast<uint16_t>(sign | q);
    }
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1) - (112u << 23);  // rebias, round at bit 13
    return static_cast<uint16_t>(sign | (r >> 13));
#endif
  }
};

// Per-step scalars of one tensor, read from device memory (float [T, SCALAR_COUNT], computed on the
// device from each tensor's step counter by epi_kernels.step_scalars; order: epi_kernels/abi.py SCALARS).
struct StepScalars {
  float decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, ibeta, one_minus_ibeta;
};
constexpr int SCALAR_COUNT = 9;

EPI_HD StepScalars scalars_row(const float* r) {
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]};
}

// Bit i is epi_kernels/abi.py FLAGS[i]. REFRESH and COLLECT say what the host allows this step to do;
// the control words in device memory say whether it does (a host-decided step passes words that
// agree, a capturable one sets both flags and lets the words decide).
enum StepFlags : unsigned {
  STEP_SQ = 1,        // score signal g*g (else |g|)
  STEP_MAXIMIZE = 2,
  STEP_AMSGRAD = 4,
  STEP_REFRESH = 8,   // set the mask from the start-of-step score against `tau` and the tie cut
  STEP_COLLECT = 16,  // count the new scores into the window histogram
  STEP_V_SCORES = 32, // the scores are exp_avg_sq itself (importance="exp_avg_sq"): no score EMA
};

// The control words of every launch (int32 [CONTROL_WORDS] in device memory; epi_kernels/abi.py
// CONTROL): whether this step refreshes, collects histograms, or is skipped whole (GradScaler found
// inf/NaN).
enum Control : int { CTRL_REFRESH = 0, CTRL_COLLECT = 1, CTRL_SKIP = 2, CONTROL_WORDS = 3 };

// The flags in force: REFRESH and COLLECT where both the flags and the control words allow them.
EPI_HD unsigned flags_in_force(unsigned flags, const int32_t* control) {
  if (!control[CTRL_REFRESH]) flags &= ~static_cast<unsigned>(STEP_REFRESH);
  if (!control[CTRL_COLLECT]) flags &= ~static_cast<unsigned>(STEP_COLLECT);
  return flags;
}

// The mask byte a refresh gives a group of eight elements (`valid` of them exist, bits >= valid
// clear) from their start-of-step scores: lane j is isolated iff its key >= tie_threshold(tau, above,
// j, lanes), with lanes = below_cut(first element of the group, the tensor's tie cut, 8)
// (threshold_math.h): one 32-bit compare per element.
template <class S>
EPI_HD unsigned refresh_bits(const typename S::raw* s, int valid, int32_t tau, int32_t above, int lanes) {
  unsigned out = 0;
EPI_UNROLL
  for (int j = 0; j < 8; ++j)
    if (j < valid) out |= static_cast<unsigned>(score_key(S::load(s[j])) >= tie_threshold(tau, above, j, lanes)) << j;
  return out;
}

// Eight consecutive elements (one mask byte): `valid` of them exist. `mask` is the mask byte in
// force for this step (on a refresh the new one, refresh_bits of the start-of-step scores). Updates
// the storage values in place and returns the keys of the new scores (0 for invalid lanes); lanes
// whose mask bit is set keep their parameter. Isolated parameters keep their raw bits, so writing
// them back unchanged is the same as not writing them. Without SCORE (STEP_V_SCORES) `s` is not
// touched and the keys are those of the new v (before the amsgrad maximum: the EMA, which decays).
template <class P, class S, bool SCORE, class Scalars>
EPI_HD void step_group(typename P::raw* p, const typename P::raw* g, typename P::raw* m, typename P::raw* v,
                       typename P::raw* vmax, typename S::raw* s, unsigned mask, int valid, Scalars& c,
                       unsigned flags, int32_t* keys) {
EPI_UNROLL
  for (int j = 0; j < 8; ++j) {
    keys[j] = 0;
    if (j >= valid) continue;
    float g32 = P::load(g[j]);
    if constexpr (SCORE) {
      float s32 = S::load(s[j]);
      float f = (flags & STEP_SQ) ? mul_rn(mul_rn(c.one_minus_ibeta, g32), g32) : mul_rn(c.one_minus_ibeta, fabsf(g32));
      s[j] = S::store(add_rn(mul_rn(s32, c.ibeta), f));
      keys[j] = score_key(S::load(s[j]));
    }
    if (flags & STEP_MAXIMIZE) g32 = -g32;
    float m32 = add_rn(P::load(m[j]), mul_rn(sub_rn(g32, P::load(m[j])), c.one_minus_beta1));
    float v32 = add_rn(mul_rn(P::load(v[j]), c.beta2), mul_rn(mul_rn(c.one_minus_beta2, g32), g32));
    m[j] = P::store(m32);
    v[j] = P::store(v32);
    if constexpr (!SCORE) keys[j] = score_key(P::load(v[j]));
    if (flags & STEP_AMSGRAD) {
      v32 = max_nan(P::load(vmax[j]), v32);
      vmax[j] = P::store(v32);
    }
    if (!((mask >> j) & 1)) {
      float denom = add_rn(div_rn(sqrt_rn(v32), c.bc2_sqrt), c.eps);
      p[j] = P::store(sub_rn(mul_rn(P::load(p[j]), c.decay), div_rn(mul_rn(c.step_size, m32), denom)));
    }
  }
}

}  // namespace epi
