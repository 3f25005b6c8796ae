// The adaLN family: modulate and gated residual + modulate, forward and backward.
//
//   modulate:  out[b, l, :] = LayerNorm(x[b, l, :]) * (1 + scale[b, :]) + shift[b, :]
//   gated:     r = x + gate[b, :] * y;  out = modulate(r)       (both r and out are outputs)
//
// Rows: x, y, r, out and the gradients are B * L rows of D contiguous elements: (B, L, D)
// tokens, or channels-last (B, D, H, W) images (L = H * W), which are the same in memory.
// Contiguous channels-first (B, D, H, W) images have their own kernels, which take a tile of
// tokens and any D (the section "Channels-first images"); everything below them holds for them
// too but the kernel shapes, the statistics' method and the splits.
// shift, scale, gate and their gradients: (B, D) contiguous. Dtypes: the rows x, r, out and
// their gradients in T (float, __half or __nv_bfloat16); y, gate, shift, scale and their
// gradients (dy included) in C, which is T or, with float rows, __half or __nv_bfloat16: what
// autocast gives a float32 residual stream, whose low-precision branch is then read as it is,
// not first copied to float32 (the results are those of the copy, bit for bit: widening is
// exact). Every value is computed in fp32 and rounded once to its tensor's dtype.
// LayerNorm has no affine weights, uses the biased variance and eps inside the square root, as
// torch.nn.functional.layer_norm. Statistics are taken in fp32 in two passes over the row held in
// registers (mean first, then the sum of squared deviations). For gated, r is rounded to the
// dtype before it is normalised, so out is exactly modulate(r) of the r that is returned.
//
// Backward, with n = (x' - mean) * rstd (x' = x for modulate, r for gated) and
// g = dout * (1 + scale):
//   dx'       = rstd * (g - mean_D(g) - n * mean_D(g * n))
//   modulate: dx = dx'
//   gated:    dx = dr + dx',  dy = gate * dx,  dgate = sum_L(dx * y)
//   both:     dshift = sum_L(dout),  dscale = sum_L(dout * n)
// The statistics (and r) are recomputed from the inputs; nothing else is saved by the forward.
// The sums over the L rows of a sample are deterministic: block (b, split) adds its rows in a
// fixed order (each thread owns fixed columns; the row groups of a block are combined in group
// order through shared memory) and writes one fp32 partial row per gradient into `partial`, a
// scratch buffer of planes * B * splits * D floats that the caller allocates; a second kernel
// adds each sample's partials in split order and rounds once. Same inputs and same `splits`:
// bitwise-identical gradients.
//
// The ops are memory-bound. The floor is the bytes that must move (N = B * L * D, e = sizeof(T),
// c = sizeof(C)):
//   modulate forward   2 N e         (read x, write out)
//   gated forward      N (3 e + c)   (read x, y; write r, out)
//   modulate backward  3 N e         (read x, dout; write dx)
//   gated backward     N (4 e + 2 c) (read x, y, dr, dout; write dx, dy)
// plus a few B * D for the conditioning vectors (re-read per row, from L1/L2) and, for the
// backward, 2 or 3 partial planes of B * splits * D fp32 written once and read once.
// adaln_bwd_splits picks splits from the backward kernel's occupancy: the count whose blocks
// fill the waves of resident blocks best (at most four waves), >= 16 rows each, so the partials
// are a few percent of the traffic (and mostly stay in L2).
// Under autocast (float rows, bf16 branch) the gated ops move 14 N and 20 N bytes; casting the
// branch to float32 first would move 22 N and 30 N, counting the casts (read 2, write 4; and in
// the backward the fp32 dy written, read and cast back).
// Expected on an H100 (HBM3 3.35 TB/s, a device-to-device copy measures ~2.6-3.0 TB/s), not yet
// measured: forward ~85-90 % of the copy bandwidth at DiT-XL/2 and U-DiT-B channels-last shapes,
// backward ~70-80 %. At DiT-XL/2 B 256 bf16 (N e = 151 MB) and ~2.8 TB/s copy: modulate forward
// ~125 us, gated forward ~245 us, gated backward ~430 us.
// Register use (ptxas -v, nvcc 13.0; tests/test_adaln_cuda_emu.py checks it): forward 22-96
// registers, no spills (sm_80: 8 bytes in three warp-per-row kernels, where ptxas stops at
// 32-48 registers); backward 32-128 (the gated 16-bit kernels with one vector a thread capped
// at 96: four DiT-XL/2 blocks per SM), spills only in the gated backward at D > 2048: 8-16 bytes
// of stack for fp32 on the vector path, 104-232 on the scalar path (misaligned pointers, or
// D * sizeof(T) not a multiple of 16; correct, not the fast path). Channels-first kernels:
// forward 39-64, backward 40-98, no spills (sm_90: 2 backward blocks of 256 threads per SM at
// 4 tokens a thread, 4 forward blocks).
//
// Forward kernel shapes, by the number of vectors per row (nvec = D / V, V elements per access):
//   nvec <= 256          one warp per row, 4 rows per 128-thread block, ITERS = ceil(nvec / 32)
//   nvec <= 1024 * K     one block of 128..1024 threads per row, K vectors per thread
//                        (K = 4 for 16-byte vectors, 8 for scalars)
//   larger               one 1024-thread block per row that re-reads the row from global
//                        memory (L2) for each pass: correct for any D, not the fast path
// Backward kernel: a row group of G threads holds a row, ITERS vectors per thread (at most 16
// elements); a block holds R = max(1, 256 / G) groups working on R rows of the same sample at
// once, and loops over the rows of its (sample, split). D <= kBwdMaxD.
// V = 16 / sizeof(T) when D * sizeof(T) is a multiple of 16 bytes and every pointer is aligned
// to V elements of its type (16 bytes for rows, 16 or 8 for the C tensors); V = 1 (scalar
// accesses) otherwise.
//
// Built with -DFASTDIT_EMULATE (tests/cuda_emu/emulate.h, tests/cuda_emu/adaln_module.cpp), the
// same kernels run on the CPU as fibers: that is how they are tested on machines without a GPU.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace fastdit {

constexpr int64_t kBwdMaxD = 8192;

namespace {

constexpr int kWarp = 32;
constexpr int kWarpModeBlock = 128;  // threads per block in warp-per-row mode (4 rows)
constexpr int kWarpModeMaxIters = 8;
constexpr int kBigThreads = 1024;
constexpr int kBwdMaxThreads = 512;
constexpr int kBwdMaxWarps = kBwdMaxThreads / kWarp;
constexpr int kBwdBlockTarget = 256;  // threads per backward block when a row needs fewer
constexpr int kBwdMaxElems = 16;      // row elements per thread per tensor in the backward
constexpr int kBwdCapRegisters = 96;  // adaln_bwd_capped_kernel: 4 blocks of 5 warps an SM

// a / d for d >= 1, given inv_d = 1 / d correctly rounded: one Newton correction of a * inv_d,
// which gives the correctly rounded quotient (so it is exact when representable, e.g. the mean
// of a constant row) without the IEEE division's slow-path subroutine.
__device__ __forceinline__ float divide(float a, float d, float inv_d) {
  const float q = a * inv_d;
  return fmaf(fmaf(-q, d, a), inv_d, q);
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
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

template <typename T, typename C>
struct FwdParams {
  const T* x;
  const C* y;     // gated only
  const C* gate;  // gated only
  const C* shift;
  const C* scale;
  T* r;  // gated only
  T* out;
  uint32_t rows;  // rows of this launch (a chunk of B * L, see launch_chunks)
  uint32_t L;
  int D;
  float eps;
};

// The row in registers: thread t of a row holds vectors t, t + TPR, t + 2 * TPR, ... (ITERS of
// them, V elements each), so each access instruction of a warp covers 32 * V consecutive
// elements.
template <typename T, typename C, int V, int TPR, int ITERS, bool GATED>
__global__ void __launch_bounds__(TPR > kWarp ? TPR : kWarpModeBlock)
    adaln_fwd_regs_kernel(const FwdParams<T, C> p) {
  constexpr int kRowsPerBlock = TPR > kWarp ? 1 : kWarpModeBlock / TPR;
  __shared__ float smem_mean[TPR > kWarp ? kWarp : 1];
  __shared__ float smem_var[TPR > kWarp ? kWarp : 1];

  const int D = p.D;
  const int t = static_cast<int>(threadIdx.x % TPR);
  const int nvec = D / V;
  const float d_f = static_cast<float>(D);
  const float inv_d = __frcp_rn(d_f);

  // Grid-stride over rows; `row` is uniform over the threads of a row (a warp or the block).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
       row < p.rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t b = static_cast<uint32_t>(row) / p.L;
    const T* __restrict__ xr = p.x + row * D;

    // Pass 1: load the row once (and, gated, form r = x + gate * y, rounded, and store it),
    // sum it.
    float v[ITERS][V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * TPR + t;
      if (c < nvec) {
        const int64_t e = static_cast<int64_t>(c) * V;
        load_float<T, V>(xr + e, v[i]);
        if constexpr (GATED) {
          float yv[V], gv[V];
          load_float<C, V>(p.y + row * D + e, yv);
          load_float<C, V>(p.gate + b * D + e, gv);
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = round_to<T>(fmaf(gv[j], yv[j], v[i][j]));
          store_float<T, V>(p.r + row * D + e, v[i]);
        }
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
    const float rstd = __frsqrt_rn(var + p.eps);  // 1 / sqrt, correctly rounded

    // Normalize, modulate, round once, store.
    const C* __restrict__ sh = p.shift + b * D;
    const C* __restrict__ sc = p.scale + b * D;
    T* __restrict__ o = p.out + row * D;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * TPR + t;
      if (c < nvec) {
        const int64_t e = static_cast<int64_t>(c) * V;
        float shv[V], scv[V], y[V];
        load_float<C, V>(sh + e, shv);
        load_float<C, V>(sc + e, scv);
#pragma unroll
        for (int j = 0; j < V; ++j) y[j] = ((v[i][j] - mean) * rstd) * (1.f + scv[j]) + shv[j];
        store_float<T, V>(o + e, y);
      }
    }
  }
}

// Rows too long for registers: the same three steps, each re-reading the row from memory (for
// gated, pass 1 writes r and the later passes read it back: the same thread, the same elements).
template <typename T, typename C, int V, bool GATED>
__global__ void __launch_bounds__(kBigThreads) adaln_fwd_big_kernel(const FwdParams<T, C> p) {
  __shared__ float smem_mean[kWarp];
  __shared__ float smem_var[kWarp];
  const int D = p.D;
  const int nvec = D / V;
  const float d_f = static_cast<float>(D);
  const float inv_d = __frcp_rn(d_f);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t b = static_cast<uint32_t>(row) / p.L;
    const T* src = GATED ? p.r + row * D : p.x + row * D;  // the row that is normalised
    float sum = 0.f;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      const int64_t e = static_cast<int64_t>(c) * V;
      float v[V];
      load_float<T, V>(p.x + row * D + e, v);
      if constexpr (GATED) {
        float yv[V], gv[V];
        load_float<C, V>(p.y + row * D + e, yv);
        load_float<C, V>(p.gate + b * D + e, gv);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = round_to<T>(fmaf(gv[j], yv[j], v[j]));
        store_float<T, V>(p.r + row * D + e, v);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) sum += v[j];
    }
    const float mean = divide(row_sum<kBigThreads>(sum, smem_mean), d_f, inv_d);

    float m2 = 0.f;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      float v[V];
      load_float<T, V>(src + static_cast<int64_t>(c) * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = v[j] - mean;
        m2 += d * d;
      }
    }
    const float var = divide(row_sum<kBigThreads>(m2, smem_var), d_f, inv_d);
    const float rstd = __frsqrt_rn(var + p.eps);

    const C* sh = p.shift + b * D;
    const C* sc = p.scale + b * D;
    T* o = p.out + row * D;
    for (int c = threadIdx.x; c < nvec; c += kBigThreads) {
      const int64_t e = static_cast<int64_t>(c) * V;
      float v[V], shv[V], scv[V], y[V];
      load_float<T, V>(src + e, v);
      load_float<C, V>(sh + e, shv);
      load_float<C, V>(sc + e, scv);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = ((v[j] - mean) * rstd) * (1.f + scv[j]) + shv[j];
      store_float<T, V>(o + e, y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T, typename C>
struct BwdParams {
  const T* x;
  const C* y;     // gated only
  const C* gate;  // gated only
  const C* scale;
  const T* dr;  // gated only: the cotangent of r
  const T* dh;  // the cotangent of out
  T* dx;
  C* dy;           // gated only
  float* partial;  // planes x [B][splits][D]: d shift, d scale (, d gate) partial sums
  int64_t plane;   // B * splits * D
  uint32_t L;
  uint32_t splits;
  uint32_t rows_per_split;
  int D;
  int group;  // G, threads per row (SUB when SUB < 32, else a multiple of 32)
  float eps;
};

// Sum of v over the G threads of a row group. SUB < 32: G = SUB lanes of one warp (shuffles).
// SUB == 32: G = wpg whole warps; for wpg > 1 through smem (one slot per warp of the block) and
// one __syncthreads, so every thread of the block must call it. The wpg partial sums are added
// in warp order by every thread of the group, so all get the same, bitwise-identical total.
// Callers use a distinct smem array for each reduction of a row (see adaln_fwd_regs_kernel).
template <int SUB>
__device__ __forceinline__ float group_sum(float v, float* smem, int wpg) {
  if constexpr (SUB < kWarp) {
#pragma unroll
    for (int offset = SUB / 2; offset > 0; offset >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
  } else {
    v = warp_sum(v);
    if (wpg == 1) return v;
    const int warp = static_cast<int>(threadIdx.x) / kWarp;
    if (threadIdx.x % kWarp == 0) smem[warp] = v;
    __syncthreads();
    const int first = warp - warp % wpg;
    float total = 0.f;
    for (int w = 0; w < wpg; ++w) total += smem[first + w];
    return total;
  }
}

// Two sums at once (one __syncthreads for both).
template <int SUB>
__device__ __forceinline__ void group_sum2(float& a, float& b, float* smem_a, float* smem_b,
                                           int wpg) {
  if constexpr (SUB < kWarp) {
#pragma unroll
    for (int offset = SUB / 2; offset > 0; offset >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, offset);
      b += __shfl_xor_sync(0xffffffffu, b, offset);
    }
  } else {
    a = warp_sum(a);
    b = warp_sum(b);
    if (wpg == 1) return;
    const int warp = static_cast<int>(threadIdx.x) / kWarp;
    if (threadIdx.x % kWarp == 0) {
      smem_a[warp] = a;
      smem_b[warp] = b;
    }
    __syncthreads();
    const int first = warp - warp % wpg;
    a = 0.f;
    b = 0.f;
    for (int w = 0; w < wpg; ++w) {
      a += smem_a[first + w];
      b += smem_b[first + w];
    }
  }
}

// Block (b, split): R row groups of G threads; group g takes rows begin + g, begin + g + R, ...
// Thread t of a group owns vectors t, t + G, ... (ITERS of them) of every row, and adds its
// columns' contributions to d shift, d scale (and d gate) in registers as the rows go by.
// The body of both backward kernels below.
template <typename T, typename C, int V, int ITERS, int SUB, bool GATED>
__device__ __forceinline__ void adaln_bwd_rows(const BwdParams<T, C>& p) {
  FD_DYNAMIC_SMEM(combine);  // R * D floats, when R > 1
  __shared__ float sm_mean[kBwdMaxWarps];
  __shared__ float sm_var[kBwdMaxWarps];
  __shared__ float sm_g[kBwdMaxWarps];
  __shared__ float sm_gn[kBwdMaxWarps];
  // Up to 8 elements per thread and tensor, every load of a row is issued at its start; with
  // 16, dr is loaded at the end and y re-read there (from L1), to stay within 128 registers.
  constexpr bool kHold = ITERS * V <= 8;
  // See the row pointers below: where hiding them removes spills (ptxas, sm_80 and sm_90).
  constexpr bool kOpaque =
      ITERS >= 2 && (V == 1 || (std::is_same_v<T, float> && std::is_same_v<C, float>));

  const int D = p.D;
  const int nvec = D / V;
  const int G = SUB < kWarp ? SUB : p.group;
  const int wpg = SUB < kWarp ? 1 : G / kWarp;
  const int R = static_cast<int>(blockDim.x) / G;
  const int g = static_cast<int>(threadIdx.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const float d_f = static_cast<float>(D);
  const float inv_d = __frcp_rn(d_f);

  const uint32_t b = blockIdx.x / p.splits;
  const uint32_t split = blockIdx.x % p.splits;
  // split * rows_per_split < L + rows_per_split <= 2 L < 2^32 (bindings: L < 2^31).
  const uint32_t begin = min(p.L, split * p.rows_per_split);
  const uint32_t end = min(p.L, begin + p.rows_per_split);
  const uint32_t steps = (end - begin + R - 1) / R;  // the same for every thread of the block

  const C* __restrict__ scale = p.scale + static_cast<int64_t>(b) * D;
  const C* __restrict__ gate = GATED ? p.gate + static_cast<int64_t>(b) * D : nullptr;

  float acc_shift[ITERS][V], acc_scale[ITERS][V], acc_gate[GATED ? ITERS : 1][V];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_shift[i][j] = 0.f;
      acc_scale[i][j] = 0.f;
      if constexpr (GATED) acc_gate[i][j] = 0.f;
    }
  }

  for (uint32_t step = 0; step < steps; ++step) {
    const uint32_t row = begin + step * R + g;
    const bool active = row < end;
    // (an inactive group's pointers stay inside the sample: it addresses nothing through them)
    const int64_t base = (static_cast<int64_t>(b) * p.L + (active ? row : begin)) * D;
    // This row's tensors and the sample's vectors, through opaque() when a thread addresses
    // several vectors of a row (common.cuh): otherwise ptxas keeps every address live across
    // the loop and spills (the scalar path at D > 1024, fp32 at D > 1024). Elsewhere hiding
    // them only costs registers (16-bit rows at D > 2048: 100 -> 126, no spill either way).
    const T* __restrict__ x_row = opaque<kOpaque>(p.x + base);
    const T* __restrict__ dh_row = opaque<kOpaque>(p.dh + base);
    const C* __restrict__ y_row = GATED ? opaque<kOpaque>(p.y + base) : nullptr;
    const T* __restrict__ dr_row = GATED ? opaque<kOpaque>(p.dr + base) : nullptr;
    T* __restrict__ dx_row = opaque<kOpaque>(p.dx + base);
    C* __restrict__ dy_row = GATED ? opaque<kOpaque>(p.dy + base) : nullptr;
    const C* __restrict__ gate_row = GATED ? opaque<kOpaque>(gate) : nullptr;
    const C* __restrict__ scale_row = opaque<kOpaque>(scale);

    // Load the row (x, and y, dh, dr where held), form x' and sum it.
    float v[ITERS][V];   // x', then n
    float gv[ITERS][V];  // dh, then g = dh * (1 + scale)
    float yv[GATED && kHold ? ITERS : 1][V];
    float drv[GATED && kHold ? ITERS : 1][V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * G + t;
#pragma unroll
      for (int j = 0; j < V; ++j) v[i][j] = gv[i][j] = 0.f;
      if (active && c < nvec) {
        const int e = c * V;
        load_float<T, V>(x_row + e, v[i]);
        load_float<T, V>(dh_row + e, gv[i]);
        if constexpr (GATED) {
          float yl[V], gl[V];
          load_float<C, V>(y_row + e, yl);
          load_float<C, V>(gate_row + e, gl);
          if constexpr (kHold) {
            load_float<T, V>(dr_row + e, drv[i]);
#pragma unroll
            for (int j = 0; j < V; ++j) yv[i][j] = yl[j];
          }
#pragma unroll
          for (int j = 0; j < V; ++j) v[i][j] = round_to<T>(fmaf(gl[j], yl[j], v[i][j]));
        }
#pragma unroll
        for (int j = 0; j < V; ++j) sum += v[i][j];
      }
    }
    const float mean = divide(group_sum<SUB>(sum, sm_mean, wpg), d_f, inv_d);

    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (active && i * G + t < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = v[i][j] - mean;
          m2 += d * d;
        }
      }
    }
    const float var = divide(group_sum<SUB>(m2, sm_var, wpg), d_f, inv_d);
    const float rstd = __frsqrt_rn(var + p.eps);

    // n, g, and the per-column sums of dh and dh * n.
    float sum_g = 0.f, sum_gn = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * G + t;
      if (active && c < nvec) {
        float scv[V];
        load_float<C, V>(scale_row + c * V, scv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float n = (v[i][j] - mean) * rstd;
          const float dh = gv[i][j];
          const float gg = dh * (1.f + scv[j]);
          v[i][j] = n;
          gv[i][j] = gg;
          sum_g += gg;
          sum_gn += gg * n;
          acc_shift[i][j] += dh;
          acc_scale[i][j] += dh * n;
        }
      }
    }
    group_sum2<SUB>(sum_g, sum_gn, sm_g, sm_gn, wpg);
    const float mean_g = divide(sum_g, d_f, inv_d);
    const float mean_gn = divide(sum_gn, d_f, inv_d);

    // dx' = rstd * (g - mean(g) - n * mean(g n)); gated: dx = dr + dx', dy = gate * dx.
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * G + t;
      if (active && c < nvec) {
        const int e = c * V;
        float dx[V];
#pragma unroll
        for (int j = 0; j < V; ++j) dx[j] = rstd * (gv[i][j] - mean_g - v[i][j] * mean_gn);
        if constexpr (GATED) {
          float dr[V], yl[V], gl[V], dy[V];
          if constexpr (kHold) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              dr[j] = drv[i][j];
              yl[j] = yv[i][j];
            }
          } else {
            load_float<T, V>(dr_row + e, dr);
            load_float<C, V>(y_row + e, yl);
          }
          load_float<C, V>(gate_row + e, gl);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            dx[j] += dr[j];
            dy[j] = gl[j] * dx[j];
            acc_gate[i][j] += dx[j] * yl[j];
          }
          store_float<C, V>(dy_row + e, dy);
        }
        store_float<T, V>(dx_row + e, dx);
      }
    }
  }

  // This block's partial sums: one row per plane, the R groups added in group order.
  const int64_t prow = (static_cast<int64_t>(b) * p.splits + split) * D;
  const auto write_plane = [&](const float (&acc)[ITERS][V], int k) {
    float* dst = p.partial + k * p.plane + prow;
    if (R == 1) {
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int c = i * G + t;
        if (c < nvec) {
#pragma unroll
          for (int j = 0; j < V; ++j) dst[static_cast<int64_t>(c) * V + j] = acc[i][j];
        }
      }
      return;
    }
    __syncthreads();  // the previous plane's reads of `combine` are done
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int c = i * G + t;
      if (c < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) combine[g * D + c * V + j] = acc[i][j];
      }
    }
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < D; e += static_cast<int>(blockDim.x)) {
      float total = 0.f;
      for (int k2 = 0; k2 < R; ++k2) total += combine[k2 * D + e];
      dst[e] = total;
    }
  };
  write_plane(acc_shift, 0);
  write_plane(acc_scale, 1);
  if constexpr (GATED) write_plane(acc_gate, 2);
}

// The backward: registers as ptxas sees fit for blocks of up to 512 threads.
template <typename T, typename C, int V, int ITERS, int SUB, bool GATED>
__global__ void __launch_bounds__(kBwdMaxThreads) adaln_bwd_kernel(const BwdParams<T, C> p) {
  adaln_bwd_rows<T, C, V, ITERS, SUB, GATED>(p);
}

// The gated backward on 16-bit rows in 16-byte vectors, one a thread (D <= 2048), capped at
// kBwdCapRegisters a thread. Uncapped, ptxas gives these 97-100 registers: DiT-XL/2's bf16
// kernel (160-thread blocks) then has three blocks per SM (15 warps, one row each in flight);
// at 96, four (20 warps), without a spill (sm_80, sm_90; the ptxas test checks). Only these:
// under the cap ptxas spends up to 96 on kernels it would otherwise give 40-64 (fewer blocks
// per SM), and the kernels with more vectors a thread spill.
template <typename T, typename C, int SUB>
__global__ void FD_MAX_REGISTERS(kBwdCapRegisters, kBwdMaxThreads, 1)
    adaln_bwd_capped_kernel(const BwdParams<T, C> p) {
  adaln_bwd_rows<T, C, kVec16<T>, 1, SUB, true>(p);
}

constexpr uint32_t kSumRun = 32;

// out_k[b, e] = sum over s in order of partial[k][b][s][e], rounded once; k < planes.
template <typename T>
__global__ void adaln_sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out0,
                                        T* __restrict__ out1, T* __restrict__ out2, int planes,
                                        int64_t plane, uint32_t splits, int D, int64_t count) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / D;
    const int64_t e = idx - b * D;
    const float* src = partial + b * splits * D + e;
    for (int k = 0; k < planes; ++k) {
      // In runs of kSumRun splits, then the runs' totals: a rounding error that grows with
      // kSumRun + splits / kSumRun terms, not splits (thousands of channels-first tiles).
      float total = 0.f;
      for (uint32_t s0 = 0; s0 < splits; s0 += kSumRun) {
        const uint32_t s1 = min(splits, s0 + kSumRun);
        float run = 0.f;
#pragma unroll 8
        for (uint32_t s = s0; s < s1; ++s) run += src[k * plane + static_cast<int64_t>(s) * D];
        total += run;
      }
      T* out = k == 0 ? out0 : (k == 1 ? out1 : out2);
      out[idx] = from_float<T>(total);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-first images
//
// A contiguous (B, D, H, W) image puts a token's D values L = H * W elements apart: each channel
// is a plane of L consecutive tokens. Block (b, tile) takes kCfTokens consecutive tokens of
// sample b and all D channels, with kCfThreads threads:
// - a thread holds V consecutive tokens (V = 4 when L % 4 == 0 and every pointer takes
//   4-element vectors, else 1); token lane tl < TL = kCfTokens / V picks them, so one load
//   instruction of a warp reads CL = 32 / TL channel planes, kCfTokens * sizeof(T) bytes of each
//   (128 fp32, 64 16-bit: whole 32-byte sectors);
// - the S = CL * (warps) channel slots of the block split the channels: slot s takes
//   s, s + S, s + 2 S, ...
// Two passes over the tile: its statistics (and, gated forward, r stored), then its outputs or
// gradients. The second pass re-reads 32 * D * sizeof(T) bytes per input (96 KB at D 1536 bf16),
// expected from L2 (not measured), so the traffic is that of the token layout plus what misses.
// Statistics in one pass, within the tolerance rule for any common mean (checked in fp32 up to
// D 16384 with outlier channels; with 1 token a thread an outlier channel 1e5 away from the
// rest breaks it from D ~ 65536, where each thread's running mean takes 2048 updates):
// - the values are shifted by their mean over the first chunk of channels [0, kCfGroup * S)
//   (so a common mean far above the spread cancels, exactly where x' is near the shift);
// - each thread takes its channels kCfGroup at a time: the group's mean and sum of squared
//   deviations from it, merged into the thread's running ones (Chan, Golub and LeVeque);
// - one thread per token merges the S slots' in slot order, for every thread of the token:
//   the same bits everywhere;
// - n = ((x' - shift) - mean) * rstd, the shift taken off first.
// The backward's mean(g) and co-moment of x' and g = dout * (1 + scale) go the same way.
// Its sums over tokens: one partial row per tile and plane (the tile's tokens added within a
// thread, then over its TL lanes by shuffles), added in tile order by adaln_sum_splits_kernel:
// splits = tiles = ceil(L / kCfTokens) on every GPU, so the gradients are deterministic (for
// the same inputs: 1 and 4 tokens a thread add in different orders).
// Bytes: the floor of the rows (above), plus the partials (2 or 3 planes of B * tiles * D fp32,
// written and read once: 8 bytes a plane per 32 tokens of a channel, against 32 e per row
// tensor: 6 % more traffic in the gated backward in bf16, 8 % in modulate's, half that in
// fp32), plus whatever of the second pass misses L2. Resident tiles at once: 4 forward blocks
// per SM (2 backward) x 132 SMs x 32 * D * e bytes per input: 13 MB at D 384 in bf16 (U-DiT-B's
// widest full-grid stage, decoder_level_1, a 25.2 MB tensor at B 32), 26 MB at D 768 (U-DiT-L's),
// so the gated forward's x and y there (52 MB) may not all stay in the H100's 50 MB L2.
// Expected (not measured): close to the row kernels' share of the copy bandwidth at U-DiT-B's
// shapes. Risks to measure on a GPU (estimates from a review): the sum over the splits is
// B * D threads each adding ceil(L / 32) rows in order (24 blocks at U-DiT-B's first stage,
// maybe 5-15 us against the main kernel's ~27); the slot merge is 32 dependent steps with a
// division each, on one warp while seven wait; U-DiT-B's latent stage at 256 px (768 x 8 x 8,
// 3.1 MB at B 32) is 2 tiles per sample, 64 blocks on 132 SMs: latency-bound.

constexpr int kCfTokens = 32;
constexpr int kCfThreads = 256;
constexpr int kCfGroup = 4;  // channels a thread loads at once (per tensor: kCfGroup * V values)

template <typename T, typename C>
struct CfParams {
  const T* x;
  const C* y;      // gated
  const C* gate;   // gated
  const C* shift;  // forward
  const C* scale;
  T* r;            // gated forward
  T* out;          // forward
  const T* dr;     // gated backward
  const T* dh;     // backward: the cotangent of out
  T* dx;           // backward
  C* dy;           // gated backward
  float* partial;  // backward: planes x [B][tiles][D]
  int64_t plane;   // B * tiles * D
  uint32_t L;
  uint32_t tiles;  // ceil(L / kCfTokens)
  int D;
  float eps;
};

// Where a thread of the block works: V tokens, one channel slot.
template <int V>
struct CfLayout {
  static constexpr int kTL = kCfTokens / V;                 // token lanes
  static constexpr int kCL = kWarp / kTL;                   // channel planes per warp load
  static constexpr int kSlots = kCfThreads / kWarp * kCL;  // S
  static constexpr int kSmemFloats = 4 * kSlots * kCfTokens + 6 * kCfTokens;

  int tl;         // token lane
  int t0;         // first token of the thread in the tile
  int slot;       // channel slot
  int warp_slot;  // the warp's first slot (a bound uniform over the warp)
  int64_t b;
  uint32_t tile;
  bool active;    // the thread's tokens are inside the image
  int64_t base;   // element offset of (b, channel 0, first token)

  __device__ __forceinline__ CfLayout(uint32_t L, uint32_t tiles, int D) {
    const int lane = static_cast<int>(threadIdx.x) % kWarp;
    tl = lane % kTL;
    t0 = tl * V;
    warp_slot = static_cast<int>(threadIdx.x) / kWarp * kCL;
    slot = warp_slot + lane / kTL;
    b = blockIdx.x / tiles;
    tile = blockIdx.x % tiles;
    const uint32_t token = tile * kCfTokens + t0;  // < tiles * 32 <= L + 31 < 2^32
    active = token < L;
    base = b * D * static_cast<int64_t>(L) + (active ? token : 0);
  }
};

// x' at one channel (element offset `off`) for the thread's V tokens: x, or with GATED
// r = x + gate * y rounded to T (y returned too); zeros where `load` is false.
template <typename T, typename C, int V, bool GATED>
__device__ __forceinline__ void cf_rows(const CfParams<T, C>& p, int64_t off, float gate,
                                        bool load, float (&v)[V], float (&yv)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) v[j] = yv[j] = 0.f;
  if (!load) return;
  load_float<T, V>(p.x + off, v);
  if constexpr (GATED) {
    load_float<C, V>(p.y + off, yv);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = round_to<T>(fmaf(gate, yv[j], v[j]));
  }
}

// Chan, Golub and LeVeque: merges a part of `count` values with mean m and sum of squared
// deviations q (and mean mg of g, co-moment cq) into the running (n, mean, m2, mean_g, co).
template <bool GRAD>
__device__ __forceinline__ void chan_merge(float n, float count, float m, float q, float mg,
                                           float cq, float& mean, float& m2, float& mean_g,
                                           float& co) {
  const float f = count / (n + count);
  const float w = n * f;
  const float delta = m - mean;
  mean = fmaf(delta, f, mean);
  m2 += q + delta * delta * w;
  if constexpr (GRAD) {
    const float delta_g = mg - mean_g;
    mean_g = fmaf(delta_g, f, mean_g);
    co += cq + delta * delta_g * w;
  }
}

// The statistics of this thread's V tokens (pass 1), left in `stats` of the block's shared
// memory: [0] shift, [1] mean of x' - shift, [2] rstd, [3] shift of g, [4] mean of g - that
// shift, [5] mean_D(g n) (GRAD: the backward's), kCfTokens floats each. Gated forward: stores r.
template <typename T, typename C, int V, bool GATED, bool GRAD>
__device__ __forceinline__ void cf_statistics(const CfParams<T, C>& p, const CfLayout<V>& at,
                                              float* smem) {
  constexpr int S = CfLayout<V>::kSlots;
  constexpr int kPart = S * kCfTokens;
  float* part0 = smem;
  float* part1 = smem + kPart;
  float* part2 = smem + 2 * kPart;
  float* part3 = smem + 3 * kPart;
  float* stats = smem + 4 * kPart;
  const int D = p.D;
  const int64_t L = p.L;
  const C* __restrict__ gate = GATED ? p.gate + at.b * D : nullptr;
  const C* __restrict__ scale = p.scale + at.b * D;
  const int own = at.slot * kCfTokens + at.t0;  // this thread's first entry in a part array

  // The shifts: means over the first chunk of channels.
  {
    float sum[V] = {}, sum_g[V] = {};
#pragma unroll
    for (int k = 0; k < kCfGroup; ++k) {
      const int c = k * S + at.slot;
      if (c < D) {
        const int64_t off = at.base + c * L;
        float v[V], yv[V];
        cf_rows<T, C, V, GATED>(p, off, GATED ? to_float(gate[c]) : 0.f, at.active, v, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) sum[j] += v[j];
        if constexpr (GRAD) {
          float dh[V] = {};
          if (at.active) load_float<T, V>(p.dh + off, dh);
          const float sc = 1.f + to_float(scale[c]);
#pragma unroll
          for (int j = 0; j < V; ++j) sum_g[j] += dh[j] * sc;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      part0[own + j] = sum[j];
      if constexpr (GRAD) part1[own + j] = sum_g[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < kCfTokens) {
    const int t = static_cast<int>(threadIdx.x);
    const float width = static_cast<float>(min(D, kCfGroup * S));
    float total = 0.f, total_g = 0.f;
    for (int s = 0; s < S; ++s) {
      total += part0[s * kCfTokens + t];
      if constexpr (GRAD) total_g += part1[s * kCfTokens + t];
    }
    stats[t] = total / width;
    if constexpr (GRAD) stats[3 * kCfTokens + t] = total_g / width;
  }
  __syncthreads();

  float shift[V], shift_g[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    shift[j] = stats[at.t0 + j];
    shift_g[j] = GRAD ? stats[3 * kCfTokens + at.t0 + j] : 0.f;
  }

  // This thread's channels, kCfGroup at a time (the valid ones a prefix of each group).
  float n = 0.f;
  float mean[V] = {}, m2[V] = {}, mean_g[V] = {}, co[V] = {};
  for (int j0 = 0; j0 * S + at.slot < D; j0 += kCfGroup) {
    float a[kCfGroup][V], g[GRAD ? kCfGroup : 1][V];
    int count = 0;
#pragma unroll
    for (int k = 0; k < kCfGroup; ++k) {
      const int c = (j0 + k) * S + at.slot;
      const bool ok = c < D;
      count += ok;
      const int64_t off = at.base + (ok ? c : 0) * L;
      float yv[V];
      cf_rows<T, C, V, GATED>(p, off, GATED && ok ? to_float(gate[c]) : 0.f, ok && at.active,
                              a[k], yv);
      if constexpr (GATED && !GRAD) {
        if (ok && at.active) store_float<T, V>(p.r + off, a[k]);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) a[k][j] -= shift[j];
      if constexpr (GRAD) {
        float dh[V] = {};
        if (ok && at.active) load_float<T, V>(p.dh + off, dh);
        const float sc = ok ? 1.f + to_float(scale[c]) : 0.f;
#pragma unroll
        for (int j = 0; j < V; ++j) g[k][j] = dh[j] * sc - shift_g[j];
      }
    }
    const float cnt = static_cast<float>(count);
    const float inv = __frcp_rn(cnt);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float s = 0.f, sg = 0.f;
#pragma unroll
      for (int k = 0; k < kCfGroup; ++k) {
        if (k < count) {
          s += a[k][j];
          if constexpr (GRAD) sg += g[k][j];
        }
      }
      const float m = divide(s, cnt, inv);
      const float mg = GRAD ? divide(sg, cnt, inv) : 0.f;
      float q = 0.f, cq = 0.f;
#pragma unroll
      for (int k = 0; k < kCfGroup; ++k) {
        if (k < count) {
          const float u = a[k][j] - m;
          q += u * u;
          if constexpr (GRAD) cq += u * (g[k][j] - mg);
        }
      }
      chan_merge<GRAD>(n, cnt, m, q, mg, cq, mean[j], m2[j], mean_g[j], co[j]);
    }
    n += cnt;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    part0[own + j] = mean[j];
    part1[own + j] = m2[j];
    if constexpr (GRAD) {
      part2[own + j] = mean_g[j];
      part3[own + j] = co[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < kCfTokens) {
    const int t = static_cast<int>(threadIdx.x);
    float total = 0.f, m = 0.f, q = 0.f, mg = 0.f, cq = 0.f;
    for (int s = 0; s < S && s < D; ++s) {
      const float count = static_cast<float>((D - 1 - s) / S + 1);  // channels of slot s
      const int e = s * kCfTokens + t;
      chan_merge<GRAD>(total, count, part0[e], part1[e], GRAD ? part2[e] : 0.f,
                       GRAD ? part3[e] : 0.f, m, q, mg, cq);
      total += count;
    }
    const float d_f = static_cast<float>(D);
    const float rstd = __frsqrt_rn(q / d_f + p.eps);
    stats[kCfTokens + t] = m;
    stats[2 * kCfTokens + t] = rstd;
    if constexpr (GRAD) {
      stats[4 * kCfTokens + t] = mg;
      stats[5 * kCfTokens + t] = rstd * (cq / d_f);
    }
  }
  __syncthreads();
}

template <typename T, typename C, int V, bool GATED>
__global__ void __launch_bounds__(kCfThreads) adaln_cf_fwd_kernel(const CfParams<T, C> p) {
  FD_DYNAMIC_SMEM(smem);  // CfLayout<V>::kSmemFloats
  const CfLayout<V> at(p.L, p.tiles, p.D);
  cf_statistics<T, C, V, GATED, false>(p, at, smem);
  const float* stats = smem + 4 * CfLayout<V>::kSlots * kCfTokens;
  float shift[V], mean[V], rstd[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    shift[j] = stats[at.t0 + j];
    mean[j] = stats[kCfTokens + at.t0 + j];
    rstd[j] = stats[2 * kCfTokens + at.t0 + j];
  }
  if (!at.active) return;  // no barrier below
  const int D = p.D;
  const int64_t L = p.L;
  const C* __restrict__ gate = GATED ? p.gate + at.b * D : nullptr;
  const C* __restrict__ sh = p.shift + at.b * D;
  const C* __restrict__ sc = p.scale + at.b * D;
  // r is recomputed bit for bit (not re-read): x and y come back from the caches either way.
#pragma unroll 2
  for (int c = at.slot; c < D; c += CfLayout<V>::kSlots) {
    const int64_t off = at.base + c * L;
    float v[V], yv[V], o[V];
    cf_rows<T, C, V, GATED>(p, off, GATED ? to_float(gate[c]) : 0.f, true, v, yv);
    const float shv = to_float(sh[c]);
    const float scv = 1.f + to_float(sc[c]);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = (((v[j] - shift[j]) - mean[j]) * rstd[j]) * scv + shv;
    store_float<T, V>(p.out + off, o);
  }
}

template <typename T, typename C, int V, bool GATED>
__global__ void __launch_bounds__(kCfThreads) adaln_cf_bwd_kernel(const CfParams<T, C> p) {
  FD_DYNAMIC_SMEM(smem);  // CfLayout<V>::kSmemFloats
  using Layout = CfLayout<V>;
  const Layout at(p.L, p.tiles, p.D);
  cf_statistics<T, C, V, GATED, true>(p, at, smem);
  const float* stats = smem + 4 * Layout::kSlots * kCfTokens;
  float shift[V], mean[V], rstd[V], shift_g[V], mean_g[V], mean_gn[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    shift[j] = stats[at.t0 + j];
    mean[j] = stats[kCfTokens + at.t0 + j];
    rstd[j] = stats[2 * kCfTokens + at.t0 + j];
    shift_g[j] = stats[3 * kCfTokens + at.t0 + j];
    mean_g[j] = stats[4 * kCfTokens + at.t0 + j];
    mean_gn[j] = stats[5 * kCfTokens + at.t0 + j];
  }
  const int D = p.D;
  const int64_t L = p.L;
  const C* __restrict__ gate = GATED ? p.gate + at.b * D : nullptr;
  const C* __restrict__ sc = p.scale + at.b * D;
  float* partial = p.partial + (at.b * p.tiles + at.tile) * D;
  // Every lane runs every step (the bound is the warp's), for the shuffles.
#pragma unroll 2
  for (int c0 = at.warp_slot; c0 < D; c0 += Layout::kSlots) {
    const int c = c0 + (at.slot - at.warp_slot);
    const bool ok = c < D && at.active;
    const int64_t off = at.base + (c < D ? c : 0) * L;
    const float gv = GATED && c < D ? to_float(gate[c]) : 0.f;
    float v[V], yv[V], dh[V] = {}, dr[V] = {}, dx[V], dy[V];
    cf_rows<T, C, V, GATED>(p, off, gv, ok, v, yv);
    if (ok) {
      load_float<T, V>(p.dh + off, dh);
      if constexpr (GATED) load_float<T, V>(p.dr + off, dr);
    }
    const float scv = 1.f + (c < D ? to_float(sc[c]) : 0.f);
    float sum_dh = 0.f, sum_dhn = 0.f, sum_dxy = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float n = ((v[j] - shift[j]) - mean[j]) * rstd[j];
      const float g = dh[j] * scv;
      dx[j] = rstd[j] * (((g - shift_g[j]) - mean_g[j]) - n * mean_gn[j]);
      if constexpr (GATED) {
        dx[j] += dr[j];
        dy[j] = gv * dx[j];
        sum_dxy += dx[j] * yv[j];
      }
      sum_dh += dh[j];
      sum_dhn += dh[j] * n;
    }
    if (ok) {
      store_float<T, V>(p.dx + off, dx);
      if constexpr (GATED) store_float<C, V>(p.dy + off, dy);
    } else {  // tokens past the image: rstd may be inf there (eps 0), n NaN
      sum_dh = sum_dhn = sum_dxy = 0.f;
    }
    // The tile's sums for channel c: over the TL lanes of the slot (xor stays within them).
#pragma unroll
    for (int offset = 1; offset < Layout::kTL; offset <<= 1) {
      sum_dh += __shfl_xor_sync(0xffffffffu, sum_dh, offset);
      sum_dhn += __shfl_xor_sync(0xffffffffu, sum_dhn, offset);
      if constexpr (GATED) sum_dxy += __shfl_xor_sync(0xffffffffu, sum_dxy, offset);
    }
    if (c < D && at.tl == 0) {
      partial[c] = sum_dh;
      partial[p.plane + c] = sum_dhn;
      if constexpr (GATED) partial[2 * p.plane + c] = sum_dxy;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

struct FwdArgs {
  const void* x;
  const void* y;
  const void* gate;
  const void* shift;
  const void* scale;
  void* r;
  void* out;
  uint32_t rows;
  uint32_t L;
  int D;
  float eps;
  cudaStream_t stream;
};

inline unsigned grid_for(int64_t groups) {
  return static_cast<unsigned>(std::min<int64_t>(groups, INT_MAX));
}

template <typename T, typename C>
FwdParams<T, C> fwd_params(const FwdArgs& a) {
  return FwdParams<T, C>{static_cast<const T*>(a.x),     static_cast<const C*>(a.y),
                         static_cast<const C*>(a.gate),  static_cast<const C*>(a.shift),
                         static_cast<const C*>(a.scale), static_cast<T*>(a.r),
                         static_cast<T*>(a.out),         a.rows,
                         a.L,                            a.D,
                         a.eps};
}

template <typename T, typename C, int V, int TPR, int ITERS, bool GATED>
void launch_regs(const FwdArgs& a) {
  constexpr int kThreads = TPR > kWarp ? TPR : kWarpModeBlock;
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t groups = (a.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const auto kernel = adaln_fwd_regs_kernel<T, C, V, TPR, ITERS, GATED>;
  FD_LAUNCH(kernel, grid_for(groups), kThreads, 0, a.stream)(fwd_params<T, C>(a));
}

template <typename T, typename C, int V, bool GATED>
void launch_big(const FwdArgs& a) {
  const auto kernel = adaln_fwd_big_kernel<T, C, V, GATED>;
  FD_LAUNCH(kernel, grid_for(a.rows), kBigThreads, 0, a.stream)(fwd_params<T, C>(a));
}

template <typename T, typename C, int V, bool GATED>
void launch_with_vec(const FwdArgs& a) {
  const int nvec = a.D / V;
  if (nvec <= kWarp * kWarpModeMaxIters) {
    switch ((nvec + kWarp - 1) / kWarp) {
      case 1: return launch_regs<T, C, V, kWarp, 1, GATED>(a);
      case 2: return launch_regs<T, C, V, kWarp, 2, GATED>(a);
      case 3: return launch_regs<T, C, V, kWarp, 3, GATED>(a);
      case 4: return launch_regs<T, C, V, kWarp, 4, GATED>(a);
      case 5: return launch_regs<T, C, V, kWarp, 5, GATED>(a);
      case 6: return launch_regs<T, C, V, kWarp, 6, GATED>(a);
      case 7: return launch_regs<T, C, V, kWarp, 7, GATED>(a);
      default: return launch_regs<T, C, V, kWarp, 8, GATED>(a);
    }
  }
  // At most 32 floats of row per thread (<= 64 registers at 1024 threads per block).
  constexpr int K = V == 1 ? 8 : 4;
  if (nvec <= 128 * K) return launch_regs<T, C, V, 128, K, GATED>(a);
  if (nvec <= 256 * K) return launch_regs<T, C, V, 256, K, GATED>(a);
  if (nvec <= 512 * K) return launch_regs<T, C, V, 512, K, GATED>(a);
  if (nvec <= 1024 * K) return launch_regs<T, C, V, 1024, K, GATED>(a);
  return launch_big<T, C, V, GATED>(a);
}

// The forward kernels index rows with 32 bits (a 64-bit division per row is a long subroutine
// on the GPU); element offsets are 64-bit. More than 2^31 rows go in several launches, each
// starting at a batch boundary, or inside one batch when L alone is that large.
template <typename T, typename C, int V, bool GATED>
void launch_chunks(const FwdArgs& base, int64_t B, int64_t L) {
  constexpr int64_t kMaxRows = int64_t{1} << 31;
  const int64_t D = base.D;
  const auto at = [](const void* p, int64_t elems) {  // rows (T)
    return p == nullptr ? p : static_cast<const void*>(static_cast<const T*>(p) + elems);
  };
  const auto at_cond = [](const void* p, int64_t elems) {  // y and the vectors (C)
    return p == nullptr ? p : static_cast<const void*>(static_cast<const C*>(p) + elems);
  };
  const auto at_mut = [](void* p, int64_t elems) {
    return p == nullptr ? p : static_cast<void*>(static_cast<T*>(p) + elems);
  };
  FwdArgs a = base;
  if (B * L <= kMaxRows) {
    a.rows = static_cast<uint32_t>(B * L);
    a.L = static_cast<uint32_t>(L);
    return launch_with_vec<T, C, V, GATED>(a);
  }
  const auto point = [&](int64_t b, int64_t row0) {  // row0: first row (of B * L) of the launch
    a.x = at(base.x, row0 * D);
    a.y = at_cond(base.y, row0 * D);
    a.r = at_mut(base.r, row0 * D);
    a.out = at_mut(base.out, row0 * D);
    a.gate = at_cond(base.gate, b * D);
    a.shift = at_cond(base.shift, b * D);
    a.scale = at_cond(base.scale, b * D);
  };
  if (L <= kMaxRows) {
    const int64_t per_launch = kMaxRows / L;  // whole batches per launch
    for (int64_t b0 = 0; b0 < B; b0 += per_launch) {
      const int64_t nb = std::min(per_launch, B - b0);
      point(b0, b0 * L);
      a.rows = static_cast<uint32_t>(nb * L);
      a.L = static_cast<uint32_t>(L);
      launch_with_vec<T, C, V, GATED>(a);
    }
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l0 = 0; l0 < L; l0 += kMaxRows) {
      const int64_t n = std::min(kMaxRows, L - l0);
      point(b, b * L + l0);
      a.rows = static_cast<uint32_t>(n);
      a.L = static_cast<uint32_t>(n);  // every row of this launch is in batch b
      launch_with_vec<T, C, V, GATED>(a);
    }
  }
}

// The vector path moves kVec16<T> elements per access: 16 bytes of a row of T, 16 or 8 bytes
// (float rows) of C.
template <typename T, typename C>
constexpr std::size_t kCondVecBytes = kVec16<T> * sizeof(C);

template <typename T, typename C, bool GATED>
void launch_fwd_typed(const FwdArgs& a, int64_t B, int64_t L) {
  constexpr std::size_t kC = kCondVecBytes<T, C>;
  bool vec = (static_cast<int64_t>(a.D) * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
             is_aligned(a.x, 16) && is_aligned(a.shift, kC) && is_aligned(a.scale, kC) &&
             is_aligned(a.out, 16);
  if (GATED) {
    vec = vec && is_aligned(a.y, kC) && is_aligned(a.gate, kC) && is_aligned(a.r, 16);
  }
  if (vec) {
    launch_chunks<T, C, kVec16<T>, GATED>(a, B, L);
  } else {
    launch_chunks<T, C, 1, GATED>(a, B, L);
  }
}

struct BwdArgs {
  const void* x;
  const void* y;
  const void* gate;
  const void* scale;
  const void* dr;
  const void* dh;
  void* dx;
  void* dy;
  void* dgate;
  void* dshift;
  void* dscale;
  float* partial;
  int64_t B;
  int64_t L;
  int D;
  int64_t splits;
  float eps;
  cudaStream_t stream;
};

// The backward kernel chosen for a row length: its address, block shape and dynamic smem.
// `launch` enqueues that kernel with a BwdParams<T, C> of the plan's T and C.
struct BwdPlan {
  const void* func;
  void (*launch)(const void* params, dim3 grid, dim3 block, size_t smem, cudaStream_t stream);
  int group;    // G, threads per row
  int threads;  // R * G
  size_t smem;  // R * D floats when R > 1
};

// The backward kernel of these template arguments: the capped one where it applies.
template <typename T, typename C, int V, int ITERS, int SUB, bool GATED>
constexpr auto bwd_kernel() {
  if constexpr (GATED && sizeof(T) == 2 && V == kVec16<T> && ITERS == 1) {
    return &adaln_bwd_capped_kernel<T, C, SUB>;
  } else {
    return &adaln_bwd_kernel<T, C, V, ITERS, SUB, GATED>;
  }
}

template <typename T, typename C, int V, int ITERS, int SUB, bool GATED>
void launch_bwd_kernel(const void* params, dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream) {
  const auto kernel = bwd_kernel<T, C, V, ITERS, SUB, GATED>();
  FD_LAUNCH(kernel, grid, block, smem, stream)(*static_cast<const BwdParams<T, C>*>(params));
}

template <typename T, typename C, int V, int ITERS, int SUB, bool GATED>
BwdPlan bwd_plan(int group, int D) {
  const int rows_per_block = std::max(1, kBwdBlockTarget / group);
  const size_t smem =
      rows_per_block > 1 ? static_cast<size_t>(rows_per_block) * D * sizeof(float) : 0;
  return BwdPlan{reinterpret_cast<const void*>(bwd_kernel<T, C, V, ITERS, SUB, GATED>()),
                 &launch_bwd_kernel<T, C, V, ITERS, SUB, GATED>, group, rows_per_block * group,
                 smem};
}

// Picks the row group: ITERS, the smallest of 1, 2, 4, ... (up to 16 elements per thread) for
// which a row needs at most kBwdBlockTarget threads (kBwdMaxThreads with the largest ITERS);
// G = 8 or 16 lanes for short rows, else that many threads rounded up to whole warps.
template <typename T, typename C, int V, bool GATED>
BwdPlan bwd_plan_vec(int D) {
  constexpr int kMaxIters = kBwdMaxElems / V;
  const int nvec = D / V;
  if (nvec <= 8) return bwd_plan<T, C, V, 1, 8, GATED>(8, D);
  if (nvec <= 16) return bwd_plan<T, C, V, 1, 16, GATED>(16, D);
  int iters = 1;
  while (iters < kMaxIters && (nvec + iters - 1) / iters > kBwdBlockTarget) iters *= 2;
  const int need = (nvec + iters - 1) / iters;
  const int group = (need + kWarp - 1) / kWarp * kWarp;  // <= kBwdMaxThreads (D <= kBwdMaxD)
  if constexpr (kMaxIters >= 16) {
    if (iters == 16) return bwd_plan<T, C, V, 16, kWarp, GATED>(group, D);
    if (iters == 8) return bwd_plan<T, C, V, 8, kWarp, GATED>(group, D);
  }
  if constexpr (kMaxIters >= 4) {
    if (iters == 4) return bwd_plan<T, C, V, 4, kWarp, GATED>(group, D);
  }
  if (iters == 2) return bwd_plan<T, C, V, 2, kWarp, GATED>(group, D);
  return bwd_plan<T, C, V, 1, kWarp, GATED>(group, D);
}

template <typename T, typename C, bool GATED>
BwdPlan bwd_plan_typed(int D, bool vec) {
  return vec ? bwd_plan_vec<T, C, kVec16<T>, GATED>(D) : bwd_plan_vec<T, C, 1, GATED>(D);
}

// Adds each sample's `splits` partial rows of every plane in split order, rounds once to C.
template <typename C, bool GATED>
void launch_sum_splits(const BwdArgs& a) {
  if (cudaPeekAtLastError() != cudaSuccess) return;  // the caller's cudaGetLastError() reports it
  const int64_t count = a.B * a.D;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65536);
  const auto sum_splits = adaln_sum_splits_kernel<C>;
  FD_LAUNCH(sum_splits, static_cast<unsigned>(blocks), kThreads, 0, a.stream)(
      a.partial, static_cast<C*>(a.dshift), static_cast<C*>(a.dscale), static_cast<C*>(a.dgate),
      GATED ? 3 : 2, a.B * a.splits * a.D, static_cast<uint32_t>(a.splits), a.D, count);
}

template <typename T, typename C, bool GATED>
void launch_bwd_typed(const BwdArgs& a) {
  constexpr std::size_t kC = kCondVecBytes<T, C>;
  bool vec = (static_cast<int64_t>(a.D) * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
             is_aligned(a.x, 16) && is_aligned(a.scale, kC) && is_aligned(a.dh, 16) &&
             is_aligned(a.dx, 16);
  if (GATED) {
    vec = vec && is_aligned(a.y, kC) && is_aligned(a.gate, kC) && is_aligned(a.dr, 16) &&
          is_aligned(a.dy, kC);
  }
  const BwdPlan plan = bwd_plan_typed<T, C, GATED>(a.D, vec);
  BwdParams<T, C> p{static_cast<const T*>(a.x),
                    static_cast<const C*>(a.y),
                    static_cast<const C*>(a.gate),
                    static_cast<const C*>(a.scale),
                    static_cast<const T*>(a.dr),
                    static_cast<const T*>(a.dh),
                    static_cast<T*>(a.dx),
                    static_cast<C*>(a.dy),
                    a.partial,
                    a.B * a.splits * a.D,
                    static_cast<uint32_t>(a.L),
                    static_cast<uint32_t>(a.splits),
                    static_cast<uint32_t>((a.L + a.splits - 1) / a.splits),
                    a.D,
                    plan.group,
                    a.eps};
  plan.launch(&p, dim3(static_cast<unsigned>(a.B * a.splits)), dim3(plan.threads), plan.smem,
              a.stream);
  launch_sum_splits<C, GATED>(a);
}

// Channels-first images: one block per (sample, tile of kCfTokens tokens); V = 4 tokens per
// thread when L % 4 == 0 and every row pointer takes 4-element vectors (y and dy of C).
template <typename T, typename C, bool GATED>
bool cf_vectors(int64_t L, std::initializer_list<const void*> rows,
                std::initializer_list<const void*> conds) {
  if (L % 4 != 0) return false;
  for (const void* p : rows) {
    if (!is_aligned(p, 4 * sizeof(T))) return false;
  }
  for (const void* p : conds) {
    if (!is_aligned(p, 4 * sizeof(C))) return false;
  }
  return true;
}

template <typename T, typename C, int V, bool GATED, bool BACKWARD>
void launch_cf(const CfParams<T, C>& p, int64_t B, cudaStream_t stream) {
  const auto kernel = BACKWARD ? adaln_cf_bwd_kernel<T, C, V, GATED>
                               : adaln_cf_fwd_kernel<T, C, V, GATED>;
  const size_t smem = CfLayout<V>::kSmemFloats * sizeof(float);
  FD_LAUNCH(kernel, static_cast<unsigned>(B * p.tiles), kCfThreads, smem, stream)(p);
}

template <typename T, typename C, bool GATED>
void launch_cf_fwd_typed(const FwdArgs& a, int64_t B, int64_t L) {
  CfParams<T, C> p{};
  p.x = static_cast<const T*>(a.x);
  p.y = static_cast<const C*>(a.y);
  p.gate = static_cast<const C*>(a.gate);
  p.shift = static_cast<const C*>(a.shift);
  p.scale = static_cast<const C*>(a.scale);
  p.r = static_cast<T*>(a.r);
  p.out = static_cast<T*>(a.out);
  p.L = static_cast<uint32_t>(L);
  p.tiles = static_cast<uint32_t>((L + kCfTokens - 1) / kCfTokens);
  p.D = a.D;
  p.eps = a.eps;
  const bool vec = GATED ? cf_vectors<T, C, GATED>(L, {a.x, a.r, a.out}, {a.y})
                         : cf_vectors<T, C, GATED>(L, {a.x, a.out}, {});
  if (vec) return launch_cf<T, C, 4, GATED, false>(p, B, a.stream);
  launch_cf<T, C, 1, GATED, false>(p, B, a.stream);
}

template <typename T, typename C, bool GATED>
void launch_cf_bwd_typed(const BwdArgs& a) {
  CfParams<T, C> p{};
  p.x = static_cast<const T*>(a.x);
  p.y = static_cast<const C*>(a.y);
  p.gate = static_cast<const C*>(a.gate);
  p.scale = static_cast<const C*>(a.scale);
  p.dr = static_cast<const T*>(a.dr);
  p.dh = static_cast<const T*>(a.dh);
  p.dx = static_cast<T*>(a.dx);
  p.dy = static_cast<C*>(a.dy);
  p.partial = a.partial;
  p.plane = a.B * a.splits * a.D;
  p.L = static_cast<uint32_t>(a.L);
  p.tiles = static_cast<uint32_t>(a.splits);  // = ceil(L / kCfTokens), checked by the caller
  p.D = a.D;
  p.eps = a.eps;
  const bool vec = GATED ? cf_vectors<T, C, GATED>(a.L, {a.x, a.dr, a.dh, a.dx}, {a.y, a.dy})
                         : cf_vectors<T, C, GATED>(a.L, {a.x, a.dh, a.dx}, {});
  if (vec) {
    launch_cf<T, C, 4, GATED, true>(p, a.B, a.stream);
  } else {
    launch_cf<T, C, 1, GATED, true>(p, a.B, a.stream);
  }
  launch_sum_splits<C, GATED>(a);
}

// Calls f(TypeTag<T>{}, TypeTag<C>{}) for the pairs of dtype codes (rows T; y, the conditioning
// vectors and their gradients C) the kernels are built for: C = T, or float rows with __half or
// __nv_bfloat16 conditioning (what autocast gives a float32 residual stream). Throws
// std::invalid_argument for any other pair.
template <typename F>
void dispatch_pair(int dtype, int cond_dtype, const char* op, F&& f) {
  if (cond_dtype == dtype) {
    dispatch_dtype(dtype, op, [&](auto tag) { f(tag, tag); });
  } else if (dtype == kFloat32 && cond_dtype == kFloat16) {
    f(TypeTag<float>{}, TypeTag<__half>{});
  } else if (dtype == kFloat32 && cond_dtype == kBFloat16) {
    f(TypeTag<float>{}, TypeTag<__nv_bfloat16>{});
  } else {
    throw invalid_argument(op, "unsupported dtype codes " + std::to_string(dtype) + " (rows), " +
                                   std::to_string(cond_dtype) +
                                   " (y and the (B, D) vectors): expected equal codes, or 0 "
                                   "(float32) rows with 1 or 2 (float16, bfloat16)");
  }
}

}  // namespace

// Enqueue the kernel(s) on `stream` on the current device and return cudaGetLastError(). Sizes
// and pointers are validated by the caller (bindings.cpp): B, L >= 0, 1 <= D <= INT_MAX,
// B * L * D in int64; for the backward also L < 2^31, 1 <= splits <= L and B * splits < 2^31,
// and D <= kBwdMaxD (rows). channels_first: the rows are a contiguous (B, D, L) image, with
// L < 2^31 and B * adaln_cf_tiles(L) < 2^31, and the backward's splits = adaln_cf_tiles(L).

cudaError_t adaln_modulate_fwd_launch(const void* x, const void* shift, const void* scale,
                                      void* out, int64_t B, int64_t L, int64_t D, float eps,
                                      int dtype, int cond_dtype, bool channels_first,
                                      cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  const FwdArgs a{x,       nullptr, nullptr, shift, scale, nullptr, out, 0, 0,
                  static_cast<int>(D), eps, stream};
  dispatch_pair(dtype, cond_dtype, "adaln_modulate_fwd", [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    channels_first ? launch_cf_fwd_typed<T, C, false>(a, B, L)
                   : launch_fwd_typed<T, C, false>(a, B, L);
  });
  return cudaGetLastError();
}

cudaError_t adaln_gated_fwd_launch(const void* x, const void* y, const void* gate,
                                   const void* shift, const void* scale, void* r, void* out,
                                   int64_t B, int64_t L, int64_t D, float eps, int dtype,
                                   int cond_dtype, bool channels_first, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  const FwdArgs a{x, y, gate, shift, scale, r, out, 0, 0, static_cast<int>(D), eps, stream};
  dispatch_pair(dtype, cond_dtype, "adaln_gated_fwd", [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    channels_first ? launch_cf_fwd_typed<T, C, true>(a, B, L)
                   : launch_fwd_typed<T, C, true>(a, B, L);
  });
  return cudaGetLastError();
}

cudaError_t adaln_modulate_bwd_launch(const void* x, const void* scale, const void* dout,
                                      void* dx, void* dshift, void* dscale, void* partial,
                                      int64_t B, int64_t L, int64_t D, int64_t splits, float eps,
                                      int dtype, int cond_dtype, bool channels_first,
                                      cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  const BwdArgs a{x,       nullptr, nullptr, scale,  nullptr,
                  dout,    dx,      nullptr, nullptr, dshift,
                  dscale,  static_cast<float*>(partial),
                  B,       L,       static_cast<int>(D), splits, eps, stream};
  dispatch_pair(dtype, cond_dtype, "adaln_modulate_bwd", [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    channels_first ? launch_cf_bwd_typed<T, C, false>(a) : launch_bwd_typed<T, C, false>(a);
  });
  return cudaGetLastError();
}

cudaError_t adaln_gated_bwd_launch(const void* x, const void* y, const void* gate,
                                   const void* scale, const void* dr, const void* dout, void* dx,
                                   void* dy, void* dgate, void* dshift, void* dscale,
                                   void* partial, int64_t B, int64_t L, int64_t D,
                                   int64_t splits, float eps, int dtype, int cond_dtype,
                                   bool channels_first, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  const BwdArgs a{x,  y,     gate,   scale,  dr,     dout,
                  dx, dy,    dgate,  dshift, dscale, static_cast<float*>(partial),
                  B,  L,     static_cast<int>(D),    splits, eps, stream};
  dispatch_pair(dtype, cond_dtype, "adaln_gated_bwd", [&](auto t, auto c) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    channels_first ? launch_cf_bwd_typed<T, C, true>(a) : launch_bwd_typed<T, C, true>(a);
  });
  return cudaGetLastError();
}

int64_t adaln_bwd_max_d() { return kBwdMaxD; }

// The tiles of kCfTokens tokens a channels-first sample of L tokens is cut into: the blocks per
// sample of both channels-first kernels, and the backward's splits.
int64_t adaln_cf_tiles(int64_t L) { return (L + kCfTokens - 1) / kCfTokens; }

// The backward's `splits` for this shape on the current device: (sample, split) blocks that
// fill the waves of the backward kernel's resident blocks (16-byte path, all of dtype T) best
// (wave_splits, common.cuh), at least kBwdMinSplitRows rows per split. A
// call with a narrower C uses the same count (its kernel's occupancy may differ): the order of
// the partial sums, and so the bits of d gate, d shift, d scale, are those of the call on the
// inputs widened to T. Sizes are validated by the caller (D <= kBwdMaxD, B, L >= 1).
cudaError_t adaln_bwd_splits(int64_t B, int64_t L, int64_t D, int dtype, bool gated, int device,
                             int64_t* splits) {
  constexpr int64_t kBwdMinSplitRows = 16;
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  BwdPlan plan{};
  dispatch_dtype(dtype, "adaln_bwd_splits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int d = static_cast<int>(D);
    const bool vec = (D * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    plan = gated ? bwd_plan_typed<T, T, true>(d, vec) : bwd_plan_typed<T, T, false>(d, vec);
  });
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan.func, plan.threads,
                                                      plan.smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  *splits = wave_splits(B, resident, std::min(L / kBwdMinSplitRows, L));
  return cudaSuccess;
}

// A kernel of this family, for runtime_check's "is there an image for this GPU" probe.
const void* adaln_probe_kernel() {
  return reinterpret_cast<const void*>(&adaln_fwd_regs_kernel<float, float, 1, kWarp, 1, false>);
}

}  // namespace fastdit
