// A CPU emulation of the CUDA execution model, so that csrc kernels can be run and checked on a
// machine without a GPU (tests/emulated.py builds each csrc/<family>.cu with it, for
// tests/test_adaln_cuda_emu.py, tests/test_patchify_cuda.py, tests/test_downsampled_attention*).
//
// Compile a .cu file as C++ with -DFASTDIT_EMULATE -include emulate.h. Every CUDA thread of a
// block is a fiber (ucontext) on one OS thread; __syncthreads() and the warp shuffles are
// barriers where the fiber yields to a scheduler, which resumes the fibers once every thread of
// the block (or lane of the warp) has arrived. A barrier that some threads can never reach (a
// divergent __syncthreads, a shuffle with exited lanes) is reported as a deadlock. The order in
// which the fibers run between barriers is forward, reverse or random (EMU_ORDER=fwd|rev|rand,
// default rand with a fixed seed), so that a missing barrier shows up as a wrong result. Blocks
// run one after another in the same kinds of order. Dynamic shared memory is filled with 0xFF
// bytes (NaN floats) before each block, so reading what no thread of the block wrote shows up
// too; so does reading an automatic variable no code wrote, where the compiler can fill them
// (tests/emulated.py builds with -ftrivial-auto-var-init=pattern).
//
// Launches are checked as the CUDA runtime checks them (grid and block limits, dynamic shared
// memory over 48 KB only after cudaFuncSetAttribute), and the launchers' runtime queries
// (cudaGetDevice, cudaDeviceGetAttribute, occupancy) are answered here, so the host code of the
// .cu files runs unchanged. Built with AddressSanitizer and UBSan's alignment check
// (tests/test_sanitized.py), an access outside a tensor or the dynamic shared memory, or a
// misaligned vector access, is reported as compute-sanitizer would on a GPU.
//
// Only what the fastdit kernels use is provided: 1-D blocks whose size is a multiple of 32,
// full-warp shuffles and __syncwarp, static and dynamic shared memory, the float intrinsics
// below, and the warp-wide TF32 tensor-core product mma.m16n8k8 (emu::mma_m16n8k8_tf32, with the
// fragment layouts of the PTX ISA, so that a kernel that places its fragments wrongly computes a
// wrong product here too).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  int linear = 0;
  int state = kDone;
};

struct Emulator {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::vector<std::array<uint32_t, 6>> mma_slots;  // one mma operand slot per thread
  ucontext_t scheduler;
  Thread* current = nullptr;
  dim3 grid, block;
  uint3 block_idx;
  struct AlignedFree {
    void operator()(char* p) const { ::operator delete(p, std::align_val_t(16)); }
  };
  std::unique_ptr<char, AlignedFree> dynamic;  // the dynamic shared memory of the launch
  std::function<void()> body;
  std::mt19937 rng{12345};
  int order = 2;  // 0 forward, 1 reverse, 2 random
  int sms = 2;    // the multiprocessor count the launchers see (it sizes grids and splits)
  long max_smem = 227 * 1024;  // the opt-in shared memory per block they see
  std::map<const void*, long> smem_allowed;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  std::string fault;  // the first fault of the running launch (see emu::fault)

  Emulator() {
    const char* env = std::getenv("EMU_ORDER");
    if (env != nullptr) {
      const std::string s(env);
      order = s == "fwd" ? 0 : (s == "rev" ? 1 : 2);
    }
    env = std::getenv("EMU_SMS");
    if (env != nullptr) sms = std::max(1, std::atoi(env));
  }
};

inline Emulator& em() {
  static Emulator e;
  return e;
}

// An exception thrown in device code stops its thread (unwinding never leaves the fiber's
// stack), and the launch throws it once the block's other threads have stopped or waited.
inline void trampoline() {
  try {
    em().body();
  } catch (const std::exception& error) {
    if (em().fault.empty()) em().fault = error.what();
  }
  em().current->state = kDone;
  swapcontext(&em().current->ctx, &em().scheduler);
}

inline void yield() { swapcontext(&em().current->ctx, &em().scheduler); }

inline void order_indices(std::vector<int>& order, int n) {
  order.resize(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (em().order == 1) std::reverse(order.begin(), order.end());
  if (em().order == 2) std::shuffle(order.begin(), order.end(), em().rng);
}

inline void run_block(int n) {
  Emulator& e = em();
  constexpr size_t kStack = 256 * 1024;
  if (n % 32 != 0) throw std::runtime_error("emulation: block size must be a multiple of 32");
  if (static_cast<int>(e.threads.size()) < n) {
    e.threads.resize(n);
    e.stacks.resize(n);
    e.slots.resize(n);
    e.mma_slots.resize(n);
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    if (e.stacks[i].size() != kStack) e.stacks[i].assign(kStack, 0);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = e.stacks[i].data();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, trampoline, 0);
    t.idx = make_uint3(static_cast<unsigned>(i), 0u, 0u);
    t.linear = i;
    t.state = kRunnable;
  }
  std::vector<int> order;
  for (;;) {
    order_indices(order, n);
    for (int i : order) {
      Thread& t = e.threads[i];
      if (t.state != kRunnable) continue;
      e.current = &t;
      swapcontext(&e.scheduler, &t.ctx);
    }
    e.current = nullptr;
    int done = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      done += e.threads[i].state == kDone;
      at_block += e.threads[i].state == kAtBlockBarrier;
    }
    if (!e.fault.empty()) {
      std::string what;
      std::swap(what, e.fault);
      throw std::runtime_error("emulation: fault in block (" + std::to_string(e.block_idx.x) +
                               ", " + std::to_string(e.block_idx.y) + ", " +
                               std::to_string(e.block_idx.z) + "): " + what);
    }
    if (done == n) return;
    bool released = false;
    for (int w = 0; w < n / 32; ++w) {
      int waiting = 0;
      for (int l = 0; l < 32; ++l) waiting += e.threads[w * 32 + l].state == kAtWarpBarrier;
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) e.threads[w * 32 + l].state = kRunnable;
        released = true;
      }
    }
    if (released) continue;
    if (at_block > 0 && at_block + done == n) {
      for (int i = 0; i < n; ++i) {
        if (e.threads[i].state == kAtBlockBarrier) e.threads[i].state = kRunnable;
      }
      continue;
    }
    throw std::runtime_error("emulation: deadlock (a barrier or shuffle not reached by all)");
  }
}

// The launch configuration checks of the CUDA runtime (cudaErrorInvalidConfiguration and
// friends, which the emulator throws): grid and block sizes within the limits of every GPU
// since sm_30, and dynamic shared memory above the default 48 KB only after
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= smem).
inline void check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error("emulation: invalid launch: " + what + " (grid " +
                             std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " +
                             std::to_string(grid.z) + ", block " + std::to_string(block.x) +
                             " x " + std::to_string(block.y) + " x " + std::to_string(block.z) +
                             ", " + std::to_string(smem) + " bytes of dynamic shared memory)");
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("an empty grid");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) fail("grid too large");
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) fail("block size out of range");
  if (static_cast<long>(smem) > em().max_smem) fail("more shared memory than the device has");
  if (smem > 48 * 1024) {
    const auto allowed = em().smem_allowed.find(kernel);
    if (allowed == em().smem_allowed.end() || allowed->second < static_cast<long>(smem)) {
      fail("over 48 KB of dynamic shared memory without cudaFuncSetAttribute");
    }
  }
}

// A block starts with 0xFF bytes (NaN floats) in its dynamic shared memory, whatever the block
// before it left there: a read of what no thread of the block wrote shows up as a wrong result,
// not as the previous block's data. (Static __shared__ arrays are plain static variables, zeros
// at first and then what the last block left: GCC places a template's static variables where
// it likes, so the emulator cannot find them to refill.)
inline void poison_shared(size_t dynamic_bytes) {
  std::memset(em().dynamic.get(), 0xFF, dynamic_bytes);
}

template <typename K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) const {
    Emulator& e = em();
    check_launch(reinterpret_cast<const void*>(kernel), grid, block, smem);
    e.grid = grid;
    e.block = block;
    // Exactly `smem` bytes (16-byte aligned, as the hardware aligns it at least), so that a
    // sanitizer sees an access past the end.
    e.dynamic.reset(static_cast<char*>(::operator new(smem ? smem : 1, std::align_val_t(16))));
    const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
    std::vector<long> order(blocks);
    for (long i = 0; i < blocks; ++i) order[i] = i;
    if (e.order == 1) std::reverse(order.begin(), order.end());
    if (e.order == 2) std::shuffle(order.begin(), order.end(), e.rng);
    for (long id : order) {
      e.block_idx = make_uint3(static_cast<unsigned>(id % grid.x),
                               static_cast<unsigned>((id / grid.x) % grid.y),
                               static_cast<unsigned>(id / (static_cast<long>(grid.x) * grid.y)));
      e.body = [&]() { kernel(args...); };
      poison_shared(smem);
      run_block(static_cast<int>(block.x * block.y * block.z));
    }
  }
};

template <typename K>
Launch<K> launcher(K kernel, dim3 grid, dim3 block, size_t smem) {
  return Launch<K>{kernel, grid, block, smem};
}

inline void* dynamic_smem() { return em().dynamic.get(); }

// The order of fibers and blocks (0 forward, 1 reverse, 2 random with this seed), the
// multiprocessor count and the shared memory per block, for the tests.
inline void configure(int order, int sms, unsigned seed, long max_smem) {
  em().order = order;
  em().sms = std::max(1, sms);
  em().rng.seed(seed);
  em().max_smem = max_smem;
}

// All 32 lanes of the current warp publish v, then each reads the value of lane src(lane).
template <typename V, typename F>
V exchange(V v, F src) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  Emulator& e = em();
  Thread* t = e.current;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(V));
  e.slots[t->linear] = raw;
  t->state = kAtWarpBarrier;
  yield();
  const int lane = t->linear % 32;
  const uint64_t got = e.slots[t->linear - lane + src(lane)];
  t->state = kAtWarpBarrier;  // nobody overwrites a slot before every lane has read
  yield();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

// The lanes of the current warp meet (a __syncwarp, or half of a warp-collective operation).
inline void warp_barrier() {
  em().current->state = kAtWarpBarrier;
  yield();
}

// The fp32 sum of one output of a tensor-core product: the 8 (exact) products and the
// accumulator. The hardware does not round like a chain of fp32 adds; the published measurements
// (Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ
// Computer Science, 2021) find the addends aligned to the largest exponent with the bits
// shifted out dropped, and the sum normalised by truncation, some generations keeping a few
// extra bits. Modelled here is the least accurate variant, with no extra bits: each addend is
// truncated to a multiple of 2^(e - 24), where 2^e bounds the largest, the truncated addends are
// summed exactly, and the sum is rounded toward zero to fp32. Kernels tested against this model
// are tested with an error no smaller than the hardware's.
inline float tensor_core_sum(const double (&terms)[9]) {
  double largest = 0.0, plain = 0.0;
  for (double t : terms) {
    largest = std::max(largest, std::fabs(t));
    plain += t;
  }
  if (largest == 0.0 || !std::isfinite(largest)) return static_cast<float>(plain);
  int e = 0;
  std::frexp(largest, &e);  // largest < 2^e
  const double quantum = std::ldexp(1.0, e - 24);
  double sum = 0.0;  // exact: 9 multiples of quantum below 2^24 quanta each
  for (double t : terms) sum += std::trunc(t / quantum) * quantum;
  float f = static_cast<float>(sum);
  if (std::fabs(static_cast<double>(f)) > std::fabs(sum)) f = std::nextafter(f, 0.0f);
  return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A (16x8) B (8x8), for the whole warp.
// Fragments as the PTX ISA lays them out, with groupID = lane / 4 and tig = lane % 4:
//   A: a0 (groupID, tig), a1 (groupID + 8, tig), a2 (groupID, tig + 4), a3 (groupID + 8, tig + 4)
//   B: b0 (row tig, col groupID), b1 (row tig + 4, col groupID)
//   C, D: c0 (groupID, 2 tig), c1 (groupID, 2 tig + 1), c2 (groupID + 8, 2 tig),
//         c3 (groupID + 8, 2 tig + 1).
// The tensor cores read only the TF32 bits of each operand (sign, exponent, 10 mantissa bits):
// the low 13 bits are dropped here too. The sum is tensor_core_sum's.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Emulator& e = em();
  Thread* t = e.current;
  e.mma_slots[t->linear] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  warp_barrier();
  const int lane = t->linear % 32;
  const int base = t->linear - lane;
  const auto tf32 = [](uint32_t bits) {
    bits &= 0xFFFFE000u;
    float f;
    std::memcpy(&f, &bits, 4);
    return static_cast<double>(f);
  };
  const auto a_at = [&](int row, int col) {  // A[row][col], row < 16, col < 8
    const int reg = (row >= 8 ? 1 : 0) + (col >= 4 ? 2 : 0);
    return tf32(e.mma_slots[base + (row % 8) * 4 + col % 4][reg]);
  };
  const auto b_at = [&](int row, int col) {  // B[row][col], row < 8, col < 8
    return tf32(e.mma_slots[base + col * 4 + row % 4][4 + (row >= 4 ? 1 : 0)]);
  };
  const int g = lane / 4, tig = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * tig + (i % 2);
    double terms[9];
    for (int k = 0; k < 8; ++k) terms[k] = a_at(row, k) * b_at(k, col);  // exact in double
    terms[8] = d[i];
    out[i] = tensor_core_sum(terms);
  }
  warp_barrier();  // nobody overwrites a slot before every lane has read
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

}  // namespace emu

#define threadIdx (::emu::em().current->idx)
#define blockIdx (::emu::em().block_idx)
#define blockDim (::emu::em().block)
#define gridDim (::emu::em().grid)

inline void __syncthreads() {
  ::emu::em().current->state = ::emu::kAtBlockBarrier;
  ::emu::yield();
}

inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::warp_barrier(); }

template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask) {
  return ::emu::exchange(v, [mask](int lane) { return (lane ^ mask) & 31; });
}
template <typename V>
V __shfl_down_sync(unsigned, V v, unsigned delta) {
  return ::emu::exchange(v, [delta](int lane) {
    return lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : lane;
  });
}
template <typename V>
V __shfl_sync(unsigned, V v, int src) {
  return ::emu::exchange(v, [src](int) { return src & 31; });
}

using std::max;
using std::min;

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float __frsqrt_rn(float x) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x)));
}
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// The CUDA runtime's host calls that launchers make, answered by the emulator (nothing is linked
// against cudart): the last-error slot is always clear (an emulated launch that cannot run
// throws instead), the device has `sms` multiprocessors and `max_smem` bytes of opt-in shared
// memory per block, and every kernel keeps 2 blocks resident per multiprocessor. Macros, so that
// the cudart symbols of a library loaded alongside (torch's) are never called by mistake.
namespace emu {
inline cudaError_t last_error() { return cudaSuccess; }
inline cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    *value = em().sms;
  } else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = static_cast<int>(em().max_smem);
  } else {
    throw std::runtime_error("emulation: device attribute " +
                             std::to_string(static_cast<int>(attr)) + " is not emulated");
  }
  return cudaSuccess;
}
template <typename K>
cudaError_t occupancy(int* blocks, K, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
template <typename K>
cudaError_t func_set_attribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    throw std::runtime_error("emulation: function attribute " +
                             std::to_string(static_cast<int>(attr)) + " is not emulated");
  }
  if (value < 0 || value > em().max_smem) return cudaErrorInvalidValue;
  em().smem_allowed[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
}  // namespace emu

#define cudaGetLastError ::emu::last_error
#define cudaPeekAtLastError ::emu::last_error
#define cudaDeviceGetAttribute ::emu::device_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::emu::occupancy
#define cudaFuncSetAttribute ::emu::func_set_attribute
#define cudaGetDevice ::emu::get_device
