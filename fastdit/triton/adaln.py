"""Triton kernels of the adaLN family (reference and formulas: fastdit/ops/adaln.py).

Every layout is read as B samples of L rows of D channels with arbitrary strides:
(B, L, D) tokens, and (B, D, H, W) images with L = H * W (channels-first: channel stride H*W and
token stride 1; channels-last: channel stride 1). Two kernel pairs:

- tokens and channels-last (a row is D consecutive elements): ``_fwd_kernel``/``_bwd_kernel``.
  A program works on a (ROWS, BLOCK_D) tile of one sample, each row whole in registers, so every
  element is read once and written once. D <= 16384.
- channels-first (a token's D values lie H*W elements apart): ``_cf_fwd_kernel``/
  ``_cf_bwd_kernel``. A program takes a tile of 8 to 32 consecutive tokens (runs of 64 bytes of
  each channel, 32 when the tiles are few) and walks its channels in chunks, twice: statistics,
  then outputs (the section "Channels-first images" below: its bytes, its one-pass statistics
  and their precision).

float64 is declined (auto serves it with torch).

Every pointer is read in its own dtype (each loaded value is widened to fp32, each stored
one rounded once from fp32), so under autocast a float32 x takes a bfloat16 y and vectors as
they are, and d y, d gate, d shift, d scale are written in their dtypes.

Kernels and the bytes that must move (N = B*L*D elements of the dtype, e = its size in bytes;
the (B, D) conditioning vectors add a few B*D more and are left out; a narrower y moves fewer):

- ``_fwd_kernel`` (modulate):  read x, write out                         2 N e
- ``_fwd_kernel`` (gated):     read x, y; write r, out                   4 N e
- ``_bwd_kernel`` (modulate):  read x, dout; write dx                    3 N e
- ``_bwd_kernel`` (gated):     read x, y, dr, dh; write dx, dy           6 N e
  plus, for both, the per-(sample, split) partial sums: 2 or 3 planes of B * splits * D fp32,
  written once and read once by ``_sum_splits_kernel``. splits fills the waves of programs
  best (_splits): at DiT-XL/2 B 32 on an H100 that is 8 per sample, 3.5 MB of partials against the
  113 MB (bf16) the gated backward must move, and they stay in the 50 MB L2; at B 256, one.

The backward recomputes the row statistics (and, for gated, r = x + gate * y rounded to the
dtype, as the forward stores it) from the inputs: nothing but the op's inputs is saved.

The per-sample sums over tokens (d shift, d scale, d gate) are deterministic: program (b, s)
adds its rows in a fixed order into register tiles and writes one partial row per plane; a
second kernel adds the partials of each sample in split order. The split count depends only on
the shape and the GPU's SM count, so two runs on the same GPU give bitwise-equal gradients.

Verified here without a GPU: results under TRITON_INTERPRET=1 (tests/test_adaln.py), and
compilation for sm_90 with Triton's bundled ptxas, specialised as the launcher specialises
(tests/test_triton_compile.py; registers per thread at the DiT and U-DiT widths): whole rows
32-55 forward, backward capped at 64 (BWD_REGISTERS: 32 warps an SM), no spills up to
D = 4096 but 2 stores in the gated backward at 4096, and in float32 at D 129-256 2 stores
outside the row loop; channels-first 48-128, no spills at any D.

Expected on an H100 (HBM3 3.35 TB/s; a device-to-device copy measures about 2.6-3.0 TB/s), not
measured yet: forward 85-90 % of the copy bandwidth at the DiT-XL/2 and channels-last U-DiT
shapes; backward 70-80 % (four live row tensors per element, and the partials); channels-first
images lower where the second read of a tile misses L2. At DiT-XL/2 B 256, bf16
(N e = 151 MB) and ~2.8 TB/s copy: modulate forward ~125 us, gated forward ~245 us, gated
backward ~430 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import _checks
from ._common import DTYPES as _DTYPES
from ._common import RTNE_BF16 as _RTNE_BF16
from ._common import _round, dtype_reason
from ._common import device_context as _device_context
from ._common import sm_count as _sm_count
from ._common import wave_splits as _wave_splits


@triton.jit
def _fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, R, OUT,
    L, D, blocks_per_sample,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, so_b, so_l, so_d,
    sg_b, sg_d, ssh_b, ssh_d, ssc_b, ssc_d,
    eps,
    GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RTNE_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """out = LayerNorm(x') * (1 + scale) + shift, x' = x, or r = x + gate * y (stored) if GATED."""
    pid = tl.program_id(0)
    b = (pid // blocks_per_sample).to(tl.int64)
    row0 = ((pid % blocks_per_sample) * ROWS).to(tl.int64)
    rl = tl.arange(0, ROWS)  # offsets inside the tile: 32-bit unless WIDE (see _bwd_kernel)
    cols = tl.arange(0, BLOCK_D)
    if WIDE:
        rl = rl.to(tl.int64)
        cols = cols.to(tl.int64)
    row_ok = (row0 + rl) < L
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(
        X + (b * sx_b + row0 * sx_l) + (rl[:, None] * sx_l + cols[None, :] * sx_d),
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    if GATED:
        y = tl.load(
            Y + (b * sy_b + row0 * sy_l) + (rl[:, None] * sy_l + cols[None, :] * sy_d),
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        gate = tl.load(GATE + b * sg_b + cols * sg_d, mask=col_ok, other=0.0).to(tl.float32)
        r = _round(x + gate[None, :] * y, R.dtype.element_ty, RTNE_BF16)  # rounded, as stored
        tl.store(
            R + (b * sr_b + row0 * sr_l) + (rl[:, None] * sr_l + cols[None, :] * sr_d),
            r,
            mask=mask,
        )
        x = r.to(tl.float32)
    # Two-pass statistics in fp32: the mean, then the mean squared deviation.
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)

    shift = tl.load(SHIFT + b * ssh_b + cols * ssh_d, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * ssc_b + cols * ssc_d, mask=col_ok, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(
        OUT + (b * so_b + row0 * so_l) + (rl[:, None] * so_l + cols[None, :] * so_d),
        _round(out, OUT.dtype.element_ty, RTNE_BF16),
        mask=mask,
    )


@triton.jit
def _bwd_kernel(
    X, Y, GATE, SCALE, DR, DH, DX, DY, PART,
    L, D, rows_per_split, splits, plane,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sdr_b, sdr_l, sdr_d, sdh_b, sdh_l, sdh_d,
    sdx_b, sdx_l, sdx_d, sdy_b, sdy_l, sdy_d,
    sg_b, sg_d, ssc_b, ssc_d,
    eps,
    GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, RTNE_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """One (sample b, split s): rows [s * rows_per_split, ...) of b, ROWS at a time.

    With n = (x' - mean) * rstd and g = dh * (1 + scale) (x' = x, or r if GATED):
      dx' = rstd * (g - mean(g) - n * mean(g * n))       (means over the D channels)
      modulate: dx = dx'
      gated:    dx = dr + dx',  dy = gate * dx,  partial d gate += sum over rows of dx * y
      partial d shift += sum over rows of dh,  partial d scale += sum over rows of dh * n
    The partials go to PART[plane k][b][s][:] (k = 0 shift, 1 scale, 2 gate), fp32.
    """
    b = tl.program_id(0).to(tl.int64)  # axis 0: up to 2^31 - 1 samples
    s = tl.program_id(1)
    # Offsets inside a tile are 32-bit (64-bit where WIDE: the Python side checks the extent),
    # the sample and row-step bases 64-bit scalars.
    rl = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    if WIDE:
        rl = rl.to(tl.int64)
        cols = cols.to(tl.int64)
    col_ok = cols < D
    scale = tl.load(SCALE + b * ssc_b + cols * ssc_d, mask=col_ok, other=0.0).to(tl.float32)
    scale1 = 1.0 + scale
    if GATED:
        gate = tl.load(GATE + b * sg_b + cols * sg_d, mask=col_ok, other=0.0).to(tl.float32)
    # Column sums kept as tiles, added row-wise per step; reduced over the ROWS axis once at the
    # end (no cross-thread reduction inside the loop).
    acc_shift = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    start = s * rows_per_split
    end = tl.minimum(start + rows_per_split, L)
    # A while loop: Triton's interpreter cannot take range() over a run-time bound under
    # NumPy >= 2.4 (it converts a 1-element array to an int); compiled, it is the same loop.
    r0 = start
    while r0 < end:
        row0 = r0.to(tl.int64)
        mask = ((r0 + rl) < end)[:, None] & col_ok[None, :]
        r0 += ROWS
        x = tl.load(
            X + (b * sx_b + row0 * sx_l) + (rl[:, None] * sx_l + cols[None, :] * sx_d),
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        if GATED:
            y = tl.load(
                Y + (b * sy_b + row0 * sy_l) + (rl[:, None] * sy_l + cols[None, :] * sy_d),
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            x = _round(x + gate[None, :] * y, X.dtype.element_ty, RTNE_BF16).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        centred = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / D
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        n = centred * rstd[:, None]

        dh = tl.load(
            DH + (b * sdh_b + row0 * sdh_l) + (rl[:, None] * sdh_l + cols[None, :] * sdh_d),
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        g = dh * scale1[None, :]
        mean_g = tl.sum(g, axis=1) / D
        mean_gn = tl.sum(g * n, axis=1) / D
        dx = rstd[:, None] * (g - mean_g[:, None] - n * mean_gn[:, None])
        acc_shift += dh
        acc_scale += dh * n
        if GATED:
            dr = tl.load(
                DR + (b * sdr_b + row0 * sdr_l) + (rl[:, None] * sdr_l + cols[None, :] * sdr_d),
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            dx = dx + dr
            tl.store(
                DY + (b * sdy_b + row0 * sdy_l) + (rl[:, None] * sdy_l + cols[None, :] * sdy_d),
                _round(gate[None, :] * dx, DY.dtype.element_ty, RTNE_BF16),
                mask=mask,
            )
            acc_gate += dx * y  # y is 0 outside the mask
        tl.store(
            DX + (b * sdx_b + row0 * sdx_l) + (rl[:, None] * sdx_l + cols[None, :] * sdx_d),
            _round(dx, DX.dtype.element_ty, RTNE_BF16),
            mask=mask,
        )

    base = PART + (b * splits + s) * D + cols  # 64-bit: b is int64
    plane = tl.cast(plane, tl.int64)  # i32 or the constant 1; 2 * plane may pass 2^31
    tl.store(base, tl.sum(acc_shift, axis=0), mask=col_ok)
    tl.store(base + plane, tl.sum(acc_scale, axis=0), mask=col_ok)
    if GATED:
        tl.store(base + 2 * plane, tl.sum(acc_gate, axis=0), mask=col_ok)


@triton.jit
def _sum_splits_kernel(
    PART, O0, O1, O2,
    D, splits, plane,
    s0_b, s0_d, s1_b, s1_d, s2_b, s2_d,
    PLANES: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr, RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """O_k[b, :] = the sum over s of PART[k][b][s][:], rounded once to O_k's dtype: STEP splits
    at a time (a tile summed in a fixed tree), the steps in order. The channels-first backward
    leaves a partial row per tile (128 per sample at 64 x 64 tokens in 16-bit dtypes, 256 in
    float32): loading STEP rows per step keeps the chain of dependent loads short."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rows = tl.arange(0, STEP)
    ok = cols < D
    plane = tl.cast(plane, tl.int64)  # i32 or the constant 1; 2 * plane may pass 2^31
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    s = 0
    while s < splits:  # a while loop: see _bwd_kernel
        mask = ((s + rows) < splits)[:, None] & ok[None, :]
        p = PART + (b * splits + s + rows[:, None]) * D + cols[None, :]
        s += STEP
        acc0 += tl.sum(tl.load(p, mask=mask, other=0.0), axis=0)
        acc1 += tl.sum(tl.load(p + plane, mask=mask, other=0.0), axis=0)
        if PLANES == 3:
            acc2 += tl.sum(tl.load(p + 2 * plane, mask=mask, other=0.0), axis=0)
    tl.store(O0 + b * s0_b + cols * s0_d, _round(acc0, O0.dtype.element_ty, RTNE_BF16), mask=ok)
    tl.store(O1 + b * s1_b + cols * s1_d, _round(acc1, O1.dtype.element_ty, RTNE_BF16), mask=ok)
    if PLANES == 3:
        tl.store(O2 + b * s2_b + cols * s2_d, _round(acc2, O2.dtype.element_ty, RTNE_BF16), mask=ok)


# ----------------------------------------------------------------------------------------------
# Channels-first images: token tiles, channels in chunks
#
# In a (B, D, H, W) image each channel is a plane of L = H * W consecutive tokens, so a token's D
# values lie L elements apart. A tile of the kernels above holds whole rows: to read runs of
# tokens it must be tall, and a tall tile of whole rows does not fit in registers once D is
# large (runs of 2 tokens, and spills, at D = 1152 in the backward). The kernels below take a
# tile of TOKENS consecutive tokens (64 bytes of each channel plane, two 32-byte sectors where
# L * e is a multiple of 32) and walk its D channels in chunks of CHUNK, twice: the first pass
# takes the row statistics, the second writes. Registers do not grow with D (no spills at any
# D), and no lane idles on the padding of D to a power of two. The price is the second read of
# the tile, which comes from L2 when the tiles resident on the GPU fit there (the gated backward
# in bf16 holds 4 programs per SM by its registers: on an H100 at most 20 MB of tiles at each
# U-DiT-B stage with B 32, against 50 MB of L2), else from memory: then the forward moves 3 N e
# (modulate) and 6 N e (gated) bytes, the backward 5 N e and 9 N e (x, y and dout read twice),
# against 2, 4, 3 and 6 N e.
#
# The statistics take one pass, merged chunk by chunk (Chan, Golub and LeVeque's pairwise update,
# per token) on values shifted by the first chunk's mean: each chunk's deviations are taken from
# the chunk's own mean and summed element-wise across the chunks, and the chunk means are merged
# into a running mean, with the sum of squares between them (delta^2 * seen * width /
# (seen + width) per chunk). The backward's sum of g (x' - mean) is merged alike (the co-moment
# of g and x': within each chunk from both chunk means, plus delta * delta_g * seen * width /
# (seen + width)), g shifted by its own first-chunk mean. Each part covers one failure: without
# the merge, a shift alone loses up to a factor D / CHUNK of precision where the first chunk sits
# apart from the rest (24 at D = 1536 in float32: over the tolerance rule, the first version);
# without the shift, each chunk mean is rounded at the scale of a large common mean (1e4: errors
# 3-15 times larger, near the rule's bound). tests/test_adaln.py has both inputs.
#
# The sums over tokens (d shift, d scale, d gate) are one partial row per tile, added in tile
# order by _sum_splits_kernel: deterministic.


@triton.jit
def _at(P, b, row0, c0, rl, cols, s_b, s_l, s_d):
    """Pointers to the (TOKENS, CHUNK) tile of sample b, tokens row0 + rl, channels c0 + cols
    (b, row0, c0 64-bit scalars; the in-tile offsets 32-bit unless WIDE made rl, cols 64-bit)."""
    return P + (b * s_b + row0 * s_l + c0 * s_d) + (rl[:, None] * s_l + cols[None, :] * s_d)


@triton.jit
def _cf_rows(
    X, Y, GATE, R, b, row0, c0, rl, cols, col_ok, mask,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, sg_b, sg_d,
    GATED: tl.constexpr, STORE_R: tl.constexpr, RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """(x', y, gate) of the tile's channels [c0, c0 + CHUNK), in fp32, 0 outside ``mask``: x' is
    x, or r = x + gate * y rounded to r's dtype (and stored if STORE_R) when GATED."""
    x = tl.load(
        _at(X, b, row0, c0, rl, cols, sx_b, sx_l, sx_d),
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    y = x
    gate = tl.zeros_like(cols).to(tl.float32)
    if GATED:
        y = tl.load(
            _at(Y, b, row0, c0, rl, cols, sy_b, sy_l, sy_d),
            mask=mask,
            other=0.0,
        ).to(tl.float32)
        gate = tl.load(GATE + b * sg_b + (c0 + cols) * sg_d, mask=col_ok, other=0.0)
        gate = gate.to(tl.float32)
        r = _round(x + gate[None, :] * y, R.dtype.element_ty, RTNE_BF16)
        if STORE_R:
            tl.store(_at(R, b, row0, c0, rl, cols, sr_b, sr_l, sr_d), r, mask=mask)
        x = r.to(tl.float32)
    return x, y, gate


@triton.jit
def _cf_dout(DH, SCALE, b, row0, c0, rl, cols, col_ok, mask, sdh_b, sdh_l, sdh_d, ssc_b, ssc_d):
    """(dout, g = dout * (1 + scale)) of the tile's channels [c0, c0 + CHUNK), fp32, 0 outside
    ``mask``."""
    dh = tl.load(
        _at(DH, b, row0, c0, rl, cols, sdh_b, sdh_l, sdh_d),
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    scale = tl.load(SCALE + b * ssc_b + (c0 + cols) * ssc_d, mask=col_ok, other=0.0)
    return dh, dh * (1.0 + scale.to(tl.float32)[None, :])


@triton.jit
def _cf_statistics(
    X, Y, GATE, R, DH, SCALE, b, row0, rl, cols, row_ok, D,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, sg_b, sg_d,
    sdh_b, sdh_l, sdh_d, ssc_b, ssc_d,
    eps,
    GATED: tl.constexpr, STORE_R: tl.constexpr, GRAD: tl.constexpr, TOKENS: tl.constexpr,
    CHUNK: tl.constexpr, RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """The first pass over a tile's channels: per token, (mean, rstd) of x' (r stored if
    STORE_R) and, if GRAD, (mean(g), mean(g n)) with g = dout * (1 + scale). The values are
    shifted by the first chunk's means, deviations taken within each chunk from the chunk's
    means, and the chunks merged as they come (see the section's comment)."""
    shift = tl.zeros([TOKENS], dtype=tl.float32)  # the first chunk's means of x' and of g
    shift_g = tl.zeros([TOKENS], dtype=tl.float32)
    mean = tl.zeros([TOKENS], dtype=tl.float32)  # of the shifted values, merged so far
    mean_g = tl.zeros([TOKENS], dtype=tl.float32)
    between = tl.zeros([TOKENS], dtype=tl.float32)  # sum of squares between the chunks' means
    between_g = tl.zeros([TOKENS], dtype=tl.float32)  # and the co-moment with g's
    within = tl.zeros([TOKENS, CHUNK], dtype=tl.float32)  # within the chunks, element-wise
    within_g = tl.zeros([TOKENS, CHUNK], dtype=tl.float32)
    c0 = b * 0  # 64-bit: c0 * (channel stride) may pass 2^31
    while c0 < D:
        col_ok = (c0 + cols) < D
        mask = row_ok[:, None] & col_ok[None, :]
        x, y, gate = _cf_rows(
            X, Y, GATE, R, b, row0, c0, rl, cols, col_ok, mask,
            sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, sg_b, sg_d,
            GATED=GATED, STORE_R=STORE_R, RTNE_BF16=RTNE_BF16,
        )  # fmt: skip
        width = tl.minimum(D - c0, CHUNK).to(tl.float32)  # channels in this chunk
        seen = c0.to(tl.float32)  # channels merged before it (every earlier chunk is full)
        weight = seen * width / (seen + width)
        if c0 == 0:
            shift = tl.sum(x, axis=1) / width
        x = tl.where(mask, x - shift[:, None], 0.0)
        chunk_mean = tl.sum(x, axis=1) / width
        u = tl.where(mask, x - chunk_mean[:, None], 0.0)
        within += u * u
        delta = chunk_mean - mean
        mean += delta * (width / (seen + width))
        between += delta * delta * weight
        if GRAD:
            dh, g = _cf_dout(
                DH, SCALE, b, row0, c0, rl, cols, col_ok, mask, sdh_b, sdh_l, sdh_d, ssc_b, ssc_d
            )
            if c0 == 0:
                shift_g = tl.sum(g, axis=1) / width
            g = tl.where(mask, g - shift_g[:, None], 0.0)
            chunk_mean_g = tl.sum(g, axis=1) / width
            within_g += u * tl.where(mask, g - chunk_mean_g[:, None], 0.0)
            delta_g = chunk_mean_g - mean_g
            mean_g += delta_g * (width / (seen + width))
            between_g += delta * delta_g * weight
        c0 += CHUNK
    var = (tl.sum(within, axis=1) + between) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    mean_gn = rstd * (tl.sum(within_g, axis=1) + between_g) / D
    return shift + mean, rstd, shift_g + mean_g, mean_gn


@triton.jit
def _cf_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, R, OUT,
    L, D, tiles_per_sample,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, so_b, so_l, so_d,
    sg_b, sg_d, ssh_b, ssh_d, ssc_b, ssc_d,
    eps,
    GATED: tl.constexpr, TOKENS: tl.constexpr, CHUNK: tl.constexpr, RTNE_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """_fwd_kernel's results for one tile: TOKENS tokens of one sample, all D channels."""
    rl = tl.arange(0, TOKENS)
    cols = tl.arange(0, CHUNK)
    if WIDE:
        rl = rl.to(tl.int64)
        cols = cols.to(tl.int64)
    tile = tl.program_id(0)
    b = (tile // tiles_per_sample).to(tl.int64)
    row0 = ((tile % tiles_per_sample) * TOKENS).to(tl.int64)
    row_ok = (row0 + rl) < L

    # Pass 1: the statistics (and r, stored).
    mean, rstd, _, _ = _cf_statistics(
        X, Y, GATE, R, X, SCALE, b, row0, rl, cols, row_ok, D,
        sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, sg_b, sg_d,
        sx_b, sx_l, sx_d, ssc_b, ssc_d,
        eps,
        GATED=GATED, STORE_R=GATED, GRAD=False, TOKENS=TOKENS, CHUNK=CHUNK,
        RTNE_BF16=RTNE_BF16,
    )  # fmt: skip

    # Pass 2: the output (r recomputed bit for bit, not re-read).
    c0 = b * 0
    while c0 < D:
        col_ok = (c0 + cols) < D
        mask = row_ok[:, None] & col_ok[None, :]
        x, y, gate = _cf_rows(
            X, Y, GATE, R, b, row0, c0, rl, cols, col_ok, mask,
            sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sr_b, sr_l, sr_d, sg_b, sg_d,
            GATED=GATED, STORE_R=False, RTNE_BF16=RTNE_BF16,
        )  # fmt: skip
        shift = tl.load(SHIFT + b * ssh_b + (c0 + cols) * ssh_d, mask=col_ok, other=0.0)
        scale = tl.load(SCALE + b * ssc_b + (c0 + cols) * ssc_d, mask=col_ok, other=0.0)
        n = (x - mean[:, None]) * rstd[:, None]
        out = n * (1.0 + scale.to(tl.float32)[None, :]) + shift.to(tl.float32)[None, :]
        tl.store(
            _at(OUT, b, row0, c0, rl, cols, so_b, so_l, so_d),
            _round(out, OUT.dtype.element_ty, RTNE_BF16),
            mask=mask,
        )
        c0 += CHUNK


@triton.jit
def _cf_bwd_kernel(
    X, Y, GATE, SCALE, DR, DH, DX, DY, PART,
    L, D, tiles_per_sample, plane,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sdr_b, sdr_l, sdr_d, sdh_b, sdh_l, sdh_d,
    sdx_b, sdx_l, sdx_d, sdy_b, sdy_l, sdy_d,
    sg_b, sg_d, ssc_b, ssc_d,
    eps,
    GATED: tl.constexpr, TOKENS: tl.constexpr, CHUNK: tl.constexpr, RTNE_BF16: tl.constexpr,
    WIDE: tl.constexpr,
):  # fmt: skip
    """_bwd_kernel's gradients (formulas there); the partial sums of tile s of sample b go to
    PART[plane k][b][s][:], one row per tile (_sum_splits_kernel adds them, splits = tiles per
    sample)."""
    rl = tl.arange(0, TOKENS)
    cols = tl.arange(0, CHUNK)
    if WIDE:
        rl = rl.to(tl.int64)
        cols = cols.to(tl.int64)
    plane = tl.cast(plane, tl.int64)  # i32 or the constant 1; 2 * plane may pass 2^31
    tile = tl.program_id(0)
    b = (tile // tiles_per_sample).to(tl.int64)
    s = tile % tiles_per_sample
    row0 = (s * TOKENS).to(tl.int64)
    part = PART + (b * tiles_per_sample + s) * D  # 64-bit: b is int64
    row_ok = (row0 + rl) < L

    # Pass 1: the statistics, and mean(g), mean(g n) (formulas: _bwd_kernel).
    mean, rstd, mean_g, mean_gn = _cf_statistics(
        X, Y, GATE, X, DH, SCALE, b, row0, rl, cols, row_ok, D,
        sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sx_b, sx_l, sx_d, sg_b, sg_d,
        sdh_b, sdh_l, sdh_d, ssc_b, ssc_d,
        eps,
        GATED=GATED, STORE_R=False, GRAD=True, TOKENS=TOKENS, CHUNK=CHUNK,
        RTNE_BF16=RTNE_BF16,
    )  # fmt: skip

    # Pass 2: dx (and dy), and the tile's partial sums over its tokens.
    c0 = b * 0
    while c0 < D:
        col_ok = (c0 + cols) < D
        mask = row_ok[:, None] & col_ok[None, :]
        x, y, gate = _cf_rows(
            X, Y, GATE, X, b, row0, c0, rl, cols, col_ok, mask,
            sx_b, sx_l, sx_d, sy_b, sy_l, sy_d, sx_b, sx_l, sx_d, sg_b, sg_d,
            GATED=GATED, STORE_R=False, RTNE_BF16=RTNE_BF16,
        )  # fmt: skip
        n = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dh, g = _cf_dout(
            DH, SCALE, b, row0, c0, rl, cols, col_ok, mask, sdh_b, sdh_l, sdh_d, ssc_b, ssc_d
        )
        dx = rstd[:, None] * (g - mean_g[:, None] - n * mean_gn[:, None])
        tl.store(part + c0 + cols, tl.sum(dh, axis=0), mask=col_ok)
        tl.store(part + plane + c0 + cols, tl.sum(dh * n, axis=0), mask=col_ok)
        if GATED:
            dx += tl.load(
                _at(DR, b, row0, c0, rl, cols, sdr_b, sdr_l, sdr_d),
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            tl.store(
                _at(DY, b, row0, c0, rl, cols, sdy_b, sdy_l, sdy_d),
                _round(gate[None, :] * dx, DY.dtype.element_ty, RTNE_BF16),
                mask=mask,
            )
            # y is 0 outside the mask
            tl.store(part + 2 * plane + c0 + cols, tl.sum(dx * y, axis=0), mask=col_ok)
        tl.store(
            _at(DX, b, row0, c0, rl, cols, sdx_b, sdx_l, sdx_d),
            _round(dx, DX.dtype.element_ty, RTNE_BF16),
            mask=mask,
        )
        c0 += CHUNK


# ----------------------------------------------------------------------------------------------
# Python side: layouts, launch shapes, and the functions the op registers


MAX_D = 16384  # the whole-row kernels (tokens, channels-last); channels-first takes any D
# Row indices, program ids and split bounds (up to twice L) are 32-bit in the kernels.
MAX_ROWS = 2**30
MIN_SPLIT_ROWS = 16  # rows per (sample, split) program in the backward, at least (on a GPU)


def _rows_view(t: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """(L, D, stride_b, stride_l, stride_d) of ``t`` read as (B, L, D) rows, or None."""
    if t.dim() == 3:
        return t.shape[1], t.shape[2], t.stride(0), t.stride(1), t.stride(2)
    _, d, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        return None  # H and W do not merge into one strided dimension
    sl = t.stride(3) if w > 1 else t.stride(2)
    return h * w, d, t.stride(0), sl, t.stride(1)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    view = _rows_view(t)
    assert view is not None
    return view[2:]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it reads as rows, else a contiguous copy (a gradient of odd strides)."""
    return t if _rows_view(t) is not None else t.contiguous()


def _reason(name: str, t: torch.Tensor) -> str:
    """Why the kernels cannot read ``t`` (x, or y) as rows, or "" if they can."""
    if t.dtype not in _DTYPES:
        return dtype_reason(t)
    dim = t.shape[-1] if t.dim() == 3 else t.shape[1]
    view = _rows_view(t)
    if view is None:
        return f"{name}'s H and W dimensions do not merge into one strided dimension"
    if name == "x" and dim > MAX_D and not _channels_first(dim, view[4]):
        # x's layout picks the kernels; only those of whole rows have a bound on D
        return (
            f"the triton kernel keeps a row of adjacent channels in registers and takes "
            f"D <= {MAX_D}, got {dim} (channels-first images take any D)"
        )
    rows = t.numel() // max(1, dim)
    if rows >= MAX_ROWS:
        return f"the triton kernels count rows in 32 bits and take B * L < 2^30, got {rows}"
    return ""


def _conds_reason(**conds: torch.Tensor) -> str:
    """Under autocast the (B, D) vectors may have their own dtypes (each is read as it is)."""
    for t in conds.values():
        if t.dtype not in _DTYPES:
            return dtype_reason(t)
    return ""


def supports_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> str:
    return _reason("x", x) or _conds_reason(shift=shift, scale=scale)


def supports_gated(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> str:
    return _reason("x", x) or _reason("y", y) or _conds_reason(gate=gate, shift=shift, scale=scale)


supports = supports_modulate  # the name the first registration used


# Registers a thread of the whole-row backward may use (Triton's maxnreg): 32 resident warps
# an SM (65536 / (32 * 32)) whatever the warps of a program, the count _splits plans for.
BWD_REGISTERS = 64


# 1024 threads a program: 32 warps of 32 on NVIDIA GPUs, 16 wavefronts of 64 on AMD's.
MAX_WARPS = 16 if torch.version.hip else 32


def _bwd_options() -> dict:
    """The backward's launch options: maxnreg where Triton's target takes it (NVIDIA's; AMD's
    launcher rejects an option it does not know)."""
    return {} if torch.version.hip else {"maxnreg": BWD_REGISTERS}


def _launch_shape(length: int, dim: int, backward: bool) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) of a tile of whole rows (tokens and channels-last; register
    use checked by compiling for sm_90 with the bundled ptxas, tests/test_triton_compile.py:
    see the module's docstring for the few spills).

    Forward: about 4096 elements, 16 per thread. Backward (four row tensors live at once, and
    three column-sum tiles): one row a step at 4 elements a thread up to D = 4096 (32 warps;
    8 a thread at 8192, 16 at 16384), rows packed into one warp only below D = 128. Uncapped,
    one row took 46-72 registers a thread (capped at BWD_REGISTERS: 64) and keeps its
    reductions to the fewest warps; a (ROWS, BLOCK_D) tile of several rows took 76-86 at the
    same 4 elements a thread, which at 16 warps left one program (16 warps) an SM where the
    register file holds 32 (DiT-B and DiT-L widths, sm_90 ptxas)."""
    block_d = triton.next_power_of_2(dim)
    if not backward:
        rows = min(max(1, min(64, 4096 // block_d)), triton.next_power_of_2(length))
        return rows, block_d, max(1, min(16, rows * block_d // 512))
    rows = min(max(1, 128 // block_d), triton.next_power_of_2(length))
    return rows, block_d, max(1, min(MAX_WARPS, block_d // 128))


CF_RUN_BYTES = 64  # bytes of each channel plane a channels-first tile reads: two 32-byte sectors
CF_WARPS = 4


def _cf_tokens(batch: int, length: int, elem: int, device: torch.device) -> int:
    """TOKENS of the channels-first kernels: runs of CF_RUN_BYTES (16 tokens in fp32, 32 in
    16-bit dtypes), halved to runs of one 32-byte sector when that leaves fewer than 4 tiles per
    SM (a batch of small images: U-DiT's last stage has 64 tokens at 256 px) so as to fill the
    GPU. On the CPU (the interpreter) the bound is 4 tiles, so that the tests see both sizes."""
    tokens = CF_RUN_BYTES // elem
    wanted = 4 * (_sm_count(device.index or 0) if device.type == "cuda" else 1)
    if batch * triton.cdiv(length, tokens) < wanted:
        tokens //= 2
    return tokens


def _cf_shape(tokens: int, dim: int, backward: bool) -> tuple[int, int]:
    """(CHUNK, num_warps) of the channels-first kernels: tiles of TOKENS by CHUNK channels, about
    2048 elements in the forward (16 a thread) and 1024 in the backward (8 a thread: two sums and
    the loaded tiles are live across the chunks). CHUNK is the largest power of two up to that
    which divides D (U-DiT's widths are multiples of 32 and need no masked chunk), else the
    whole bound with the last chunk masked."""
    most = (1024 if backward else 2048) // tokens
    chunk = most
    while chunk > 16 and dim % chunk:
        chunk //= 2
    if dim % chunk:
        chunk = min(most, triton.next_power_of_2(dim))
    return chunk, CF_WARPS


def _channels_first(dim: int, channel_stride: int) -> bool:
    """True for layouts whose channels are not adjacent (channels-first images): the kernels
    with token tiles and channel chunks serve them."""
    return channel_stride != 1 and dim > 1


def _splits(
    batch: int, length: int, rows: int, warps: int, device: torch.device
) -> tuple[int, int]:
    """(splits, rows_per_split): each sample's rows cut into ``splits`` programs whose B *
    splits programs fill their waves best (wave_splits; 32 resident warps per SM: the backward
    is capped at BWD_REGISTERS), each with at least MIN_SPLIT_ROWS rows. On the
    CPU (the interpreter): 4 program slots, at least 2 rows each, so that the tests see several
    splits."""
    if device.type == "cuda":
        programs = _sm_count(device.index or 0) * max(1, 32 // warps)
        min_rows = MIN_SPLIT_ROWS
    else:
        programs, min_rows = 4, 2
    steps = triton.cdiv(length, rows)
    splits = _wave_splits(batch, programs, min(steps, length // min_rows))
    rows_per_split = triton.cdiv(steps, splits) * rows
    return triton.cdiv(length, rows_per_split), rows_per_split


def _sum_shape(dim: int, splits: int) -> tuple[int, int]:
    """(BLOCK, STEP) of _sum_splits_kernel: BLOCK channels a program, STEP partial rows a step
    (up to 8; 2048 values a step, 16 a thread)."""
    step = min(8, triton.next_power_of_2(splits))
    return min(2048 // step, triton.next_power_of_2(dim)), step


def _wide(rows: int, block_d: int, tensors) -> bool:
    """True when a tile's element offsets may not fit in 32 bits (then they are 64-bit)."""
    extent = 0
    for t in tensors:
        if t.dim() == 2:  # a (B, D) conditioning vector
            extent = max(extent, block_d * abs(t.stride(1)))
        else:
            _, _, _, sl, sd = _rows_view(t)
            extent = max(extent, rows * abs(sl) + block_d * abs(sd))
    return extent >= 2**31


def _forward(x, y, gate, shift, scale, eps):
    gated = y is not None
    out = _checks.empty_like_layout(x)
    res = _checks.empty_like_layout(x) if gated else out
    length, dim, *sx = _rows_view(x)
    sy = _strides(y) if gated else (0, 0, 0)
    gate = gate if gated else shift
    args = (
        x, y if gated else x, gate, shift, scale, res, out,
        length, dim,
    )  # fmt: skip
    strides = (
        *sx, *sy, *_strides(res), *_strides(out),
        *gate.stride(), *shift.stride(), *scale.stride(),
        eps,
    )  # fmt: skip
    tensors = [t for t in (x, y, res, out, gate, shift, scale) if t is not None]
    with _device_context(x):
        if _channels_first(dim, sx[2]):
            tokens = _cf_tokens(x.shape[0], length, x.element_size(), x.device)
            chunk, warps = _cf_shape(tokens, dim, backward=False)
            per_sample = triton.cdiv(length, tokens)
            _cf_fwd_kernel[(x.shape[0] * per_sample,)](
                *args, per_sample, *strides,
                GATED=gated, TOKENS=tokens, CHUNK=chunk, RTNE_BF16=_RTNE_BF16,
                WIDE=_wide(tokens, chunk, tensors), num_warps=warps,
            )  # fmt: skip
        else:
            rows, block_d, warps = _launch_shape(length, dim, backward=False)
            blocks = triton.cdiv(length, rows)
            _fwd_kernel[(x.shape[0] * blocks,)](
                *args, blocks, *strides,
                GATED=gated, ROWS=rows, BLOCK_D=block_d, RTNE_BF16=_RTNE_BF16,
                WIDE=_wide(rows, block_d, tensors), num_warps=warps,
            )  # fmt: skip
    return (res, out) if gated else out


def modulate_forward(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    return _forward(x, None, None, shift, scale, eps)


def gated_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, y, gate, shift, scale, eps)


def _backward(x, y, gate, shift, scale, dr, dh, eps):
    gated = y is not None
    batch = x.shape[0]
    length, dim, *sx = _rows_view(x)
    dh = _as_rows(dh)
    dx = torch.empty_like(x)  # the layout the framework's fake backward promises
    if gated:
        dr, dy = _as_rows(dr), torch.empty_like(y)
        sy, sdr, sdy = _strides(y), _strides(dr), _strides(dy)
    else:
        dr, dy, gate = x, x, scale
        sy = sdr = sdy = (0, 0, 0)
    planes = 3 if gated else 2
    grads = [torch.empty_like(t) for t in (shift, scale, gate)[:planes]]  # d shift, d scale, d gate
    args = (x, y if gated else x, gate, scale, dr, dh, dx, dy)
    strides = (
        *sx, *sy, *sdr, *_strides(dh), *_strides(dx), *sdy,
        *gate.stride(), *scale.stride(),
        eps,
    )  # fmt: skip
    tensors = (x, y if gated else x, dr, dh, dx, dy, gate, scale)
    with _device_context(x):
        if _channels_first(dim, sx[2]):
            tokens = _cf_tokens(batch, length, x.element_size(), x.device)
            chunk, warps = _cf_shape(tokens, dim, backward=True)
            splits = triton.cdiv(length, tokens)  # one partial row per tile
            plane = batch * splits * dim
            part = torch.empty(planes * plane, dtype=torch.float32, device=x.device)
            _cf_bwd_kernel[(batch * splits,)](
                *args, part, length, dim, splits, plane, *strides,
                GATED=gated, TOKENS=tokens, CHUNK=chunk, RTNE_BF16=_RTNE_BF16,
                WIDE=_wide(tokens, chunk, tensors), num_warps=warps,
            )  # fmt: skip
        else:
            rows, block_d, warps = _launch_shape(length, dim, backward=True)
            splits, rows_per_split = _splits(batch, length, rows, warps, x.device)
            plane = batch * splits * dim
            part = torch.empty(planes * plane, dtype=torch.float32, device=x.device)
            _bwd_kernel[(batch, splits)](
                *args, part, length, dim, rows_per_split, splits, plane, *strides,
                GATED=gated, ROWS=rows, BLOCK_D=block_d, RTNE_BF16=_RTNE_BF16,
                WIDE=_wide(rows, block_d, tensors), num_warps=warps, **_bwd_options(),
            )  # fmt: skip
        block, step = _sum_shape(dim, splits)
        outs = grads + [grads[0]] * (3 - planes)
        _sum_splits_kernel[(batch, triton.cdiv(dim, block))](
            part, *outs,
            dim, splits, plane,
            *(s for o in outs for s in o.stride()),
            PLANES=planes, BLOCK=block, STEP=step, RTNE_BF16=_RTNE_BF16, num_warps=4,
        )  # fmt: skip
    dshift, dscale = grads[0], grads[1]
    if gated:
        return [dx, dy, grads[2], dshift, dscale]
    return [dx, dshift, dscale]


def modulate_backward(grads, inputs) -> list[torch.Tensor]:
    """Gradients of x, shift, scale for the cotangent ``grads[0]`` of the output."""
    x, shift, scale, eps = inputs
    return _backward(x, None, None, shift, scale, None, grads[0], eps)


def gated_backward(grads, inputs) -> list[torch.Tensor]:
    """Gradients of x, y, gate, shift, scale for the cotangents (d r, d out) of the outputs."""
    x, y, gate, shift, scale, eps = inputs
    return _backward(x, y, gate, shift, scale, grads[0], grads[1], eps)
