"""Triton kernels of the adaLN family (reference and formulas: fastdit/ops/adaln.py).

Every layout is read as B samples of L rows of D channels with arbitrary strides:
(B, L, D) tokens, and (B, D, H, W) images with L = H * W (channels-first: channel stride H*W;
channels-last: channel stride 1). A program normalises ROWS rows of one sample at once; the
whole row of D channels sits in registers, so x is read once and the output written once.

Floor (forward): read x and write out, 2 * B * L * D elements, plus 2 * B * D for shift/scale.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..ops import _checks


@triton.jit
def _modulate_fwd_kernel(
    X, SHIFT, SCALE, OUT,
    L, D, blocks_per_sample,
    sx_b, sx_l, sx_d, so_b, so_l, so_d, sc_b,
    eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // blocks_per_sample).to(tl.int64)
    rows = ((pid % blocks_per_sample) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(
        X + b * sx_b + rows[:, None] * sx_l + cols[None, :] * sx_d, mask=mask, other=0.0
    ).to(tl.float32)
    # Two-pass statistics in fp32: the mean, then the mean squared deviation.
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)

    shift = tl.load(SHIFT + b * sc_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * sc_b + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(
        OUT + b * so_b + rows[:, None] * so_l + cols[None, :] * so_d,
        out.to(OUT.dtype.element_ty),
        mask=mask,
    )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 16384


def _rows_view(t: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """(L, D, stride_b, stride_l, stride_d) of ``t`` read as (B, L, D) rows, or None."""
    if t.dim() == 3:
        return t.shape[1], t.shape[2], t.stride(0), t.stride(1), t.stride(2)
    _, d, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        return None  # H and W do not merge into one strided dimension
    sl = t.stride(3) if w > 1 else t.stride(2)
    return h * w, d, t.stride(0), sl, t.stride(1)


def supports(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> str:
    if x.dtype not in _DTYPES:
        return f"the triton kernel takes float32, float16 or bfloat16, got {x.dtype}"
    dim = x.shape[-1] if x.dim() == 3 else x.shape[1]
    if dim > MAX_D:
        return f"the triton kernel keeps a row in registers and takes D <= {MAX_D}, got {dim}"
    if _rows_view(x) is None:
        return "x's H and W dimensions do not merge into one strided dimension"
    if shift.stride(1) != 1 or scale.stride(1) != 1 or shift.stride(0) != scale.stride(0):
        return "the triton kernel takes shift and scale with unit channel stride, same layout"
    return ""


def _launch_shape(length: int, dim: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(dim)
    rows = max(1, min(64, 4096 // block_d, triton.next_power_of_2(length)))
    warps = max(1, min(16, rows * block_d // 512))
    return rows, block_d, warps


def modulate_forward(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    out = _checks.empty_like_layout(x)
    length, dim, sx_b, sx_l, sx_d = _rows_view(x)
    _, _, so_b, so_l, so_d = _rows_view(out)
    rows, block_d, warps = _launch_shape(length, dim)
    blocks = triton.cdiv(length, rows)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _modulate_fwd_kernel[(x.shape[0] * blocks,)](
            x, shift, scale, out,
            length, dim, blocks,
            sx_b, sx_l, sx_d, so_b, so_l, so_d, shift.stride(0),
            eps,
            ROWS=rows, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    return out
