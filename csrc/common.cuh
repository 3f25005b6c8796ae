// Shared pieces of the fastdit._C kernels: error checks, dtype codes and dispatch, and the
// load/store helpers that move T <-> float (scalar or 16-byte vectors).
//
// This header is included by the .cu files (nvcc) and by bindings.cpp (host compiler); the
// device-only helpers are guarded by __CUDACC__. No torch, no pybind11 here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastdit {

// ---------------------------------------------------------------------------------------------
// Errors. A CUDA failure becomes a C++ exception whose message names the op and the CUDA error;
// pybind11 turns std::runtime_error into RuntimeError and std::invalid_argument into ValueError.

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline std::string cuda_error_message(const char* op, cudaError_t err) {
  return std::string("fastdit._C.") + op + ": " + cudaGetErrorString(err) + " (" +
         cudaGetErrorName(err) + ")";
}

// Throws CudaError for anything but cudaSuccess. The runtime's last-error slot is cleared so a
// non-sticky error does not resurface in the next, unrelated check.
inline void cuda_check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw CudaError(cuda_error_message(op, err));
  }
}

// FASTDIT_CUDA_CHECK("op_name", cudaSomething(...)); FASTDIT_CHECK_LAUNCH("op_name") after <<<>>>.
#define FASTDIT_CUDA_CHECK(op, expr) ::fastdit::cuda_check((expr), (op))
#define FASTDIT_CHECK_LAUNCH(op) ::fastdit::cuda_check(cudaGetLastError(), (op))

inline std::invalid_argument invalid_argument(const char* op, const std::string& what) {
  return std::invalid_argument(std::string("fastdit._C.") + op + ": " + what);
}

// Selects `device` for the lifetime of the guard and restores the previous device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    FASTDIT_CUDA_CHECK(op, cudaGetDevice(&previous_));
    if (previous_ != device) {
      FASTDIT_CUDA_CHECK(op, cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) {
      (void)cudaSetDevice(previous_);
      (void)cudaGetLastError();
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// ---------------------------------------------------------------------------------------------
// Dtype codes, shared with fastdit/_ext.py. Output dtype = input dtype.

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline std::size_t dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T = float, __half or __nv_bfloat16 for code 0, 1, 2; throws
// std::invalid_argument (ValueError in Python) for any other code. Usage:
//   dispatch_dtype(code, "op", [&](auto tag) { using T = typename decltype(tag)::type; ... });
template <typename F>
decltype(auto) dispatch_dtype(int code, const char* op, F&& f) {
  switch (code) {
    case kFloat32:
      return f(TypeTag<float>{});
    case kFloat16:
      return f(TypeTag<__half>{});
    case kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      break;
  }
  throw invalid_argument(op, "unknown dtype code " + std::to_string(code) +
                                 " (expected 0=float32, 1=float16, 2=bfloat16)");
}

inline bool is_aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Blocks per sample of a grid of `samples` x splits equal blocks over `resident` block slots
// (the kernel's occupancy times the SMs), for kernels that cut each sample's rows into splits
// and sum the splits' partials afterwards: the count in [1, max_splits] whose blocks fill their
// waves best, the fewest among equals, at most four waves of blocks (more only adds partials).
// Rounding resident / samples down instead leaves slots idle when samples does not divide
// them: 256 samples over 396 slots fill 65 % of them at one split a sample, 97 % at three.
inline int64_t wave_splits(int64_t samples, int64_t resident, int64_t max_splits) {
  resident = resident < 1 ? 1 : resident;
  samples = samples < 1 ? 1 : samples;
  const int64_t bound = 4 * resident / samples;
  const int64_t most = bound < max_splits ? bound : max_splits;
  int64_t best = 1, best_blocks = samples;
  int64_t best_slots = (samples + resident - 1) / resident * resident;
  for (int64_t s = 2; s <= most; ++s) {
    const int64_t blocks = samples * s;
    const int64_t slots = (blocks + resident - 1) / resident * resident;
    if (blocks * best_slots > best_blocks * slots) {  // blocks / slots, the fill, is larger
      best = s;
      best_blocks = blocks;
      best_slots = slots;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Launches and dynamic shared memory, the same code on a GPU and in the CPU emulator
// (tests/cuda_emu/emulate.h, built with -DFASTDIT_EMULATE): FD_LAUNCH(kernel, grid, block, smem,
// stream)(args...) and FD_DYNAMIC_SMEM(name), a float* to the block's dynamic shared memory
// (16-byte aligned).

#if defined(FASTDIT_EMULATE)
#define FD_LAUNCH(kernel, grid, block, smem, stream) \
  ((void)(stream), ::emu::launcher((kernel), (grid), (block), (smem)))
#define FD_DYNAMIC_SMEM(name) float* name = reinterpret_cast<float*>(::emu::dynamic_smem())
#else
#define FD_LAUNCH(kernel, grid, block, smem, stream) (kernel)<<<(grid), (block), (smem), (stream)>>>
#define FD_DYNAMIC_SMEM(name)                  \
  extern __shared__ float4 fd_dynamic_smem_[]; \
  float* name = reinterpret_cast<float*>(fd_dynamic_smem_)
#endif

// FD_MAX_REGISTERS(regs, threads, blocks): the register bound of a kernel. nvcc 12.4 and later
// cap it at `regs` a thread (__maxnreg__), for a kernel launched with block sizes that vary at
// run time, where __launch_bounds__(threads, blocks) would size the registers for the largest
// block only; older compilers get that __launch_bounds__. (The emulator ignores both.)
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define FD_MAX_REGISTERS(regs, threads, blocks) __maxnreg__(regs)
#else
#define FD_MAX_REGISTERS(regs, threads, blocks) __launch_bounds__(threads, blocks)
#endif

// ---------------------------------------------------------------------------------------------
// Device helpers.

#if defined(__CUDACC__)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one access of N * sizeof(T) bytes (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 16-byte vector: 4 for float, 8 for __half / __nv_bfloat16.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

// Loads N consecutive elements at p (which must be aligned to N * sizeof(T)) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

// Rounds N floats once to T and stores them at p (aligned to N * sizeof(T)).
template <typename T, int N>
__device__ __forceinline__ void store_float(T* __restrict__ p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// p, a pointer to global memory, with its value hidden from the optimiser when kHide (no
// instruction is emitted for the asm). Called on a row's base pointers inside a loop over rows,
// it stops the compiler from hoisting base + offset out of the loop for every element a thread
// addresses, which keeps a 64-bit register pair per (tensor, element) alive across the loop and
// spills (adaln_bwd_kernel); each address is then formed where it is used, one multiply-add.
// The assumption after it restores what the asm hides: the pointer is global, so the loads and
// stores stay ld.global / st.global rather than generic ones.
template <bool kHide = true, typename P>
__device__ __forceinline__ P* opaque(P* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (kHide) {
    asm volatile("" : "+l"(p));
    __builtin_assume(__isGlobal(p));
  }
#endif
  return p;
}

// v with its value hidden from the optimiser (no instruction is emitted for the asm), for an
// index such as threadIdx.x inside a loop: what is derived from it (each element's row, column
// and address in an unrolled copy of a tile) is then worked out where it is used, not hoisted
// out of the loop and kept alive across it, a register for each (attn::stage_rows).
__device__ __forceinline__ int opaque_index(int v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

// Sum over the 32 lanes of a warp; every lane gets the same, bitwise-identical total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

#endif  // __CUDACC__

}  // namespace fastdit
