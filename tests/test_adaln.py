"""The adaln family: the reference against hand-derived values and float64, and every backend
present against the reference under the tolerance rule."""

from __future__ import annotations

import math

import pytest
import torch
from devices import kernel_backends, kernel_device
from layouts import nan_filled_empty
from tolerance import assert_close_to_reference

import fastdit
from fastdit.backends import BackendError, unavailable_reason
from fastdit.ops import adaln

LOW = (torch.float32, torch.float16, torch.bfloat16)


def _device_for(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "triton" and _interpreting() else torch.device("cuda")


def _interpreting() -> bool:
    from fastdit.backends import triton_interpreting

    return triton_interpreting()


def _skip_unless(backend: str) -> torch.device:
    if backend == "torch":
        return torch.device("cpu")
    if not adaln._modulate.kernels.get(backend):
        pytest.skip(f"no {backend} kernel registered: {unavailable_reason(backend)}")
    device = _device_for(backend)
    reason = unavailable_reason(backend, device)
    if reason:
        pytest.skip(reason)
    return device


def _inputs(shape, dtype, device, layout="contiguous"):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    batch, dim = shape[0], (shape[-1] if len(shape) == 3 else shape[1])
    shift, scale = torch.randn(2, batch, dim, dtype=torch.float64) * 0.5
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, shift.to(device=device, dtype=dtype), scale.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The reference


def test_hand_derived_modulate():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [-2.0, 0.0, 0.0, 2.0]]], dtype=torch.float64)
    shift = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 0.0, -1.0, 1.0]], dtype=torch.float64)
    out = fastdit.adaln_modulate(x, shift, scale, eps=1e-6)
    # Row 0: mean 2.5, variance 1.25. Row 1: mean 0, variance 2.
    n0 = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64) / math.sqrt(1.25 + 1e-6)
    n1 = torch.tensor([-2.0, 0.0, 0.0, 2.0], dtype=torch.float64) / math.sqrt(2 + 1e-6)
    factor = torch.tensor([2.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    expected = torch.stack([n0 * factor + 0.5, n1 * factor + 0.5])[None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_hand_derived_gated():
    x = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)
    y = torch.tensor([[[2.0, -2.0]]], dtype=torch.float64)
    gate = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    residual, h = fastdit.gated_adaln(x, y, gate, zero, zero, eps=0.0 + 1e-12)
    torch.testing.assert_close(residual, torch.tensor([[[2.0, 0.5]]], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([[[1.0, -1.0]]], dtype=torch.float64))


def test_image_layout_equals_token_layout():
    x, shift, scale = _inputs((2, 24, 3, 5), torch.float64, "cpu")
    out = fastdit.adaln_modulate(x, shift, scale)
    tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, D)
    expected = fastdit.adaln_modulate(tokens, shift, scale).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    assert out.is_contiguous()
    cl = fastdit.adaln_modulate(x.contiguous(memory_format=torch.channels_last), shift, scale)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, expected, rtol=0, atol=1e-13)


def test_gated_is_residual_then_modulate():
    x, shift, scale = _inputs((3, 7, 40), torch.float64, "cpu")
    y, gate = torch.randn_like(x), torch.randn_like(shift)
    residual, h = fastdit.gated_adaln(x, y, gate, shift, scale, 1e-5)
    torch.testing.assert_close(residual, x + gate[:, None] * y, rtol=0, atol=0)
    torch.testing.assert_close(h, fastdit.adaln_modulate(residual, shift, scale, 1e-5))


def test_statistics_survive_a_large_mean():
    # E[x^2] - mean^2 would lose every digit here; the two-pass scheme does not.
    x = torch.randn(1, 4, 256, dtype=torch.float64) + 1e4
    zero = torch.zeros(1, 256, dtype=torch.float64)
    out = fastdit.adaln_modulate(x.float(), zero.float(), zero.float())
    truth = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True))
    assert (out.double() - truth).abs().max() < 1e-2


@pytest.mark.parametrize("shape", [(2, 5, 12), (2, 12, 3, 4)])
def test_gradcheck_float64(shape):
    x, shift, scale = _inputs(shape, torch.float64, "cpu")
    y, gate = torch.randn_like(x), torch.randn_like(shift)
    args = [t.requires_grad_() for t in (x, y, gate, shift, scale)]
    assert torch.autograd.gradcheck(lambda *a: fastdit.gated_adaln(*a, 1e-6), args)
    assert torch.autograd.gradcheck(
        lambda x, s, c: fastdit.adaln_modulate(x, s, c), (args[0], args[3], args[4])
    )


@pytest.mark.parametrize("layout", ["tokens", "channels_first", "channels_last"])
def test_opcheck(layout):
    shape = (2, 3, 8) if layout == "tokens" else (2, 8, 2, 3)
    x, shift, scale = _inputs(shape, torch.float32, "cpu", layout)
    y, gate = torch.randn_like(x), torch.randn_like(shift)
    for t in (x, y, gate, shift, scale):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastdit.adaln_modulate, (x, shift, scale, 1e-6, "torch"))
    torch.library.opcheck(torch.ops.fastdit.gated_adaln, (x, y, gate, shift, scale, 1e-6, "auto"))


def test_compile_fullgraph():
    x, shift, scale = _inputs((2, 6, 32), torch.float32, "cpu")
    y, gate = torch.randn_like(x), torch.randn_like(shift)

    def step(x, y, gate, shift, scale):
        r, h = fastdit.gated_adaln(x, y, gate, shift, scale)
        return fastdit.adaln_modulate(r + h, scale, shift)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y, gate, shift, scale), step(x, y, gate, shift, scale))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, s, c: (x[0], s, c), ValueError, "x must be 3-D or 4-D"),
        (lambda x, s, c: (x, s[:1], c), ValueError, r"shift must have shape \(2, 8\)"),
        (lambda x, s, c: (x, s, c[:, :4]), ValueError, r"scale must have shape \(2, 8\)"),
        (lambda x, s, c: (x, s[:, None], c), ValueError, "shift must be 2-D"),
        (lambda x, s, c: (x, s.half(), c), TypeError, "shift has dtype torch.float16"),
        (lambda x, s, c: (x.int(), s, c), TypeError, "x must be float32"),
        (lambda x, s, c: (x, s.tolist(), c), TypeError, "shift must be a torch.Tensor"),
        (lambda x, s, c: (x.transpose(1, 2), s, c), ValueError, r"shift must have shape \(2, 3\)"),
    ],
)
def test_bad_input(make, error, match):
    x, shift, scale = _inputs((2, 3, 8), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        fastdit.adaln_modulate(*make(x, shift, scale))


def test_bad_eps_and_y():
    x, shift, scale = _inputs((2, 3, 8), torch.float32, "cpu")
    for eps in (0.0, -1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps must be positive and finite"):
            fastdit.adaln_modulate(x, shift, scale, eps=eps)
    with pytest.raises(ValueError, match=r"gated_adaln: y must have shape \(2, 3, 8\)"):
        fastdit.gated_adaln(x, x[:, :2], shift, shift, scale)


def test_non_contiguous_tokens_are_handled():
    _, shift, scale = _inputs((2, 5, 8), torch.float64, "cpu")
    xt = torch.randn(2, 8, 5, dtype=torch.float64).transpose(1, 2)  # (2, 5, 8), strided
    torch.testing.assert_close(
        fastdit.adaln_modulate(xt, shift, scale),
        fastdit.adaln_modulate(xt.contiguous(), shift, scale),
    )


# ---------------------------------------------------------------------------------------------
# Backends against the reference


CASES = [
    ((1, 1, 1), "contiguous"),  # one token, D = 1 (the norm of a single channel is 0)
    ((1, 3, 96), "contiguous"),  # U-DiT-S width
    ((2, 7, 1152), "contiguous"),  # DiT-XL width, not a power of two
    ((3, 5, 1000), "contiguous"),
    ((2, 2, 4097), "contiguous"),
    ((1, 2, 8192), "contiguous"),
    ((2, 96, 3, 5), "contiguous"),  # images, channels-first
    ((2, 1152, 5, 7), "contiguous"),  # channels-first in many chunks, tiles of a full run
    ((3, 100, 4, 9), "contiguous"),  # channels-first, D = 100 in masked chunks
    ((1, 40, 3, 1), "contiguous"),  # channels-first, one tile of a half run (W = 1)
    ((1, 24, 20, 9), "contiguous"),  # channels-first, 6-12 tiles: their partials in steps of 8
    ((2, 96, 3, 5), "channels_last"),
    ((1, 1152, 2, 2), "channels_last"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=str)
def test_modulate_forward_backends(backend, dtype, shape, layout):
    device = _skip_unless(backend)
    x, shift, scale = _inputs(shape, dtype, device, layout)
    truth = adaln.reference_modulate(x.double(), shift.double(), scale.double(), 1e-6)
    eager = adaln.reference_modulate(x, shift, scale, 1e-6)
    try:
        got = fastdit.adaln_modulate(x, shift, scale, backend=backend)
    except BackendError as e:
        pytest.skip(str(e))  # a layout this backend declines: auto covers it, tested below
    assert adaln._modulate.last_backend == backend
    assert got.stride() == eager.stride(), "the output layout must be the reference's"
    assert_close_to_reference(got, eager, truth, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_modulate_writes_every_element(backend):
    """Outputs poisoned with NaN before the call: an element the kernel skips stays NaN."""
    device = _skip_unless(backend)
    x, shift, scale = _inputs((2, 9, 200), torch.float32, device)
    with nan_filled_empty():
        got = fastdit.adaln_modulate(x, shift, scale, backend=backend)
    assert adaln._modulate.last_backend == backend
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_inputs(backend):
    device = _skip_unless(backend)
    big, shift, scale = _inputs((2, 10, 160), torch.float32, device)
    x = big[:, 1:8, 16:144]  # non-contiguous rows and an offset start
    shift, scale = shift[:, 16:144], scale[:, 16:144]
    truth = adaln.reference_modulate(x.double(), shift.double(), scale.double(), 1e-6)
    eager = adaln.reference_modulate(x, shift, scale, 1e-6)
    if backend == "cuda":
        # the cuda kernels read whole contiguous rows: strided tokens are refused by name when
        # cuda is asked for, and auto hands them to a kernel that reads them in place
        with pytest.raises(fastdit.BackendError, match="x is strided"):
            fastdit.adaln_modulate(x, shift, scale, backend="cuda")
        got = fastdit.adaln_modulate(x, shift, scale)
        in_place = "torch" if unavailable_reason("triton", device) else "triton"
        assert adaln._modulate.last_backend == in_place
    else:
        got = fastdit.adaln_modulate(x, shift, scale, backend=backend)
        assert adaln._modulate.last_backend == backend
    assert_close_to_reference(got, eager, truth, f"{backend} strided")


def test_auto_prefers_a_kernel_and_falls_back():
    device = kernel_device()
    x, shift, scale = _inputs((2, 3, 64), torch.float64, device)
    fastdit.adaln_modulate(x, shift, scale)
    assert adaln._modulate.last_backend == "torch"  # no kernel takes float64
    kernels = kernel_backends(device)
    if kernels:
        fastdit.adaln_modulate(x.float(), shift.float(), scale.float())
        assert adaln._modulate.last_backend == kernels[0]


def test_auto_runs_the_kernel_backward():
    """auto runs a kernel's forward and, where it has one, its backward."""
    device = _skip_unless("triton")
    x, shift, scale = _inputs((2, 4, 48), torch.float32, device)
    args = [t.clone().requires_grad_() for t in (x, shift, scale)]
    ref_args = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    weight = torch.randn(2, 4, 48, device=device)
    (fastdit.adaln_modulate(*args) * weight).sum().backward()
    assert adaln._modulate.last_backward_backend in ("cuda", "triton")
    (adaln.reference_modulate(*ref_args, 1e-6) * weight.double()).sum().backward()
    for got, truth in zip(args, ref_args):
        torch.testing.assert_close(got.grad.double(), truth.grad, rtol=1e-4, atol=1e-4)


def test_explicit_backend_that_cannot_serve_raises():
    x, shift, scale = _inputs((2, 3, 8), torch.float64, "cpu")
    with pytest.raises(BackendError, match="adaln_modulate: backend 'cuda' cannot serve"):
        fastdit.adaln_modulate(x, shift, scale, backend="cuda")
    with pytest.raises(BackendError, match="gated_adaln: backend 'triton' cannot serve"):
        fastdit.gated_adaln(x, x, shift, shift, scale, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastdit.adaln_modulate(x, shift, scale, backend="fast")


# ---------------------------------------------------------------------------------------------
# gated_adaln and the backward of both ops, every backend against the float64 reference


def _gated_inputs(shape, dtype, device, layout="contiguous"):
    x, shift, scale = _inputs(shape, dtype, device, layout)
    y = (torch.randn(shape, dtype=torch.float64) * 1.5).to(device=device, dtype=dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    gate = (torch.randn(shift.shape, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    return x, y, gate, shift, scale


def _op_inputs(name, shape, dtype, device, layout="contiguous"):
    """(op, inputs without eps) for "modulate" or "gated"."""
    if name == "modulate":
        return adaln._modulate, list(_inputs(shape, dtype, device, layout))
    return adaln._gated, list(_gated_inputs(shape, dtype, device, layout))


def _cotangents(op, inputs):
    """Random cotangents of the op's outputs, in the reference's layout."""
    outs = op.reference(*inputs, 1e-6)
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    return [torch.randn(o.shape, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]


def _kernel_backward(op, backend, grads, inputs):
    """The backend's backward through the framework (its layout fix-ups included)."""
    return op._bwd(*grads, *inputs, 1e-6, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=str)
def test_gated_forward_backends(backend, dtype, shape, layout):
    device = _skip_unless(backend)
    inputs = _gated_inputs(shape, dtype, device, layout)
    truth = adaln.reference_gated(*(t.double() for t in inputs), 1e-6)
    eager = adaln.reference_gated(*inputs, 1e-6)
    try:
        got = fastdit.gated_adaln(*inputs, backend=backend)
    except BackendError as e:
        pytest.skip(str(e))
    assert adaln._gated.last_backend == backend
    for name, g, e, t in zip(("r", "out"), got, eager, truth):
        assert g.stride() == e.stride(), f"{name}: the output layout must be the reference's"
        assert_close_to_reference(g, e, t, f"{backend} {dtype} {shape} {name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op_name", ["modulate", "gated"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape, layout", CASES, ids=str)
def test_backward_backends(backend, op_name, dtype, shape, layout):
    device = _skip_unless(backend)
    op, inputs = _op_inputs(op_name, shape, dtype, device, layout)
    reason = op.why_not(backend, [*inputs, 1e-6], backward=True)
    if reason:
        pytest.skip(reason)
    grads = _cotangents(op, inputs)
    got = _kernel_backward(op, backend, grads, inputs)
    assert op.last_backward_backend == backend
    eager = op._reference_backward(grads, [*inputs, 1e-6])
    truth = op._reference_backward(
        [g.double() for g in grads], [t.double() for t in inputs] + [1e-6]
    )
    names = [op.arg_names[i] for i in op.diff_index]
    for name, g, e, t, x in zip(names, got, eager, truth, (inputs[i] for i in op.diff_index)):
        assert g.stride() == torch.empty_like(x).stride(), f"d {name}: layout"
        assert_close_to_reference(g, e, t, f"{backend} {op_name} {dtype} {shape} d {name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op_name", ["modulate", "gated"])
@pytest.mark.parametrize("shape", [(3, 37, 200), (2, 200, 5, 7)], ids=["tokens", "channels_first"])
def test_every_element_is_written(backend, op_name, shape):
    """Outputs and gradients (and scratch) poisoned with NaN: a skipped element stays NaN."""
    device = _skip_unless(backend)
    op, inputs = _op_inputs(op_name, shape, torch.float32, device)
    assert op.why_not(backend, [*inputs, 1e-6], backward=True) == ""  # both layouts served
    grads = _cotangents(op, inputs)
    with nan_filled_empty():
        outs = op(*inputs, 1e-6, backend=backend)
        assert op.last_backend == backend
        outs = (outs,) if isinstance(outs, torch.Tensor) else outs
        assert all(torch.isfinite(o).all() for o in outs), "forward left elements unwritten"
        got = _kernel_backward(op, backend, grads, inputs)
        assert op.last_backward_backend == backend
        for i, g in zip(op.diff_index, got):
            assert torch.isfinite(g).all(), f"backward left d {op.arg_names[i]} partly unwritten"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op_name", ["modulate", "gated"])
@pytest.mark.parametrize("layout", ["tokens", "channels_first"])
def test_backward_is_deterministic(backend, op_name, layout):
    """The sums over tokens go in a fixed order: two runs give bitwise-equal gradients."""
    device = _skip_unless(backend)
    if layout == "tokens":
        shape = (2, 300, 64) if device.type == "cpu" else (4, 4096, 1152)
    else:
        shape = (2, 64, 10, 13) if device.type == "cpu" else (32, 192, 32, 32)
    op, inputs = _op_inputs(op_name, shape, torch.float32, device)
    if op.why_not(backend, [*inputs, 1e-6], backward=True):
        pytest.skip(op.why_not(backend, [*inputs, 1e-6], backward=True))
    grads = _cotangents(op, inputs)
    first = _kernel_backward(op, backend, grads, inputs)
    second = _kernel_backward(op, backend, grads, inputs)
    for i, a, b in zip(op.diff_index, first, second):
        assert torch.equal(a, b), f"d {op.arg_names[i]} differs between two runs"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_through_autograd_with_odd_cotangents(backend):
    """Cotangents as autograd makes them: expanded (stride 0 everywhere, from r.sum()) and
    permuted with a broadcast dimension (from a weighted sum over a permuted h)."""
    device = _skip_unless(backend)
    x, y, gate, shift, scale = _gated_inputs((2, 96, 5, 3), torch.float32, device, "channels_last")
    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    weight = torch.linspace(-1, 1, 96, device=device)

    def loss(args, chosen):
        r, h = fastdit.gated_adaln(*args, backend=chosen)
        return r.sum() + (h.permute(0, 2, 3, 1) * weight).sum()

    loss(leaves, backend).backward()
    assert adaln._gated.last_backward_backend == backend
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    loss(ref_leaves, "torch").backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The triton kernels of channels-first images (token tiles, channels in chunks)


def _spy(monkeypatch, module, name: str) -> list:
    """Record the launches of the Triton kernel ``module.name`` (its grids)."""
    kernel, grids = getattr(module, name), []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Spy())
    return grids


@pytest.mark.parametrize("op_name", ["modulate", "gated"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_each_layout_takes_its_triton_kernels(op_name, layout, monkeypatch):
    device = _skip_unless("triton")
    from fastdit.triton import adaln as T

    names = ("_cf_fwd_kernel", "_cf_bwd_kernel", "_fwd_kernel", "_bwd_kernel")
    grids = {n: _spy(monkeypatch, T, n) for n in names}
    op, inputs = _op_inputs(op_name, (2, 96, 5, 7), torch.float32, device, layout)
    op(*inputs, 1e-6, backend="triton")
    _kernel_backward(op, "triton", _cotangents(op, inputs), inputs)
    chunked = layout == "contiguous"  # channels-first
    # the chunked kernels: one program per tile of tokens (35 tokens a sample: 3 tiles of 16
    # float32 tokens under the interpreter; 5 of 8 on a GPU, whose many SMs halve the tile)
    tokens = T._cf_tokens(2, 35, 4, device)
    assert tokens == (16 if device.type == "cpu" else 8)
    tiles = [(2 * -(-35 // tokens),)]
    assert grids["_cf_fwd_kernel"] == (tiles if chunked else [])
    assert grids["_cf_bwd_kernel"] == (tiles if chunked else [])
    assert len(grids["_fwd_kernel"]) == len(grids["_bwd_kernel"]) == (0 if chunked else 1)


@pytest.mark.parametrize("op_name", ["modulate", "gated"])
@pytest.mark.parametrize("case", ["large_mean", "chunks_apart", "dout_mean"])
def test_channels_first_statistics_hold_on_hard_inputs(case, op_name):
    """The chunked kernels take each token's statistics in one pass over chunks of channels,
    shifted by the first chunk's mean and merging the chunks' means and sums of squares.
    float32; modulate at D = 1536 (U-DiT-L) in 12 chunks forward and 24 backward, gated at
    D = 1500 (a masked last chunk) on 20 tokens (a tile of 4 padded ones). Forward and backward
    within the tolerance rule on inputs that break the shortcuts: a mean of 1e4 (unshifted,
    E[x^2] - mean^2 keeps no digit, and merged chunk means rounded at that scale come near the
    bound), a mean near 0 with the first chunk's channels 20 standard deviations from the rest
    (a shift alone loses a factor D / CHUNK: over twice the bound), and a cotangent whose mean
    is 100 times its spread (mean(g n) as a difference of two large sums cancels)."""
    device = _skip_unless("triton")
    from fastdit.triton import adaln as T

    gen = torch.Generator().manual_seed(3)
    # On a GPU, as many tiles again per SM, so that the tiles keep their 16 tokens (_cf_tokens)
    reps = T._sm_count(device.index or 0) if device.type == "cuda" else 1
    shape = (4, 1536, 1, 16 * reps) if op_name == "modulate" else (4, 1500, 1, 16 * reps + 4)
    width = 64  # the backward's chunk
    assert T._cf_tokens(4, shape[3], 4, device) == 16
    assert T._cf_shape(16, shape[1], True)[0] == width
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "large_mean":
        x += 1e4
    else:
        x *= 0.05
        x[:, :width] += 1.0
        x[:, width:] -= width / (shape[1] - width)  # the mean stays near 0
    zero = torch.zeros(shape[0], shape[1], dtype=torch.float64)
    op, inputs = adaln._modulate, [x, zero, zero]  # shift 0, scale 0
    if op_name == "gated":  # r = x + gate * y, close to x
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
        gate = 0.01 * torch.randn(shape[:2], generator=gen, dtype=torch.float64)
        op, inputs = adaln._gated, [x, y, gate, zero, zero]
    inputs = [t.to(device, torch.float32) for t in inputs]
    got = op(*inputs, 1e-6, backend="triton")
    eager = op.reference(*inputs, 1e-6)
    truth = op.reference(*(t.double() for t in inputs), 1e-6)
    for g, e, tr in zip(*((o,) if op_name == "modulate" else o for o in (got, eager, truth))):
        assert_close_to_reference(g, e, tr, f"{case} forward")
    dout = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "dout_mean":
        dout = 1.0 + 0.01 * dout
    grads = [dout] if op_name == "modulate" else [torch.randn(shape, generator=gen), dout]
    grads = [g.to(device, torch.float32) for g in grads]
    got = _kernel_backward(op, "triton", grads, inputs)
    eager = op._reference_backward(grads, [*inputs, 1e-6])
    truth = op._reference_backward(
        [g.double() for g in grads], [t.double() for t in inputs] + [1e-6]
    )
    names = [op.arg_names[i] for i in op.diff_index]
    for name, g, e, tr in zip(names, got, eager, truth):
        assert_close_to_reference(g, e, tr, f"{case} d {name}")


@pytest.mark.parametrize("layout", ["tokens", "channels_first", "channels_last"])
def test_opcheck_triton(layout):
    """opcheck with the triton kernels: schema, fake, autograd registration, the backward op."""
    device = _skip_unless("triton")
    shape = (2, 3, 8) if layout == "tokens" else (2, 8, 2, 3)
    x, y, gate, shift, scale = _gated_inputs(shape, torch.float32, device, layout)
    for t in (x, y, gate, shift, scale):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastdit.adaln_modulate, (x, shift, scale, 1e-6, "triton"))
    torch.library.opcheck(torch.ops.fastdit.gated_adaln, (x, y, gate, shift, scale, 1e-6, "triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_mixed_dtypes(backend):
    """The ops as autocast calls them (float32 x, bfloat16 y and vectors): the fake
    implementations and the backward op give each output and gradient its dtype."""
    device = _skip_unless(backend) if backend != "torch" else torch.device("cpu")
    x, y, gate, shift, scale = _gated_inputs((2, 3, 8), torch.float32, device)
    y, gate, shift, scale = (t.bfloat16() for t in (y, gate, shift, scale))
    for t in (x, y, gate, shift, scale):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastdit.adaln_modulate, (x, shift, scale, 1e-6, backend))
    torch.library.opcheck(torch.ops.fastdit.gated_adaln, (x, y, gate, shift, scale, 1e-6, backend))


def test_compile_fullgraph_through_a_dit_block():
    """torch.compile(fullgraph=True) of a DiT block on the triton kernels, forward and backward,
    against the same block run eagerly on the reference."""
    device = _skip_unless("triton")
    from fastdit.nn import DiTBlock

    block = DiTBlock(32, 2, mlp_ratio=2.0, backend="triton").to(device)
    with torch.no_grad():
        for p in block.adaLN_modulation.parameters():
            p.normal_(0, 0.3)  # not adaLN-Zero: the gates and modulations must matter
    x, c = torch.randn(2, 5, 32, device=device), torch.randn(2, 32, device=device)

    def run(fn):
        xs = x.clone().requires_grad_()
        out = fn(xs, c)
        (out * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        grads = [p.grad.clone() for p in block.parameters()] + [xs.grad]
        block.zero_grad(set_to_none=True)
        return out.detach(), grads

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled)
    assert adaln._gated.last_backend == "triton"
    assert adaln._gated.last_backward_backend == "triton"
    block.backend = "torch"
    for module in block.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    ref_out, ref_grads = run(block)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_cuda_declines_with_reasons():
    """What the cuda backend leaves to triton/torch under auto, and why (checked on CPU)."""
    x, y, gate, shift, scale = _gated_inputs((2, 8, 3, 4), torch.float32, "cpu")
    assert adaln._cuda_channels_first(x)
    assert adaln._cuda_supports_gated(x, y, gate, shift, scale, 1e-6) == ""
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, y)]
    assert adaln._cuda_supports_gated(*cl, gate, shift, scale, 1e-6) == ""
    # the rows in one memory format, x's
    reason = adaln._cuda_supports_gated(x, cl[1], gate, shift, scale, 1e-6)
    assert "channels-first x with contiguous (B, D, H, W) images (y is not)" in reason
    reason = adaln._cuda_supports_gated(cl[0], y, gate, shift, scale, 1e-6)
    assert "channels-last x with channels-last (B, D, H, W) images (y is not)" in reason
    assert "(x is not)" in adaln._cuda_supports_modulate(x[..., ::2], shift, scale, 1e-6)
    # any D channels-first (tiles of tokens), D <= 8192 for rows
    wide, vec = torch.randn(1, 8193, 2, 3), torch.zeros(1, 8193)
    assert adaln._cuda_supports_modulate(wide, vec, vec, 1e-6) == ""
    huge, vec = torch.empty(1, 2**31 - 128, 1, 2, device="meta"), torch.empty(1, 2**31 - 128)
    assert "D <= 2^31 - 129" in adaln._cuda_supports_modulate(huge, vec, vec, 1e-6)
    tokens = torch.randn(2, 4, 8)
    assert "contiguous (B, L, D) tokens" in adaln._cuda_supports_modulate(
        tokens.transpose(1, 2).contiguous().transpose(1, 2), shift, scale, 1e-6
    )
    assert "D <= 8192" in adaln._cuda_supports_modulate(
        torch.randn(1, 1, 8193), torch.zeros(1, 8193), torch.zeros(1, 8193), 1e-6
    )
    assert "float64" in adaln._cuda_supports_modulate(tokens.double(), shift, scale, 1e-6)
    assert "contiguous shift" in adaln._cuda_supports_modulate(
        tokens, torch.randn(8, 2).t(), scale, 1e-6
    )


def test_row_counts_past_32_bits_are_declined():
    """The kernels count rows in 32 bits: past that, cuda and triton decline (auto then runs the
    torch reference) instead of failing in the extension or indexing wrongly. Meta tensors: only
    shapes are read. A width-4 row makes these reachable on an 80 GB GPU (2^31 rows: 16 GiB)."""
    triton_adaln = pytest.importorskip("fastdit.triton.adaln")

    def vec(b, d):
        return torch.empty(b, d, device="meta", dtype=torch.bfloat16)

    for shape, cuda_ok, triton_ok in [
        ((1, 2**31, 4), False, False),  # L = 2^31 tokens
        ((1, 4, 2**16, 2**15), False, False),  # an image of 2^31 pixels
        ((2**31, 1, 4), False, False),  # B = 2^31
        ((2, 2**29, 4), True, False),  # B * L = 2^30: past triton's bound only
        ((2, 2**29 - 1, 4), True, True),
        ((2**26, 4, 32, 32), False, False),  # channels-first: 2^31 blocks of 32 tokens
        ((2**26 - 1, 4, 32, 32), True, False),
    ]:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        d = shape[-1] if x.dim() == 3 else shape[1]
        cuda = adaln._cuda_supports_modulate(x, vec(shape[0], d), vec(shape[0], d), 1e-6)
        assert (cuda == "") == cuda_ok and (cuda_ok or "< 2^31" in cuda), (shape, cuda)
        tri = triton_adaln.supports_gated(x, x, *[vec(shape[0], d)] * 3, 1e-6)
        assert (tri == "") == triton_ok and (triton_ok or "B * L < 2^30" in tri), (shape, tri)


def test_triton_width_bound_holds_for_whole_rows_only():
    """The whole-row kernels (tokens, channels-last x) take D <= 16384; channels-first x goes to
    the chunked kernels, which take any D: one is run past the bound, forward and backward."""
    device = _skip_unless("triton")
    from fastdit.triton import adaln as T

    d = T.MAX_D + 256
    vec = torch.empty(1, d, device="meta")
    for shape, last, ok in [((1, 2, d), False, False), ((1, d, 2, 3), True, False),
                            ((1, d, 2, 3), False, True)]:  # fmt: skip
        x = torch.empty(shape, device="meta")
        x = x.contiguous(memory_format=torch.channels_last) if last else x
        reason = T.supports_modulate(x, vec, vec, 1e-6)
        assert (reason == "") == ok and (ok or "D <= 16384" in reason), (shape, last, reason)
    op, inputs = _op_inputs("modulate", (1, d, 2, 3), torch.float32, device)
    got = op(*inputs, 1e-6, backend="triton")
    assert_close_to_reference(
        got, op.reference(*inputs, 1e-6), op.reference(*(t.double() for t in inputs), 1e-6)
    )
    grads = _cotangents(op, inputs)
    got = _kernel_backward(op, "triton", grads, inputs)
    eager = op._reference_backward(grads, [*inputs, 1e-6])
    truth = op._reference_backward(
        [g.double() for g in grads], [t.double() for t in inputs] + [1e-6]
    )
    for name, g, e, tr in zip(("x", "shift", "scale"), got, eager, truth):
        assert_close_to_reference(g, e, tr, f"D {d} d {name}")


def test_triton_row_backward_launch(monkeypatch):
    """The whole-row backward's launch: one row a step at 4 elements a thread (8 at D = 8192),
    rows packed into one warp only below D = 128, and on NVIDIA GPUs at most BWD_REGISTERS = 64
    registers a thread, so that 32 warps an SM are resident whatever the program's warps, as
    _splits plans (the spills the cap costs: tests/test_triton_compile.py). Its gradients
    still match."""
    device = _skip_unless("triton")
    from fastdit.triton import adaln as T

    assert T.BWD_REGISTERS == 64
    assert T._bwd_options() == {"maxnreg": 64}
    monkeypatch.setattr(torch.version, "hip", "6.4")  # AMD's Triton has no maxnreg option
    assert T._bwd_options() == {}
    monkeypatch.undo()
    shapes = {
        32: (4, 32, 1),
        96: (1, 128, 1),
        100: (1, 128, 1),
        768: (1, 1024, 8),
        1152: (1, 2048, 16),
        8192: (1, 8192, 32),
    }  # (ROWS, BLOCK_D, num_warps)
    for dim, shape in shapes.items():
        assert T._launch_shape(1024, dim, backward=True) == shape, dim
    assert T._launch_shape(2, 32, backward=True) == (2, 32, 1)  # no more rows than the sample's
    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    kernel = T._bwd_kernel
    monkeypatch.setattr(T, "_bwd_kernel", Spy())
    op, inputs = _op_inputs("gated", (2, 5, 24), torch.float32, device)
    grads = _cotangents(op, inputs)
    got = _kernel_backward(op, "triton", grads, inputs)
    assert [(k["maxnreg"], k["ROWS"], k["num_warps"]) for k in launches] == [(64, 4, 1)]
    truth = op._reference_backward(
        [g.double() for g in grads], [t.double() for t in inputs] + [1e-6]
    )
    eager = op._reference_backward(grads, [*inputs, 1e-6])
    for name, g, e, tr in zip(("x", "y", "gate", "shift", "scale"), got, eager, truth):
        assert_close_to_reference(g, e, tr, f"d {name}")


def test_extension_validates_the_adaln_entries():
    """fastdit._C's new entries reject bad arguments naming the op (no GPU needed)."""
    from fastdit import _ext

    C, reason = _ext.load()
    if C is None:
        pytest.skip(reason)
    assert C.ADALN_BWD_MAX_D == adaln.CUDA_MAX_D
    p = 256
    gated_fwd = dict(
        x_ptr=p, y_ptr=p, gate_ptr=p, shift_ptr=p, scale_ptr=p, r_ptr=p, out_ptr=p,
        B=2, L=3, D=8, eps=1e-6, dtype=0, cond_dtype=0, device=0, stream=0,
    )  # fmt: skip
    mod_bwd = dict(
        x_ptr=p, scale_ptr=p, dout_ptr=p, dx_ptr=p, dshift_ptr=p, dscale_ptr=p, partial_ptr=p,
        B=2, L=3, D=8, splits=2, eps=1e-6, dtype=0, cond_dtype=0, device=0, stream=0,
    )  # fmt: skip
    gated_bwd = dict(
        x_ptr=p, y_ptr=p, gate_ptr=p, scale_ptr=p, dr_ptr=p, dout_ptr=p, dx_ptr=p, dy_ptr=p,
        dgate_ptr=p, dshift_ptr=p, dscale_ptr=p, partial_ptr=p,
        B=2, L=3, D=8, splits=3, eps=1e-6, dtype=0, cond_dtype=0, device=0, stream=0,
    )  # fmt: skip
    common_bad = [
        dict(dtype=3), dict(cond_dtype=3), dict(dtype=2, cond_dtype=1), dict(dtype=1, cond_dtype=0),
        dict(B=-1), dict(L=-2), dict(D=0), dict(eps=-1.0), dict(device=-1),
        dict(x_ptr=0), dict(B=2**40, L=2**20, D=2**10),
    ]  # fmt: skip
    backward_bad = [
        dict(D=8193), dict(splits=0), dict(splits=4), dict(partial_ptr=0), dict(dx_ptr=0),
        dict(L=2**31, splits=1),
    ]  # fmt: skip
    for name, good, bad in [
        ("adaln_gated_fwd", gated_fwd, common_bad + [dict(r_ptr=0), dict(y_ptr=0)]),
        ("adaln_modulate_bwd", mod_bwd, common_bad + backward_bad),
        ("adaln_gated_bwd", gated_bwd, common_bad + backward_bad + [dict(dgate_ptr=0)]),
    ]:
        fn = getattr(C, name)
        for change in bad:
            with pytest.raises(ValueError, match=rf"fastdit\._C\.{name}"):
                fn(**{**good, **change})
        assert fn(**{**good, "B": 0}) is None  # no work: a no-op, even without a GPU
        if C.device_count() == 0:
            with pytest.raises(RuntimeError, match=rf"^fastdit\._C\.{name}: "):
                fn(**good)
    # channels-first: any D, splits = ceil(L / 32), B * ceil(L / 32) blocks < 2^31
    for name, good, bad in [
        ("adaln_gated_fwd", gated_fwd, [dict(B=2**31, L=3), dict(D=2**31 - 128)]),
        ("adaln_modulate_bwd", mod_bwd, [dict(splits=2), dict(L=33, splits=1), dict(L=2**31)]),
        ("adaln_gated_bwd", gated_bwd, [dict(splits=3), dict(L=65, splits=2)]),
    ]:
        fn = getattr(C, name)
        good = {**good, "channels_first": True, **({"splits": 1} if "splits" in good else {})}
        for change in bad:
            with pytest.raises(ValueError, match=rf"fastdit\._C\.{name}"):
                fn(**{**good, **change})
        if C.device_count() == 0:  # D past the row kernels' bound is valid here
            with pytest.raises(RuntimeError, match=rf"^fastdit\._C\.{name}: "):
                fn(**{**good, "D": 8193})
    good = dict(B=2, L=3, D=8, dtype=0, gated=True, device=0)
    assert C.adaln_bwd_splits(**{**good, "D": 8193, "L": 65}, channels_first=True) == 3
    for change in [dict(B=0), dict(L=0), dict(D=8193), dict(dtype=5), dict(device=-1)]:
        with pytest.raises(ValueError, match=r"fastdit\._C\.adaln_bwd_splits"):
            C.adaln_bwd_splits(**{**good, **change})
    if C.device_count() == 0:
        with pytest.raises(RuntimeError, match=r"^fastdit\._C\.adaln_bwd_splits: "):
            C.adaln_bwd_splits(**good)
