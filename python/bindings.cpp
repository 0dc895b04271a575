// pybind11 module epi_kernels._C: thin wrappers of the launch functions in csrc/epi_kernels.h.
// Tensors arrive as raw device addresses (int), the stream as its cudaStream_t address (int), so no
// torch header is needed. Pointer types follow csrc/epi_kernels.h (int64 counts and tie cuts, int32
// thresholds, flags and origins). Every wrapper raises RuntimeError with the CUDA error name and message
// when a launch fails (no driver, no device, bad configuration): never a silent no-op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "addresses.h"
#include "epi_kernels.h"
#include "host_harness.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("epi_kernels._C.") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

cudaStream_t stream_of(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }

epi::Tables tables(uintptr_t table, uintptr_t chunks, int programs) {
  return epi::Tables{ptr<const int64_t>(table), ptr<const int32_t>(chunks), programs};
}

epi::DType dtype(int code) {
  if (code < epi::DTYPE_F32 || code > epi::DTYPE_F16) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<epi::DType>(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of epi_kernels: fused EPI-AdamW step, window histogram, threshold select and repair";

  m.def("device_count", [] {
    int n = 0;
    check(epi::device_count(&n), "device_count");
    return n;
  }, "Number of CUDA devices; RuntimeError with the CUDA message when there is no driver or device.");

  m.def("cuda_versions", [] {
    int runtime = 0, driver = 0;
    check(epi::cuda_versions(&runtime, &driver), "cuda_versions");
    return py::make_tuple(runtime, driver);
  }, "(CUDA runtime version built in, newest CUDA version the driver supports; 0: no driver), e.g. (13000, 12080).");

  m.def("constants", [] {
    py::dict d;
    d["KEY_NONE"] = epi::KEY_NONE;
    d["TIE_NONE"] = epi::TIE_NONE;
    d["MANTISSA_BITS"] = epi::MANTISSA_BITS;
    d["WINDOW_OCTAVES"] = epi::WINDOW_OCTAVES;
    d["BIN_SHIFT"] = epi::BIN_SHIFT;
    d["BIN_WIDTH"] = epi::BIN_WIDTH;
    d["WINDOW_BINS"] = epi::WINDOW_BINS;
    d["RADIX_BINS"] = epi::RADIX_BINS;
    d["TOLERANCE_DIVISOR"] = epi::TOLERANCE_DIVISOR;
    d["TOLERANCE_MIN"] = epi::TOLERANCE_MIN;
    d["THREADS"] = epi::THREADS;
    py::list levels;
    for (int l = 0; l < epi::RADIX_LEVELS; ++l) levels.append(py::make_tuple(epi::radix_shift(l), epi::radix_bits(l)));
    d["RADIX_LEVELS"] = levels;
    d["CHUNK"] = epi::CHUNK;
    d["TABLE_WIDTH"] = epi::TABLE_WIDTH;
    d["DTYPE_F32"] = static_cast<int>(epi::DTYPE_F32);
    d["DTYPE_BF16"] = static_cast<int>(epi::DTYPE_BF16);
    d["DTYPE_F16"] = static_cast<int>(epi::DTYPE_F16);
    d["STEP_SQ"] = static_cast<int>(epi::STEP_SQ);
    d["STEP_MAXIMIZE"] = static_cast<int>(epi::STEP_MAXIMIZE);
    d["STEP_AMSGRAD"] = static_cast<int>(epi::STEP_AMSGRAD);
    d["STEP_REFRESH"] = static_cast<int>(epi::STEP_REFRESH);
    d["STEP_COLLECT"] = static_cast<int>(epi::STEP_COLLECT);
    d["STEP_V_SCORES"] = static_cast<int>(epi::STEP_V_SCORES);
    d["SCALAR_COUNT"] = epi::SCALAR_COUNT;
    d["CTRL_REFRESH"] = static_cast<int>(epi::CTRL_REFRESH);
    d["CTRL_COLLECT"] = static_cast<int>(epi::CTRL_COLLECT);
    d["CTRL_SKIP"] = static_cast<int>(epi::CTRL_SKIP);
    d["CONTROL_WORDS"] = static_cast<int>(epi::CONTROL_WORDS);
    return d;
  }, "The constants the kernels were compiled with (epi_kernels.abi is checked against them on load).");

  m.def("fused_step", [](uintptr_t table, uintptr_t chunks, int programs, int param_dtype, int score_dtype,
                         unsigned flags, uintptr_t scalars, uintptr_t control, uintptr_t tau, uintptr_t cut,
                         uintptr_t above, uintptr_t origin, uintptr_t hist, uintptr_t over, uintptr_t counts, uintptr_t stream) {
    check(epi::fused_step(tables(table, chunks, programs), dtype(param_dtype), dtype(score_dtype), flags,
                          step_inputs(scalars, control, tau, cut, above, origin, hist, over, counts),
                          stream_of(stream)),
          "fused_step");
  }, "The fused EPI-AdamW step over a launch group (see csrc/epi_kernels.h).",
        py::arg("table"), py::arg("chunks"), py::arg("programs"), py::arg("param_dtype"), py::arg("score_dtype"),
        py::arg("flags"), py::arg("scalars"), py::arg("control"), py::arg("tau"),
        py::arg("cut"), py::arg("above"), py::arg("origin"), py::arg("hist"), py::arg("over"), py::arg("counts"), py::arg("stream"));

  m.def("window_histogram", [](uintptr_t table, uintptr_t chunks, int programs, int score_dtype, uintptr_t means,
                               uintptr_t origin, uintptr_t hist, uintptr_t over, uintptr_t stream) {
    check(epi::window_histogram(tables(table, chunks, programs), dtype(score_dtype), ptr<const float>(means),
                                ptr<const int32_t>(origin), ptr<int64_t>(hist), ptr<int64_t>(over), stream_of(stream)),
          "window_histogram");
  }, "Window histograms of the stored scores (means != 0: of the scores over their tensor's mean, one row).",
        py::arg("table"), py::arg("chunks"), py::arg("programs"), py::arg("score_dtype"), py::arg("means"),
        py::arg("origin"), py::arg("hist"), py::arg("over"), py::arg("stream"));

  m.def("score_means", [](uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype, uintptr_t gate,
                          uintptr_t sums, uintptr_t means, uintptr_t stream) {
    check(epi::score_means(tables(table, chunks, programs), tensors, dtype(score_dtype), ptr<const int32_t>(gate),
                           ptr<int64_t>(sums), ptr<float>(means), stream_of(stream)),
          "score_means");
  }, "scope='global': each tensor's exponent sums and mean score.", py::arg("table"), py::arg("chunks"),
        py::arg("programs"), py::arg("tensors"), py::arg("score_dtype"), py::arg("gate"), py::arg("sums"),
        py::arg("means"), py::arg("stream"));

  m.def("raw_thresholds", [](int tensors, uintptr_t means, uintptr_t tau, uintptr_t lo, uintptr_t hi, uintptr_t stream) {
    check(epi::raw_thresholds(tensors, ptr<const float>(means), ptr<const int32_t>(tau), ptr<int32_t>(lo),
                              ptr<int32_t>(hi), stream_of(stream)),
          "raw_thresholds");
  }, "scope='global': each tensor's raw keys for the group threshold (lo) and above it (hi).", py::arg("tensors"),
        py::arg("means"), py::arg("tau"), py::arg("lo"), py::arg("hi"), py::arg("stream"));

  m.def("window_select", [](int tensors, uintptr_t hist, uintptr_t over, uintptr_t origin, uintptr_t k, uintptr_t tau,
                            uintptr_t repair, uintptr_t stream) {
    check(epi::window_select(tensors, ptr<const int64_t>(hist), ptr<const int64_t>(over), ptr<const int32_t>(origin),
                             ptr<const int64_t>(k), ptr<int32_t>(tau), ptr<int32_t>(repair), stream_of(stream)),
          "window_select");
  }, "Thresholds from window histograms, or repair flags.", py::arg("tensors"), py::arg("hist"), py::arg("over"),
        py::arg("origin"), py::arg("k"), py::arg("tau"), py::arg("repair"), py::arg("stream"));

  m.def("radix_repair", [](uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype,
                           uintptr_t means, uintptr_t k, uintptr_t repair, uintptr_t prefix, uintptr_t need,
                           uintptr_t scratch, uintptr_t tau, uintptr_t cut, uintptr_t ties, uintptr_t stream) {
    check(epi::radix_repair(tables(table, chunks, programs), tensors, dtype(score_dtype), ptr<const float>(means),
                            ptr<const int64_t>(k), ptr<int32_t>(repair), ptr<int32_t>(prefix), ptr<int64_t>(need),
                            ptr<int64_t>(scratch), ptr<int32_t>(tau), ptr<int64_t>(cut), ptr<int32_t>(ties),
                            stream_of(stream)),
          "radix_repair");
  }, "Exact thresholds of the flagged tensors (radix select over the stored scores), then their tie cuts "
     "(means != 0: one selection over the scores over their tensor's mean).",
        py::arg("table"), py::arg("chunks"), py::arg("programs"), py::arg("tensors"), py::arg("score_dtype"),
        py::arg("means"), py::arg("k"), py::arg("repair"), py::arg("prefix"), py::arg("need"), py::arg("scratch"),
        py::arg("tau"), py::arg("cut"), py::arg("ties"), py::arg("stream"));

  py::module_ host = m.def_submodule("host", "The __host__ __device__ element and threshold functions run on CPU buffers (test harness)");
  bind_host_harness(host);
}
