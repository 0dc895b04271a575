// Host harness: the launch functions of csrc/epi_kernels.h emulated on the CPU, one block
// after another, over the same tensor and chunk tables (addresses of CPU tensors). Each block does
// what its CUDA block does with the same __host__ __device__ functions (element.h, threshold_math.h);
// only the parallel decomposition (vector loads, shared-memory histograms, block scans) is left
// out. Run through epi_kernels.step_driver, this is the CUDA backend minus the GPU, so the tests
// hold its arithmetic to the pure-PyTorch reference on machines without one. Compiled with
// -ffp-contract=off: no multiply-add is fused here either.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "host_harness.h"

#include "addresses.h"
#include "epi_kernels.h"

namespace py = pybind11;

namespace {

struct HostChunk {
  int tensor;
  const int64_t* row;
  int64_t first, end;  // elements [first, end) of the tensor
};

HostChunk chunk(uintptr_t table, uintptr_t chunks, int program) {
  const int32_t* c = ptr<const int32_t>(chunks) + 2 * program;
  const int64_t* row = ptr<const int64_t>(table) + static_cast<int64_t>(c[0]) * epi::TABLE_WIDTH;
  const int64_t first = static_cast<int64_t>(c[1]) * epi::CHUNK;
  const int64_t numel = row[epi::COL_NUMEL];
  return {c[0], row, first, first + epi::CHUNK < numel ? first + epi::CHUNK : numel};
}

template <class T>
T* column(const HostChunk& c, int col) { return reinterpret_cast<T*>(c.row[col]); }

void count_window(int32_t key, int32_t origin, int64_t* hist, int64_t* over) {
  const int slot = epi::window_slot(key, origin);
  if (slot == epi::OVER) ++*over;
  else if (slot >= 0) ++hist[slot];
}

template <class P, class S, bool SCORE>
void fused_step(uintptr_t table, uintptr_t chunks, int programs, unsigned flags, const epi::StepInputs& in) {
  using PR = typename P::raw;
  using SR = typename S::raw;
  if (in.control[epi::CTRL_SKIP]) return;
  flags = epi::flags_in_force(flags, in.control);
  const int32_t *tau = in.tau, *above = in.above, *origin = in.origin;
  const int64_t* cut = in.cut;
  int64_t *hist = in.hist, *over = in.over, *counts = in.counts;
  for (int b = 0; b < programs; ++b) {
    const HostChunk c = chunk(table, chunks, b);
    const epi::StepScalars sc = epi::scalars_row(in.scalars + c.tensor * epi::SCALAR_COUNT);
    PR* vmax = (flags & epi::STEP_AMSGRAD) ? column<PR>(c, epi::COL_MAX_EXP_AVG_SQ) : nullptr;
    uint8_t* mask = column<uint8_t>(c, epi::COL_MASK);
    const bool refresh = flags & epi::STEP_REFRESH;
    const int32_t t_tau = refresh ? tau[c.tensor] : epi::KEY_NONE;
    const int32_t t_above = !refresh ? epi::KEY_NONE : above ? above[c.tensor] : t_tau + 1;
    // the tie cut as an offset in the chunk, then as lanes of each group (fused_step.cu's BlockState)
    const int chunk_cut = epi::below_cut(c.first, refresh ? cut[c.tensor] : epi::TIE_NONE,
                                         static_cast<int>(epi::CHUNK));
    for (int64_t i = c.first; i < c.end; i += 8) {
      const int valid = c.end - i < 8 ? static_cast<int>(c.end - i) : 8;
      int32_t keys[8];
      const unsigned old = mask[i >> 3];
      SR* s = column<SR>(c, epi::COL_IMPORTANCE) + i;
      const int lanes = epi::below_cut(static_cast<int>(i - c.first), chunk_cut, 8);
      const unsigned bits = refresh ? epi::refresh_bits<S>(s, valid, t_tau, t_above, lanes) : old;
      epi::step_group<P, S, SCORE>(column<PR>(c, epi::COL_PARAM) + i, column<const PR>(c, epi::COL_GRAD) + i,
                            column<PR>(c, epi::COL_EXP_AVG) + i, column<PR>(c, epi::COL_EXP_AVG_SQ) + i,
                            vmax ? vmax + i : nullptr, s, bits, valid, sc, flags, keys);
      if (refresh) {
        mask[i >> 3] = static_cast<uint8_t>(bits);
        counts[2 * c.tensor] += __builtin_popcount(bits);
        counts[2 * c.tensor + 1] += __builtin_popcount(bits & old);
      }
      if (flags & epi::STEP_COLLECT)
        for (int j = 0; j < valid; ++j)
          count_window(keys[j], origin[c.tensor], hist + static_cast<int64_t>(c.tensor) * epi::WINDOW_BINS,
                       over + c.tensor);
    }
  }
}

template <class P>
void fused_step(int score_dtype, uintptr_t table, uintptr_t chunks, int programs, unsigned flags,
                const epi::StepInputs& in) {
  // STEP_V_SCORES: the importance column is exp_avg_sq (the param dtype), read for refreshes only
  if (flags & epi::STEP_V_SCORES) fused_step<P, P, false>(table, chunks, programs, flags, in);
  else if (score_dtype == epi::DTYPE_BF16) fused_step<P, epi::BF16, true>(table, chunks, programs, flags, in);
  else fused_step<P, epi::F32, true>(table, chunks, programs, flags, in);
}

template <class S>
float score_at(const HostChunk& c, int64_t i) { return S::load(column<const typename S::raw>(c, epi::COL_IMPORTANCE)[i]); }

float score(int score_dtype, const HostChunk& c, int64_t i) {
  if (score_dtype == epi::DTYPE_BF16) return score_at<epi::BF16>(c, i);
  if (score_dtype == epi::DTYPE_F16) return score_at<epi::F16>(c, i);  // importance="exp_avg_sq", fp16 params
  return score_at<epi::F32>(c, i);
}

// The key a kernel compares for element i: stored_key<MEAN> with MEAN where `means` is given
// (scope="global": the score over its tensor's mean).
int32_t key(int score_dtype, const HostChunk& c, int64_t i, const float* means) {
  const float s = score(score_dtype, c, i);
  return means ? epi::stored_key<true>(s, means[c.tensor]) : epi::stored_key<false>(s, 1.0f);
}

// With `means`, every tensor's keys into row 0 around origin[0] (histogram.cu).
void window_histogram(uintptr_t table, uintptr_t chunks, int programs, int score_dtype, const float* means,
                      const int32_t* origin, int64_t* hist, int64_t* over) {
  for (int b = 0; b < programs; ++b) {
    const HostChunk c = chunk(table, chunks, b);
    const int row = means ? 0 : c.tensor;
    if (origin[row] <= 0) continue;
    for (int64_t i = c.first; i < c.end; ++i)
      count_window(key(score_dtype, c, i, means), origin[row], hist + static_cast<int64_t>(row) * epi::WINDOW_BINS,
                   over + row);
  }
}

// means.cu: exponent sums chunk by chunk (where *gate), then each tensor's mean_of_sums.
void score_means(uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype, const int32_t* gate,
                 int64_t* sums, float* means) {
  for (int b = 0; b < programs && *gate; ++b) {
    const HostChunk c = chunk(table, chunks, b);
    for (int64_t i = c.first; i < c.end; ++i) {
      const int32_t k = key(score_dtype, c, i, nullptr);
      sums[static_cast<int64_t>(c.tensor) * epi::EXPONENTS + epi::key_field(k)] += epi::key_significand(k);
    }
  }
  const int64_t* rows = ptr<const int64_t>(table);
  for (int t = 0; t < tensors; ++t)
    means[t] = epi::mean_of_sums(sums + static_cast<int64_t>(t) * epi::EXPONENTS,
                                 rows[static_cast<int64_t>(t) * epi::TABLE_WIDTH + epi::COL_NUMEL]);
}

// select_bin as a block of THREADS threads computes it (select.cu): equal slices, each thread
// asking slice_holds_kth of its own; exactly one may answer (more would race on the result).
epi::BinHit sliced_select_bin(const int64_t* counts, int nbins, int64_t above, int64_t k) {
  const int per = nbins / epi::THREADS;
  int64_t beyond = above;
  epi::BinHit out{-1, 0, 0};
  int holders = 0;
  for (int t = epi::THREADS - 1; t >= 0; --t) {
    int64_t sum = 0;
    for (int j = 0; j < per; ++j) sum += counts[t * per + j];
    if (epi::slice_holds_kth(beyond, sum, above, k)) {
      out = epi::select_bin(counts + t * per, per, beyond, k);
      out.bin += t * per;
      ++holders;
    }
    beyond += sum;
  }
  if (holders > 1) throw std::logic_error("sliced_select_bin: " + std::to_string(holders) + " slices claim the k-th key");
  return out;
}

void window_select(int tensors, const int64_t* hist, const int64_t* over, const int32_t* origin, const int64_t* k,
                   int32_t* tau, int32_t* repair) {
  for (int t = 0; t < tensors; ++t)
    epi::window_finish(origin[t], sliced_select_bin(hist + static_cast<int64_t>(t) * epi::WINDOW_BINS, epi::WINDOW_BINS,
                                         over[t], k[t]),
                       k[t], tau + t, repair + t);
}

// The tie pass (select.cu). tie_count_kernel: per program (chunk) of a flagged tensor, its keys equal
// to tau, and the tensor's first program.
void tie_count(uintptr_t table, uintptr_t chunks, int programs, int score_dtype, const float* means,
               const int32_t* repair, const int32_t* tau, int32_t* chunk_ties, int32_t* first_program) {
  for (int b = 0; b < programs; ++b) {
    const HostChunk c = chunk(table, chunks, b);
    if (!repair[c.tensor]) continue;
    int tied = 0;
    const int32_t t_tau = tau[means ? 0 : c.tensor];
    for (int64_t i = c.first; i < c.end; ++i) tied += key(score_dtype, c, i, means) == t_tau;
    chunk_ties[b] = tied;
    if (c.first == 0) first_program[c.tensor] = b;
  }
}

// The tied keys of the groups of 8 * THREADS elements from `base` (to `end`) by thread, as tie_find_kernel's
// block sees them (tied_lanes), and their sum.
int tile_ties(int score_dtype, const HostChunk& c, int64_t base, int64_t end, const float* means, int32_t tau,
              unsigned* tied) {
  int total = 0;
  for (int th = 0; th < epi::THREADS; ++th) {
    const int64_t i = base + 8 * th;
    const int valid = end - i <= 0 ? 0 : end - i >= 8 ? 8 : static_cast<int>(end - i);
    int32_t keys[8];
    for (int j = 0; j < 8; ++j) keys[j] = j < valid ? key(score_dtype, c, i + j, means) : 0;
    tied[th] = epi::tied_lanes(keys, valid, tau);
    total += __builtin_popcount(tied[th]);
  }
  return total;
}

// tie_find_kernel for tensor t: the chunk counts THREADS at a time (the block's prefix scan) up to the
// chunk holding the need-th tied key, then that chunk's tiles of 8 * THREADS elements up to its group,
// then nth_lane.
void tie_find(uintptr_t table, int score_dtype, const float* means, int t, const int32_t* chunk_ties,
              const int32_t* first_program, int32_t* repair, const int64_t* need, const int32_t* tau, int64_t* cut) {
  if (!repair[t]) return;
  repair[t] = 0;
  const int64_t* row = ptr<const int64_t>(table) + static_cast<int64_t>(t) * epi::TABLE_WIDTH;
  const int64_t numel = row[epi::COL_NUMEL], chunks = (numel + epi::CHUNK - 1) / epi::CHUNK;
  const int32_t* ties = chunk_ties + first_program[t];
  int64_t left = need[t], found = -1;
  for (int64_t base = 0; base < chunks && found < 0; base += epi::THREADS) {
    int total = 0;
    for (int64_t c = base; c < base + epi::THREADS && c < chunks; ++c) total += ties[c];
    if (left > total) {
      left -= total;
      continue;
    }
    for (int64_t c = base; found < 0; ++c) {
      if (left <= ties[c]) found = c;
      else left -= ties[c];
    }
  }
  if (found < 0) return;
  const int64_t first = found * epi::CHUNK, end = first + epi::CHUNK < numel ? first + epi::CHUNK : numel;
  const HostChunk c{t, row, first, end};
  for (int64_t base = first; base < end; base += 8 * epi::THREADS) {
    unsigned tied[epi::THREADS];
    const int total = tile_ties(score_dtype, c, base, end, means, tau[means ? 0 : t], tied);
    if (left > total) {
      left -= total;
      continue;
    }
    int before = 0;
    for (int th = 0; th < epi::THREADS; ++th) {
      const int count = __builtin_popcount(tied[th]);
      if (before < left && left <= before + count)
        cut[t] = base + 8 * th + epi::nth_lane(tied[th], static_cast<int>(left - before)) + 1;
      before += count;
    }
    return;
  }
}

// select.cu's radix_repair; with `means` (scope="global") one selection: the counts per tensor
// (pool_digits_kernel sums them into row `tensors`), then the tie rule in tensor order.
void radix_repair(uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype, const float* means,
                  const int64_t* k0, int32_t* repair, int32_t* prefix, int64_t* need, int64_t* scratch, int32_t* tau,
                  int64_t* cut, int32_t* ties) {
  const int rows = means ? 1 : tensors;
  for (int level = 0; level < epi::RADIX_LEVELS; ++level) {
    const int nbins = 1 << epi::radix_bits(level);
    const bool last = level == epi::RADIX_LEVELS - 1;
    for (int b = 0; b < programs; ++b) {  // radix_count_kernel
      const HostChunk c = chunk(table, chunks, b);
      const int slot = means ? 0 : c.tensor;
      if (!repair[slot]) continue;
      for (int64_t i = c.first; i < c.end; ++i) {
        const int d = epi::radix_digit(key(score_dtype, c, i, means), prefix[slot], level);
        if (d >= 0) ++scratch[static_cast<int64_t>(c.tensor) * epi::RADIX_BINS + d];
      }
    }
    int64_t* select_rows = scratch;
    if (means) {  // pool_digits_kernel
      select_rows = scratch + static_cast<int64_t>(tensors) * epi::RADIX_BINS;
      for (int d = 0; d < nbins && repair[0]; ++d) {
        int64_t total = 0;
        for (int t = 0; t < tensors; ++t) {
          int64_t& count = scratch[static_cast<int64_t>(t) * epi::RADIX_BINS + d];
          total += count;
          if (!last) count = 0;
        }
        select_rows[d] = total;
      }
    }
    for (int t = 0; t < rows; ++t) {  // radix_select_kernel
      if (!repair[t]) continue;
      int64_t* row = select_rows + static_cast<int64_t>(t) * epi::RADIX_BINS;
      int64_t k = need[t];
      if (level == 0) {
        int64_t eligible = 0;
        for (int d = 0; d < nbins; ++d) eligible += row[d];
        k = k < eligible ? k : eligible;
      }
      const epi::BinHit hit = sliced_select_bin(row, nbins, 0, k);
      for (int d = 0; d < nbins; ++d) row[d] = 0;
      epi::radix_finish(level, hit, k0[t], prefix + t, need + t, tau + t, repair + t);
    }
  }
  if (means) {  // group_ties_kernel
    const bool flagged = repair[0];
    const int64_t wanted = need[0];
    const int digit = epi::radix_digit(tau[0], tau[0], epi::RADIX_LEVELS - 1);
    int64_t before = 0;
    for (int t = 0; t < tensors; ++t) {
      const int64_t tied = flagged ? scratch[static_cast<int64_t>(t) * epi::RADIX_BINS + digit] : 0;
      repair[t] = flagged && epi::group_tie(wanted, before, tied, need + t, cut + t);
      before += tied;
    }
  }
  int32_t *chunk_ties = ties, *first_program = ties + programs;
  tie_count(table, chunks, programs, score_dtype, means, repair, tau, chunk_ties, first_program);
  for (int t = 0; t < tensors; ++t)
    tie_find(table, score_dtype, means, t, chunk_ties, first_program, repair, need, tau, cut);
}

}  // namespace

void bind_host_harness(py::module_& m) {
  m.def("fused_step", [](uintptr_t table, uintptr_t chunks, int programs, int param_dtype, int score_dtype,
                         unsigned flags, uintptr_t scalars, uintptr_t control, uintptr_t tau, uintptr_t cut,
                         uintptr_t above, uintptr_t origin, uintptr_t hist, uintptr_t over, uintptr_t counts) {
    const epi::StepInputs in = step_inputs(scalars, control, tau, cut, above, origin, hist, over, counts);
    auto run = [&](auto param) { fused_step<decltype(param)>(score_dtype, table, chunks, programs, flags, in); };
    switch (param_dtype) {
      case epi::DTYPE_F32: run(epi::F32{}); break;
      case epi::DTYPE_BF16: run(epi::BF16{}); break;
      case epi::DTYPE_F16: run(epi::F16{}); break;
      default: throw std::invalid_argument("unknown param dtype code " + std::to_string(param_dtype));
    }
  }, "_C.fused_step on CPU tensors.", py::arg("table"), py::arg("chunks"), py::arg("programs"),
        py::arg("param_dtype"), py::arg("score_dtype"), py::arg("flags"), py::arg("scalars"),
        py::arg("control"), py::arg("tau"), py::arg("cut"), py::arg("above"), py::arg("origin"),
        py::arg("hist"), py::arg("over"), py::arg("counts"));
  m.def("window_histogram", [](uintptr_t table, uintptr_t chunks, int programs, int score_dtype, uintptr_t means,
                               uintptr_t origin, uintptr_t hist, uintptr_t over) {
    window_histogram(table, chunks, programs, score_dtype, ptr<const float>(means), ptr<const int32_t>(origin),
                     ptr<int64_t>(hist), ptr<int64_t>(over));
  }, "_C.window_histogram on CPU tensors.", py::arg("table"), py::arg("chunks"), py::arg("programs"),
        py::arg("score_dtype"), py::arg("means"), py::arg("origin"), py::arg("hist"), py::arg("over"));
  m.def("score_means", [](uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype, uintptr_t gate,
                          uintptr_t sums, uintptr_t means) {
    score_means(table, chunks, programs, tensors, score_dtype, ptr<const int32_t>(gate), ptr<int64_t>(sums),
                ptr<float>(means));
  }, "_C.score_means on CPU tensors.", py::arg("table"), py::arg("chunks"), py::arg("programs"), py::arg("tensors"),
        py::arg("score_dtype"), py::arg("gate"), py::arg("sums"), py::arg("means"));
  m.def("raw_thresholds", [](int tensors, uintptr_t means, uintptr_t tau, uintptr_t lo, uintptr_t hi) {
    const float* m = ptr<const float>(means);
    const int32_t* t_tau = ptr<const int32_t>(tau);
    for (int t = 0; t < tensors; ++t) {  // raw_threshold_kernel
      ptr<int32_t>(lo)[t] = epi::smallest_raw_key(m[t], t_tau[0]);
      ptr<int32_t>(hi)[t] = epi::smallest_raw_key(m[t], t_tau[0] + 1);
    }
  }, "_C.raw_thresholds on CPU tensors.", py::arg("tensors"), py::arg("means"), py::arg("tau"), py::arg("lo"),
        py::arg("hi"));
  m.def("window_select", [](int tensors, uintptr_t hist, uintptr_t over, uintptr_t origin, uintptr_t k, uintptr_t tau,
                            uintptr_t repair) {
    window_select(tensors, ptr<const int64_t>(hist), ptr<const int64_t>(over), ptr<const int32_t>(origin),
                  ptr<const int64_t>(k), ptr<int32_t>(tau), ptr<int32_t>(repair));
  }, "_C.window_select on CPU tensors.", py::arg("tensors"), py::arg("hist"), py::arg("over"), py::arg("origin"),
        py::arg("k"), py::arg("tau"), py::arg("repair"));
  m.def("radix_repair", [](uintptr_t table, uintptr_t chunks, int programs, int tensors, int score_dtype,
                           uintptr_t means, uintptr_t k, uintptr_t repair, uintptr_t prefix, uintptr_t need,
                           uintptr_t scratch, uintptr_t tau, uintptr_t cut, uintptr_t ties) {
    radix_repair(table, chunks, programs, tensors, score_dtype, ptr<const float>(means), ptr<const int64_t>(k),
                 ptr<int32_t>(repair), ptr<int32_t>(prefix), ptr<int64_t>(need), ptr<int64_t>(scratch),
                 ptr<int32_t>(tau), ptr<int64_t>(cut), ptr<int32_t>(ties));
  }, "_C.radix_repair on CPU tensors.", py::arg("table"), py::arg("chunks"), py::arg("programs"), py::arg("tensors"),
        py::arg("score_dtype"), py::arg("means"), py::arg("k"), py::arg("repair"), py::arg("prefix"), py::arg("need"),
        py::arg("scratch"), py::arg("tau"), py::arg("cut"), py::arg("ties"));
  m.def("round_to", [](int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
    if (dtype != epi::DTYPE_BF16 && dtype != epi::DTYPE_F16) throw std::invalid_argument("round_to: dtype must be bf16 or f16");
    const float* x = ptr<const float>(src);
    for (int64_t i = 0; i < n; ++i)
      ptr<uint16_t>(dst)[i] = dtype == epi::DTYPE_BF16 ? epi::BF16::store(x[i]) : epi::F16::store(x[i]);
  }, "fp32 -> bf16/fp16 bits with the kernels' rounding.", py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"));
  m.def("widen", [](int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
    if (dtype != epi::DTYPE_BF16 && dtype != epi::DTYPE_F16) throw std::invalid_argument("widen: dtype must be bf16 or f16");
    const uint16_t* x = ptr<const uint16_t>(src);
    for (int64_t i = 0; i < n; ++i)
      ptr<float>(dst)[i] = dtype == epi::DTYPE_BF16 ? epi::BF16::load(x[i]) : epi::F16::load(x[i]);
  }, "bf16/fp16 bits -> fp32 with the kernels' conversion.", py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"));
}
