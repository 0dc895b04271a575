// EPI_HD marks functions compiled for both the device and the host: the kernels call them, and the
// host harness (python/host_harness.cpp, compiled by the host C++ compiler) calls the very same
// functions on CPU buffers, so tests can hold them to the pure-PyTorch reference without a GPU.
#pragma once
#ifdef __CUDACC__
#define EPI_HD __host__ __device__ __forceinline__
#define EPI_UNROLL _Pragma("unroll")
#else
#define EPI_HD inline
#define EPI_UNROLL
#endif
