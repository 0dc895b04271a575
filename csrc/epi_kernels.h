// The C++ API of the CUDA backend: raw device pointers, sizes, scalars and a stream.
// No torch or Python headers: python/bindings.cpp wraps these for epi_kernels._C.
//
// A launch covers many tensors through two small device tables, built on the host
// (epi_kernels/launch.py builds them; their layout is the kernel ABI of epi_kernels/abi.py, which
// the package checks against constants() below when it loads the extension; DESIGN.md "Kernel ABI"):
//   tensor table int64 [T, TABLE_WIDTH]: addresses of param, grad, exp_avg, exp_avg_sq,
//     max_exp_avg_sq (0 without amsgrad), importance, packed mask, then numel;
//   chunk table int32 [programs, 2]: (tensor index, chunk index); a chunk is CHUNK elements.
// Every function returns cudaGetLastError() after its launches (never a silent no-op).
//
// Counts that can reach a tensor's size (a tensor may exceed 2^31 elements) are int64 in global
// memory: window histograms `hist` and `over`, the fused step's (isolated, kept) `counts`, `k`, the
// repair path's `need` and `scratch`, and the tie cuts `cut` (element indices). Thresholds (`tau`),
// window origins, repair flags, radix prefixes, the chunk table and the control words are int32;
// the tensor table is int64. A block counts its CHUNK elements in 32-bit shared-memory counters and
// adds them into the int64 arrays with 64-bit atomics.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "element.h"

namespace epi {

constexpr int TABLE_WIDTH = 8;
enum Column { COL_PARAM, COL_GRAD, COL_EXP_AVG, COL_EXP_AVG_SQ, COL_MAX_EXP_AVG_SQ, COL_IMPORTANCE, COL_MASK, COL_NUMEL };
constexpr int THREADS = 256;  // threads per block (the host harness emulates the block scans with it)
constexpr int64_t CHUNK = 8192;  // elements per block: a multiple of 8, so no two blocks share a mask byte

enum DType : int { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

struct Tables {
  const int64_t* table;
  const int32_t* chunks;
  int programs;  // rows of the chunk table
};

cudaError_t device_count(int* count);
// The CUDA version of the runtime linked in (e.g. 13000) and the newest the installed driver
// supports (0 without a driver): a driver older than the runtime's major version cannot run it.
cudaError_t cuda_versions(int* runtime, int* driver);

// What a fused step reads besides the tables (unused pointers may be null).
struct StepInputs {
  const float* scalars;         // float [T, SCALAR_COUNT]: each tensor's step scalars
  const int32_t* control;       // int32 [CONTROL_WORDS]
  const int32_t* tau;           // REFRESH: int32 [T]
  const int64_t* cut;           // REFRESH: int64 [T], tie cuts (TIE_NONE: none)
  const int32_t* above;         // REFRESH: int32 [T], the threshold from the cut on (null: tau + 1)
  const int32_t* origin;        // COLLECT: int32 [T]
  int64_t* hist;                // COLLECT: int64 [T, WINDOW_BINS]
  int64_t* over;                // COLLECT: int64 [T]
  int64_t* counts;              // REFRESH: int64 [T, 2] (isolated, kept)
};

// The fused step (element math in element.h): REFRESH sets the masks from `tau`, `cut` and `above`
// (element i of tensor t: key >= tie_threshold(tau[t], above[t], i, cut[t]), threshold_math.h) and adds
// (isolated, kept) counts to `counts`; COLLECT counts the new scores into `hist` and `over` for windows
// starting at `origin` (0: no window). Every launch reads its scalars per tensor from `scalars` and
// its control words from `control`: they decide whether REFRESH and COLLECT apply this time and
// whether the step runs at all, so one launch (and one captured graph) serves every step.
cudaError_t fused_step(Tables t, DType param, DType score, unsigned flags, const StepInputs& in, cudaStream_t stream);

// Window histograms of the stored scores (when the previous step did not collect them). With
// `means` (float [T], scope="global"; null: per tensor) the keys of every tensor's scores over its
// mean go into one row, hist[0] / over[0], around origin[0].
cudaError_t window_histogram(Tables t, DType score, const float* means, const int32_t* origin, int64_t* hist,
                             int64_t* over, cudaStream_t stream);

// scope="global" (epi_kernels/normalise.py): each tensor's exponent sums `sums` int64 [T, EXPONENTS]
// (zeros; nothing is added where the int32 *gate is 0) and mean `means` float [T] of its stored scores.
cudaError_t score_means(Tables t, int tensors, DType score, const int32_t* gate, int64_t* sums, float* means,
                        cudaStream_t stream);

// scope="global": lo[t] and hi[t], the raw keys that select tensor t's keys over its mean >= tau[0]
// and > tau[0] (smallest_raw_key): the fused step's tau and above.
cudaError_t raw_thresholds(int tensors, const float* means, const int32_t* tau, int32_t* lo, int32_t* hi,
                           cudaStream_t stream);

// One block per tensor: tau from the window histogram, or repair[t] = 1 (then tau = KEY_NONE).
cudaError_t window_select(int tensors, const int64_t* hist, const int64_t* over, const int32_t* origin,
                          const int64_t* k, int32_t* tau, int32_t* repair, cudaStream_t stream);

// The repair path for the tensors flagged in `repair`: for each radix level, count that digit of
// the matching keys into `scratch` int64 [T, RADIX_BINS] (zeros), then choose it. `prefix` int32 [T]
// starts at 0 and `need` int64 [T] at k; flags are cleared and tau written as tensors finish. Then
// the tie pass: a tensor whose exact threshold is shared by too many keys (needs_tie_cut with its
// `k`) gets cut[t] = 1 + the flat index of its need-th key equal to tau; other entries of `cut`
// (the caller fills it with TIE_NONE) are not written. `ties` int32 [programs + T] is the tie pass's
// scratch (per-chunk counts, each tensor's first program; no initial value). Launched whatever the
// flags say, so the host never waits for them.
// With `means` (scope="global"; null: per tensor) one selection over the keys of every tensor's
// scores over its mean: k, tau, prefix and the group's flag and need are entry 0 of theirs (repair
// and need have T entries, the rest are written by the tie pass), scratch has T + 1 rows (row T:
// the group's digit counts, the per-tensor rows summed), and the tie rule runs in tensor order: a
// tensor isolates all its keys equal to tau (cut left alone), none (cut 0) or its first few.
cudaError_t radix_repair(Tables t, int tensors, DType score, const float* means, const int64_t* k, int32_t* repair,
                         int32_t* prefix, int64_t* need, int64_t* scratch, int32_t* tau, int64_t* cut, int32_t* ties,
                         cudaStream_t stream);

}  // namespace epi
