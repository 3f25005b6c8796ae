// fastdit._C: plain functions over pointers (Python ints), sizes, a dtype code, a device index
// and a cudaStream_t (as an int). No torch: the Python side validates tensors and passes
// t.data_ptr(), torch.cuda.current_stream(device).cuda_stream, ... This side selects the device,
// launches on the given stream, checks the launch, and never allocates.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

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
                                      int dtype, int cond_dtype, bool channels_first,
                                      cudaStream_t stream);
cudaError_t adaln_gated_fwd_launch(const void* x, const void* y, const void* gate,
                                   const void* shift, const void* scale, void* r, void* out,
                                   int64_t B, int64_t L, int64_t D, float eps, int dtype,
                                   int cond_dtype, bool channels_first, cudaStream_t stream);
cudaError_t adaln_modulate_bwd_launch(const void* x, const void* scale, const void* dout,
                                      void* dx, void* dshift, void* dscale, void* partial,
                                      int64_t B, int64_t L, int64_t D, int64_t splits, float eps,
                                      int dtype, int cond_dtype, bool channels_first,
                                      cudaStream_t stream);
cudaError_t adaln_gated_bwd_launch(const void* x, const void* y, const void* gate,
                                   const void* scale, const void* dr, const void* dout, void* dx,
                                   void* dy, void* dgate, void* dshift, void* dscale,
                                   void* partial, int64_t B, int64_t L, int64_t D,
                                   int64_t splits, float eps, int dtype, int cond_dtype,
                                   bool channels_first, cudaStream_t stream);
int64_t adaln_bwd_max_d();
int64_t adaln_cf_tiles(int64_t L);
cudaError_t adaln_bwd_splits(int64_t B, int64_t L, int64_t D, int dtype, bool gated, int device,
                             int64_t* splits);
const void* adaln_probe_kernel();

// patchify.cu
cudaError_t permute_launch(const void* src, void* dst, const int64_t* image_strides,
                           const int64_t* token_strides, bool to_tokens, int64_t B, int64_t C,
                           int64_t H, int64_t W, int64_t p, int order, int dtype,
                           cudaStream_t stream);
cudaError_t patch_embed_fwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                   const void* bias, const void* pos, void* out, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t p, int64_t D,
                                   int dtype, cudaStream_t stream);
cudaError_t patch_embed_bwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                   const void* dout, void* dx, const int64_t* dx_strides,
                                   void* dweight_partial, void* dpos_partial, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t p, int64_t D,
                                   int64_t splits, int dtype, cudaStream_t stream);
cudaError_t patch_embed_bwd_splits(int64_t B, int64_t N, int64_t D, int64_t K, int dtype,
                                   int device, int64_t* splits);
cudaError_t final_layer_fwd_launch(const void* x, const void* shift, const void* scale,
                                   const void* weight_t, const void* bias, void* out,
                                   const int64_t* out_strides, int64_t B, int64_t C, int64_t h,
                                   int64_t w, int64_t p, int64_t D, float eps, int dtype,
                                   cudaStream_t stream);
cudaError_t final_layer_bwd_launch(const void* x, const void* shift, const void* scale,
                                   const void* weight, const void* dout,
                                   const int64_t* dout_strides, void* dx, void* stats,
                                   void* dmod_partial, void* dweight_partial,
                                   void* dbias_partial, int64_t B, int64_t C, int64_t h,
                                   int64_t w, int64_t p, int64_t D, float eps,
                                   int64_t row_splits, int64_t weight_splits, int dtype,
                                   cudaStream_t stream);
cudaError_t final_layer_bwd_splits(int64_t B, int64_t N, int64_t D, int64_t K, int dtype,
                                   int device, int64_t* row_splits, int64_t* weight_splits);
int64_t patchify_max_k();
int64_t final_layer_max_d();
int64_t final_layer_max_k();
int64_t patchify_weight_tile();
int64_t final_layer_bwd_max_scalar_d();
bool final_layer_bwd_vec4(int dtype, int64_t D, const void* x, const void* dx,
                          const void* scale, const void* weight);

// downsampled_attention.cu
cudaError_t dwconv_split_fwd_launch(const void* x, const int64_t* x_strides, const void* weight,
                                    const void* bias, void* t, int64_t B, int64_t d, int64_t H,
                                    int64_t W, int64_t k, bool shortcut, int dtype,
                                    cudaStream_t stream);
cudaError_t dwconv_split_dx_launch(const void* weight, const void* dt, void* dx,
                                   const int64_t* dx_strides, int64_t B, int64_t d, int64_t H,
                                   int64_t W, int64_t k, bool shortcut, int dtype,
                                   cudaStream_t stream);
cudaError_t dwconv_split_dw_launch(const void* x, const int64_t* x_strides, const void* dt,
                                   void* partial, int64_t B, int64_t d, int64_t H, int64_t W,
                                   int64_t k, int64_t splits, int dtype, cudaStream_t stream);
cudaError_t dwconv_split_dw_splits(int64_t B, int64_t d, int64_t H, int64_t W, int64_t k,
                                   int dtype, int device, int64_t* splits);
int64_t dwconv_split_max_k();
int64_t dwconv_split_tiles(int64_t H, int64_t W, int64_t k, int kind);
int64_t dwconv_split_channel_tile();
int64_t attention_padded_head_dim(int64_t hd);
int64_t attention_row_block();
cudaError_t attention_fits(int64_t hdp, int device, bool* fits);
cudaError_t attention_prep_launch(const void* q, const int64_t* sq, const void* k,
                                  const int64_t* sk, const float* table, const float* scale,
                                  float* qh, float* kh, int64_t G, int64_t heads, int64_t n,
                                  int64_t hd, int64_t hdp, int dtype, cudaStream_t stream);
cudaError_t attention_post_launch(const void* q, const int64_t* sq, const void* k,
                                  const int64_t* sk, const float* table, const float* scale,
                                  const float* dqh, const float* dkh, void* dq,
                                  const int64_t* sdq, void* dk, const int64_t* sdk, int64_t G,
                                  int64_t heads, int64_t n, int64_t hd, int64_t hdp, int dtype,
                                  cudaStream_t stream);
cudaError_t attention_fwd_launch(const float* qh, const float* kh, const void* v,
                                 const int64_t* sv, void* out, const int64_t* so, int merge,
                                 int64_t gw, const void* dout, float* lse, float* delta,
                                 int64_t G, int64_t heads, int64_t n, int64_t hd, int64_t hdp,
                                 bool store_o, bool stats, int dtype, cudaStream_t stream);
cudaError_t attention_bwd_launch(const float* qh, const float* kh, const void* v,
                                 const int64_t* sv, const void* dout, const int64_t* so,
                                 int merge, int64_t gw, const float* lse, const float* delta,
                                 float* dqh, float* dkh, float* dlogit, void* dv,
                                 const int64_t* sdv, int64_t G, int64_t heads, int64_t n,
                                 int64_t hd, int64_t hdp, int dtype, cudaStream_t stream);

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
// dtype: the rows' (x and the other (B, L, D) tensors but y and dy); cond_dtype: y's, the (B, D)
// vectors' and their gradients', equal to dtype or, with float32 rows, float16 or bfloat16.
bool check_adaln(const char* op, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                 int cond_dtype, int device) {
  for (const int code : {dtype, cond_dtype}) {
    if (!valid_dtype(code)) {
      throw invalid_argument(op, "unknown dtype code " + std::to_string(code) +
                                     " (expected 0=float32, 1=float16, 2=bfloat16)");
    }
  }
  if (cond_dtype != dtype && dtype != kFloat32) {
    throw invalid_argument(op, "cond_dtype " + std::to_string(cond_dtype) +
                                   " differs from dtype " + std::to_string(dtype) +
                                   ": only float32 rows (dtype 0) take float16 or bfloat16 "
                                   "y and (B, D) vectors");
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

// Channels-first images: 32-bit token indices, the (sample, tile) blocks of one launch, and
// channel counters of 32 bits that run up to 127 past D.
void check_channels_first(const char* op, int64_t B, int64_t L, int64_t D) {
  if (D > INT_MAX - 128) {
    throw invalid_argument(op, "channels-first D must be <= 2^31 - 129, got " + std::to_string(D));
  }
  if (L >= (int64_t{1} << 31)) {
    throw invalid_argument(op, "L must be < 2^31, got " + std::to_string(L));
  }
  if (B > 0 && L > 0 && B > INT_MAX / adaln_cf_tiles(L)) {
    throw invalid_argument(op, "B * ceil(L / 32) must be < 2^31 (channels-first blocks), got B=" +
                                   std::to_string(B) + ", L=" + std::to_string(L));
  }
}

// The backward's extra limits: D held in registers, 32-bit row indices within a sample, and
// the (sample, split) blocks of one launch. Channels-first: any D, and splits = the tiles.
void check_backward(const char* op, int64_t B, int64_t L, int64_t D, int64_t splits,
                    bool channels_first) {
  if (channels_first) {
    check_channels_first(op, B, L, D);
    if (B > 0 && L > 0 && splits != adaln_cf_tiles(L)) {
      throw invalid_argument(op, "channels-first splits must be ceil(L / 32) = " +
                                     std::to_string(adaln_cf_tiles(L)) + " (adaln_bwd_splits), got " +
                                     std::to_string(splits));
    }
    return;
  }
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
                        int cond_dtype, int device, std::uintptr_t stream, bool channels_first) {
  constexpr const char* op = "adaln_modulate_fwd";
  if (!check_adaln(op, B, L, D, eps, dtype, cond_dtype, device)) return;
  if (channels_first) check_channels_first(op, B, L, D);
  check_pointers(op, {x, shift, scale, out}, "x, shift, scale and out");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_modulate_fwd_launch(
      cptr(x), cptr(shift), cptr(scale), mptr(out), B, L, D, static_cast<float>(eps), dtype,
      cond_dtype, channels_first, reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_gated_fwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate,
                     std::uintptr_t shift, std::uintptr_t scale, std::uintptr_t r,
                     std::uintptr_t out, int64_t B, int64_t L, int64_t D, double eps, int dtype,
                     int cond_dtype, int device, std::uintptr_t stream, bool channels_first) {
  constexpr const char* op = "adaln_gated_fwd";
  if (!check_adaln(op, B, L, D, eps, dtype, cond_dtype, device)) return;
  if (channels_first) check_channels_first(op, B, L, D);
  check_pointers(op, {x, y, gate, shift, scale, r, out}, "x, y, gate, shift, scale, r and out");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_gated_fwd_launch(
      cptr(x), cptr(y), cptr(gate), cptr(shift), cptr(scale), mptr(r), mptr(out), B, L, D,
      static_cast<float>(eps), dtype, cond_dtype, channels_first,
      reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_modulate_bwd(std::uintptr_t x, std::uintptr_t scale, std::uintptr_t dout,
                        std::uintptr_t dx, std::uintptr_t dshift, std::uintptr_t dscale,
                        std::uintptr_t partial, int64_t B, int64_t L, int64_t D, int64_t splits,
                        double eps, int dtype, int cond_dtype, int device, std::uintptr_t stream,
                        bool channels_first) {
  constexpr const char* op = "adaln_modulate_bwd";
  const bool work = check_adaln(op, B, L, D, eps, dtype, cond_dtype, device);
  check_backward(op, B, L, D, splits, channels_first);
  if (!work) return;
  check_pointers(op, {x, scale, dout, dx, dshift, dscale, partial},
                 "x, scale, dout, dx, dshift, dscale and partial");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_modulate_bwd_launch(
      cptr(x), cptr(scale), cptr(dout), mptr(dx), mptr(dshift), mptr(dscale), mptr(partial), B,
      L, D, splits, static_cast<float>(eps), dtype, cond_dtype, channels_first,
      reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

void adaln_gated_bwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate,
                     std::uintptr_t scale, std::uintptr_t dr, std::uintptr_t dout,
                     std::uintptr_t dx, std::uintptr_t dy, std::uintptr_t dgate,
                     std::uintptr_t dshift, std::uintptr_t dscale, std::uintptr_t partial,
                     int64_t B, int64_t L, int64_t D, int64_t splits, double eps, int dtype,
                     int cond_dtype, int device, std::uintptr_t stream, bool channels_first) {
  constexpr const char* op = "adaln_gated_bwd";
  const bool work = check_adaln(op, B, L, D, eps, dtype, cond_dtype, device);
  check_backward(op, B, L, D, splits, channels_first);
  if (!work) return;
  check_pointers(op, {x, y, gate, scale, dr, dout, dx, dy, dgate, dshift, dscale, partial},
                 "x, y, gate, scale, dr, dout, dx, dy, dgate, dshift, dscale and partial");
  DeviceGuard guard(device, op);
  const cudaError_t err = adaln_gated_bwd_launch(
      cptr(x), cptr(y), cptr(gate), cptr(scale), cptr(dr), cptr(dout), mptr(dx), mptr(dy),
      mptr(dgate), mptr(dshift), mptr(dscale), mptr(partial), B, L, D, splits,
      static_cast<float>(eps), dtype, cond_dtype, channels_first,
      reinterpret_cast<cudaStream_t>(stream));
  FASTDIT_CUDA_CHECK(op, err);
}

int64_t adaln_bwd_splits_py(int64_t B, int64_t L, int64_t D, int dtype, bool gated,
                            int device, bool channels_first) {
  constexpr const char* op = "adaln_bwd_splits";
  if (!check_adaln(op, B, L, D, 0.0, dtype, dtype, device)) {
    throw invalid_argument(op, "B and L must be >= 1, got B=" + std::to_string(B) +
                                   ", L=" + std::to_string(L));
  }
  if (channels_first) {
    check_channels_first(op, B, L, D);
    return adaln_cf_tiles(L);
  }
  check_backward(op, B, L, D, 1, false);
  DeviceGuard guard(device, op);
  int64_t splits = 1;
  FASTDIT_CUDA_CHECK(op, adaln_bwd_splits(B, L, D, dtype, gated, device, &splits));
  return splits;
}

// ---------------------------------------------------------------------------------------------
// The patchify family (patchify.cu). Images are (B, C, H, W) with H, W multiples of the patch
// size p, tokens (B, N, K) with N = (H/p) * (W/p) and K = C*p*p; images and tokens come with
// element strides (any layout). The kernels index rows of B*N, the grid and the staging tiles
// with 32-bit integers, offsets with 64-bit ones: checked here.

constexpr int64_t kPatchEmbedMaxD = int64_t{1} << 20;
constexpr int64_t kPatchEmbedMaxK = int64_t{1} << 16;
constexpr int64_t kInt32Limit = int64_t{1} << 31;

void check_dtype_device(const char* op, int dtype, int device) {
  if (!valid_dtype(dtype)) {
    throw invalid_argument(op, "unknown dtype code " + std::to_string(dtype) +
                                   " (expected 0=float32, 1=float16, 2=bfloat16)");
  }
  if (device < 0) throw invalid_argument(op, "device must be >= 0, got " + std::to_string(device));
}

// B >= 0, C >= 1, 1 <= p, H and W non-negative multiples of p, K = C*p*p <= max_k, and the
// 32-bit index ranges. False when there is no work (B, H or W is 0).
bool check_image(const char* op, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p,
                 int64_t max_k) {
  if (B < 0) throw invalid_argument(op, "B must be >= 0, got " + std::to_string(B));
  if (C < 1) throw invalid_argument(op, "C must be >= 1, got " + std::to_string(C));
  if (p < 1) throw invalid_argument(op, "patch_size must be >= 1, got " + std::to_string(p));
  if (p > max_k || C > max_k / (p * p)) {
    throw invalid_argument(op, "C * patch_size**2 must be <= " + std::to_string(max_k) +
                                   ", got C=" + std::to_string(C) +
                                   ", patch_size=" + std::to_string(p));
  }
  if (H < 0 || W < 0 || H % p != 0 || W % p != 0) {
    throw invalid_argument(op, "H and W must be non-negative multiples of patch_size=" +
                                   std::to_string(p) + ", got H=" + std::to_string(H) +
                                   ", W=" + std::to_string(W));
  }
  if (H >= kInt32Limit || W >= kInt32Limit) {
    throw invalid_argument(op, "H and W must be < 2^31");
  }
  const int64_t N = (H / p) * (W / p);
  if (B > 0 && N > 0 && B > (kInt32Limit - 1) / N) {  // B * N < 2^31
    throw invalid_argument(op, "B * (H/p) * (W/p) (the number of tokens) must be < 2^31, got B=" +
                                   std::to_string(B) + ", N=" + std::to_string(N));
  }
  return B > 0 && N > 0;
}

// `strides` has one entry >= 0 per size, and every element offset fits in int64.
void check_strides(const char* op, const char* name, const std::vector<int64_t>& strides,
                   std::initializer_list<int64_t> sizes) {
  if (strides.size() != sizes.size()) {
    throw invalid_argument(op, std::string(name) + " must hold " + std::to_string(sizes.size()) +
                                   " strides, got " + std::to_string(strides.size()));
  }
  int64_t last = 0;
  size_t i = 0;
  for (const int64_t size : sizes) {
    const int64_t stride = strides[i++];
    if (stride < 0) {
      throw invalid_argument(op, std::string(name) + " must be >= 0, got " +
                                     std::to_string(stride));
    }
    if (size > 1 && stride > 0) {
      if (size - 1 > (INT64_MAX - last) / stride) {
        throw invalid_argument(op, std::string("the element offsets of ") + name +
                                       " overflow int64");
      }
      last += (size - 1) * stride;
    }
  }
}

void permute_entry(const char* op, bool to_tokens, std::uintptr_t src,
                   const std::vector<int64_t>& src_strides, std::uintptr_t dst,
                   const std::vector<int64_t>& dst_strides, int64_t B, int64_t C, int64_t H,
                   int64_t W, int64_t p, int order, int dtype, int device, std::uintptr_t stream) {
  check_dtype_device(op, dtype, device);
  const bool work = check_image(op, B, C, H, W, p, patchify_max_k());
  if (order != 0 && order != 1) {
    throw invalid_argument(op, "order must be 0 (cpq) or 1 (pqc), got " + std::to_string(order));
  }
  const int64_t N = (H / p) * (W / p), K = C * p * p;
  const std::vector<int64_t>& image = to_tokens ? src_strides : dst_strides;
  const std::vector<int64_t>& tokens = to_tokens ? dst_strides : src_strides;
  check_strides(op, to_tokens ? "x_strides" : "out_strides", image, {B, C, H, W});
  check_strides(op, to_tokens ? "out_strides" : "tokens_strides", tokens, {B, N, K});
  if (!work) return;
  check_pointers(op, {src, dst}, to_tokens ? "x and out" : "tokens and out");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, permute_launch(cptr(src), mptr(dst), image.data(), tokens.data(),
                                        to_tokens, B, C, H, W, p, order, dtype,
                                        reinterpret_cast<cudaStream_t>(stream)));
}

void patchify_entry(std::uintptr_t x, std::vector<int64_t> x_strides, std::uintptr_t out,
                    std::vector<int64_t> out_strides, int64_t B, int64_t C, int64_t H, int64_t W,
                    int64_t patch_size, int order, int dtype, int device, std::uintptr_t stream) {
  permute_entry("patchify", true, x, x_strides, out, out_strides, B, C, H, W, patch_size, order,
                dtype, device, stream);
}

void unpatchify_entry(std::uintptr_t tokens, std::vector<int64_t> tokens_strides,
                      std::uintptr_t out, std::vector<int64_t> out_strides, int64_t B, int64_t C,
                      int64_t H, int64_t W, int64_t patch_size, int order, int dtype, int device,
                      std::uintptr_t stream) {
  permute_entry("unpatchify", false, tokens, tokens_strides, out, out_strides, B, C, H, W,
                patch_size, order, dtype, device, stream);
}

void check_embed_dim(const char* op, int64_t D, int64_t max_d) {
  if (D < 1 || D > max_d) {
    throw invalid_argument(op, "D must be in [1, " + std::to_string(max_d) + "], got " +
                                   std::to_string(D));
  }
}

void patch_embed_fwd(std::uintptr_t x, std::vector<int64_t> x_strides, std::uintptr_t weight,
                     std::uintptr_t bias, std::uintptr_t pos, std::uintptr_t out, int64_t B,
                     int64_t C, int64_t H, int64_t W, int64_t patch_size, int64_t D, int dtype,
                     int device, std::uintptr_t stream) {
  constexpr const char* op = "patch_embed_fwd";
  check_dtype_device(op, dtype, device);
  const bool work = check_image(op, B, C, H, W, patch_size, kPatchEmbedMaxK);
  check_embed_dim(op, D, kPatchEmbedMaxD);
  check_strides(op, "x_strides", x_strides, {B, C, H, W});
  if (!work) return;
  check_pointers(op, {x, weight, bias, pos, out}, "x, weight, bias, pos_embed and out");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, patch_embed_fwd_launch(cptr(x), x_strides.data(), cptr(weight),
                                                cptr(bias), cptr(pos), mptr(out), B, C, H, W,
                                                patch_size, D, dtype,
                                                reinterpret_cast<cudaStream_t>(stream)));
}

void patch_embed_bwd(std::uintptr_t x, std::vector<int64_t> x_strides, std::uintptr_t weight,
                     std::uintptr_t dout, std::uintptr_t dx, std::vector<int64_t> dx_strides,
                     std::uintptr_t dweight_partial, std::uintptr_t dpos_partial, int64_t B,
                     int64_t C, int64_t H, int64_t W, int64_t patch_size, int64_t D,
                     int64_t splits, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "patch_embed_bwd";
  check_dtype_device(op, dtype, device);
  const bool work = check_image(op, B, C, H, W, patch_size, kPatchEmbedMaxK);
  check_embed_dim(op, D, kPatchEmbedMaxD);
  check_strides(op, "x_strides", x_strides, {B, C, H, W});
  check_strides(op, "dx_strides", dx_strides, {B, C, H, W});
  if (splits < 1 || (work && splits > B)) {
    throw invalid_argument(op, "splits must be in [1, B=" + std::to_string(B) + "], got " +
                                   std::to_string(splits));
  }
  if (!work) return;
  check_pointers(op, {x, weight, dout, dx, dweight_partial, dpos_partial},
                 "x, weight, dout, dx, dweight_partial and dpos_partial");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, patch_embed_bwd_launch(
                             cptr(x), x_strides.data(), cptr(weight), cptr(dout), mptr(dx),
                             dx_strides.data(), mptr(dweight_partial), mptr(dpos_partial), B, C,
                             H, W, patch_size, D, splits, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
}

std::tuple<int64_t, int64_t> patch_embed_bwd_plan(int64_t B, int64_t C, int64_t H, int64_t W,
                                                  int64_t patch_size, int64_t D, int dtype,
                                                  int device) {
  constexpr const char* op = "patch_embed_bwd_plan";
  check_dtype_device(op, dtype, device);
  if (!check_image(op, B, C, H, W, patch_size, kPatchEmbedMaxK)) {
    throw invalid_argument(op, "B, H and W must be >= 1 (there is no work to plan)");
  }
  check_embed_dim(op, D, kPatchEmbedMaxD);
  const int64_t N = (H / patch_size) * (W / patch_size);
  DeviceGuard guard(device, op);
  int64_t splits = 1;
  FASTDIT_CUDA_CHECK(op, patch_embed_bwd_splits(B, N, D, C * patch_size * patch_size, dtype,
                                                device, &splits));
  const int64_t tile = patchify_weight_tile();
  return {splits, splits * ((N + tile - 1) / tile)};
}

// final_layer: x (B, N, D) with N = h * w, shift / scale (B, D), weight (K, D) with
// K = p*p*C, output image (B, C, h*p, w*p).
bool check_final(const char* op, int64_t B, int64_t C, int64_t h, int64_t w, int64_t p,
                 int64_t D, double eps, int dtype, int device) {
  check_dtype_device(op, dtype, device);
  if (h < 0 || w < 0 || h >= kInt32Limit || w >= kInt32Limit) {
    throw invalid_argument(op, "h and w must be in [0, 2^31), got h=" + std::to_string(h) +
                                   ", w=" + std::to_string(w));
  }
  const int64_t max_k = final_layer_max_k();
  // (the image is (B, C, h*p, w*p); a p out of range raises before h*p is formed)
  const bool p_ok = p >= 1 && p <= max_k;
  check_image(op, B, C, p_ok ? h * p : 0, p_ok ? w * p : 0, p, max_k);
  check_embed_dim(op, D, final_layer_max_d());
  if (!(eps >= 0.0) || !std::isfinite(eps)) {
    throw invalid_argument(op, "eps must be finite and >= 0, got " + std::to_string(eps));
  }
  return B > 0 && h > 0 && w > 0;
}

void final_layer_fwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                     std::uintptr_t weight_t, std::uintptr_t bias, std::uintptr_t out,
                     std::vector<int64_t> out_strides, int64_t B, int64_t C, int64_t h,
                     int64_t w, int64_t patch_size, int64_t D, double eps, int dtype, int device,
                     std::uintptr_t stream) {
  constexpr const char* op = "final_layer_fwd";
  const bool work = check_final(op, B, C, h, w, patch_size, D, eps, dtype, device);
  check_strides(op, "out_strides", out_strides, {B, C, h * patch_size, w * patch_size});
  if (!work) return;
  check_pointers(op, {x, shift, scale, weight_t, bias, out},
                 "x, shift, scale, weight_t, bias and out");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, final_layer_fwd_launch(cptr(x), cptr(shift), cptr(scale),
                                                cptr(weight_t), cptr(bias), mptr(out),
                                                out_strides.data(), B, C, h, w, patch_size, D,
                                                static_cast<float>(eps), dtype,
                                                reinterpret_cast<cudaStream_t>(stream)));
}

void final_layer_bwd(std::uintptr_t x, std::uintptr_t shift, std::uintptr_t scale,
                     std::uintptr_t weight, std::uintptr_t dout,
                     std::vector<int64_t> dout_strides, std::uintptr_t dx, std::uintptr_t stats,
                     std::uintptr_t dmod_partial, std::uintptr_t dweight_partial,
                     std::uintptr_t dbias_partial, int64_t B, int64_t C, int64_t h, int64_t w,
                     int64_t patch_size, int64_t D, double eps, int64_t row_splits,
                     int64_t weight_splits, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "final_layer_bwd";
  const bool work = check_final(op, B, C, h, w, patch_size, D, eps, dtype, device);
  check_strides(op, "dout_strides", dout_strides, {B, C, h * patch_size, w * patch_size});
  const int64_t N = h * w;
  if (row_splits < 1 || (work && (row_splits > N || B > INT_MAX / row_splits))) {
    throw invalid_argument(op, "row_splits must be in [1, N=" + std::to_string(N) +
                                   "] with B * row_splits < 2^31, got " +
                                   std::to_string(row_splits));
  }
  if (weight_splits < 1 || (work && weight_splits > B)) {
    throw invalid_argument(op, "weight_splits must be in [1, B=" + std::to_string(B) +
                                   "], got " + std::to_string(weight_splits));
  }
  if (!work) return;
  check_pointers(op, {x, shift, scale, weight, dout, dx, stats, dmod_partial, dweight_partial,
                      dbias_partial},
                 "x, shift, scale, weight, dout, dx, stats, dmod_partial, dweight_partial and "
                 "dbias_partial");
  if (D > final_layer_bwd_max_scalar_d() &&
      !final_layer_bwd_vec4(dtype, D, cptr(x), cptr(dx), cptr(scale), cptr(weight))) {
    throw invalid_argument(op, "D > " + std::to_string(final_layer_bwd_max_scalar_d()) +
                                   " needs D % 4 == 0 and x, dx, scale and weight aligned to 4 "
                                   "elements, got D=" + std::to_string(D));
  }
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, final_layer_bwd_launch(
                             cptr(x), cptr(shift), cptr(scale), cptr(weight), cptr(dout),
                             dout_strides.data(), mptr(dx), mptr(stats), mptr(dmod_partial),
                             mptr(dweight_partial), mptr(dbias_partial), B, C, h, w, patch_size,
                             D, static_cast<float>(eps), row_splits, weight_splits, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
}

std::tuple<int64_t, int64_t, int64_t> final_layer_bwd_plan(int64_t B, int64_t C, int64_t h,
                                                           int64_t w, int64_t patch_size,
                                                           int64_t D, int dtype, int device) {
  constexpr const char* op = "final_layer_bwd_plan";
  if (!check_final(op, B, C, h, w, patch_size, D, 0.0, dtype, device)) {
    throw invalid_argument(op, "B, h and w must be >= 1 (there is no work to plan)");
  }
  DeviceGuard guard(device, op);
  int64_t rows = 1, weights = 1;
  FASTDIT_CUDA_CHECK(op, final_layer_bwd_splits(B, h * w, D, C * patch_size * patch_size, dtype,
                                                device, &rows, &weights));
  const int64_t tile = patchify_weight_tile();
  return {rows, weights, weights * ((h * w + tile - 1) / tile)};
}

// ---------------------------------------------------------------------------------------------
// The downsampled_attention family (downsampled_attention.cu): U-DiT's depthwise conv + polyphase
// split. x and dx are images (B, d, H, W) given by element strides (any layout), H and W even;
// t and dt are (B, 4, n, d) contiguous with n = (H/2) * (W/2); the depthwise weight (d, 1, k, k)
// and bias (d,) are contiguous, k odd <= DWCONV_MAX_K. The kernels index the pixels of one image
// with 32-bit integers and memory with 64-bit offsets, on a 1-D grid of < 2^31 blocks.

constexpr int64_t kDwconvSideLimit = int64_t{1} << 30;

// dtype, device, B >= 0, 1 <= d < 2^31, H and W even in [0, 2^30] with H * W < 2^31, k odd in
// [1, DWCONV_MAX_K], and the tokens' offsets inside int64. False when there is no work.
bool check_dwconv(const char* op, int64_t B, int64_t d, int64_t H, int64_t W, int64_t k,
                  int dtype, int device) {
  check_dtype_device(op, dtype, device);
  if (B < 0) throw invalid_argument(op, "B must be >= 0, got " + std::to_string(B));
  if (d < 1 || d > INT_MAX) {
    throw invalid_argument(op, "d must be in [1, " + std::to_string(INT_MAX) + "], got " +
                                   std::to_string(d));
  }
  if (H < 0 || W < 0 || H % 2 != 0 || W % 2 != 0 || H > kDwconvSideLimit ||
      W > kDwconvSideLimit) {
    throw invalid_argument(op, "H and W must be even, in [0, 2^30], got H=" + std::to_string(H) +
                                   ", W=" + std::to_string(W));
  }
  if (H > 0 && W > 0 && H * W >= kInt32Limit) {
    throw invalid_argument(op, "H * W must be < 2^31, got H=" + std::to_string(H) +
                                   ", W=" + std::to_string(W));
  }
  const int64_t max_k = dwconv_split_max_k();
  if (k < 1 || k % 2 == 0 || k > max_k) {
    throw invalid_argument(op, "k (the depthwise kernel size) must be odd, in [1, " +
                                   std::to_string(max_k) + "], got " + std::to_string(k));
  }
  const int64_t pixels = H * W;  // = 4 n
  if (B > 0 && pixels > 0 && B > INT64_MAX / (pixels * d)) {
    throw invalid_argument(op, "B * H * W * d overflows int64");
  }
  return B > 0 && pixels > 0;
}

// B * ceil(d / 32) * per_sample blocks (per_sample: tiles or splits) must be < 2^31.
void check_dwconv_blocks(const char* op, int64_t B, int64_t d, int64_t per_sample) {
  const int64_t ct = dwconv_split_channel_tile();
  const int64_t per_b = (d + ct - 1) / ct * per_sample;
  if (per_b >= kInt32Limit || B >= kInt32Limit / per_b) {
    throw invalid_argument(op, "too many blocks: B * ceil(d / " + std::to_string(ct) +
                                   ") * " + std::to_string(per_sample) +
                                   " (tiles or splits) must be < 2^31, got B=" +
                                   std::to_string(B) + ", d=" + std::to_string(d));
  }
}

void dwconv_split_entry(std::uintptr_t x, std::vector<int64_t> x_strides, std::uintptr_t weight,
                        std::uintptr_t bias, std::uintptr_t t, int64_t B, int64_t d, int64_t H,
                        int64_t W, int64_t k, bool shortcut, int dtype, int device,
                        std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_dwconv_split";
  const bool work = check_dwconv(op, B, d, H, W, k, dtype, device);
  check_strides(op, "x_strides", x_strides, {B, d, H, W});
  if (!work) return;
  check_dwconv_blocks(op, B, d, dwconv_split_tiles(H, W, k, 0));
  check_pointers(op, {x, weight, bias, t}, "x, weight, bias and t");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, dwconv_split_fwd_launch(cptr(x), x_strides.data(), cptr(weight),
                                                 cptr(bias), mptr(t), B, d, H, W, k, shortcut,
                                                 dtype, reinterpret_cast<cudaStream_t>(stream)));
}

void dwconv_split_dx_entry(std::uintptr_t weight, std::uintptr_t dt, std::uintptr_t dx,
                           std::vector<int64_t> dx_strides, int64_t B, int64_t d, int64_t H,
                           int64_t W, int64_t k, bool shortcut, int dtype, int device,
                           std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_dwconv_split_dx";
  const bool work = check_dwconv(op, B, d, H, W, k, dtype, device);
  check_strides(op, "dx_strides", dx_strides, {B, d, H, W});
  if (!work) return;
  check_dwconv_blocks(op, B, d, dwconv_split_tiles(H, W, k, 1));
  check_pointers(op, {weight, dt, dx}, "weight, dt and dx");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, dwconv_split_dx_launch(cptr(weight), cptr(dt), mptr(dx),
                                                dx_strides.data(), B, d, H, W, k, shortcut,
                                                dtype, reinterpret_cast<cudaStream_t>(stream)));
}

void dwconv_split_dw_entry(std::uintptr_t x, std::vector<int64_t> x_strides, std::uintptr_t dt,
                           std::uintptr_t partial, int64_t B, int64_t d, int64_t H, int64_t W,
                           int64_t k, int64_t splits, int dtype, int device,
                           std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_dwconv_split_dw";
  const bool work = check_dwconv(op, B, d, H, W, k, dtype, device);
  check_strides(op, "x_strides", x_strides, {B, d, H, W});
  const int64_t tiles = work ? dwconv_split_tiles(H, W, k, 2) : 0;
  if (splits < 1 || (work && splits > tiles)) {
    throw invalid_argument(op, "splits must be in [1, " + std::to_string(tiles) +
                                   "] (the tiles of the image), got " + std::to_string(splits));
  }
  if (!work) return;
  check_dwconv_blocks(op, B, d, splits);
  check_pointers(op, {x, dt, partial}, "x, dt and partial");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, dwconv_split_dw_launch(cptr(x), x_strides.data(), cptr(dt),
                                                mptr(partial), B, d, H, W, k, splits, dtype,
                                                reinterpret_cast<cudaStream_t>(stream)));
}

int64_t dwconv_split_dw_plan(int64_t B, int64_t d, int64_t H, int64_t W, int64_t k, int dtype,
                             int device) {
  constexpr const char* op = "downsampled_attention_dwconv_split_dw_plan";
  if (!check_dwconv(op, B, d, H, W, k, dtype, device)) {
    throw invalid_argument(op, "B, H and W must be >= 1 (there is no work to plan)");
  }
  DeviceGuard guard(device, op);
  int64_t splits = 1;
  FASTDIT_CUDA_CHECK(op, dwconv_split_dw_splits(B, d, H, W, k, dtype, device, &splits));
  check_dwconv_blocks(op, B, d, splits);
  return splits;
}

// ---------------------------------------------------------------------------------------------
// The attention within the groups (downsampled_attention.cu, part 2). G * heads problems of n
// tokens and head dim hd (even, <= 128); q, k, v and their gradients are (G, heads, n, hd) given
// by their (group, head, token) element strides with unit channel stride; q^ and k^ and their
// gradients are fp32 (G, heads, n, hdp) contiguous scratch, hdp = padded_head_dim(hd); the
// output (and its gradient) is either a (G, heads, n, hd) tensor (merge = 0, strides of its 4
// dims) or the merged (G / 4, heads * hd, 2 gh, 2 gw) image (merge = 1, its 4 strides, gw the
// group grid's width). table: (2, n, hd / 2) fp32 cos, sin (0: no RoPE); scale: (heads,) fp32
// (0: plain attention, hd^-0.5).

// False when there is no work (G, heads or n == 0).
bool check_attention(const char* op, int64_t G, int64_t heads, int64_t n, int64_t hd,
                     int64_t hdp, int dtype, int device) {
  check_dtype_device(op, dtype, device);
  if (G < 0 || heads < 0 || n < 0) {
    throw invalid_argument(op, "G, heads and n must be >= 0, got G=" + std::to_string(G) +
                                   ", heads=" + std::to_string(heads) + ", n=" + std::to_string(n));
  }
  if (hd < 2 || hd % 2 != 0 || attention_padded_head_dim(hd) < 0) {
    throw invalid_argument(op, "hd must be even, in [2, 128], got " + std::to_string(hd));
  }
  if (hdp != attention_padded_head_dim(hd)) {
    throw invalid_argument(op, "hdp must be downsampled_attention_padded_head_dim(hd) = " +
                                   std::to_string(attention_padded_head_dim(hd)) + ", got " +
                                   std::to_string(hdp));
  }
  if (G == 0 || heads == 0 || n == 0) return false;
  if (G > INT64_MAX / heads || G * heads >= kInt32Limit) {
    throw invalid_argument(op, "G * heads must be < 2^31 (one block row per problem)");
  }
  if ((n + attention_row_block() - 1) / attention_row_block() > 65535) {  // a grid's y extent
    throw invalid_argument(op, "n must be <= 65535 * " + std::to_string(attention_row_block()) +
                                   ", got " + std::to_string(n));
  }
  if (G * heads > INT64_MAX / (2 * n * hdp)) {
    throw invalid_argument(op, "G * heads * n * hdp overflows int64");
  }
  return true;
}

void check_rows(const char* op, const char* name, const std::vector<int64_t>& strides,
                int64_t G, int64_t heads, int64_t n) {
  check_strides(op, name, strides, {G, heads, n});
}

void check_out_layout(const char* op, const std::vector<int64_t>& strides, int merge, int64_t gw,
                      int64_t G, int64_t heads, int64_t n, int64_t hd) {
  if (merge == 0) {
    check_strides(op, "out_strides", strides, {G, heads, n, hd});
    return;
  }
  if (merge != 1) throw invalid_argument(op, "merge must be 0 or 1, got " + std::to_string(merge));
  if (G % 4 != 0 || gw < 1 || n % gw != 0) {
    throw invalid_argument(op, "a merge needs G a multiple of 4 and n a multiple of gw >= 1, got "
                               "G=" + std::to_string(G) + ", n=" + std::to_string(n) +
                               ", gw=" + std::to_string(gw));
  }
  check_strides(op, "out_strides", strides, {G / 4, heads * hd, 2 * (n / gw), 2 * gw});
}

bool attention_fits_entry(int64_t hd, int device) {
  constexpr const char* op = "downsampled_attention_fits";
  const int64_t hdp = attention_padded_head_dim(hd);
  if (hd < 2 || hd % 2 != 0 || hdp < 0) {
    throw invalid_argument(op, "hd must be even, in [2, 128], got " + std::to_string(hd));
  }
  if (device < 0) throw invalid_argument(op, "device must be >= 0, got " + std::to_string(device));
  DeviceGuard guard(device, op);
  bool fits = false;
  FASTDIT_CUDA_CHECK(op, attention_fits(hdp, device, &fits));
  return fits;
}

void attention_prep_entry(std::uintptr_t q, std::vector<int64_t> q_strides, std::uintptr_t k,
                          std::vector<int64_t> k_strides, std::uintptr_t table,
                          std::uintptr_t scale, std::uintptr_t qh, std::uintptr_t kh, int64_t G,
                          int64_t heads, int64_t n, int64_t hd, int64_t hdp, int dtype,
                          int device, std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_prep";
  const bool work = check_attention(op, G, heads, n, hd, hdp, dtype, device);
  check_rows(op, "q_strides", q_strides, G, heads, n);
  check_rows(op, "k_strides", k_strides, G, heads, n);
  if (!work) return;
  check_pointers(op, {q, k, qh, kh}, "q, k, qh and kh");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, attention_prep_launch(
                             cptr(q), q_strides.data(), cptr(k), k_strides.data(),
                             reinterpret_cast<const float*>(table),
                             reinterpret_cast<const float*>(scale), reinterpret_cast<float*>(qh),
                             reinterpret_cast<float*>(kh), G, heads, n, hd, hdp, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
}

void attention_fwd_entry(std::uintptr_t qh, std::uintptr_t kh, std::uintptr_t v,
                         std::vector<int64_t> v_strides, std::uintptr_t out,
                         std::vector<int64_t> out_strides, int merge, int64_t gw,
                         std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t delta,
                         bool store_o, bool stats, int64_t G, int64_t heads, int64_t n,
                         int64_t hd, int64_t hdp, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_fwd";
  const bool work = check_attention(op, G, heads, n, hd, hdp, dtype, device);
  check_rows(op, "v_strides", v_strides, G, heads, n);
  check_out_layout(op, out_strides, merge, gw, G, heads, n, hd);
  if (!store_o && !stats) throw invalid_argument(op, "nothing to do: store_o and stats are off");
  if (!work) return;
  check_pointers(op, {qh, kh, v}, "qh, kh and v");
  if (store_o) check_pointers(op, {out}, "out (store_o)");
  if (stats) check_pointers(op, {dout, lse, delta}, "dout, lse and delta (stats)");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, attention_fwd_launch(
                             reinterpret_cast<const float*>(qh),
                             reinterpret_cast<const float*>(kh), cptr(v), v_strides.data(),
                             mptr(out), out_strides.data(), merge, gw, cptr(dout),
                             reinterpret_cast<float*>(lse), reinterpret_cast<float*>(delta), G,
                             heads, n, hd, hdp, store_o, stats, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
}

void attention_bwd_entry(std::uintptr_t qh, std::uintptr_t kh, std::uintptr_t v,
                         std::vector<int64_t> v_strides, std::uintptr_t dout,
                         std::vector<int64_t> dout_strides, int merge, int64_t gw,
                         std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t dqh,
                         std::uintptr_t dkh, std::uintptr_t dlogit, std::uintptr_t dv,
                         std::vector<int64_t> dv_strides, int64_t G, int64_t heads, int64_t n,
                         int64_t hd, int64_t hdp, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_bwd";
  const bool work = check_attention(op, G, heads, n, hd, hdp, dtype, device);
  check_rows(op, "v_strides", v_strides, G, heads, n);
  check_rows(op, "dv_strides", dv_strides, G, heads, n);
  check_out_layout(op, dout_strides, merge, gw, G, heads, n, hd);
  if (!work) return;
  check_pointers(op, {qh, kh, v, dout, lse, delta, dqh, dkh, dlogit, dv},
                 "qh, kh, v, dout, lse, delta, dqh, dkh, dlogit and dv");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, attention_bwd_launch(
                             reinterpret_cast<const float*>(qh),
                             reinterpret_cast<const float*>(kh), cptr(v), v_strides.data(),
                             cptr(dout), dout_strides.data(), merge, gw,
                             reinterpret_cast<const float*>(lse),
                             reinterpret_cast<const float*>(delta), reinterpret_cast<float*>(dqh),
                             reinterpret_cast<float*>(dkh), reinterpret_cast<float*>(dlogit),
                             mptr(dv), dv_strides.data(), G, heads, n, hd, hdp, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
}

void attention_post_entry(std::uintptr_t q, std::vector<int64_t> q_strides, std::uintptr_t k,
                          std::vector<int64_t> k_strides, std::uintptr_t table,
                          std::uintptr_t scale, std::uintptr_t dqh, std::uintptr_t dkh,
                          std::uintptr_t dq, std::vector<int64_t> dq_strides, std::uintptr_t dk,
                          std::vector<int64_t> dk_strides, int64_t G, int64_t heads, int64_t n,
                          int64_t hd, int64_t hdp, int dtype, int device, std::uintptr_t stream) {
  constexpr const char* op = "downsampled_attention_post";
  const bool work = check_attention(op, G, heads, n, hd, hdp, dtype, device);
  check_rows(op, "q_strides", q_strides, G, heads, n);
  check_rows(op, "k_strides", k_strides, G, heads, n);
  check_rows(op, "dq_strides", dq_strides, G, heads, n);
  check_rows(op, "dk_strides", dk_strides, G, heads, n);
  if (!work) return;
  check_pointers(op, {q, k, dqh, dkh, dq, dk}, "q, k, dqh, dkh, dq and dk");
  DeviceGuard guard(device, op);
  FASTDIT_CUDA_CHECK(op, attention_post_launch(
                             cptr(q), q_strides.data(), cptr(k), k_strides.data(),
                             reinterpret_cast<const float*>(table),
                             reinterpret_cast<const float*>(scale),
                             reinterpret_cast<const float*>(dqh),
                             reinterpret_cast<const float*>(dkh), mptr(dq), dq_strides.data(),
                             mptr(dk), dk_strides.data(), G, heads, n, hd, hdp, dtype,
                             reinterpret_cast<cudaStream_t>(stream)));
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
        py::arg("L"), py::arg("D"), py::arg("eps"), py::arg("dtype"), py::arg("cond_dtype"),
        py::arg("device"), py::arg("stream"), py::arg("channels_first") = false,
        "out = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] for contiguous x, out of "
        "shape (B, L, D) in `dtype` (0=float32, 1=float16, 2=bfloat16) and shift, scale of "
        "shape (B, D) in `cond_dtype` (= dtype, or 1 or 2 with dtype 0), enqueued on `stream` "
        "of `device`. channels_first: x and out are contiguous (B, D, L) images instead (the "
        "norm still over D; L < 2^31). Raises ValueError for bad arguments and RuntimeError "
        "for a CUDA error.");
  m.def("adaln_gated_fwd", &fastdit::adaln_gated_fwd, py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("gate_ptr"), py::arg("shift_ptr"), py::arg("scale_ptr"), py::arg("r_ptr"),
        py::arg("out_ptr"), py::arg("B"), py::arg("L"), py::arg("D"), py::arg("eps"),
        py::arg("dtype"), py::arg("cond_dtype"), py::arg("device"), py::arg("stream"),
        py::arg("channels_first") = false,
        "r = x + gate[:, None] * y (rounded to the dtype) and out = LayerNorm(r) * "
        "(1 + scale[:, None]) + shift[:, None]; x, y, r, out: (B, L, D) contiguous (or, "
        "channels_first, (B, D, L)), gate, shift, scale: (B, D) contiguous; x, r, out in "
        "`dtype`, y, gate, shift, scale in `cond_dtype`, as for adaln_modulate_fwd.");
  m.def("adaln_modulate_bwd", &fastdit::adaln_modulate_bwd, py::arg("x_ptr"),
        py::arg("scale_ptr"), py::arg("dout_ptr"), py::arg("dx_ptr"), py::arg("dshift_ptr"),
        py::arg("dscale_ptr"), py::arg("partial_ptr"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("splits"), py::arg("eps"), py::arg("dtype"),
        py::arg("cond_dtype"), py::arg("device"), py::arg("stream"),
        py::arg("channels_first") = false,
        "Gradients of adaln_modulate_fwd for the cotangent dout: dx (B, L, D), dshift and "
        "dscale (B, D), each in its input's dtype. partial: caller-allocated float32 scratch "
        "of 2 * B * splits * D elements; each sample's L rows are cut into `splits` "
        "(1 <= splits <= L) blocks whose partial sums are added in a fixed order "
        "(deterministic). D <= ADALN_BWD_MAX_D. channels_first: (B, D, L) images, any D, and "
        "splits = ceil(L / 32), the tiles (adaln_bwd_splits with channels_first=True).");
  m.def("adaln_gated_bwd", &fastdit::adaln_gated_bwd, py::arg("x_ptr"), py::arg("y_ptr"),
        py::arg("gate_ptr"), py::arg("scale_ptr"), py::arg("dr_ptr"), py::arg("dout_ptr"),
        py::arg("dx_ptr"), py::arg("dy_ptr"), py::arg("dgate_ptr"), py::arg("dshift_ptr"),
        py::arg("dscale_ptr"), py::arg("partial_ptr"), py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("splits"), py::arg("eps"), py::arg("dtype"),
        py::arg("cond_dtype"), py::arg("device"), py::arg("stream"),
        py::arg("channels_first") = false,
        "Gradients of adaln_gated_fwd for the cotangents dr (of r) and dout (of out): dx, dy "
        "(B, L, D), dgate, dshift, dscale (B, D), each in its input's dtype. partial: float32 "
        "scratch of 3 * B * splits * D elements, as for adaln_modulate_bwd.");
  m.def("adaln_bwd_splits", &fastdit::adaln_bwd_splits_py, py::arg("B"), py::arg("L"),
        py::arg("D"), py::arg("dtype"), py::arg("gated"), py::arg("device"),
        py::arg("channels_first") = false,
        "The `splits` to pass to adaln_modulate_bwd / adaln_gated_bwd (gated=True) for this "
        "shape on `device`: one wave of resident (sample, split) blocks, >= 16 rows each. "
        "`dtype` is the rows'; a call with another cond_dtype takes the same splits. "
        "channels_first: ceil(L / 32), the tiles of 32 tokens, on every GPU.");
  m.attr("ADALN_BWD_MAX_D") = fastdit::adaln_bwd_max_d();

  // The patchify family. order: 0 = "cpq" (c, row, column in the patch), 1 = "pqc".
  m.def("patchify", &fastdit::patchify_entry, py::arg("x_ptr"), py::arg("x_strides"),
        py::arg("out_ptr"), py::arg("out_strides"), py::arg("B"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("patch_size"), py::arg("order"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "out[b, n, k] = x[b, c, i*p + a, j*p + b'] for the image x (B, C, H, W) and the tokens "
        "out (B, N, C*p*p), both given by element strides (any layout, outputs must not "
        "overlap). C*p*p <= PATCHIFY_MAX_K.");
  m.def("unpatchify", &fastdit::unpatchify_entry, py::arg("tokens_ptr"),
        py::arg("tokens_strides"), py::arg("out_ptr"), py::arg("out_strides"), py::arg("B"),
        py::arg("C"), py::arg("H"), py::arg("W"), py::arg("patch_size"), py::arg("order"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "The inverse of patchify: tokens (B, N, C*p*p) to the image out (B, C, H, W), both by "
        "element strides.");
  m.def("patch_embed_fwd", &fastdit::patch_embed_fwd, py::arg("x_ptr"), py::arg("x_strides"),
        py::arg("weight_ptr"), py::arg("bias_ptr"), py::arg("pos_ptr"), py::arg("out_ptr"),
        py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("patch_size"),
        py::arg("D"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "out (B, N, D) = conv2d(x, weight, bias, stride=p) as tokens + pos; x by strides, "
        "weight (D, C, p, p), bias (D,), pos (N, D), out contiguous.");
  m.def("patch_embed_bwd", &fastdit::patch_embed_bwd, py::arg("x_ptr"), py::arg("x_strides"),
        py::arg("weight_ptr"), py::arg("dout_ptr"), py::arg("dx_ptr"), py::arg("dx_strides"),
        py::arg("dweight_partial_ptr"), py::arg("dpos_partial_ptr"), py::arg("B"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("patch_size"), py::arg("D"), py::arg("splits"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Gradients of patch_embed_fwd for dout (B, N, D) contiguous: dx by dx_strides; float32 "
        "partial sums dweight_partial (P, D, C*p*p) and dpos_partial (splits, N, D), with "
        "(splits, P) from patch_embed_bwd_plan; dweight = sum over P, dpos = sum over splits, "
        "dbias = sum of dpos over N (fixed orders: deterministic).");
  m.def("patch_embed_bwd_plan", &fastdit::patch_embed_bwd_plan, py::arg("B"), py::arg("C"),
        py::arg("H"), py::arg("W"), py::arg("patch_size"), py::arg("D"), py::arg("dtype"),
        py::arg("device"),
        "(splits, P) for patch_embed_bwd on `device`: samples split over about two waves of "
        "blocks, and the number of dweight partials.");
  m.def("final_layer_fwd", &fastdit::final_layer_fwd, py::arg("x_ptr"), py::arg("shift_ptr"),
        py::arg("scale_ptr"), py::arg("weight_t_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"),
        py::arg("out_strides"), py::arg("B"), py::arg("C"), py::arg("h"), py::arg("w"),
        py::arg("patch_size"), py::arg("D"), py::arg("eps"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "out (B, C, h*p, w*p) by strides = unpatchify(Linear(LayerNorm(x) * (1 + scale) + "
        "shift), pqc) for x (B, h*w, D), shift, scale (B, D), weight_t (D, p*p*C) (the Linear "
        "weight transposed), bias (p*p*C,), all contiguous. D <= FINAL_LAYER_MAX_D, p*p*C <= "
        "FINAL_LAYER_MAX_K.");
  m.def("final_layer_bwd", &fastdit::final_layer_bwd, py::arg("x_ptr"), py::arg("shift_ptr"),
        py::arg("scale_ptr"), py::arg("weight_ptr"), py::arg("dout_ptr"), py::arg("dout_strides"),
        py::arg("dx_ptr"), py::arg("stats_ptr"), py::arg("dmod_partial_ptr"),
        py::arg("dweight_partial_ptr"), py::arg("dbias_partial_ptr"), py::arg("B"), py::arg("C"),
        py::arg("h"), py::arg("w"), py::arg("patch_size"), py::arg("D"), py::arg("eps"),
        py::arg("row_splits"), py::arg("weight_splits"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"),
        "Gradients of final_layer_fwd for dout (B, C, h*p, w*p) by strides: dx (B, N, D) "
        "contiguous; float32 scratch stats (B*N, 2) and partial sums dmod_partial (2, B, "
        "row_splits, D) (dshift, dscale), dweight_partial (P, D, K) (dweight transposed), "
        "dbias_partial (P, K), "
        "with (row_splits, weight_splits, P) from final_layer_bwd_plan; the glue sums them.");
  m.def("final_layer_bwd_plan", &fastdit::final_layer_bwd_plan, py::arg("B"), py::arg("C"),
        py::arg("h"), py::arg("w"), py::arg("patch_size"), py::arg("D"), py::arg("dtype"),
        py::arg("device"),
        "(row_splits, weight_splits, P) for final_layer_bwd on `device`.");
  m.attr("PATCHIFY_MAX_K") = fastdit::patchify_max_k();
  m.attr("PATCH_EMBED_MAX_D") = fastdit::kPatchEmbedMaxD;
  m.attr("PATCH_EMBED_MAX_K") = fastdit::kPatchEmbedMaxK;
  m.attr("FINAL_LAYER_MAX_D") = fastdit::final_layer_max_d();
  m.attr("FINAL_LAYER_MAX_K") = fastdit::final_layer_max_k();
  m.attr("FINAL_LAYER_BWD_MAX_SCALAR_D") = fastdit::final_layer_bwd_max_scalar_d();

  // The downsampled_attention family: U-DiT's depthwise conv + polyphase split.
  m.def("downsampled_attention_dwconv_split", &fastdit::dwconv_split_entry, py::arg("x_ptr"),
        py::arg("x_strides"), py::arg("weight_ptr"), py::arg("bias_ptr"), py::arg("t_ptr"),
        py::arg("B"), py::arg("d"), py::arg("H"), py::arg("W"), py::arg("k"), py::arg("shortcut"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "t[b, 2a + b', i * (W/2) + j, c] = (dwconv_k(x) + bias (+ x if shortcut))[b, c, 2i + a, "
        "2j + b'] for x (B, d, H, W) by element strides (H, W even), weight (d, 1, k, k) and "
        "bias (d,) contiguous, t (B, 4, (H/2) * (W/2), d) contiguous; k odd <= DWCONV_MAX_K, "
        "padding k // 2, fp32 accumulation.");
  m.def("downsampled_attention_dwconv_split_dx", &fastdit::dwconv_split_dx_entry,
        py::arg("weight_ptr"), py::arg("dt_ptr"), py::arg("dx_ptr"), py::arg("dx_strides"),
        py::arg("B"), py::arg("d"), py::arg("H"), py::arg("W"), py::arg("k"), py::arg("shortcut"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "dx (B, d, H, W) by element strides: the gradient of downsampled_attention_dwconv_split "
        "for dt (B, 4, n, d) contiguous (the transposed depthwise conv, + dt with the shortcut).");
  m.def("downsampled_attention_dwconv_split_dw", &fastdit::dwconv_split_dw_entry,
        py::arg("x_ptr"), py::arg("x_strides"), py::arg("dt_ptr"), py::arg("partial_ptr"),
        py::arg("B"), py::arg("d"), py::arg("H"), py::arg("W"), py::arg("k"), py::arg("splits"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "float32 partial sums partial (B, splits, k*k + 1, d) of the weight gradient (taps "
        "ky * k + kx) and the bias gradient (tap k*k), each over the pixels of one split of one "
        "sample; splits from downsampled_attention_dwconv_split_dw_plan. The caller sums over "
        "(B, splits) in a fixed order (deterministic; no atomics).");
  m.def("downsampled_attention_padded_head_dim", &fastdit::attention_padded_head_dim,
        py::arg("hd"), "The head dim the attention kernels run at for hd (-1 above 128).");
  m.def("downsampled_attention_fits", &fastdit::attention_fits_entry, py::arg("hd"),
        py::arg("device"),
        "Whether the attention kernels for head dim hd fit the device's shared memory per block.");
  m.def("downsampled_attention_prep", &fastdit::attention_prep_entry, py::arg("q_ptr"),
        py::arg("q_strides"), py::arg("k_ptr"), py::arg("k_strides"), py::arg("table_ptr"),
        py::arg("scale_ptr"), py::arg("qh_ptr"), py::arg("kh_ptr"), py::arg("G"),
        py::arg("heads"), py::arg("n"), py::arg("hd"), py::arg("hdp"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "q^, k^ (fp32, hdp channels): RoPE2D, the L2 normalisation and the logit scale.");
  m.def("downsampled_attention_fwd", &fastdit::attention_fwd_entry, py::arg("qh_ptr"),
        py::arg("kh_ptr"), py::arg("v_ptr"), py::arg("v_strides"), py::arg("out_ptr"),
        py::arg("out_strides"), py::arg("merge"), py::arg("gw"), py::arg("dout_ptr"),
        py::arg("lse_ptr"), py::arg("delta_ptr"), py::arg("store_o"), py::arg("stats"),
        py::arg("G"), py::arg("heads"), py::arg("n"), py::arg("hd"), py::arg("hdp"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "softmax(q^ k^T) v into out (merged or not); with stats also the backward's per-row "
        "log2-sum-exp and delta = sum(dout * o).");
  m.def("downsampled_attention_bwd", &fastdit::attention_bwd_entry, py::arg("qh_ptr"),
        py::arg("kh_ptr"), py::arg("v_ptr"), py::arg("v_strides"), py::arg("dout_ptr"),
        py::arg("dout_strides"), py::arg("merge"), py::arg("gw"), py::arg("lse_ptr"),
        py::arg("delta_ptr"), py::arg("dqh_ptr"), py::arg("dkh_ptr"), py::arg("dlogit_ptr"),
        py::arg("dv_ptr"), py::arg("dv_strides"), py::arg("G"), py::arg("heads"), py::arg("n"),
        py::arg("hd"), py::arg("hdp"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "d q^, d k^ (fp32), d v, and per query row sum(dS * logit).");
  m.def("downsampled_attention_post", &fastdit::attention_post_entry, py::arg("q_ptr"),
        py::arg("q_strides"), py::arg("k_ptr"), py::arg("k_strides"), py::arg("table_ptr"),
        py::arg("scale_ptr"), py::arg("dqh_ptr"), py::arg("dkh_ptr"), py::arg("dq_ptr"),
        py::arg("dq_strides"), py::arg("dk_ptr"), py::arg("dk_strides"), py::arg("G"),
        py::arg("heads"), py::arg("n"), py::arg("hd"), py::arg("hdp"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "d q, d k from d q^, d k^: back through the scale, the normalisation and RoPE2D.");
  m.def("downsampled_attention_dwconv_split_dw_plan", &fastdit::dwconv_split_dw_plan,
        py::arg("B"), py::arg("d"), py::arg("H"), py::arg("W"), py::arg("k"), py::arg("dtype"),
        py::arg("device"),
        "splits for downsampled_attention_dwconv_split_dw on `device`: about two waves of "
        "resident blocks, at most one split per tile of the image.");
  m.attr("DOWNSAMPLED_ATTENTION_DWCONV_MAX_K") = fastdit::dwconv_split_max_k();
  m.attr("DOWNSAMPLED_ATTENTION_MAX_TOKENS") = 65535 * fastdit::attention_row_block();
  m.def("build_info", &fastdit::build_info,
        "Build facts: CUDA runtime version, CUDA archs compiled, CUDA compiler.");
  m.def("runtime_check", &fastdit::runtime_check, py::arg("device"),
        "'' if this build can run on CUDA device `device`, else the reason as a sentence.");
  m.def("device_count", &fastdit::device_count,
        "Number of CUDA devices visible to this build's runtime (0 when none or no driver).");
}
