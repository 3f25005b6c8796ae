// adaLN modulate, forward:
//
//   out[b, l, :] = LayerNorm(x[b, l, :]) * (1 + scale[b, :]) + shift[b, :]
//
// x, out: (B, L, D) contiguous; shift, scale: (B, D) contiguous; one dtype for all four.
// LayerNorm has no affine weights, uses the biased variance and eps inside the square root, as
// torch.nn.functional.layer_norm. Statistics are taken in fp32 in two passes over the row held
// in registers (mean first, then the sum of squared deviations), and each output is computed in
// fp32 and rounded once to the output dtype.
//
// The op is memory-bound. The floor is the bytes moved:
//   2 * B * L * D * sizeof(T)   (read x once, write out once)
// + 2 * B * D * sizeof(T)       (shift and scale; re-read per row, but from L1/L2)
// so the kernels read each x element from global memory exactly once (the row stays in
// registers) and use 16-byte accesses where the row length and the pointers allow.
//
// Kernel shapes, by the number of vectors per row (nvec = D / V, V elements per access):
//   nvec <= 256          one warp per row, 4 rows per 128-thread block, ITERS = ceil(nvec / 32)
//   nvec <= 1024 * K     one block of 128..1024 threads per row, K vectors per thread
//                        (K = 4 for 16-byte vectors, 8 for scalars)
//   larger               one 1024-thread block per row that re-reads the row from global
//                        memory (L2) for each pass: correct for any D, not the fast path
// V = 16 / sizeof(T) when D * sizeof(T) and all four pointers are multiples of 16 bytes; V = 1
// (scalar accesses) otherwise.

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"

namespace fastdit {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpModeBlock = 128;  // threads per block in warp-per-row mode (4 rows)
constexpr int kWarpModeMaxIters = 8;
constexpr int kBigThreads = 1024;

// a / d for d >= 1, given inv_d = 1 / d correctly rounded: one Newton correction of a * inv_d,
// which gives the correctly rounded quotient (so it is exact when representable, e.g. the mean
// of a constant row) without the IEEE division's slow-path subroutine.
__device__ __forceinline__ float divide(float a, float d, float inv_d) {
  const float q = a * inv_d;
  return fmaf(fmaf(-q, d, a), inv_d, q);
}

// Sum of v over the TPR threads that share a row. For TPR == 32 that is the warp; for larger
// TPR the whole block (one row per block), through `smem` (32 floats). Every thread of the row
// gets the same total. Callers use a different smem array for each of the two reductions of a
// row, which makes one __syncthreads per reduction enough (see adaln_fwd_regs_kernel).
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* smem) {
  static_assert(TPR == kWarp || (TPR > kWarp && TPR % kWarp == 0 && TPR <= 1024), "bad TPR");
  v = warp_sum(v);
  if constexpr (TPR > kWarp) {
    constexpr int kWarps = TPR / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (lane == 0) smem[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = warp_sum(lane < kWarps ? smem[lane] : 0.f);
  }
  return v;
}

// The row in registers: thread t of a row holds vectors t, t + TPR, t + 2 * TPR, ... (ITERS of
// them, V elements each), so each access instruction of a warp covers 32 * V consecutive
// elements.
template <typename T, int V, int TPR, int ITERS>
__global__ void __launch_bounds__(TPR > kWarp ? TPR : kWarpModeBlock)
    adaln_fwd_regs_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                          const T* __restrict__ scale, T* __restrict__ out, uint32_t rows,
                          uint32_t L, int D, float eps) {
  constexpr int kRowsPerBlock = TPR > kWarp ? 1 : kWarpModeBlock / TPR;
  __shared__ float smem_mean[TPR > kWarp ? kWarp : 1];
  __shared__ float smem_var[TPR > kWarp ? kWarp : 1];

  const int t = static_cast<int>(threadIdx.x % TPR);
  const int nvec = D / V;
  const float d_f = static_cast<float>(D);
  const float inv_d = __frcp_rn(d_f);

  // Grid-stride over rows; `row` is uniform over the threads of a row (a warp or the block).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* xr = x + row * D;

    // Pass 1: load the row once, sum it.
    float v[ITERS][V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * TPR + t;
      if (c < nvec) {
        load_float<T, V>(xr + static_cast<int64_t>(c) * V, v[i]);
#pragma unroll
        for (int j = 0; j < V; ++j) sum += v[i][j];
      }
    }
    const float mean = divide(row_sum<TPR>(sum, smem_mean), d_f, inv_d);

    // Pass 2 (registers only): sum of squared deviations from the mean.
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (i * TPR + t < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[i][j] - mean;
          m2 += d * d;
        }
      }
    }
    const float var = divide(row_sum<TPR>(m2, smem_var), d_f, inv_d);
    const float rstd = __frsqrt_rn(var + eps);  // 1 / sqrt, correctly rounded

    // Normalize, modulate, round once, store.
    const uint32_t b = static_cast<uint32_t>(row) / L;
    const T* sh = shift + static_cast<int64_t>(b) * D;
    const T* sc = scale + static_cast<int64_t>(b) * D;
    T* o = out + row * D;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * TPR + t;
      if (c < nvec) {
        float shv[V], scv[V], y[V];
        load_float<T, V>(sh + static_cast<int64_t>(c) * V, shv);
        load_float<T, V>(sc + static_cast<int64_t>(c) * V, scv);
#pragma unroll
        for (int j = 0; j < V; ++j) y[j] = ((v[i][j] - mean) * rstd) * (1.f + scv[j]) + shv[j];
        store_float<T, V>(o + static_cast<int64_t>(c) * V, y);
      }
    }
  }
}

// Rows too long for registers: the same three steps, each re-reading the row from memory.
template <typename T, int V>
__global__ void __launch_bounds__(kBigThreads)
    adaln_fwd_big_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                         const T* __restrict__ scale, T* __restrict__ out, uint32_t rows,
                         uint32_t L, int D, float eps) {
  __shared__ float smem_mean[kWarp];
  __shared__ float smem_var[kWarp];
  const int nvec = D / V;
  const float d_f = static_cast<float>(D);
  const float inv_d = __frcp_rn(d_f);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * D;
    float sum = 0.f;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      float v[V];
      load_float<T, V>(xr + static_cast<int64_t>(c) * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) sum += v[j];
    }
    const float mean = divide(row_sum<kBigThreads>(sum, smem_mean), d_f, inv_d);

    float m2 = 0.f;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      float v[V];
      load_float<T, V>(xr + static_cast<int64_t>(c) * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = v[j] - mean;
        m2 += d * d;
      }
    }
    const float var = divide(row_sum<kBigThreads>(m2, smem_var), d_f, inv_d);
    const float rstd = __frsqrt_rn(var + eps);  // 1 / sqrt, correctly rounded

    const uint32_t b = static_cast<uint32_t>(row) / L;
    const T* sh = shift + static_cast<int64_t>(b) * D;
    const T* sc = scale + static_cast<int64_t>(b) * D;
    T* o = out + row * D;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      const int64_t e = static_cast<int64_t>(c) * V;
      float v[V], shv[V], scv[V], y[V];
      load_float<T, V>(xr + e, v);
      load_float<T, V>(sh + e, shv);
      load_float<T, V>(sc + e, scv);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = ((v[j] - mean) * rstd) * (1.f + scv[j]) + shv[j];
      store_float<T, V>(o + e, y);
    }
  }
}

struct Args {
  const void* x;
  const void* shift;
  const void* scale;
  void* out;
  uint32_t rows;  // rows of this launch (a chunk of B * L, see launch_chunks)
  uint32_t L;
  int D;
  float eps;
  cudaStream_t stream;
};

inline unsigned grid_for(int64_t groups) {
  return static_cast<unsigned>(std::min<int64_t>(groups, INT_MAX));
}

template <typename T, int V, int TPR, int ITERS>
void launch_regs(const Args& a) {
  constexpr int kThreads = TPR > kWarp ? TPR : kWarpModeBlock;
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t groups = (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  adaln_fwd_regs_kernel<T, V, TPR, ITERS><<<grid_for(groups), kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.shift),
      static_cast<const T*>(a.scale), static_cast<T*>(a.out), a.rows, a.L, a.D, a.eps);
}

template <typename T, int V>
void launch_big(const Args& a) {
  adaln_fwd_big_kernel<T, V><<<grid_for(a.rows), kBigThreads, 0, a.stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.shift),
      static_cast<const T*>(a.scale), static_cast<T*>(a.out), a.rows, a.L, a.D, a.eps);
}

template <typename T, int V>
void launch_with_vec(const Args& a) {
  const int nvec = a.D / V;
  if (nvec <= kWarp * kWarpModeMaxIters) {
    switch ((nvec + kWarp - 1) / kWarp) {
      case 1: return launch_regs<T, V, kWarp, 1>(a);
      case 2: return launch_regs<T, V, kWarp, 2>(a);
      case 3: return launch_regs<T, V, kWarp, 3>(a);
      case 4: return launch_regs<T, V, kWarp, 4>(a);
      case 5: return launch_regs<T, V, kWarp, 5>(a);
      case 6: return launch_regs<T, V, kWarp, 6>(a);
      case 7: return launch_regs<T, V, kWarp, 7>(a);
      default: return launch_regs<T, V, kWarp, 8>(a);
    }
  }
  // At most 32 floats of row per thread (<= 64 registers at 1024 threads per block).
  constexpr int K = V == 1 ? 8 : 4;
  if (nvec <= 128 * K) return launch_regs<T, V, 128, K>(a);
  if (nvec <= 256 * K) return launch_regs<T, V, 256, K>(a);
  if (nvec <= 512 * K) return launch_regs<T, V, 512, K>(a);
  if (nvec <= 1024 * K) return launch_regs<T, V, 1024, K>(a);
  return launch_big<T, V>(a);
}

// The kernels index rows with 32 bits (a 64-bit division per row is a long subroutine on the
// GPU); element offsets are 64-bit. More than 2^31 rows go in several launches, each starting
// at a batch boundary, or inside one batch when L alone is that large.
template <typename T, int V>
void launch_chunks(const Args& base, int64_t B, int64_t L) {
  constexpr int64_t kMaxRows = int64_t{1} << 31;
  const int64_t D = base.D;
  const auto at = [](const void* p, int64_t elems) {
    return static_cast<const void*>(static_cast<const T*>(p) + elems);
  };
  Args a = base;
  if (B * L <= kMaxRows) {
    a.rows = static_cast<uint32_t>(B * L);
    a.L = static_cast<uint32_t>(L);
    return launch_with_vec<T, V>(a);
  }
  if (L <= kMaxRows) {
    const int64_t per_launch = kMaxRows / L;  // whole batches per launch
    for (int64_t b0 = 0; b0 < B; b0 += per_launch) {
      const int64_t nb = std::min(per_launch, B - b0);
      a.x = at(base.x, b0 * L * D);
      a.out = const_cast<void*>(at(base.out, b0 * L * D));
      a.shift = at(base.shift, b0 * D);
      a.scale = at(base.scale, b0 * D);
      a.rows = static_cast<uint32_t>(nb * L);
      a.L = static_cast<uint32_t>(L);
      launch_with_vec<T, V>(a);
    }
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l0 = 0; l0 < L; l0 += kMaxRows) {
      const int64_t n = std::min(kMaxRows, L - l0);
      a.x = at(base.x, (b * L + l0) * D);
      a.out = const_cast<void*>(at(base.out, (b * L + l0) * D));
      a.shift = at(base.shift, b * D);
      a.scale = at(base.scale, b * D);
      a.rows = static_cast<uint32_t>(n);
      a.L = static_cast<uint32_t>(n);  // every row of this launch is in batch b
      launch_with_vec<T, V>(a);
    }
  }
}

template <typename T>
void launch_typed(const Args& a, int64_t B, int64_t L) {
  const bool vec = (static_cast<int64_t>(a.D) * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   is_aligned(a.x, 16) && is_aligned(a.shift, 16) && is_aligned(a.scale, 16) &&
                   is_aligned(a.out, 16);
  if (vec) {
    launch_chunks<T, kVec16<T>>(a, B, L);
  } else {
    launch_chunks<T, 1>(a, B, L);
  }
}

}  // namespace

// Enqueues the kernel(s) on `stream` on the current device; returns cudaGetLastError(). Sizes
// must be validated by the caller (bindings.cpp): B, L >= 0, 1 <= D <= INT_MAX, B * L * D in
// int64.
cudaError_t adaln_modulate_fwd_launch(const void* x, const void* shift, const void* scale,
                                      void* out, int64_t B, int64_t L, int64_t D, float eps,
                                      int dtype, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  const Args a{x, shift, scale, out, 0, 0, static_cast<int>(D), eps, stream};
  dispatch_dtype(dtype, "adaln_modulate_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_typed<T>(a, B, L);
  });
  return cudaGetLastError();
}

// A kernel of this family, for runtime_check's "is there an image for this GPU" probe.
const void* adaln_probe_kernel() {
  return reinterpret_cast<const void*>(&adaln_fwd_regs_kernel<float, 1, kWarp, 1>);
}

}  // namespace fastdit
