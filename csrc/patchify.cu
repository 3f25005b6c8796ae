// The patchify family: patchify / unpatchify (a permutation), DiT's patch embedding (a stride-p
// convolution to tokens, plus positions) and DiT's final layer (LayerNorm, modulation, Linear,
// unpatchify), forward and backward. Semantics: fastdit/ops/patchify.py (the reference).
//
// Notation: image (B, C, H, W) with element strides (isb, isc, ish, isw) (any layout: NCHW,
// channels-last, views); patch size p, grid h x w = (H/p) x (W/p), N = h * w tokens, K = C*p*p
// values per token. Token n = i * w + j covers pixels (i*p + a, j*p + b'); its value index k is
// (c*p + a)*p + b' for the order "cpq" (0) and (a*p + b')*C + c for "pqc" (1). All arithmetic in
// fp32, rounded once to the dtype at the store. No atomics: every reduction has a fixed order.
//
// Kernels, the bytes each must move, and the expected H100 time at DiT-XL/2 (B = 256, C = 4,
// 32 x 32 latents, p = 2, D = 1152, final layer C = 8 so K = 32), bf16, at ~2.8 TB/s copy
// bandwidth and ~67 TFLOP/s fp32 FMA (not measured here: this machine has no GPU):
//
//  permute_kernel      patchify and unpatchify, any strides on both sides. A block stages a tile
//                      of R grid rows x J grid columns through shared memory: the source side is
//                      read in its own memory order with 16-byte vectors (when strides and
//                      alignment allow) and stored unchanged into shared memory; the destination
//                      side is written in its memory order, one element per lane (coalesced),
//                      gathered from shared memory. The row pitch and channel-plane stride of the
//                      staging buffer are picked on the host by simulating the bank conflicts of
//                      both sides (cached per shape). Moves 2 x the tensor: 2 x 2.1 MB (x) ~
//                      1.5 us (launch-bound at this size; at large sizes the target is >= 85 %
//                      of the copy bandwidth: one 16-byte load, one 2-4-byte coalesced store and
//                      two shared-memory accesses per element, ~20 % of the shared-memory
//                      bandwidth at HBM speed).
//  pe_fwd_kernel       patch_embed forward: a block computes 64 tokens x 128 channels; it gathers
//                      the 64 patches (K values each, in chunks of 16 or 32) and the weight slice
//                      into shared memory (fp32, k-major), each thread accumulates 8 tokens x 4
//                      channels with FMA, then adds bias and pos_embed and writes 4 channels per
//                      lane. Moves: write out 151 MB + read x 2 MB (+ pos 0.6 MB, weight from L2)
//                      = ~154 MB ~ 55 us; 2.4 GFLOP ~ 36 us at the FMA peak: expect ~60-70 us.
//  rowgemm_kernel      y[row, k] = sum_d A[row, d] * Bm[d, k], scattered to an image. Two uses:
//                      patch_embed's dx (A = dout, Bm = the weight (D, K), order cpq, dx in x's
//                      strides) and final_layer's forward (A = the modulated LayerNorm of x,
//                      recomputed per element from per-row statistics, Bm = the weight
//                      transposed to (D, K), + bias, order pqc). A block owns 32 rows and all of
//                      D; its 8 warps split each 128-wide chunk of D and are summed in warp order
//                      at the end. dx: read dout 151 MB + write 2 MB ~ 55 us (2.4 GFLOP);
//                      final_layer: read x 151 MB (once from HBM: the statistics pass and the
//                      product re-read a block's 74 KB of rows from L2) + write 4.2 MB ~ 56 us,
//                      but 4.8 GFLOP ~ 72 us at the FMA peak: FMA-bound, expect ~90-100 us.
//  opr_kernel          the parameter gradients of both layers, sum over rows of u[row, d] *
//                      v[row, k]: patch_embed's dweight (u = dout, v = the patches of x) with
//                      dpos (sum over the batch of dout) and final_layer's dweight (u = the
//                      modulated x, from the saved statistics; v = the patches of dout) with
//                      dbias. A block owns (32 tokens, 128 channels, 16 or 32 k) and a split of
//                      the batch, loops over its samples in order with the next sample's tiles
//                      prefetched into registers, and writes fp32 partial sums that the Python
//                      glue adds over the partial index in a fixed order (torch .sum(0)).
//                      patch_embed: read dout 151 MB + x 2 MB, write partials ~10 MB ~ 58 us;
//                      final_layer: read x 151 MB + dout 4.2 MB ~ 56 us (4.8 GFLOP, ~75 us).
//  fl_rows_kernel      final_layer backward, per tiles of 4 tokens of one sample (2 or 1 where
//                      shared memory is short): gather dy (the patches of dout), recompute the
//                      row statistics (saved for opr_kernel), dm = dy @ W over K (W in shared
//                      memory when it fits next to the rest, <= 110 KB a block), g = dm * (1 +
//                      scale) kept in shared memory, the row sums of g and g * n, then dx; the
//                      dshift / dscale sums per (sample, split) in registers; the next tile's x
//                      prefetched into L2. Read x 151 MB (+ L1/L2 re-reads) + write dx 151 MB +
//                      dout 4.2 MB = ~306 MB ~ 110 us (4.8 GFLOP overlapped).
//  So the backwards take two kernels each (one for the input gradient, one for the parameter
//  gradients): patch_embed ~120 us for 2 x 151 MB, final_layer ~180-200 us for ~460 MB.
//  The products run on CUDA cores (fp32 FMA, exact products of 16-bit inputs): final_layer's
//  three (forward, dm, dweight: 4.8 GFLOP each at DiT-XL/2) are FMA-bound rather than
//  memory-bound; a tensor-core (mma.sync, fp32 accumulate) path for float16 / bfloat16 would
//  bring them to the memory floor.
//
// The launchers at the bottom are called by bindings.cpp after it has validated every argument
// (sizes, strides, limits, pointers). The kernels never allocate; scratch comes from Python.
//
// Built with -DFASTDIT_EMULATE (tests/cuda_emu/emulate.h), the same kernels run on the CPU as
// fibers, which is how the index arithmetic is tested on machines without a GPU.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "common.cuh"

#define FD_HD __host__ __device__ __forceinline__
#if defined(__CUDA_ARCH__)
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_UNROLL
#endif

namespace fastdit {

constexpr int64_t kPatchifyMaxK = 8192;     // C*p*p of patchify / unpatchify (one token in smem)
constexpr int64_t kFinalLayerMaxD = 8192;   // D of final_layer (a 4-row slab of g in smem)
constexpr int64_t kFinalLayerMaxK = 512;    // p*p*C of final_layer (dy rows in smem)

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------------
// Small helpers (host and device: the emulation runs them on the CPU)

template <typename T>
FD_HD float f32(T v);
template <>
FD_HD float f32<float>(float v) {
  return v;
}
template <>
FD_HD float f32<__half>(__half v) {
  return __half2float(v);
}
template <>
FD_HD float f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
FD_HD T cast(float v);
template <>
FD_HD float cast<float>(float v) {
  return v;
}
template <>
FD_HD __half cast<__half>(float v) {
  return __float2half_rn(v);
}
template <>
FD_HD __nv_bfloat16 cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
FD_HD float round_to(float v) {
  return f32<T>(cast<T>(v));
}

// N elements of T as one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVecOf() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int N>
FD_HD void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> pack = *reinterpret_cast<const Vec<T, N>*>(p);
FD_UNROLL
  for (int i = 0; i < N; ++i) out[i] = f32<T>(pack.v[i]);
}

template <typename T, int N>
FD_HD void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> pack;
FD_UNROLL
  for (int i = 0; i < N; ++i) pack.v[i] = cast<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = pack;
}

// N floats into shared memory at s (16-byte aligned when N is a multiple of 4).
template <int N>
FD_HD void store_smem(float* s, const float (&in)[N]) {
  if constexpr (N % 4 == 0) {
FD_UNROLL
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(s + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
    }
  } else {
FD_UNROLL
    for (int i = 0; i < N; ++i) s[i] = in[i];
  }
}

FD_HD float4 load4(const float* s) { return *reinterpret_cast<const float4*>(s); }

FD_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// n / d for a divisor fixed at launch: q = (mulhi(n, m) + n) >> s with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1 (Granlund and Montgomery). Exact for 1 <= d <= 2^31 and
// 0 <= n < 2^31 (then mulhi(n, m) + n < 2^32); the launchers keep every dividend below 2^31.
struct FastDiv {
  uint32_t d, m, s;
};

inline FastDiv make_div(int64_t d) {
  uint32_t s = 0;
  while ((int64_t{1} << s) < d) ++s;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << s) - static_cast<uint64_t>(d))) /
                         static_cast<uint64_t>(d) +
                     1;
  return FastDiv{static_cast<uint32_t>(d), static_cast<uint32_t>(m), s};
}

FD_HD uint32_t div(uint32_t n, const FastDiv& f) { return (mulhi(n, f.m) + n) >> f.s; }

// The token value index k as (c, a, b'): order 0 = "cpq" (c*p + a)*p + b', 1 = "pqc"
// (a*p + b')*C + c.
FD_HD void split_k(int k, int order, int C, int p, int& c, int& a, int& b) {
  if (order == 0) {
    b = k % p;
    const int ca = k / p;
    a = ca % p;
    c = ca / p;
  } else {
    c = k % C;
    const int ab = k / C;
    b = ab % p;
    a = ab / p;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Asks L2 to fetch the `bytes` from p (its 128-byte lines split over the block's threads), for
// data the block reads after its next barrier: the load then waits on L2, not on HBM.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int t, int nthreads) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
  for (int64_t off = static_cast<int64_t>(t) * 128; off < bytes; off += int64_t{128} * nthreads) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
  }
#else
  (void)p, (void)bytes, (void)t, (void)nthreads;
#endif
}

// Sum over a warp, every lane gets the bitwise-identical total (a + b == b + a at each level).
__device__ __forceinline__ float warp_allsum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Mean and 1 / sqrt(var + eps) of the D values at row (D % V == 0 when V > 1), by one warp,
// two passes (the second re-reads the row from L1): sum, then the sum of squared deviations.
template <typename T, int V>
__device__ __forceinline__ void row_stats(const T* row, int D, float eps, int lane, float& mean,
                                          float& rstd) {
  const int nvec = D / V;
  float s = 0.f;
  for (int v = lane; v < nvec; v += kWarp) {
    float x[V];
    load_vec<T, V>(row + static_cast<int64_t>(v) * V, x);
#pragma unroll
    for (int q = 0; q < V; ++q) s += x[q];
  }
  mean = warp_allsum(s) / static_cast<float>(D);
  float m2 = 0.f;
  for (int v = lane; v < nvec; v += kWarp) {
    float x[V];
    load_vec<T, V>(row + static_cast<int64_t>(v) * V, x);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float d = x[q] - mean;
      m2 += d * d;
    }
  }
  const float var = warp_allsum(m2) / static_cast<float>(D);
  rstd = __frsqrt_rn(var + eps);
}

// ---------------------------------------------------------------------------------------------
// patchify / unpatchify: permute_kernel
//
// A tile is R grid rows x J grid columns of one sample: R*J tokens, C * R*p * J*p pixels. In
// shared memory it is laid out like its source: image rows (cr, yy) of L = J*p*Cin elements at
// cr * plane + yy * pitch (NCHW traversal: Cr = C planes, Cin = 1; channels-last: Cr = 1,
// Cin = C, a row holds (x, c) pairs), or tokens of K elements at `pitch`. Phase 1 copies the
// source tile with VS-element vectors (VS = 16 bytes when the source's inner run is contiguous
// and aligned, else 1) into shared memory; phase 2 writes the destination in its memory order,
// lane t of a warp to element t of a run, reading shared memory at the permuted index.
// Per element: one global load (a 16-byte vector for 8 or 4 of them), one shared store (same),
// one shared load, one global store (2 or 4 bytes, 32 consecutive per warp: coalesced).
// pitch and plane are picked by perm_plan: with them the DiT patchify cases (NCHW or
// channels-last x, p = 2, 4, 8) gather without bank conflicts; unpatchify to NCHW keeps 2-4
// way conflicts on its gather (16-byte source stores fix the pitch to multiples of 16 bytes),
// well within the shared-memory bandwidth at HBM speed.

template <typename T>
struct PermParams {
  const T* src;
  T* dst;
  int64_t isb, isc, ish, isw;  // image strides
  int64_t tsb, tsn, tsk;       // token strides
  int C, p, h, w, K, order;
  int R, J, Cr, Cin, pitch;
  int plane;  // image staging: the shared-memory stride of a channel plane (>= R*p * pitch)
  int kc, ka, kb;  // k = c*kc + a*ka + b'*kb
  uint32_t tiles;
  FastDiv tw, th;  // tiles per grid row, tiles per column
  FastDiv nv;      // source vectors per shared-memory row
  FastDiv rp;      // R * p
  FastDiv jd;      // J
  FastDiv pd;      // p
  FastDiv cin;     // Cin
};

template <typename T, bool TO_TOKENS, int VS>
__global__ void __launch_bounds__(kThreads) permute_kernel(const PermParams<T> P) {
  FD_DYNAMIC_SMEM(raw);
  T* s = reinterpret_cast<T*>(raw);
  constexpr int U = 4;  // source vectors in flight per thread
  const int t = static_cast<int>(threadIdx.x);
  const int Rp = P.R * P.p, L = P.J * P.p * P.Cin, K = P.K;

  for (uint32_t tile = blockIdx.x; tile < P.tiles; tile += gridDim.x) {
    const uint32_t q = div(tile, P.tw);
    const int tj = static_cast<int>(tile - q * P.tw.d);
    const uint32_t b = div(q, P.th);
    const int ti = static_cast<int>(q - b * P.th.d);
    const int i0 = ti * P.R, j0 = tj * P.J;
    const int Re = min(P.R, P.h - i0), Je = min(P.J, P.w - j0);  // this tile's extent
    const int64_t img0 = static_cast<int64_t>(b) * P.isb +
                         static_cast<int64_t>(i0) * P.p * P.ish +
                         static_cast<int64_t>(j0) * P.p * P.isw;
    const int64_t tok0 = static_cast<int64_t>(b) * P.tsb +
                         (static_cast<int64_t>(i0) * P.w + j0) * P.tsn;

    if constexpr (TO_TOKENS) {
      // 1. image tile -> shared memory (image rows (cr, yy), `pos` along the row).
      const int rows = P.Cr * Rp;
      const int nv = L / VS;
      const int total = rows * nv;
      const int yend = Re * P.p, xend = Je * P.p * P.Cin;
      for (int v0 = 0; v0 < total; v0 += kThreads * U) {
        Vec<T, VS> val[U];
        int soff[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = v0 + u * kThreads + t;
          soff[u] = -1;
          if (v < total) {
            const int row = static_cast<int>(div(static_cast<uint32_t>(v), P.nv));
            const int pos = (v - row * nv) * VS;
            const int cr = static_cast<int>(div(static_cast<uint32_t>(row), P.rp));
            const int yy = row - cr * Rp;
            if (yy < yend && pos < xend) {
              int64_t off = img0 + cr * P.isc + yy * P.ish;
              if constexpr (VS > 1) {
                off += pos;  // the row is contiguous (checked by the launcher)
              } else {
                const int x = static_cast<int>(div(static_cast<uint32_t>(pos), P.cin));
                off += x * P.isw + (pos - x * P.Cin) * P.isc;
              }
              val[u] = *reinterpret_cast<const Vec<T, VS>*>(P.src + off);
              soff[u] = cr * P.plane + yy * P.pitch + pos;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (soff[u] >= 0) *reinterpret_cast<Vec<T, VS>*>(s + soff[u]) = val[u];
        }
      }
      __syncthreads();

      // 2. shared memory -> tokens: thread t owns value k = t % K of every (t / K)-th token
      // (K <= 256), or values t, t + 256, ... of every token (K > 256).
      const int ntok = P.R * P.J;
      const bool narrow = K <= kThreads;
      const int slots = narrow ? kThreads / K : 1;
      const int ts = narrow ? t / K : 0;
      const int kstep = narrow ? K : kThreads;
      const int cs = P.Cin == 1 ? P.plane : 1;  // shared-memory stride of a channel
      if (ts < slots) {
        for (int k = narrow ? t % K : t; k < K; k += kstep) {
          int c, a, bb;
          split_k(k, P.order, P.C, P.p, c, a, bb);
          const int koff = c * cs + a * P.pitch + bb * P.Cin;
          const int64_t dk = tok0 + k * P.tsk;
          for (int tok = ts; tok < ntok; tok += slots) {
            const int ii = static_cast<int>(div(static_cast<uint32_t>(tok), P.jd));
            const int j = tok - ii * P.J;
            if (ii < Re && j < Je) {
              P.dst[dk + (static_cast<int64_t>(ii) * P.w + j) * P.tsn] =
                  s[ii * P.p * P.pitch + j * P.p * P.Cin + koff];
            }
          }
        }
      }
    } else {
      // 1. token tile -> shared memory (token ii * J + j at row `tok`).
      const int nv = K / VS;
      const int total = P.R * P.J * nv;
      for (int v0 = 0; v0 < total; v0 += kThreads * U) {
        Vec<T, VS> val[U];
        int soff[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = v0 + u * kThreads + t;
          soff[u] = -1;
          if (v < total) {
            const int tok = static_cast<int>(div(static_cast<uint32_t>(v), P.nv));
            const int kv = v - tok * nv;
            const int ii = static_cast<int>(div(static_cast<uint32_t>(tok), P.jd));
            const int j = tok - ii * P.J;
            if (ii < Re && j < Je) {
              int64_t off = tok0 + (static_cast<int64_t>(ii) * P.w + j) * P.tsn;
              off += VS > 1 ? static_cast<int64_t>(kv) * VS : kv * P.tsk;
              val[u] = *reinterpret_cast<const Vec<T, VS>*>(P.src + off);
              soff[u] = tok * P.pitch + kv * VS;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (soff[u] >= 0) *reinterpret_cast<Vec<T, VS>*>(s + soff[u]) = val[u];
        }
      }
      __syncthreads();

      // 2. shared memory -> image rows (cr, yy): thread t owns position t % L of every
      // (t / L)-th row (L <= 256), or positions t, t + 256, ... of every row.
      const int rows = P.Cr * Rp;
      const bool narrow = L <= kThreads;
      const int slots = narrow ? kThreads / L : 1;
      const int rs = narrow ? t / L : 0;
      const int pstep = narrow ? L : kThreads;
      const int yend = Re * P.p, xend = Je * P.p;
      if (rs < slots) {
        for (int pos = narrow ? t % L : t; pos < L; pos += pstep) {
          const int x = static_cast<int>(div(static_cast<uint32_t>(pos), P.cin));
          const int ci = pos - x * P.Cin;  // the channel when Cin == C, else 0
          if (x >= xend) continue;
          const int j = static_cast<int>(div(static_cast<uint32_t>(x), P.pd));
          const int bb = x - j * P.p;
          const int poff = j * P.pitch + bb * P.kb + ci * P.kc;
          const int64_t goff = img0 + static_cast<int64_t>(x) * P.isw + ci * P.isc;
          for (int r = rs; r < rows; r += slots) {
            const int cr = static_cast<int>(div(static_cast<uint32_t>(r), P.rp));
            const int yy = r - cr * Rp;
            if (yy >= yend) continue;
            const int ii = static_cast<int>(div(static_cast<uint32_t>(yy), P.pd));
            const int a = yy - ii * P.p;
            P.dst[goff + cr * P.isc + yy * P.ish] =
                s[ii * P.J * P.pitch + cr * P.kc + a * P.ka + poff];
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites the staging buffer
  }
}

// ---------------------------------------------------------------------------------------------
// patch_embed forward: pe_fwd_kernel
//
// Block (64 rows of B*N, 128 channels). Warp wy owns rows wy*8 .. wy*8+7, lane tx the channels
// 4tx .. 4tx+3: 32 fp32 accumulators, 2 + 1 16-byte shared loads (2 broadcast) per 32 FMAs.
// k runs in chunks of KC (16 or 32; zero-padded past K: 0 * 0 adds nothing) in cpq order.

constexpr int kPeRows = 64;
constexpr int kPeCols = 128;

template <typename T>
struct PeFwdParams {
  const T* x;
  const T* weight;  // (D, K) contiguous
  const T* bias;    // (D,)
  const T* pos;     // (N, D) contiguous
  T* out;           // (B, N, D) contiguous
  int64_t isb, isc, ish, isw;
  int C, p, w, N, D, K;
  uint32_t rows;  // B * N
  FastDiv nd, wd;
};

template <typename T, int KC, bool VEC4>
__global__ void __launch_bounds__(kThreads) pe_fwd_kernel(const PeFwdParams<T> P) {
  constexpr int kPsPitch = kPeRows + 4;  // 16-byte aligned rows, fewer store conflicts
  __shared__ __align__(16) float ps[KC * kPsPitch];  // patches, [k][row]
  __shared__ __align__(16) float ws[KC * kPeCols];   // weight, [k][channel]
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % kWarp, wy = t / kWarp;
  const uint32_t r0 = blockIdx.x * kPeRows;
  const int d0 = static_cast<int>(blockIdx.y) * kPeCols;
  const int kk = t % KC;  // the patch value this thread gathers, in every chunk

  float acc[8][4];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = 0.f;
  }

  for (int k0 = 0; k0 < P.K; k0 += KC) {
    const int k = k0 + kk;
    int c = 0, a = 0, bb = 0;
    if (k < P.K) split_k(k, 0, P.C, P.p, c, a, bb);
    const int64_t koff = c * P.isc + a * P.ish + bb * P.isw;
#pragma unroll
    for (int m = 0; m < KC * kPeRows / kThreads; ++m) {
      const int row = t / KC + m * (kThreads / KC);
      const uint32_t r = r0 + row;
      float v = 0.f;
      if (k < P.K && r < P.rows) {
        const uint32_t b = div(r, P.nd);
        const uint32_t n = r - b * P.N;
        const uint32_t i = div(n, P.wd);
        const uint32_t j = n - i * P.w;
        v = f32<T>(P.x[b * P.isb + static_cast<int64_t>(i) * P.p * P.ish +
                       static_cast<int64_t>(j) * P.p * P.isw + koff]);
      }
      ps[kk * kPsPitch + row] = v;
    }
#pragma unroll
    for (int m = 0; m < KC * kPeCols / kThreads; ++m) {
      const int e = t + m * kThreads;
      const int dd = e % kPeCols, kw = e / kPeCols;
      const int d = d0 + dd, kx = k0 + kw;
      ws[kw * kPeCols + dd] =
          d < P.D && kx < P.K ? f32<T>(P.weight[static_cast<int64_t>(d) * P.K + kx]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < KC; ++q) {
      const float4 a0 = load4(ps + q * kPsPitch + wy * 8);
      const float4 a1 = load4(ps + q * kPsPitch + wy * 8 + 4);
      const float4 wv = load4(ws + q * kPeCols + lane * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float wq[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int r = 0; r < 8; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][e] = fmaf(av[r], wq[e], acc[r][e]);
      }
    }
    __syncthreads();
  }

  const int d = d0 + lane * 4;
  if (d >= P.D) return;
  float bias[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) bias[e] = d + e < P.D ? f32<T>(P.bias[d + e]) : 0.f;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const uint32_t row = r0 + wy * 8 + r;
    if (row >= P.rows) break;
    const uint32_t n = row - div(row, P.nd) * P.N;
    const T* pos = P.pos + static_cast<int64_t>(n) * P.D + d;
    T* out = P.out + static_cast<int64_t>(row) * P.D + d;
    if constexpr (VEC4) {  // D % 4 == 0 and aligned pointers: d + 3 < D
      float pv[4], y[4];
      load_vec<T, 4>(pos, pv);
#pragma unroll
      for (int e = 0; e < 4; ++e) y[e] = acc[r][e] + bias[e] + pv[e];
      store_vec<T, 4>(out, y);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (d + e < P.D) out[e] = cast<T>(acc[r][e] + bias[e] + f32<T>(pos[e]));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rowgemm_kernel: y[row, k] = sum_d A[row, d] * Bm[d, k] (+ bias[k]), scattered to an image.
//
// Block: 32 rows, all of D in chunks of 128, one chunk of KC outputs at a time. Warp w owns
// columns 16w .. 16w+15 of each chunk; lane (rg, kg) owns rows rg + RG*i (i < MR) and outputs
// 4kg .. 4kg+3: per 4 columns, MR + 4 16-byte shared loads feed MR*16 FMAs. The 8 warps' sums
// are added in warp order through shared memory at the end (deterministic).
// LN: A = round_T((x - mean) * rstd * (1 + scale[b]) + shift[b]), the statistics of each row
// taken first by one warp per row (two passes over the row).

constexpr int kRgRows = 32;
constexpr int kRgCols = 128;

template <typename T>
struct RowGemmParams {
  const T* a;     // (rows, D) contiguous
  const T* bmat;  // (D, K) contiguous
  const T* bias;  // (K,) or null
  const T* shift;
  const T* scale;  // (B, D) contiguous (LN)
  T* out;
  int64_t osb, osc, osh, osw;
  int C, p, w, N, D, K, order;
  uint32_t rows;
  float eps;
  FastDiv nd, wd;
};

template <typename T, int KC, int VA, bool LN>
__global__ void __launch_bounds__(kThreads, 2) rowgemm_kernel(const RowGemmParams<T> P) {
  constexpr int KG = KC / 4, RG = kWarp / KG, MR = kRgRows / RG;
  constexpr int kAPitch = kRgCols + 4;
  constexpr int kTiles = kRgRows * kAPitch + kRgCols * KC;
  constexpr int kRed = (kThreads / kWarp) * kRgRows * KC;
  __shared__ __align__(16) float sm[kTiles > kRed ? kTiles : kRed];
  __shared__ float s_mean[kRgRows], s_rstd[kRgRows];
  __shared__ uint32_t s_b[kRgRows];
  float* as = sm;                     // [row][d], pitch kAPitch
  float* bs = sm + kRgRows * kAPitch;  // [d][k]
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % kWarp, warp = t / kWarp;
  const int kg = lane % KG, rg = lane / KG;
  const uint32_t r0 = blockIdx.x * kRgRows;
  const int D = P.D;

  if (t < kRgRows) s_b[t] = r0 + t < P.rows ? div(r0 + t, P.nd) : 0u;
  if constexpr (LN) {
    for (int row = warp; row < kRgRows; row += kThreads / kWarp) {
      float mean = 0.f, rstd = 0.f;
      if (r0 + row < P.rows) {
        row_stats<T, VA>(P.a + static_cast<int64_t>(r0 + row) * D, D, P.eps, lane, mean, rstd);
      }
      if (lane == 0) {
        s_mean[row] = mean;
        s_rstd[row] = rstd;
      }
    }
  }
  __syncthreads();

  for (int k0 = 0; k0 < P.K; k0 += KC) {
    float acc[MR][4];
#pragma unroll
    for (int i = 0; i < MR; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    }
    for (int d0 = 0; d0 < D; d0 += kRgCols) {
      // A tile: 32 rows x 128 columns, VA-element vectors.
      constexpr int kVecPerRow = kRgCols / VA;
#pragma unroll 4
      for (int m = 0; m < kRgRows * kVecPerRow / kThreads; ++m) {
        const int v = t + m * kThreads;
        const int row = v / kVecPerRow, dv = v % kVecPerRow;
        const int d = d0 + dv * VA;
        const uint32_t r = r0 + row;
        float val[VA];
#pragma unroll
        for (int e = 0; e < VA; ++e) val[e] = 0.f;
        if (r < P.rows && d < D) {
          load_vec<T, VA>(P.a + static_cast<int64_t>(r) * D + d, val);
          if constexpr (LN) {
            const int64_t cb = static_cast<int64_t>(s_b[row]) * D + d;
            float sc[VA], sh[VA];
            load_vec<T, VA>(P.scale + cb, sc);
            load_vec<T, VA>(P.shift + cb, sh);
            const float mean = s_mean[row], rstd = s_rstd[row];
#pragma unroll
            for (int e = 0; e < VA; ++e) {
              val[e] = round_to<T>((val[e] - mean) * rstd * (1.f + sc[e]) + sh[e]);
            }
          }
        }
        store_smem<VA>(as + row * kAPitch + dv * VA, val);
      }
      // Bm tile: 128 columns x KC outputs.
#pragma unroll 4
      for (int m = 0; m < kRgCols * KC / kThreads; ++m) {
        const int e = t + m * kThreads;
        const int kk = e % KC, dd = e / KC;
        const int d = d0 + dd, k = k0 + kk;
        bs[dd * KC + kk] =
            d < D && k < P.K ? f32<T>(P.bmat[static_cast<int64_t>(d) * P.K + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int s4 = 0; s4 < 4; ++s4) {
        const int dl = warp * 16 + s4 * 4;
        float bq[4][4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 b4 = load4(bs + (dl + q) * KC + kg * 4);
          bq[q][0] = b4.x;
          bq[q][1] = b4.y;
          bq[q][2] = b4.z;
          bq[q][3] = b4.w;
        }
#pragma unroll
        for (int i = 0; i < MR; ++i) {
          const float4 a4 = load4(as + (rg + RG * i) * kAPitch + dl);
          const float av[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] = fmaf(av[q], bq[q][e], acc[i][e]);
          }
        }
      }
      __syncthreads();
    }

    // The 8 warps' partial sums, added in warp order; + bias; round once; scatter.
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      *reinterpret_cast<float4*>(sm + (warp * kRgRows + rg + RG * i) * KC + kg * 4) =
          make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kRgRows * KC / kThreads; ++m) {
      const int e = t + m * kThreads;
      const int kk = e % KC, row = e / KC;
      const uint32_t r = r0 + row;
      const int k = k0 + kk;
      if (r < P.rows && k < P.K) {
        float y = 0.f;
#pragma unroll
        for (int wv = 0; wv < kThreads / kWarp; ++wv) y += sm[(wv * kRgRows + row) * KC + kk];
        if (P.bias != nullptr) y += f32<T>(P.bias[k]);
        const uint32_t b = s_b[row];
        const uint32_t n = r - b * P.N;
        const uint32_t i = div(n, P.wd);
        const uint32_t j = n - i * P.w;
        int c, a, bb;
        split_k(k, P.order, P.C, P.p, c, a, bb);
        P.out[b * P.osb + c * P.osc + (static_cast<int64_t>(i) * P.p + a) * P.osh +
              (static_cast<int64_t>(j) * P.p + bb) * P.osw] = cast<T>(y);
      }
    }
    __syncthreads();  // the next chunk overwrites sm
  }
}

// ---------------------------------------------------------------------------------------------
// opr_kernel: partial[s * ntiles + nt][d][k] = sum over the samples b of split s and the 32
// tokens n of tile nt of u[b, n, d] * v[b, n, k].
//
// Block (tile nt, split s) x (128 channels) x (KC values of k). Lane (dl, kl) owns 8 channels x
// 4 values (32 accumulators); the 8 warps are WDG channel groups x WRG row groups, and the WRG
// row groups are added in order at the end. Per row: 2 + 1 16-byte shared loads for 32 FMAs.
// FINAL (final_layer): u = round_T((x - mean) * rstd * (1 + scale) + shift) with the statistics
// saved by fl_rows_kernel, v = the patches of dout (pqc), and the partial sums of v are dbias.
// Else (patch_embed): u = dout, v = the patches of x (cpq), and each thread also sums its own
// fixed positions of u over the samples (in order): the dpos partials.

constexpr int kOprRows = 32;
constexpr int kOprCols = 128;

template <typename T>
struct OprParams {
  const T* u;    // (B, N, D) contiguous
  const T* img;  // image gathered into v
  const float* stats;
  const T* shift;
  const T* scale;
  float* dw;     // partials
  float* dpos;   // (splits, N, D)
  float* dbias;  // (partials, K)
  int64_t isb, isc, ish, isw;
  int64_t wsp, wsd, wsk;  // strides of dw: partial, d, k
  int C, p, w, N, D, K, order, B, ntiles, bper;
  FastDiv wd, ntd;
};

template <typename T, int KC, int VU, bool FINAL>
__global__ void __launch_bounds__(kThreads, VU > 1 ? 2 : 1) opr_kernel(const OprParams<T> P) {
  constexpr int KL = KC / 4, DL = kWarp / KL, SPAN = DL * 8;
  constexpr int WDG = kOprCols / SPAN, WRG = (kThreads / kWarp) / WDG, RPW = kOprRows / WRG;
  constexpr int kVecPerRow = kOprCols / VU;
  constexpr int NU = kOprRows * kVecPerRow / kThreads;  // u vectors per thread
  constexpr int NV = kOprRows * KC / kThreads;          // v values per thread
  constexpr int kTiles = kOprRows * kOprCols + kOprRows * KC;
  constexpr int kRed = WRG * kOprCols * KC;
  __shared__ __align__(16) float sm[kTiles > kRed ? kTiles : kRed];
  float* us = sm;                        // [row][d]
  float* vs = sm + kOprRows * kOprCols;  // [row][k]

  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % kWarp, warp = t / kWarp;
  const int kl = lane % KL, dl = lane / KL, wd = warp % WDG, wr = warp / WDG;
  const int dloc = wd * SPAN + dl * 8;
  const uint32_t split = div(blockIdx.x, P.ntd);
  const int nt = static_cast<int>(blockIdx.x - split * P.ntiles);
  const int n0 = nt * kOprRows, d0 = static_cast<int>(blockIdx.y) * kOprCols;
  const int k0 = static_cast<int>(blockIdx.z) * KC;
  const int b_begin = static_cast<int>(split) * P.bper;
  const int b_end = min(P.B, b_begin + P.bper);
  const int64_t ND = static_cast<int64_t>(P.N) * P.D;

  // This thread's positions in the u tile: vector t + m * kThreads is (row, dv) (the same for
  // every sample); and in the v tile: value kk of rows t / KC + m * (kThreads / KC).
  const auto u_row = [&](int m) { return (t + m * kThreads) / kVecPerRow; };
  const auto u_col = [&](int m) { return (t + m * kThreads) % kVecPerRow * VU; };
  const int kk = t % KC, k = k0 + kk;
  int c = 0, a = 0, bb = 0;
  if (k < P.K) split_k(k, P.order, P.C, P.p, c, a, bb);
  int64_t voff[NV];
#pragma unroll
  for (int m = 0; m < NV; ++m) {
    const int n = n0 + t / KC + m * (kThreads / KC);
    const bool ok = n < P.N && k < P.K;
    const uint32_t i = ok ? div(static_cast<uint32_t>(n), P.wd) : 0u;
    const uint32_t j = ok ? static_cast<uint32_t>(n) - i * P.w : 0u;
    voff[m] = ok ? c * P.isc + (static_cast<int64_t>(i) * P.p + a) * P.ish +
                       (static_cast<int64_t>(j) * P.p + bb) * P.isw
                 : int64_t{-1};
  }

  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
  float extra_u[FINAL ? 1 : NU][VU];  // dpos partial sums (patch_embed)
  float extra_v[FINAL ? NV : 1];      // dbias partial sums (final_layer)
#pragma unroll
  for (int m = 0; m < (FINAL ? 1 : NU); ++m) {
#pragma unroll
    for (int e = 0; e < VU; ++e) extra_u[m][e] = 0.f;
  }
#pragma unroll
  for (int m = 0; m < (FINAL ? NV : 1); ++m) extra_v[m] = 0.f;

  float ureg[NU][VU], vreg[NV];
  const auto fetch = [&](int b) {
#pragma unroll
    for (int m = 0; m < NU; ++m) {
      const int n = n0 + u_row(m), d = d0 + u_col(m);
#pragma unroll
      for (int e = 0; e < VU; ++e) ureg[m][e] = 0.f;
      if (n < P.N && d < P.D) {
        const int64_t row = static_cast<int64_t>(b) * P.N + n;
        load_vec<T, VU>(P.u + row * P.D + d, ureg[m]);
        if constexpr (FINAL) {
          const float mean = P.stats[row * 2], rstd = P.stats[row * 2 + 1];
          const int64_t cb = static_cast<int64_t>(b) * P.D + d;
          float sc[VU], sh[VU];
          load_vec<T, VU>(P.scale + cb, sc);
          load_vec<T, VU>(P.shift + cb, sh);
#pragma unroll
          for (int e = 0; e < VU; ++e) {
            ureg[m][e] = round_to<T>((ureg[m][e] - mean) * rstd * (1.f + sc[e]) + sh[e]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < NV; ++m) {
      vreg[m] = voff[m] >= 0 ? f32<T>(P.img[static_cast<int64_t>(b) * P.isb + voff[m]]) : 0.f;
    }
  };

  if (b_begin < b_end) fetch(b_begin);
  for (int b = b_begin; b < b_end; ++b) {
#pragma unroll
    for (int m = 0; m < NU; ++m) {
      store_smem<VU>(us + u_row(m) * kOprCols + u_col(m), ureg[m]);
      if constexpr (!FINAL) {
#pragma unroll
        for (int e = 0; e < VU; ++e) extra_u[m][e] += ureg[m][e];
      }
    }
#pragma unroll
    for (int m = 0; m < NV; ++m) {
      vs[(t / KC + m * (kThreads / KC)) * KC + kk] = vreg[m];
      if constexpr (FINAL) extra_v[m] += vreg[m];
    }
    __syncthreads();
    if (b + 1 < b_end) fetch(b + 1);  // in flight while this sample is multiplied
#pragma unroll 2
    for (int rr = 0; rr < RPW; ++rr) {
      const int row = wr * RPW + rr;
      const float4 u0 = load4(us + row * kOprCols + dloc);
      const float4 u1 = load4(us + row * kOprCols + dloc + 4);
      const float4 v4 = load4(vs + row * KC + kl * 4);
      const float uv[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
      const float vv[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = fmaf(uv[i], vv[e], acc[i][e]);
      }
    }
    __syncthreads();
  }

  // The WRG row groups' sums, added in group order.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    *reinterpret_cast<float4*>(sm + (wr * kOprCols + dloc + i) * KC + kl * 4) =
        make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  }
  __syncthreads();
  float* dw = P.dw + static_cast<int64_t>(blockIdx.x) * P.wsp;
#pragma unroll
  for (int m = 0; m < kOprCols * KC / kThreads; ++m) {
    const int e = t + m * kThreads;
    const int dd = e / KC, kx = e % KC;
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < WRG; ++g) total += sm[(g * kOprCols + dd) * KC + kx];
    if (d0 + dd < P.D && k0 + kx < P.K) dw[(d0 + dd) * P.wsd + (k0 + kx) * P.wsk] = total;
  }

  if constexpr (!FINAL) {
    if (blockIdx.z == 0) {  // dpos[split][n][d]: every block of the split writes its tile
#pragma unroll
      for (int m = 0; m < NU; ++m) {
        const int n = n0 + u_row(m), d = d0 + u_col(m);
        if (n < P.N && d < P.D) {
          float* dst =
              P.dpos + static_cast<int64_t>(split) * ND + static_cast<int64_t>(n) * P.D + d;
#pragma unroll
          for (int e = 0; e < VU; ++e) dst[e] = extra_u[m][e];
        }
      }
    }
  } else {
    if (blockIdx.y == 0) {  // dbias[partial][k]: the tile's 32 rows added in row order
      __syncthreads();      // done reading sm above
#pragma unroll
      for (int m = 0; m < NV; ++m) sm[(t / KC + m * (kThreads / KC)) * KC + kk] = extra_v[m];
      __syncthreads();
      if (t < KC && k0 + t < P.K) {
        float total = 0.f;
        for (int row = 0; row < kOprRows; ++row) total += sm[row * KC + t];
        P.dbias[static_cast<int64_t>(blockIdx.x) * P.K + k0 + t] = total;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fl_rows_kernel: final_layer backward for TR tokens at a time (TR = 4, or 2 or 1 where shared
// memory is short) of sample b = blockIdx / S, tiles s, s + S, ... of that sample. With
// n = (x - mean) * rstd and dy the patches of dout:
//   dm = dy @ W (over K),  g = dm * (1 + scale[b]),
//   dx = rstd * (g - mean_D(g) - n * mean_D(g * n)),
//   dshift[b] += dm,  dscale[b] += dm * n   (per channel, rows in order, tiles in order).
// Thread t owns channel vectors t, t + blockDim, ... (VD channels each; at most kFlMaxRounds of
// them) throughout, so g, the dshift / dscale sums (registers) and dx of a channel are only
// touched by one thread. g of the TR rows is kept in shared memory (fp32) between the sweeps.

constexpr int kFlMaxRows = 4;
constexpr int kFlMaxWarps = 16;   // blockDim <= 512
constexpr int kFlMaxRounds = 4;   // channel vectors per thread: D <= 4 * 512 * VD
// Registers a thread, for two blocks of 9 warps per SM (DiT-XL/2's D = 1152 in 4-channel
// vectors; shared memory allows two, fl_rows_plan). The 64 K registers of an SM are four
// quarters of 16 K, each holding whole warps: 18 warps need 5 a quarter, <= 3276 registers a
// warp, 96 a thread (at 104-128, 4 a quarter: one block). Uncapped, ptxas took 124-128; at 96
// the 4-channel kernels spill 4-8 bytes (stored once, read back 8-12 bytes; sm_80, sm_90),
// which two blocks' latency hiding outweighs.
constexpr int kFlMaxRegisters = 96;

struct FlLayout {  // dynamic shared memory, in floats (every piece 16-byte aligned)
  int64_t ys, g, red, stats, w, total;
};

FD_HD int64_t align4(int64_t v) { return (v + 3) / 4 * 4; }

FD_HD FlLayout fl_layout(int64_t D, int64_t K, int64_t rows, bool w_smem, int64_t esize) {
  FlLayout l{};
  l.ys = 0;
  l.g = l.ys + rows * align4(K);
  l.red = l.g + align4(rows * D);
  l.stats = l.red + 2 * kFlMaxRows * kFlMaxWarps;
  l.w = l.stats + 2 * kFlMaxRows;
  l.total = l.w + (w_smem ? align4((K * D * esize + 3) / 4) : 0);
  return l;
}

template <typename T>
struct FlRowsParams {
  const T* x;
  const T* scale;
  const T* weight;  // (K, D) contiguous
  const T* dout;
  T* dx;
  float* stats;  // (B * N, 2): mean, rstd
  float* dss;    // (2, B, S, D): dshift, dscale partials
  int64_t dsb, dsc, dsh, dsw;
  int C, p, w, N, D, K, B, S, TR;
  float eps;
  bool w_smem;
  FastDiv wd, kd;
};

template <typename T, int VD>
__global__ void FD_MAX_REGISTERS(kFlMaxRegisters, 512, 1)
    fl_rows_kernel(const FlRowsParams<T> P) {
  FD_DYNAMIC_SMEM(raw);
  const int D = P.D, K = P.K, TR = P.TR;
  const FlLayout L = fl_layout(D, K, TR, P.w_smem, sizeof(T));
  const int kp = static_cast<int>(align4(K));
  float* ys = raw + L.ys;  // [row][k], pitch kp
  float* gs = raw + L.g;   // [row][d]
  float* red = raw + L.red;
  float* s_mean = raw + L.stats;
  float* s_rstd = s_mean + kFlMaxRows;
  T* ws = reinterpret_cast<T*>(raw + L.w);
  const T* W = P.w_smem ? ws : P.weight;

  const int t = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int lane = t % kWarp, warp = t / kWarp, nwarps = nthreads / kWarp;
  const int b = static_cast<int>(blockIdx.x) / P.S, s = static_cast<int>(blockIdx.x) % P.S;
  const int nvec = D / VD;
  const int64_t xb = static_cast<int64_t>(b) * P.N * D;
  const T* scale = P.scale + static_cast<int64_t>(b) * D;

  float dsr[kFlMaxRounds][VD], dcr[kFlMaxRounds][VD];
#pragma unroll
  for (int m = 0; m < kFlMaxRounds; ++m) {
#pragma unroll
    for (int e = 0; e < VD; ++e) dsr[m][e] = dcr[m][e] = 0.f;
  }
  if (P.w_smem) {
    const int64_t total = static_cast<int64_t>(K) * D;
    for (int64_t i = t; i < total; i += nthreads) ws[i] = P.weight[i];
  }

  const int ntiles = (P.N + TR - 1) / TR;
  for (int tile = s; tile < ntiles; tile += P.S) {
    const int n0 = tile * TR;
    const int nrows = min(TR, P.N - n0);
    // dy: the patches of dout (pqc) of the tile's tokens.
    for (int e = t; e < TR * K; e += nthreads) {
      const int rr = static_cast<int>(div(static_cast<uint32_t>(e), P.kd));
      const int k = e - rr * K;
      float v = 0.f;
      if (rr < nrows) {
        const int n = n0 + rr;
        const int i = static_cast<int>(div(static_cast<uint32_t>(n), P.wd));
        const int j = n - i * P.w;
        int c, a, bb;
        split_k(k, 1, P.C, P.p, c, a, bb);
        v = f32<T>(P.dout[b * P.dsb + c * P.dsc + (static_cast<int64_t>(i) * P.p + a) * P.dsh +
                          (static_cast<int64_t>(j) * P.p + bb) * P.dsw]);
      }
      ys[rr * kp + k] = v;
    }
    // Row statistics (two passes), saved for the parameter-gradient kernel.
    for (int rr = warp; rr < nrows; rr += nwarps) {
      float mean, rstd;
      row_stats<T, VD>(P.x + xb + static_cast<int64_t>(n0 + rr) * D, D, P.eps, lane, mean,
                       rstd);
      if (lane == 0) {
        s_mean[rr] = mean;
        s_rstd[rr] = rstd;
        float* st = P.stats + (static_cast<int64_t>(b) * P.N + n0 + rr) * 2;
        st[0] = mean;
        st[1] = rstd;
      }
    }
    __syncthreads();

    if (tile + P.S < ntiles) {  // the next tile's rows, read by its statistics pass
      const int n1 = (tile + P.S) * TR;
      prefetch_l2(P.x + xb + static_cast<int64_t>(n1) * D,
                  static_cast<int64_t>(min(TR, P.N - n1)) * D * sizeof(T), t, nthreads);
    }

    // Sweep 1: dm, g, the row sums of g and g * n, the channel sums of dm and dm * n.
    float sg[kFlMaxRows], sgn[kFlMaxRows];
#pragma unroll
    for (int rr = 0; rr < kFlMaxRows; ++rr) sg[rr] = sgn[rr] = 0.f;
    const int k4 = K / 4 * 4;
#pragma unroll
    for (int m = 0; m < kFlMaxRounds; ++m) {
      const int v = t + m * nthreads;
      if (v >= nvec) break;
      const int d = v * VD;
      float acc[kFlMaxRows][VD];
#pragma unroll
      for (int rr = 0; rr < kFlMaxRows; ++rr) {
#pragma unroll
        for (int e = 0; e < VD; ++e) acc[rr][e] = 0.f;
      }
      for (int k = 0; k < k4; k += 4) {
        float wv[4][VD];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          load_vec<T, VD>(W + static_cast<int64_t>(k + q) * D + d, wv[q]);
        }
#pragma unroll
        for (int rr = 0; rr < kFlMaxRows; ++rr) {
          if (rr < TR) {
            const float4 y4 = load4(ys + rr * kp + k);
            const float yv[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
#pragma unroll
              for (int e = 0; e < VD; ++e) acc[rr][e] = fmaf(yv[q], wv[q][e], acc[rr][e]);
            }
          }
        }
      }
      for (int k = k4; k < K; ++k) {
        float wv[VD];
        load_vec<T, VD>(W + static_cast<int64_t>(k) * D + d, wv);
#pragma unroll
        for (int rr = 0; rr < kFlMaxRows; ++rr) {
          if (rr < TR) {
            const float y = ys[rr * kp + k];
#pragma unroll
            for (int e = 0; e < VD; ++e) acc[rr][e] = fmaf(y, wv[e], acc[rr][e]);
          }
        }
      }
      float sc[VD];
      load_vec<T, VD>(scale + d, sc);
#pragma unroll
      for (int rr = 0; rr < kFlMaxRows; ++rr) {
        if (rr < nrows) {
          float xv[VD];
          load_vec<T, VD>(P.x + xb + static_cast<int64_t>(n0 + rr) * D + d, xv);
#pragma unroll
          for (int e = 0; e < VD; ++e) {
            const float n = (xv[e] - s_mean[rr]) * s_rstd[rr];
            const float dm = acc[rr][e];
            const float g = dm * (1.f + sc[e]);
            gs[rr * D + d + e] = g;
            sg[rr] += g;
            sgn[rr] += g * n;
            dsr[m][e] += dm;
            dcr[m][e] += dm * n;
          }
        }
      }
    }
    // Row sums over the block: lanes by the butterfly, warps in order.
#pragma unroll
    for (int rr = 0; rr < kFlMaxRows; ++rr) {
      if (rr < TR) {
        const float a = warp_allsum(sg[rr]), g2 = warp_allsum(sgn[rr]);
        if (lane == 0) {
          red[(rr * 2) * kFlMaxWarps + warp] = a;
          red[(rr * 2 + 1) * kFlMaxWarps + warp] = g2;
        }
      }
    }
    __syncthreads();
    float mg[kFlMaxRows], mgn[kFlMaxRows];
#pragma unroll
    for (int rr = 0; rr < kFlMaxRows; ++rr) {
      float a = 0.f, g2 = 0.f;
      if (rr < TR) {
        for (int wv = 0; wv < nwarps; ++wv) {
          a += red[(rr * 2) * kFlMaxWarps + wv];
          g2 += red[(rr * 2 + 1) * kFlMaxWarps + wv];
        }
      }
      mg[rr] = a / static_cast<float>(D);
      mgn[rr] = g2 / static_cast<float>(D);
    }

    // Sweep 2: dx.
#pragma unroll
    for (int m = 0; m < kFlMaxRounds; ++m) {
      const int v = t + m * nthreads;
      if (v >= nvec) break;
      const int d = v * VD;
#pragma unroll
      for (int rr = 0; rr < kFlMaxRows; ++rr) {
        if (rr < nrows) {
          const int64_t off = xb + static_cast<int64_t>(n0 + rr) * D + d;
          float xv[VD], dxv[VD];
          load_vec<T, VD>(P.x + off, xv);
#pragma unroll
          for (int e = 0; e < VD; ++e) {
            const float n = (xv[e] - s_mean[rr]) * s_rstd[rr];
            dxv[e] = s_rstd[rr] * (gs[rr * D + d + e] - mg[rr] - n * mgn[rr]);
          }
          store_vec<T, VD>(P.dx + off, dxv);
        }
      }
    }
    __syncthreads();  // the next tile overwrites ys, red and the statistics
  }

  float* dshift = P.dss + (static_cast<int64_t>(b) * P.S + s) * D;
  float* dscale = P.dss + ((static_cast<int64_t>(P.B) + b) * P.S + s) * D;
#pragma unroll
  for (int m = 0; m < kFlMaxRounds; ++m) {
    const int v = t + m * nthreads;
    if (v >= nvec) break;
#pragma unroll
    for (int e = 0; e < VD; ++e) {
      dshift[v * VD + e] = dsr[m][e];
      dscale[v * VD + e] = dcr[m][e];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: plans and launchers

inline cudaError_t last_error() { return cudaGetLastError(); }
inline cudaError_t sm_count_of(int device, int* sms) {
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}
inline cudaError_t sm_count(int* sms) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return sm_count_of(device, sms);
}
template <typename K>
cudaError_t occupancy(int* blocks, K kernel, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, smem);
}
template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// Shared-memory passes of one warp-wide access: lane l at byte address addr[l] (or -1),
// `width` bytes each. 16-byte accesses are served 8 lanes per pass, 8-byte ones 16 lanes; within
// a group of lanes, a bank holding several distinct 4-byte words costs a pass per word.
int smem_passes(const int64_t (&addr)[kWarp], int width) {
  const int per_group = width <= 4 ? kWarp : 128 / width;
  const int words = width <= 4 ? 1 : width / 4;
  int total = 0;
  for (int g0 = 0; g0 < kWarp; g0 += per_group) {
    int64_t seen[kWarp][kWarp];
    int count[kWarp] = {};
    int worst = 0;
    for (int l = g0; l < g0 + per_group; ++l) {
      if (addr[l] < 0) continue;
      for (int q = 0; q < words; ++q) {
        const int64_t word = addr[l] / 4 + q;
        const int bank = static_cast<int>(word % kWarp);
        bool found = false;
        for (int i = 0; i < count[bank]; ++i) found = found || seen[bank][i] == word;
        if (!found && count[bank] < kWarp) seen[bank][count[bank]++] = word;
        worst = std::max(worst, count[bank]);
      }
    }
    total += worst;
  }
  return total;
}

struct PermPlan {
  int R, J, Cr, Cin, VS, pitch, plane;
  int64_t tiles_h, tiles_w, tiles;
  size_t smem;
};

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// The tile, the vector width and the staging pitch of permute_kernel.
PermPlan perm_plan(bool to_tokens, int esize, int64_t B, int64_t C, int64_t h, int64_t w,
                   int64_t p, int order, const int64_t* is, const int64_t* ts, const void* src,
                   int sms) {
  PermPlan P{};
  const int64_t K = C * p * p;
  bool cl;  // channels-last traversal of the image
  if (C == 1 || is[3] == 1) {
    cl = false;
  } else if (is[1] == 1) {
    cl = true;
  } else {
    cl = is[1] < is[3];
  }
  P.Cr = static_cast<int>(cl ? 1 : C);
  P.Cin = static_cast<int>(cl ? C : 1);
  const int64_t v16 = 16 / esize;
  const int64_t budget = 16384 / esize;  // elements of a tile (16 KB)

  int64_t J = w;
  if (w * K > budget) {
    J = std::max<int64_t>(1, budget / K);
    J = ceil_div(w, ceil_div(w, J));  // balanced tiles along the grid row
  }
  bool vec;
  if (to_tokens) {
    const bool inner = cl ? (is[1] == 1 && is[3] == C) : is[3] == 1;
    vec = inner && is_aligned(src, 16) && is[0] % v16 == 0 && is[2] % v16 == 0 &&
          (cl || is[1] % v16 == 0) && (w * p * P.Cin) % v16 == 0;
    if (vec && J < w) {
      // J * p * Cin must be a multiple of v16: J rounded up to a multiple of m, which can take
      // a tile of wide patches (m * K elements over 48 KB: K > 3072 at m = 8 in 16-bit) past the
      // 48 KB a block gets without opting in (the staging is R * J * K elements, R = 1 there);
      // such tiles stay scalar instead.
      const int64_t m = v16 / gcd64(p * P.Cin, v16);
      const int64_t wider = std::min(w, ceil_div(J, m) * m);
      if (wider * K * esize <= 48 * 1024) {
        J = wider;
      } else {
        vec = false;
      }
    }
    vec = vec && (J * p * P.Cin) % v16 == 0;
  } else {
    vec = ts[2] == 1 && ts[0] % v16 == 0 && ts[1] % v16 == 0 && K % v16 == 0 &&
          is_aligned(src, 16);
  }
  P.VS = static_cast<int>(vec ? v16 : 1);

  int64_t R = std::min(h, std::max<int64_t>(1, budget / (J * K)));
  const int64_t tiles_w = ceil_div(w, J);
  while (R > 1 && B * ceil_div(h, R) * tiles_w < 2 * static_cast<int64_t>(sms)) R = (R + 1) / 2;
  R = ceil_div(h, ceil_div(h, R));
  P.R = static_cast<int>(R);
  P.J = static_cast<int>(J);
  P.tiles_w = tiles_w;
  P.tiles_h = ceil_div(h, R);
  P.tiles = B * P.tiles_h * tiles_w;

  // The pitch (the base row length plus u units, u = 0..8) and, for NCHW image staging, the
  // channel plane (R*p rows plus q units, q = 0..3): whichever make the fewest shared-memory
  // passes for the first warp's source store and destination loads (ties: the smallest).
  const int64_t Rp = R * p, L = J * p * P.Cin;
  const int64_t base = to_tokens ? L : K;
  const int64_t unit = P.VS;
  const int64_t kc = order == 0 ? p * p : 1, ka = order == 0 ? p : p * C, kb = order == 0 ? 1 : C;
  const int64_t nv = base / P.VS;
  const bool planes = to_tokens && P.Cr > 1;
  const auto smem_of = [&](int64_t pitch, int64_t plane) {
    return (to_tokens ? (P.Cr - 1) * plane + Rp * pitch : R * J * pitch) * esize;
  };
  int best = INT_MAX;
  P.pitch = static_cast<int>(base);
  P.plane = static_cast<int>(Rp * base);
  for (int u = 0; u <= 8; ++u) {
    const int64_t pitch = base + u * unit;
    for (int q = 0; q <= (planes ? 3 : 0); ++q) {
      const int64_t plane = Rp * pitch + q * unit;
      if (smem_of(pitch, plane) > 48 * 1024) continue;
      int64_t addr[kWarp];
      int cost = 0;
      for (int l = 0; l < kWarp; ++l) {  // source: vector l of the tile, at row l / nv
        const int64_t row = l / nv, pos = (l % nv) * P.VS;
        const int64_t cr = to_tokens ? row / Rp : 0, rr = to_tokens ? row % Rp : row;
        addr[l] = cr < (to_tokens ? P.Cr : 1) && rr < (to_tokens ? Rp : R * J)
                      ? (cr * plane + rr * pitch + pos) * esize
                      : -1;
      }
      cost += smem_passes(addr, static_cast<int>(P.VS * esize));
      for (int it = 0; it < 2; ++it) {  // destination: element loads of two iterations
        for (int l = 0; l < kWarp; ++l) {
          addr[l] = -1;
          if (to_tokens) {
            const bool narrow = K <= kThreads;
            const int64_t k = narrow ? l % K : l;
            const int64_t tok = narrow ? l / K + it * (kThreads / K) : it;
            if (tok >= R * J || k >= K) continue;
            int c, a, bb;
            split_k(static_cast<int>(k), order, static_cast<int>(C), static_cast<int>(p), c, a,
                    bb);
            const int64_t ii = tok / J, j = tok % J;
            const int64_t cs = P.Cin == 1 ? plane : 1;
            addr[l] = (ii * p * pitch + j * p * P.Cin + c * cs + a * pitch + bb * P.Cin) * esize;
          } else {
            const bool narrow = L <= kThreads;
            const int64_t pos = narrow ? l % L : l;
            const int64_t r = narrow ? l / L + it * (kThreads / L) : it;
            if (r >= P.Cr * Rp || pos >= L) continue;
            const int64_t x = pos / P.Cin, ci = pos % P.Cin, j = x / p, bb = x % p;
            const int64_t cr = r / Rp, yy = r % Rp, ii = yy / p, a = yy % p;
            addr[l] = (ii * J * pitch + cr * kc + a * ka + j * pitch + bb * kb + ci * kc) * esize;
          }
        }
        cost += smem_passes(addr, esize);
      }
      if (cost < best) {
        best = cost;
        P.pitch = static_cast<int>(pitch);
        P.plane = static_cast<int>(plane);
      }
    }
  }
  P.smem = static_cast<size_t>(smem_of(P.pitch, P.plane));
  return P;
}

// perm_plan costs tens of microseconds (it simulates 36 layouts): the last 16 plans are kept
// per host thread, keyed by everything they depend on.
PermPlan cached_perm_plan(bool to_tokens, int esize, int64_t B, int64_t C, int64_t h, int64_t w,
                          int64_t p, int order, const int64_t* is, const int64_t* ts,
                          const void* src, int sms) {
  constexpr int kKeys = 17, kEntries = 16;
  const int64_t key[kKeys] = {to_tokens, esize, B, C, h, w, p, order, is[0], is[1], is[2], is[3],
                              ts[0], ts[1], ts[2], is_aligned(src, 16), sms};
  struct Entry {
    int64_t key[kKeys];
    PermPlan plan;
    bool used;
  };
  thread_local Entry cache[kEntries] = {};
  thread_local int next = 0;
  for (const Entry& e : cache) {
    if (e.used && std::equal(key, key + kKeys, e.key)) return e.plan;
  }
  Entry& e = cache[next];
  next = (next + 1) % kEntries;
  std::copy(key, key + kKeys, e.key);
  e.plan = perm_plan(to_tokens, esize, B, C, h, w, p, order, is, ts, src, sms);
  e.used = true;
  return e.plan;
}

template <typename T>
cudaError_t launch_permute(const void* src, void* dst, const int64_t* is, const int64_t* ts,
                           bool to_tokens, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                           int order, cudaStream_t stream) {
  int sms = 0;
  cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t h = H / p, w = W / p;
  const PermPlan plan =
      cached_perm_plan(to_tokens, sizeof(T), B, C, h, w, p, order, is, ts, src, sms);
  PermParams<T> P{};
  P.src = static_cast<const T*>(src);
  P.dst = static_cast<T*>(dst);
  P.isb = is[0];
  P.isc = is[1];
  P.ish = is[2];
  P.isw = is[3];
  P.tsb = ts[0];
  P.tsn = ts[1];
  P.tsk = ts[2];
  P.C = static_cast<int>(C);
  P.p = static_cast<int>(p);
  P.h = static_cast<int>(h);
  P.w = static_cast<int>(w);
  P.K = static_cast<int>(C * p * p);
  P.order = order;
  P.R = plan.R;
  P.J = plan.J;
  P.Cr = plan.Cr;
  P.Cin = plan.Cin;
  P.pitch = plan.pitch;
  P.plane = plan.plane;
  P.kc = static_cast<int>(order == 0 ? p * p : 1);
  P.ka = static_cast<int>(order == 0 ? p : p * C);
  P.kb = static_cast<int>(order == 0 ? 1 : C);
  P.tiles = static_cast<uint32_t>(plan.tiles);
  P.tw = make_div(plan.tiles_w);
  P.th = make_div(plan.tiles_h);
  const int64_t nv = (to_tokens ? static_cast<int64_t>(plan.J) * p * plan.Cin : C * p * p) /
                     plan.VS;
  P.nv = make_div(nv);
  P.rp = make_div(plan.R * p);
  P.jd = make_div(plan.J);
  P.pd = make_div(p);
  P.cin = make_div(plan.Cin);
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>(plan.tiles, static_cast<int64_t>(sms) * 16));
  const int vs = plan.VS;
  const auto go = [&](auto kernel) {
    FD_LAUNCH(kernel, dim3(grid), dim3(kThreads), plan.smem, stream)(P);
  };
  if (to_tokens) {
    if (vs > 1) go(permute_kernel<T, true, kVecOf<T>()>);
    else go(permute_kernel<T, true, 1>);
  } else {
    if (vs > 1) go(permute_kernel<T, false, kVecOf<T>()>);
    else go(permute_kernel<T, false, 1>);
  }
  return last_error();
}

template <typename T>
cudaError_t launch_pe_fwd(const void* x, const int64_t* xs, const void* weight, const void* bias,
                          const void* pos, void* out, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t p, int64_t D, cudaStream_t stream) {
  PeFwdParams<T> P{};
  const int64_t h = H / p, w = W / p, N = h * w, K = C * p * p;
  P.x = static_cast<const T*>(x);
  P.weight = static_cast<const T*>(weight);
  P.bias = static_cast<const T*>(bias);
  P.pos = static_cast<const T*>(pos);
  P.out = static_cast<T*>(out);
  P.isb = xs[0];
  P.isc = xs[1];
  P.ish = xs[2];
  P.isw = xs[3];
  P.C = static_cast<int>(C);
  P.p = static_cast<int>(p);
  P.w = static_cast<int>(w);
  P.N = static_cast<int>(N);
  P.D = static_cast<int>(D);
  P.K = static_cast<int>(K);
  P.rows = static_cast<uint32_t>(B * N);
  P.nd = make_div(N);
  P.wd = make_div(w);
  const bool vec4 =
      D % 4 == 0 && is_aligned(pos, 4 * sizeof(T)) && is_aligned(out, 4 * sizeof(T));
  const dim3 grid(static_cast<unsigned>(ceil_div(B * N, kPeRows)),
                  static_cast<unsigned>(ceil_div(D, kPeCols)));
  const auto go = [&](auto kernel) { FD_LAUNCH(kernel, grid, dim3(kThreads), 0, stream)(P); };
  if (K <= 16) {
    if (vec4) go(pe_fwd_kernel<T, 16, true>);
    else go(pe_fwd_kernel<T, 16, false>);
  } else {
    if (vec4) go(pe_fwd_kernel<T, 32, true>);
    else go(pe_fwd_kernel<T, 32, false>);
  }
  return last_error();
}

// rowgemm_kernel for dout (patch_embed's dx) or the modulated x (final_layer), by KC and VA.
template <typename T, bool LN>
void launch_rowgemm(const RowGemmParams<T>& P, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(P.rows, kRgRows)));
  const auto go = [&](auto kernel) { FD_LAUNCH(kernel, grid, dim3(kThreads), 0, stream)(P); };
  if (P.K <= 16) {
    if (vec) go(rowgemm_kernel<T, 16, kVecOf<T>(), LN>);
    else go(rowgemm_kernel<T, 16, 1, LN>);
  } else {
    if (vec) go(rowgemm_kernel<T, 32, kVecOf<T>(), LN>);
    else go(rowgemm_kernel<T, 32, 1, LN>);
  }
}

template <typename T, bool FINAL>
void launch_opr(const OprParams<T>& P, int64_t splits, bool vec, cudaStream_t stream) {
  const int kc = P.K <= 16 ? 16 : 32;
  const dim3 grid(static_cast<unsigned>(P.ntiles * splits),
                  static_cast<unsigned>(ceil_div(P.D, kOprCols)),
                  static_cast<unsigned>(ceil_div(P.K, kc)));
  const auto go = [&](auto kernel) { FD_LAUNCH(kernel, grid, dim3(kThreads), 0, stream)(P); };
  if (kc == 16) {
    if (vec) go(opr_kernel<T, 16, kVecOf<T>(), FINAL>);
    else go(opr_kernel<T, 16, 1, FINAL>);
  } else {
    if (vec) go(opr_kernel<T, 32, kVecOf<T>(), FINAL>);
    else go(opr_kernel<T, 32, 1, FINAL>);
  }
}

template <typename T, bool FINAL>
const void* opr_kernel_for(int64_t K) {
  return K <= 16 ? reinterpret_cast<const void*>(&opr_kernel<T, 16, kVecOf<T>(), FINAL>)
                 : reinterpret_cast<const void*>(&opr_kernel<T, 32, kVecOf<T>(), FINAL>);
}

// Samples per split of opr_kernel: about two waves of resident blocks, no empty split.
template <typename T, bool FINAL>
cudaError_t opr_splits(int64_t B, int64_t N, int64_t D, int64_t K, int device, int64_t* splits) {
  int sms = 0, per_sm = 0;
  cudaError_t err = sm_count_of(device, &sms);
  if (err != cudaSuccess) return err;
  err = occupancy(&per_sm, opr_kernel_for<T, FINAL>(K), kThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t kc = K <= 16 ? 16 : 32;
  const int64_t per_split = ceil_div(N, kOprRows) * ceil_div(D, kOprCols) * ceil_div(K, kc);
  const int64_t target = 2 * static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  const int64_t s = std::min(B, std::max<int64_t>(1, ceil_div(target, per_split)));
  *splits = ceil_div(B, ceil_div(B, s));
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_pe_bwd(const void* x, const int64_t* xs, const void* weight, const void* dout,
                          void* dx, const int64_t* dxs, void* dweight_partial,
                          void* dpos_partial, int64_t B, int64_t C, int64_t H, int64_t W,
                          int64_t p, int64_t D, int64_t splits, cudaStream_t stream) {
  const int64_t h = H / p, w = W / p, N = h * w, K = C * p * p;
  const int64_t v16 = kVecOf<T>();
  const bool vec = D % v16 == 0 && is_aligned(dout, 16);

  // Kernel 1, dx: reads dout (B N D) and the weight, writes dx (B C H W).
  RowGemmParams<T> G{};
  G.a = static_cast<const T*>(dout);
  G.bmat = static_cast<const T*>(weight);
  G.out = static_cast<T*>(dx);
  G.osb = dxs[0];
  G.osc = dxs[1];
  G.osh = dxs[2];
  G.osw = dxs[3];
  G.C = static_cast<int>(C);
  G.p = static_cast<int>(p);
  G.w = static_cast<int>(w);
  G.N = static_cast<int>(N);
  G.D = static_cast<int>(D);
  G.K = static_cast<int>(K);
  G.order = 0;
  G.rows = static_cast<uint32_t>(B * N);
  G.nd = make_div(N);
  G.wd = make_div(w);
  launch_rowgemm<T, false>(G, vec, stream);
  const cudaError_t err = last_error();
  if (err != cudaSuccess) return err;

  // Kernel 2, dweight and dpos partials: reads dout again and x, writes the partials.
  OprParams<T> O{};
  O.u = static_cast<const T*>(dout);
  O.img = static_cast<const T*>(x);
  O.dw = static_cast<float*>(dweight_partial);
  O.dpos = static_cast<float*>(dpos_partial);
  O.isb = xs[0];
  O.isc = xs[1];
  O.ish = xs[2];
  O.isw = xs[3];
  O.wsp = D * K;
  O.wsd = K;
  O.wsk = 1;
  O.C = static_cast<int>(C);
  O.p = static_cast<int>(p);
  O.w = static_cast<int>(w);
  O.N = static_cast<int>(N);
  O.D = static_cast<int>(D);
  O.K = static_cast<int>(K);
  O.order = 0;
  O.B = static_cast<int>(B);
  O.ntiles = static_cast<int>(ceil_div(N, kOprRows));
  O.bper = static_cast<int>(ceil_div(B, splits));
  O.wd = make_div(w);
  O.ntd = make_div(O.ntiles);
  launch_opr<T, false>(O, splits, vec, stream);
  return last_error();
}

template <typename T>
cudaError_t launch_fl_fwd(const void* x, const void* shift, const void* scale,
                          const void* weight_t, const void* bias, void* out, const int64_t* os,
                          int64_t B, int64_t C, int64_t h, int64_t w, int64_t p, int64_t D,
                          float eps, cudaStream_t stream) {
  RowGemmParams<T> G{};
  G.a = static_cast<const T*>(x);
  G.bmat = static_cast<const T*>(weight_t);
  G.bias = static_cast<const T*>(bias);
  G.shift = static_cast<const T*>(shift);
  G.scale = static_cast<const T*>(scale);
  G.out = static_cast<T*>(out);
  G.osb = os[0];
  G.osc = os[1];
  G.osh = os[2];
  G.osw = os[3];
  G.C = static_cast<int>(C);
  G.p = static_cast<int>(p);
  G.w = static_cast<int>(w);
  G.N = static_cast<int>(h * w);
  G.D = static_cast<int>(D);
  G.K = static_cast<int>(C * p * p);
  G.order = 1;
  G.rows = static_cast<uint32_t>(B * h * w);
  G.eps = eps;
  G.nd = make_div(h * w);
  G.wd = make_div(w);
  const int64_t v16 = kVecOf<T>();
  const bool vec = D % v16 == 0 && is_aligned(x, 16) && is_aligned(shift, 16) &&
                   is_aligned(scale, 16);
  launch_rowgemm<T, true>(G, vec, stream);
  return last_error();
}

// The channel vector width of fl_rows_kernel: 4 when D and the pointers allow.
template <typename T>
bool fl_vec4(int64_t D, const void* x, const void* dx, const void* scale, const void* weight) {
  const size_t a = 4 * sizeof(T);
  return D % 4 == 0 && is_aligned(x, a) && is_aligned(dx, a) && is_aligned(scale, a) &&
         is_aligned(weight, a);
}

struct FlRowsPlan {
  int threads, rows;
  bool w_smem;
  size_t smem;
};

// Threads per block (a multiple of 32, <= 512, each thread <= kFlMaxRounds channel vectors),
// rows per tile (4, or fewer when shared memory is short) and whether W fits in shared memory
// next to them (<= 110 KB in all: two blocks per SM on an H100).
FlRowsPlan fl_rows_plan(int64_t D, int64_t K, int64_t esize, bool vec4, int64_t max_smem) {
  FlRowsPlan plan{};
  const int64_t nvec = D / (vec4 ? 4 : 1);
  plan.threads = static_cast<int>(std::min<int64_t>(512, ceil_div(nvec, kWarp) * kWarp));
  plan.rows = kFlMaxRows;
  while (plan.rows > 1 && fl_layout(D, K, plan.rows, false, esize).total * 4 > max_smem) {
    plan.rows /= 2;
  }
  const int64_t with_w = fl_layout(D, K, plan.rows, true, esize).total * 4;
  plan.w_smem = with_w <= std::min<int64_t>(max_smem, 110 * 1024);
  plan.smem = static_cast<size_t>(fl_layout(D, K, plan.rows, plan.w_smem, esize).total * 4);
  return plan;
}

inline cudaError_t max_smem_of(int device, int64_t* bytes) {
  int v = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *bytes = v;
  return err;
}

template <typename T>
cudaError_t launch_fl_bwd(const void* x, const void* shift, const void* scale, const void* weight,
                          const void* dout, const int64_t* ds, void* dx, void* stats,
                          void* dmod_partial, void* dweight_partial, void* dbias_partial,
                          int64_t B, int64_t C, int64_t h, int64_t w, int64_t p, int64_t D,
                          float eps, int64_t row_splits, int64_t weight_splits,
                          cudaStream_t stream) {
  const int64_t N = h * w, K = C * p * p;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int64_t max_smem = 0;
  err = max_smem_of(device, &max_smem);
  if (err != cudaSuccess) return err;

  // Kernel 1: dx, the statistics, the dshift / dscale partials.
  const bool vec4 = fl_vec4<T>(D, x, dx, scale, weight);
  const FlRowsPlan plan = fl_rows_plan(D, K, sizeof(T), vec4, max_smem);
  FlRowsParams<T> F{};
  F.x = static_cast<const T*>(x);
  F.scale = static_cast<const T*>(scale);
  F.weight = static_cast<const T*>(weight);
  F.dout = static_cast<const T*>(dout);
  F.dx = static_cast<T*>(dx);
  F.stats = static_cast<float*>(stats);
  F.dss = static_cast<float*>(dmod_partial);
  F.dsb = ds[0];
  F.dsc = ds[1];
  F.dsh = ds[2];
  F.dsw = ds[3];
  F.C = static_cast<int>(C);
  F.p = static_cast<int>(p);
  F.w = static_cast<int>(w);
  F.N = static_cast<int>(N);
  F.D = static_cast<int>(D);
  F.K = static_cast<int>(K);
  F.B = static_cast<int>(B);
  F.S = static_cast<int>(row_splits);
  F.TR = plan.rows;
  F.eps = eps;
  F.w_smem = plan.w_smem;
  F.wd = make_div(w);
  F.kd = make_div(K);
  const auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t e = allow_smem(kernel, plan.smem);
    if (e != cudaSuccess) return e;
    FD_LAUNCH(kernel, dim3(static_cast<unsigned>(B * row_splits)),
              dim3(static_cast<unsigned>(plan.threads)), plan.smem, stream)(F);
    return last_error();
  };
  err = vec4 ? go(fl_rows_kernel<T, 4>) : go(fl_rows_kernel<T, 1>);
  if (err != cudaSuccess) return err;

  // Kernel 2: dweight and dbias partials from x (modulated again with the saved statistics)
  // and the patches of dout.
  OprParams<T> O{};
  O.u = static_cast<const T*>(x);
  O.img = static_cast<const T*>(dout);
  O.stats = static_cast<const float*>(stats);
  O.shift = static_cast<const T*>(shift);
  O.scale = static_cast<const T*>(scale);
  O.dw = static_cast<float*>(dweight_partial);
  O.dbias = static_cast<float*>(dbias_partial);
  O.isb = ds[0];
  O.isc = ds[1];
  O.ish = ds[2];
  O.isw = ds[3];
  O.wsp = D * K;  // (P, D, K) like patch_embed's, written along k (coalesced); the glue
  O.wsd = K;      // transposes the (D, K) sum to the Linear weight's (K, D)
  O.wsk = 1;
  O.C = static_cast<int>(C);
  O.p = static_cast<int>(p);
  O.w = static_cast<int>(w);
  O.N = static_cast<int>(N);
  O.D = static_cast<int>(D);
  O.K = static_cast<int>(K);
  O.order = 1;
  O.B = static_cast<int>(B);
  O.ntiles = static_cast<int>(ceil_div(N, kOprRows));
  O.bper = static_cast<int>(ceil_div(B, weight_splits));
  O.wd = make_div(w);
  O.ntd = make_div(O.ntiles);
  const int64_t v16 = kVecOf<T>();
  const bool vec = D % v16 == 0 && is_aligned(x, 16) && is_aligned(shift, 16) &&
                   is_aligned(scale, 16);
  launch_opr<T, true>(O, weight_splits, vec, stream);
  return last_error();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points for bindings.cpp. Arguments are validated there: dtype code, sizes (B >= 0,
// C, p >= 1, H and W multiples of p, D >= 1, the limits above, int32 ranges of the kernels'
// indices), strides >= 0 with every offset inside int64, non-null pointers; B == 0 or an empty
// grid never reaches these. Each enqueues on `stream` of the current device and returns the
// launch's error.

int64_t patchify_max_k() { return kPatchifyMaxK; }
int64_t final_layer_max_d() { return kFinalLayerMaxD; }
int64_t final_layer_max_k() { return kFinalLayerMaxK; }
int64_t patchify_weight_tile() { return kOprRows; }

cudaError_t permute_launch(const void* src, void* dst, const int64_t* image_strides,
                           const int64_t* token_strides, bool to_tokens, int64_t B, int64_t C,
                           int64_t H, int64_t W, int64_t p, int order, int dtype,
                           cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, to_tokens ? "patchify" : "unpatchify", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_permute<T>(src, dst, image_strides, token_strides, to_tokens, B, C, H, W, p,
                            order, stream);
  });
  return err;
}

cudaError_t patch_embed_fwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                   const void* bias, const void* pos, void* out, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t p, int64_t D,
                                   int dtype, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "patch_embed_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_pe_fwd<T>(x, x_strides, weight, bias, pos, out, B, C, H, W, p, D, stream);
  });
  return err;
}

cudaError_t patch_embed_bwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                   const void* dout, void* dx, const int64_t* dx_strides,
                                   void* dweight_partial, void* dpos_partial, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t p, int64_t D,
                                   int64_t splits, int dtype, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "patch_embed_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_pe_bwd<T>(x, x_strides, weight, dout, dx, dx_strides, dweight_partial,
                           dpos_partial, B, C, H, W, p, D, splits, stream);
  });
  return err;
}

cudaError_t patch_embed_bwd_splits(int64_t B, int64_t N, int64_t D, int64_t K, int dtype,
                                   int device, int64_t* splits) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "patch_embed_bwd_plan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = opr_splits<T, false>(B, N, D, K, device, splits);
  });
  return err;
}

cudaError_t final_layer_fwd_launch(const void* x, const void* shift, const void* scale,
                                   const void* weight_t, const void* bias, void* out,
                                   const int64_t* out_strides, int64_t B, int64_t C, int64_t h,
                                   int64_t w, int64_t p, int64_t D, float eps, int dtype,
                                   cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "final_layer_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_fl_fwd<T>(x, shift, scale, weight_t, bias, out, out_strides, B, C, h, w, p, D,
                           eps, stream);
  });
  return err;
}

cudaError_t final_layer_bwd_launch(const void* x, const void* shift, const void* scale,
                                   const void* weight, const void* dout,
                                   const int64_t* dout_strides, void* dx, void* stats,
                                   void* dmod_partial, void* dweight_partial,
                                   void* dbias_partial, int64_t B, int64_t C, int64_t h,
                                   int64_t w, int64_t p, int64_t D, float eps,
                                   int64_t row_splits, int64_t weight_splits, int dtype,
                                   cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "final_layer_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_fl_bwd<T>(x, shift, scale, weight, dout, dout_strides, dx, stats, dmod_partial,
                           dweight_partial, dbias_partial, B, C, h, w, p, D, eps, row_splits,
                           weight_splits, stream);
  });
  return err;
}

// row_splits: blocks per sample of fl_rows_kernel (those that fill the waves of resident blocks
// best, wave_splits, at most one per token tile); weight_splits: samples split of opr_kernel.
cudaError_t final_layer_bwd_splits(int64_t B, int64_t N, int64_t D, int64_t K, int dtype,
                                   int device, int64_t* row_splits, int64_t* weight_splits) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "final_layer_bwd_plan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    int sms = 0, per_sm = 0;
    int64_t max_smem = 0;
    err = sm_count_of(device, &sms);
    if (err == cudaSuccess) err = max_smem_of(device, &max_smem);
    if (err != cudaSuccess) return;
    const bool vec4 = D % 4 == 0;  // as the launch will be for aligned tensors
    const FlRowsPlan plan = fl_rows_plan(D, K, sizeof(T), vec4, max_smem);
    const void* kernel = vec4 ? reinterpret_cast<const void*>(&fl_rows_kernel<T, 4>)
                              : reinterpret_cast<const void*>(&fl_rows_kernel<T, 1>);
    err = allow_smem(kernel, plan.smem);
    if (err == cudaSuccess) err = occupancy(&per_sm, kernel, plan.threads, plan.smem);
    if (err != cudaSuccess) return;
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
    const int64_t tiles = ceil_div(N, plan.rows);
    *row_splits = wave_splits(B, resident, tiles);
    err = opr_splits<T, true>(B, N, D, K, device, weight_splits);
  });
  return err;
}

// The largest D that fl_rows_kernel takes with scalar channel accesses (D % 4 != 0 or
// misaligned pointers): each of <= 512 threads owns <= kFlMaxRounds channels.
int64_t final_layer_bwd_max_scalar_d() { return 512 * kFlMaxRounds; }
bool final_layer_bwd_vec4(int dtype, int64_t D, const void* x, const void* dx, const void* scale,
                          const void* weight) {
  bool vec = false;
  dispatch_dtype(dtype, "final_layer_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    vec = fl_vec4<T>(D, x, dx, scale, weight);
  });
  return vec;
}

}  // namespace fastdit
