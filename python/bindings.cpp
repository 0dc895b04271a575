// pybind11 module epi_kernels._C: thin wrappers of csrc/epi_kernels.h (stub, being filled in).
#include <pybind11/pybind11.h>
#include <stdexcept>
#include <string>

#include "epi_kernels.h"

namespace py = pybind11;

namespace {
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("epi_kernels._C.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of epi_kernels (fused EPI-AdamW step, window histogram, threshold select)";
  m.def("device_count", [] {
    int n = 0;
    check(epi::device_count(&n), "device_count");
    return n;
  }, "Number of CUDA devices; raises RuntimeError with the CUDA message when there is no driver/GPU.");
}
