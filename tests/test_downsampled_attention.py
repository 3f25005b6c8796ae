"""The downsampled_attention family: hand-derived cases, float64 formulations written here, and
the whole layer against an independent transcription of the released U-DiT code."""

from __future__ import annotations

import importlib
import math

import emulated
import pytest
import torch
from layouts import nan_filled_empty, nan_gapped
from tolerance import assert_close_to_reference
from udit_attention_reference import (
    random_attention_params,
    released_attention_forward,
    released_freqs_cis,
)

import fastdit
from fastdit.backends import BackendError

# the module: ``fastdit.ops.downsampled_attention`` is also the name of the layer function
da = importlib.import_module("fastdit.ops.downsampled_attention")

F64 = torch.float64
PARAM_NAMES = (
    "dw_weight",
    "dw_bias",
    "qkv_weight",
    "qkv_bias",
    "logit_scale",
    "out_weight",
    "out_bias",
)
SWITCHES = [
    dict(rope=r, cosine=c, shortcut=s) for r in (True, False) for c in (True, False)
    for s in (True, False)
]  # fmt: skip


def _params(d, heads, dtype=F64, ksize=5):
    p = random_attention_params(d, heads, ksize=ksize, dtype=dtype)
    return [p[name] for name in PARAM_NAMES]


# ---------------------------------------------------------------------------------------------
# polyphase_split / polyphase_merge


def test_split_hand_derived():
    x = torch.arange(32, dtype=F64).reshape(1, 2, 4, 4)  # x[0, c, r, k] = 16c + 4r + k
    t = da.polyphase_split(x)
    assert t.shape == (1, 4, 4, 2) and t.is_contiguous()
    # group 2a + b holds pixels (2i + a, 2j + b), tokens row-major over (i, j)
    expected_c0 = [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
    expected = torch.tensor(expected_c0, dtype=F64)
    torch.testing.assert_close(t[0, :, :, 0], expected, rtol=0, atol=0)
    torch.testing.assert_close(t[0, :, :, 1], expected + 16, rtol=0, atol=0)
    # non-square: x = [[0, 1, 2, 3], [4, 5, 6, 7]], group grid 1 x 2
    t = da.polyphase_split(torch.arange(8, dtype=F64).reshape(1, 1, 2, 4))
    torch.testing.assert_close(
        t[0, :, :, 0], torch.tensor([[0, 2], [1, 3], [4, 6], [5, 7]], dtype=F64), rtol=0, atol=0
    )


def test_merge_hand_derived():
    t = torch.tensor([[0, 2], [1, 3], [4, 6], [5, 7]], dtype=F64)[None, :, :, None]
    out = da.polyphase_merge(t, (1, 2))
    torch.testing.assert_close(out, torch.arange(8, dtype=F64).reshape(1, 1, 2, 4), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 2, 6), (3, 16, 10, 8), (1, 1, 2, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_merge_inverts_split(shape, layout):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1] * 2, shape[2], shape[3] + 3)[:, ::2, :, 1:-2]
    B, d, H, W = x.shape
    t = da.polyphase_split(x)
    assert t.shape == (B, 4, H * W // 4, d) and t.is_contiguous()
    assert t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    for channels_last in (False, True):
        back = da.polyphase_merge(t, (H // 2, W // 2), channels_last=channels_last)
        assert torch.equal(back, x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert back.is_contiguous(memory_format=fmt)
    # and split(merge(t)) == t
    assert torch.equal(da.polyphase_split(da.polyphase_merge(t, (H // 2, W // 2))), t)


def test_merge_default_grid_is_square():
    t = torch.randn(2, 4, 9, 3)
    assert da.polyphase_merge(t).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="do not form a square grid"):
        da.polyphase_merge(torch.randn(2, 4, 6, 3))


# ---------------------------------------------------------------------------------------------
# rope2d


def _rope_complex(x: torch.Tensor, grid) -> torch.Tensor:
    """RoPE2D as complex products in float64: pair 2j by column * f_j, pair 2j+1 by row * f_j."""
    gh, gw = grid
    h = x.shape[-1]
    f = torch.tensor([10000.0 ** (-4.0 * j / h) for j in range(h // 4)], dtype=F64)
    rows = torch.arange(gh * gw, dtype=F64) // gw
    cols = torch.arange(gh * gw, dtype=F64) % gw
    theta = torch.empty(gh * gw, h // 2, dtype=F64)
    theta[:, 0::2] = cols[:, None] * f
    theta[:, 1::2] = rows[:, None] * f
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], h // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)).flatten(-2)


def test_rope2d_hand_derived():
    # h = 4: one frequency f_0 = 1; token (r, c) turns (x0, x1) by c and (x2, x3) by r.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64).expand(4, 4)  # 2x2 grid
    out = da.rope2d(x, (2, 2))
    cos, sin = math.cos(1.0), math.sin(1.0)
    expected = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0],  # (0, 0)
            [cos - 2 * sin, sin + 2 * cos, 3.0, 4.0],  # (0, 1)
            [1.0, 2.0, 3 * cos - 4 * sin, 3 * sin + 4 * cos],  # (1, 0)
            [cos - 2 * sin, sin + 2 * cos, 3 * cos - 4 * sin, 3 * sin + 4 * cos],  # (1, 1)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    # h = 8 adds f_1 = 10000^(-1/2) = 0.01; token (0, 1) of a 1x2 grid: pair 0 by 1, pair 2 by 0.01
    x = torch.zeros(2, 8, dtype=F64)
    x[:, 0::2] = 1.0
    out = da.rope2d(x, (1, 2))
    expected = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
            [cos, sin, 1.0, 0.0, math.cos(0.01), math.sin(0.01), 1.0, 0.0],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("head_dim", [4, 24, 48, 96])
@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (8, 8), (16, 16), (3, 5)])
def test_rope2d_matches_complex_float64(head_dim, grid):
    x = torch.randn(2, 3, grid[0] * grid[1], head_dim, dtype=F64)
    out = da.rope2d(x, grid)
    torch.testing.assert_close(out, _rope_complex(x, grid), rtol=0, atol=1e-13)
    if grid[0] == grid[1]:  # the released table (row length int(sqrt(n))) agrees on squares
        cis = released_freqs_cis(head_dim, x.shape[-2], F64)
        z = torch.view_as_complex(x.reshape(2, 3, -1, head_dim // 2, 2).contiguous())
        torch.testing.assert_close(out, torch.view_as_real(z * cis).flatten(-2), rtol=0, atol=1e-13)
    # pair norms are preserved
    norms = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(out.unflatten(-1, (-1, 2)).norm(dim=-1), norms)


def test_rope2d_float32_is_the_released_computation():
    x = torch.randn(2, 256, 48)
    cis = released_freqs_cis(48, 256)  # complex64, as the released code
    released = torch.view_as_real(torch.view_as_complex(x.reshape(2, 256, 24, 2)) * cis)
    torch.testing.assert_close(da.rope2d(x, (16, 16)), released.flatten(-2), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope2d_low_precision(dtype):
    x = torch.randn(2, 2, 64, 24).to(dtype)
    out = da.rope2d(x, (8, 8))
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, da.rope2d(x.float(), (8, 8)).to(dtype), rtol=0, atol=0)


def test_rope2d_strided_input():
    x = torch.randn(2, 24, 16, dtype=F64).transpose(1, 2)  # (2, 16, 24), strided
    torch.testing.assert_close(da.rope2d(x, (4, 4)), da.rope2d(x.contiguous(), (4, 4)))


# ---------------------------------------------------------------------------------------------
# attention_in_groups


def _attention_f64(q, k, v, logit_scale, cosine):
    """Straight from the formula, one (group, head) at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    G, heads, n, hd = q.shape
    for g in range(G):
        for h in range(heads):
            a, b = q[g, h], k[g, h]
            if cosine:
                a = a / a.norm(dim=-1, keepdim=True)
                b = b / b.norm(dim=-1, keepdim=True)
                s = math.exp(min(float(logit_scale[h]), 4.6052))
            else:
                s = 1.0 / math.sqrt(hd)
            logits = a @ b.T * s
            w = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            out[g, h] = (w / w.sum(dim=-1, keepdim=True)) @ v[g, h]
    return out


def _qkv(G, heads, n, hd, dtype=F64):
    return [torch.randn(G, heads, n, hd, dtype=F64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("shape", [(8, 2, 16, 24), (4, 1, 4, 48), (4, 3, 64, 96), (1, 1, 1, 8)])
def test_attention_matches_float64(cosine, shape):
    q, k, v = _qkv(*shape)
    logit_scale = torch.tensor([2.3, 5.0, 0.5], dtype=F64)[: shape[1], None, None]
    out = da.attention_in_groups(q, k, v, logit_scale, cosine=cosine)
    expected = _attention_f64(q, k, v, logit_scale.flatten(), cosine)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_attention_five_d_layout_and_none_scale():
    q, k, v = _qkv(8, 2, 9, 8)
    scale = torch.full((2, 1, 1), 1.0, dtype=F64)
    flat = da.attention_in_groups(q, k, v, scale)
    split = da.attention_in_groups(*(t.reshape(2, 4, 2, 9, 8) for t in (q, k, v)), scale)
    torch.testing.assert_close(split.reshape(8, 2, 9, 8), flat, rtol=0, atol=0)
    plain = da.attention_in_groups(q, k, v, None, cosine=False)
    torch.testing.assert_close(plain, _attention_f64(q, k, v, None, False), rtol=0, atol=1e-13)
    # strided heads, as they come out of the qkv projection: (G, n, heads, hd) transposed
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    torch.testing.assert_close(da.attention_in_groups(qs, ks, vs, scale), flat, rtol=0, atol=1e-14)


def test_released_table_assumes_a_square_grid():
    """fastdit's rope2d follows the grid; the released table takes int(sqrt(n)) as the row
    length, which only agrees on square grids (every released model runs square grids)."""
    x = torch.randn(24, 8, dtype=F64)
    cis = released_freqs_cis(8, 24, F64)  # 4 x 6 grid: the released table lays it out 6 x 4
    z = torch.view_as_complex(x.reshape(24, 4, 2).contiguous())
    released = torch.view_as_real(z * cis).flatten(-2)
    assert not torch.allclose(da.rope2d(x, (4, 6)), released)
    torch.testing.assert_close(da.rope2d(x, (4, 6)), _rope_complex(x, (4, 6)), rtol=0, atol=1e-13)


def test_groups_do_not_mix():
    q, k, v = _qkv(8, 2, 16, 24)
    scale = torch.full((2, 1, 1), math.log(10.0), dtype=F64)
    out = da.attention_in_groups(q, k, v, scale)
    k2, v2 = k.clone(), v.clone()
    k2[3] += torch.randn_like(k2[3])
    v2[3] += torch.randn_like(v2[3])
    out2 = da.attention_in_groups(q, k2, v2, scale)
    others = [g for g in range(8) if g != 3]
    assert torch.equal(out[others], out2[others])
    assert not torch.allclose(out[3], out2[3])


def test_logit_scale_is_clamped():
    q, k, v = _qkv(2, 3, 16, 8)
    at_max = torch.full((3, 1, 1), 4.6052, dtype=F64)
    above = torch.tensor([4.6052, 7.0, 50.0], dtype=F64)[:, None, None]
    ref = da.attention_in_groups(q, k, v, at_max)
    assert torch.equal(da.attention_in_groups(q, k, v, above), ref)
    # the released literal 4.6052 sits just above ln 100, which is therefore not clamped
    ln100 = torch.full((3, 1, 1), math.log(100.0), dtype=F64)
    assert not torch.equal(da.attention_in_groups(q, k, v, ln100), ref)
    # and the clamp's gradient is zero above the limit
    above.requires_grad_()
    da.attention_in_groups(q, k, v, above).sum().backward()
    assert torch.equal(above.grad[1:], torch.zeros(2, 1, 1, dtype=F64))


def test_attention_is_float32_inside_for_half_inputs():
    q, k, v = _qkv(4, 2, 64, 24, torch.bfloat16)
    scale = torch.full((2, 1, 1), 3.0, dtype=torch.bfloat16)
    # The reference's property (kernels are held to the tolerance rule below instead).
    out = da.attention_in_groups(q, k, v, scale, backend="torch")
    assert out.dtype == torch.bfloat16
    expected = da.attention_in_groups(
        q.float(), k.float(), v.float(), scale.float(), backend="torch"
    )
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The whole layer against the released code's computation


@pytest.mark.parametrize("head_dim", [24, 48, 96])
@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_layer_matches_released_float64(head_dim, side):
    heads = 2
    d = heads * head_dim
    x = torch.randn(1 + (side < 8), d, 2 * side, 2 * side, dtype=F64)
    params = _params(d, heads)
    out = da.downsampled_attention(x, *params, heads)
    expected = released_attention_forward(x, *params, heads)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: "-".join(k for k in s if s[k]) or "none"
)
def test_layer_ablation_switches(switches):
    x = torch.randn(2, 16, 8, 12, dtype=F64)  # group grid 4 x 6: not square
    params = _params(16, 2)
    out = da.downsampled_attention(x, *params, 2, **switches)
    expected = (
        released_attention_forward(x, *params, 2, **switches)
        if not switches["rope"]
        else _layer_by_parts(x, params, 2, **switches)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    if switches["rope"]:  # square grids: the released code itself
        x = x[..., :8]
        torch.testing.assert_close(
            da.downsampled_attention(x, *params, 2, **switches),
            released_attention_forward(x, *params, 2, **switches),
            rtol=0,
            atol=1e-12,
        )


def _layer_by_parts(x, params, heads, rope, cosine, shortcut):
    """The layer composed from the public parts (a non-square grid, which the released table
    would get wrong: it takes int(sqrt(n)) as the row length)."""
    dw_w, dw_b, qkv_w, qkv_b, scale, out_w, out_b = params
    B, d, H, W = x.shape
    grid = (H // 2, W // 2)
    y = torch.nn.functional.conv2d(x, dw_w, dw_b, padding=2, groups=d) + (x if shortcut else 0)
    t = da.polyphase_split(y) @ qkv_w.T + qkv_b
    q, k, v = (u.reshape(B, 4, -1, heads, d // heads).transpose(2, 3) for u in t.chunk(3, -1))
    if rope:
        q, k = da.rope2d(q, grid), da.rope2d(k, grid)
    o = da.attention_in_groups(q, k, v, scale, cosine=cosine).transpose(2, 3).flatten(-2)
    return torch.nn.functional.conv2d(da.polyphase_merge(o, grid), out_w, out_b)


def test_layer_float32_matches_released_float32():
    """fp32 against the released computation in fp32, and both against float64."""
    x = torch.randn(2, 96, 32, 32)
    params = _params(96, 4, torch.float32)
    out = da.downsampled_attention(x, *params, 4)
    released = released_attention_forward(x, *params, 4)
    truth = released_attention_forward(x.double(), *(p.double() for p in params), 4)
    scale = truth.abs().max()
    assert out.dtype == torch.float32
    assert (out - released).abs().max() / scale < 1e-5
    assert (out.double() - truth).abs().max() / scale < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_low_precision(dtype):
    """In half precision, at most twice as far from float64 as the released code in that dtype."""
    x = torch.randn(1, 48, 8, 8)
    params = _params(48, 2, torch.float32)
    low = [x.to(dtype), *(p.to(dtype) for p in params)]
    out = da.downsampled_attention(*low, 2)
    assert out.dtype == dtype and out.shape == x.shape
    truth = released_attention_forward(x.double(), *(p.double() for p in params), 2)
    assert_close_to_reference(out, released_attention_forward(*low, 2), truth, str(dtype))


def test_layer_channels_last_and_strided():
    x = torch.randn(2, 16, 8, 8, dtype=F64)
    params = _params(16, 4)
    expected = da.downsampled_attention(x, *params, 4)
    assert expected.is_contiguous()
    cl = da.downsampled_attention(x.contiguous(memory_format=torch.channels_last), *params, 4)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(cl, expected, rtol=0, atol=1e-13)
    strided = torch.randn(2, 16, 8, 11, dtype=F64)[..., 1:9]
    torch.testing.assert_close(
        da.downsampled_attention(strided, *params, 4),
        da.downsampled_attention(strided.contiguous(), *params, 4),
        rtol=0,
        atol=1e-13,
    )


def test_layer_other_kernel_size():
    x = torch.randn(1, 8, 6, 6, dtype=F64)
    params = _params(8, 2, ksize=3)
    torch.testing.assert_close(
        da.downsampled_attention(x, *params, 2),
        released_attention_forward(x, *params, 2),
        rtol=0,
        atol=1e-13,
    )


def test_layer_cosine_off_takes_no_logit_scale():
    x = torch.randn(1, 8, 4, 4, dtype=F64)
    params = _params(8, 2)
    with_scale = da.downsampled_attention(x, *params, 2, cosine=False)
    params[4] = None
    torch.testing.assert_close(
        da.downsampled_attention(x, *params, 2, cosine=False), with_scale, rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------
# Autograd, opcheck, compile


def test_gradcheck_layer_float64():
    x = torch.randn(1, 8, 8, 8, dtype=F64, requires_grad=True)  # 4 x 4 group grid
    params = [p.requires_grad_() for p in _params(8, 2)]
    assert torch.autograd.gradcheck(lambda x, *p: da.downsampled_attention(x, *p, 2), (x, *params))
    # every input really gets a gradient, equal to the released computation's
    out = da.downsampled_attention(x, *params, 2)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), (x, *params))
    ref = released_attention_forward(x, *params, 2)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (x, *params))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_gradcheck_parts_float64():
    x = torch.randn(1, 3, 4, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(da.polyphase_split, (x,))
    t = torch.randn(1, 4, 6, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: da.polyphase_merge(t, (2, 3)), (t,))
    r = torch.randn(2, 6, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: da.rope2d(r, (2, 3)), (r,))
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 5, 4))
    scale = torch.tensor([1.0, 3.0], dtype=F64)[:, None, None].requires_grad_()
    for cosine in (True, False):
        assert torch.autograd.gradcheck(
            lambda *a, cosine=cosine: da.attention_in_groups(*a, cosine=cosine), (q, k, v, scale)
        )


def test_opcheck():
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdit.polyphase_split, (x, "torch"))
    t = torch.randn(1, 4, 6, 3, requires_grad=True)
    for channels_last in (False, True):
        torch.library.opcheck(torch.ops.fastdit.polyphase_merge, (t, [2, 3], channels_last, "auto"))
    r = torch.randn(2, 6, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.fastdit.rope2d, (r, [3, 2], "torch"))
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 4, 4, torch.float32))
    scale = torch.ones(2, 1, 1, requires_grad=True)
    for cosine in (True, False):
        torch.library.opcheck(
            torch.ops.fastdit.attention_in_groups, (q, k, v, scale, cosine, "auto")
        )
    params = [p.requires_grad_() for p in _params(8, 2, torch.float32)]
    table = importlib.import_module("fastdit.ops.downsampled_attention").rope_table(4, (2, 2))
    for layout, rope_table in ((torch.contiguous_format, None), (torch.channels_last, table)):
        x = torch.randn(1, 8, 4, 4).contiguous(memory_format=layout).requires_grad_()
        torch.library.opcheck(
            torch.ops.fastdit.downsampled_attention,
            (x, *params, 2, True, True, True, rope_table, "auto"),
        )


def test_compile_fullgraph():
    x = torch.randn(2, 16, 8, 8)
    params = _params(16, 2, torch.float32)

    def layer(x, *params):
        y = da.downsampled_attention(x, *params, 2)
        t = da.polyphase_split(y)
        q = da.rope2d(t, (4, 4))
        o = da.attention_in_groups(q[:, :, None], t[:, :, None], t[:, :, None], params[4][:1])
        return da.polyphase_merge(o[:, :, 0], (4, 4)) + y

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, *params), layer(x, *params))


# ---------------------------------------------------------------------------------------------
# Bad input and backends


def _layer_args(d=8, heads=2, H=4, W=4):
    return [torch.randn(1, d, H, W), *_params(d, heads, torch.float32), heads]


@pytest.mark.parametrize(
    "edit, kwargs, error, match",
    [
        (lambda a: a.__setitem__(0, torch.randn(1, 8, 5, 4)), {}, ValueError, "must be even"),
        (lambda a: a.__setitem__(0, torch.randn(1, 8, 4, 4, 1)), {}, ValueError, "x must be 4-D"),
        (lambda a: a.__setitem__(8, 3), {}, ValueError, r"num_heads \(3\) must divide"),
        (lambda a: a.__setitem__(8, 0), {}, ValueError, "num_heads must be >= 1"),
        (lambda a: a.__setitem__(8, 2.0), {}, TypeError, "num_heads must be an int"),
        (lambda a: a.__setitem__(8, 4), {}, ValueError, "head dim divisible by 4"),
        (
            lambda a: a.__setitem__(3, torch.randn(8, 24)),
            {},
            ValueError,
            r"qkv_weight must have shape \(24, 8\)",
        ),
        (
            lambda a: a.__setitem__(6, torch.randn(8, 8)),
            {},
            ValueError,
            r"out_weight must have shape \(8, 8, 1, 1\)",
        ),
        (
            lambda a: a.__setitem__(1, torch.randn(8, 1, 4, 4)),
            {},
            ValueError,
            r"dw_weight must have shape \(d, 1, k, k\)",
        ),
        (lambda a: a.__setitem__(2, torch.randn(9)), {}, ValueError, "dw_bias must have shape"),
        (
            lambda a: a.__setitem__(5, torch.randn(2)),
            {},
            ValueError,
            "logit_scale must be 3-D",
        ),
        (
            lambda a: a.__setitem__(5, torch.randn(1, 1, 1)),
            {},
            ValueError,
            r"logit_scale must have shape \(2, 1, 1\)",
        ),
        (lambda a: a.__setitem__(5, None), {}, ValueError, "logit_scale .* is required"),
        (lambda a: a.__setitem__(4, torch.randn(24).double()), {}, TypeError, "qkv_bias has dtype"),
        (
            lambda a: a.__setitem__(0, torch.ones(1, 8, 4, 4, dtype=torch.int64)),
            {},
            TypeError,
            "x must be float",
        ),
        (lambda a: None, {"rope": 1}, TypeError, "rope must be a bool"),
    ],
)
def test_layer_bad_input(edit, kwargs, error, match):
    args = _layer_args()
    edit(args)
    with pytest.raises(error, match=f"fastdit.downsampled_attention: .*{match}"):
        da.downsampled_attention(*args, **kwargs)


def test_rope_off_allows_any_head_dim():
    x = torch.randn(1, 6, 4, 4, dtype=F64)
    params = _params(6, 2)  # head dim 3
    out = da.downsampled_attention(x, *params, 2, rope=False)
    torch.testing.assert_close(
        out, released_attention_forward(x, *params, 2, rope=False), rtol=0, atol=1e-13
    )


def test_parts_bad_input():
    with pytest.raises(ValueError, match="polyphase_split: the height and width .* even"):
        da.polyphase_split(torch.randn(1, 2, 4, 3))
    with pytest.raises(ValueError, match="polyphase_split: x is empty"):
        da.polyphase_split(torch.randn(0, 2, 4, 4))
    with pytest.raises(ValueError, match=r"polyphase_merge: t must be \(B, 4, n, d\)"):
        da.polyphase_merge(torch.randn(1, 3, 4, 2))
    with pytest.raises(ValueError, match=r"polyphase_merge: grid \(2, 3\) must be positive"):
        da.polyphase_merge(torch.randn(1, 4, 4, 2), (2, 3))
    with pytest.raises(TypeError, match="polyphase_merge: grid must be a pair of ints"):
        da.polyphase_merge(torch.randn(1, 4, 4, 2), (2.0, 2))
    with pytest.raises(ValueError, match="rope2d: RoPE2D needs a head dim divisible by 4"):
        da.rope2d(torch.randn(4, 6), (2, 2))
    with pytest.raises(ValueError, match=r"rope2d: grid \(3, 3\) must be positive"):
        da.rope2d(torch.randn(4, 8), (3, 3))
    with pytest.raises(ValueError, match=r"rope2d: x must be \(..., n, h\)"):
        da.rope2d(torch.randn(8), (1, 1))
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match=r"attention_in_groups: k must have shape \(2, 2, 4, 8\)"):
        da.attention_in_groups(q, q[:, :, :3], q, torch.ones(2, 1, 1))
    with pytest.raises(TypeError, match="attention_in_groups: v has dtype torch.float64"):
        da.attention_in_groups(q, q, q.double(), torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="attention_in_groups: q must be 4-D or 5-D"):
        da.attention_in_groups(q[0], q[0], q[0], torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match=r"attention_in_groups: logit_scale must have shape"):
        da.attention_in_groups(q, q, q, torch.ones(3, 1, 1))


def test_backends():
    for name in ("polyphase_split", "polyphase_merge", "rope2d", "attention_in_groups"):
        assert getattr(fastdit, name) is getattr(da, name)
    assert fastdit.downsampled_attention is da.downsampled_attention
    x = torch.randn(1, 2, 4, 4)
    da.polyphase_split(x)
    assert da._split.last_backend == "torch"  # no kernel: auto takes the reference
    with pytest.raises(BackendError, match="polyphase_split: backend 'triton' cannot serve"):
        da.polyphase_split(x, backend="triton")
    args = [t.double() if isinstance(t, torch.Tensor) else t for t in _layer_args()]
    da.downsampled_attention(*args)
    assert da._layer.last_backend == "torch"  # float64: the reference
    with pytest.raises(BackendError, match="downsampled_attention: backend 'triton' cannot"):
        da.downsampled_attention(*args, backend="triton")


def test_triton_refuses_grids_a_gpu_cannot_launch():
    """The Triton attention grid is ((group, head) problems, row blocks of 16 or more): past
    2^31 problems or 65535 blocks (about a million tokens a group) a launch would fail on a GPU,
    so supports() says no and auto takes the next backend. Expanded tensors: no memory."""
    tri = pytest.importorskip("fastdit.triton.downsampled_attention")
    ls = torch.ones(1, 1, 1)
    one = torch.randn(1, 1, 1, 16)
    q = one.expand(65536, 32768, 1, 16)  # 2^31 problems
    assert "fewer than 2^31" in tri.supports_attention(q, q, q, ls.expand(32768, 1, 1), True)
    q = one.expand(1, 1, 65535 * 16 + 1, 16)
    assert "got 1 and 1048561" in tri.supports_attention(q, q, q, ls, True)
    q = one.expand(1, 1, 65535 * 16, 16)
    assert tri.supports_attention(q, q, q, ls, True) == ""
    x = torch.randn(1, 32, 1, 1).expand(1, 32, 2048, 2050)  # 1049600 tokens a group
    dw = torch.randn(32, 1, 5, 5)
    args = (dw, None, None, None, ls, None, None, 2, True, True, True, None)
    assert "got 8 and 1049600" in tri.supports_layer(x, *args)
    assert tri.supports_layer(x[:, :, :2040], *args) == ""
    # The depthwise conv: 2048 programs a sample at d = 1024, 64 x 64 (64 tokens x 32 channels
    # each), so 2^31 at 2^20 samples.
    x = torch.randn(1, 1024, 1, 1).expand(2**20, 1024, 64, 64)
    dw = torch.randn(1024, 1, 5, 5)
    args = (dw, None, None, None, ls.expand(16, 1, 1), None, None, 16, True, True, True, None)
    assert "fewer than 2^31 programs, got 2147483648" in tri.supports_layer(x, *args)
    assert tri.supports_layer(x[1:], *args) == ""


def test_triton_dwconv_grids_launch_past_65535_samples(monkeypatch):
    """The depthwise-conv kernels run on one flat grid axis (see _program_3d): a (tokens,
    channels, samples) grid would not launch past 65535 samples. The launches are recorded, not
    run (the interpreter would take minutes); the tests above check the flat grid's indexing."""
    tri = pytest.importorskip("fastdit.triton.downsampled_attention")
    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.append((self.name, tuple(grid)))
            return lambda *args, **kwargs: None

    for name in ("_dwconv_split_kernel", "_dwconv_split_dx_kernel", "_dwconv_split_dw_kernel"):
        monkeypatch.setattr(tri, name, Recorder(name))
    B, d = 70000, 16
    x = torch.randn(1, d, 4, 4).expand(B, d, 4, 4)
    w = torch.randn(d, 1, 5, 5)
    t = tri._dwconv_split(x, w, torch.zeros(d), True)
    tri._dwconv_split_backward(x, w, t, True)
    assert [name for name, _ in grids] == [
        "_dwconv_split_kernel", "_dwconv_split_dx_kernel", "_dwconv_split_dw_kernel"
    ]  # fmt: skip
    for name, grid in grids:
        limits = (tri.MAX_GRID_X, tri.MAX_GRID_Y, tri.MAX_GRID_Y)
        assert all(0 < g <= lim for g, lim in zip(grid, limits)), (name, grid)


def test_layer_takes_a_cached_rope_table():
    ops = importlib.import_module("fastdit.ops.downsampled_attention")
    x = torch.randn(2, 16, 6, 4, dtype=torch.float64)
    params = random_attention_params(16, 2)
    args = [params[k] for k in ("dw_weight", "dw_bias", "qkv_weight", "qkv_bias", "logit_scale",
                                "out_weight", "out_bias")]  # fmt: skip
    table = ops.rope_table(8, (3, 2), torch.float64)
    assert table.shape == (2, 6, 4)
    expected = fastdit.downsampled_attention(x, *args, 2)
    got = fastdit.downsampled_attention(x, *args, 2, rope_table=table)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rope_table must have shape \(2, 6, 4\)"):
        fastdit.downsampled_attention(x, *args, 2, rope_table=table[:, :4])
    with pytest.raises(TypeError, match="rope_table must be a torch.float64 tensor"):
        fastdit.downsampled_attention(x, *args, 2, rope_table=table.float())


# ---------------------------------------------------------------------------------------------
# Kernel backends against the float64 reference (tolerance rule: tests/tolerance.py)

LOW = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ["triton", "cuda"]


def _skip_unless(op, backend: str, monkeypatch) -> torch.device:
    """The device the backend's kernels run on here: the GPU; the CPU for Triton under the
    interpreter; the CPU for cuda without a GPU, through csrc/ built against the CUDA emulator
    (tests/emulated.py) standing in for fastdit._C, with the dispatch told that cuda can serve."""
    from fastdit import _ext
    from fastdit.backends import triton_interpreting, unavailable_reason

    if backend not in op.kernels:
        pytest.skip(f"no {backend} kernel for {op.name}")
    if backend == "cuda" and not torch.cuda.is_available():
        emu = emulated.build("downsampled_attention")
        backends = importlib.import_module("fastdit.backends")  # fastdit.backends: a function
        monkeypatch.setattr(_ext, "load", lambda: (emu, ""))
        monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
        monkeypatch.setattr(
            backends,
            "unavailable_reason",
            lambda name, device=None: "" if name == "cuda" else unavailable_reason(name, device),
        )
        return torch.device("cpu")
    on_cpu = backend == "triton" and triton_interpreting()
    device = torch.device("cpu") if on_cpu else torch.device("cuda")
    reason = unavailable_reason(backend, device)
    if reason:
        pytest.skip(reason)
    return device


def _check_backend(op, backend, inputs, what):
    """Forward and backward of ``op`` on ``backend`` against float64 under the tolerance rule,
    outputs and gradients in the reference's layout; returns the gradients."""
    got = op(*inputs, backend=backend)
    assert op.last_backend == backend
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    eager, truth = op.reference(*inputs), op.reference(*as64)
    assert got.stride() == eager.stride(), f"{what}: output layout"
    assert_close_to_reference(got, eager, truth, f"{what} forward")
    grad = torch.randn(got.shape, dtype=F64).to(got.dtype).to(got.device)
    grads = op._bwd(grad, *inputs, backend)
    assert op.last_backward_backend == backend
    eager = op._reference_backward([grad], inputs)
    truth = op._reference_backward([grad.double()], as64)
    for i, g, e, t in zip(op.diff_index, grads, eager, truth):
        name = op.arg_names[i]
        assert g.stride() == torch.empty_like(inputs[i]).stride(), f"{what} d {name}: layout"
        # d logit_scale (heads, 1, 1): per head, a sum over every group, token and channel.
        summed = got.numel() // inputs[i].numel() if name == "logit_scale" else 0
        assert_close_to_reference(g, e, t, f"{what} d {name}", summed_terms=summed)
    return grads


def _logit_scale_for(heads, dtype, device, clamp_one=True):
    """ln 10 (U-DiT's initial value) spread like trained values; with clamp_one, head 0 above
    the clamp (logits scaled by 100). In float32 the clamped head is left out: there eager's
    own error at logits of magnitude 100 varies by 4x from one draw to the next, so the rule
    would judge luck (the kernel's float32 error at scale 100 was measured equal to a float32
    re-implementation of the same formulas in torch)."""
    ls = torch.randn(heads, 1, 1, dtype=F64) * 0.3 + math.log(10)
    if clamp_one and dtype != torch.float32:
        ls[0] = 5.0
    return ls.to(dtype).to(device)


ATTENTION_CASES = [  # (G, heads, n, hd)
    (2, 3, 20, 24),  # U-DiT-S's head dim, a group that is not a multiple of the block
    (1, 2, 70, 48),  # U-DiT-B's; keys span two blocks
    (2, 1, 16, 96),  # U-DiT-L's
    (3, 2, 1, 8),  # one token per group
    (2, 1, 70, 10),  # a head dim no 16-byte vector divides (the cuda tiles' element-wise reads)
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("G, heads, n, hd", ATTENTION_CASES)
def test_attention_backends(backend, dtype, cosine, G, heads, n, hd, monkeypatch):
    device = _skip_unless(da._attention, backend, monkeypatch)
    q, k, v = (t.to(dtype).to(device) for t in _qkv(G, heads, n, hd))
    ls = _logit_scale_for(heads, dtype, device)
    grads = _check_backend(da._attention, backend, [q, k, v, ls, cosine], f"{backend} {dtype}")
    if cosine and dtype != torch.float32:
        assert grads[3][0].item() == 0, "the clamped head's logit_scale must get no gradient"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_rows_of_zeros(backend, dtype, monkeypatch):
    """A q row and a k row of zeros: normalize's clamp max(||u||, eps) holds there, so q^ is 0
    and d q is d q^ * scale / eps (~1e13); the rows beside them (the cuda prologue and epilogue
    take two rows a warp at this head dim) must not be touched by it. Zero rows and the others
    are checked apart, each under the tolerance rule."""
    device = _skip_unless(da._attention, backend, monkeypatch)
    G, heads, n, hd = 2, 2, 20, 24
    q, k, v = _qkv(G, heads, n, hd)
    q[0, 1, 4] = 0  # rows 4 and 5 share a warp in the cuda prologue
    k[1, 1, 7] = 0  # head 1: ~ln 10 (in head 0, clamped at ln 100, P of key 7 is ~e^-60)
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    ls = _logit_scale_for(heads, dtype, device)
    inputs = [q, k, v, ls, True]
    op = da._attention
    got = op(*inputs, backend=backend)
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    assert_close_to_reference(got, op.reference(*inputs), op.reference(*as64), "forward")
    grad = torch.randn(got.shape, dtype=F64).to(dtype).to(device)
    grads = op._bwd(grad, *inputs, backend)
    eager = op._reference_backward([grad], inputs)
    truth = op._reference_backward([grad.double()], as64)
    for name, index, zero in (("q", 0, (0, 1, 4)), ("k", 1, (1, 1, 7))):
        g, e, t = grads[index], eager[index], truth[index]
        assert t[zero].abs().min() > 1e9, "the clamped row's gradient is d u / eps"
        assert_close_to_reference(g[zero], e[zero], t[zero], f"d {name}, the row of zeros")
        rest = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device)
        rest[zero] = False
        assert_close_to_reference(g[rest], e[rest], t[rest], f"d {name}, the other rows")


@pytest.mark.parametrize("backend", KERNELS)
def test_attention_strided_views_backends(backend, monkeypatch):
    """q, k, v as the layer makes them: head views of one (B, 4, n, 3d) projection."""
    device = _skip_unless(da._attention, backend, monkeypatch)
    B, n, heads, hd = 2, 12, 2, 24
    qkv = torch.randn(B, 4, n, 3 * heads * hd, device=device)
    q, k, v = (
        u.unflatten(-1, (heads, hd)).transpose(2, 3) for u in qkv.chunk(3, dim=-1)
    )  # (B, 4, heads, n, hd), strided
    ls = _logit_scale_for(heads, torch.float32, device)
    _check_backend(da._attention, backend, [q, k, v, ls, True], "views")


@pytest.mark.parametrize("backend", KERNELS)
def test_attention_inputs_whose_groups_do_not_merge(backend, monkeypatch):
    """q, k, v (B, 4, heads, n, hd) whose (B, 4) dimensions cannot be viewed as one (transposed
    from (4, B, ...)): the gradients, in the inputs' layout, cannot be views of (G, heads, n, hd)
    tensors either, and must still be written (the triton glue once filled a copy)."""
    device = _skip_unless(da._attention, backend, monkeypatch)
    B, heads, n, hd = 2, 2, 20, 24
    q, k, v = (
        t.unflatten(0, (4, B)).transpose(0, 1).to(device)
        for t in _qkv(4 * B, heads, n, hd, torch.float32)
    )
    assert q.reshape(-1, heads, n, hd).data_ptr() != q.data_ptr()  # no view: a copy
    ls = _logit_scale_for(heads, torch.float32, device)
    _check_backend(da._attention, backend, [q, k, v, ls, True], "groups that do not merge")


def test_triton_attention_copies_channel_strides_past_32_bits(monkeypatch):
    """q, k, v with channels-major strides whose tile offsets would pass the kernels' 32 bits
    (2^31 elements and more: the limit lowered here to the test's sizes) are read from
    contiguous copies, and their gradients written through buffers: the same values."""
    device = _skip_unless(da._attention, "triton", monkeypatch)
    from fastdit.triton import downsampled_attention as T

    G, heads, n, hd = 2, 2, 20, 24
    q, k, v = (
        t.transpose(-1, -2).contiguous().transpose(-1, -2).to(device)
        for t in _qkv(G, heads, n, hd, torch.float32)
    )  # channel stride n
    inputs = [q, k, v, _logit_scale_for(heads, torch.float32, device), True]
    grad = torch.randn(G, heads, n, hd, device=device)
    expected = da._attention(*inputs, backend="triton")
    expected_grads = da._attention._bwd(grad, *inputs, "triton")
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(T, "CHANNEL_EXTENT_LIMIT", n * hd)  # every channels-major tensor
    monkeypatch.setattr(
        torch.Tensor,
        "contiguous",
        lambda t, *a, **k: copies.append(t) or real_contiguous(t, *a, **k),
    )
    assert torch.equal(da._attention(*inputs, backend="triton"), expected)
    assert sum(t.dim() == 4 for t in copies) == 3, "q, k and v copied"
    got_grads = da._attention._bwd(grad, *inputs, "triton")
    for g, e in zip(got_grads, expected_grads):
        assert g.stride() == e.stride() and torch.equal(g, e)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cotangent", ["groups_do_not_merge", "channels_strided", "offset"])
def test_attention_cotangent_layouts(backend, dtype, cotangent, monkeypatch):
    """A (B, 4, heads, n, hd) cotangent laid out otherwise than q: the kernels must read it where
    it is, and give the same gradients, bitwise, as from its contiguous copy. Its (B, 4)
    dimensions transposed, so that they cannot be viewed as one (the cuda glue once read the
    original storage with the strides of that copy: errors of 5 to 18); its channels strided
    (the cuda tiles then read tokens first); or one element into a larger buffer (no 16-byte
    vectors: element by element)."""
    device = _skip_unless(da._attention, backend, monkeypatch)
    B, heads, n, hd = 2, 2, 70, 8
    q, k, v = (t.to(dtype).to(device) for t in _qkv(B * 4, heads, n, hd, torch.float32))
    q, k, v = (t.unflatten(0, (B, 4)) for t in (q, k, v))
    ls = _logit_scale_for(heads, dtype, device)
    if cotangent == "groups_do_not_merge":
        grad = torch.randn(4, B, heads, n, hd, device=device).to(dtype).transpose(0, 1)
        assert grad.reshape(-1, heads, n, hd).data_ptr() != grad.data_ptr()  # no view: a copy
    elif cotangent == "channels_strided":
        grad = torch.randn(B, 4, heads, hd, n, device=device).to(dtype).transpose(-1, -2)
    else:
        flat = torch.randn(B * 4 * heads * n * hd + 1, device=device).to(dtype)
        grad = flat[1:].view(B, 4, heads, n, hd)
    inputs = [q, k, v, ls, True]
    got = da._attention._bwd(grad, *inputs, backend)
    assert da._attention.last_backward_backend == backend
    expected = da._attention._bwd(grad.contiguous(), *inputs, backend)
    for i, a, b in zip(da._attention.diff_index, got, expected):
        assert torch.equal(a, b), f"d {da._attention.arg_names[i]}"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_attention_1024_tokens_backends(dtype, backend, monkeypatch):
    """The largest group of a 512 px U-DiT: 32 x 32 = 1024 tokens (many key tiles for the
    online softmax), forward and backward. Under the Triton interpreter with 64 x 64 tiles
    (16 s rather than minutes; the tile size is a launch parameter, the loop is the same);
    cuda through the emulator takes ~25 s (bf16) to ~40 s (fp32). In fp32 the long sums over
    keys and queries must stay fp32-accurate: with tensor cores that truncate each product's
    sum (emulate.h's model), accumulating 1024 keys in one mma chain was 1.3x over the bound."""
    device = _skip_unless(da._attention, backend, monkeypatch)
    if backend == "triton" and device.type == "cpu":
        kernels = importlib.import_module("fastdit.triton.downsampled_attention")
        monkeypatch.setattr(
            kernels, "attention_tiles", lambda *args, **kw: dict(BM=64, BN=64, num_warps=4)
        )
    q, k, v = (t.to(dtype).to(device) for t in _qkv(1, 1, 1024, 24))
    ls = _logit_scale_for(1, dtype, device, clamp_one=False)
    _check_backend(da._attention, backend, [q, k, v, ls, True], f"{backend} 1024 tokens")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_attention_kernels_take_their_own_tiles(dtype, monkeypatch):
    """The forward, dq and dkdv kernels launch with their own tiles (attention_tiles(...,
    kernel): what bench/tune_attention_tiles.py varies one kernel at a time). Three different
    shapes at once, 50 tokens a multiple of none: the grids, the row statistics the backward
    reads and the d logit_scale partials (one a dq block) must each follow their own kernel's
    tiles, or the gradients come out wrong."""
    device = _skip_unless(da._attention, "triton", monkeypatch)
    kernels = importlib.import_module("fastdit.triton.downsampled_attention")
    chosen = {
        "fwd": dict(BM=32, BN=16, num_warps=4),
        "dq": dict(BM=16, BN=32, num_warps=4),
        "dkdv": dict(BM=64, BN=32, num_warps=4),
    }
    asked, original = set(), kernels.attention_tiles

    def tiles(n, hd, dtype=None, kernel="fwd"):
        asked.add(kernel)
        return chosen[kernel]

    monkeypatch.setattr(kernels, "attention_tiles", tiles)
    q, k, v = (t.to(dtype).to(device) for t in _qkv(2, 2, 50, 24))
    ls = _logit_scale_for(2, dtype, device)
    _check_backend(da._attention, "triton", [q, k, v, ls, True], f"triton own tiles {dtype}")
    assert asked == set(kernels.ATTENTION_KERNELS)
    with pytest.raises(ValueError, match="kernel must be one of"):
        original(50, 24, dtype, "dv")


LAYER_CASES = [  # (B, d, heads, H, W, ksize)
    (2, 48, 2, 8, 8, 5),  # head dim 24
    (1, 96, 2, 6, 10, 5),  # head dim 48, non-square
    (1, 96, 1, 4, 4, 3),  # head dim 96, a 3x3 depthwise conv
    (1, 40, 2, 6, 6, 5),  # head dim 20: padded to 24, read element by element
]


def _layer_inputs(B, d, heads, H, W, ksize, dtype, device, layout, switches, table=False):
    x = torch.randn(B, d, H, W, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = _params(d, heads, F64, ksize=ksize)
    params[4] = _logit_scale_for(heads, dtype, "cpu")
    x, *params = (t.to(dtype).to(device) for t in (x, *params))
    rope_table = None
    if table and switches["rope"]:
        rope_table = da.rope_table(d // heads, (H // 2, W // 2), torch.float32, device)
    return [x, *params, heads, switches["rope"], switches["cosine"], switches["shortcut"],
            rope_table]  # fmt: skip


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("B, d, heads, H, W, ksize", LAYER_CASES)
def test_layer_backends(backend, dtype, layout, B, d, heads, H, W, ksize, monkeypatch):
    device = _skip_unless(da._layer, backend, monkeypatch)
    switches = dict(rope=True, cosine=True, shortcut=True)
    inputs = _layer_inputs(B, d, heads, H, W, ksize, dtype, device, layout, switches, table=True)
    _check_backend(da._layer, backend, inputs, f"{backend} {dtype} {layout}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("switches", SWITCHES[1:], ids=str)
def test_layer_ablation_switches_backends(backend, switches, monkeypatch):
    device = _skip_unless(da._layer, backend, monkeypatch)
    inputs = _layer_inputs(2, 32, 2, 4, 6, 5, torch.float32, device, "contiguous", switches)
    _check_backend(da._layer, backend, inputs, f"{backend} {switches}")


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values laid out otherwise: "transposed", its first two dims of more than one element
    swapped in memory (dense: gradients keep that layout); "gaps", every other element of a
    tensor with nan between."""
    if layout == "transposed":
        a, b = [i for i, size in enumerate(t.shape) if size > 1][:2]
        return t.transpose(a, b).contiguous().transpose(a, b)
    return nan_gapped(t)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["transposed", "gaps"])
def test_layer_strided_parameters_backends(backend, layout, monkeypatch):
    """Weights (and, with gaps, biases and the logit scale) strided: read where they are or
    copied, never the nan beside them; gradients in their layouts."""
    device = _skip_unless(da._layer, backend, monkeypatch)
    switches = dict(rope=True, cosine=True, shortcut=True)
    x, *params = _layer_inputs(1, 48, 2, 6, 6, 5, torch.float32, device, "contiguous", switches)
    names = ["dw_weight", "qkv_weight", "out_weight"]
    names += ["dw_bias", "qkv_bias", "logit_scale", "out_bias"] if layout == "gaps" else []
    for name in names:
        i = PARAM_NAMES.index(name)
        params[i] = _strided(params[i], layout)
        assert not params[i].is_contiguous(), name
    _check_backend(da._layer, backend, [x, *params], f"{backend} {layout} parameters")


def _kernel_cases(device):
    q, k, v = (t.float().to(device) for t in _qkv(2, 2, 20, 24))
    switches = dict(rope=True, cosine=True, shortcut=True)
    return {
        "attention_in_groups": (
            da._attention,
            [q, k, v, _logit_scale_for(2, torch.float32, device), True],
        ),
        "downsampled_attention": (
            da._layer,
            _layer_inputs(2, 48, 2, 8, 6, 5, torch.float32, device, "channels_last", switches),
        ),
    }


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", ["attention_in_groups", "downsampled_attention"])
def test_every_element_is_written(backend, name, monkeypatch):
    """Outputs, gradients and scratch poisoned with NaN: an element a kernel skips stays NaN."""
    op, _ = _kernel_cases("cpu")[name]
    device = _skip_unless(op, backend, monkeypatch)
    op, inputs = _kernel_cases(device)[name]
    grad = torch.randn_like(op.reference(*inputs))
    with nan_filled_empty():
        assert torch.isfinite(op(*inputs, backend=backend)).all(), "forward left elements unwritten"
        for i, g in zip(op.diff_index, op._bwd(grad, *inputs, backend)):
            assert torch.isfinite(g).all(), f"backward left d {op.arg_names[i]} partly unwritten"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", ["attention_in_groups", "downsampled_attention"])
def test_backward_is_deterministic(backend, name, monkeypatch):
    op, _ = _kernel_cases("cpu")[name]
    device = _skip_unless(op, backend, monkeypatch)
    op, inputs = _kernel_cases(device)[name]
    grad = torch.randn_like(op.reference(*inputs))
    first, second = op._bwd(grad, *inputs, backend), op._bwd(grad, *inputs, backend)
    for i, a, b in zip(op.diff_index, first, second):
        assert torch.equal(a, b), f"d {op.arg_names[i]} differs between two runs"


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_kernels(backend, monkeypatch):
    device = _skip_unless(da._layer, backend, monkeypatch)
    for name, (op, inputs) in _kernel_cases(device).items():
        args = [
            t.detach().requires_grad_() if i in op.diff_index else t for i, t in enumerate(inputs)
        ]
        torch.library.opcheck(getattr(torch.ops.fastdit, name), (*args, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph_through_udit_attention(backend, monkeypatch):
    """torch.compile(fullgraph=True) of U-DiT's attention module on the kernels, forward and
    backward, against the reference run eagerly."""
    device = _skip_unless(da._layer, backend, monkeypatch)
    from fastdit.nn.udit import DownsampledAttention

    module = DownsampledAttention(32, num_heads=2, backend=backend).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
        module.logit_scale.fill_(math.log(10))
    x = torch.randn(2, 32, 8, 8, device=device)

    def run(fn):
        xs = x.clone().requires_grad_()
        out = fn(xs)
        (out * torch.linspace(-1, 1, 8, device=device)).sum().backward()
        grads = [p.grad.clone() for p in module.parameters()] + [xs.grad]
        module.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = run(torch.compile(module, fullgraph=True, backend="aot_eager"))
    assert da._layer.last_backend == backend == da._layer.last_backward_backend
    module.backend = "torch"
    ref_out, ref_grads = run(module)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
