// fastdit._C: plain functions over pointers (Python ints), sizes, a dtype code, a device index
// and a cudaStream_t (as an int). No torch: the Python side validates tensors and passes
// t.data_ptr(), torch.cuda.current_stream(device).cuda_stream, ... This side selects the device,
// launches on the given stream, checks the launch, and never allocates.

#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
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

void adaln_modulate_fwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                        std::uintptr_t out, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                        int device, std::uintptr_t stream) {
  constexpr const char* op = "adaln_modulate_fwd";
  if (!valid_dtype(dtype)) {
    throw invalid_argument(op, "unknown dtype code " + std::to_string(dtype) +
                                   " (expected 0=float32, 1=float16, 2=bfloat16)");
  }
  check_sizes(op, B, L, D);
  if (!(eps >= 0.0)) throw invalid_argument(op, "eps must be >= 0, got " + std::to_string(eps));
  if (device < 0) throw invalid_argument(op, "device must be >= 0, got " + std::to_string(device));
  if (B == 0 || L == 0) return;
  if (x == 0 || shift == 0 || scale == 0 || out == 0) {
    throw invalid_argument(op, "null pointer (x, shift, scale and out must all be set)");
  }

  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_modulate_fwd_launch(
      reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(shift),
      reinterpret_cast<const void*>(scale), reinterpret_cast<void*>(out), B, L, D,
      static_cast<float>(eps), dtype, reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
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
  m.def("build_info", &fastdit::build_info,
        "Build facts: CUDA runtime version, CUDA archs compiled, CUDA compiler.");
  m.def("runtime_check", &fastdit::runtime_check, py::arg("device"),
        "'' if this build can run on CUDA device `device`, else the reason as a sentence.");
  m.def("device_count", &fastdit::device_count,
        "Number of CUDA devices visible to this build's runtime (0 when none or no driver).");
}
