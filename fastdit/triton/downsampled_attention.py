"""Triton kernels of the downsampled_attention family (reference and formulas:
fastdit/ops/downsampled_attention.py).

Attention within groups, flash style: one program owns BM query rows of one (group, head) and
streams the group's keys BN at a time with an online softmax, so the (n, n) logits never reach
memory. Fused into the loads of q and k: RoPE2D (a (2, n, hd/2) cos/sin table, optional), the
L2 normalisation (cosine attention) and the multiplication by the logits' scale (one fp32 value
a head, computed by torch beforehand: exp(min(logit_scale, 4.6052)), or hd^-0.5 for plain
attention). q and k are handled as their even and odd channels (the RoPE
pairs): ``q . k = q_even . k_even + q_odd . k_odd``, so the rotation is elementwise.

Addressing: q, k, v, and their gradients, are (G, heads, n, hd) with any strides whose channel
offsets fit 32 bits (else the glue copies, or writes through a buffer), so they may be views of
the qkv projection ``(B, 4, n, 3d)`` (G = B*4 groups, head h at channels h*hd..). The
output (and its gradient) is either the same kind of (G, heads, n, hd) tensor, or (MERGE) the
merged image ``(B, d, H, W)`` of any memory format: token i of group g = 2a + b of sample s is
pixel (2 (i // gw) + a, 2 (i % gw) + b), channel h*hd + c. That store is the polyphase merge.

Precision: every product in fp32 (the reference computes in fp32): IEEE for fp32 inputs, TF32x3
on the tensor cores for fp16/bf16 inputs (about fp32 accuracy; plain TF32 or bf16 operands
would put errors of 1e-3 relative into logits scaled by up to 100).

Kernels (Z = G * heads problems of n tokens, e bytes per element):
- ``_attn_fwd_kernel``: o and the base-2 log-sum-exp of each row (fp32, for the backward).
  Bytes: read q, k, v once per program row block... (k, v re-read per query block, from L2),
  write o: ~4 Z n hd e.
- ``_attn_bwd_dq_kernel``: delta = rowsum(o * do) (stored for the next kernel), dq (through the
  normalisation and the inverse rotation), and per-program partial sums for d logit_scale.
- ``_attn_bwd_dkdv_kernel``: dk, dv for BN keys, streaming the query blocks.
The backward recomputes the forward first (the op saves only its inputs): 3 passes over q, k, v.
All sums over tokens are in registers or fixed-order partials: deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.downsampled_attention import (
    LOGIT_SCALE_MAX,
    _heads_view,
    cosine_scale,
    layer_backward_with,
    layer_forward_with,
)
from ._common import INTERPRETED, RTNE_BF16, _round, device_context, dtype_reason

MAX_HEAD_DIM = 128
# The attention kernels run on a (groups x heads, row blocks) grid: the (group, head) problems
# on the first axis (below 2^31), the blocks of 16 to 64 rows on the second (at most 65535, the
# limit of a CUDA grid's second axis).
MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535
# The same constants as the kernels see them (a jit function reads only constexpr globals).
LOG2E_ = tl.constexpr(1.4426950408889634)
NORMALIZE_EPS_ = tl.constexpr(1e-12)


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b, fp32 operands, in PRECISION on the GPU. The interpreter computes in numpy
    fp32; for "tf32" it first truncates the operands as the tensor cores read them (Triton
    passes fp32 bits to mma.sync .tf32 unrounded, and the hardware drops the low 13), so that
    CI sees TF32's error where a GPU would ("tf32x3" and "ieee" are fp32-accurate: numpy's)."""
    if INTERPRETED:
        if PRECISION == "tf32":
            a = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            b = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_pairs(P, rows_off, row_ok, half, half_ok, s_c):
    """(even, odd) channels of a (rows, hd) tile: two (rows, HALF) fp32 tiles."""
    mask = row_ok[:, None] & half_ok[None, :]
    base = P + rows_off[:, None] + (2 * half * s_c)[None, :]
    even = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(base + s_c, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _prologue(even, odd, i, row_ok, half, half_ok, TABLE, n, half_dim, ROPE: tl.constexpr,
              COSINE: tl.constexpr):  # fmt: skip
    """Rotate (RoPE2D: pair m of token i turned by the table's angle) and, for cosine
    attention, normalise each row to unit length. Returns (even, odd, inverse norm)."""
    if ROPE:
        mask = row_ok[:, None] & half_ok[None, :]
        t = TABLE + i.to(tl.int64)[:, None] * half_dim + half[None, :]
        cos = tl.load(t, mask=mask, other=1.0)
        sin = tl.load(t + n * half_dim, mask=mask, other=0.0)
        even, odd = even * cos - odd * sin, even * sin + odd * cos
    inv = tl.full(i.shape, 1.0, tl.float32)
    if COSINE:
        norm = tl.sqrt_rn(tl.sum(even * even + odd * odd, axis=1))
        # where the norm is clamped, inv is the constant 1 / eps that _epilogue tests for (a
        # GPU's "/" is div.full, up to 2 ulp off: 1.0 / eps computed there might miss it);
        # the maximum keeps the untaken branch finite for rows of zeros (and padding rows)
        inv = tl.where(
            norm > NORMALIZE_EPS_, 1.0 / tl.maximum(norm, NORMALIZE_EPS_), 1.0 / NORMALIZE_EPS_
        )
        even = even * inv[:, None]
        odd = odd * inv[:, None]
    return even, odd, inv


@triton.jit
def _epilogue(de, do_, e, o, inv, i, row_ok, half, half_ok, TABLE, n, half_dim,
              ROPE: tl.constexpr, COSINE: tl.constexpr):  # fmt: skip
    """The backward of _prologue: gradients (de, do_) of the normalised, rotated pairs (e, o)
    to gradients of the input pairs. F.normalize: u / max(|u|, eps) has the Jacobian
    (I - u^ u^T) / |u| where |u| >= eps, and I / eps below."""
    if COSINE:
        dot = tl.sum(de * e + do_ * o, axis=1)
        clamped = inv >= 1.0 / NORMALIZE_EPS_  # |u| <= eps: no projection
        dot = tl.where(clamped, 0.0, dot)
        de = (de - e * dot[:, None]) * inv[:, None]
        do_ = (do_ - o * dot[:, None]) * inv[:, None]
    if ROPE:
        mask = row_ok[:, None] & half_ok[None, :]
        t = TABLE + i.to(tl.int64)[:, None] * half_dim + half[None, :]
        cos = tl.load(t, mask=mask, other=1.0)
        sin = tl.load(t + n * half_dim, mask=mask, other=0.0)
        de, do_ = de * cos + do_ * sin, do_ * cos - de * sin
    return de, do_


@triton.jit
def _out_offsets(z, h, i, cols, hd, gw, so_0, so_1, so_2, so_3, MERGE: tl.constexpr):
    """Offsets of the output tile: rows i (tokens), columns cols (channels of head h).
    Plain: (G, heads, n, hd) strides so_0..3. MERGE: image (B, d, H, W) strides so_0..3."""
    if MERGE:
        s = z // 4
        g = z % 4
        y = 2 * (i // gw) + g // 2
        x = 2 * (i % gw) + g % 2
        rows = s * so_0 + y.to(tl.int64) * so_2 + x.to(tl.int64) * so_3
        return rows[:, None] + ((h * hd + cols).to(tl.int64) * so_1)[None, :]
    rows = z * so_0 + h * so_1 + i.to(tl.int64) * so_2
    return rows[:, None] + (cols.to(tl.int64) * so_3)[None, :]


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, SCALE, TABLE, OUT, DO, STATS,
    heads, n, hd, gw,
    sq_z, sq_h, sq_n, sq_c, sk_z, sk_h, sk_n, sk_c, sv_z, sv_h, sv_n, sv_c,
    so_0, so_1, so_2, so_3,
    ROPE: tl.constexpr, COSINE: tl.constexpr, MERGE: tl.constexpr, BACKWARD: tl.constexpr,
    STORE_O: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
    PRECISION: tl.constexpr, FAST: tl.constexpr, RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    zh = tl.program_id(0)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)  # h * (a head stride) may pass 2^31
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    i_ok = i < n
    half = tl.arange(0, HALF)
    half_dim = hd // 2
    half_ok = half < half_dim
    cols = tl.arange(0, HD)
    cols_ok = cols < hd
    scale = tl.load(SCALE + h)  # the logits' scale, fp32: see _Problem

    qe, qo = _load_pairs(Q + z * sq_z + h * sq_h, i.to(tl.int64) * sq_n, i_ok, half, half_ok, sq_c)
    qe, qo, q_inv = _prologue(qe, qo, i, i_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
    qe = qe * (scale * LOG2E_)  # logits in base-2 units: exp2 below
    qo = qo * (scale * LOG2E_)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, HD], tl.float32)
    j0 = 0
    while j0 < n:
        j = j0 + tl.arange(0, BN)
        j0 += BN
        j_ok = j < n
        ke, ko = _load_pairs(K + z * sk_z + h * sk_h, j.to(tl.int64) * sk_n, j_ok, half, half_ok,
                             sk_c)  # fmt: skip
        ke, ko, k_inv = _prologue(ke, ko, j, j_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
        s = _mm(qe, tl.trans(ke), tl.zeros([BM, BN], tl.float32), PRECISION, INTERPRETED)
        s = _mm(qo, tl.trans(ko), s, PRECISION, INTERPRETED)
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + z * sv_z + h * sv_h + j.to(tl.int64)[:, None] * sv_n + (cols * sv_c)[None, :],
            mask=j_ok[:, None] & cols_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = _mm(p, v, acc * alpha[:, None], FAST, INTERPRETED)
        m_i = m_new
    l_inv = 1.0 / l_i
    out = acc * l_inv[:, None]
    rc = i_ok[:, None] & cols_ok[None, :]
    if BACKWARD:
        # The row statistics for the backward: the running max, 1 / the sum, and delta =
        # rowsum(o * do) from the fp32 o (the rounded output would put its rounding error,
        # times the logit scale, into every gradient).
        do = tl.load(DO + _out_offsets(z, h, i, cols, hd, gw, so_0, so_1, so_2, so_3, MERGE),
                     mask=rc, other=0.0).to(tl.float32)  # fmt: skip
        row = STATS + (zh.to(tl.int64) * n + i) * 3
        tl.store(row, m_i, mask=i_ok)
        tl.store(row + 1, l_inv, mask=i_ok)
        tl.store(row + 2, tl.sum(out * do, axis=1), mask=i_ok)
    if STORE_O:
        tl.store(
            OUT + _out_offsets(z, h, i, cols, hd, gw, so_0, so_1, so_2, so_3, MERGE),
            _round(out, OUT.dtype.element_ty, RTNE_BF16),
            mask=rc,
        )


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, SCALE, TABLE, DO, STATS, DQ, DLS,
    heads, n, hd, gw,
    sq_z, sq_h, sq_n, sq_c, sk_z, sk_h, sk_n, sk_c, sv_z, sv_h, sv_n, sv_c,
    sdo_0, sdo_1, sdo_2, sdo_3, sdq_z, sdq_h, sdq_n, sdq_c,
    ROPE: tl.constexpr, COSINE: tl.constexpr, MERGE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
    PRECISION: tl.constexpr, FAST: tl.constexpr, RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """dq for BM query rows, and DLS[zh, block] = sum over the rows of q^ . d q^ (the partial of
    d logit_scale, before the clamp's mask). STATS: (max, 1 / sum, delta) of every row."""
    zh = tl.program_id(0)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)  # h * (a head stride) may pass 2^31
    i = tl.program_id(1) * BM + tl.arange(0, BM)
    i_ok = i < n
    half = tl.arange(0, HALF)
    half_dim = hd // 2
    half_ok = half < half_dim
    cols = tl.arange(0, HD)
    cols_ok = cols < hd
    rc = i_ok[:, None] & cols_ok[None, :]
    scale = tl.load(SCALE + h)  # the logits' scale, fp32: see _Problem

    do = tl.load(DO + _out_offsets(z, h, i, cols, hd, gw, sdo_0, sdo_1, sdo_2, sdo_3, MERGE),
                 mask=rc, other=0.0).to(tl.float32)  # fmt: skip
    row = STATS + (zh.to(tl.int64) * n + i) * 3
    m_i = tl.load(row, mask=i_ok, other=0.0)
    l_inv = tl.load(row + 1, mask=i_ok, other=0.0)
    delta = tl.load(row + 2, mask=i_ok, other=0.0)

    qe, qo = _load_pairs(Q + z * sq_z + h * sq_h, i.to(tl.int64) * sq_n, i_ok, half, half_ok, sq_c)
    qe, qo, q_inv = _prologue(qe, qo, i, i_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
    dqe = tl.zeros([BM, HALF], tl.float32)
    dqo = tl.zeros([BM, HALF], tl.float32)
    j0 = 0
    while j0 < n:
        j = j0 + tl.arange(0, BN)
        j0 += BN
        j_ok = j < n
        ke, ko = _load_pairs(K + z * sk_z + h * sk_h, j.to(tl.int64) * sk_n, j_ok, half, half_ok,
                             sk_c)  # fmt: skip
        ke, ko, k_inv = _prologue(ke, ko, j, j_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
        s = _mm(qe * (scale * LOG2E_), tl.trans(ke), tl.zeros([BM, BN], tl.float32), PRECISION,
                INTERPRETED)  # fmt: skip
        s = _mm(qo * (scale * LOG2E_), tl.trans(ko), s, PRECISION, INTERPRETED)
        p = tl.where(j_ok[None, :], tl.exp2(s - m_i[:, None]) * l_inv[:, None], 0.0)
        v = tl.load(
            V + z * sv_z + h * sv_h + j.to(tl.int64)[:, None] * sv_n + (cols * sv_c)[None, :],
            mask=j_ok[:, None] & cols_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        dp = _mm(do, tl.trans(v), tl.zeros([BM, BN], tl.float32), FAST, INTERPRETED)
        ds = p * (dp - delta[:, None]) * scale  # d logits, times d logits / d (q^ . k^)
        dqe = _mm(ds, ke, dqe, FAST, INTERPRETED)
        dqo = _mm(ds, ko, dqo, FAST, INTERPRETED)
    if COSINE:
        part = tl.sum(tl.sum(qe * dqe + qo * dqo, axis=1), axis=0)
        tl.store(DLS + zh.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), part)
    dqe, dqo = _epilogue(dqe, dqo, qe, qo, q_inv, i, i_ok, half, half_ok, TABLE, n, half_dim,
                         ROPE, COSINE)  # fmt: skip
    base = (
        DQ + z * sdq_z + h * sdq_h + i.to(tl.int64)[:, None] * sdq_n + (2 * half * sdq_c)[None, :]
    )
    mask = i_ok[:, None] & half_ok[None, :]
    tl.store(base, _round(dqe, DQ.dtype.element_ty, RTNE_BF16), mask=mask)
    tl.store(base + sdq_c, _round(dqo, DQ.dtype.element_ty, RTNE_BF16), mask=mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, SCALE, TABLE, DO, STATS, DK, DV,
    heads, n, hd, gw,
    sq_z, sq_h, sq_n, sq_c, sk_z, sk_h, sk_n, sk_c, sv_z, sv_h, sv_n, sv_c,
    sdo_0, sdo_1, sdo_2, sdo_3, sdk_z, sdk_h, sdk_n, sdk_c, sdv_z, sdv_h, sdv_n, sdv_c,
    ROPE: tl.constexpr, COSINE: tl.constexpr, MERGE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
    PRECISION: tl.constexpr, FAST: tl.constexpr, RTNE_BF16: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """dk and dv for BN keys, streaming every query block of the group."""
    zh = tl.program_id(0)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)  # h * (a head stride) may pass 2^31
    j = tl.program_id(1) * BN + tl.arange(0, BN)
    j_ok = j < n
    half = tl.arange(0, HALF)
    half_dim = hd // 2
    half_ok = half < half_dim
    cols = tl.arange(0, HD)
    cols_ok = cols < hd
    scale = tl.load(SCALE + h)  # the logits' scale, fp32: see _Problem

    ke, ko = _load_pairs(K + z * sk_z + h * sk_h, j.to(tl.int64) * sk_n, j_ok, half, half_ok, sk_c)
    ke, ko, k_inv = _prologue(ke, ko, j, j_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
    v = tl.load(
        V + z * sv_z + h * sv_h + j.to(tl.int64)[:, None] * sv_n + (cols * sv_c)[None, :],
        mask=j_ok[:, None] & cols_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    dke = tl.zeros([BN, HALF], tl.float32)
    dko = tl.zeros([BN, HALF], tl.float32)
    dv = tl.zeros([BN, HD], tl.float32)
    i0 = 0
    while i0 < n:
        i = i0 + tl.arange(0, BM)
        i0 += BM
        i_ok = i < n
        qe, qo = _load_pairs(Q + z * sq_z + h * sq_h, i.to(tl.int64) * sq_n, i_ok, half, half_ok,
                             sq_c)  # fmt: skip
        qe, qo, q_inv = _prologue(qe, qo, i, i_ok, half, half_ok, TABLE, n, half_dim, ROPE, COSINE)
        row = STATS + (zh.to(tl.int64) * n + i) * 3
        m_i = tl.load(row, mask=i_ok, other=0.0)
        l_inv = tl.load(row + 1, mask=i_ok, other=0.0)
        delta = tl.load(row + 2, mask=i_ok, other=0.0)
        do = tl.load(
            DO + _out_offsets(z, h, i, cols, hd, gw, sdo_0, sdo_1, sdo_2, sdo_3, MERGE),
            mask=i_ok[:, None] & cols_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        s = _mm(qe * (scale * LOG2E_), tl.trans(ke), tl.zeros([BM, BN], tl.float32), PRECISION,
                INTERPRETED)  # fmt: skip
        s = _mm(qo * (scale * LOG2E_), tl.trans(ko), s, PRECISION, INTERPRETED)
        p = tl.where(i_ok[:, None] & j_ok[None, :], tl.exp2(s - m_i[:, None]) * l_inv[:, None], 0.0)
        dv = _mm(tl.trans(p), do, dv, FAST, INTERPRETED)
        dp = _mm(do, tl.trans(v), tl.zeros([BM, BN], tl.float32), FAST, INTERPRETED)
        ds = p * (dp - delta[:, None]) * scale
        dke = _mm(tl.trans(ds), qe, dke, FAST, INTERPRETED)
        dko = _mm(tl.trans(ds), qo, dko, FAST, INTERPRETED)
    dke, dko = _epilogue(dke, dko, ke, ko, k_inv, j, j_ok, half, half_ok, TABLE, n, half_dim,
                         ROPE, COSINE)  # fmt: skip
    base = (
        DK + z * sdk_z + h * sdk_h + j.to(tl.int64)[:, None] * sdk_n + (2 * half * sdk_c)[None, :]
    )
    mask = j_ok[:, None] & half_ok[None, :]
    tl.store(base, _round(dke, DK.dtype.element_ty, RTNE_BF16), mask=mask)
    tl.store(base + sdk_c, _round(dko, DK.dtype.element_ty, RTNE_BF16), mask=mask)
    tl.store(
        DV + z * sdv_z + h * sdv_h + j.to(tl.int64)[:, None] * sdv_n + (cols * sdv_c)[None, :],
        _round(dv, DV.dtype.element_ty, RTNE_BF16),
        mask=j_ok[:, None] & cols_ok[None, :],
    )


@triton.jit
def _token_pixel(u, n, gw):
    """Token u of the (4, n) polyphase layout -> its pixel (y, x): group g = 2a + b, token i
    of the group grid -> (2 (i // gw) + a, 2 (i % gw) + b)."""
    g = u // n
    i = u % n
    return 2 * (i // gw) + g // 2, 2 * (i % gw) + g % 2


@triton.jit
def _program_3d(n0, n1):
    """(i0, i1, i2) of this program on a flat grid of n0 x n1 x n2 programs, i0 fastest: the
    order a 3-D grid runs in, without the 65535 cap of a 3-D grid's second and third axes."""
    pid = tl.program_id(0)
    return pid % n0, (pid // n0) % n1, pid // (n0 * n1)


@triton.jit
def _dwconv_split_kernel(
    X, W, BIAS, T,
    d, H, Wd, n, gw,
    sx_b, sx_c, sx_h, sx_w,
    KSIZE: tl.constexpr, SHORTCUT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """t[b, g, i, c] = (dwconv_k(x) + bias (+ x))[b, c, pixel(g, i)]: the depthwise conv and
    its shortcut, written straight into the four groups (B, 4, n, d)."""
    u_block, c_block, b = _program_3d((4 * n + BT - 1) // BT, (d + BC - 1) // BC)
    b = b.to(tl.int64)
    u = u_block * BT + tl.arange(0, BT)
    c = c_block * BC + tl.arange(0, BC)
    u_ok = u < 4 * n
    c_ok = c < d
    y, x = _token_pixel(u, n, gw)
    xb = X + b * sx_b + (c.to(tl.int64) * sx_c)[None, :]
    acc = tl.zeros([BT, BC], tl.float32)
    acc += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if SHORTCUT:
        acc += tl.load(
            xb + (y.to(tl.int64) * sx_h + x.to(tl.int64) * sx_w)[:, None],
            mask=u_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    for ky in range(KSIZE):  # a loop (not unrolled): 25 unrolled gathers spill registers
        for kx in tl.static_range(KSIZE):
            yy = y + (ky - KSIZE // 2)
            xx = x + (kx - KSIZE // 2)
            ok = u_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < Wd)
            val = tl.load(
                xb + (yy.to(tl.int64) * sx_h + xx.to(tl.int64) * sx_w)[:, None],
                mask=ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(W + c * (KSIZE * KSIZE) + (ky * KSIZE + kx), mask=c_ok, other=0.0)
            acc += val * w.to(tl.float32)[None, :]
    tl.store(
        T + ((b * 4 * n + u.to(tl.int64)) * d)[:, None] + c[None, :],
        _round(acc, T.dtype.element_ty, RTNE_BF16),
        mask=u_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _dwconv_split_dx_kernel(
    W, DT, DX,
    d, H, Wd, n, gw,
    sdx_b, sdx_c, sdx_h, sdx_w,
    KSIZE: tl.constexpr, SHORTCUT: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """d x(p) = sum over taps of d y(p - tap + pad) w[tap] (+ d y(p)) for BP pixels of one
    sample, d y read from d t (B, 4, n, d) where the split put each pixel."""
    p_block, c_block, b = _program_3d((H * Wd + BP - 1) // BP, (d + BC - 1) // BC)
    b = b.to(tl.int64)
    p = p_block * BP + tl.arange(0, BP)
    c = c_block * BC + tl.arange(0, BC)
    p_ok = p < H * Wd
    c_ok = c < d
    PAD: tl.constexpr = KSIZE // 2
    y = p // Wd
    x = p % Wd
    dtb = DT + b * 4 * n * d + c[None, :]
    dx = tl.zeros([BP, BC], tl.float32)
    if SHORTCUT:
        g = 2 * (y % 2) + x % 2
        dx += tl.load(
            dtb + ((g * n + (y // 2) * gw + x // 2).to(tl.int64) * d)[:, None],
            mask=p_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    for ky in range(KSIZE):  # a loop (not unrolled): 25 unrolled gathers spill registers
        for kx in tl.static_range(KSIZE):
            yo = y - (ky - PAD)  # the output pixel that read x(p) through this tap
            xo = x - (kx - PAD)
            ok = p_ok & (yo >= 0) & (yo < H) & (xo >= 0) & (xo < Wd)
            go = 2 * (yo % 2) + xo % 2
            dyo = tl.load(
                dtb + ((go * n + (yo // 2) * gw + xo // 2).to(tl.int64) * d)[:, None],
                mask=ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(W + c * (KSIZE * KSIZE) + (ky * KSIZE + kx), mask=c_ok, other=0.0)
            dx += dyo * w.to(tl.float32)[None, :]
    tl.store(
        DX
        + b * sdx_b
        + (c.to(tl.int64) * sdx_c)[None, :]
        + (y.to(tl.int64) * sdx_h + x.to(tl.int64) * sdx_w)[:, None],
        _round(dx, DX.dtype.element_ty, RTNE_BF16),
        mask=p_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _dwconv_split_dw_kernel(
    X, DT, PART,
    d, H, Wd, n, gw, pixels_per_split, splits,
    sx_b, sx_c, sx_h, sx_w,
    KSIZE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Program (tap, channel block, sample * splits + split): the fp32 partial sum over the
    split's pixels of x(p + tap - pad) d y(p), to PART[b, s, tap, c]; the extra tap index
    KSIZE * KSIZE sums d y alone (d bias). Taps vary fastest over the programs, so the
    programs of one pixel range run together and re-read it from L2."""
    tap, c_block, bs = _program_3d(KSIZE * KSIZE + 1, (d + BC - 1) // BC)
    c = c_block * BC + tl.arange(0, BC)
    b = (bs // splits).to(tl.int64)
    s = bs % splits
    c_ok = c < d
    PAD: tl.constexpr = KSIZE // 2
    ky = tap // KSIZE - PAD
    kx = tap % KSIZE - PAD
    is_bias = tap == KSIZE * KSIZE
    xb = X + b * sx_b + (c.to(tl.int64) * sx_c)[None, :]
    dtb = DT + b * 4 * n * d + c[None, :]
    acc = tl.zeros([BP, BC], tl.float32)
    start = s * pixels_per_split
    end = tl.minimum(start + pixels_per_split, H * Wd)
    p0 = start
    while p0 < end:
        p = p0 + tl.arange(0, BP)
        p0 += BP
        p_ok = p < end
        y = p // Wd
        x = p % Wd
        g = 2 * (y % 2) + x % 2
        dy = tl.load(
            dtb + ((g * n + (y // 2) * gw + x // 2).to(tl.int64) * d)[:, None],
            mask=p_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        yi = y + ky
        xi = x + kx
        ok = p_ok & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < Wd) & (not is_bias)
        xv = tl.load(
            xb + (yi.to(tl.int64) * sx_h + xi.to(tl.int64) * sx_w)[:, None],
            mask=ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.where(is_bias, dy, xv * dy)
    part = PART + ((b * splits + s) * (KSIZE * KSIZE + 1) + tap) * d
    tl.store(part + c, tl.sum(acc, axis=0), mask=c_ok)


# ----------------------------------------------------------------------------------------------
# Python side


ATTENTION_KERNELS = ("fwd", "dq", "dkdv")


def attention_tiles(
    n: int, hd: int, dtype: torch.dtype = torch.bfloat16, kernel: str = "fwd"
) -> dict:
    """BM x BN logits tiles (every tl.dot side at least 16) and warps of one attention kernel
    (``kernel``: one of ATTENTION_KERNELS; the three may differ, the results do not depend on
    it beyond the order of fp32 sums), chosen by compiling for sm_90
    (tests/test_triton_compile.py): fp16/bf16 16 x 16 with 4 warps, fp32 (IEEE products on
    the CUDA cores) 32 x 32 with 8 warps. Known spills (KNOWN_SPILLS there), to tune on a GPU
    (bench/tune_attention_tiles.py times the alternatives): hd 96 in every dtype; at hd 48,
    fp32's dq kernel and its forward and dkdv kernels without RoPE, and fp16's dq and dkdv
    kernels with RoPE (none in bf16)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    if dtype == torch.float32:
        return dict(BM=32, BN=32, num_warps=8)
    return dict(BM=16, BN=16, num_warps=4)


def _precisions(dtype: torch.dtype) -> dict:
    """PRECISION for the logits q^ . k^ (scaled by up to 100: they need fp32 accuracy), FAST for
    the other products (p v, d o v^T, d s k^, p^T d o, d s^T q^). float32 inputs: IEEE for all.
    bf16: TF32x3 for the logits, TF32 for the rest: their operands are 16-bit values (exact in
    TF32) or fp32 probabilities, gradients and q^ / k^, whose truncation to TF32 (up to 2^-10,
    biased toward zero) stays under bf16's rounding of the outputs (2^-9). float16 rounds its
    outputs as finely as TF32 truncates (the same 10-bit mantissa): there TF32 products came to
    up to 1.9x the tolerance bound on dq and dk (in a float64 model of the kernels), so float16
    takes TF32x3 throughout."""
    if dtype == torch.float32:
        return dict(PRECISION="ieee", FAST="ieee")
    if dtype == torch.float16:
        return dict(PRECISION="tf32x3", FAST="tf32x3")
    return dict(PRECISION="tf32x3", FAST="tf32")


def _as_groups(t: torch.Tensor) -> torch.Tensor:
    """(..., heads, n, hd) as (G, heads, n, hd), to read: a view when the leading dims collapse,
    else a copy."""
    return t.reshape(-1, *t.shape[-3:])


def _groups_to_write(t: torch.Tensor) -> torch.Tensor:
    """(..., heads, n, hd) as (G, heads, n, hd), to write: a view, or an error (never a copy
    that the kernels would fill in vain; _fill_target makes such gradients viewable)."""
    return t.view(-1, *t.shape[-3:])


# The attention kernels compute a tile's channel offsets (head dim x channel stride) in 32 bits.
CHANNEL_EXTENT_LIMIT = 2**31


def _narrow_channels(t: torch.Tensor) -> bool:
    """True when t's channel offsets fit the kernels' 32 bits (else they get a contiguous copy:
    channel strides that large come only from channels-major views of 2^31 elements or more)."""
    return abs(t.stride(-1)) * t.shape[-1] < CHANNEL_EXTENT_LIMIT


class _Problem:
    """Sizes, strides and launch shapes of one call; ``out`` is the (G, heads, n, hd) output or
    the merged (B, d, H, W) image (merge=True)."""

    def __init__(self, q, k, v, logit_scale, cosine, table, out, merge, grid_w):
        self.q, self.k, self.v = (
            u if _narrow_channels(u) else u.contiguous() for u in map(_as_groups, (q, k, v))
        )
        G, self.heads, self.n, self.hd = self.q.shape
        self.Z = G * self.heads
        self.cosine, self.merge, self.gw = cosine, merge, grid_w
        self.table = table
        # The logits' scale per head, fp32, computed by torch as the reference and the cuda
        # glue compute it (a GPU's tl.exp is ex2.approx of a rounded product, ~6 ulp: 4e-5 on
        # logits of 100).
        if cosine:
            self.scale = cosine_scale(logit_scale)
        else:
            self.scale = torch.full(
                (self.heads,), self.hd**-0.5, dtype=torch.float32, device=self.q.device
            )
        self.out = out if out is None or merge else _groups_to_write(out)
        self.half = max(16, triton.next_power_of_2(self.hd // 2))
        self.HD = max(16, triton.next_power_of_2(self.hd))
        self.tiles = {k: attention_tiles(self.n, self.hd, q.dtype, k) for k in ATTENTION_KERNELS}
        self.common = dict(
            ROPE=table is not None, COSINE=cosine, MERGE=merge, HD=self.HD, HALF=self.half,
            **_precisions(q.dtype), RTNE_BF16=RTNE_BF16, INTERPRETED=INTERPRETED,
        )  # fmt: skip

    def out_view(self, t: torch.Tensor) -> torch.Tensor:
        """The output (or its gradient) as the kernels address it."""
        return t if self.merge else _as_groups(t)

    def qkv_strides(self) -> tuple[int, ...]:
        return (*self.q.stride(), *self.k.stride(), *self.v.stride())

    def table_arg(self) -> torch.Tensor:
        return self.table if self.table is not None else self.q


def _forward(
    pb: _Problem, dout: torch.Tensor | None = None, store_o: bool = True
) -> torch.Tensor | None:
    """Writes pb.out (unless store_o is False); with ``dout`` (the backward's recomputation)
    also writes, per row, the (max, 1 / sum, delta) statistics the backward kernels read, and
    returns them."""
    stats = None
    if dout is not None:
        dout = pb.out_view(dout)
        stats = torch.empty(pb.Z, pb.n, 3, dtype=torch.float32, device=pb.q.device)
    grid = (pb.Z, triton.cdiv(pb.n, pb.tiles["fwd"]["BM"]))
    target = dout if dout is not None else pb.out
    if dout is not None and store_o and pb.out is not None:
        assert pb.out.stride() == dout.stride(), "o and d o share one set of strides"
    with device_context(pb.q):
        _attn_fwd_kernel[grid](
            pb.q, pb.k, pb.v, pb.scale, pb.table_arg(),
            target if pb.out is None else pb.out, target, stats if stats is not None else pb.q,
            pb.heads, pb.n, pb.hd, pb.gw,
            *pb.qkv_strides(), *target.stride(),
            BACKWARD=dout is not None, STORE_O=store_o and pb.out is not None,
            **pb.common, **pb.tiles["fwd"],
        )  # fmt: skip
    return stats


def _backward(pb: _Problem, dout: torch.Tensor, dq, dk, dv) -> torch.Tensor:
    """Fills dq, dk, dv ((G, heads, n, hd) views of any strides); returns d logit_scale (heads,
    1, 1) in fp32, before the clamp's mask (zeros for plain attention)."""
    stats = _forward(pb, dout)  # recomputed: the op keeps only its inputs (o too, if pb.out)
    dls = _backward_dq(pb, dout, stats, dq)
    _backward_dkdv(pb, dout, stats, dk, dv)
    return dls


def _backward_dq(pb: _Problem, dout: torch.Tensor, stats: torch.Tensor, dq) -> torch.Tensor:
    """dq, and d logit_scale (heads, 1, 1) in fp32, from the row statistics of _forward."""
    dout, dq = pb.out_view(dout), _groups_to_write(dq)
    tiles = pb.tiles["dq"]
    blocks = triton.cdiv(pb.n, tiles["BM"])
    dls = torch.zeros(pb.Z, blocks, dtype=torch.float32, device=pb.q.device)
    with device_context(pb.q):
        _attn_bwd_dq_kernel[(pb.Z, blocks)](
            pb.q, pb.k, pb.v, pb.scale, pb.table_arg(), dout, stats, dq, dls,
            pb.heads, pb.n, pb.hd, pb.gw,
            *pb.qkv_strides(), *dout.stride(), *dq.stride(),
            **pb.common, **tiles,
        )  # fmt: skip
    # (Z, blocks) -> per head, summed over groups and blocks in a fixed order.
    return dls.view(-1, pb.heads, blocks).sum((0, 2)).view(pb.heads, 1, 1)


def _backward_dkdv(pb: _Problem, dout: torch.Tensor, stats: torch.Tensor, dk, dv) -> None:
    """dk and dv from the row statistics of _forward."""
    dout, dk, dv = pb.out_view(dout), _groups_to_write(dk), _groups_to_write(dv)
    tiles = pb.tiles["dkdv"]
    with device_context(pb.q):
        _attn_bwd_dkdv_kernel[(pb.Z, triton.cdiv(pb.n, tiles["BN"]))](
            pb.q, pb.k, pb.v, pb.scale, pb.table_arg(), dout, stats, dk, dv,
            pb.heads, pb.n, pb.hd, pb.gw,
            *pb.qkv_strides(), *dout.stride(), *dk.stride(), *dv.stride(),
            **pb.common, **tiles,
        )  # fmt: skip


def supports_attention(q, k, v, logit_scale, cosine) -> str:
    reason = dtype_reason(q)
    if reason:
        return reason
    hd = q.shape[-1]
    if hd > MAX_HEAD_DIM or hd % 2:
        return f"the triton kernel takes an even head dim <= {MAX_HEAD_DIM}, got {hd}"
    return _grid_reason(math.prod(q.shape[:-2]), q.shape[-2])


def attention_forward(q, k, v, logit_scale, cosine) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _forward(_Problem(q, k, v, logit_scale, cosine, None, out, False, 1))
    return out


def _fill_target(g: torch.Tensor) -> torch.Tensor:
    """The (G, heads, n, hd) tensor the kernels fill for the gradient ``g``: a view of it, or,
    where its leading dims do not collapse (e.g. (B, 4) transposed from (4, B)) or its channel
    stride is too large (_narrow_channels), a contiguous buffer to copy into it afterwards."""
    if _narrow_channels(g):
        try:
            return _groups_to_write(g)
        except RuntimeError:
            pass
    return torch.empty(math.prod(g.shape[:-3]), *g.shape[-3:], dtype=g.dtype, device=g.device)


def attention_backward(grads, inputs) -> list[torch.Tensor]:
    q, k, v, logit_scale, cosine = inputs
    pb = _Problem(q, k, v, logit_scale, cosine, None, None, False, 1)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))  # the inputs' layouts
    filled = [_fill_target(g) for g in (dq, dk, dv)]
    dls = _backward(pb, grads[0], *filled)
    for g, f in zip((dq, dk, dv), filled):
        if f.data_ptr() != g.data_ptr():
            g.copy_(f.view(g.shape))
    if cosine:
        dls = dls * (logit_scale.float() <= LOGIT_SCALE_MAX)  # the clamp's gradient mask
    return [dq, dk, dv, dls.to(logit_scale.dtype)]


# ----------------------------------------------------------------------------------------------
# The whole layer: dwconv + shortcut + split (one kernel), the qkv projection (cuBLAS through
# torch), attention with RoPE, normalisation and scale fused and the merge in its store, the
# 1x1 output conv (cuBLAS/cuDNN through torch). No stand-alone permute or copy.


def dwconv_tiles(d: int) -> dict:
    """BT tokens (pixels) x BC channels, 8 warps: no spills compiled for sm_90."""
    return dict(BT=64, BC=max(16, min(32, triton.next_power_of_2(d))), num_warps=8)


def _dwconv_split(x: torch.Tensor, dw_weight, dw_bias, shortcut: bool) -> torch.Tensor:
    B, d, H, W = x.shape
    gh, gw = H // 2, W // 2
    n = gh * gw
    # the kernel indexes the weight (d, 1, k, k) and the bias (d,) as contiguous
    dw_weight, dw_bias = dw_weight.contiguous(), dw_bias.contiguous()
    t = torch.empty(B, 4, n, d, dtype=x.dtype, device=x.device)
    tiles = dwconv_tiles(d)
    grid = (triton.cdiv(4 * n, tiles["BT"]) * triton.cdiv(d, tiles["BC"]) * B,)  # see _program_3d
    with device_context(x):
        _dwconv_split_kernel[grid](
            x, dw_weight, dw_bias, t,
            d, H, W, n, gw,
            *x.stride(),
            KSIZE=dw_weight.shape[-1], SHORTCUT=shortcut, RTNE_BF16=RTNE_BF16, **tiles,
        )  # fmt: skip
    return t


def dwconv_dx_tiles(d: int) -> dict:
    return dict(BP=64, BC=max(16, min(32, triton.next_power_of_2(d))), num_warps=8)


def dwconv_dw_tiles(d: int) -> dict:
    return dict(BP=64, BC=max(16, min(64, triton.next_power_of_2(d))), num_warps=4)


def _dwconv_split_backward(x, dw_weight, dt, shortcut: bool):
    """(d x in x's layout, d dw_weight, d dw_bias) from d t (B, 4, n, d), contiguous."""
    from . import _common

    B, d, H, W = x.shape
    ksize = dw_weight.shape[-1]
    taps = ksize * ksize + 1  # and d bias
    n, gw = (H // 2) * (W // 2), W // 2
    dx = torch.empty_like(x)
    tiles = dwconv_dx_tiles(d)
    with device_context(x):
        grid = (triton.cdiv(H * W, tiles["BP"]) * triton.cdiv(d, tiles["BC"]) * B,)
        _dwconv_split_dx_kernel[grid](
            dw_weight.contiguous(), dt, dx,
            d, H, W, n, gw,
            *dx.stride(),
            KSIZE=ksize, SHORTCUT=shortcut, RTNE_BF16=RTNE_BF16, **tiles,
        )  # fmt: skip
        tiles = dwconv_dw_tiles(d)
        c_blocks = triton.cdiv(d, tiles["BC"])
        programs = 8 * _common.sm_count(x.device.index or 0) if x.is_cuda else 2 * taps
        blocks = triton.cdiv(H * W, tiles["BP"])
        splits = max(1, min(blocks, programs // (taps * c_blocks * B)))
        per_split = triton.cdiv(blocks, splits) * tiles["BP"]
        splits = triton.cdiv(H * W, per_split)
        part = torch.empty(B, splits, taps, d, dtype=torch.float32, device=x.device)
        _dwconv_split_dw_kernel[(taps * c_blocks * B * splits,)](
            x, dt, part,
            d, H, W, n, gw, per_split, splits,
            *x.stride(),
            KSIZE=ksize, **tiles,
        )  # fmt: skip
    sums = part.sum((0, 1))  # (taps, d), over samples and splits in a fixed order
    dw = sums[: ksize * ksize].t().reshape(dw_weight.shape).to(dw_weight.dtype)
    return dx, dw, sums[ksize * ksize].to(dw_weight.dtype)


def _layer_problem(x, qkv, logit_scale, heads, rope, cosine, table, out):
    B, d, H, W = x.shape
    if rope and table is None:
        from ..ops.downsampled_attention import rope_table

        table = rope_table(d // heads, (H // 2, W // 2), torch.float32, x.device)
    table = table.to(torch.float32).contiguous() if rope else None
    q, k, v = (_heads_view(qkv, i, heads) for i in range(3))
    return _Problem(q, k, v, logit_scale, cosine, table, out, True, W // 2)


def supports_layer(x, dw_weight, dw_bias, qkv_weight, qkv_bias, logit_scale, out_weight,
                   out_bias, num_heads, rope, cosine, shortcut, rope_table) -> str:  # fmt: skip
    reason = dtype_reason(x)
    if reason:
        return reason
    hd = x.shape[1] // num_heads
    if hd > MAX_HEAD_DIM or hd % 2:
        return f"the triton kernel takes an even head dim <= {MAX_HEAD_DIM}, got {hd}"
    B, d, H, W = x.shape
    return _grid_reason(4 * B * num_heads, H * W // 4) or _dwconv_grid_reason(
        B, d, H, W, dw_weight.shape[-1]
    )


def _grid_reason(problems: int, n: int) -> str:
    if problems > MAX_GRID_X or triton.cdiv(n, 16) > MAX_GRID_Y:
        return (
            f"the triton kernel takes fewer than 2^31 (group, head) problems and at most "
            f"{MAX_GRID_Y * 16} tokens a group, got {problems} and {n}"
        )
    return ""


def _dwconv_grid_reason(B: int, d: int, H: int, W: int, ksize: int) -> str:
    """The depthwise-conv kernels' flat grids (see _program_3d) take fewer than 2^31 programs."""
    split, dx, dw = dwconv_tiles(d), dwconv_dx_tiles(d), dwconv_dw_tiles(d)
    programs = B * max(
        triton.cdiv(H * W, split["BT"]) * triton.cdiv(d, split["BC"]),
        triton.cdiv(H * W, dx["BP"]) * triton.cdiv(d, dx["BC"]),
        (ksize * ksize + 1) * triton.cdiv(d, dw["BC"]),  # times splits, 1 once this is large
    )
    if programs > MAX_GRID_X:
        return f"the triton depthwise-conv kernels take fewer than 2^31 programs, got {programs}"
    return ""


def _attend(x, qkv, logit_scale, heads, rope, cosine, table, image) -> None:
    _forward(_layer_problem(x, qkv, logit_scale, heads, rope, cosine, table, image))


def _attend_backward(x, qkv, logit_scale, heads, rope, cosine, table, image, d_image, dq, dk, dv):
    pb = _layer_problem(x, qkv, logit_scale, heads, rope, cosine, table, image)
    return _backward(pb, d_image, dq, dk, dv)  # recomputes o into image


def layer_forward(*inputs) -> torch.Tensor:
    return layer_forward_with(_dwconv_split, _attend, *inputs)


def layer_backward(grads, inputs) -> list[torch.Tensor]:
    return layer_backward_with(
        _dwconv_split, _dwconv_split_backward, _attend_backward, grads, inputs
    )
