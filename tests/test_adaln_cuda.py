"""fastdit._C.adaln_modulate_fwd called directly, against the float64 reference (GPU only).

Rule (DESIGN.md, Tests): the kernel's max abs error against float64 is at most twice that of
eager PyTorch computing the same expression in the same dtype, plus a tiny absolute floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdit import _ext

REASON = _ext.cuda_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(REASON), reason=REASON or "available")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _launch(x, shift, scale, out, eps):
    """Calls the kernel on tensors that the caller made contiguous and of one dtype."""
    C, reason = _ext.load()
    assert C is not None, reason
    B, L, D = x.shape
    C.adaln_modulate_fwd(
        _ext.ptr(x), _ext.ptr(shift), _ext.ptr(scale), _ext.ptr(out), B, L, D, eps,
        _ext.dtype_code(x), x.device.index, _ext.stream_of(x),
    )  # fmt: skip
    return out


def _reference(x, shift, scale, eps):
    D = x.shape[-1]
    y = F.layer_norm(x.double(), (D,), eps=eps)
    return y * (1 + scale.double()[:, None]) + shift.double()[:, None]


def _eager(x, shift, scale, eps):
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _inputs(B, L, D, dtype, generator):
    # Off-centre rows (mean 0.5, std 2) so a one-pass variance would show.
    x = torch.randn(B, L, D, generator=generator, device="cuda") * 2 + 0.5
    shift = torch.randn(B, D, generator=generator, device="cuda") * 0.5
    scale = torch.randn(B, D, generator=generator, device="cuda") * 0.5
    return x.to(dtype), shift.to(dtype), scale.to(dtype)


def _check(x, shift, scale, eps=1e-6, out=None):
    if out is None:
        out = torch.full_like(x, float("nan"))
    _launch(x, shift, scale, out, eps)
    torch.cuda.synchronize()
    ref = _reference(x, shift, scale, eps)
    assert not out.isnan().any(), "the kernel left elements unwritten (NaN)"
    err = (out.double() - ref).abs().max().item()
    eager_err = (_eager(x, shift, scale, eps).double() - ref).abs().max().item()
    bound = 2 * eager_err + FLOOR[x.dtype]
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g} (eager: {eager_err:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("L", [1, 7, 256])
@pytest.mark.parametrize("D", [1, 3, 96, 1000, 1152, 4097, 8192])
def test_matches_reference(B, L, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(B * 1_000_003 + L * 1009 + D)
    _check(*_inputs(B, L, D, dtype, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [9001, 40000])
def test_rows_longer_than_registers(D, dtype):
    # 9001 (scalar path) and 40000 (16-byte path) exceed what the register kernels hold.
    g = torch.Generator(device="cuda").manual_seed(D)
    _check(*_inputs(2, 3, D, dtype, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [256, 1152])
def test_misaligned_pointers_take_the_scalar_path(D, dtype):
    B, L = 2, 5
    g = torch.Generator(device="cuda").manual_seed(D + 7)
    x, shift, scale = _inputs(B, L, D, dtype, g)
    # Views that start one element into their storage: not 16-byte aligned.
    x_buf = torch.empty(B * L * D + 1, dtype=dtype, device="cuda")
    x_view = x_buf[1:].view(B, L, D)
    x_view.copy_(x)
    out_buf = torch.full((B * L * D + 1,), float("nan"), dtype=dtype, device="cuda")
    out_view = out_buf[1:].view(B, L, D)
    assert x_view.data_ptr() % 16 != 0 and out_view.data_ptr() % 16 != 0
    _check(x_view, shift, scale, out=out_view)
    assert out_buf[0].isnan(), "wrote before the start of out"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eps_and_constant_rows(dtype):
    # Constant rows: variance 0, so out = shift (the normalized value is exactly 0).
    B, L, D = 2, 4, 1152
    g = torch.Generator(device="cuda").manual_seed(11)
    _, shift, scale = _inputs(B, L, D, dtype, g)
    x = torch.full((B, L, D), 3.0, dtype=dtype, device="cuda")
    out = _launch(x, shift, scale, torch.full_like(x, float("nan")), 1e-5)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, shift[:, None].expand_as(out), rtol=0, atol=0)
    g = torch.Generator(device="cuda").manual_seed(12)
    _check(*_inputs(B, L, D, dtype, g), eps=1e-2)


def test_runs_on_the_current_stream():
    B, L, D = 3, 64, 1152
    g = torch.Generator(device="cuda").manual_seed(5)
    x, shift, scale = _inputs(B, L, D, torch.bfloat16, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = torch.full_like(x, float("nan"))
        _launch(x, shift, scale, out, 1e-6)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert not out.isnan().any()
