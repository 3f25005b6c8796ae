"""Triton kernels of the patchify family (reference and formulas: fastdit/ops/patchify.py).

The kernels address the image through one map: token ``t`` (flat over the B * N tokens,
row-major over the h x w patch grid) and token component ``k`` (order "cpq" or "pqc") name the
pixel ``x[b, c, i*p + a, j*p + q]``; the image may have any strides (channels-first,
channels-last, views). Nothing is copied to change a layout: the kernels read and write the
tensors where they lie. Kernels whose token tiles may span samples take the map whole,
:func:`_pixel_offsets`; those that know their sample b (the embedding's d weight, all of the
final layer's) take its part inside one sample, :func:`_patch_offsets` (32-bit divisions), and
add b times the sample stride. At DiT-XL/2, bf16, sm_90, as launched:
the embedding's d weight loop went from 191 instructions a sample, with 64-bit t // N and a
call to the slow division path, to 127 with neither; the final layer's d x loops from 286-573
to 197-492 instructions, 128 registers to 80.

Kernels, with the bytes each must move (e = bytes of the dtype; M = B*N tokens, K = C*p*p
values per token for the embedding, p*p*C_out for the final layer, D the model width):

- ``_layout_kernel``: patchify or unpatchify (and each other's backward), one read and one
  write of every element: 2 M K e.
- ``_embed_fwd_kernel`` (patch_embed): gathers each token's patch, multiplies by the (D, K)
  weight on the tensor cores (fp32 in IEEE precision), adds bias and pos_embed in fp32 and
  writes the tokens once: M K e + M D e (+ pos_embed, N D e, L2-resident).
- ``_embed_dx_kernel`` (patch_embed backward, d x): d tokens @ weight, scattered into x's
  layout: M D e + M K e.
- ``_embed_params_kernel`` (patch_embed backward, d weight, d bias, d pos_embed): program
  (D-block, sample split, token split) walks its tokens for each of its samples, summing
  d pos_embed over them in registers and d weight^T = patches^T @ d tokens on the tensor cores:
  M D e + M K e, plus fp32 partials (splits x K x D, sample splits x N x D) summed afterwards
  in a fixed order.
  The backward reads d tokens twice (two kernels): one kernel would have to hold either a
  (K, D) or a (tokens, K) accumulator for a whole sweep, too large for registers; the second
  read is the price of keeping both reductions deterministic and in registers.
- ``_final_fwd_kernel`` (final_layer): per (sample, token block): the row statistics over D
  (chunked two-level Welford: exact chunk means and squared deviations, merged), then the
  normalised, modulated rows (rounded to the dtype, as the reference rounds its modulate
  output) times the (K, D) weight on the tensor cores, plus bias, scattered into the image:
  M D e (read twice: the second pass mostly from L2) + M K e.
- ``_final_dx_kernel`` (final_layer backward): d modulated = d tokens @ weight, recomputed per
  D-chunk (K is small), the LayerNorm backward (two sweeps over D: the row sums, then d x),
  per-(sample, token block) partial sums of d shift and d scale; stores the row statistics for
  the next kernel: M D e read (2-3 times, mostly L2) + M D e written.
- ``_final_wgrad_kernel`` (final_layer backward, d weight, d bias): program (D-block, row split)
  recomputes the modulated rows from x and the stored statistics: M D e + M K e, plus fp32
  partials (splits x K x D).

All sums over tokens go in a fixed order (register tiles per program, partials summed by
torch's deterministic reductions), so two runs give bitwise-equal gradients. Accumulation is
fp32; every output is rounded once, to the input dtype. float64 is declined (auto: torch).

Verified without a GPU: every kernel under TRITON_INTERPRET=1 against the float64 reference
(tests/test_patchify.py). Speed: not measured yet (needs a GPU; bench/bench_patchify.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, RTNE_BF16, _dot, _round, device_context, dtype_reason, sm_count

# ----------------------------------------------------------------------------------------------
# The pixel map


@triton.jit
def _pixel_offsets(t, k, N, w, C, sx_b, sx_c, sx_h, sx_w, P: tl.constexpr, PQC: tl.constexpr):
    """Element offsets, in the image, of component ``k[None, :]`` of token ``t[:, None]``.

    t: int64 token indices (flat over B * N); k: component indices. Token t = b * N + i * w + j
    covers pixels (i*p + a, j*p + q); component k is (c, a, q) in the order "cpq" (k = (c*p +
    a)*p + q) or "pqc" (k = (a*p + q)*C + c)."""
    b = t // N
    n = t % N
    row = b * sx_b + ((n // w) * P) * sx_h + ((n % w) * P) * sx_w
    return row[:, None] + _component_offsets(k.to(tl.int64), C, sx_c, sx_h, sx_w, P, PQC)[None, :]


@triton.jit
def _patch_offsets(n, k, w, C, sx_c, sx_h, sx_w, P: tl.constexpr, PQC: tl.constexpr):
    """The offsets of :func:`_pixel_offsets` inside one sample's image: token ``n[:, None]`` of
    the sample (int32, n < N), component ``k[None, :]``. A kernel that walks the samples of
    fixed tokens computes them once and adds b * sx_b a sample (no division in its loop)."""
    row = ((n // w) * P).to(tl.int64) * sx_h + ((n % w) * P).to(tl.int64) * sx_w
    return row[:, None] + _component_offsets(k, C, sx_c, sx_h, sx_w, P, PQC)[None, :]


@triton.jit
def _component_offsets(k, C, sx_c, sx_h, sx_w, P: tl.constexpr, PQC: tl.constexpr):
    """Offsets, from its token's first pixel, of token components ``k``: the divisions in k's
    type, the products with strides in 64 bits. :func:`_patch_offsets` passes int32 (k < K),
    :func:`_pixel_offsets` int64: in the flat-token kernels the 32-bit parts, hoisted before
    their loops, made ptxas spill (the embedding's d x at K 256, fp32)."""
    if PQC:
        c = k % C
        aq = k // C
        a = aq // P
        q = aq % P
    else:
        q = k % P
        ca = k // P
        a = ca % P
        c = ca // P
    return c.to(tl.int64) * sx_c + a.to(tl.int64) * sx_h + q.to(tl.int64) * sx_w


@triton.jit
def _token_offsets(t, N, st_b, st_n):
    return (t // N) * st_b + (t % N) * st_n


# ----------------------------------------------------------------------------------------------
# patchify / unpatchify


@triton.jit
def _layout_kernel(
    IMG, TOK,
    T, N, w, C, K,
    sx_b, sx_c, sx_h, sx_w, st_b, st_n, st_k,
    P: tl.constexpr, PQC: tl.constexpr, TO_TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """tokens[t, k] = image[pixel(t, k)] (TO_TOKENS), or the reverse, for one tile."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (t < T)[:, None] & (k < K)[None, :]
    img = _pixel_offsets(t, k, N, w, C, sx_b, sx_c, sx_h, sx_w, P, PQC)
    tok = _token_offsets(t, N, st_b, st_n)[:, None] + k.to(tl.int64)[None, :] * st_k
    if TO_TOKENS:
        tl.store(TOK + tok, tl.load(IMG + img, mask=mask), mask=mask)
    else:
        tl.store(IMG + img, tl.load(TOK + tok, mask=mask), mask=mask)


# ----------------------------------------------------------------------------------------------
# patch_embed


@triton.jit
def _embed_fwd_kernel(
    X, W, BIAS, POS, OUT,
    T, N, w, C, K, D,
    sx_b, sx_c, sx_h, sx_w, sw_d, sw_k, sb, sp_n, sp_d, so_b, so_n, so_d,
    P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """out[t, d] = sum_k patch[t, k] W[d, k] + bias[d] + pos[t % N, d], one (BM, BD) tile."""
    t = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    d = tl.program_id(1) * BD + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
    t_ok = t < T
    d_ok = d < D
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        k0 += BK
        a = tl.load(
            X + _pixel_offsets(t, k, N, w, C, sx_b, sx_c, sx_h, sx_w, P, False),
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wt = tl.load(
            W + (k[:, None] * sw_k + d[None, :] * sw_d),
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = _dot(a, wt, acc, INTERPRETED)
    mask = t_ok[:, None] & d_ok[None, :]
    bias = tl.load(BIAS + d * sb, mask=d_ok, other=0.0).to(tl.float32)
    pos = tl.load(POS + ((t % N) * sp_n)[:, None] + (d * sp_d)[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    out = acc + bias[None, :] + pos
    tl.store(
        OUT + _token_offsets(t, N, so_b, so_n)[:, None] + (d * so_d)[None, :],
        _round(out, OUT.dtype.element_ty, RTNE_BF16),
        mask=mask,
    )


@triton.jit
def _embed_dx_kernel(
    DOUT, W, DX,
    T, N, w, C, K, D,
    sg_b, sg_n, sg_d, sw_d, sw_k, sx_b, sx_c, sx_h, sx_w,
    P: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """d x[pixel(t, k)] = sum_d d out[t, d] W[d, k], one (BM, BK) tile of patches."""
    t = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    t_ok = t < T
    k_ok = k < K
    rows = _token_offsets(t, N, sg_b, sg_n)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    d0 = 0
    while d0 < D:
        d = d0 + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
        d_ok = d < D
        d0 += BD
        g = tl.load(
            DOUT + rows[:, None] + (d * sg_d)[None, :],
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        wk = tl.load(
            W + (d[:, None] * sw_d + k[None, :] * sw_k),
            mask=d_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _dot(g, wk, acc, INTERPRETED)
    tl.store(
        DX + _pixel_offsets(t, k, N, w, C, sx_b, sx_c, sx_h, sx_w, P, False),
        _round(acc, DX.dtype.element_ty, RTNE_BF16),
        mask=t_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _embed_params_kernel(
    X, DOUT, DPOS, DW,
    B, N, w, C, K, D, tokens_per_split, token_splits, samples_per_split,
    sx_b, sx_c, sx_h, sx_w, sg_b, sg_n, sg_d,
    P: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (D-block, split s, K-block), s = (sample split sb, token split sn): for the grid
    tokens of sn and the samples of sb,
    DPOS[sb, n, d] = sum_b d out[b, n, d] (fp32 partial, written by K-block 0) and
    DW[s, k, d] = sum_b sum_n patch[b, n, k] d out[b, n, d] (fp32 partial)."""
    d = tl.program_id(0) * BD + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
    s = tl.program_id(1)
    sb = (s // token_splits).to(tl.int64)
    sn = s % token_splits
    k = tl.program_id(2) * BK + tl.arange(0, BK)
    d_ok = d < D
    k_ok = k < K
    dw = tl.zeros([BK, BD], dtype=tl.float32)
    start = sn * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    b_start = sb * samples_per_split  # 64-bit: b * sx_b and b * sg_b may pass 2^31
    b_end = tl.minimum(b_start + samples_per_split, B)
    n0 = start
    while n0 < end:
        n = n0 + tl.arange(0, BN)
        n_ok = n < end
        n0 += BN
        mask = n_ok[:, None] & d_ok[None, :]
        patch_mask = n_ok[:, None] & k_ok[None, :]
        # The tiles of sample 0; sample b's lie b sample strides on: the sample loop only adds.
        g_tile = DOUT + (n.to(tl.int64) * sg_n)[:, None] + (d * sg_d)[None, :]
        x_tile = X + _patch_offsets(n, k, w, C, sx_c, sx_h, sx_w, P, False)
        dpos = tl.zeros([BN, BD], dtype=tl.float32)
        b = b_start
        while b < b_end:
            g = tl.load(g_tile + b * sg_b, mask=mask, other=0.0)
            a = tl.load(x_tile + b * sx_b, mask=patch_mask, other=0.0)
            b += 1
            dpos += g.to(tl.float32)
            dw = _dot(tl.trans(a), g, dw, INTERPRETED)
        if tl.program_id(2) == 0:
            tl.store(DPOS + (sb * N + n[:, None]) * D + d[None, :], dpos, mask=mask)
    tl.store(
        DW + (s.to(tl.int64) * K + k[:, None]) * D + d[None, :],
        dw,
        mask=k_ok[:, None] & d_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------
# final_layer


@triton.jit
def _row_stats(X, rows, row_ok, D, sx_d, eps, BM: tl.constexpr, BD: tl.constexpr):
    """(mean, rstd) over D of the rows at offsets ``rows``, in fp32, D-chunk by D-chunk: each
    chunk's exact mean and sum of squared deviations, merged into the running ones (Chan et
    al.'s pairwise update), never E[x^2] - mean^2."""
    mean = tl.zeros([BM], dtype=tl.float32)
    m2 = tl.zeros([BM], dtype=tl.float32)
    d0 = 0
    while d0 < D:
        d = d0 + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
        d_ok = d < D
        mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(X + rows[:, None] + (d * sx_d)[None, :], mask=mask, other=0.0).to(tl.float32)
        seen = d0 * 1.0
        d0 += BD
        count = tl.sum(d_ok.to(tl.float32), axis=0)
        chunk_mean = tl.sum(x, axis=1) / count
        dev = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=1)
        total = seen + count
        delta = chunk_mean - mean
        mean += delta * (count / total)
        m2 += chunk_m2 + delta * delta * (seen * count / total)
    return mean, 1.0 / tl.sqrt_rn(m2 / D + eps)


@triton.jit
def _final_fwd_kernel(
    X, SHIFT, SCALE, W, BIAS, OUT,
    N, w, C, K, D, blocks_per_sample, eps,
    sx_b, sx_n, sx_d, ssh_b, ssh_d, ssc_b, ssc_d, sw_k, sw_d, sb,
    so_b, so_c, so_h, so_w,
    P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """image[pixel(t, k)] = sum_d round(LN(x)[t, d] (1 + scale[d]) + shift[d]) W[k, d] + bias[k]
    for BM tokens of one sample and BK outputs."""
    pid = tl.program_id(0)
    b = (pid // blocks_per_sample).to(tl.int64)
    n = (pid % blocks_per_sample) * BM + tl.arange(0, BM)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    n_ok = n < N
    k_ok = k < K
    rows = b * sx_b + n.to(tl.int64) * sx_n
    mean, rstd = _row_stats(X, rows, n_ok, D, sx_d, eps, BM, BD)
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    d0 = 0
    while d0 < D:
        d = d0 + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
        d_ok = d < D
        d0 += BD
        mask = n_ok[:, None] & d_ok[None, :]
        x = tl.load(X + rows[:, None] + (d * sx_d)[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * ssh_b + d * ssh_d, mask=d_ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * ssc_b + d * ssc_d, mask=d_ok, other=0.0).to(tl.float32)
        mod = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        mod = _round(tl.where(mask, mod, 0.0), X.dtype.element_ty, RTNE_BF16)
        wt = tl.load(
            W + (k[None, :] * sw_k + d[:, None] * sw_d),
            mask=d_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _dot(mod, wt, acc, INTERPRETED)
    bias = tl.load(BIAS + k * sb, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(
        OUT + b * so_b + _patch_offsets(n, k, w, C, so_c, so_h, so_w, P, True),
        _round(acc + bias[None, :], OUT.dtype.element_ty, RTNE_BF16),
        mask=n_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _final_dmod(
    G, W, n, row_ok, d, d_ok, w, C, K,
    sg_c, sg_h, sg_w, sw_k, sw_d,
    P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """d modulated[n, d] = sum_k d out[pixel(n, k)] W[k, d], fp32, for a (BM, BD) tile of
    tokens n of one sample, whose image G points to."""
    dmod = tl.zeros([BM, BD], dtype=tl.float32)
    k0 = 0
    while k0 < K:
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        k0 += BK
        g = tl.load(
            G + _patch_offsets(n, k, w, C, sg_c, sg_h, sg_w, P, True),
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wk = tl.load(
            W + (k[:, None] * sw_k + d[None, :] * sw_d),
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        dmod = _dot(g, wk, dmod, INTERPRETED)
    return dmod


@triton.jit
def _final_dx_chunk(
    X, SCALE, G, W, rows, b, n, n_ok, mean, rstd, d0, w, C, K, D,
    sx_d, ssc_b, ssc_d, sg_b, sg_c, sg_h, sg_w, sw_k, sw_d,
    P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Channels [d0, d0 + BD) of _final_dx_kernel's rows: (d, d_ok, mask, xh = LN(x),
    dm = d modulated, g = dm (1 + scale))."""
    d = d0 + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
    d_ok = d < D
    mask = n_ok[:, None] & d_ok[None, :]
    x = tl.load(X + rows[:, None] + (d * sx_d)[None, :], mask=mask, other=0.0).to(tl.float32)
    xh = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    scale = tl.load(SCALE + b * ssc_b + d * ssc_d, mask=d_ok, other=0.0).to(tl.float32)
    dm = _final_dmod(
        G + b * sg_b, W, n, n_ok, d, d_ok, w, C, K, sg_c, sg_h, sg_w, sw_k, sw_d, P, BM, BD, BK,
        INTERPRETED,
    )  # fmt: skip
    return d, d_ok, mask, xh, dm, dm * (1.0 + scale[None, :])


@triton.jit
def _final_dx_kernel(
    X, SCALE, W, G, DX, STATS, PART,
    N, w, C, K, D, blocks_per_sample, plane, eps,
    sx_b, sx_n, sx_d, ssc_b, ssc_d, sw_k, sw_d, sg_b, sg_c, sg_h, sg_w, sdx_b, sdx_n, sdx_d,
    P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """For BM tokens of one sample, with xh = LN(x), dm = d modulated, g = dm (1 + scale):
    d x = rstd (g - mean_D(g) - xh mean_D(g xh)); PART[0][b, block, d] = sum_n dm,
    PART[1][b, block, d] = sum_n dm xh (fp32 partials of d shift and d scale);
    STATS[t] = (mean, rstd) for the weight-gradient kernel."""
    pid = tl.program_id(0)
    b = (pid // blocks_per_sample).to(tl.int64)
    block = pid % blocks_per_sample
    n = block * BM + tl.arange(0, BM)
    n_ok = n < N
    t = b * N + n.to(tl.int64)
    rows = b * sx_b + n.to(tl.int64) * sx_n
    mean, rstd = _row_stats(X, rows, n_ok, D, sx_d, eps, BM, BD)
    tl.store(STATS + 2 * t, mean, mask=n_ok)
    tl.store(STATS + 2 * t + 1, rstd, mask=n_ok)

    # Sweep 1: the row sums of g and g * xh.
    sum_g = tl.zeros([BM], dtype=tl.float32)
    sum_gx = tl.zeros([BM], dtype=tl.float32)
    d0 = 0
    while d0 < D:
        d, d_ok, mask, xh, dm, g = _final_dx_chunk(
            X, SCALE, G, W, rows, b, n, n_ok, mean, rstd, d0, w, C, K, D,
            sx_d, ssc_b, ssc_d, sg_b, sg_c, sg_h, sg_w, sw_k, sw_d, P, BM, BD, BK, INTERPRETED,
        )  # fmt: skip
        d0 += BD
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xh, axis=1)

    mean_g = sum_g / D
    mean_gx = sum_gx / D

    # Sweep 2: d x, and the partial sums over this block's tokens.
    dx_rows = b * sdx_b + n.to(tl.int64) * sdx_n
    part = PART + (b * blocks_per_sample + block) * D
    d0 = 0
    while d0 < D:
        d, d_ok, mask, xh, dm, g = _final_dx_chunk(
            X, SCALE, G, W, rows, b, n, n_ok, mean, rstd, d0, w, C, K, D,
            sx_d, ssc_b, ssc_d, sg_b, sg_c, sg_h, sg_w, sw_k, sw_d, P, BM, BD, BK, INTERPRETED,
        )  # fmt: skip
        d0 += BD
        dx = rstd[:, None] * (g - mean_g[:, None] - xh * mean_gx[:, None])
        tl.store(
            DX + dx_rows[:, None] + (d * sdx_d)[None, :],
            _round(dx, DX.dtype.element_ty, RTNE_BF16),
            mask=mask,
        )
        tl.store(part + d, tl.sum(dm, axis=0), mask=d_ok)  # dm is 0 on masked rows
        tl.store(part + plane + d, tl.sum(dm * xh, axis=0), mask=d_ok)


@triton.jit
def _final_wgrad_kernel(
    X, SHIFT, SCALE, G, STATS, DW, DBIAS,
    N, w, C, K, D, blocks_per_sample, steps_per_split, steps,
    sx_b, sx_n, sx_d, ssh_b, ssh_d, ssc_b, ssc_d, sg_b, sg_c, sg_h, sg_w,
    P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    RTNE_BF16: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (D-block, split s, K-block) over the split's steps, a step being BM tokens of one
    sample (step = b * blocks_per_sample + token block):
    DW[s, k, d] = sum_t d out[pixel(t, k)] mod[t, d] (mod rounded as the forward rounds it),
    DBIAS[s, k] = sum_t d out[pixel(t, k)] (written by D-block 0); fp32 partials."""
    d = tl.program_id(0) * BD + tl.arange(0, BD).to(tl.int64)  # d * (a stride): 64-bit
    s = tl.program_id(1)
    k = tl.program_id(2) * BK + tl.arange(0, BK)
    d_ok = d < D
    k_ok = k < K
    dw = tl.zeros([BK, BD], dtype=tl.float32)
    db = tl.zeros([BK], dtype=tl.float32)
    step = s * steps_per_split
    end = tl.minimum(step + steps_per_split, steps)
    while step < end:
        b = (step // blocks_per_sample).to(tl.int64)
        n = (step % blocks_per_sample) * BM + tl.arange(0, BM)
        step += 1
        n_ok = n < N
        t = b * N + n.to(tl.int64)
        mask = n_ok[:, None] & d_ok[None, :]
        rows = b * sx_b + n.to(tl.int64) * sx_n
        x = tl.load(X + rows[:, None] + (d * sx_d)[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(STATS + 2 * t, mask=n_ok, other=0.0)
        rstd = tl.load(STATS + 2 * t + 1, mask=n_ok, other=0.0)
        shift = tl.load(SHIFT + b * ssh_b + d * ssh_d, mask=d_ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * ssc_b + d * ssc_d, mask=d_ok, other=0.0).to(tl.float32)
        mod = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        mod = _round(tl.where(mask, mod, 0.0), X.dtype.element_ty, RTNE_BF16)
        g = tl.load(
            G + b * sg_b + _patch_offsets(n, k, w, C, sg_c, sg_h, sg_w, P, True),
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        dw = _dot(tl.trans(g), mod, dw, INTERPRETED)
        db += tl.sum(g.to(tl.float32), axis=0)
    row = s.to(tl.int64) * K + k
    tl.store(DW + row[:, None] * D + d[None, :], dw, mask=k_ok[:, None] & d_ok[None, :])
    if tl.program_id(0) == 0:
        tl.store(DBIAS + row, db, mask=k_ok)


# ----------------------------------------------------------------------------------------------
# Python side: tile shapes and the functions the ops register
#
# Tile shapes (checked by compiling every kernel for sm_90 with Triton's bundled ptxas,
# tests/test_triton_compile.py: no spills, bf16 and fp32): each function below returns the
# constexpr tile sizes and num_warps of one kernel, for the launcher and for that test.

MIN_DOT = 16  # tl.dot's smallest tile side


def _pow2(n: int, lo: int = MIN_DOT, hi: int | None = None) -> int:
    v = max(lo, triton.next_power_of_2(n))
    return v if hi is None else min(v, hi)


def layout_tiles(K: int) -> dict:
    """About 4096 elements a program: a token row of K values (up to 256) times BLOCK_T."""
    block_k = _pow2(K, lo=1, hi=256)
    return dict(BLOCK_T=max(1, min(256, 4096 // block_k)), BLOCK_K=block_k, num_warps=8)


def embed_fwd_tiles(K: int, D: int) -> dict:
    """Wide output tiles (the store is what costs) while the patch tile is small."""
    return dict(BM=64, BK=_pow2(K, hi=64), BD=_pow2(D, hi=128 if K <= 16 else 64), num_warps=8)


def embed_dx_tiles(K: int, D: int) -> dict:
    return dict(BM=64, BK=_pow2(K, hi=64), BD=_pow2(D, hi=64), num_warps=4 if K <= 16 else 8)


def embed_params_tiles(K: int, D: int) -> dict:
    return dict(BN=32, BK=_pow2(K, hi=64), BD=_pow2(D, hi=64), num_warps=8)


def final_fwd_tiles(K: int, D: int) -> dict:
    return dict(BM=32, BD=_pow2(D, hi=64), BK=_pow2(K, hi=64), num_warps=8)


def final_dx_tiles(K: int, D: int) -> dict:
    """8 warps, but 4 for a 16-wide K tile (at 8, ptxas caps that variant at 128 registers a
    thread and spills in fp32)."""
    block_k = _pow2(K, hi=32)
    return dict(BM=32, BD=_pow2(D, hi=64), BK=block_k, num_warps=4 if block_k == 16 else 8)


def final_wgrad_tiles(K: int, D: int) -> dict:
    return dict(BM=32, BD=_pow2(D, hi=64), BK=_pow2(K, hi=64), num_warps=8)


def _programs(device: torch.device) -> int:
    """Programs that fill one wave: about two per SM on a GPU; 3 on the CPU (the interpreter),
    so the tests see several splits."""
    return 2 * sm_count(device.index or 0) if device.type == "cuda" else 3


def _split(steps: int, others: int, device: torch.device) -> tuple[int, int]:
    """(splits, steps per split): ``steps`` cut so that splits * others programs fill a wave."""
    splits = max(1, min(steps, _programs(device) // others))
    per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, per_split), per_split


def _sample_splits(samples: int, others: int, device: torch.device) -> tuple[int, int]:
    """(splits, samples per split) of a batch walked by ``others`` programs per sample split:
    about four programs per SM on a GPU in all (the walk is a chain of dependent steps, one
    tile of each sample, so programs, not tile size, hide the memory latency); 2 splits on the
    CPU (the interpreter), so that the tests see the partial sums."""
    if device.type == "cuda":
        splits = triton.cdiv(4 * sm_count(device.index or 0), others)
    else:
        splits = 2
    per_split = triton.cdiv(samples, max(1, min(samples, splits)))
    return triton.cdiv(samples, per_split), per_split


def _layout(image: torch.Tensor, tokens: torch.Tensor, p: int, w: int, order: str, to_tokens: bool):
    B, C = image.shape[:2]
    T, N, K = B * tokens.shape[1], tokens.shape[1], tokens.shape[2]
    tiles = layout_tiles(K)
    grid = (triton.cdiv(T, tiles["BLOCK_T"]), triton.cdiv(K, tiles["BLOCK_K"]))
    with device_context(image):
        _layout_kernel[grid](
            image, tokens,
            T, N, w, C, K,
            *image.stride(), *tokens.stride(),
            P=p, PQC=order == "pqc", TO_TOKENS=to_tokens, **tiles,
        )  # fmt: skip


def _reason(**tensors: torch.Tensor) -> str:
    for t in tensors.values():
        reason = dtype_reason(t)
        if reason:
            return reason
    return ""


def supports_patchify(x: torch.Tensor, patch_size: int, order: str) -> str:
    return _reason(x=x)


def supports_unpatchify(tokens: torch.Tensor, patch_size: int, grid, order: str) -> str:
    return _reason(tokens=tokens)


def supports_patch_embed(x, weight, bias, pos_embed) -> str:
    return _reason(x=x)


def supports_final_layer(x, shift, scale, weight, bias, patch_size, grid, eps) -> str:
    return _reason(x=x)


def patchify_forward(x: torch.Tensor, patch_size: int, order: str) -> torch.Tensor:
    p = patch_size
    B, C, H, W = x.shape
    tokens = torch.empty(B, (H // p) * (W // p), C * p * p, dtype=x.dtype, device=x.device)
    _layout(x, tokens, p, W // p, order, to_tokens=True)
    return tokens


def patchify_backward(grads, inputs) -> list[torch.Tensor]:
    x, p, order = inputs
    dx = torch.empty_like(x)
    _layout(dx, grads[0], p, x.shape[3] // p, order, to_tokens=False)
    return [dx]


def unpatchify_forward(tokens: torch.Tensor, patch_size: int, grid, order: str) -> torch.Tensor:
    p = patch_size
    (h, w), (B, _, K) = grid, tokens.shape
    image = torch.empty(B, K // (p * p), h * p, w * p, dtype=tokens.dtype, device=tokens.device)
    _layout(image, tokens, p, w, order, to_tokens=False)
    return image


def unpatchify_backward(grads, inputs) -> list[torch.Tensor]:
    tokens, p, grid, order = inputs
    dtokens = torch.empty_like(tokens)
    _layout(grads[0], dtokens, p, grid[1], order, to_tokens=True)
    return [dtokens]


def _embed_sizes(x: torch.Tensor, weight: torch.Tensor):
    """(B, C, w, N, K, T, D, p) of a patch_embed call."""
    B, C, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    h, w = H // p, W // p
    return B, C, w, h * w, C * p * p, B * h * w, D, p


def patch_embed_forward(x, weight, bias, pos_embed) -> torch.Tensor:
    B, C, w, N, K, T, D, p = _embed_sizes(x, weight)
    w2 = weight.reshape(D, K)
    pos = pos_embed[0] if pos_embed.dim() == 3 else pos_embed
    out = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    tiles = embed_fwd_tiles(K, D)
    with device_context(x):
        _embed_fwd_kernel[(triton.cdiv(T, tiles["BM"]), triton.cdiv(D, tiles["BD"]))](
            x, w2, bias, pos, out,
            T, N, w, C, K, D,
            *x.stride(), *w2.stride(), bias.stride(0), *pos.stride(), *out.stride(),
            P=p, RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
    return out


def patch_embed_backward(grads, inputs) -> list[torch.Tensor]:
    x, weight, bias, pos_embed = inputs
    g = grads[0]
    B, C, w, N, K, T, D, p = _embed_sizes(x, weight)
    w2 = weight.reshape(D, K)
    dx = torch.empty_like(x)
    tiles = embed_dx_tiles(K, D)
    with device_context(x):
        _embed_dx_kernel[(triton.cdiv(T, tiles["BM"]), triton.cdiv(K, tiles["BK"]))](
            g, w2, dx,
            T, N, w, C, K, D,
            *g.stride(), *w2.stride(), *dx.stride(),
            P=p, RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
        tiles = embed_params_tiles(K, D)
        d_blocks, k_blocks = triton.cdiv(D, tiles["BD"]), triton.cdiv(K, tiles["BK"])
        splits, per_split = _split(triton.cdiv(N, tiles["BN"]), d_blocks * k_blocks, x.device)
        b_splits, per_b = _sample_splits(B, d_blocks * k_blocks * splits, x.device)
        dpos = torch.empty(b_splits, N, D, dtype=torch.float32, device=x.device)
        dw = torch.empty(b_splits * splits, K, D, dtype=torch.float32, device=x.device)
        _embed_params_kernel[(d_blocks, b_splits * splits, k_blocks)](
            x, g, dpos, dw,
            B, N, w, C, K, D, per_split * tiles["BN"], splits, per_b,
            *x.stride(), *g.stride(),
            P=p, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
    dweight = dw.sum(0).t().reshape(weight.shape).to(weight.dtype)  # splits summed in order
    dpos = dpos.sum(0)  # over the sample splits, in order
    dbias = dpos.sum(0).to(bias.dtype)
    return [dx, dweight, dbias, dpos.to(pos_embed.dtype).reshape(pos_embed.shape)]


def final_layer_forward(x, shift, scale, weight, bias, patch_size, grid, eps) -> torch.Tensor:
    p, (h, w) = patch_size, grid
    B, N, D = x.shape
    K = weight.shape[0]
    C = K // (p * p)
    out = torch.empty(B, C, h * p, w * p, dtype=x.dtype, device=x.device)
    tiles = final_fwd_tiles(K, D)
    blocks = triton.cdiv(N, tiles["BM"])
    with device_context(x):
        _final_fwd_kernel[(B * blocks, triton.cdiv(K, tiles["BK"]))](
            x, shift, scale, weight, bias, out,
            N, w, C, K, D, blocks, eps,
            *x.stride(), *shift.stride(), *scale.stride(), *weight.stride(), bias.stride(0),
            *out.stride(),
            P=p, RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
    return out


def final_layer_backward(grads, inputs) -> list[torch.Tensor]:
    x, shift, scale, weight, bias, p, (h, w), eps = inputs
    g = grads[0]
    B, N, D = x.shape
    K = weight.shape[0]
    C = K // (p * p)
    dx = torch.empty_like(x)
    stats = torch.empty(B * N, 2, dtype=torch.float32, device=x.device)
    tiles = final_dx_tiles(K, D)
    blocks = triton.cdiv(N, tiles["BM"])
    part = torch.empty(2, B, blocks, D, dtype=torch.float32, device=x.device)
    with device_context(x):
        _final_dx_kernel[(B * blocks,)](
            x, scale, weight, g, dx, stats, part,
            N, w, C, K, D, blocks, B * blocks * D, eps,
            *x.stride(), *scale.stride(), *weight.stride(), *g.stride(), *dx.stride(),
            P=p, RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
        tiles = final_wgrad_tiles(K, D)
        assert tiles["BM"] == final_dx_tiles(K, D)["BM"]  # the steps are the same token blocks
        d_blocks, k_blocks = triton.cdiv(D, tiles["BD"]), triton.cdiv(K, tiles["BK"])
        steps = B * blocks
        splits, per_split = _split(steps, d_blocks * k_blocks, x.device)
        dw = torch.empty(splits, K, D, dtype=torch.float32, device=x.device)
        db = torch.empty(splits, K, dtype=torch.float32, device=x.device)
        _final_wgrad_kernel[(d_blocks, splits, k_blocks)](
            x, shift, scale, g, stats, dw, db,
            N, w, C, K, D, blocks, per_split, steps,
            *x.stride(), *shift.stride(), *scale.stride(), *g.stride(),
            P=p, RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED, **tiles,
        )  # fmt: skip
    return [
        dx,
        part[0].sum(1).to(shift.dtype),  # over the token blocks, in order
        part[1].sum(1).to(scale.dtype),
        dw.sum(0).to(weight.dtype),
        db.sum(0).to(bias.dtype),
    ]
