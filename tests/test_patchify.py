"""The patchify family: patchify, unpatchify, patch_embed, final_layer (torch reference)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from devices import kernel_backends, kernel_device
from layouts import nan_filled_empty, nan_gapped

import fastdit

P = importlib.import_module("fastdit.ops.patchify")  # fastdit.ops.patchify is the function

f64 = torch.float64


def _randn(*shape: int, dtype: torch.dtype = f64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Hand-derived cases

# x[0, c, r, col] = 16 c + 4 r + col; p = 2 gives a 2 x 2 grid of patches.
ARANGE = torch.arange(32, dtype=f64).reshape(1, 2, 4, 4)
TOKENS_CPQ = [
    [0, 1, 4, 5, 16, 17, 20, 21],  # patch (0, 0): channel 0 rows 0-1 cols 0-1, then channel 1
    [2, 3, 6, 7, 18, 19, 22, 23],  # patch (0, 1)
    [8, 9, 12, 13, 24, 25, 28, 29],  # patch (1, 0)
    [10, 11, 14, 15, 26, 27, 30, 31],  # patch (1, 1)
]
TOKENS_PQC = [
    [0, 16, 1, 17, 4, 20, 5, 21],  # (a, b) = (0, 0): both channels, then (0, 1), (1, 0), (1, 1)
    [2, 18, 3, 19, 6, 22, 7, 23],
    [8, 24, 9, 25, 12, 28, 13, 29],
    [10, 26, 11, 27, 14, 30, 15, 31],
]


@pytest.mark.parametrize("order, tokens", [("cpq", TOKENS_CPQ), ("pqc", TOKENS_PQC)])
def test_hand_derived(order, tokens):
    expected = torch.tensor([tokens], dtype=f64)
    got = fastdit.patchify(ARANGE, 2, order=order)
    assert got.shape == (1, 4, 8)
    assert torch.equal(got, expected)
    assert torch.equal(fastdit.unpatchify(expected, 2, order=order), ARANGE)


def test_hand_derived_non_square():
    # 1 channel, 2 x 4 pixels, p = 2: a 1 x 2 grid.
    x = torch.arange(8, dtype=f64).reshape(1, 1, 2, 4)
    expected = torch.tensor([[[0, 1, 4, 5], [2, 3, 6, 7]]], dtype=f64)
    for order in ("cpq", "pqc"):
        assert torch.equal(fastdit.patchify(x, 2, order=order), expected)
        assert torch.equal(fastdit.unpatchify(expected, 2, (1, 2), order=order), x)


def test_patch_size_one_is_flatten():
    x = _randn(2, 3, 4, 5)
    flat = x.flatten(2).transpose(1, 2)
    for order in ("cpq", "pqc"):
        assert torch.equal(fastdit.patchify(x, 1, order=order), flat)
        assert torch.equal(fastdit.unpatchify(flat, 1, (4, 5), order=order), x)


def test_final_layer_hand_derived():
    # D = 2: LayerNorm maps a token [a, b] to [-1, 1] if a < b, else [1, -1] (eps ~ 0).
    x = torch.tensor([[[1.0, 3.0], [5.0, 1.0], [0.0, 2.0], [2.0, 0.0]]], dtype=f64)  # 4 tokens
    zero = torch.zeros(1, 2, dtype=f64)
    # Output pixel (a, b) of channel 0 reads component 2a+b of the (p*p*C = 4)-vector.
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], dtype=f64)
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0], dtype=f64)
    got = fastdit.final_layer(x, zero, zero, weight, bias, 2, eps=1e-300)
    # normalised tokens: [-1, 1], [1, -1], [-1, 1], [1, -1] -> [n0, n1, n0 + n1 + 10, 2 n0]
    rows = {+1: [-1.0, 1.0, 10.0, -2.0], -1: [1.0, -1.0, 10.0, 2.0]}
    t = [rows[+1], rows[-1], rows[+1], rows[-1]]  # token n: grid (n // 2, n % 2)
    expected = torch.tensor(
        [
            [t[0][0], t[0][1], t[1][0], t[1][1]],
            [t[0][2], t[0][3], t[1][2], t[1][3]],
            [t[2][0], t[2][1], t[3][0], t[3][1]],
            [t[2][2], t[2][3], t[3][2], t[3][3]],
        ],
        dtype=f64,
    )[None, None]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Round trips and independent formulations

SHAPES = [  # (B, C, H, W, p)
    (2, 3, 4, 6, 2),
    (1, 4, 6, 9, 3),
    (3, 2, 8, 4, 4),
    (1, 1, 8, 16, 8),
]


@pytest.mark.parametrize("order", ["cpq", "pqc"])
@pytest.mark.parametrize("B, C, H, W, p", SHAPES)
def test_round_trip(order, B, C, H, W, p):
    x = _randn(B, C, H, W, dtype=torch.float32)
    tokens = fastdit.patchify(x, p, order=order)
    assert tokens.shape == (B, (H // p) * (W // p), C * p * p)
    assert torch.equal(fastdit.unpatchify(tokens, p, (H // p, W // p), order=order), x)
    t = _randn(*tokens.shape, dtype=torch.bfloat16)
    back = fastdit.patchify(fastdit.unpatchify(t, p, (H // p, W // p), order=order), p, order=order)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


@pytest.mark.parametrize("B, C, H, W, p", SHAPES)
def test_against_unfold_and_einsum(B, C, H, W, p):
    x = _randn(B, C, H, W)
    h, w = H // p, W // p
    # cpq is F.unfold's order: (C, kh, kw) within a column.
    cpq = F.unfold(x, p, stride=p).transpose(1, 2)
    assert torch.equal(fastdit.patchify(x, p, order="cpq"), cpq)
    assert torch.equal(fastdit.unpatchify(cpq, p, (h, w), order="cpq"), x)
    assert torch.equal(F.fold(cpq.transpose(1, 2), (H, W), p, stride=p), x)
    # pqc is DiT's layout: tokens (n, h, w, p, q, c).
    pqc = torch.einsum("nchpwq->nhwpqc", x.reshape(B, C, h, p, w, p)).reshape(B, h * w, -1)
    assert torch.equal(fastdit.patchify(x, p, order="pqc"), pqc)
    dit = torch.einsum("nhwpqc->nchpwq", pqc.reshape(B, h, w, p, p, C)).reshape(B, C, H, W)
    assert torch.equal(fastdit.unpatchify(pqc, p, (h, w)), dit)


def test_patchify_matches_conv():
    x, weight, bias = _randn(2, 3, 8, 6), _randn(5, 3, 2, 2), _randn(5)
    conv = F.conv2d(x, weight, bias, stride=2).flatten(2).transpose(1, 2)
    got = fastdit.patchify(x, 2) @ weight.reshape(5, -1).T + bias
    torch.testing.assert_close(got, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pos_rank", [2, 3])
@pytest.mark.parametrize("B, C, H, W, p", SHAPES)
def test_patch_embed_matches_conv2d(pos_rank, B, C, H, W, p):
    D, N = 7, (H // p) * (W // p)
    conv = torch.nn.Conv2d(C, D, p, stride=p, dtype=f64)
    pos = _randn(1, N, D) if pos_rank == 3 else _randn(N, D)
    x = _randn(B, C, H, W)
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2) + pos
        got = fastdit.patch_embed(x, conv.weight, conv.bias, pos)
    assert got.shape == (B, N, D) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _final_layer_einsum(x, shift, scale, weight, bias, p, h, w, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    m = (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    y = torch.einsum("bnd,kd->bnk", m, weight) + bias
    C = weight.shape[0] // (p * p)
    y = y.reshape(x.shape[0], h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", y).reshape(x.shape[0], C, h * p, w * p)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("h, w", [(2, 2), (1, 3), (3, 2)])
def test_final_layer_against_einsum(p, h, w):
    B, D, C, eps = 2, 12, 3, 1e-6
    x = _randn(B, h * w, D) * 3 + 1
    shift, scale = _randn(B, D), _randn(B, D)
    weight, bias = _randn(p * p * C, D), _randn(p * p * C)
    grid = None if h == w else (h, w)
    got = fastdit.final_layer(x, shift, scale, weight, bias, p, grid)
    expected = _final_layer_einsum(x, shift, scale, weight, bias, p, h, w, eps)
    assert got.shape == (B, C, h * p, w * p)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_final_layer_eps_is_used():
    x = torch.tensor([[[1.0, 3.0]]], dtype=f64)  # deviations +-1, var = 1
    zero = torch.zeros(1, 2, dtype=f64)
    weight, bias = torch.eye(1, 2, dtype=f64), torch.zeros(1, dtype=f64)
    got = fastdit.final_layer(x, zero, zero, weight, bias, 1, eps=3.0)
    torch.testing.assert_close(got.flatten(), torch.tensor([-0.5], dtype=f64))


def test_final_layer_float32_close_to_float64():
    B, N, D, p, C = 2, 4, 16, 2, 4
    args64 = [_randn(B, N, D), _randn(B, D), _randn(B, D), _randn(p * p * C, D), _randn(p * p * C)]
    truth = fastdit.final_layer(*args64, p)
    got = fastdit.final_layer(*(a.float() for a in args64), p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Layouts and aliasing


def test_non_contiguous_and_channels_last():
    x = _randn(2, 3, 8, 12)
    weight, bias, pos = _randn(5, 3, 4, 4), _randn(5), _randn(1, 6, 5)
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": torch.stack([x, -x], dim=-1)[..., 0],  # W stride 2
        "strided": _randn(2, 3, 16, 12)[:, :, ::2],
    }
    layouts["strided"].copy_(x)
    for name, y in layouts.items():
        assert torch.equal(y, x), name
        for order in ("cpq", "pqc"):
            got = fastdit.patchify(y, 4, order=order)
            assert torch.equal(got, fastdit.patchify(x, 4, order=order)), name
            assert got.is_contiguous(), name
        expected = fastdit.patch_embed(x, weight, bias, pos)
        got = fastdit.patch_embed(y, weight, bias, pos)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
        assert got.is_contiguous(), name
    cl_weight = weight.contiguous(memory_format=torch.channels_last)
    got = fastdit.patch_embed(layouts["channels_last"], cl_weight, bias, pos[0].T.contiguous().T)
    torch.testing.assert_close(got, fastdit.patch_embed(x, weight, bias, pos))


def test_non_contiguous_tokens():
    B, h, w, p, C, D = 2, 2, 3, 2, 3, 8
    tokens = _randn(B, p * p * C, h * w).transpose(1, 2)  # (B, N, p*p*C), not contiguous
    for order in ("cpq", "pqc"):
        got = fastdit.unpatchify(tokens, p, (h, w), order=order)
        assert got.is_contiguous()
        assert torch.equal(got, fastdit.unpatchify(tokens.contiguous(), p, (h, w), order=order))
    x = _randn(B, D, h * w).transpose(1, 2)
    shift, scale = _randn(D, B).T, _randn(B, D)
    weight, bias = _randn(D, p * p * C).T, _randn(p * p * C)
    got = fastdit.final_layer(x, shift, scale, weight, bias, p, (h, w))
    expected = fastdit.final_layer(
        x.contiguous(), shift.contiguous(), scale, weight.contiguous(), bias, p, (h, w)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_outputs_never_alias_inputs():
    # One patch covering the whole image: patchify is a pure reshape of x in order "cpq".
    x = _randn(2, 3, 4, 4)
    tokens = fastdit.patchify(x, 4, order="cpq")
    assert torch.equal(tokens, x.reshape(2, 1, 48))
    tokens.zero_()
    assert x.abs().sum() > 0
    t = _randn(2, 1, 48)
    img = fastdit.unpatchify(t, 4, order="cpq")
    img.zero_()
    assert t.abs().sum() > 0


def test_explicit_torch_backend():
    x = _randn(1, 2, 4, 4)
    assert torch.equal(fastdit.patchify(x, 2, backend="torch"), fastdit.patchify(x, 2))
    assert P.OPS[0].last_backend == "torch"


# ----------------------------------------------------------------------------------------------
# Autograd, torch.library, torch.compile


def _embed_inputs():
    x = _randn(2, 2, 4, 6, dtype=f64).requires_grad_()
    weight = _randn(3, 2, 2, 2).requires_grad_()
    bias = _randn(3).requires_grad_()
    pos = _randn(1, 6, 3).requires_grad_()
    return x, weight, bias, pos


def _final_inputs(p=2, h=1, w=3, D=4, C=2, B=2):
    x = _randn(B, h * w, D).requires_grad_()
    shift, scale = _randn(B, D).requires_grad_(), _randn(B, D).requires_grad_()
    weight = _randn(p * p * C, D).requires_grad_()
    bias = _randn(p * p * C).requires_grad_()
    return x, shift, scale, weight, bias


def test_gradcheck_patch_embed():
    assert torch.autograd.gradcheck(lambda *a: fastdit.patch_embed(*a), _embed_inputs())
    x, weight, bias, pos = _embed_inputs()
    pos2 = pos.detach()[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fastdit.patch_embed(*a), (x, weight, bias, pos2))


def test_gradcheck_final_layer():
    for p, h, w in [(2, 1, 3), (1, 2, 2)]:
        inputs = _final_inputs(p, h, w)
        grid = (h, w)
        assert torch.autograd.gradcheck(
            lambda *a, p=p, grid=grid: fastdit.final_layer(*a, p, grid), inputs
        )


def test_gradcheck_patchify_unpatchify():
    x = _randn(1, 2, 4, 2).requires_grad_()
    t = _randn(1, 2, 8).requires_grad_()
    for order in ("cpq", "pqc"):
        assert torch.autograd.gradcheck(lambda a, o=order: fastdit.patchify(a, 2, order=o), (x,))
        assert torch.autograd.gradcheck(
            lambda a, o=order: fastdit.unpatchify(a, 2, (2, 1), order=o), (t,)
        )


def test_one_patch_image_backward_returns_its_own_gradient():
    """A single patch (h = w = 1): the reference's backward is a reshape of the cotangent, which
    the op copies (an op's output may not alias its arguments) instead of returning a view."""
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    for order in ("cpq", "pqc"):
        g = torch.randn(2, 1, 12)
        (dx,) = torch.ops.fastdit.patchify_backward(g, x, 2, order, "torch")
        assert dx.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()
        tokens = fastdit.patchify(x, 2, order=order, backend="torch")
        (dx,) = torch.autograd.grad(tokens, x, g)
        torch.testing.assert_close(
            dx, torch.autograd.grad(P.reference_patchify(x, 2, order), x, g)[0]
        )


def test_gradients_reach_through_the_op():
    x, weight, bias, pos = _embed_inputs()
    fastdit.patch_embed(x, weight, bias, pos).square().sum().backward()
    assert P.OPS[2].last_backward_backend == "torch"
    ref = [a.detach().clone().requires_grad_() for a in (x, weight, bias, pos)]
    P.reference_patch_embed(*ref).square().sum().backward()
    for a, r in zip((x, weight, bias, pos), ref):
        torch.testing.assert_close(a.grad, r.grad)


def _opcheck(name, args):
    result = torch.library.opcheck(getattr(torch.ops.fastdit, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_patchify():
    x = _randn(2, 3, 4, 6, dtype=torch.float32).requires_grad_()
    for order in ("cpq", "pqc"):
        _opcheck("patchify", (x, 2, order, "auto"))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _opcheck("patchify", (x_cl, 2, "cpq", "auto"))


def test_opcheck_unpatchify():
    t = _randn(2, 6, 12, dtype=torch.float32).requires_grad_()
    for order in ("cpq", "pqc"):
        _opcheck("unpatchify", (t, 2, [2, 3], order, "auto"))


def test_opcheck_patch_embed():
    args = tuple(a.float().detach().requires_grad_() for a in _embed_inputs())
    _opcheck("patch_embed", (*args, "auto"))
    x, weight, bias, pos = args
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _opcheck("patch_embed", (x_cl, weight, bias, pos.detach()[0], "auto"))


def test_opcheck_final_layer():
    args = tuple(a.float().detach().requires_grad_() for a in _final_inputs())
    _opcheck("final_layer", (*args, 2, [1, 3], 1e-6, "auto"))


def test_compile_fullgraph():
    B, C, H, W, p, D = 2, 4, 4, 8, 2, 8
    x = _randn(B, C, H, W, dtype=torch.float32)
    weight, bias = _randn(D, C, p, p, dtype=torch.float32), _randn(D, dtype=torch.float32)
    pos = _randn(1, 8, D, dtype=torch.float32)
    shift, scale = _randn(B, D, dtype=torch.float32), _randn(B, D, dtype=torch.float32)
    w_out, b_out = _randn(p * p * C, D, dtype=torch.float32), _randn(p * p * C, dtype=torch.float32)

    def f(x):
        tokens = fastdit.patch_embed(x, weight, bias, pos)
        tokens = tokens + fastdit.patchify(x, p, order="cpq").sum(-1, keepdim=True)
        out = fastdit.final_layer(tokens, shift, scale, w_out, b_out, p, (H // p, W // p))
        return out + fastdit.unpatchify(fastdit.patchify(x, p, order="pqc"), p, (2, 4))

    expected = f(x)
    got = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_patchify_inputs():
    x = _randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match=r"fastdit.patchify: x must be 4-D"):
        fastdit.patchify(x[0], 2)
    with pytest.raises(TypeError, match=r"fastdit.patchify: x must be float32"):
        fastdit.patchify(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match=r"fastdit.patchify: x must be a torch.Tensor"):
        fastdit.patchify([[1.0]], 2)
    with pytest.raises(ValueError, match=r"fastdit.patchify: the height and width of x"):
        fastdit.patchify(x, 4)
    with pytest.raises(ValueError, match=r"fastdit.patchify: patch_size must be >= 1"):
        fastdit.patchify(x, 0)
    with pytest.raises(TypeError, match=r"fastdit.patchify: patch_size must be an int"):
        fastdit.patchify(x, 2.0)
    with pytest.raises(ValueError, match=r"fastdit.patchify: order must be 'cpq'"):
        fastdit.patchify(x, 2, order="chw")
    with pytest.raises(ValueError, match=r"fastdit.patchify: x is empty"):
        fastdit.patchify(_randn(0, 2, 4, 4), 2)


def test_bad_unpatchify_inputs():
    t = _randn(1, 6, 8)
    with pytest.raises(ValueError, match=r"fastdit.unpatchify: 6 tokens do not form a square"):
        fastdit.unpatchify(t, 2)
    with pytest.raises(ValueError, match=r"fastdit.unpatchify: grid \(2, 2\) must be .* \(6\)"):
        fastdit.unpatchify(t, 2, (2, 2))
    with pytest.raises(TypeError, match=r"fastdit.unpatchify: grid must be a pair of ints"):
        fastdit.unpatchify(t, 2, (6,))
    with pytest.raises(ValueError, match=r"fastdit.unpatchify: the last dimension of tokens"):
        fastdit.unpatchify(t, 3, (2, 3))
    with pytest.raises(ValueError, match=r"fastdit.unpatchify: tokens must be 3-D"):
        fastdit.unpatchify(t[0], 2, (2, 3))
    with pytest.raises(ValueError, match=r"fastdit.unpatchify: order must be"):
        fastdit.unpatchify(t, 2, (2, 3), order="hwc")
    with pytest.raises(TypeError, match=r"fastdit.unpatchify: tokens must be float32"):
        fastdit.unpatchify(torch.ones(1, 4, 4, dtype=torch.int32), 2)


def test_bad_patch_embed_inputs():
    x, weight, bias, pos = (a.detach() for a in _embed_inputs())  # x (2, 2, 4, 6), D 3, p 2
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: weight must have shape \(D, C"):
        fastdit.patch_embed(x, _randn(3, 4, 2, 2), bias, pos)
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: weight must have shape .* square"):
        fastdit.patch_embed(x, _randn(3, 2, 1, 2), bias, pos)
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: weight must be 4-D"):
        fastdit.patch_embed(x, weight.flatten(1), bias, pos)
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: the height and width of x"):
        fastdit.patch_embed(x[:, :, :3], weight, bias, pos)
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: bias must have shape \(3,\)"):
        fastdit.patch_embed(x, weight, _randn(4), pos)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 6, 3\) \(one D-vector"):
        fastdit.patch_embed(x, weight, bias, _randn(1, 4, 3))
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: pos_embed must have shape \(6, 3"):
        fastdit.patch_embed(x, weight, bias, _randn(6, 4))
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: pos_embed must have shape \(1, 6"):
        fastdit.patch_embed(x, weight, bias, _randn(2, 6, 3))  # no per-sample positions
    with pytest.raises(TypeError, match=r"fastdit.patch_embed: pos_embed has dtype torch.float32"):
        fastdit.patch_embed(x, weight, bias, pos.float())
    with pytest.raises(TypeError, match=r"fastdit.patch_embed: weight has dtype"):
        fastdit.patch_embed(x, weight.float(), bias, pos)
    with pytest.raises(ValueError, match=r"fastdit.patch_embed: x must be 4-D"):
        fastdit.patch_embed(x[0], weight, bias, pos)


def test_bad_final_layer_inputs():
    x, shift, scale, weight, bias = (a.detach() for a in _final_inputs())  # B 2, N 3, D 4, C 2
    with pytest.raises(ValueError, match=r"fastdit.final_layer: shift must have shape \(2, 4\)"):
        fastdit.final_layer(x, shift[:1], scale, weight, bias, 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: scale must have shape \(2, 4\)"):
        fastdit.final_layer(x, shift, _randn(2, 5), weight, bias, 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: weight must have shape \(p\*p\*C"):
        fastdit.final_layer(x, shift, scale, weight[:, :3], bias, 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: weight .* multiple of .* = 4"):
        fastdit.final_layer(x, shift, scale, weight[:6], bias[:6], 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: bias must have shape \(8,\)"):
        fastdit.final_layer(x, shift, scale, weight, bias[:4], 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: 3 tokens do not form a square"):
        fastdit.final_layer(x, shift, scale, weight, bias, 2)
    with pytest.raises(ValueError, match=r"fastdit.final_layer: grid \(3, 3\) must be positive"):
        fastdit.final_layer(x, shift, scale, weight, bias, 2, (3, 3))
    for eps in (0.0, float("inf")):  # (the cuda extension rejects an infinite eps too)
        with pytest.raises(ValueError, match=r"fastdit.final_layer: eps must be positive and fi"):
            fastdit.final_layer(x, shift, scale, weight, bias, 2, (1, 3), eps=eps)
    with pytest.raises(ValueError, match=r"fastdit.final_layer: x must be 3-D"):
        fastdit.final_layer(x[0], shift, scale, weight, bias, 2, (1, 3))
    with pytest.raises(TypeError, match=r"fastdit.final_layer: bias has dtype"):
        fastdit.final_layer(x, shift, scale, weight, bias.float(), 2, (1, 3))
    with pytest.raises(ValueError, match=r"fastdit.final_layer: patch_size must be >= 1"):
        fastdit.final_layer(x, shift, scale, weight, bias, -2, (1, 3))


def test_compile_dynamic_shapes():
    # Square images of two sizes, one compiled graph: the default square grid is found from a
    # symbolic N. aot_eager: Dynamo and AOTAutograd without Inductor's slow codegen.
    def f(x):
        return fastdit.unpatchify(fastdit.patchify(x, 2, order="pqc"), 2)

    g = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for size in (6, 10):
        x = _randn(3, 2, size, size)
        assert torch.equal(g(x), x)


# ----------------------------------------------------------------------------------------------
# Kernel backends against the float64 reference (tolerance rule: tests/tolerance.py)

LOW = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ["triton", "cuda"]


def _skip_unless(backend: str) -> torch.device:
    from fastdit.backends import triton_interpreting, unavailable_reason

    if backend not in P.OPS[0].kernels:
        pytest.skip(f"no {backend} kernel registered")
    on_cpu = backend == "triton" and triton_interpreting()
    device = torch.device("cpu") if on_cpu else torch.device("cuda")
    reason = unavailable_reason(backend, device)
    if reason:
        pytest.skip(reason)
    return device


def _rand(*shape, dtype, device, scale=1.0, offset=0.0):
    return (torch.randn(*shape, dtype=f64) * scale + offset).to(device=device, dtype=dtype)


def _check_backend(op, backend, inputs, what):
    """Forward and backward of ``op`` on ``backend`` against float64, under the tolerance rule;
    outputs and gradients must have the reference's layout. Every case here is one the backend
    serves (a backend that declines one fails the test: auto would quietly fall back)."""
    from tolerance import assert_close_to_reference

    assert op.why_not(backend, inputs, backward=True) == "", f"{what}: {backend} declines"
    got = op(*inputs, backend=backend)
    assert op.last_backend == backend
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    eager, truth = op.reference(*inputs), op.reference(*as64)
    assert got.stride() == eager.stride(), f"{what}: output layout"
    assert_close_to_reference(got, eager, truth, f"{what} forward")

    grad = _rand(*got.shape, dtype=got.dtype, device=got.device)
    grads = op._bwd(grad, *inputs, backend)
    assert op.last_backward_backend == backend
    eager = op._reference_backward([grad], inputs)
    truth = op._reference_backward([grad.double()], as64)
    for i, g, e, t in zip(op.diff_index, grads, eager, truth):
        name = op.arg_names[i]
        assert g.stride() == torch.empty_like(inputs[i]).stride(), f"{what} d {name}: layout"
        assert_close_to_reference(g, e, t, f"{what} d {name}")
    return grads


LAYOUT_CASES = [  # (B, C, H, W, p)
    (1, 4, 16, 16, 2),  # DiT's latent channels, a small square grid
    (3, 8, 8, 12, 4),  # non-square
    (2, 4, 16, 8, 8),
    (1, 3, 6, 10, 2),  # K = 12: not a power of two
    (2, 5, 3, 4, 1),  # p = 1: a flatten
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("B, C, H, W, p", LAYOUT_CASES)
def test_layout_ops_backends(backend, dtype, layout, B, C, H, W, p):
    """patchify and unpatchify only move values: the kernels must be exact, both ways."""
    device = _skip_unless(backend)
    x = _rand(B, C, H, W, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grid = (H // p, W // p)
    for order in P.ORDERS:
        tokens = fastdit.patchify(x, p, order=order, backend=backend)
        assert P._patchify.last_backend == backend
        assert tokens.is_contiguous()
        assert torch.equal(tokens, P.reference_patchify(x, p, order))
        image = fastdit.unpatchify(tokens, p, grid, order=order, backend=backend)
        assert P._unpatchify.last_backend == backend
        assert image.is_contiguous() and torch.equal(image, x)
        # Backward: each op's is the other, into the input's own layout.
        (dx,) = P._patchify._bwd(tokens, x, p, order, backend)
        assert P._patchify.last_backward_backend == backend
        assert dx.stride() == torch.empty_like(x).stride() and torch.equal(dx, x)
        (dt,) = P._unpatchify._bwd(x, tokens, p, list(grid), order, backend)
        assert torch.equal(dt, tokens)


@pytest.mark.parametrize("backend", KERNELS)
def test_layout_ops_strided_backends(backend):
    device = _skip_unless(backend)
    base = _rand(2, 6, 16, 24, dtype=torch.float32, device=device)
    x = base[:, 1:5, ::2, 4:20]  # channel offset, row stride 2, column window: (2, 4, 8, 16)
    tokens = fastdit.patchify(x, 4, order="pqc", backend=backend)
    assert torch.equal(tokens, P.reference_patchify(x, 4, "pqc"))
    t = _rand(2, 24, 8, dtype=torch.float32, device=device).transpose(1, 2)  # (2, 8, 24) strided
    image = fastdit.unpatchify(t, 2, (2, 4), order="cpq", backend=backend)
    assert torch.equal(image, P.reference_unpatchify(t, 2, (2, 4), "cpq"))


EMBED_CASES = [  # (B, C, H, W, p, D)
    (2, 4, 8, 8, 2, 40),
    (1, 4, 16, 16, 2, 1152),  # DiT-XL/2's width on a small grid
    (3, 3, 12, 8, 4, 100),  # C = 3 (K = 48), D not a multiple of the block
    (2, 4, 16, 16, 8, 72),  # p = 8: K = 256 spans several K-blocks
    (1, 8, 6, 10, 2, 33),  # non-square grid, one sample
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B, C, H, W, p, D", EMBED_CASES)
def test_patch_embed_backends(backend, dtype, B, C, H, W, p, D):
    device = _skip_unless(backend)
    N = (H // p) * (W // p)
    x = _rand(B, C, H, W, dtype=dtype, device=device)
    weight = _rand(D, C, p, p, dtype=dtype, device=device, scale=(C * p * p) ** -0.5)
    bias = _rand(D, dtype=dtype, device=device, scale=0.5)
    pos = _rand(1, N, D, dtype=dtype, device=device)
    _check_backend(P._patch_embed, backend, [x, weight, bias, pos], f"{backend} {dtype}")


@pytest.mark.parametrize("backend", KERNELS)
def test_patch_embed_layouts_backends(backend):
    """Channels-last x (its gradient keeps that layout) and a 2-D, transposed pos_embed."""
    device = _skip_unless(backend)
    x = _rand(2, 4, 8, 12, dtype=torch.float32, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = _rand(24, 4, 2, 2, dtype=torch.float32, device=device)
    bias = _rand(24, dtype=torch.float32, device=device)
    pos = _rand(24, 24, dtype=torch.float32, device=device).T  # (N, D), strided
    _check_backend(P._patch_embed, backend, [x, weight, bias, pos], f"{backend} layouts")


@pytest.mark.parametrize("backend", KERNELS)
def test_patch_embed_gapped_parameters_backends(backend):
    """Weight (its output channels and patch positions swapped in memory), bias and pos_embed
    strided with nan between their elements: read where they are or copied, never the gaps."""
    device = _skip_unless(backend)
    x = _rand(2, 4, 8, 12, dtype=torch.float32, device=device)
    weight = _rand(4, 2, 2, 24, dtype=torch.float32, device=device).permute(3, 0, 1, 2)
    bias = nan_gapped(_rand(24, dtype=torch.float32, device=device))
    pos = nan_gapped(_rand(1, 24, 24, dtype=torch.float32, device=device))
    _check_backend(P._patch_embed, backend, [x, weight, bias, pos], f"{backend} gaps")


FINAL_CASES = [  # (B, h, w, p, C, D)
    (2, 4, 4, 2, 8, 40),  # learned sigma: C = 8
    (1, 8, 8, 2, 8, 1152),  # DiT-XL/2's width
    (3, 3, 5, 4, 4, 100),  # non-square grid, D not a multiple of the block
    (1, 2, 2, 8, 8, 72),  # p = 8: K = 512 spans several K-blocks
    (2, 5, 3, 1, 3, 17),  # p = 1, C = 3
]


def _final_layer_inputs(B, h, w, p, C, D, dtype, device):
    K = p * p * C
    return [
        _rand(B, h * w, D, dtype=dtype, device=device, scale=2.0, offset=0.5),
        _rand(B, D, dtype=dtype, device=device, scale=0.5),
        _rand(B, D, dtype=dtype, device=device, scale=0.5),
        _rand(K, D, dtype=dtype, device=device, scale=D**-0.5),
        _rand(K, dtype=dtype, device=device, scale=0.5),
        p,
        [h, w],
        1e-6,
    ]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B, h, w, p, C, D", FINAL_CASES)
def test_final_layer_backends(backend, dtype, B, h, w, p, C, D):
    device = _skip_unless(backend)
    inputs = _final_layer_inputs(B, h, w, p, C, D, dtype, device)
    _check_backend(P._final_layer, backend, inputs, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", KERNELS)
def test_final_layer_strided_backends(backend):
    """Tokens in rows of stride 96 and a column-major weight. Triton reads both in place; cuda
    takes the weight (copied dense) but refuses strided tokens by name, so it is checked on
    contiguous tokens with that weight."""
    device = _skip_unless(backend)
    x, shift, scale, weight, bias, *rest = _final_layer_inputs(
        2, 2, 3, 2, 4, 48, torch.float32, device
    )
    strided = torch.cat([x, x], dim=-1)[..., 48:]  # rows of stride 96
    weight = weight.T.contiguous().T  # (K, D) column-major
    inputs = [strided, shift, scale, weight, bias, *rest]
    if backend == "cuda":
        with pytest.raises(fastdit.BackendError, match="strided tokens go to the triton kernel"):
            P._final_layer(*inputs, backend="cuda")
        inputs[0] = x
    assert P._final_layer.why_not(backend, inputs, backward=True) == ""  # runs, not skipped
    _check_backend(P._final_layer, backend, inputs, "strided")


@pytest.mark.parametrize("backend", KERNELS)
def test_final_layer_gapped_parameters_backends(backend):
    """shift, scale, weight and bias strided with nan between their elements."""
    device = _skip_unless(backend)
    x, *rest = _final_layer_inputs(2, 2, 3, 2, 4, 48, torch.float32, device)
    rest[:4] = [nan_gapped(t) for t in rest[:4]]
    _check_backend(P._final_layer, backend, [x, *rest], f"{backend} gaps")


def _all_inputs(device):
    x = _rand(2, 4, 8, 12, dtype=torch.float32, device=device)
    embed = [x, _rand(20, 4, 2, 2, dtype=torch.float32, device=device),
             _rand(20, dtype=torch.float32, device=device),
             _rand(1, 24, 20, dtype=torch.float32, device=device)]  # fmt: skip
    final = _final_layer_inputs(3, 3, 5, 2, 8, 70, torch.float32, device)
    tokens = P.reference_patchify(x, 2, "pqc")
    return {
        "patchify": (P._patchify, [x, 2, "pqc"]),
        "unpatchify": (P._unpatchify, [tokens, 2, [4, 6], "cpq"]),
        "patch_embed": (P._patch_embed, embed),
        "final_layer": (P._final_layer, final),
    }


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", ["patchify", "unpatchify", "patch_embed", "final_layer"])
def test_every_element_is_written(backend, name):
    """Outputs, gradients and scratch poisoned with NaN: an element a kernel skips stays NaN."""
    device = _skip_unless(backend)
    op, inputs = _all_inputs(device)[name]
    out = op.reference(*inputs)
    grad = torch.randn_like(out)
    with nan_filled_empty():
        got = op(*inputs, backend=backend)
        assert op.last_backend == backend
        assert torch.isfinite(got).all(), "forward left elements unwritten"
        for i, g in zip(op.diff_index, op._bwd(grad, *inputs, backend)):
            assert torch.isfinite(g).all(), f"backward left d {op.arg_names[i]} partly unwritten"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", ["patch_embed", "final_layer"])
def test_backward_is_deterministic(backend, name):
    """The sums over tokens and samples go in a fixed order: bitwise-equal reruns."""
    device = _skip_unless(backend)
    op, inputs = _all_inputs(device)[name]
    grad = torch.randn_like(op.reference(*inputs))
    first, second = op._bwd(grad, *inputs, backend), op._bwd(grad, *inputs, backend)
    for i, a, b in zip(op.diff_index, first, second):
        assert torch.equal(a, b), f"d {op.arg_names[i]} differs between two runs"


def test_auto_takes_a_kernel_and_float64_goes_to_torch():

    device = kernel_device()
    x = _randn(1, 4, 4, 4).to(device)
    fastdit.patchify(x, 2)
    assert P._patchify.last_backend == "torch"  # no kernel takes float64
    kernels = kernel_backends(device)
    if kernels:
        fastdit.patchify(x.float(), 2)
        assert P._patchify.last_backend == kernels[0]
        with pytest.raises(fastdit.BackendError, match="patchify: backend 'triton' cannot serve"):
            fastdit.patchify(x, 2, backend="triton")


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_kernels(backend):
    """opcheck on the kernels: schema, fake, autograd registration, the backward op."""
    device = _skip_unless(backend)
    for name, (_, inputs) in _all_inputs(device).items():
        args = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
        _opcheck(name, (*args, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_through_dit_ends(backend):
    """torch.compile(fullgraph=True) of DiT's embedding and final layer on the kernels, forward
    and backward, against the reference run eagerly."""
    device = _skip_unless(backend)
    from fastdit.nn import FinalLayer, PatchEmbed

    embed = PatchEmbed(8, 2, 4, 32, backend=backend).to(device)
    final = FinalLayer(32, 2, 8, backend=backend).to(device)
    with torch.no_grad():
        for p in final.parameters():
            p.normal_(0, 0.3)  # not zero-initialised: every gradient must matter
    x, c = torch.randn(2, 4, 8, 8, device=device), torch.randn(2, 32, device=device)
    pos = torch.randn(1, 16, 32, device=device)

    def step(x, c):
        return final(embed(x, pos), c, (4, 4))

    def run(fn):
        xs = x.clone().requires_grad_()
        out = fn(xs, c)
        (out * torch.linspace(-1, 1, 8, device=device)[:, None, None]).sum().backward()
        params = [*embed.parameters(), *final.parameters()]
        grads = [p.grad.clone() for p in params if p.grad is not None] + [xs.grad]
        embed.zero_grad(set_to_none=True)
        final.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert P._final_layer.last_backend == backend == P._patch_embed.last_backward_backend
    embed.backend = final.backend = "torch"
    ref_out, ref_grads = run(step)
    assert P._final_layer.last_backend == "torch"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
