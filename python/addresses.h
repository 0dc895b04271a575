// Raw addresses as the Python side passes them (int), turned into the typed pointers and the
// StepInputs of csrc/epi_kernels.h: shared by the CUDA wrappers (bindings.cpp) and the host harness
// (host_harness.cpp), so neither declares a function of the other.
#pragma once

#include <cstdint>

#include "epi_kernels.h"

template <class T>
inline T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

inline epi::StepInputs step_inputs(uintptr_t scalars, uintptr_t control, uintptr_t tau, uintptr_t cut,
                                   uintptr_t above, uintptr_t origin, uintptr_t hist, uintptr_t over,
                                   uintptr_t counts) {
  return {ptr<const float>(scalars), ptr<const int32_t>(control), ptr<const int32_t>(tau),
          ptr<const int64_t>(cut), ptr<const int32_t>(above), ptr<const int32_t>(origin), ptr<int64_t>(hist),
          ptr<int64_t>(over), ptr<int64_t>(counts)};
}
