"""fastdit._C's adaln entries called directly, against the float64 reference (GPU only):
adaln_modulate_fwd, adaln_gated_fwd, adaln_modulate_bwd, adaln_gated_bwd.

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


def _codes(x):
    """(dtype, cond_dtype): every tensor here has x's dtype."""
    return _ext.dtype_code(x), _ext.dtype_code(x)


def _launch(x, shift, scale, out, eps):
    """Calls the kernel on tensors that the caller made contiguous and of one dtype."""
    C, reason = _ext.load()
    assert C is not None, reason
    B, L, D = x.shape
    C.adaln_modulate_fwd(
        _ext.ptr(x), _ext.ptr(shift), _ext.ptr(scale), _ext.ptr(out), B, L, D, eps,
        *_codes(x), x.device.index, _ext.stream_of(x),
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


# ---------------------------------------------------------------------------------------------
# gated forward, and the backward of both ops


def _gated_reference(x, y, gate, shift, scale, eps):
    r = x.double() + gate.double()[:, None] * y.double()
    return r, _reference(r, shift, scale, eps)


def _gated_eager(x, y, gate, shift, scale, eps):
    r = x + gate[:, None] * y
    return r, _eager(r, shift, scale, eps)


def _launch_gated(x, y, gate, shift, scale, r, out, eps):
    C, reason = _ext.load()
    assert C is not None, reason
    B, L, D = x.shape
    C.adaln_gated_fwd(
        _ext.ptr(x), _ext.ptr(y), _ext.ptr(gate), _ext.ptr(shift), _ext.ptr(scale), _ext.ptr(r),
        _ext.ptr(out), B, L, D, eps, *_codes(x), x.device.index, _ext.stream_of(x),
    )  # fmt: skip


def _assert_rule(got, eager, truth, what):
    assert not got.isnan().any(), f"{what}: elements left unwritten (NaN)"
    err = (got.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    bound = 2 * eager_err + FLOOR[got.dtype] * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (eager: {eager_err:.3g})"


def _gated_inputs(B, L, D, dtype, generator):
    x, shift, scale = _inputs(B, L, D, dtype, generator)
    y = (torch.randn(B, L, D, generator=generator, device="cuda") * 1.5).to(dtype)
    gate = (torch.randn(B, D, generator=generator, device="cuda") * 0.5).to(dtype)
    return x, y, gate, shift, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, L", [(1, 1), (3, 7), (2, 256)])
@pytest.mark.parametrize("D", [1, 3, 96, 1000, 1152, 4097, 8192, 9001, 40000])
def test_gated_forward(B, L, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(B * 7919 + L * 31 + D)
    x, y, gate, shift, scale = _gated_inputs(B, L, D, dtype, g)
    r, out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _launch_gated(x, y, gate, shift, scale, r, out, 1e-6)
    torch.cuda.synchronize()
    truth_r, _ = _gated_reference(x, y, gate, shift, scale, 1e-6)
    eager_r, _ = _gated_eager(x, y, gate, shift, scale, 1e-6)
    _assert_rule(r, eager_r, truth_r, "r")
    # out is modulate(r) of the r returned (rounded to the dtype): judge it against that.
    _assert_rule(out, _eager(r, shift, scale, 1e-6), _reference(r, shift, scale, 1e-6), "out")


def _splits_for(L, how):
    return {"one": 1, "some": max(1, min(L, 5)), "all": L}[how]


def _backward_case(gated, B, L, D, dtype, splits, generator, out=None):
    """Runs the backward entry on fresh NaN-poisoned buffers; returns (grads, inputs, cots)."""
    C, reason = _ext.load()
    assert C is not None, reason
    eps = 1e-6
    if gated:
        x, y, gate, shift, scale = _gated_inputs(B, L, D, dtype, generator)
        inputs = [x, y, gate, shift, scale]
        cots = [torch.randn(B, L, D, generator=generator, device="cuda").to(dtype) for _ in "rh"]
    else:
        x, shift, scale = _inputs(B, L, D, dtype, generator)
        inputs = [x, shift, scale]
        cots = [torch.randn(B, L, D, generator=generator, device="cuda").to(dtype)]
    grads = [torch.full_like(t, float("nan")) for t in inputs]
    planes = 3 if gated else 2
    partial = torch.full((planes * B * splits * D,), float("nan"), device="cuda")
    common = (B, L, D, splits, eps, *_codes(x), x.device.index, _ext.stream_of(x))
    if gated:
        dx, dy, dgate, dshift, dscale = grads
        C.adaln_gated_bwd(
            _ext.ptr(x), _ext.ptr(y), _ext.ptr(gate), _ext.ptr(scale), _ext.ptr(cots[0]),
            _ext.ptr(cots[1]), _ext.ptr(dx), _ext.ptr(dy), _ext.ptr(dgate), _ext.ptr(dshift),
            _ext.ptr(dscale), _ext.ptr(partial), *common,
        )  # fmt: skip
    else:
        dx, dshift, dscale = grads
        C.adaln_modulate_bwd(
            _ext.ptr(x), _ext.ptr(scale), _ext.ptr(cots[0]), _ext.ptr(dx), _ext.ptr(dshift),
            _ext.ptr(dscale), _ext.ptr(partial), *common,
        )  # fmt: skip
    torch.cuda.synchronize()
    return grads, inputs, cots


def _vjp(gated, inputs, cots, eps=1e-6):
    """The reference's gradients (float64 inputs give the truth, low ones eager's)."""
    from fastdit.ops import adaln

    op = adaln._gated if gated else adaln._modulate
    return op._reference_backward(cots, [*inputs, eps])


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, L, how", [(1, 1, "one"), (3, 7, "some"), (2, 256, "some"),
                                       (2, 64, "all"), (1, 300, "one")])  # fmt: skip
@pytest.mark.parametrize("D", [1, 3, 32, 96, 1000, 1152, 1536, 4097, 8192])
def test_backward(gated, B, L, how, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(B * 7919 + L * 31 + D + gated)
    splits = _splits_for(L, how)
    grads, inputs, cots = _backward_case(gated, B, L, D, dtype, splits, g)
    truth = _vjp(gated, [t.double() for t in inputs], [c.double() for c in cots])
    eager = _vjp(gated, inputs, cots)
    names = ["x", "y", "gate", "shift", "scale"] if gated else ["x", "shift", "scale"]
    for name, got, e, t in zip(names, grads, eager, truth):
        _assert_rule(got, e, t, f"d {name}")


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
def test_backward_is_deterministic(gated):
    B, L, D = 4, 2048, 1152
    results = []
    for _ in range(2):
        g = torch.Generator(device="cuda").manual_seed(99)
        grads, _, _ = _backward_case(gated, B, L, D, torch.float32, 37, g)
        results.append(grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [256, 1152])
def test_backward_misaligned_pointers_take_the_scalar_path(gated, D, dtype):
    """x and the cotangents as views one element into their storage (not 16-byte aligned)."""
    C, _ = _ext.load()
    B, L, splits, eps = 2, 9, 3, 1e-6
    g = torch.Generator(device="cuda").manual_seed(D + 3)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    x, y, gate, shift, scale = _gated_inputs(B, L, D, dtype, g)
    x = shifted(x)
    dr = shifted(torch.randn(B, L, D, generator=g, device="cuda").to(dtype))
    dh = shifted(torch.randn(B, L, D, generator=g, device="cuda").to(dtype))
    assert x.data_ptr() % 16 != 0
    common = (B, L, D, splits, eps, *_codes(x), x.device.index, _ext.stream_of(x))
    if gated:
        inputs, cots = [x, y, gate, shift, scale], [dr, dh]
        grads = [torch.full_like(t, float("nan")) for t in inputs]
        partial = torch.full((3 * B * splits * D,), float("nan"), device="cuda")
        C.adaln_gated_bwd(
            *(_ext.ptr(t) for t in (x, y, gate, scale, dr, dh, *grads, partial)), *common
        )
    else:
        inputs, cots = [x, shift, scale], [dh]
        grads = [torch.full_like(t, float("nan")) for t in inputs]
        partial = torch.full((2 * B * splits * D,), float("nan"), device="cuda")
        C.adaln_modulate_bwd(*(_ext.ptr(t) for t in (x, scale, dh, *grads, partial)), *common)
    torch.cuda.synchronize()
    truth = _vjp(gated, [t.double() for t in inputs], [c.double() for c in cots])
    eager = _vjp(gated, inputs, cots)
    for got, e, t in zip(grads, eager, truth):
        _assert_rule(got, e, t, "misaligned")


# ----------------------------------------------------------------------------------------------
# Mixed dtypes (autocast): float32 rows with float16 or bfloat16 y and (B, D) vectors


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, L, D", [(3, 7, 96), (2, 256, 1152), (2, 5, 2304), (2, 5, 97),
                                     (1, 3, 8192)])  # fmt: skip
def test_mixed_dtypes_give_the_cast_inputs_bits(gated, low, B, L, D):
    """The kernels reading y and the vectors in their dtype give what they give on those
    tensors widened to float32 (exact), bit for bit: forward, and the backward, whose
    low-precision gradients are the float32 kernel's rounded once."""
    from fastdit.ops import adaln as A

    g = torch.Generator(device="cuda").manual_seed(D + L)
    x = torch.randn(B, L, D, generator=g, device="cuda") * 2 + 0.5
    conds = [(torch.randn(B, D, generator=g, device="cuda") * 0.5).to(low) for _ in range(3)]
    y = (torch.randn(B, L, D, generator=g, device="cuda") * 1.5).to(low)
    mixed = [x, y, *conds, 1e-6] if gated else [x, conds[1], conds[2], 1e-6]
    cast = [t.float() if isinstance(t, torch.Tensor) else t for t in mixed]
    forward = A._cuda_gated if gated else A._cuda_modulate
    backward = A._cuda_gated_backward if gated else A._cuda_modulate_backward
    got, want = forward(*mixed), forward(*cast)
    for a, b in zip(*((o if gated else (o,)) for o in (got, want))):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    cots = [torch.randn(B, L, D, generator=g, device="cuda") for _ in range(2 if gated else 1)]
    grads, want_grads = backward(cots, mixed), backward(cots, cast)
    diff = [t for t in mixed if isinstance(t, torch.Tensor)]
    for t, a, b in zip(diff, grads, want_grads):
        assert a.dtype == t.dtype and torch.equal(a, b.to(t.dtype))
