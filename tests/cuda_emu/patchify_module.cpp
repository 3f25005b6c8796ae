// csrc/patchify.cu run on the CPU (emulate.h), as a Python module with the signatures of
// fastdit._C's patchify entries: a stand-in for fastdit._C in tests/test_patchify_cuda.py, which
// calls the Python glue with CPU tensors. Pointers are host pointers (tensor.data_ptr() of CPU
// tensors); `device` and `stream` are accepted and ignored. No argument validation here: that
// is bindings.cpp's, tested against the real module.
//
// Build: g++ -std=c++17 -O1 -shared -fPIC -DFASTDIT_EMULATE -include emulate.h
//        -I<cuda>/include -I<pybind11> -I<python> patchify_module.cpp -o <module>.so

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/patchify.cu"

namespace py = pybind11;

namespace {

const void* cp(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mp(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": emulated launch failed");
}

void patchify(std::uintptr_t x, std::vector<int64_t> xs, std::uintptr_t out,
              std::vector<int64_t> os, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
              int order, int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::permute_launch(cp(x), mp(out), xs.data(), os.data(), true, B, C, H, W, p, order,
                                dtype, nullptr),
        "patchify");
}

void unpatchify(std::uintptr_t tokens, std::vector<int64_t> ts, std::uintptr_t out,
                std::vector<int64_t> os, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                int order, int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::permute_launch(cp(tokens), mp(out), os.data(), ts.data(), false, B, C, H, W, p,
                                order, dtype, nullptr),
        "unpatchify");
}

void patch_embed_fwd(std::uintptr_t x, std::vector<int64_t> xs, std::uintptr_t weight,
                     std::uintptr_t bias, std::uintptr_t pos, std::uintptr_t out, int64_t B,
                     int64_t C, int64_t H, int64_t W, int64_t p, int64_t D, int dtype, py::object,
                     py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::patch_embed_fwd_launch(cp(x), xs.data(), cp(weight), cp(bias), cp(pos), mp(out),
                                        B, C, H, W, p, D, dtype, nullptr),
        "patch_embed_fwd");
}

void patch_embed_bwd(std::uintptr_t x, std::vector<int64_t> xs, std::uintptr_t weight,
                     std::uintptr_t dout, std::uintptr_t dx, std::vector<int64_t> dxs,
                     std::uintptr_t dweight_partial, std::uintptr_t dpos_partial, int64_t B,
                     int64_t C, int64_t H, int64_t W, int64_t p, int64_t D, int64_t splits,
                     int dtype, py::object, py::object) {
  if (B == 0 || H == 0 || W == 0) return;
  check(fastdit::patch_embed_bwd_launch(cp(x), xs.data(), cp(weight), cp(dout), mp(dx),
                                        dxs.data(), mp(dweight_partial), mp(dpos_partial), B, C,
                                        H, W, p, D, splits, dtype, nullptr),
        "patch_embed_bwd");
}

std::tuple<int64_t, int64_t> patch_embed_bwd_plan(int64_t B, int64_t C, int64_t H, int64_t W,
                                                  int64_t p, int64_t D, int dtype, py::object) {
  const int64_t N = (H / p) * (W / p);
  int64_t splits = 1;
  check(fastdit::patch_embed_bwd_splits(B, N, D, C * p * p, dtype, 0, &splits),
        "patch_embed_bwd_plan");
  const int64_t tile = fastdit::patchify_weight_tile();
  return {splits, splits * ((N + tile - 1) / tile)};
}

void final_layer_fwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                     std::uintptr_t weight_t, std::uintptr_t bias, std::uintptr_t out,
                     std::vector<int64_t> os, int64_t B, int64_t C, int64_t h, int64_t w,
                     int64_t p, int64_t D, double eps, int dtype, py::object, py::object) {
  if (B == 0 || h == 0 || w == 0) return;
  check(fastdit::final_layer_fwd_launch(cp(x), cp(shift), cp(scale), cp(weight_t), cp(bias),
                                        mp(out), os.data(), B, C, h, w, p, D,
                                        static_cast<float>(eps), dtype, nullptr),
        "final_layer_fwd");
}

void final_layer_bwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                     std::uintptr_t weight, std::uintptr_t dout, std::vector<int64_t> ds,
                     std::uintptr_t dx, std::uintptr_t stats, std::uintptr_t dmod_partial,
                     std::uintptr_t dweight_partial, std::uintptr_t dbias_partial, int64_t B,
                     int64_t C, int64_t h, int64_t w, int64_t p, int64_t D, double eps,
                     int64_t row_splits, int64_t weight_splits, int dtype, py::object,
                     py::object) {
  if (B == 0 || h == 0 || w == 0) return;
  check(fastdit::final_layer_bwd_launch(cp(x), cp(shift), cp(scale), cp(weight), cp(dout),
                                        ds.data(), mp(dx), mp(stats), mp(dmod_partial),
                                        mp(dweight_partial), mp(dbias_partial), B, C, h, w, p, D,
                                        static_cast<float>(eps), row_splits, weight_splits,
                                        dtype, nullptr),
        "final_layer_bwd");
}

std::tuple<int64_t, int64_t, int64_t> final_layer_bwd_plan(int64_t B, int64_t C, int64_t h,
                                                           int64_t w, int64_t p, int64_t D,
                                                           int dtype, py::object) {
  int64_t rows = 1, weights = 1;
  check(fastdit::final_layer_bwd_splits(B, h * w, D, C * p * p, dtype, 0, &rows, &weights),
        "final_layer_bwd_plan");
  const int64_t tile = fastdit::patchify_weight_tile();
  return {rows, weights, weights * ((h * w + tile - 1) / tile)};
}

}  // namespace

PYBIND11_MODULE(patchify_emu, m) {
  m.def("configure", &emu::configure, py::arg("order"), py::arg("sms"), py::arg("seed"),
        py::arg("max_smem") = 227 * 1024,
        "Fiber and block order (0 forward, 1 reverse, 2 random from seed), the SM count and the "
        "opt-in shared memory per block that the launchers see.");
  m.def("patchify", &patchify);
  m.def("unpatchify", &unpatchify);
  m.def("patch_embed_fwd", &patch_embed_fwd);
  m.def("patch_embed_bwd", &patch_embed_bwd);
  m.def("patch_embed_bwd_plan", &patch_embed_bwd_plan);
  m.def("final_layer_fwd", &final_layer_fwd);
  m.def("final_layer_bwd", &final_layer_bwd);
  m.def("final_layer_bwd_plan", &final_layer_bwd_plan);
  m.attr("PATCHIFY_MAX_K") = fastdit::patchify_max_k();
  m.attr("FINAL_LAYER_MAX_D") = fastdit::final_layer_max_d();
  m.attr("FINAL_LAYER_MAX_K") = fastdit::final_layer_max_k();
  m.attr("FINAL_LAYER_BWD_MAX_SCALAR_D") = fastdit::final_layer_bwd_max_scalar_d();
}
