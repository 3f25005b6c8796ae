"""downsampled_attention: U-DiT's attention layer over downsampled tokens, and its parts.

U-DiT (Tian et al., 2024) attends over four stride-2 sub-images of the feature map, each on its
own, instead of over the whole image. For an input ``x`` of shape ``(B, d, H, W)`` (H, W even)
with ``heads`` heads of ``hd = d / heads`` channels:

1. ``y = dwconv_k(x) + x``: a depthwise k x k convolution (``downsampler.layer``, k = 5 in every
   released model, padding ``k // 2``, with bias) plus the input itself (the shortcut);
2. ``t = polyphase_split(y)``: ``(B, 4, n, d)`` with ``n = (H/2) * (W/2)``;
3. ``q, k, v = Linear(t, qkv_weight, qkv_bias).chunk(3)``, each split into heads
   ``(B, 4, heads, n, hd)``: channel ``c`` of q (and of k, v) is channel ``c % hd`` of head
   ``c // hd``;
4. ``q, k = rope2d(q, grid), rope2d(k, grid)`` with ``grid = (H/2, W/2)``;
5. ``o = attention_in_groups(q, k, v, logit_scale)``: softmax attention within each group;
6. heads concatenated back into channels, ``polyphase_merge``, then ``to_out``: a 1x1 conv.

The polyphase layout. Group ``g = 2*a + b`` (``a``, ``b`` in {0, 1}) holds the pixels
``(2i + a, 2j + b)``, its ``n = gh * gw`` tokens row-major over the group grid
``(gh, gw) = (H/2, W/2)``::

    polyphase_split(x)[n_, 2*a + b, i * gw + j, c] = x[n_, c, 2*i + a, 2*j + b]

This is the order of the released code's ``rearrange(x, 'b d (h dh) (w dw) -> b (dh dw) (h w)
d')``. The layout ``(B, 4, n, d)`` keeps channels last, so step 3 is one matrix product over
``B*4*n`` rows, and ``(B, 4, heads, n, hd)`` reshapes to the ``(B*4*heads, n, hd)`` batches a
fused attention kernel wants.

RoPE2D. For a head dim ``h`` (a multiple of 4) and ``j = 0..h/4-1``, the frequencies are
``f_j = 1 / 10000^(4j / h)``. Channels ``(2m, 2m+1)`` form pair ``m``; the token at group-grid
row ``r``, column ``c`` turns pair ``2j`` by the angle ``c * f_j`` and pair ``2j+1`` by
``r * f_j``::

    out[2m]   = x[2m] * cos(theta_m) - x[2m+1] * sin(theta_m)
    out[2m+1] = x[2m] * sin(theta_m) + x[2m+1] * cos(theta_m)

(the complex product ``(x[2m] + i x[2m+1]) * exp(i theta_m)``), computed in float32 (float64
for float64 inputs) and cast back to x's dtype. All four groups and all heads use the same
positions: every group is a whole (downsampled) picture of the image.

Attention. Cosine attention (the released ``attn_type='v2'``, used by every released model)::

    attention = softmax(normalize(q) @ normalize(k)^T * exp(min(logit_scale, 4.6052))) @ v

with ``normalize(u) = u / max(||u||_2, 1e-12)`` over hd and ``logit_scale`` a ``(heads, 1, 1)``
parameter. 4.6052 is the released code's literal clamp, just above ln 100 = 4.605170...; no
``1/sqrt(hd)``. The ablation (``cosine=False``, released ``attn_type=None``) is plain scaled dot
product attention, ``softmax(q @ k^T * hd^-0.5) @ v``. Softmax and the products run in float32
(float64 for float64 inputs); the result is cast back.

Released ablation switches, all on in the released models: ``rope`` (posemb_type='rope2d'),
``cosine`` (attn_type='v2'), ``shortcut`` (down_shortcut=1).

Parameters are taken as stored in a released state dict (prefix ``...attn1.`` or ``...attn2.``):

==============  ===========================  ==================
argument        state-dict name              shape
==============  ===========================  ==================
dw_weight       downsampler.layer.weight     (d, 1, k, k), k odd
dw_bias         downsampler.layer.bias       (d,)
qkv_weight      to_qkv.weight                (3d, d)
qkv_bias        to_qkv.bias                  (3d,)
logit_scale     logit_scale                  (heads, 1, 1)
out_weight      to_out.weight                (d, d, 1, 1)
out_bias        to_out.bias                  (d,)
==============  ===========================  ==================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _checks
from ._op import Op, lazy

FAMILY = "downsampled_attention"
ROPE_THETA = 10000.0
LOGIT_SCALE_MAX = 4.6052  # the released code's clamp (ln 100 = 4.60517...)
NORMALIZE_EPS = 1e-12  # F.normalize's default, as in the released code


# ----------------------------------------------------------------------------------------------
# The reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def reference_split(x: torch.Tensor) -> torch.Tensor:
    B, d, H, W = x.shape
    # pixel_unshuffle: u[:, 4*c + 2*a + b, i, j] = x[:, c, 2*i + a, 2*j + b]
    u = F.pixel_unshuffle(x, 2).reshape(B, d, 4, (H // 2) * (W // 2))
    return u.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)


def reference_merge(t: torch.Tensor, grid: Sequence[int], channels_last: bool) -> torch.Tensor:
    B, _, _, d = t.shape
    gh, gw = grid
    # pixel_shuffle: out[:, c, 2*i + a, 2*j + b] = u[:, 4*c + 2*a + b, i, j]
    u = t.permute(0, 3, 1, 2).reshape(B, 4 * d, gh, gw)
    out = F.pixel_shuffle(u, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.clone(memory_format=fmt)


def _rope_tables(
    head_dim: int, grid: Sequence[int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle of every (token, channel pair): (n, head_dim/2) each.

    ``angle[r * gw + c, 2j] = c * f_j`` and ``angle[r * gw + c, 2j + 1] = r * f_j`` with
    ``f_j = 1 / 10000^(4j / head_dim)``, evaluated in ``dtype`` as the released code does (in
    float32).
    """
    gh, gw = grid
    exponents = torch.arange(0, head_dim, 4, dtype=dtype, device=device) / head_dim  # 4j / h
    freqs = 1.0 / ROPE_THETA**exponents
    by_col = torch.arange(gw, dtype=dtype, device=device)[:, None] * freqs  # (gw, h/4)
    by_row = torch.arange(gh, dtype=dtype, device=device)[:, None] * freqs  # (gh, h/4)
    angles = torch.stack(
        (by_col[None, :, :].expand(gh, gw, -1), by_row[:, None, :].expand(gh, gw, -1)), dim=-1
    ).reshape(gh * gw, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


def rope_table(
    head_dim: int,
    grid: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The RoPE2D table of a grid: ``(2, gh*gw, head_dim/2)``, cos then sin of every angle.

    Build it once per grid, device and dtype (float32, or float64 for float64 models) and pass
    it to :func:`downsampled_attention` as ``rope_table`` so the layer does not rebuild it.
    """
    return torch.stack(_rope_tables(head_dim, [int(g) for g in grid], dtype, device))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def reference_rope2d(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    cos, sin = _rope_tables(x.shape[-1], grid, _compute_dtype(x.dtype), x.device)
    return _rotate(x, cos, sin)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor, cosine: bool
) -> torch.Tensor:
    dtype, ct = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    if cosine:
        q = F.normalize(q, dim=-1, eps=NORMALIZE_EPS)
        k = F.normalize(k, dim=-1, eps=NORMALIZE_EPS)
        scale = torch.clamp(logit_scale.to(ct), max=LOGIT_SCALE_MAX).exp()  # (heads, 1, 1)
    else:
        scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale
    out = logits.softmax(dim=-1) @ v
    return out.to(dtype)


def reference_layer(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    logit_scale: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    num_heads: int,
    rope: bool,
    cosine: bool,
    shortcut: bool,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    B, d, H, W = x.shape
    grid = (H // 2, W // 2)
    pad = dw_weight.shape[-1] // 2
    y = F.conv2d(x, dw_weight, dw_bias, padding=pad, groups=d)
    if shortcut:
        y = y + x
    qkv = F.linear(reference_split(y), qkv_weight, qkv_bias)  # (B, 4, n, 3d)
    q, k, v = (u.unflatten(-1, (num_heads, -1)).transpose(2, 3) for u in qkv.chunk(3, dim=-1))
    if rope:
        if table is None:
            cos, sin = _rope_tables(q.shape[-1], grid, _compute_dtype(x.dtype), x.device)
        else:
            cos, sin = table.to(_compute_dtype(x.dtype)).unbind(0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    o = reference_attention(q, k, v, logit_scale, cosine)  # (B, 4, heads, n, hd)
    o = o.transpose(2, 3).flatten(-2)  # (B, 4, n, d): channel = head * hd + i
    image = reference_merge(o, grid, False)
    return _checks.same_layout(F.conv2d(image, out_weight, out_bias), x)


_split = Op(
    FAMILY,
    "polyphase_split",
    "Tensor x",
    outputs=1,
    reference=reference_split,
    differentiable=("x",),
)
_merge = Op(
    FAMILY,
    "polyphase_merge",
    "Tensor t, int[] grid, bool channels_last",
    outputs=1,
    reference=reference_merge,
    differentiable=("t",),
)
_rope2d = Op(
    FAMILY,
    "rope2d",
    "Tensor x, int[] grid",
    outputs=1,
    reference=reference_rope2d,
    differentiable=("x",),
)
_attention = Op(
    FAMILY,
    "attention_in_groups",
    "Tensor q, Tensor k, Tensor v, Tensor logit_scale, bool cosine",
    outputs=1,
    reference=reference_attention,
    differentiable=("q", "k", "v", "logit_scale"),
)
_layer = Op(
    FAMILY,
    "downsampled_attention",
    "Tensor x, Tensor dw_weight, Tensor dw_bias, Tensor qkv_weight, Tensor qkv_bias, "
    "Tensor logit_scale, Tensor out_weight, Tensor out_bias, int num_heads, bool rope, "
    "bool cosine, bool shortcut, Tensor? rope_table",
    outputs=1,
    reference=reference_layer,
    differentiable=(
        "x",
        "dw_weight",
        "dw_bias",
        "qkv_weight",
        "qkv_bias",
        "logit_scale",
        "out_weight",
        "out_bias",
    ),
)
OPS = (_split, _merge, _rope2d, _attention, _layer)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _image(op: str, x: torch.Tensor) -> None:
    """x is a non-empty (B, d, H, W) image with H and W even."""
    _checks.tensor(op, "x", x, ndim=4)
    _checks.nonempty(op, "x", x)
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        raise ValueError(
            f"fastdit.{op}: the height and width of x (B, d, H, W) = {tuple(x.shape)} must be "
            "even (the image is split into its four stride-2 sub-images)"
        )


def _grid(op: str, grid: object, n: int) -> list[int]:
    """The group grid (gh, gw) with gh * gw == n; None means a square grid."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"fastdit.{op}: {n} tokens do not form a square grid; pass grid=(gh, gw) "
                "with gh * gw == n"
            )
        return [side, side]
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"fastdit.{op}: grid must be a pair of ints (gh, gw), got {grid!r}")
    gh, gw = grid
    if gh < 1 or gw < 1 or gh * gw != n:
        raise ValueError(
            f"fastdit.{op}: grid {(gh, gw)} must be positive with gh * gw == n, the number of "
            f"tokens ({n})"
        )
    return [gh, gw]


def _rope_head_dim(op: str, head_dim: int, what: str) -> None:
    if head_dim % 4:
        raise ValueError(
            f"fastdit.{op}: RoPE2D needs a head dim divisible by 4 (pairs of channels, "
            f"alternately turned by the column and the row), got {what} {head_dim}"
        )


def _logit_scale(
    op: str, logit_scale: torch.Tensor | None, cosine: bool, heads: int, like: torch.Tensor
) -> torch.Tensor:
    """The (heads, 1, 1) parameter; with cosine=False it is unused and may be None."""
    if logit_scale is None:
        if cosine:
            raise ValueError(
                f"fastdit.{op}: logit_scale (heads, 1, 1) is required for cosine attention "
                "(it may be None only with cosine=False)"
            )
        return like.new_zeros(heads, 1, 1)  # a placeholder the reference ignores
    _checks.tensor(op, "logit_scale", logit_scale, ndim=3, like=like)
    _checks.shape(op, "logit_scale", logit_scale, (heads, 1, 1), "one value per head")
    return logit_scale


# ----------------------------------------------------------------------------------------------
# The public functions


def polyphase_split(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Split an image into its four stride-2 sub-images, as tokens.

    x: (B, d, H, W), H and W even, any memory layout. Returns a fresh contiguous
    (B, 4, n, d) tensor, n = (H/2) * (W/2)::

        out[:, 2*a + b, i * (W/2) + j, :] = x[:, :, 2*i + a, 2*j + b]

    (group ``g = 2a + b`` holds the pixels at row offset a, column offset b; its tokens are
    row-major over the (H/2, W/2) group grid). Only a permutation of the values.
    """
    _image("polyphase_split", x)
    return _split(x, backend=backend)


def polyphase_merge(
    t: torch.Tensor,
    grid: Sequence[int] | None = None,
    *,
    channels_last: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The exact inverse of :func:`polyphase_split`.

    t: (B, 4, n, d); grid: the group grid (gh, gw) with gh * gw == n (default: square), i.e.
    (H/2, W/2) of the image to rebuild. Returns (B, d, 2*gh, 2*gw)::

        out[:, :, 2*i + a, 2*j + b] = t[:, 2*a + b, i * gw + j, :]

    contiguous, or channels-last in memory with ``channels_last=True``.
    """
    op = "polyphase_merge"
    _checks.tensor(op, "t", t, ndim=4)
    _checks.nonempty(op, "t", t)
    if t.shape[1] != 4:
        raise ValueError(
            f"fastdit.{op}: t must be (B, 4, n, d), four groups, got shape {tuple(t.shape)}"
        )
    hw = _grid(op, grid, t.shape[2])
    return _merge(t, hw, _checks.flag(op, "channels_last", channels_last), backend=backend)


def rope2d(
    x: torch.Tensor, grid: Sequence[int] | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """U-DiT's 2-D rotary position embedding.

    x: (..., n, h), h divisible by 4, the n tokens row-major on the group grid
    ``grid = (gh, gw)`` (default: square). For the token at row r, column c and pair
    m = (channels 2m, 2m+1), with ``f_j = 1 / 10000^(4j/h)``, ``theta_{2j} = c * f_j`` and
    ``theta_{2j+1} = r * f_j``::

        out[..., 2m]   = x[..., 2m] * cos(theta_m) - x[..., 2m+1] * sin(theta_m)
        out[..., 2m+1] = x[..., 2m] * sin(theta_m) + x[..., 2m+1] * cos(theta_m)

    Computed in float32 (float64 for float64 x), returned in x's dtype and shape, contiguous.
    """
    op = "rope2d"
    _checks.tensor(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"fastdit.{op}: x must be (..., n, h), got shape {tuple(x.shape)}")
    _checks.nonempty(op, "x", x)
    _rope_head_dim(op, x.shape[-1], "h =")
    hw = _grid(op, grid, x.shape[-2])
    return _rope2d(x, hw, backend=backend)


def attention_in_groups(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor | None,
    *,
    cosine: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention within each group of tokens, per head.

    q, k, v: (G, heads, n, hd) or (B, 4, heads, n, hd), the same shape; every leading index
    (G = B*4 groups) is an independent attention problem. logit_scale: (heads, 1, 1).

    cosine=True (U-DiT)::

        softmax(normalize(q) @ normalize(k)^T * exp(min(logit_scale, 4.6052))) @ v

    with ``normalize(u) = u / max(||u||_2, 1e-12)`` over hd. cosine=False (the ablation):
    ``softmax(q @ k^T * hd^-0.5) @ v``; logit_scale is then ignored and may be None.
    Runs in float32 (float64 for float64 inputs); returns q's shape and dtype, contiguous.
    """
    op = "attention_in_groups"
    cosine = _checks.flag(op, "cosine", cosine)
    _checks.tensor(op, "q", q, ndim=(4, 5))
    _checks.nonempty(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(op, name, t, like=q)
        _checks.shape(op, name, t, q.shape, "the shape of q")
    scale = _logit_scale(op, logit_scale, cosine, q.shape[-3], q)
    return _attention(q, k, v, scale, cosine, backend=backend)


def downsampled_attention(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    logit_scale: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    num_heads: int,
    *,
    rope: bool = True,
    cosine: bool = True,
    shortcut: bool = True,
    rope_table: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """U-DiT's downsampled-token attention layer (``DownSample_Attn``), as one op.

    x: (B, d, H, W), H and W even, channels-first or channels-last. Weights as stored in the
    released state dict: dw_weight (d, 1, k, k) with k odd (5 in the released models),
    dw_bias (d,), qkv_weight (3d, d), qkv_bias (3d,), logit_scale (heads, 1, 1) (may be None
    with cosine=False), out_weight (d, d, 1, 1), out_bias (d,). ``num_heads`` divides d;
    with ``rope`` the head dim d / num_heads must be divisible by 4.

    ``out = conv1x1(merge(attn(rope(q), rope(k), v)), out_weight, out_bias)`` where
    ``q, k, v = Linear(polyphase_split(dwconv(x) + x), qkv_weight, qkv_bias)`` split into heads;
    see the module docstring for each step. ``rope``, ``cosine`` and ``shortcut`` are the
    released ablation switches (all True in the released models). Returns (B, d, H, W) in x's
    dtype and memory format; differentiable in x and every weight. ``rope_table``: the cached
    :func:`rope_table` of the group grid (H/2, W/2) for this head dim; None builds it here.
    """
    op = "downsampled_attention"
    rope = _checks.flag(op, "rope", rope)
    cosine = _checks.flag(op, "cosine", cosine)
    shortcut = _checks.flag(op, "shortcut", shortcut)
    heads = _checks.count(op, "num_heads", num_heads)
    _image(op, x)
    d = x.shape[1]
    if d % heads:
        raise ValueError(
            f"fastdit.{op}: num_heads ({heads}) must divide the channels of x (d = {d})"
        )
    if rope:
        _rope_head_dim(op, d // heads, f"d / num_heads = {d} / {heads} =")
    _checks.tensor(op, "dw_weight", dw_weight, ndim=4, like=x)
    ksize = dw_weight.shape[-1]
    if ksize % 2 == 0 or tuple(dw_weight.shape) != (d, 1, ksize, ksize):
        raise ValueError(
            f"fastdit.{op}: dw_weight must have shape (d, 1, k, k) = ({d}, 1, k, k) with k odd "
            f"(a depthwise conv; downsampler.layer.weight), got {tuple(dw_weight.shape)}"
        )
    shapes = {
        "dw_bias": ((d,), "downsampler.layer.bias"),
        "qkv_weight": ((3 * d, d), "to_qkv.weight, Linear(d, 3d)"),
        "qkv_bias": ((3 * d,), "to_qkv.bias"),
        "out_weight": ((d, d, 1, 1), "to_out.weight, Conv2d(d, d, 1)"),
        "out_bias": ((d,), "to_out.bias"),
    }
    given = {
        "dw_bias": dw_bias,
        "qkv_weight": qkv_weight,
        "qkv_bias": qkv_bias,
        "out_weight": out_weight,
        "out_bias": out_bias,
    }
    for name, (expected, meaning) in shapes.items():
        _checks.tensor(op, name, given[name], like=x)
        _checks.shape(op, name, given[name], expected, meaning)
    scale = _logit_scale(op, logit_scale, cosine, heads, x)
    if rope_table is not None:
        n, hd = (x.shape[2] // 2) * (x.shape[3] // 2), d // heads
        if not isinstance(rope_table, torch.Tensor) or rope_table.dtype != _compute_dtype(x.dtype):
            raise TypeError(
                f"fastdit.{op}: rope_table must be a {_compute_dtype(x.dtype)} tensor "
                "(fastdit.ops.downsampled_attention.rope_table)"
            )
        if rope_table.device != x.device:
            raise ValueError(f"fastdit.{op}: rope_table is on {rope_table.device}, x on {x.device}")
        _checks.shape(op, "rope_table", rope_table, (2, n, hd // 2), "cos and sin of each angle")
    return _layer(
        x, dw_weight, dw_bias, qkv_weight, qkv_bias, scale, out_weight, out_bias, heads,
        rope, cosine, shortcut, rope_table if rope else None, backend=backend,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Kernel backends
#
# triton (fastdit/triton/downsampled_attention.py): attention_in_groups forward and backward,
# flash style (the (n, n) logits stay on chip), with the normalisation and the clamped logit
# scale fused into the loads of q and k; even head dims <= 128; float64 goes to torch.

_TRITON = "fastdit.triton.downsampled_attention"
_attention.register(
    "triton",
    lazy(_TRITON, "attention_forward"),
    backward=lazy(_TRITON, "attention_backward"),
    supports=lazy(_TRITON, "supports_attention"),
)
_layer.register(
    "triton",
    lazy(_TRITON, "layer_forward"),
    backward=lazy(_TRITON, "layer_backward"),
    supports=lazy(_TRITON, "supports_layer"),
)
