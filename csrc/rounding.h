// Separately rounded fp32 operations, for kernels and host harness alike: on the device each is
// the intrinsic of its IEEE rounding (nvcc would otherwise contract a*b+c into an fma, and
// -prec-div/-prec-sqrt could pick approximations); on the host, IEEE arithmetic compiled with
// -ffp-contract=off (CMakeLists.txt).
#pragma once

#include "hd.h"

namespace epi {

// Separately rounded fp32 operations (nvcc would otherwise contract a*b+c into an fma).
EPI_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
EPI_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
EPI_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
EPI_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
EPI_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

}  // namespace epi
