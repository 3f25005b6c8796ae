// The downsampled_attention family: the CUDA kernels of U-DiT's attention over downsampled
// tokens. Semantics: fastdit/ops/downsampled_attention.py (the reference). Two parts: the
// depthwise conv + polyphase split (below), and the attention within the groups with RoPE2D,
// the normalisation and the logit scale in a prologue and the merge in its store (part 2).
//
// Part 1, the depthwise conv + polyphase split (this file's first section), forward and backward:
//
//   t[b, g, i, c] = (dwconv_k(x) + bias (+ x if shortcut))[b, c, 2*ii + a, 2*jj + b2]
//
// with group g = 2a + b2, token i = ii * gw + jj, gw = W/2, n = (H/2) * (W/2); x (B, d, H, W)
// with element strides (isb, isc, ish, isw) (channels-first, channels-last or any view), the
// weight (d, 1, k, k) and bias (d,) contiguous, t (B, 4, n, d) contiguous; k odd <= 7, padding
// k/2. All arithmetic in fp32, rounded once to the dtype at the store. No atomics.
//
// Tiling, shared by the three kernels. A block owns one sample, 32 channels (one per lane) and
// a tile of TY x TX pixels (multiples of 4, TY <= 16, TX <= 32, picked on the host by
// dw_tile_plan: the fewest staged + computed pixels that fit 48 KB of shared memory). It stages
// the (TY + k - 1) x (TX + k - 1) halo of its input (zeros outside the image) in shared memory
// as fp32, [pixel][channel] with a pitch of 33 floats, then each thread computes strips of
// 4 x 4 outputs of its lane's channel: per input row of the strip's halo it loads a window of
// 4 + k - 1 values once and applies all k x k taps to it from registers ((4 + k - 1)^2 shared
// loads per 16 outputs, 4 a output for k = 5, against k*k = 25 without the register window).
// Warps take the tile's strips in a fixed round-robin order.
//
// Reading and writing the image in either layout. The staging copies between global memory and
// the [pixel][channel] tile in the image's own memory order: x-fastest runs (one element per
// lane, 32 consecutive columns per warp) when the column stride is the smallest (channels-
// first), channel-fastest runs when the channel stride is (channels-last), as 16-byte vectors
// (8 bf16 / fp16 or 4 fp32 channels a lane) when the strides, d and the pointer allow. The pitch
// of 33 (odd) keeps both orders free of bank conflicts; the compute reads lanes = channels,
// consecutive words. Tokens (t, dt) are channels-innermost: a warp reads or writes the 32
// channels of a pixel, 64 bytes (16-bit) or 128 bytes (fp32) in one contiguous run.
//
//  dwconv_fwd_kernel   x -> t. Reads x once from DRAM (the halo's re-reads, (TY+k-1)(TX+k-1) /
//                      (TY TX) ~ 1.9x for 8 x 16 tiles at k = 5, come from L2) and writes t
//                      once, straight from the accumulators (32 channels of a pixel per warp
//                      store). U-DiT-B's first level at B = 256 (d = 192, 32 x 32, bf16): 101
//                      MB read + 101 MB written ~ 72 us at 2.8 TB/s; 1.26 GFMA (~38 us at the
//                      fp32 FMA peak) and ~16 B of shared-memory reads per output overlap it.
//  dwconv_dx_kernel    dt -> dx (x's strides): the transposed conv, which is the same
//                      correlation with the taps flipped, over the halo of dt (read from its
//                      token positions, channel runs), + dt itself with the shortcut. One strip
//                      a warp; after a barrier the results replace the halo in shared memory,
//                      so that dx is written in its own memory order (x-fastest or channel
//                      vectors). Same bytes as the forward.
//  dwconv_dw_kernel    x, dt -> partial[b, s, tap, c] (fp32), tap < k*k: sum over the pixels p
//                      of split s of x(p + tap - pad) * dt(p); tap k*k: sum of dt (d bias). A
//                      block owns (sample, 32 channels, split s = tiles s, s + S, ...), stages
//                      the x halo of each tile, reads each thread's 4 x 4 dt strip straight
//                      into registers, keeps k*k + 1 sums per thread and adds its warps' sums in
//                      warp order at the end. Reads x and dt once (~202 MB, ~72 us above); the
//                      glue sums the (B, S, k*k + 1, d) partials over b and s in a fixed order.
//
// The launchers are called by bindings.cpp after it has validated every argument. The kernels
// never allocate. Built with -DFASTDIT_EMULATE (tests/cuda_emu/emulate.h), the same kernels run
// on the CPU as fibers (tests/cuda_emu/downsampled_attention_module.cpp).

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

#ifndef FD_HD
#define FD_HD __host__ __device__ __forceinline__
#endif

#if defined(__CUDA_ARCH__)
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_UNROLL
#endif

namespace fastdit {

// =============================================================================================
// Part 1: the depthwise conv + polyphase split
// =============================================================================================

constexpr int64_t kDwconvMaxK = 7;  // odd k <= 7: 1, 3, 5 (U-DiT) and 7

namespace {

constexpr int kDwCT = 32;          // channels of a block: one per lane
constexpr int kDwR = 4;            // rows of a thread's strip
constexpr int kDwP = 4;            // columns of a thread's strip
constexpr int kDwPitch = kDwCT + 1;  // floats per staged pixel (odd: no bank conflicts)
constexpr int kDwMaxWarps = 8;
constexpr int kDwMaxTileY = 16;
constexpr int kDwMaxTileX = 32;
constexpr int kDwMaxTilePixels = 256;  // <= 16 strips a tile
constexpr int64_t kDwSmemBudget = 48 * 1024;
constexpr int kDwUnroll = 4;  // global accesses in flight per thread while staging

// V elements of T moved as one 16-byte access.
template <typename T>
constexpr int kDwVec = static_cast<int>(16 / sizeof(T));

template <typename T>
struct alignas(16) DwVec {
  T v[kDwVec<T>];
};

FD_HD uint32_t dw_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// n / d for a small divisor fixed at launch: with m = floor(2^32 / d) + 1, m d = 2^32 + e with
// 0 < e <= d, so n m / 2^32 = n / d + n e / (d 2^32) and the floor is exact whenever
// n * d < 2^32 (then n e < 2^32 and the remainder cannot carry). d >= 2; the staging loops
// divide indices below 32 * 22 * 38 by tile sides <= 38.
struct SmallDiv {
  uint32_t d, m;
};

inline SmallDiv small_div(int d) {
  return SmallDiv{static_cast<uint32_t>(d),
                  static_cast<uint32_t>((uint64_t{1} << 32) / static_cast<uint64_t>(d) + 1)};
}

FD_HD uint32_t quot(uint32_t n, const SmallDiv& f) { return dw_mulhi(n, f.m); }

// Image access order of the strided side (x, or dx): 0 = x-fastest scalar (channels-first),
// 1 = channel-fastest scalar, 2 = channel-fastest 16-byte vectors (channels-last).
enum DwImageMode : int { kDwColumns = 0, kDwChannels = 1, kDwChannelVectors = 2 };

template <typename T>
struct DwParams {
  const T* img;     // x (forward, dw), or null
  T* img_out;       // dx (dx), or null
  const T* weight;  // (d, k*k) contiguous (forward, dx)
  const T* bias;    // (d,) (forward)
  const T* tok;     // dt (B, 4, n, d) contiguous (dx, dw)
  T* tok_out;       // t (B, 4, n, d) contiguous (forward)
  float* partial;   // (B, S, k*k + 1, d) (dw)
  int64_t isb, isc, ish, isw;  // element strides of img / img_out
  int64_t n;                   // tokens per group, (H/2) * (W/2)
  int d, H, W, gw;
  int TY, TX, HY, HX;  // the tile and its halo (TY + k - 1, TX + k - 1)
  int tiles_x, tiles, ctiles, splits;
  int halo_floats;  // HY * HX * kDwPitch: where the next piece of shared memory starts
  int mode;         // DwImageMode of img / img_out
  bool tok_vec;     // the token rows take 16-byte vectors (d % V == 0, aligned)
  bool shortcut;
  SmallDiv hy, hx, ty, tx;
};

// The row offset of pixel (y, x) of sample b in the tokens: ((b * 4 + g) * n + i) * d.
template <typename T>
__device__ __forceinline__ int64_t token_row(const DwParams<T>& P, int b, int y, int x) {
  const int g = 2 * (y & 1) + (x & 1);
  const int64_t i = static_cast<int64_t>(y >> 1) * P.gw + (x >> 1);
  return ((static_cast<int64_t>(b) * 4 + g) * P.n + i) * P.d;
}

FD_HD bool dw_inside(int y, int x, int H, int W) { return y >= 0 && y < H && x >= 0 && x < W; }

// Image pixels [y0, y0 + NY) x [x0, x0 + NX) of channels c0 .. c0 + 31 of sample b into
// s[(yy * NX + xx) * kDwPitch + c], zeros outside the image and past d, in the image's memory
// order (P.mode). Element e of the tile goes to thread e % nthreads, kDwUnroll loads in flight.
template <typename T>
__device__ __forceinline__ void stage_image(const DwParams<T>& P, float* s, int b, int c0, int y0,
                                            int x0, int NY, int NX, const SmallDiv& ny,
                                            const SmallDiv& nx, int t, int nthreads) {
  const T* img = P.img + static_cast<int64_t>(b) * P.isb;
  if (P.mode == kDwChannelVectors) {
    constexpr int V = kDwVec<T>, L = kDwCT / V;  // lanes per pixel
    const int total = NY * NX * L;
    for (int e0 = 0; e0 < total; e0 += nthreads * kDwUnroll) {
      DwVec<T> val[kDwUnroll];
      int so[kDwUnroll];
#pragma unroll
      for (int u = 0; u < kDwUnroll; ++u) {
        const int e = e0 + u * nthreads + t;
        so[u] = -1;
        if (e < total) {
          const int pix = e / L, c = (e % L) * V;
          const int yy = static_cast<int>(quot(static_cast<uint32_t>(pix), nx));
          const int xx = pix - yy * NX;
          const int y = y0 + yy, x = x0 + xx;
          so[u] = pix * kDwPitch + c;
#pragma unroll
          for (int j = 0; j < V; ++j) val[u].v[j] = from_float<T>(0.f);
          if (c0 + c < P.d && dw_inside(y, x, P.H, P.W)) {
            val[u] = *reinterpret_cast<const DwVec<T>*>(
                img + (c0 + c) + static_cast<int64_t>(y) * P.ish + static_cast<int64_t>(x) * P.isw);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kDwUnroll; ++u) {
        if (so[u] >= 0) {
#pragma unroll
          for (int j = 0; j < V; ++j) s[so[u] + j] = to_float(val[u].v[j]);
        }
      }
    }
    return;
  }
  const int total = NY * NX * kDwCT;
  const bool columns = P.mode == kDwColumns;
  for (int e0 = 0; e0 < total; e0 += nthreads * kDwUnroll) {
    float val[kDwUnroll];
    int so[kDwUnroll];
#pragma unroll
    for (int u = 0; u < kDwUnroll; ++u) {
      const int e = e0 + u * nthreads + t;
      so[u] = -1;
      val[u] = 0.f;
      if (e < total) {
        int c, yy, xx;
        if (columns) {  // e = (c * NY + yy) * NX + xx
          const int r = static_cast<int>(quot(static_cast<uint32_t>(e), nx));
          xx = e - r * NX;
          c = static_cast<int>(quot(static_cast<uint32_t>(r), ny));
          yy = r - c * NY;
        } else {  // e = (yy * NX + xx) * 32 + c
          const int pix = e / kDwCT;
          c = e % kDwCT;
          yy = static_cast<int>(quot(static_cast<uint32_t>(pix), nx));
          xx = pix - yy * NX;
        }
        const int y = y0 + yy, x = x0 + xx;
        so[u] = (yy * NX + xx) * kDwPitch + c;
        if (c0 + c < P.d && dw_inside(y, x, P.H, P.W)) {
          const int64_t off = static_cast<int64_t>(c0 + c) * P.isc +
                              static_cast<int64_t>(y) * P.ish + static_cast<int64_t>(x) * P.isw;
          val[u] = to_float(img[off]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDwUnroll; ++u) {
      if (so[u] >= 0) s[so[u]] = val[u];
    }
  }
}

// The same tile of the tokens (dt): channel runs of V elements a lane (V = 1, or 16 bytes).
template <typename T, int V>
__device__ __forceinline__ void stage_tokens_v(const DwParams<T>& P, float* s, int b, int c0,
                                               int y0, int x0, int NY, int NX,
                                               const SmallDiv& nx, int t, int nthreads) {
  constexpr int L = kDwCT / V;  // lanes per pixel
  const int total = NY * NX * L;
  for (int e0 = 0; e0 < total; e0 += nthreads * kDwUnroll) {
    float val[kDwUnroll][V];
    int so[kDwUnroll];
#pragma unroll
    for (int u = 0; u < kDwUnroll; ++u) {
      const int e = e0 + u * nthreads + t;
      so[u] = -1;
#pragma unroll
      for (int j = 0; j < V; ++j) val[u][j] = 0.f;
      if (e < total) {
        const int pix = e / L, c = (e % L) * V;
        const int yy = static_cast<int>(quot(static_cast<uint32_t>(pix), nx));
        const int xx = pix - yy * NX;
        const int y = y0 + yy, x = x0 + xx;
        so[u] = pix * kDwPitch + c;
        if (c0 + c < P.d && dw_inside(y, x, P.H, P.W)) {
          const T* src = P.tok + token_row(P, b, y, x) + c0 + c;
          if constexpr (V > 1) {
            const DwVec<T> pack = *reinterpret_cast<const DwVec<T>*>(src);
#pragma unroll
            for (int j = 0; j < V; ++j) val[u][j] = to_float(pack.v[j]);
          } else {
            val[u][0] = to_float(*src);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDwUnroll; ++u) {
      if (so[u] >= 0) {
#pragma unroll
        for (int j = 0; j < V; ++j) s[so[u] + j] = val[u][j];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void stage_tokens(const DwParams<T>& P, float* s, int b, int c0,
                                             int y0, int x0, int NY, int NX, const SmallDiv& nx,
                                             int t, int nthreads) {
  if (P.tok_vec) {
    stage_tokens_v<T, kDwVec<T>>(P, s, b, c0, y0, x0, NY, NX, nx, t, nthreads);
  } else {
    stage_tokens_v<T, 1>(P, s, b, c0, y0, x0, NY, NX, nx, t, nthreads);
  }
}

// s[(oy * TX + ox) * kDwPitch + c] -> dx, rounded once, in dx's memory order (P.mode).
template <typename T>
__device__ __forceinline__ void store_image(const DwParams<T>& P, const float* s, int b, int c0,
                                            int y0, int x0, int t, int nthreads) {
  const int NY = P.TY, NX = P.TX;
  T* img = P.img_out + static_cast<int64_t>(b) * P.isb;
  if (P.mode == kDwChannelVectors) {
    constexpr int V = kDwVec<T>, L = kDwCT / V;
    const int total = NY * NX * L;
    for (int e = t; e < total; e += nthreads) {
      const int pix = e / L, c = (e % L) * V;
      const int oy = static_cast<int>(quot(static_cast<uint32_t>(pix), P.tx));
      const int ox = pix - oy * NX;
      const int y = y0 + oy, x = x0 + ox;
      if (c0 + c < P.d && dw_inside(y, x, P.H, P.W)) {
        DwVec<T> val;
#pragma unroll
        for (int j = 0; j < V; ++j) val.v[j] = from_float<T>(s[pix * kDwPitch + c + j]);
        *reinterpret_cast<DwVec<T>*>(img + (c0 + c) + static_cast<int64_t>(y) * P.ish +
                                     static_cast<int64_t>(x) * P.isw) = val;
      }
    }
    return;
  }
  const int total = NY * NX * kDwCT;
  const bool columns = P.mode == kDwColumns;
  for (int e = t; e < total; e += nthreads) {
    int c, oy, ox;
    if (columns) {
      const int r = static_cast<int>(quot(static_cast<uint32_t>(e), P.tx));
      ox = e - r * NX;
      c = static_cast<int>(quot(static_cast<uint32_t>(r), P.ty));
      oy = r - c * NY;
    } else {
      const int pix = e / kDwCT;
      c = e % kDwCT;
      oy = static_cast<int>(quot(static_cast<uint32_t>(pix), P.tx));
      ox = pix - oy * NX;
    }
    const int y = y0 + oy, x = x0 + ox;
    if (c0 + c < P.d && dw_inside(y, x, P.H, P.W)) {
      img[static_cast<int64_t>(c0 + c) * P.isc + static_cast<int64_t>(y) * P.ish +
          static_cast<int64_t>(x) * P.isw] = from_float<T>(s[(oy * NX + ox) * kDwPitch + c]);
    }
  }
}

// The block's (kDwCT, k*k) weights, contiguous in global memory, into ws[c * k*k + tap] (an
// odd stride: the lanes' reads of one tap hit 32 different banks).
template <typename T, int K>
__device__ __forceinline__ void stage_weights(const DwParams<T>& P, float* ws, int c0, int t,
                                              int nthreads) {
  constexpr int KK = K * K;
  const T* w = P.weight + static_cast<int64_t>(c0) * KK;
  const int valid = min(kDwCT, P.d - c0) * KK;
  for (int e = t; e < kDwCT * KK; e += nthreads) ws[e] = e < valid ? to_float(w[e]) : 0.f;
}

// acc[o][p] += sum over taps (ky, kx) of w[ky][kx] * s(oy0 + o + ky, ox0 + p + kx) (halo
// coordinates, lane = channel), taps in row-major order, + the centre value with the shortcut.
template <int K>
__device__ __forceinline__ void conv_strip(const float* __restrict__ s, int HX, int oy0, int ox0,
                                           int lane, const float (&w)[K * K], bool shortcut,
                                           float (&acc)[kDwR][kDwP]) {
  constexpr int kWin = kDwP + K - 1, kPad = K / 2;
#pragma unroll
  for (int rr = 0; rr < kDwR + K - 1; ++rr) {
    const float* row = s + ((oy0 + rr) * HX + ox0) * kDwPitch + lane;
    float win[kWin];
#pragma unroll
    for (int j = 0; j < kWin; ++j) win[j] = row[j * kDwPitch];
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
      const int o = rr - ky;  // the output row this input row feeds through tap row ky
      if (o < 0 || o >= kDwR) continue;
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
#pragma unroll
        for (int p = 0; p < kDwP; ++p) acc[o][p] = fmaf(win[p + kx], w[ky * K + kx], acc[o][p]);
      }
    }
    if (shortcut && rr - kPad >= 0 && rr - kPad < kDwR) {
#pragma unroll
      for (int p = 0; p < kDwP; ++p) acc[rr - kPad][p] += win[p + kPad];
    }
  }
}

// The block's (tile, channel tile, sample) of the forward and dx grids.
struct DwBlock {
  int tile, ct, b;
};

template <typename T>
__device__ __forceinline__ DwBlock dw_block(const DwParams<T>& P, int per_sample) {
  const int id = static_cast<int>(blockIdx.x);
  const int q = id / per_sample;
  return DwBlock{id - q * per_sample, q % P.ctiles, q / P.ctiles};
}

// ---------------------------------------------------------------------------------------------
// Forward: x -> t

template <typename T, int K>
__global__ void __launch_bounds__(kDwMaxWarps * 32) dwconv_fwd_kernel(const DwParams<T> P) {
  constexpr int KK = K * K, kPad = K / 2;
  FD_DYNAMIC_SMEM(s);
  float* ws = s + P.halo_floats;
  const int t = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int lane = t % 32, warp = t / 32, nwarps = nthreads / 32;
  const DwBlock blk = dw_block(P, P.tiles);
  const int c0 = blk.ct * kDwCT, c = c0 + lane;
  const int ty = blk.tile / P.tiles_x;
  const int y0 = ty * P.TY, x0 = (blk.tile - ty * P.tiles_x) * P.TX;

  stage_weights<T, K>(P, ws, c0, t, nthreads);
  stage_image(P, s, blk.b, c0, y0 - kPad, x0 - kPad, P.HY, P.HX, P.hy, P.hx, t, nthreads);
  __syncthreads();

  float w[KK];
#pragma unroll
  for (int tap = 0; tap < KK; ++tap) w[tap] = ws[lane * KK + tap];
  const float bias = c < P.d ? to_float(P.bias[c]) : 0.f;
  const int sx_n = P.TX / kDwP, strips = (P.TY / kDwR) * sx_n;
  for (int si = warp; si < strips; si += nwarps) {
    const int sy = si / sx_n;
    const int oy0 = sy * kDwR, ox0 = (si - sy * sx_n) * kDwP;
    if (y0 + oy0 >= P.H || x0 + ox0 >= P.W) continue;  // past the image (the last tiles)
    float acc[kDwR][kDwP];
#pragma unroll
    for (int o = 0; o < kDwR; ++o) {
#pragma unroll
      for (int p = 0; p < kDwP; ++p) acc[o][p] = bias;
    }
    conv_strip<K>(s, P.HX, oy0, ox0, lane, w, P.shortcut, acc);
    if (c < P.d) {
#pragma unroll
      for (int o = 0; o < kDwR; ++o) {
#pragma unroll
        for (int p = 0; p < kDwP; ++p) {
          const int y = y0 + oy0 + o, x = x0 + ox0 + p;
          if (y < P.H && x < P.W) P.tok_out[token_row(P, blk.b, y, x) + c] = from_float<T>(acc[o][p]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dx: dt -> dx (x's strides)

template <typename T, int K>
__global__ void __launch_bounds__(kDwMaxWarps * 32, 1) dwconv_dx_kernel(const DwParams<T> P) {
  constexpr int KK = K * K, kPad = K / 2;
  FD_DYNAMIC_SMEM(s);
  float* ws = s + P.halo_floats;  // the weights; the output tile reuses the halo's space
  const int t = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int lane = t % 32, warp = t / 32;  // one strip per warp (the plan: warps == strips)
  const DwBlock blk = dw_block(P, P.tiles);
  const int c0 = blk.ct * kDwCT;
  const int ty = blk.tile / P.tiles_x;
  const int y0 = ty * P.TY, x0 = (blk.tile - ty * P.tiles_x) * P.TX;

  stage_weights<T, K>(P, ws, c0, t, nthreads);
  stage_tokens(P, s, blk.b, c0, y0 - kPad, x0 - kPad, P.HY, P.HX, P.hx, t, nthreads);
  __syncthreads();

  float w[KK];  // flipped: dx(p) = sum over taps of w[k*k - 1 - tap] dt(p + tap - pad)
#pragma unroll
  for (int tap = 0; tap < KK; ++tap) w[tap] = ws[lane * KK + (KK - 1 - tap)];
  const int sx_n = P.TX / kDwP, sy = warp / sx_n;
  const int oy0 = sy * kDwR, ox0 = (warp - sy * sx_n) * kDwP;
  const bool inside = y0 + oy0 < P.H && x0 + ox0 < P.W;  // else never stored
  float acc[kDwR][kDwP];
#pragma unroll
  for (int o = 0; o < kDwR; ++o) {
#pragma unroll
    for (int p = 0; p < kDwP; ++p) acc[o][p] = 0.f;
  }
  if (inside) conv_strip<K>(s, P.HX, oy0, ox0, lane, w, P.shortcut, acc);
  __syncthreads();  // every warp is done reading the halo: the output tile takes its place
  if (inside) {
#pragma unroll
    for (int o = 0; o < kDwR; ++o) {
#pragma unroll
      for (int p = 0; p < kDwP; ++p) s[((oy0 + o) * P.TX + ox0 + p) * kDwPitch + lane] = acc[o][p];
    }
  }
  __syncthreads();
  store_image(P, s, blk.b, c0, y0, x0, t, nthreads);
}

// ---------------------------------------------------------------------------------------------
// dw and dbias partial sums: x, dt -> partial (B, S, k*k + 1, d)

template <typename T, int K>
__global__ void __launch_bounds__(kDwMaxWarps * 32) dwconv_dw_kernel(const DwParams<T> P) {
  constexpr int KK = K * K, kPad = K / 2, kWin = kDwP + K - 1;
  FD_DYNAMIC_SMEM(s);
  const int t = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int lane = t % 32, warp = t / 32, nwarps = nthreads / 32;
  const DwBlock blk = dw_block(P, P.splits);  // .tile: the split
  const int c0 = blk.ct * kDwCT, c = c0 + lane;
  const bool c_ok = c < P.d;

  float acc[KK + 1];
#pragma unroll
  for (int tap = 0; tap <= KK; ++tap) acc[tap] = 0.f;
  const int sx_n = P.TX / kDwP, strips = (P.TY / kDwR) * sx_n;
  for (int tile = blk.tile; tile < P.tiles; tile += P.splits) {
    const int ty = tile / P.tiles_x;
    const int y0 = ty * P.TY, x0 = (tile - ty * P.tiles_x) * P.TX;
    __syncthreads();  // the previous tile's readers are done
    stage_image(P, s, blk.b, c0, y0 - kPad, x0 - kPad, P.HY, P.HX, P.hy, P.hx, t, nthreads);
    __syncthreads();
    for (int si = warp; si < strips; si += nwarps) {
      const int sy = si / sx_n;
      const int oy0 = sy * kDwR, ox0 = (si - sy * sx_n) * kDwP;
      if (y0 + oy0 >= P.H || x0 + ox0 >= P.W) continue;
      float g[kDwR][kDwP];  // this strip of dt, zero past the image
#pragma unroll
      for (int o = 0; o < kDwR; ++o) {
#pragma unroll
        for (int p = 0; p < kDwP; ++p) {
          const int y = y0 + oy0 + o, x = x0 + ox0 + p;
          g[o][p] = c_ok && y < P.H && x < P.W ? to_float(P.tok[token_row(P, blk.b, y, x) + c])
                                               : 0.f;
        }
      }
#pragma unroll
      for (int o = 0; o < kDwR; ++o) {
#pragma unroll
        for (int p = 0; p < kDwP; ++p) acc[KK] += g[o][p];
      }
#pragma unroll
      for (int rr = 0; rr < kDwR + K - 1; ++rr) {
        const float* row = s + ((oy0 + rr) * P.HX + ox0) * kDwPitch + lane;
        float win[kWin];
#pragma unroll
        for (int j = 0; j < kWin; ++j) win[j] = row[j * kDwPitch];
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
          const int o = rr - ky;
          if (o < 0 || o >= kDwR) continue;
#pragma unroll
          for (int kx = 0; kx < K; ++kx) {
#pragma unroll
            for (int p = 0; p < kDwP; ++p) {
              acc[ky * K + kx] = fmaf(win[p + kx], g[o][p], acc[ky * K + kx]);
            }
          }
        }
      }
    }
  }

  // The warps' sums, added in warp order in shared memory (the staging tile is free now).
  float* red = s;  // (k*k + 1) x 32 floats <= the halo tile
  __syncthreads();
  for (int wv = 0; wv < nwarps; ++wv) {
    if (warp == wv) {
#pragma unroll
      for (int tap = 0; tap <= KK; ++tap) {
        red[tap * kDwCT + lane] = wv == 0 ? acc[tap] : red[tap * kDwCT + lane] + acc[tap];
      }
    }
    __syncthreads();
  }
  float* out = P.partial +
               (static_cast<int64_t>(blk.b) * P.splits + blk.tile) * (KK + 1) * P.d + c0;
  for (int e = t; e < (KK + 1) * kDwCT; e += nthreads) {
    const int tap = e / kDwCT, cl = e % kDwCT;
    if (c0 + cl < P.d) out[static_cast<int64_t>(tap) * P.d + cl] = red[e];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

enum DwKind : int { kDwFwd = 0, kDwDx = 1, kDwDw = 2 };

struct DwTilePlan {
  int TY, TX, HY, HX, tiles_x, warps;
  int64_t tiles;
  int halo_floats;
  size_t smem;
};

int64_t dw_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t dw_smem_floats(int TY, int TX, int K, int kind) {
  const int64_t halo = static_cast<int64_t>(TY + K - 1) * (TX + K - 1) * kDwPitch;
  const int64_t weights = static_cast<int64_t>(kDwCT) * K * K;
  // dx's output tile and dw's final (k*k + 1) x 32 sums reuse the halo's space
  return static_cast<size_t>(kind == kDwDw ? halo : halo + weights);
}

// The tile of a kernel: among TY in {4, ..., 16}, TX in {4, ..., 32} (no larger than the image
// rounded up to strips, <= 16 strips (dx: <= 8, one a warp), shared memory <= 48 KB), the one
// with the fewest staged halo pixels plus computed pixels (k*k/8 staged pixels' worth each) over
// the image, ties to the wider tile (longer x runs for channels-first images). Threads: the most
// warps <= 8 that divide the tile's strips evenly (dx: one warp a strip).
DwTilePlan dw_tile_plan(int64_t H, int64_t W, int K, int kind) {
  DwTilePlan best{};
  int64_t best_cost = -1;
  const int64_t Hr = dw_ceil_div(H, kDwR) * kDwR, Wr = dw_ceil_div(W, kDwP) * kDwP;
  for (int TY = kDwR; TY <= kDwMaxTileY && TY <= Hr; TY += kDwR) {
    for (int TX = kDwP; TX <= kDwMaxTileX && TX <= Wr; TX += kDwP) {
      if (TY * TX > (kind == kDwDx ? kDwMaxWarps * kDwR * kDwP : kDwMaxTilePixels)) continue;
      const size_t floats = dw_smem_floats(TY, TX, K, kind);
      if (static_cast<int64_t>(floats) * 4 > kDwSmemBudget) continue;
      const int64_t tiles = dw_ceil_div(H, TY) * dw_ceil_div(W, TX);
      const int64_t cost = tiles * (8 * int64_t{TY + K - 1} * (TX + K - 1) +
                                    int64_t{TY} * TX * K * K);
      if (best_cost < 0 || cost < best_cost || (cost == best_cost && TX > best.TX)) {
        best_cost = cost;
        best.TY = TY;
        best.TX = TX;
        best.tiles = tiles;
        best.smem = floats * 4;
      }
    }
  }
  best.HY = best.TY + K - 1;
  best.HX = best.TX + K - 1;
  best.tiles_x = static_cast<int>(dw_ceil_div(W, best.TX));
  best.halo_floats = best.HY * best.HX * kDwPitch;
  const int strips = (best.TY / kDwR) * (best.TX / kDwP);
  best.warps = 1;
  for (int w = kind == kDwDx ? strips : kDwMaxWarps; w >= 1; --w) {
    if (strips % w == 0) {
      best.warps = w;
      break;
    }
  }
  return best;
}

// The access order of the strided image (x or dx): channel runs when the channel stride is the
// smallest of the two inner ones (channels-last), as 16-byte vectors when every vector is whole
// and aligned; columns otherwise.
template <typename T>
int dw_image_mode(const int64_t* s, int64_t d, const void* ptr) {
  const int64_t V = kDwVec<T>;
  const bool channels = d > 1 && (s[1] == 1 || (s[3] != 1 && s[1] < s[3]));
  if (!channels) return kDwColumns;
  const bool vec = s[1] == 1 && d % V == 0 && s[0] % V == 0 && s[2] % V == 0 && s[3] % V == 0 &&
                   is_aligned(ptr, 16);
  return vec ? kDwChannelVectors : kDwChannels;
}

template <typename T>
DwParams<T> dw_params(const DwTilePlan& plan, int64_t d, int64_t H, int64_t W,
                      const int64_t* strides) {
  DwParams<T> P{};
  if (strides != nullptr) {
    P.isb = strides[0];
    P.isc = strides[1];
    P.ish = strides[2];
    P.isw = strides[3];
  }
  P.n = (H / 2) * (W / 2);
  P.d = static_cast<int>(d);
  P.H = static_cast<int>(H);
  P.W = static_cast<int>(W);
  P.gw = static_cast<int>(W / 2);
  P.TY = plan.TY;
  P.TX = plan.TX;
  P.HY = plan.HY;
  P.HX = plan.HX;
  P.tiles_x = plan.tiles_x;
  P.tiles = static_cast<int>(plan.tiles);
  P.ctiles = static_cast<int>(dw_ceil_div(d, kDwCT));
  P.splits = 1;
  P.halo_floats = plan.halo_floats;
  P.hy = small_div(plan.HY);
  P.hx = small_div(plan.HX);
  P.ty = small_div(plan.TY);
  P.tx = small_div(plan.TX);
  return P;
}

// Calls f(DwK<K>{}) for the supported kernel sizes k (odd, <= kDwconvMaxK).
template <int K>
struct DwK {
  static constexpr int value = K;
};

template <typename F>
cudaError_t dw_dispatch_k(int64_t k, F&& f) {
  switch (k) {
    case 1:
      return f(DwK<1>{});
    case 3:
      return f(DwK<3>{});
    case 5:
      return f(DwK<5>{});
    case 7:
      return f(DwK<7>{});
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_dw_fwd(const void* x, const int64_t* xs, const void* weight, const void* bias,
                          void* t, int64_t B, int64_t d, int64_t H, int64_t W, int64_t k,
                          bool shortcut, cudaStream_t stream) {
  const DwTilePlan plan = dw_tile_plan(H, W, static_cast<int>(k), kDwFwd);
  DwParams<T> P = dw_params<T>(plan, d, H, W, xs);
  P.img = static_cast<const T*>(x);
  P.weight = static_cast<const T*>(weight);
  P.bias = static_cast<const T*>(bias);
  P.tok_out = static_cast<T*>(t);
  P.mode = dw_image_mode<T>(xs, d, x);
  P.shortcut = shortcut;
  const dim3 grid(static_cast<unsigned>(B * P.ctiles * plan.tiles));
  const dim3 block(static_cast<unsigned>(plan.warps * 32));
  return dw_dispatch_k(k, [&](auto kt) {
    constexpr int K = decltype(kt)::value;
    const auto kernel = dwconv_fwd_kernel<T, K>;
    FD_LAUNCH(kernel, grid, block, plan.smem, stream)(P);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_dw_dx(const void* weight, const void* dt, void* dx, const int64_t* dxs,
                         int64_t B, int64_t d, int64_t H, int64_t W, int64_t k, bool shortcut,
                         cudaStream_t stream) {
  const DwTilePlan plan = dw_tile_plan(H, W, static_cast<int>(k), kDwDx);
  DwParams<T> P = dw_params<T>(plan, d, H, W, dxs);
  P.img_out = static_cast<T*>(dx);
  P.weight = static_cast<const T*>(weight);
  P.tok = static_cast<const T*>(dt);
  P.mode = dw_image_mode<T>(dxs, d, dx);
  P.tok_vec = d % kDwVec<T> == 0 && is_aligned(dt, 16);
  P.shortcut = shortcut;
  const dim3 grid(static_cast<unsigned>(B * P.ctiles * plan.tiles));
  const dim3 block(static_cast<unsigned>(plan.warps * 32));
  return dw_dispatch_k(k, [&](auto kt) {
    constexpr int K = decltype(kt)::value;
    const auto kernel = dwconv_dx_kernel<T, K>;
    FD_LAUNCH(kernel, grid, block, plan.smem, stream)(P);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_dw_dw(const void* x, const int64_t* xs, const void* dt, void* partial,
                         int64_t B, int64_t d, int64_t H, int64_t W, int64_t k, int64_t splits,
                         cudaStream_t stream) {
  const DwTilePlan plan = dw_tile_plan(H, W, static_cast<int>(k), kDwDw);
  DwParams<T> P = dw_params<T>(plan, d, H, W, xs);
  P.img = static_cast<const T*>(x);
  P.tok = static_cast<const T*>(dt);
  P.partial = static_cast<float*>(partial);
  P.mode = dw_image_mode<T>(xs, d, x);
  P.splits = static_cast<int>(splits);
  const dim3 grid(static_cast<unsigned>(B * P.ctiles * splits));
  const dim3 block(static_cast<unsigned>(plan.warps * 32));
  return dw_dispatch_k(k, [&](auto kt) {
    constexpr int K = decltype(kt)::value;
    const auto kernel = dwconv_dw_kernel<T, K>;
    FD_LAUNCH(kernel, grid, block, plan.smem, stream)(P);
    return cudaGetLastError();
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points for bindings.cpp. Arguments are validated there: dtype code, B >= 0, d >= 1, H
// and W even in [0, 2^30] with H * W < 2^31, k odd in [1, kDwconvMaxK], strides >= 0 with every
// offset inside int64, the block counts below 2^31, 1 <= splits <= dwconv_split_tiles(..., 2),
// non-null pointers; empty work never reaches these. Each enqueues on `stream` of the current
// device and returns the launch's error.

int64_t dwconv_split_max_k() { return kDwconvMaxK; }

// Tiles per image of a kernel (kind 0 forward, 1 dx, 2 dw): blocks = B * ceil(d / 32) * tiles
// (forward, dx) or B * ceil(d / 32) * splits (dw, splits <= tiles).
int64_t dwconv_split_tiles(int64_t H, int64_t W, int64_t k, int kind) {
  return dw_tile_plan(H, W, static_cast<int>(k), kind).tiles;
}

int64_t dwconv_split_channel_tile() { return kDwCT; }

cudaError_t dwconv_split_fwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                    const void* bias, void* t, int64_t B, int64_t d, int64_t H,
                                    int64_t W, int64_t k, bool shortcut, int dtype,
                                    cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "downsampled_attention_dwconv_split", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_dw_fwd<T>(x, x_strides, weight, bias, t, B, d, H, W, k, shortcut, stream);
  });
  return err;
}

cudaError_t dwconv_split_dx_launch(const void* weight, const void* dt, void* dx,
                                   const int64_t* dx_strides, int64_t B, int64_t d, int64_t H,
                                   int64_t W, int64_t k, bool shortcut, int dtype,
                                   cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "downsampled_attention_dwconv_split_dx", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_dw_dx<T>(weight, dt, dx, dx_strides, B, d, H, W, k, shortcut, stream);
  });
  return err;
}

cudaError_t dwconv_split_dw_launch(const void* x, const int64_t* x_strides, const void* dt,
                                   void* partial, int64_t B, int64_t d, int64_t H, int64_t W,
                                   int64_t k, int64_t splits, int dtype, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, "downsampled_attention_dwconv_split_dw", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = launch_dw_dw<T>(x, x_strides, dt, partial, B, d, H, W, k, splits, stream);
  });
  return err;
}

// The dw kernel's splits on `device`: enough (sample, channel tile, split) blocks for about two
// waves of resident blocks, at most one split per tile of the image.
cudaError_t dwconv_split_dw_splits(int64_t B, int64_t d, int64_t H, int64_t W, int64_t k,
                                   int dtype, int device, int64_t* splits) {
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const DwTilePlan plan = dw_tile_plan(H, W, static_cast<int>(k), kDwDw);
  int per_sm = 0;
  dispatch_dtype(dtype, "downsampled_attention_dwconv_split_dw_plan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    err = dw_dispatch_k(k, [&](auto kt) {
      constexpr int K = decltype(kt)::value;
      const auto kernel = dwconv_dw_kernel<T, K>;
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.warps * 32,
                                                           plan.smem);
    });
  });
  if (err != cudaSuccess) return err;
  const int64_t target = 2 * static_cast<int64_t>(std::max(per_sm, 1)) * sms;
  const int64_t base = B * dw_ceil_div(d, kDwCT);
  *splits = std::max<int64_t>(1, std::min(plan.tiles, dw_ceil_div(target, base)));
  return cudaSuccess;
}

}  // namespace fastdit

// =============================================================================================
// Part 2. Attention within the groups: a flash-style kernel on the tensor cores (mma.sync m16n8k8, TF32)
//
// One attention problem per (group z, head h): n tokens of head dim hd, q, k, v read in place
// from the qkv projection (any strides, channels contiguous). Four kernels:
//
//   prep  16 or 32 lanes per row of q or of k: RoPE2D (fp32, rounded back to the dtype as the
//         reference rounds it), the L2 normalisation and, for q, the clamped logit scale (or
//         hd^-0.5 without cosine); writes q^ and k^ as fp32 rows of HDP >= hd channels (zero
//         padded) to scratch. This is the "prologue on q and k": 2 x n x HDP x 4 bytes per
//         problem, read back by the attention kernels from L2 / HBM.
//   fwd   64 query rows per block (4 warps x 16), the keys in tiles of 64: S = q^ k^T on the
//         tensor cores, online softmax in registers (exp2, running max and sum), O += P V; the
//         (n, n) logits never reach memory. The store writes each row where the merge puts it
//         (the image of the layer, in its own strides), or a plain (G, heads, n, hd) tensor.
//         With `stats` it also writes, per row, the log2-sum-exp and delta = sum(dO * O) from
//         the fp32 O (the backward's preamble; the O store is optional then).
//   bwd   dq: per query block, over the key tiles: P from the saved statistics, dP = dO V^T,
//         dS = P (dP - delta), dq^ += dS k^. dkdv: per key block, over the query tiles:
//         dv += P^T dO, dk^ += dS^T q^. fp32 dq^ / dk^ to scratch, dv in the dtype in place.
//         The dq kernel also writes, per query row, sum over keys of dS * logit (from the
//         3xTF32 logits and the fp32 dS): the row's share of d logit_scale = d scale * scale,
//         which Python sums in a fixed order.
//   post  16 or 32 lanes per row: dq^, dk^ back through the scale, the normalisation and the
//         rotation into dq, dk (in place in the qkv gradient).
//
// Precision. The logits of cosine attention are up to 100 x (a cosine): one TF32 product
// (10-bit mantissa) would put errors of ~0.1 into them, so S is "3xTF32" (hi*hi + hi*lo + lo*hi,
// ~fp32 accuracy) everywhere. The other products take one TF32 pass for bf16 (their operands
// are either exact in TF32 (v, dO) or probabilities and gradients whose 2^-11 relative rounding
// is a quarter of bf16's own), and 3xTF32 for float32 and float16 (float16's rounding is TF32's:
// the gradients' sums over tokens cancel, and one pass left d k at 2.6x eager's error, over the
// rule's 2x, at head dim 10 and 70 tokens).
//
// Shared memory per block (floats, rows padded against bank conflicts): fwd 64 (HDP+4) x 2 +
// 64 x v_stride + 4 x 16 x 68; the backward kernels add one 64 x (HDP+4) tile, 2 x 64 floats
// and 64 row offsets. At HDP = 96: 93 / 119 KB; at 128: 117 / 151 KB. The glue checks the
// device's opt-in limit: 99 KB on sm_86/89/120 leaves HDP >= 96 to the other backends.
// ---------------------------------------------------------------------------------------------

namespace fastdit {
namespace attn {

constexpr int kRows = 64;     // query (fwd, dq) or key (dkdv) rows per block: 4 warps x 16
constexpr int kTile = 64;     // keys (fwd, dq) or queries (dkdv) per inner tile
static_assert(kRows == kTile, "the tile loaders fill kRows-row tiles with kTile rows");
constexpr int kThreads = 128;
constexpr int kPrepThreads = 256;  // prep / post
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNormEps = 1e-12f;

// The padded head dims the kernels are built for: hd (even, <= 128) runs at the first >= hd.
inline int64_t padded_head_dim(int64_t hd) {
  for (int64_t p : {24, 48, 64, 96, 128}) {
    if (hd <= p) return p;
  }
  return -1;
}

__host__ __device__ constexpr int row_stride(int hdp) { return hdp + 4; }  // q^, k^, dO tiles
// v tiles (read down columns): a stride of 8 or 24 mod 32 keeps the 32 lanes' banks distinct.
__host__ __device__ constexpr int v_stride(int hdp) { return hdp % 32 == 24 ? hdp + 16 : hdp + 8; }
constexpr int kPStride = kTile + 4;                    // a warp's 16 x 64 P / dS tile

inline size_t fwd_smem(int hdp) {
  return sizeof(float) *
         (static_cast<size_t>(kRows) * row_stride(hdp) + kTile * row_stride(hdp) +
          kTile * v_stride(hdp) + 4 * 16 * kPStride);
}
inline size_t bwd_smem(int hdp) {  // + the d out tile, lse, delta, the row offsets of d out
  return fwd_smem(hdp) + sizeof(float) * (static_cast<size_t>(kTile) * row_stride(hdp) + 2 * kTile) +
         sizeof(int64_t) * kTile;
}

// Where element (z, h, t, c) of an attention output (or of its gradient) lives. merge = 0:
// strides s[0..3] of a (G, heads, n, hd) tensor. merge = 1: the layer's image (B, d, H, W) with
// strides (s[0], s[1], s[2], s[3]) = (batch, channel, row, column): group z % 4 = 2a + b of
// sample z / 4 holds the pixels (2i + a, 2j + b), token t = i * gw + j, channel h * hd + c.
struct Layout {
  int64_t s[4];
  int64_t gw;
  int merge;
};

__device__ __forceinline__ int64_t offset_of(const Layout& L, int64_t z, int64_t h, int64_t t,
                                             int64_t c, int64_t hd) {
  if (!L.merge) return z * L.s[0] + h * L.s[1] + t * L.s[2] + c * L.s[3];
  const int64_t g = z & 3;
  const int64_t y = 2 * (t / L.gw) + (g >> 1);
  const int64_t x = 2 * (t % L.gw) + (g & 1);
  return (z >> 2) * L.s[0] + (h * hd + c) * L.s[1] + y * L.s[2] + x * L.s[3];
}

__device__ __forceinline__ float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

__device__ __forceinline__ uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// Rounds to TF32 (nearest, ties away from zero), as cvt.rna.tf32.f32.
__device__ __forceinline__ uint32_t tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, nan
  return (u + 0x1000u) & 0xFFFFE000u;
#endif
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(FASTDIT_EMULATE)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

// An operand in TF32: hi, and with PRECISE the rounding error lo = tf32(x - hi). EXACT: values
// already exact in TF32 (fp16 / bf16 inputs widened to fp32: v and d out), taken as they are,
// with no rounding and no lo term.
template <int N, bool PRECISE, bool EXACT = false>
struct Operand {
  uint32_t hi[N];
  uint32_t lo[PRECISE && !EXACT ? N : 1];
  __device__ __forceinline__ explicit Operand(const float (&x)[N]) {
    FD_UNROLL
    for (int i = 0; i < N; ++i) {
      if constexpr (EXACT) {
        hi[i] = float_bits(x[i]);
      } else {
        hi[i] = tf32(x[i]);
        if constexpr (PRECISE) lo[i] = tf32(x[i] - bits_float(hi[i]));
      }
    }
  }
};

// d += A B with the operands in TF32: with PRECISE, the cross terms of whichever operands are
// not exact, small terms first.
template <bool PRECISE, bool A_EXACT, bool B_EXACT>
__device__ __forceinline__ void mma(float (&d)[4], const Operand<4, PRECISE, A_EXACT>& a,
                                    const Operand<2, PRECISE, B_EXACT>& b) {
  if constexpr (PRECISE && !A_EXACT) {
    const uint32_t(&al)[4] = *reinterpret_cast<const uint32_t(*)[4]>(a.lo);
    mma_tf32(d, al, b.hi);
  }
  if constexpr (PRECISE && !B_EXACT) {
    const uint32_t(&bl)[2] = *reinterpret_cast<const uint32_t(*)[2]>(b.lo);
    mma_tf32(d, a.hi, bl);
  }
  mma_tf32(d, a.hi, b.hi);
}

// d += A B as mma does, or with ROUNDED (fp32 inputs) fp32-accurate however long the chain of
// products into d: the tensor cores truncate each product's sum to fp32 (they do not round it),
// so a running accumulator fed by hundreds of mma drifts toward zero by up to an ulp of itself
// per step (at 1024 keys, 8x eager PyTorch's fp32 error under emulate.h's model). ROUNDED sums
// each k-step's product (its TF32 passes) from zero and adds it to d with one rounded fp32 add.
template <bool ROUNDED, bool PRECISE, bool A_EXACT, bool B_EXACT>
__device__ __forceinline__ void mma_into(float (&d)[4], const Operand<4, PRECISE, A_EXACT>& a,
                                         const Operand<2, PRECISE, B_EXACT>& b) {
  if constexpr (ROUNDED) {
    float t[4] = {0.f, 0.f, 0.f, 0.f};
    mma(t, a, b);
    FD_UNROLL
    for (int i = 0; i < 4; ++i) d[i] += t[i];
  } else {
    mma(d, a, b);
  }
}

// Fragments from shared memory (lane = 4 g + tig; see emulate.h for the layouts).
// A (16 x 8) at rows r0.., columns c0.. of a row-major tile X with row stride ld.
template <bool PRECISE, bool EXACT = false>
__device__ __forceinline__ Operand<4, PRECISE, EXACT> a_frag(const float* X, int ld, int r0,
                                                             int c0, int g, int tig) {
  const float v[4] = {X[(r0 + g) * ld + c0 + tig], X[(r0 + g + 8) * ld + c0 + tig],
                      X[(r0 + g) * ld + c0 + tig + 4], X[(r0 + g + 8) * ld + c0 + tig + 4]};
  return Operand<4, PRECISE, EXACT>(v);
}
// B (8 x 8) = Y^T for a row-major Y (rows n0.. are B's columns, columns k0.. its rows).
template <bool PRECISE, bool EXACT = false>
__device__ __forceinline__ Operand<2, PRECISE, EXACT> bt_frag(const float* Y, int ld, int k0,
                                                              int n0, int g, int tig) {
  const float v[2] = {Y[(n0 + g) * ld + k0 + tig], Y[(n0 + g) * ld + k0 + tig + 4]};
  return Operand<2, PRECISE, EXACT>(v);
}
// B (8 x 8) = Z[k0.., n0..] of a row-major Z.
template <bool PRECISE, bool EXACT = false>
__device__ __forceinline__ Operand<2, PRECISE, EXACT> b_frag(const float* Z, int ld, int k0,
                                                             int n0, int g, int tig) {
  const float v[2] = {Z[(k0 + tig) * ld + n0 + g], Z[(k0 + tig + 4) * ld + n0 + g]};
  return Operand<2, PRECISE, EXACT>(v);
}

// A warp's C fragments (16 x 8 NT) to a row-major tile (row stride kPStride).
template <int NT>
__device__ __forceinline__ void store_rows(float* P, const float (&c)[NT][4], int g, int tig) {
  FD_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    P[g * kPStride + nt * 8 + 2 * tig] = c[nt][0];
    P[g * kPStride + nt * 8 + 2 * tig + 1] = c[nt][1];
    P[(g + 8) * kPStride + nt * 8 + 2 * tig] = c[nt][2];
    P[(g + 8) * kPStride + nt * 8 + 2 * tig + 1] = c[nt][3];
  }
}

// The reduction over the 4 lanes that share a row (tig = 0..3).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// prep and post

struct RowParams {
  const void* q;  // (G, heads, n, hd) with strides sq (channel stride 1)
  const void* k;
  int64_t sq[3], sk[3];
  const float* table;  // (2, n, hd / 2): cos, sin; nullptr without RoPE
  const float* scale;  // (heads,): exp(min(logit_scale, max)); nullptr without cosine
  float* qh;           // (G, heads, n, HDP) fp32
  float* kh;
  // post only
  void* dq;  // gradients of q, k in their own strides
  void* dk;
  int64_t sdq[3], sdk[3];
  int64_t G, heads, n, hd, hdp;
};

// The rotated pair (x0, x1) of channel pair m at token t, rounded to T as the reference rounds
// the rotated q and k; the products and the sum rounded one by one as torch computes them.
template <typename T>
__device__ __forceinline__ void rotate_pair(const RowParams& p, int64_t t, int64_t m, float& x0,
                                            float& x1) {
  if (p.table == nullptr) return;
  const int64_t half = p.hd / 2;
  const float c = p.table[t * half + m], s = p.table[(p.n + t) * half + m];
  const float r0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  const float r1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
  x0 = to_float(from_float<T>(r0));
  x1 = to_float(from_float<T>(r1));
}

// The rows of prep and post. A block owns kPrepTokens tokens (from blockIdx.y * kPrepTokens) of
// one (group, head) problem zh = blockIdx.x, of q (blockIdx.z = 0) or of k (1): no division per
// row. A row's channel pairs m < HDP / 2 go to a segment of S lanes (prep_segment: one pair a
// lane, two above HDP 64), pairs s and s + S at lane s of the segment, so that a warp works on
// 32 / S rows at once: two at U-DiT's head dim 24, where a warp a row left 20 lanes idle.
constexpr int kPrepTokens = 64;
static_assert(kPrepTokens >= kRows, "bindings.cpp bounds n by 65535 blocks of kRows: the grid's y");

__host__ __device__ __forceinline__ int prep_segment(int64_t hdp) {
  int seg = 1;
  while (seg < hdp / 2 && seg < 32) seg *= 2;
  return seg;
}

// Sum over this lane's segment of S lanes (a power of two; segments aligned); every lane of it
// gets the same bits (the butterfly's additions commute). The whole warp calls it.
__device__ __forceinline__ float segment_sum(float v, int seg) {
  for (int offset = seg / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

struct PrepRow {
  bool is_q, valid;  // valid: the token is < n (the others only take part in the shuffles)
  int64_t z, h, t, r;  // group, head, token; r: the row of q^ / k^ (zh * n + t)
  int s, seg;          // the lane's place in its segment, the segment's size
};

// Calls f(row) for each row of the block, the whole warp together (uniform trip count).
template <typename F>
__device__ __forceinline__ void for_prep_rows(const RowParams& p, F&& f) {
  PrepRow row;
  row.seg = prep_segment(p.hdp);
  row.is_q = blockIdx.z == 0;
  const int64_t zh = blockIdx.x;
  const unsigned heads = static_cast<unsigned>(p.heads);  // < 2^31, as G * heads
  row.z = blockIdx.x / heads;  // 32-bit: no division subroutine
  row.h = blockIdx.x % heads;
  row.s = threadIdx.x % row.seg;
  // 8 or 16 rows a pass (S = 32 or 16: HDP >= 24), which divide kPrepTokens: every lane of
  // the block runs the same passes.
  const int per_pass = kPrepThreads / row.seg;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kPrepTokens;
  for (int k = static_cast<int>(threadIdx.x) / row.seg; k < kPrepTokens; k += per_pass) {
    row.t = t0 + k;
    row.valid = row.t < p.n;
    row.r = zh * p.n + row.t;
    f(row);
  }
}

// This lane's channel pairs (s and s + S of its segment) of row w of q or k, rotated as the
// reference rotates them (zeros past hd / 2 and in a row past n); returns their share of the
// row's squared norm.
template <typename T>
__device__ __forceinline__ float rotated_pairs(const RowParams& p, const PrepRow& w,
                                               float (&x)[2][2]) {
  const int64_t* s = w.is_q ? p.sq : p.sk;
  const T* src = static_cast<const T*>(w.is_q ? p.q : p.k) + w.z * s[0] + w.h * s[1] + w.t * s[2];
  float ss = 0.f;
  FD_UNROLL
  for (int i = 0; i < 2; ++i) {
    x[i][0] = x[i][1] = 0.f;
    const int64_t m = w.s + w.seg * i;
    if (w.valid && m < p.hd / 2) {
      x[i][0] = to_float(src[2 * m]);
      x[i][1] = to_float(src[2 * m + 1]);
      rotate_pair<T>(p, w.t, m, x[i][0], x[i][1]);
      ss += x[i][0] * x[i][0] + x[i][1] * x[i][1];
    }
  }
  return ss;
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) prep_kernel(RowParams p) {
  for_prep_rows(p, [&](const PrepRow w) {
    float x[2][2];
    const float ss = rotated_pairs<T>(p, w, x);
    float mul;
    if (p.scale != nullptr) {
      const float norm = fmaxf(sqrtf(segment_sum(ss, w.seg)), kNormEps);
      mul = (w.is_q ? p.scale[w.h] : 1.f) / norm;
    } else {
      mul = w.is_q ? 1.f / sqrtf(static_cast<float>(p.hd)) : 1.f;
    }
    if (!w.valid) return;
    float* dst = (w.is_q ? p.qh : p.kh) + w.r * p.hdp;
    FD_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int64_t m = w.s + w.seg * i;
      if (2 * m < p.hdp) {
        dst[2 * m] = x[i][0] * mul;  // zero in the padding
        dst[2 * m + 1] = x[i][1] * mul;
      }
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) post_kernel(RowParams p) {
  for_prep_rows(p, [&](const PrepRow w) {
    const float* grad = (w.is_q ? p.qh : p.kh) + w.r * p.hdp;  // dq^ or dk^
    const int64_t half = p.hd / 2;
    float x[2][2], d[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    const float ss = rotated_pairs<T>(p, w, x);
    FD_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int64_t m = w.s + w.seg * i;
      if (w.valid && m < half) {
        d[i][0] = grad[2 * m];
        d[i][1] = grad[2 * m + 1];
      }
    }
    if (p.scale != nullptr) {
      // u = x / den, den = max(||x||, eps); q^ = scale u (q), k^ = u (k).
      const float norm = sqrtf(segment_sum(ss, w.seg));
      const float den = fmaxf(norm, kNormEps);
      const float mul = w.is_q ? p.scale[w.h] : 1.f;
      float du_u = 0.f;
      FD_UNROLL
      for (int i = 0; i < 2; ++i) {
        FD_UNROLL
        for (int j = 0; j < 2; ++j) {
          d[i][j] *= mul;  // d u
          du_u += d[i][j] * (x[i][j] / den);
        }
      }
      du_u = segment_sum(du_u, w.seg);
      if (!(norm > kNormEps)) du_u = 0.f;  // below eps den is a constant
      FD_UNROLL
      for (int i = 0; i < 2; ++i) {
        FD_UNROLL
        for (int j = 0; j < 2; ++j) d[i][j] = (d[i][j] - (x[i][j] / den) * du_u) / den;
      }
    } else if (w.is_q) {
      const float mul = 1.f / sqrtf(static_cast<float>(p.hd));
      FD_UNROLL
      for (int i = 0; i < 2; ++i) {
        d[i][0] *= mul;
        d[i][1] *= mul;
      }
    }
    if (!w.valid) return;
    const int64_t* sd = w.is_q ? p.sdq : p.sdk;
    T* dst = static_cast<T*>(w.is_q ? p.dq : p.dk) + w.z * sd[0] + w.h * sd[1] + w.t * sd[2];
    FD_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int64_t m = w.s + w.seg * i;
      if (m < half) {
        float d0 = d[i][0], d1 = d[i][1];
        if (p.table != nullptr) {  // the transposed rotation
          const float c = p.table[w.t * half + m], sn = p.table[(p.n + w.t) * half + m];
          d0 = d[i][0] * c + d[i][1] * sn;
          d1 = d[i][1] * c - d[i][0] * sn;
        }
        dst[2 * m] = from_float<T>(d0);
        dst[2 * m + 1] = from_float<T>(d1);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The attention kernels

struct AttnParams {
  const float* qh;  // (G, heads, n, HDP) fp32
  const float* kh;
  const void* v;  // (G, heads, n, hd) with strides sv (channel stride 1)
  int64_t sv[3];
  void* out;  // fwd: the output (layout lo), optional with stats
  Layout lo;
  const void* dout;  // fwd with stats, bwd: the output gradient (layout lo)
  float* lse;        // (G, heads, n): log2 of the softmax denominator, in log2 units
  float* delta;      // (G, heads, n): sum(dO * O)
  float* dqh;        // bwd: (G, heads, n, HDP) fp32
  float* dkh;
  float* dlogit;     // bwd: (G, heads, n): per query row, sum over keys of dS * logit
  void* dv;  // bwd: d v with strides sdv
  int64_t sdv[3];
  int64_t G, heads, n, hd;
  int store_o, stats;
  int v_vec, dout_vec;  // v, d out (with unit channel stride) readable as 16-byte vectors
};

// How many of a tile's 64 rows starting at r0 are real (the rest pads a short group): the
// products skip the 8-wide slices past them (a 16-token group runs 2 of 8).
__device__ __forceinline__ int valid_rows(int64_t r0, int64_t n) {
  return n - r0 < kTile ? static_cast<int>(n - r0) : kTile;
}

// Staging the (kTile x HDP) tiles in shared memory as fp32. Each thread moves its share in
// batches whose loads are all issued before the batch's first store (kStageBatch accesses in
// flight a thread, then one wait for all of them, where a load-store loop waits once per
// access), as 16-byte vectors where the source allows. Rows past n and channels past hd are
// zeros. No barrier: the caller synchronises.
// (Fewer at large HDP, where the kernels' accumulators leave few registers: no spills.)
template <int HDP>
constexpr int kStageBatch = HDP >= 128 ? 1 : HDP >= 96 ? 2 : 4;

// Rows r0.. of an fp32 (.., HDP) scratch tensor (q^, k^): 16-byte vectors (the rows are HDP
// floats, a multiple of 8, from torch's aligned allocation; LD is a multiple of 4).
template <int HDP, int LD = row_stride(HDP)>
__device__ __forceinline__ void load_hat(float* S, const float* src, int64_t r0, int64_t n) {
  constexpr int kRowVecs = HDP / 4, kPer = kTile * kRowVecs / kThreads;
  static_assert(HDP % 8 == 0 && LD % 4 == 0 && kTile * kRowVecs % kThreads == 0, "tile shape");
  const float4* src4 = reinterpret_cast<const float4*>(src + r0 * HDP);
  const int rows = valid_rows(r0, n), tid = opaque_index(threadIdx.x);
  FD_UNROLL
  for (int i0 = 0; i0 < kPer; i0 += kStageBatch<HDP>) {
    float4 buf[kStageBatch<HDP>];
    FD_UNROLL
    for (int j = 0; j < kStageBatch<HDP> && i0 + j < kPer; ++j) {
      const int e = (i0 + j) * kThreads + tid;
      buf[j] = e / kRowVecs < rows ? src4[e] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    FD_UNROLL
    for (int j = 0; j < kStageBatch<HDP> && i0 + j < kPer; ++j) {
      const int e = (i0 + j) * kThreads + tid;
      *reinterpret_cast<float4*>(S + (e / kRowVecs) * LD + (e % kRowVecs) * 4) = buf[j];
    }
  }
}

// How a tile of T (v, or d out) is read: element (r, c) at row(r)[c * cs].
enum StageMode {
  kRowScalar = 0,  // cs = 1, one element an access, consecutive threads on consecutive channels
  kRowVector = 1,  // cs = 1, 16-byte vectors (row(r), hd and the vectors' offsets aligned)
  kTokenFirst = 2,  // cs > 1 (d out merged into a channels-first image): a warp reads 8 tokens
                    // x 4 channels an access, tokens fastest (consecutive tokens of a group row
                    // are pixels 2 apart: 32-byte runs), which also keeps the shared-memory
                    // stores off each other's banks for every LD = HDP + 4
};

// The row and channel of a thread's i-th element of a tile in the scalar modes: kTokenFirst
// takes chunks of 8 tokens x 4 channels, chunk q at tokens (q % 8) * 8.., channels (q / 8) * 4..
template <int HDP>
__device__ __forceinline__ int stage_row(StageMode mode, int i, int warp, int lane) {
  if (mode == kTokenFirst) return ((i * (kThreads / 32) + warp) % (kTile / 8)) * 8 + lane % 8;
  return (i * kThreads + warp * 32 + lane) / HDP;
}
template <int HDP>
__device__ __forceinline__ int stage_col(StageMode mode, int i, int warp, int lane) {
  if (mode == kTokenFirst) return ((i * (kThreads / 32) + warp) / (kTile / 8)) * 4 + lane / 8;
  return (i * kThreads + warp * 32 + lane) % HDP;
}

// The (kTile x HDP) tile of T whose row r < rows starts at row(r) into S (row stride LD) as
// fp32, in `mode`.
template <typename T, int HDP, int LD, typename Row>
__device__ __forceinline__ void stage_rows(float* S, Row row, int64_t cs, int rows, int64_t hd,
                                           StageMode mode) {
  const int tid = opaque_index(threadIdx.x), warp = tid / 32, lane = tid % 32;
  if (mode == kRowVector) {
    constexpr int V = kDwVec<T>, kRowVecs = HDP / V;
    constexpr int kVecs = kTile * kRowVecs, kPer = (kVecs + kThreads - 1) / kThreads;
    static_assert(HDP % V == 0 && LD % 4 == 0 && V % 4 == 0, "whole vectors in a row");
    FD_UNROLL
    for (int i0 = 0; i0 < kPer; i0 += kStageBatch<HDP>) {
      DwVec<T> buf[kStageBatch<HDP>];
      FD_UNROLL
      for (int j = 0; j < kStageBatch<HDP> && i0 + j < kPer; ++j) {
        const int e = (i0 + j) * kThreads + tid;
        const int r = e / kRowVecs, c = (e % kRowVecs) * V;
        if (e < kVecs && r < rows && c < hd) {
          buf[j] = *reinterpret_cast<const DwVec<T>*>(row(r) + c);
        }
      }
      FD_UNROLL
      for (int j = 0; j < kStageBatch<HDP> && i0 + j < kPer; ++j) {
        const int e = (i0 + j) * kThreads + tid;
        const int r = e / kRowVecs, c = (e % kRowVecs) * V;
        if (e >= kVecs) continue;
        const bool ok = r < rows && c < hd;
        FD_UNROLL
        for (int u = 0; u < V; u += 4) {
          const float4 f = ok ? make_float4(to_float(buf[j].v[u]), to_float(buf[j].v[u + 1]),
                                            to_float(buf[j].v[u + 2]), to_float(buf[j].v[u + 3]))
                              : make_float4(0.f, 0.f, 0.f, 0.f);
          *reinterpret_cast<float4*>(S + r * LD + c + u) = f;
        }
      }
    }
    return;
  }
  constexpr int kPer = kTile * HDP / kThreads, kBatch = 2 * kStageBatch<HDP>;
  static_assert(kTile * HDP % kThreads == 0 && kTile % 8 == 0 && HDP % 4 == 0, "tile shape");
  FD_UNROLL
  for (int i0 = 0; i0 < kPer; i0 += kBatch) {
    T buf[kBatch];
    uint32_t ok = 0;  // bit j: element j is read (else a zero)
    FD_UNROLL
    for (int j = 0; j < kBatch && i0 + j < kPer; ++j) {
      const int r = stage_row<HDP>(mode, i0 + j, warp, lane);
      const int c = stage_col<HDP>(mode, i0 + j, warp, lane);
      if (r < rows && c < hd) {
        buf[j] = row(r)[c * cs];
        ok |= 1u << j;
      }
    }
    FD_UNROLL
    for (int j = 0; j < kBatch && i0 + j < kPer; ++j) {
      const int r = stage_row<HDP>(mode, i0 + j, warp, lane);
      const int c = stage_col<HDP>(mode, i0 + j, warp, lane);
      S[r * LD + c] = (ok >> j) & 1u ? to_float(buf[j]) : 0.f;
    }
  }
}

// Rows r0.. of v: (z, h) of a (G, heads, n, hd) tensor with strides sv, channels contiguous.
template <typename T, int HDP, int LD>
__device__ __forceinline__ void load_rows(float* S, const T* src, const int64_t (&sv)[3],
                                          int64_t z, int64_t h, int64_t r0, int64_t n,
                                          int64_t hd, bool vec) {
  const T* base = src + z * sv[0] + h * sv[1] + r0 * sv[2];
  const int64_t rs = sv[2];
  stage_rows<T, HDP, LD>(
      S, [&](int r) { return base + r * rs; }, 1, valid_rows(r0, n), hd,
      vec ? kRowVector : kRowScalar);
}

// Rows r0.. of d out through its layout. Each row's offset is worked out once (the merge's
// divisions) into sOff, then every element is that plus c times the channel stride. Contains a
// __syncthreads: call from the whole block.
template <typename T, int HDP, int LD>
__device__ __forceinline__ void load_grad(float* S, int64_t* sOff, const T* src, const Layout& lo,
                                          int64_t z, int64_t h, int64_t r0, int64_t n,
                                          int64_t hd, bool vec) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    sOff[r] = r0 + r < n ? offset_of(lo, z, h, r0 + r, 0, hd) : 0;
  }
  __syncthreads();
  const int64_t cs = lo.merge ? lo.s[1] : lo.s[3];  // the offset is linear in the channel
  const StageMode mode = cs != 1 ? kTokenFirst : vec ? kRowVector : kRowScalar;
  stage_rows<T, HDP, LD>(
      S, [&](int r) { return src + sOff[r]; }, cs, valid_rows(r0, n), hd, mode);
}

// S (16 x 64) = q^ k^T for a warp's 16 rows, 3xTF32 (ROUNDED: see mma_into); the columns from
// `valid` on stay 0.
template <int HDP, bool ROUNDED>
__device__ __forceinline__ void logits(float (&s)[8][4], const float* sQ, const float* sK, int w,
                                       int g, int tig, int valid) {
  constexpr int ld = row_stride(HDP);
  FD_UNROLL
  for (int nt = 0; nt < 8; ++nt) {
    FD_UNROLL
    for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
  }
  FD_UNROLL
  for (int kk = 0; kk < HDP; kk += 8) {
    const auto a = a_frag<true>(sQ, ld, w, kk, g, tig);
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      if (nt * 8 < valid) mma_into<ROUNDED>(s[nt], a, bt_frag<true>(sK, ld, kk, nt * 8, g, tig));
    }
  }
}

// STATS: the backward's preamble (the statistics, delta, and O when store_o), with O in fp32
// accuracy (3xTF32 P V): delta = sum(dO * O) enters every dS, and d logit_scale weighs dS by
// logits up to 100, so a 2^-11 error in O would show there.
// Blocks per SM the forward's registers must allow: where an SM has 228 KB of shared memory
// (sm_90, sm_100), the forward's 58 and 71 KB at HDP 48 and 64 allow 3, which registers beyond
// 168 (ptxas takes up to 255 unbounded) would cut to 2. sm_80's 164 KB allow 2 anyway (and a
// bound of 3 there spills), the 100 KB of sm_86/89/120 one.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDA_ARCH__ < 1200
constexpr int fwd_min_blocks(int hdp) { return hdp == 48 || hdp == 64 ? 3 : 1; }
#else
constexpr int fwd_min_blocks(int) { return 1; }
#endif

template <typename T, int HDP, bool STATS>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks(HDP)) fwd_kernel(AttnParams p) {
  constexpr bool F32 = !std::is_same<T, __nv_bfloat16>::value || STATS;  // 3xTF32 P V
  constexpr bool VX = !std::is_same<T, float>::value;  // v exact in TF32 (16-bit inputs)
  constexpr bool RN = !VX;  // fp32 inputs: rounded accumulation (mma_into)
  constexpr int LQ = row_stride(HDP), LV = v_stride(HDP), NT = HDP / 8;
  FD_DYNAMIC_SMEM(smem);
  float* sQ = smem;
  float* sK = sQ + kRows * LQ;
  float* sV = sK + kTile * LQ;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  float* sP = sV + kTile * LV + warp * 16 * kPStride;
  const int w = warp * 16;
  const int64_t zh = blockIdx.x, z = zh / p.heads, h = zh % p.heads, n = p.n;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  load_hat<HDP>(sQ, p.qh + zh * n * HDP, q0, n);

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, o[NT][4];
  FD_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    FD_UNROLL
    for (int i = 0; i < 4; ++i) o[nt][i] = 0.f;
  }
  for (int64_t k0 = 0; k0 < n; k0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    load_hat<HDP>(sK, p.kh + zh * n * HDP, k0, n);
    load_rows<T, HDP, LV>(sV, static_cast<const T*>(p.v), p.sv, z, h, k0, n, p.hd, p.v_vec);
    __syncthreads();
    if (q0 + w >= n) continue;  // a warp of padding rows only: nothing to compute or store
    const int valid = valid_rows(k0, n);
    float s[8][4];
    logits<HDP, RN>(s, sQ, sK, w, g, tig, valid);
    float mx[2] = {-INFINITY, -INFINITY};
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) {
        const bool ok = k0 + nt * 8 + 2 * tig + (i & 1) < n;
        s[nt][i] = ok ? __fmul_rn(s[nt][i], kLog2e) : -INFINITY;  // rounded: as the backward
        mx[i / 2] = fmaxf(mx[i / 2], s[nt][i]);
      }
    }
    float alpha[2];
    FD_UNROLL
    for (int j = 0; j < 2; ++j) {
      const float m_new = fmaxf(m[j], quad_max(mx[j]));  // finite: key k0 is always valid
      alpha[j] = exp2f(m[j] - m_new);
      m[j] = m_new;
      l[j] *= alpha[j];
    }
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - m[i / 2]);
        l[i / 2] += s[nt][i];  // this lane's share of the row sum
      }
    }
    FD_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) o[nt][i] *= alpha[i / 2];
    }
    store_rows<8>(sP, s, g, tig);
    __syncwarp();
    FD_UNROLL
    for (int kk = 0; kk < kTile; kk += 8) {
      if (kk >= valid) break;
      const auto a = a_frag<F32>(sP, kPStride, 0, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        mma_into<RN>(o[nt], a, b_frag<F32, VX>(sV, LV, kk, nt * 8, g, tig));
      }
    }
    __syncwarp();  // P is read before the next tile overwrites it
  }
  FD_UNROLL
  for (int j = 0; j < 2; ++j) l[j] = quad_sum(l[j]);

  float dot[2] = {0.f, 0.f};
  FD_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int64_t row = q0 + w + g + 8 * j;
    const float inv = 1.f / l[j];
    FD_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      FD_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int64_t c = nt * 8 + 2 * tig + e;
        const float val = o[nt][2 * j + e] * inv;
        if (row < n && c < p.hd) {
          const int64_t off = offset_of(p.lo, z, h, row, c, p.hd);
          if (p.store_o) static_cast<T*>(p.out)[off] = from_float<T>(val);
          if (STATS) dot[j] += to_float(static_cast<const T*>(p.dout)[off]) * val;
        }
      }
    }
  }
  if (STATS) {
    FD_UNROLL
    for (int j = 0; j < 2; ++j) {
      const float delta = quad_sum(dot[j]);
      const int64_t row = q0 + w + g + 8 * j;
      if (tig == 0 && row < n) {
        p.lse[zh * n + row] = m[j] + log2f(l[j]);
        p.delta[zh * n + row] = delta;
      }
    }
  }
}

template <typename T, int HDP>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(AttnParams p) {
  constexpr bool F32 = std::is_same<T, float>::value;  // also: rounded accumulation (mma_into)
  constexpr bool VX = !F32;  // v and d out exact in TF32 (16-bit inputs)
  constexpr bool PRE = !std::is_same<T, __nv_bfloat16>::value;  // 3xTF32 dS, P products
  constexpr int LQ = row_stride(HDP), LV = v_stride(HDP), NT = HDP / 8;
  FD_DYNAMIC_SMEM(smem);
  float* sQ = smem;
  float* sK = sQ + kRows * LQ;
  float* sV = sK + kTile * LQ;
  float* sdO = sV + kTile * LV + 4 * 16 * kPStride;
  int64_t* sOff = reinterpret_cast<int64_t*>(sdO + kTile * LQ + 2 * kTile);  // as in dkdv
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  float* sP = sV + kTile * LV + warp * 16 * kPStride;
  const int w = warp * 16;
  const int64_t zh = blockIdx.x, z = zh / p.heads, h = zh % p.heads, n = p.n;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  load_hat<HDP>(sQ, p.qh + zh * n * HDP, q0, n);
  load_grad<T, HDP, LQ>(sdO, sOff, static_cast<const T*>(p.dout), p.lo, z, h, q0, n, p.hd,
                          p.dout_vec);
  float lse[2], delta[2];
  FD_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int64_t row = q0 + w + g + 8 * j;
    lse[j] = row < n ? p.lse[zh * n + row] : 0.f;
    delta[j] = row < n ? p.delta[zh * n + row] : 0.f;
  }
  float dq[NT][4], dlogit0 = 0.f, dlogit1 = 0.f;
  FD_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    FD_UNROLL
    for (int i = 0; i < 4; ++i) dq[nt][i] = 0.f;
  }
  for (int64_t k0 = 0; k0 < n; k0 += kTile) {
    __syncthreads();
    load_hat<HDP>(sK, p.kh + zh * n * HDP, k0, n);
    load_rows<T, HDP, LV>(sV, static_cast<const T*>(p.v), p.sv, z, h, k0, n, p.hd, p.v_vec);
    __syncthreads();
    if (q0 + w >= n) continue;  // a warp of padding rows only
    const int valid = valid_rows(k0, n);
    float s[8][4], dp[8][4];
    logits<HDP, F32>(s, sQ, sK, w, g, tig, valid);
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) dp[nt][i] = 0.f;
    }
    FD_UNROLL
    for (int kk = 0; kk < HDP; kk += 8) {  // dP = dO V^T
      const auto a = a_frag<F32, VX>(sdO, LQ, w, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < 8; ++nt) {
        if (nt * 8 < valid) mma_into<F32>(dp[nt], a, bt_frag<F32, VX>(sV, LV, kk, nt * 8, g, tig));
      }
    }
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) {
        const bool ok = k0 + nt * 8 + 2 * tig + (i & 1) < n;
        // the logits rounded as the forward rounds them (__fmul_rn: nvcc would otherwise
        // contract the product and the subtraction into one fma, which the emulator does not)
        const float pr = ok ? exp2f(__fmul_rn(s[nt][i], kLog2e) - lse[i / 2]) : 0.f;
        // One key: softmax is constant 1, dS exactly 0 (dP - delta would leave TF32 noise).
        const float ds = n == 1 ? 0.f : pr * (dp[nt][i] - delta[i / 2]);
        if (i < 2) {  // d scale * scale, from the fp32 logits
          dlogit0 += ds * s[nt][i];
        } else {
          dlogit1 += ds * s[nt][i];
        }
        s[nt][i] = ds;
      }
    }
    store_rows<8>(sP, s, g, tig);
    __syncwarp();
    FD_UNROLL
    for (int kk = 0; kk < kTile; kk += 8) {  // dq^ += dS k^
      if (kk >= valid) break;
      const auto a = a_frag<PRE>(sP, kPStride, 0, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        mma_into<F32>(dq[nt], a, b_frag<PRE>(sK, LQ, kk, nt * 8, g, tig));
      }
    }
    __syncwarp();
  }
  FD_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int64_t row = q0 + w + g + 8 * j;
    const float dl = quad_sum(j == 0 ? dlogit0 : dlogit1);
    if (row >= n) continue;
    if (tig == 0) p.dlogit[zh * n + row] = dl;
    float* dst = p.dqh + (zh * n + row) * HDP;
    FD_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      dst[nt * 8 + 2 * tig] = dq[nt][2 * j];
      dst[nt * 8 + 2 * tig + 1] = dq[nt][2 * j + 1];
    }
  }
}

template <typename T, int HDP>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(AttnParams p) {
  constexpr bool F32 = std::is_same<T, float>::value;  // also: rounded accumulation (mma_into)
  constexpr bool VX = !F32;  // v and d out exact in TF32 (16-bit inputs)
  constexpr bool PRE = !std::is_same<T, __nv_bfloat16>::value;  // 3xTF32 dS, P products
  constexpr int LQ = row_stride(HDP), LV = v_stride(HDP), NT = HDP / 8;
  FD_DYNAMIC_SMEM(smem);
  float* sK = smem;  // this block's keys and values
  float* sQ = sK + kRows * LQ;
  float* sV = sQ + kTile * LQ;
  float* sdO = sV + kTile * LV + 4 * 16 * kPStride;
  float* sLse = sdO + kTile * LQ;
  float* sDelta = sLse + kTile;
  int64_t* sOff = reinterpret_cast<int64_t*>(sDelta + kTile);  // 8-byte aligned: even floats
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  float* sP = sV + kTile * LV + warp * 16 * kPStride;
  const int w = warp * 16;
  const int64_t zh = blockIdx.x, z = zh / p.heads, h = zh % p.heads, n = p.n;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kRows;
  load_hat<HDP>(sK, p.kh + zh * n * HDP, k0, n);
  load_rows<T, HDP, LV>(sV, static_cast<const T*>(p.v), p.sv, z, h, k0, n, p.hd, p.v_vec);
  float dk[NT][4], dv[NT][4];
  FD_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    FD_UNROLL
    for (int i = 0; i < 4; ++i) dk[nt][i] = dv[nt][i] = 0.f;
  }
  for (int64_t q0 = 0; q0 < n; q0 += kTile) {
    __syncthreads();
    load_hat<HDP>(sQ, p.qh + zh * n * HDP, q0, n);
    load_grad<T, HDP, LQ>(sdO, sOff, static_cast<const T*>(p.dout), p.lo, z, h, q0, n, p.hd,
                          p.dout_vec);
    for (int r = threadIdx.x; r < kTile; r += kThreads) {
      const bool ok = q0 + r < n;  // a padding query has P = 0: lse = +inf
      sLse[r] = ok ? p.lse[zh * n + q0 + r] : INFINITY;
      sDelta[r] = ok ? p.delta[zh * n + q0 + r] : 0.f;
    }
    __syncthreads();
    if (k0 + w >= n) continue;  // a warp of padding keys only
    const int valid = valid_rows(q0, n);  // queries in this tile
    float s[8][4];  // S^T, then P^T, then dP^T, then dS^T: one set of registers
    logits<HDP, F32>(s, sK, sQ, w, g, tig, valid);  // S^T = k^ q^T
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) {
        const bool key_ok = k0 + w + g + 8 * (i / 2) < n;  // a padding key: P^T = 0, not inf
        const float lse = sLse[nt * 8 + 2 * tig + (i & 1)];
        s[nt][i] = key_ok ? exp2f(__fmul_rn(s[nt][i], kLog2e) - lse) : 0.f;  // as the forward
      }
    }
    store_rows<8>(sP, s, g, tig);
    __syncwarp();
    FD_UNROLL
    for (int kk = 0; kk < kTile; kk += 8) {  // dv += P^T dO
      if (kk >= valid) break;
      const auto a = a_frag<PRE>(sP, kPStride, 0, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        mma_into<F32>(dv[nt], a, b_frag<PRE, VX>(sdO, LQ, kk, nt * 8, g, tig));
      }
    }
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
    }
    FD_UNROLL
    for (int kk = 0; kk < HDP; kk += 8) {  // dP^T = v dO^T
      const auto a = a_frag<F32, VX>(sV, LV, w, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < 8; ++nt) {
        if (nt * 8 < valid) mma_into<F32>(s[nt], a, bt_frag<F32, VX>(sdO, LQ, kk, nt * 8, g, tig));
      }
    }
    // dS^T = P^T (dP^T - delta), P^T read back from this lane's own places in sP.
    FD_UNROLL
    for (int nt = 0; nt < 8; ++nt) {
      FD_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float pt = sP[(g + 8 * (i / 2)) * kPStride + nt * 8 + 2 * tig + (i & 1)];
        s[nt][i] = n == 1 ? 0.f : pt * (s[nt][i] - sDelta[nt * 8 + 2 * tig + (i & 1)]);
      }
    }
    __syncwarp();  // every lane has read P^T before dS^T overwrites it
    store_rows<8>(sP, s, g, tig);
    __syncwarp();
    FD_UNROLL
    for (int kk = 0; kk < kTile; kk += 8) {  // dk^ += dS^T q^
      if (kk >= valid) break;
      const auto a = a_frag<PRE>(sP, kPStride, 0, kk, g, tig);
      FD_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        mma_into<F32>(dk[nt], a, b_frag<PRE>(sQ, LQ, kk, nt * 8, g, tig));
      }
    }
    __syncwarp();
  }
  FD_UNROLL
  for (int j = 0; j < 2; ++j) {
    const int64_t row = k0 + w + g + 8 * j;
    if (row >= n) continue;
    float* dst = p.dkh + (zh * n + row) * HDP;
    T* dvr = static_cast<T*>(p.dv) + z * p.sdv[0] + h * p.sdv[1] + row * p.sdv[2];
    FD_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      FD_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int c = nt * 8 + 2 * tig + e;
        dst[c] = dk[nt][2 * j + e];
        if (c < p.hd) dvr[c] = from_float<T>(dv[nt][2 * j + e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers (bindings.cpp validates; these only pick the instantiation and launch)

template <typename K>
cudaError_t allow_attn_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// f(std::integral_constant<int, HDP>) for the padded head dim hdp.
template <typename F>
cudaError_t dispatch_hdp(int64_t hdp, F&& f) {
  switch (hdp) {
    case 24:
      return f(std::integral_constant<int, 24>{});
    case 48:
      return f(std::integral_constant<int, 48>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// (group, head) problems on x (< 2^31), token blocks on y (n <= 65535 * kPrepTokens), q / k on z.
inline dim3 row_grid(const RowParams& p) {
  return dim3(static_cast<unsigned>(p.G * p.heads),
              static_cast<unsigned>((p.n + kPrepTokens - 1) / kPrepTokens), 2);
}

inline cudaError_t prep_launch(const RowParams& p, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, "downsampled_attention_prep", [&](auto tag) {
    using T = typename decltype(tag)::type;
    FD_LAUNCH(prep_kernel<T>, row_grid(p), dim3(kPrepThreads), 0,
              stream)(p);
    return cudaGetLastError();
  });
}

inline cudaError_t post_launch(const RowParams& p, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, "downsampled_attention_post", [&](auto tag) {
    using T = typename decltype(tag)::type;
    FD_LAUNCH(post_kernel<T>, row_grid(p), dim3(kPrepThreads), 0,
              stream)(p);
    return cudaGetLastError();
  });
}

// Whether rows of T whose offsets are multiples of `strides` from `base` (channels contiguous,
// hd of them) read as whole, aligned 16-byte vectors of kDwVec<T> channels.
template <typename T>
bool vectors_fit(const void* base, int64_t hd, std::initializer_list<int64_t> strides) {
  constexpr int64_t V = kDwVec<T>;
  if (base == nullptr || !is_aligned(base, 16) || hd % V != 0) return false;
  for (const int64_t s : strides) {
    if (s % V != 0) return false;
  }
  return true;
}

// The tile loaders' vector flags of p for inputs of T (d out's only matters where its channel
// stride is 1: the merge's s[1], else s[3]).
template <typename T>
void set_vectors(AttnParams& p) {
  p.v_vec = vectors_fit<T>(p.v, p.hd, {p.sv[0], p.sv[1], p.sv[2]});
  const int64_t* s = p.lo.s;
  p.dout_vec = p.lo.merge ? vectors_fit<T>(p.dout, p.hd, {s[0], s[2], s[3]})
                          : vectors_fit<T>(p.dout, p.hd, {s[0], s[1], s[2]});
}

// (group, head) problems on x (< 2^31), row blocks on y (< 2^16: n < 2^22).
inline dim3 attn_grid(const AttnParams& p) {
  return dim3(static_cast<unsigned>(p.G * p.heads), static_cast<unsigned>((p.n + kRows - 1) / kRows));
}

inline cudaError_t fwd_launch(AttnParams p, int64_t hdp, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, "downsampled_attention_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    set_vectors<T>(p);
    return dispatch_hdp(hdp, [&](auto hdp_c) {
      constexpr int HDP = decltype(hdp_c)::value;
      const size_t smem = fwd_smem(HDP);
      const auto kernel = p.stats ? fwd_kernel<T, HDP, true> : fwd_kernel<T, HDP, false>;
      cudaError_t err = allow_attn_smem(kernel, smem);
      if (err != cudaSuccess) return err;
      FD_LAUNCH(kernel, attn_grid(p), dim3(kThreads), smem, stream)(p);
      return cudaGetLastError();
    });
  });
}

inline cudaError_t bwd_launch(AttnParams p, int64_t hdp, int dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, "downsampled_attention_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    set_vectors<T>(p);
    return dispatch_hdp(hdp, [&](auto hdp_c) {
      constexpr int HDP = decltype(hdp_c)::value;
      const size_t smem = bwd_smem(HDP);
      const auto dq = dq_kernel<T, HDP>;
      const auto dkdv = dkdv_kernel<T, HDP>;
      cudaError_t err = allow_attn_smem(dq, smem);
      if (err == cudaSuccess) err = allow_attn_smem(dkdv, smem);
      if (err != cudaSuccess) return err;
      FD_LAUNCH(dq, attn_grid(p), dim3(kThreads), smem, stream)(p);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      FD_LAUNCH(dkdv, attn_grid(p), dim3(kThreads), smem, stream)(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace attn

// The entries bindings.cpp calls (it validates every argument first).

int64_t attention_padded_head_dim(int64_t hd) { return attn::padded_head_dim(hd); }

int64_t attention_row_block() { return attn::kRows; }

// Whether the attention kernels at padded head dim hdp (the backward, which needs the most) fit
// the opt-in shared memory per block of `device`.
cudaError_t attention_fits(int64_t hdp, int device, bool* fits) {
  int limit = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *fits = err == cudaSuccess && attn::bwd_smem(static_cast<int>(hdp)) <= static_cast<size_t>(limit);
  return err;
}

cudaError_t attention_prep_launch(const void* q, const int64_t* sq, const void* k,
                                  const int64_t* sk, const float* table, const float* scale,
                                  float* qh, float* kh, int64_t G, int64_t heads, int64_t n,
                                  int64_t hd, int64_t hdp, int dtype, cudaStream_t stream) {
  attn::RowParams p{};
  p.q = q;
  p.k = k;
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = sq[i];
    p.sk[i] = sk[i];
  }
  p.table = table;
  p.scale = scale;
  p.qh = qh;
  p.kh = kh;
  p.G = G;
  p.heads = heads;
  p.n = n;
  p.hd = hd;
  p.hdp = hdp;
  return attn::prep_launch(p, dtype, stream);
}

cudaError_t attention_post_launch(const void* q, const int64_t* sq, const void* k,
                                  const int64_t* sk, const float* table, const float* scale,
                                  const float* dqh, const float* dkh, void* dq,
                                  const int64_t* sdq, void* dk, const int64_t* sdk, int64_t G,
                                  int64_t heads, int64_t n, int64_t hd, int64_t hdp, int dtype,
                                  cudaStream_t stream) {
  attn::RowParams p{};
  p.q = q;
  p.k = k;
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = sq[i];
    p.sk[i] = sk[i];
    p.sdq[i] = sdq[i];
    p.sdk[i] = sdk[i];
  }
  p.table = table;
  p.scale = scale;
  p.qh = const_cast<float*>(dqh);  // post reads the gradients of q^ and k^ there
  p.kh = const_cast<float*>(dkh);
  p.dq = dq;
  p.dk = dk;
  p.G = G;
  p.heads = heads;
  p.n = n;
  p.hd = hd;
  p.hdp = hdp;
  return attn::post_launch(p, dtype, stream);
}

namespace {
attn::AttnParams attn_params(const float* qh, const float* kh, const void* v, const int64_t* sv,
                             const int64_t* so, int merge, int64_t gw, const void* dout,
                             int64_t G, int64_t heads, int64_t n, int64_t hd) {
  attn::AttnParams p{};
  p.qh = qh;
  p.kh = kh;
  p.v = v;
  for (int i = 0; i < 3; ++i) p.sv[i] = sv[i];
  for (int i = 0; i < 4; ++i) p.lo.s[i] = so[i];
  p.lo.merge = merge;
  p.lo.gw = gw;
  p.dout = dout;
  p.G = G;
  p.heads = heads;
  p.n = n;
  p.hd = hd;
  return p;
}
}  // namespace

cudaError_t attention_fwd_launch(const float* qh, const float* kh, const void* v,
                                 const int64_t* sv, void* out, const int64_t* so, int merge,
                                 int64_t gw, const void* dout, float* lse, float* delta,
                                 int64_t G, int64_t heads, int64_t n, int64_t hd, int64_t hdp,
                                 bool store_o, bool stats, int dtype, cudaStream_t stream) {
  attn::AttnParams p = attn_params(qh, kh, v, sv, so, merge, gw, dout, G, heads, n, hd);
  p.out = out;
  p.lse = lse;
  p.delta = delta;
  p.store_o = store_o;
  p.stats = stats;
  return attn::fwd_launch(p, hdp, dtype, stream);
}

cudaError_t attention_bwd_launch(const float* qh, const float* kh, const void* v,
                                 const int64_t* sv, const void* dout, const int64_t* so,
                                 int merge, int64_t gw, const float* lse, const float* delta,
                                 float* dqh, float* dkh, float* dlogit, void* dv,
                                 const int64_t* sdv, int64_t G, int64_t heads, int64_t n,
                                 int64_t hd, int64_t hdp, int dtype, cudaStream_t stream) {
  attn::AttnParams p = attn_params(qh, kh, v, sv, so, merge, gw, dout, G, heads, n, hd);
  p.lse = const_cast<float*>(lse);
  p.delta = const_cast<float*>(delta);
  p.dqh = dqh;
  p.dkh = dkh;
  p.dlogit = dlogit;
  p.dv = dv;
  for (int i = 0; i < 3; ++i) p.sdv[i] = sdv[i];
  return attn::bwd_launch(p, hdp, dtype, stream);
}

}  // namespace fastdit
