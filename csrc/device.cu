// Device discovery and error reporting shared by every launch wrapper.
#include "epi_kernels.h"

namespace epi {

cudaError_t device_count(int* count) { return cudaGetDeviceCount(count); }

}  // namespace epi
