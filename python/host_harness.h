// The host harness (host_harness.cpp): the launch functions of csrc/epi_kernels.h emulated on the
// CPU, bound into the submodule `_C.host` by the module's definition (bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

void bind_host_harness(pybind11::module_& m);
