// fastdit._C: plain functions over pointers (Python ints), sizes, a dtype code, a device index
// and a cudaStream_t (as an int). No torch: the Python side validates tensors and passes
// t.data_ptr(), torch.cuda.current_stream(device).cuda_stream, ... This side selects the device,
// launches on the given stream, checks the launch, and never allocates.

#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common.cuh"

#ifndef FASTDIT_CUDA_ARCHS
#define FASTDIT_CUDA_ARCHS "unknown"
#endif
#ifndef FASTDIT_CUDA_COMPILER
#define FASTDIT_CUDA_COMPILER "unknown"
#endif

namespace py = pybind11;

namespace fastdit {

// adaln.cu
cudaError_t adaln_modulate_fwd_launch(const void* x, const void* shift, const void* scale,
                                      void* out, int64_t B, int64_t L, int64_t D, float eps,
                                      int dtype, cudaStream_t stream);
cudaError_t adaln_gated_fwd_launch(const void* x, const void* y, const void* gate,
                                   const void* shift, const void* scale, void* r, void* out,
                                   int64_t B, int64_t L, int64_t D, float eps, int dtype,
                                   cudaStream_t stream);
cudaError_t adaln_modulate_bwd_launch(const void* x, const void* scale, const void* dout,
                                      void* dx, void* dshift, void* dscale, void* partial,
                                      int64_t B, int64_t L, int64_t D, int64_t splits, float eps,
                                      int dtype, cudaStream_t stream);
cudaError_t adaln_gated_bwd_launch(const void* x, const void* y, const void* gate,
                                   const void* scale, const void* dr, const void* dout, void* dx,
                                   void* dy, void* dgate, void* dshift, void* dscale,
                                   void* partial, int64_t B, int64_t L, int64_t D,
                                   int64_t splits, float eps, int dtype, cudaStream_t stream);
int64_t adaln_bwd_max_d();
cudaError_t adaln_bwd_splits(int64_t B, int64_t L, int64_t D, int dtype, bool gated, int device,
                             int64_t* splits);
const void* adaln_probe_kernel();

namespace {

std::string version_string(int v) {  // 13000 -> "13.0", 12080 -> "12.8"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string error_words(cudaError_t err) {
  return std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")";
}

void check_sizes(const char* op, int64_t B, int64_t L, int64_t D) {
  if (B < 0 || L < 0) {
    throw invalid_argument(op, "B and L must be >= 0, got B=" + std::to_string(B) +
                                   ", L=" + std::to_string(L));
  }
  if (D < 1 || D > INT_MAX) {
    throw invalid_argument(op, "D must be in [1, " + std::to_string(INT_MAX) + "], got " +
                                   std::to_string(D));
  }
  if (B > 0 && L > 0 && (L > INT64_MAX / B || B * L > INT64_MAX / D)) {
    throw invalid_argument(op, "B * L * D overflows int64");
  }
}

// The checks every adaln entry makes; false when there is no work (B == 0 or L == 0).
bool check_adaln(const char* op, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                 int device) {
  if (!valid_dtype(dtype)) {
    throw invalid_argument(op, "unknown dtype code " + std::to_string(dtype) +
                                   " (expected 0=float32, 1=float16, 2=bfloat16)");
  }
  check_sizes(op, B, L, D);
  if (!(eps >= 0.0)) throw invalid_argument(op, "eps must be >= 0, got " + std::to_string(eps));
  if (device < 0) throw invalid_argument(op, "device must be >= 0, got " + std::to_string(device));
  return B > 0 && L > 0;
}

void check_pointers(const char* op, std::initializer_list<std::uintptr_t> ptrs,
                    const char* names) {
  for (const std::uintptr_t p : ptrs) {
    if (p == 0) throw invalid_argument(op, std::string("null pointer (") + names + " must all be set)");
  }
}

// The backward's extra limits: D held in registers, 32-bit row indices within a sample, and
// the (sample, split) blocks of one launch.
void check_backward(const char* op, int64_t B, int64_t L, int64_t D, int64_t splits) {
  if (D > adaln_bwd_max_d()) {
    throw invalid_argument(op, "D must be <= " + std::to_string(adaln_bwd_max_d()) +
                                   " (a row is held in registers), got " + std::to_string(D));
  }
  if (L >= (int64_t{1} << 31)) {
    throw invalid_argument(op, "L must be < 2^31, got " + std::to_string(L));
  }
  if (B > 0 && L > 0 && (splits < 1 || splits > L)) {
    throw invalid_argument(op, "splits must be in [1, L=" + std::to_string(L) + "], got " +
                                   std::to_string(splits));
  }
  if (B > 0 && splits > 0 && B > INT_MAX / splits) {
    throw invalid_argument(op, "B * splits must be < 2^31, got B=" + std::to_string(B) +
                                   ", splits=" + std::to_string(splits));
  }
}

template <typename P>
const void* cptr(P p) {
  return reinterpret_cast<const void*>(p);
}
template <typename P>
void* mptr(P p) {
  return reinterpret_cast<void*>(p);
}

void adaln_modulate_fwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                        std::uintptr_t out, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                        int device, std::uintptr_t stream) {
  constexpr const char* op = "adaln_modulate_fwd";
  if (!check_adaln(op, B, L, D, eps, dtype, device)) return;
  check_pointers(op, {x, shift, scale, out}, "x, shift, scale and out");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_modulate_fwd_launch(
      cptr(x), cptr(shift), cptr(scale), mptr(out), B, L, D, static_cast<float>(eps), dtype,
      reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_gated_fwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate,
                     std::uintptr_t shift, std::uintptr_t scale, std::uintptr_t r,
                     std::uintptr_t out, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                     int device, std::uintptr_t stream) {
  constexpr const char* op = "adaln_gated_fwd";
  if (!check_adaln(op, B, L, D, eps, dtype, device)) return;
  check_pointers(op, {x, y, gate, shift, scale, r, out}, "x, y, gate, shift, scale, r and out");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_gated_fwd_launch(
      cptr(x), cptr(y), cptr(gate), cptr(shift), cptr(scale), mptr(r), mptr(out), B, L, D,
      static_cast<float>(eps), dtype, reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_modulate_bwd(std::uintptr_t x, std::uintptr_t scale, std::uintptr_t dout,
                        std::uintptr_t dx, std::uintptr_t dshift, std::uintptr_t dscale,
                        std::uintptr_t partial, int64_t B, int64_t L, int64_t D, int64_t splits,
                        double eps, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "adaln_modulate_bwd";
  const bool work = check_adaln(op, B, L, D, eps, dtype, device);
  check_backward(op, B, L, D, splits);
  if (!work) return;
  check_pointers(op, {x, scale, dout, dx, dshift, dscale, partial},
                 "x, scale, dout, dx, dshift, dscale and partial");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_modulate_bwd_launch(
      cptr(x), cptr(scale), cptr(dout), mptr(dx), mptr(dshift), mptr(dscale), mptr(partial), B,
      L, D, splits, static_cast<float>(eps), dtype, reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_gated_bwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate,
                     std::uintptr_t scale, std::uintptr_t dr, std::uintptr_t dout,
                     std::uintptr_t dx, std::uintptr_t dy, std::uintptr_t dgate,
                     std::uintptr_t dshift, std::uintptr_t dscale, std::uintptr_t partial,
                     int64_t B, int64_t L, int64_t D, int64_t splits, double eps, int dtype,
                     int device, std::uintptr_t stream) {
  constexpr const char* op = "adaln_gated_bwd";
  const bool work = check_adaln(op, B, L, D, eps, dtype, device);
  check_backward(op, B, L, D, splits);
  if (!work) return;
  check_pointers(op, {x, y, gate, scale, dr, dout, dx, dy, dgate, dshift, dscale, partial},
                 "x, y, gate, scale, dr, dout, dx, dy, dgate, dshift, dscale and partial");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_gated_bwd_launch(
      cptr(x), cptr(y), cptr(gate), cptr(scale), cptr(dr), cptr(dout), mptr(dx), mptr(dy),
      mptr(dgate), mptr(dshift), mptr(dscale), mptr(partial), B, L, D, splits,
      static_cast<float>(eps), dtype, reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

int64_t adaln_bwd_splits_py(int64_t B, int64_t L, int64_t D, int dtype, bool gated,
                            int device) {
  constexpr const char* op = "adaln_bwd_splits";
  if (!check_adaln(op, B, L, D, 0.0, dtype, device)) {
    throw invalid_argument(op, "B and L must be >= 1, got B=" + std::to_string(B) +
                                   ", L=" + std::to_string(L));
  }
  check_backward(op, B, L, D, 1);
  DeviceGuard guard(device, op);
  int64_t splits = 1;
  FASTDIT_CUDA_CHECK(op, adaln_bwd_splits(B, L, D, dtype, gated, device, &splits));
  return splits;
}

py::dict build_info() {
  py::dict info;
  info["cuda_version"] = version_string(CUDART_VERSION);
  info["archs"] = std::string(FASTDIT_CUDA_ARCHS);
  info["compiler"] = std::string(FASTDIT_CUDA_COMPILER);
  info["cudart"] = std::string("static");
  return info;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// "" when `device` can run this build's kernels, else the reason as a sentence.
std::string runtime_check(int device) {
  const std::string built = "fastdit._C was built with CUDA " + version_string(CUDART_VERSION);
  int driver = 0;
  cudaError_t err = cudaDriverGetVersion(&driver);
  if (err != cudaSuccess || driver == 0) {
    (void)cudaGetLastError();
    return "no CUDA driver found (cudaErrorInsufficientDriver): libcuda.so.1 is not installed "
           "or cannot be loaded";
  }
  // CUDA minor-version compatibility: a driver of the same major version runs this build.
  if (driver / 1000 < CUDART_VERSION / 1000) {
    return "the NVIDIA driver is too old (cudaErrorInsufficientDriver): it supports CUDA " +
           version_string(driver) + " but " + built + "; update the driver";
  }

  int count = 0;
  err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (err == cudaErrorNoDevice) return "no CUDA GPU found (cudaErrorNoDevice)";
    if (err == cudaErrorInsufficientDriver) {
      return "the NVIDIA driver is too old for " + built + " (cudaErrorInsufficientDriver)";
    }
    return "cannot list CUDA devices: " + error_words(err);
  }
  if (count == 0) return "no CUDA GPU found (cudaErrorNoDevice)";
  if (device < 0 || device >= count) {
    return "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
           " visible)";
  }

  int major = 0, minor = 0;
  (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  (void)cudaGetLastError();
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);

  int previous = 0;
  err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, adaln_probe_kernel());
    if (previous != device) (void)cudaSetDevice(previous);
  }
  (void)cudaGetLastError();
  switch (err) {
    case cudaSuccess:
      return "";
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidDeviceFunction:
      return "fastdit._C has no kernel for this GPU (compute capability " + cc +
             "; built for CUDA archs " + FASTDIT_CUDA_ARCHS +
             "); rebuild with FASTDIT_CUDA_ARCHS=" + std::to_string(major * 10 + minor) + " (" +
             cudaGetErrorName(err) + ")";
    case cudaErrorUnsupportedPtxVersion:
      return "the NVIDIA driver is too old to compile the PTX in fastdit._C for this GPU "
             "(compute capability " +
             cc + "; " + built + "); update the driver (cudaErrorUnsupportedPtxVersion)";
    case cudaErrorInsufficientDriver:
      return "the NVIDIA driver is too old for " + built + " (cudaErrorInsufficientDriver)";
    default:
      return "CUDA device " + std::to_string(device) + " is not usable: " + error_words(err);
  }
}

}  // namespace
}  // namespace fastdit

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdit CUDA kernels over raw pointers (no torch); see fastdit/_ext.py";

  m.def("adaln_modulate_fwd", &fastdit::adaln_modulate_fwd, py::arg("x_ptr"),
        py::arg("shift_ptr"), py::arg("scale_ptr"), py::arg("out_ptr"), py::arg("B"),
        py::arg("L"), py::arg("D"), py::arg("eps"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"),
        "out = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] for contiguous x, out of "
        "shape (B, L, D) and shift, scale of shape (B, D), all of one dtype (0=float32, "
        "1=float16, 2=bfloat16), enqueued on `stream` of `device`. Raises ValueError for bad "
        "arguments and RuntimeError for a CUDA error.");
  m.def("adaln_gated_fwd", &fastdit::adaln_gated_fwd, py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("gate_ptr"), py::arg("shift_ptr"), py::arg("scale_ptr"), py::arg("r_ptr"),
        py::arg("out_ptr"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("eps"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "r = x + gate[:, None] * y (rounded to the dtype) and out = LayerNorm(r) * "
        "(1 + scale[:, None]) + shift[:, None]; x, y, r, out: (B, L, D) contiguous, gate, "
        "shift, scale: (B, D) contiguous, one dtype.");
  m.def("adaln_modulate_bwd", &fastdit::adaln_modulate_bwd, py::arg("x_ptr"),
        py::arg("scale_ptr"), py::arg("dout_ptr"), py::arg("dx_ptr"), py::arg("dshift_ptr"),
        py::arg("dscale_ptr"), py::arg("partial_ptr"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("splits"), py::arg("eps"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"),
        "Gradients of adaln_modulate_fwd for the cotangent dout: dx (B, L, D), dshift and "
        "dscale (B, D). partial: caller-allocated float32 scratch of 2 * B * splits * D "
        "elements; each sample's L rows are cut into `splits` (1 <= splits <= L) blocks whose "
        "partial sums are added in a fixed order (deterministic). D <= ADALN_BWD_MAX_D.");
  m.def("adaln_gated_bwd", &fastdit::adaln_gated_bwd, py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("gate_ptr"), py::arg("scale_ptr"), py::arg("dr_ptr"), py::arg("dout_ptr"),
        py::arg("dx_ptr"), py::arg("dy_ptr"), py::arg("dgate_ptr"), py::arg("dshift_ptr"),
        py::arg("dscale_ptr"), py::arg("partial_ptr"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("splits"), py::arg("eps"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"),
        "Gradients of adaln_gated_fwd for the cotangents dr (of r) and dout (of out): dx, dy "
        "(B, L, D), dgate, dshift, dscale (B, D). partial: float32 scratch of 3 * B * splits * "
        "D elements, as for adaln_modulate_bwd.");
  m.def("adaln_bwd_splits", &fastdit::adaln_bwd_splits_py, py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("dtype"), py::arg("gated"), py::arg("device"),
        "The `splits` to pass to adaln_modulate_bwd / adaln_gated_bwd (gated=True) for this "
        "shape on `device`: one wave of resident (sample, split) blocks, >= 16 rows each.");
  m.attr("ADALN_BWD_MAX_D") = fastdit::adaln_bwd_max_d();
  m.def("build_info", &fastdit::build_info,
        "Build facts: CUDA runtime version, CUDA archs compiled, CUDA compiler.");
  m.def("runtime_check", &fastdit::runtime_check, py::arg("device"),
        "'' if this build can run on CUDA device `device`, else the reason as a sentence.");
  m.def("device_count", &fastdit::device_count,
        "Number of CUDA devices visible to this build's runtime (0 when none or no driver).");
}
