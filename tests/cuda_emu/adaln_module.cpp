// csrc/adaln.cu run on the CPU (emulate.h), as a Python module with the signatures of
// fastdit._C's adaln entries: a stand-in for fastdit._C in tests/test_adaln_cuda_emu.py, which
// calls the Python glue with CPU tensors. Pointers are host pointers (tensor.data_ptr() of CPU
// tensors); `device` and `stream` are accepted and ignored. No argument validation here: that
// is bindings.cpp's, tested against the real module.
//
// Build: g++ -std=c++17 -O1 -shared -fPIC -DFASTDIT_EMULATE -include emulate.h
//        -I<cuda>/include -I<pybind11> -I<python> adaln_module.cpp -o <module>.so

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// adaln.cu uses the device helpers of common.cuh (to_float, load_float, warp_sum, ...), which
// are compiled only under __CUDACC__: compile them here as host code (emulate.h has made
// __device__ and __forceinline__ plain C++), before adaln.cu includes the header (#pragma once).
// The CUDA headers were included by emulate.h without __CUDACC__ and are not read again.
#if defined(__CUDACC__)
#error "adaln_module.cpp is built with a host C++ compiler"
#endif
#define __CUDACC__
#include "../../csrc/common.cuh"
#undef __CUDACC__

#include "../../csrc/adaln.cu"

namespace py = pybind11;

namespace {

const void* cp(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mp(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": emulated launch failed");
}

void modulate_fwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                  std::uintptr_t out, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                  int cond_dtype, py::object, py::object, bool channels_first) {
  check(fastdit::adaln_modulate_fwd_launch(cp(x), cp(shift), cp(scale), mp(out), B, L, D,
                                           static_cast<float>(eps), dtype, cond_dtype,
                                           channels_first, nullptr),
        "adaln_modulate_fwd");
}

void gated_fwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t shift,
               std::uintptr_t scale, std::uintptr_t r, std::uintptr_t out, int64_t B, int64_t L,
               int64_t D, double eps, int dtype, int cond_dtype, py::object, py::object,
               bool channels_first) {
  check(fastdit::adaln_gated_fwd_launch(cp(x), cp(y), cp(gate), cp(shift), cp(scale), mp(r),
                                        mp(out), B, L, D, static_cast<float>(eps), dtype,
                                        cond_dtype, channels_first, nullptr),
        "adaln_gated_fwd");
}

void modulate_bwd(std::uintptr_t x, std::uintptr_t scale, std::uintptr_t dout, std::uintptr_t dx,
                  std::uintptr_t dshift, std::uintptr_t dscale, std::uintptr_t partial,
                  int64_t B, int64_t L, int64_t D, int64_t splits, double eps, int dtype,
                  int cond_dtype, py::object, py::object, bool channels_first) {
  check(fastdit::adaln_modulate_bwd_launch(cp(x), cp(scale), cp(dout), mp(dx), mp(dshift),
                                           mp(dscale), mp(partial), B, L, D, splits,
                                           static_cast<float>(eps), dtype, cond_dtype,
                                           channels_first, nullptr),
        "adaln_modulate_bwd");
}

void gated_bwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t scale,
               std::uintptr_t dr, std::uintptr_t dout, std::uintptr_t dx, std::uintptr_t dy,
               std::uintptr_t dgate, std::uintptr_t dshift, std::uintptr_t dscale,
               std::uintptr_t partial, int64_t B, int64_t L, int64_t D, int64_t splits,
               double eps, int dtype, int cond_dtype, py::object, py::object,
               bool channels_first) {
  check(fastdit::adaln_gated_bwd_launch(cp(x), cp(y), cp(gate), cp(scale), cp(dr), cp(dout),
                                        mp(dx), mp(dy), mp(dgate), mp(dshift), mp(dscale),
                                        mp(partial), B, L, D, splits, static_cast<float>(eps),
                                        dtype, cond_dtype, channels_first, nullptr),
        "adaln_gated_bwd");
}

int64_t bwd_splits(int64_t B, int64_t L, int64_t D, int dtype, bool gated, py::object,
                   bool channels_first) {
  if (channels_first) return fastdit::adaln_cf_tiles(L);
  int64_t splits = 1;
  check(fastdit::adaln_bwd_splits(B, L, D, dtype, gated, 0, &splits), "adaln_bwd_splits");
  return splits;
}

}  // namespace

PYBIND11_MODULE(adaln_emu, m) {
  m.def("configure", &emu::configure, py::arg("order"), py::arg("sms"), py::arg("seed"),
        py::arg("max_smem") = 227 * 1024,
        "Fiber and block order (0 forward, 1 reverse, 2 random from seed), the SM count and the "
        "opt-in shared memory per block that the launchers see.");
  // channels_first as the real module takes it: a trailing argument, False by default
  const auto cf = py::arg("channels_first") = false;
  m.def("adaln_modulate_fwd", &modulate_fwd, py::arg("x_ptr"), py::arg("shift_ptr"),
        py::arg("scale_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("L"), py::arg("D"),
        py::arg("eps"), py::arg("dtype"), py::arg("cond_dtype"), py::arg("device"),
        py::arg("stream"), cf);
  m.def("adaln_gated_fwd", &gated_fwd, py::arg("x_ptr"), py::arg("y_ptr"), py::arg("gate_ptr"),
        py::arg("shift_ptr"), py::arg("scale_ptr"), py::arg("r_ptr"), py::arg("out_ptr"),
        py::arg("B"), py::arg("L"), py::arg("D"), py::arg("eps"), py::arg("dtype"),
        py::arg("cond_dtype"), py::arg("device"), py::arg("stream"), cf);
  m.def("adaln_modulate_bwd", &modulate_bwd, py::arg("x_ptr"), py::arg("scale_ptr"),
        py::arg("dout_ptr"), py::arg("dx_ptr"), py::arg("dshift_ptr"), py::arg("dscale_ptr"),
        py::arg("partial_ptr"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("splits"),
        py::arg("eps"), py::arg("dtype"), py::arg("cond_dtype"), py::arg("device"),
        py::arg("stream"), cf);
  m.def("adaln_gated_bwd", &gated_bwd, py::arg("x_ptr"), py::arg("y_ptr"), py::arg("gate_ptr"),
        py::arg("scale_ptr"), py::arg("dr_ptr"), py::arg("dout_ptr"), py::arg("dx_ptr"),
        py::arg("dy_ptr"), py::arg("dgate_ptr"), py::arg("dshift_ptr"), py::arg("dscale_ptr"),
        py::arg("partial_ptr"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("splits"),
        py::arg("eps"), py::arg("dtype"), py::arg("cond_dtype"), py::arg("device"),
        py::arg("stream"), cf);
  m.def("adaln_bwd_splits", &bwd_splits, py::arg("B"), py::arg("L"), py::arg("D"),
        py::arg("dtype"), py::arg("gated"), py::arg("device"), cf);
  m.attr("ADALN_BWD_MAX_D") = fastdit::adaln_bwd_max_d();
}
