// The C++ API of the CUDA backend: raw device pointers, sizes, scalars and a stream.
// No torch or Python headers: python/bindings.cpp wraps these for epi_kernels._C.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace epi {

cudaError_t device_count(int* count);

}  // namespace epi
