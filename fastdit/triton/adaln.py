"""Triton kernels of the adaLN family (reference and formulas: fastdit/ops/adaln.py).

Every layout is read as B samples of L rows of D channels with arbitrary strides:
(B, L, D) tokens, and (B, D, H, W) images with L = H * W (channels-first: channel stride H*W and
token stride 1; channels-last: channel stride 1). A program works on a (ROWS, BLOCK_D) tile of
one sample: ROWS rows, each whole in registers, so every element is read once and written once.
For channels-last and tokens a tile row is D consecutive elements; for channels-first a tile
column is ROWS consecutive tokens, so the tile is made tall (see _launch_shape) to keep each
access a run of consecutive bytes. D <= 16384; float64 is declined (auto serves it with torch).

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
  written once and read once by ``_sum_splits_kernel``. splits fills one wave of programs
  (_splits): at DiT-XL/2 B 32 on an H100 that is 8 per sample, 3.5 MB of partials against the
  113 MB (bf16) the gated backward must move, and they stay in the 50 MB L2; at B 256, one.

The backward recomputes the row statistics (and, for gated, r = x + gate * y rounded to the
dtype, as the forward stores it) from the inputs: nothing but the op's inputs is saved.

The per-sample sums over tokens (d shift, d scale, d gate) are deterministic: program (b, s)
adds its rows in a fixed order into register tiles and writes one partial row per plane; a
second kernel adds the partials of each sample in split order. The split count depends only on
the shape and the GPU's SM count, so two runs on the same GPU give bitwise-equal gradients.

Verified here without a GPU: results under TRITON_INTERPRET=1 (tests/test_adaln.py), and
compilation for sm_90 with Triton's bundled ptxas (registers per thread at every tile shape
_launch_shape picks for the DiT and U-DiT widths: 32-64 forward, 54-100 backward, no spills for
tokens and channels-last up to D = 4096; small spills at D = 8192 gated backward and for
channels-first D > 1024).

Expected on an H100 (HBM3 3.35 TB/s; a device-to-device copy measures about 2.6-3.0 TB/s), not
measured yet: forward 85-90 % of the copy bandwidth at the DiT-XL/2 and channels-last U-DiT
shapes; backward 70-80 % (four live row tensors per element, and the partials); channels-first
images lower, their backward much lower (runs of 2-8 tokens). At DiT-XL/2 B 256, bf16
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
    plane = plane.to(tl.int64)  # 32-bit while < 2^31, and 2 * plane may not be
    tl.store(base, tl.sum(acc_shift, axis=0), mask=col_ok)
    tl.store(base + plane, tl.sum(acc_scale, axis=0), mask=col_ok)
    if GATED:
        tl.store(base + 2 * plane, tl.sum(acc_gate, axis=0), mask=col_ok)


@triton.jit
def _sum_splits_kernel(
    PART, O0, O1, O2,
    D, splits, plane,
    s0_b, s0_d, s1_b, s1_d, s2_b, s2_d,
    PLANES: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):  # fmt: skip
    """O_k[b, :] = sum over s, in order, of PART[k][b][s][:], rounded once to O_k's dtype."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = cols < D
    plane = plane.to(tl.int64)  # 32-bit while < 2^31, and 2 * plane may not be
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    s = 0
    while s < splits:  # a while loop: see _bwd_kernel
        p = PART + (b * splits + s) * D + cols
        s += 1
        acc0 += tl.load(p, mask=ok, other=0.0)
        acc1 += tl.load(p + plane, mask=ok, other=0.0)
        if PLANES == 3:
            acc2 += tl.load(p + 2 * plane, mask=ok, other=0.0)
    tl.store(O0 + b * s0_b + cols * s0_d, _round(acc0, O0.dtype.element_ty, RTNE_BF16), mask=ok)
    tl.store(O1 + b * s1_b + cols * s1_d, _round(acc1, O1.dtype.element_ty, RTNE_BF16), mask=ok)
    if PLANES == 3:
        tl.store(O2 + b * s2_b + cols * s2_d, _round(acc2, O2.dtype.element_ty, RTNE_BF16), mask=ok)


# ----------------------------------------------------------------------------------------------
# Python side: layouts, launch shapes, and the functions the op registers


MAX_D = 16384
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
    if t.dtype not in _DTYPES:
        return dtype_reason(t)
    dim = t.shape[-1] if t.dim() == 3 else t.shape[1]
    if dim > MAX_D:
        return f"the triton kernel keeps a row in registers and takes D <= {MAX_D}, got {dim}"
    if _rows_view(t) is None:
        return f"{name}'s H and W dimensions do not merge into one strided dimension"
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


def _launch_shape(
    length: int, dim: int, channel_stride: int, backward: bool
) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps) of a tile (register use checked by compiling for sm_90 with
    the bundled ptxas, tests/test_triton_compile.py: no spills up to D = 4096 on tokens and
    channels-last but 7 stores in the gated backward at 4096; channels-first spills from
    D = 1152 in the gated backward and at D = 4096).

    Forward: about 4096 elements, 16 per thread (32 for channels-first). Backward (four row
    tensors live at once, and three column-sum tiles): about 2048 elements, 4 per thread (8 at
    D = 8192). Channels-first data (channel stride != 1) gets taller tiles so that each
    channel's slice is a run of tokens: 16 or more in the forward (8 at D > 1024), 8 in the
    backward up to D = 256 (fewer beyond: the backward of channels-first images is the slow
    path; channels-last is the fast layout)."""
    block_d = triton.next_power_of_2(dim)
    tokens = channel_stride == 1 or dim == 1
    if not backward:
        rows = max(1, min(64, 4096 // block_d)) if tokens else max(8, min(64, 16384 // block_d))
        rows = min(rows, triton.next_power_of_2(length))
        return rows, block_d, max(1, min(16, rows * block_d // 512))
    rows = max(1, min(32, 2048 // block_d)) if tokens else max(2, min(8, 2048 // block_d))
    rows = min(rows, triton.next_power_of_2(length))
    return rows, block_d, max(1, min(32, rows * block_d // 128))


def _splits(
    batch: int, length: int, rows: int, warps: int, device: torch.device
) -> tuple[int, int]:
    """(splits, rows_per_split): each sample's rows cut into ``splits`` programs so that all
    B * splits programs run in one wave (about 32 resident warps per SM: the backward uses
    64-128 registers a thread), each with at least MIN_SPLIT_ROWS rows; one split per sample
    when B alone fills the GPU. On the CPU (the interpreter): 4 programs, at least 2 rows each,
    so that the tests see several splits."""
    if device.type == "cuda":
        programs = _sm_count(device.index or 0) * max(1, 32 // warps)
        min_rows = MIN_SPLIT_ROWS
    else:
        programs, min_rows = 4, 2
    steps = triton.cdiv(length, rows)
    splits = max(1, min(programs // batch, steps, length // min_rows))
    rows_per_split = triton.cdiv(steps, splits) * rows
    return triton.cdiv(length, rows_per_split), rows_per_split


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
    rows, block_d, warps = _launch_shape(length, dim, sx[2], backward=False)
    blocks = triton.cdiv(length, rows)
    gate = gate if gated else shift
    wide = _wide(rows, block_d, [t for t in (x, y, res, out, gate, shift, scale) if t is not None])
    with _device_context(x):
        _fwd_kernel[(x.shape[0] * blocks,)](
            x, y if gated else x, gate, shift, scale, res, out,
            length, dim, blocks,
            *sx, *sy, *_strides(res), *_strides(out),
            *gate.stride(), *shift.stride(), *scale.stride(),
            eps,
            GATED=gated, ROWS=rows, BLOCK_D=block_d, RTNE_BF16=_RTNE_BF16,
            WIDE=wide,
            num_warps=warps,
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
    rows, block_d, warps = _launch_shape(length, dim, sx[2], backward=True)
    splits, rows_per_split = _splits(batch, length, rows, warps, x.device)
    planes = 3 if gated else 2
    plane = batch * splits * dim
    part = torch.empty(planes * plane, dtype=torch.float32, device=x.device)
    grads = [torch.empty_like(t) for t in (shift, scale, gate)[:planes]]  # d shift, d scale, d gate
    reduce_block = min(1024, triton.next_power_of_2(dim))
    with _device_context(x):
        _bwd_kernel[(batch, splits)](
            x, y if gated else x, gate, scale, dr, dh, dx, dy, part,
            length, dim, rows_per_split, splits, plane,
            *sx, *sy, *sdr, *_strides(dh), *_strides(dx), *sdy,
            *gate.stride(), *scale.stride(),
            eps,
            GATED=gated, ROWS=rows, BLOCK_D=block_d, RTNE_BF16=_RTNE_BF16,
            WIDE=_wide(rows, block_d, (x, y if gated else x, dr, dh, dx, dy, gate, scale)),
            num_warps=warps,
        )  # fmt: skip
        outs = grads + [grads[0]] * (3 - planes)
        _sum_splits_kernel[(batch, triton.cdiv(dim, reduce_block))](
            part, *outs,
            dim, splits, plane,
            *(s for o in outs for s in o.stride()),
            PLANES=planes, BLOCK=reduce_block, RTNE_BF16=_RTNE_BF16, num_warps=4,
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
