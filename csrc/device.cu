// Device discovery and error reporting shared by every launch wrapper.
#include "epi_kernels.h"

namespace epi {

cudaError_t device_count(int* count) { return cudaGetDeviceCount(count); }

cudaError_t cuda_versions(int* runtime, int* driver) {
  const cudaError_t err = cudaRuntimeGetVersion(runtime);  // the static runtime's own: needs no driver
  return err != cudaSuccess ? err : cudaDriverGetVersion(driver);  // 0 where no driver is installed
}

}  // namespace epi
