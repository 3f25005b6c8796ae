// csrc/downsampled_attention.cu run on the CPU (emulate.h), as a Python module with the
// signatures of fastdit._C's downsampled_attention entries: a stand-in for fastdit._C in
// tests/test_downsampled_attention_cuda.py, which calls the Python glue with CPU tensors.
// Pointers are host pointers (tensor.data_ptr() of CPU tensors); `device` and `stream` are
// accepted and ignored. No argument validation here: that is bindings.cpp's, tested against the
// real module.
//
// Build: g++ -std=c++17 -O1 -shared -fPIC -DFASTDIT_EMULATE -include emulate.h
//        -I<cuda>/include -I<pybind11> -I<python> downsampled_attention_module.cpp -o <module>.so

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

// The attention kernels use the device helpers of common.cuh (to_float, from_float, warp_sum),
// which are compiled only under __CUDACC__: compile them here as host code, before the .cu
// includes the header (#pragma once), as tests/cuda_emu/adaln_module.cpp does.
#if defined(__CUDACC__)
#error "downsampled_attention_module.cpp is built with a host C++ compiler"
#endif
#define __CUDACC__
#include "../../csrc/common.cuh"
#undef __CUDACC__

#include "../../csrc/downsampled_attention.cu"

namespace py = pybind11;

namespace {

const void* cp(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mp(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": emulated launch failed");
}

void dwconv_split(std::uintptr_t x, std::vector<int64_t> xs, std::uintptr_t weight,
                  std::uintptr_t bias, std::uintptr_t t, int64_t B, int64_t d, int64_t H,
                  int64_t W, int64_t k, bool shortcut, int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::dwconv_split_fwd_launch(cp(x), xs.data(), cp(weight), cp(bias), mp(t), B, d, H,
                                         W, k, shortcut, dtype, nullptr),
        "downsampled_attention_dwconv_split");
}

void dwconv_split_dx(std::uintptr_t weight, std::uintptr_t dt, std::uintptr_t dx,
                     std::vector<int64_t> dxs, int64_t B, int64_t d, int64_t H, int64_t W,
                     int64_t k, bool shortcut, int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::dwconv_split_dx_launch(cp(weight), cp(dt), mp(dx), dxs.data(), B, d, H, W, k,
                                        shortcut, dtype, nullptr),
        "downsampled_attention_dwconv_split_dx");
}

void dwconv_split_dw(std::uintptr_t x, std::vector<int64_t> xs, std::uintptr_t dt,
                     std::uintptr_t partial, int64_t B, int64_t d, int64_t H, int64_t W,
                     int64_t k, int64_t splits, int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::dwconv_split_dw_launch(cp(x), xs.data(), cp(dt), mp(partial), B, d, H, W, k,
                                        splits, dtype, nullptr),
        "downsampled_attention_dwconv_split_dw");
}

int64_t dwconv_split_dw_plan(int64_t B, int64_t d, int64_t H, int64_t W, int64_t k, int dtype,
                             py::object) {
  int64_t splits = 1;
  check(fastdit::dwconv_split_dw_splits(B, d, H, W, k, dtype, 0, &splits),
        "downsampled_attention_dwconv_split_dw_plan");
  return splits;
}

const float* fp(std::uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* mfp(std::uintptr_t p) { return reinterpret_cast<float*>(p); }

void attention_prep(std::uintptr_t q, std::vector<int64_t> qs, std::uintptr_t k,
                    std::vector<int64_t> ks, std::uintptr_t table, std::uintptr_t scale,
                    std::uintptr_t qh, std::uintptr_t kh, int64_t G, int64_t heads, int64_t n,
                    int64_t hd, int64_t hdp, int dtype, py::object, py::object) {
  if (G == 0 || heads == 0 || n == 0) return;
  check(fastdit::attention_prep_launch(cp(q), qs.data(), cp(k), ks.data(), fp(table), fp(scale),
                                       mfp(qh), mfp(kh), G, heads, n, hd, hdp, dtype, nullptr),
        "downsampled_attention_prep");
}

void attention_fwd(std::uintptr_t qh, std::uintptr_t kh, std::uintptr_t v,
                   std::vector<int64_t> vs, std::uintptr_t out, std::vector<int64_t> os,
                   int merge, int64_t gw, std::uintptr_t dout, std::uintptr_t lse,
                   std::uintptr_t delta, int store_o, int stats, int64_t G, int64_t heads,
                   int64_t n, int64_t hd, int64_t hdp, int dtype, py::object, py::object) {
  if (G == 0 || heads == 0 || n == 0) return;
  check(fastdit::attention_fwd_launch(fp(qh), fp(kh), cp(v), vs.data(), mp(out), os.data(), merge,
                                      gw, cp(dout), mfp(lse), mfp(delta), G, heads, n, hd, hdp,
                                      store_o != 0, stats != 0, dtype, nullptr),
        "downsampled_attention_fwd");
}

void attention_bwd(std::uintptr_t qh, std::uintptr_t kh, std::uintptr_t v,
                   std::vector<int64_t> vs, std::uintptr_t dout, std::vector<int64_t> os,
                   int merge, int64_t gw, std::uintptr_t lse, std::uintptr_t delta,
                   std::uintptr_t dqh, std::uintptr_t dkh, std::uintptr_t dlogit, std::uintptr_t dv,
                   std::vector<int64_t> dvs, int64_t G, int64_t heads, int64_t n, int64_t hd,
                   int64_t hdp, int dtype, py::object, py::object) {
  if (G == 0 || heads == 0 || n == 0) return;
  check(fastdit::attention_bwd_launch(fp(qh), fp(kh), cp(v), vs.data(), cp(dout), os.data(),
                                      merge, gw, fp(lse), fp(delta), mfp(dqh), mfp(dkh),
                                      mfp(dlogit), mp(dv), dvs.data(), G, heads, n, hd, hdp,
                                      dtype, nullptr),
        "downsampled_attention_bwd");
}

void attention_post(std::uintptr_t q, std::vector<int64_t> qs, std::uintptr_t k,
                    std::vector<int64_t> ks, std::uintptr_t table, std::uintptr_t scale,
                    std::uintptr_t dqh, std::uintptr_t dkh, std::uintptr_t dq,
                    std::vector<int64_t> dqs, std::uintptr_t dk, std::vector<int64_t> dks,
                    int64_t G, int64_t heads, int64_t n, int64_t hd, int64_t hdp, int dtype,
                    py::object, py::object) {
  if (G == 0 || heads == 0 || n == 0) return;
  check(fastdit::attention_post_launch(cp(q), qs.data(), cp(k), ks.data(), fp(table), fp(scale),
                                       fp(dqh), fp(dkh), mp(dq), dqs.data(), mp(dk), dks.data(),
                                       G, heads, n, hd, hdp, dtype, nullptr),
        "downsampled_attention_post");
}

}  // namespace

PYBIND11_MODULE(downsampled_attention_emu, m) {
  m.def("configure", &emu::configure, py::arg("order"), py::arg("sms"), py::arg("seed"),
        py::arg("max_smem") = 227 * 1024,
        "Fiber and block order (0 forward, 1 reverse, 2 random from seed), the SM count and the "
        "opt-in shared memory per block that the launchers see.");
  m.def("downsampled_attention_dwconv_split", &dwconv_split);
  m.def("downsampled_attention_dwconv_split_dx", &dwconv_split_dx);
  m.def("downsampled_attention_dwconv_split_dw", &dwconv_split_dw);
  m.def("downsampled_attention_dwconv_split_dw_plan", &dwconv_split_dw_plan);
  m.def("dwconv_split_tiles", &fastdit::dwconv_split_tiles,
        "Tiles per image of a kernel (0 forward, 1 dx, 2 dw): the upper bound of splits.");
  m.attr("DOWNSAMPLED_ATTENTION_DWCONV_MAX_K") = fastdit::dwconv_split_max_k();
  m.def("downsampled_attention_padded_head_dim", &fastdit::attention_padded_head_dim);
  m.def("downsampled_attention_fits", [](int64_t hd, py::object) {
    bool fits = false;
    check(fastdit::attention_fits(fastdit::attention_padded_head_dim(hd), 0, &fits),
          "downsampled_attention_fits");
    return fits;
  });
  m.def("downsampled_attention_prep", &attention_prep);
  m.def("downsampled_attention_fwd", &attention_fwd);
  m.def("downsampled_attention_bwd", &attention_bwd);
  m.def("downsampled_attention_post", &attention_post);
}
