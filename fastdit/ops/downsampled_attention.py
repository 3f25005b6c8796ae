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

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _autocast, _checks
from ._op import Op, lazy

FAMILY = "downsampled_attention"
ROPE_THETA = 10000.0
LOGIT_SCALE_MAX = 4.6052  # the released code's clamp (ln 100 = 4.60517...)


def cosine_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The kernels' logits scale of cosine attention: exp(min(logit_scale, LOGIT_SCALE_MAX)),
    one contiguous fp32 value a head, computed by torch as the reference computes it (no
    gradient: the backward applies the clamp's mask itself)."""
    clamped = torch.clamp(logit_scale.detach().to(torch.float32), max=LOGIT_SCALE_MAX)
    return clamped.exp().reshape(-1).contiguous()


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


def _attention_contract(q, k, v, logit_scale, cosine) -> str:
    if q.dim() not in (4, 5):
        return f"q must be (G, heads, n, hd) or (B, 4, heads, n, hd), got shape {tuple(q.shape)}"
    return _checks.contract(
        ("q", q, None),
        ("k", k, q.shape),
        ("v", v, q.shape),
        ("logit_scale", logit_scale, (q.shape[-3], 1, 1)),
    )


def _layer_contract(x, dw_weight, dw_bias, qkv_weight, qkv_bias, logit_scale, out_weight,
                    out_bias, num_heads, rope, cosine, shortcut, rope_table) -> str:  # fmt: skip
    if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2 or num_heads < 1 or x.shape[1] % num_heads:
        return (
            "x must be (B, d, H, W) with H and W even and d a multiple of num_heads = "
            f"{num_heads}, got shape {tuple(x.shape)}"
        )
    d, k = x.shape[1], dw_weight.shape[-1]
    if k % 2 == 0:
        return f"dw_weight must be (d, 1, k, k) with k odd, got shape {tuple(dw_weight.shape)}"
    hd, n = d // num_heads, (x.shape[2] // 2) * (x.shape[3] // 2)
    return _checks.contract(
        ("x", x, None),
        ("dw_weight", dw_weight, (d, 1, k, k)),
        ("dw_bias", dw_bias, (d,)),
        ("qkv_weight", qkv_weight, (3 * d, d)),
        ("qkv_bias", qkv_bias, (3 * d,)),
        ("logit_scale", logit_scale, (num_heads, 1, 1)),
        ("out_weight", out_weight, (d, d, 1, 1)),
        ("out_bias", out_bias, (d,)),
        ("rope_table", rope_table if rope else None, (2, n, hd // 2)),
    )


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
    contract=_attention_contract,
)
_layer = Op(
    FAMILY,
    "downsampled_attention",
    "Tensor x, Tensor dw_weight, Tensor dw_bias, Tensor qkv_weight, Tensor qkv_bias, "
    "Tensor logit_scale, Tensor out_weight, Tensor out_bias, int num_heads, bool rope, "
    "bool cosine, bool shortcut, Tensor? rope_table",
    outputs=1,
    reference=reference_layer,
    contract=_layer_contract,
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
    op: str,
    logit_scale: torch.Tensor | None,
    cosine: bool,
    heads: int,
    like: torch.Tensor,
    like_name: str,
) -> torch.Tensor:
    """The (heads, 1, 1) parameter, of any floating dtype (the kernels read it in float32); with
    cosine=False it is unused and may be None."""
    if logit_scale is None:
        if cosine:
            raise ValueError(
                f"fastdit.{op}: logit_scale (heads, 1, 1) is required for cosine attention "
                "(it may be None only with cosine=False)"
            )
        return like.new_zeros(heads, 1, 1)  # a placeholder the reference ignores
    _checks.tensor(
        op, "logit_scale", logit_scale, ndim=3, like=like, like_name=like_name, same_dtype=False
    )
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
    logit_scale may have another floating dtype than q (float32 with bfloat16 q, say). Under
    ``torch.autocast``, q, k and v are first cast to the autocast dtype (not float64 ones),
    which is then the dtype returned.
    """
    q, k, v = _autocast.lower(q, k, v)
    op = "attention_in_groups"
    cosine = _checks.flag(op, "cosine", cosine)
    _checks.tensor(op, "q", q, ndim=(4, 5))
    _checks.nonempty(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(op, name, t, like=q, like_name="q")
        _checks.shape(op, name, t, q.shape, "the shape of q")
    scale = _logit_scale(op, logit_scale, cosine, q.shape[-3], q, "q")
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
    logit_scale may have another floating dtype than x (float32 with bfloat16 x, say). Under
    ``torch.autocast``, x and the other weights are first cast to the autocast dtype (not
    float64 ones), as autocast casts the inputs of the convolutions and matrix products, and
    the result has that dtype.
    """
    x, dw_weight, dw_bias, qkv_weight, qkv_bias, out_weight, out_bias = _autocast.lower(
        x, dw_weight, dw_bias, qkv_weight, qkv_bias, out_weight, out_bias
    )
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
    scale = _logit_scale(op, logit_scale, cosine, heads, x, "x")
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
# The layer's orchestration, shared by the kernel backends: each brings the dwconv + split kernel
# (forward, backward) and the attention (forward with the merge in its store; backward). The
# two projections are cuBLAS / cuDNN matrix products through torch. No stand-alone copy.


def _heads_view(qkv: torch.Tensor, part: int, heads: int) -> torch.Tensor:
    """q (part 0), k (1) or v (2) of a (B, 4, n, 3d) projection as (B, 4, heads, n, hd)."""
    d = qkv.shape[-1] // 3
    return qkv[..., part * d : (part + 1) * d].unflatten(-1, (heads, -1)).transpose(2, 3)


def _channel_rows(t: torch.Tensor) -> torch.Tensor:
    """An image (B, C, H, W) as (B, C, H*W): a view for channels-first or channels-last memory
    (the matrix products take either orientation), a copy only for other strides."""
    if t.is_contiguous():
        return t.flatten(2)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).flatten(1, 2).transpose(1, 2)
    return t.contiguous().flatten(2)


def _logit_scale_grad(dls: torch.Tensor, logit_scale: torch.Tensor, cosine: bool) -> torch.Tensor:
    """d logit_scale from the fp32 per-head sums of d scale * scale: zero where the clamp is
    active (and for plain attention, which ignores logit_scale)."""
    dls = dls.reshape(logit_scale.shape)
    if cosine:
        dls = dls * (logit_scale.to(torch.float32) <= LOGIT_SCALE_MAX)
    else:
        dls = torch.zeros_like(dls)
    return dls.to(logit_scale.dtype)


def layer_forward_with(split, attend, *inputs):
    """``split(x, dw_weight, dw_bias, shortcut) -> t (B, 4, n, d)``; ``attend(x, qkv,
    logit_scale, heads, rope, cosine, table, image)`` writes the merged attention output into
    ``image`` (x's layout). ``inputs``: the layer op's."""
    (x, dw_weight, dw_bias, qkv_weight, qkv_bias, logit_scale, out_weight, out_bias, num_heads,
     rope, cosine, shortcut, rope_table) = inputs  # fmt: skip
    qkv = F.linear(split(x, dw_weight, dw_bias, shortcut), qkv_weight, qkv_bias)
    image = torch.empty_like(x)
    attend(x, qkv, logit_scale, num_heads, rope, cosine, rope_table, image)
    return _checks.same_layout(F.conv2d(image, out_weight, out_bias), x)


def layer_backward_with(split, split_backward, attend_backward, grads, inputs):
    """``split_backward(x, dw_weight, dt, shortcut) -> (dx, d dw_weight, d dw_bias)``;
    ``attend_backward(x, qkv, logit_scale, heads, rope, cosine, table, image, d_image, dq, dk,
    dv)`` recomputes the merged output into ``image``, fills dq, dk, dv and returns the fp32
    per-head d logit_scale before the clamp's mask."""
    (x, dw_weight, dw_bias, qkv_weight, qkv_bias, logit_scale, out_weight, out_bias, heads,
     rope, cosine, shortcut, table) = inputs  # fmt: skip
    dout = grads[0]
    t = split(x, dw_weight, dw_bias, shortcut)
    qkv = F.linear(t, qkv_weight, qkv_bias)
    image = torch.empty_like(x)
    # d image = W_out^T d out (a 1x1 conv), laid out as image: the kernels read both with one
    # set of strides.
    d_image = F.conv2d(dout, out_weight.transpose(0, 1))
    if d_image.stride() != image.stride():
        d_image = torch.empty_like(image).copy_(d_image)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = (_heads_view(dqkv, i, heads) for i in range(3))
    dls = attend_backward(
        x, qkv, logit_scale, heads, rope, cosine, table, image, d_image, dq, dk, dv
    )
    # The parameter gradients of the two projections: matrix products in the dtype (fp32
    # accumulation inside), as eager autograd computes them.
    per_sample = _channel_rows(dout) @ _channel_rows(image).transpose(1, 2)  # (B, C, C)
    d_out_weight = per_sample.sum(0).reshape(out_weight.shape)
    d_out_bias = dout.sum((0, 2, 3))
    rows = dqkv.reshape(-1, dqkv.shape[-1])
    d_qkv_weight = rows.t() @ t.reshape(-1, t.shape[-1])
    d_qkv_bias = rows.sum(0)
    dt = F.linear(dqkv, qkv_weight.t()).contiguous()
    dx, d_dw_weight, d_dw_bias = split_backward(x, dw_weight, dt, shortcut)
    return [dx, d_dw_weight, d_dw_bias, d_qkv_weight, d_qkv_bias,
            _logit_scale_grad(dls, logit_scale, cosine), d_out_weight, d_out_bias]  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# CUDA: the depthwise conv + polyphase split
#
# fastdit._C's downsampled_attention_dwconv_split* entries (csrc/downsampled_attention.cu), with
# the contracts of the Triton backend's _dwconv_split / _dwconv_split_backward: the depthwise
# k x k conv + bias (+ x with the shortcut) written straight into the four groups (B, 4, n, d);
# its backward writes dx in x's memory layout and float32 partial sums of the weight and bias
# gradients per (sample, split), added here in a fixed order (deterministic). k odd <= 7.

CUDA_DWCONV_MAX_K = 7  # fastdit._C.DOWNSAMPLED_ATTENTION_DWCONV_MAX_K


def _cuda_lib():
    from .. import _ext

    return _ext.require(), _ext


@functools.lru_cache(maxsize=256)
def _cuda_dwconv_split_dw_plan(
    B: int, d: int, H: int, W: int, k: int, dtype: int, index: int | None
) -> int:
    """The dw kernel's splits of each sample's tiles on this GPU (cached per shape)."""
    lib, _ = _cuda_lib()
    return int(lib.downsampled_attention_dwconv_split_dw_plan(B, d, H, W, k, dtype, index))


def _cuda_dwconv_split(
    x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, shortcut: bool
) -> torch.Tensor:
    """t (B, 4, n, d) contiguous = polyphase_split(dwconv_k(x) + bias (+ x)); x any strides."""
    lib, ext = _cuda_lib()
    B, d, H, W = x.shape
    k = dw_weight.shape[-1]
    w = dw_weight.to(x.dtype).contiguous()
    b = dw_bias.to(x.dtype).contiguous()
    t = torch.empty(B, 4, (H // 2) * (W // 2), d, dtype=x.dtype, device=x.device)
    lib.downsampled_attention_dwconv_split(
        x.data_ptr(), x.stride(), w.data_ptr(), b.data_ptr(), t.data_ptr(), B, d, H, W, k,
        bool(shortcut), ext.dtype_code(x), x.device.index, ext.stream_of(x),
    )  # fmt: skip
    return t


def _cuda_dwconv_split_backward(
    x: torch.Tensor, dw_weight: torch.Tensor, dt: torch.Tensor, shortcut: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x in x's memory layout, d dw_weight, d dw_bias in the weight's dtype) from
    d t (B, 4, n, d)."""
    lib, ext = _cuda_lib()
    B, d, H, W = x.shape
    k = dw_weight.shape[-1]
    taps = k * k
    code, dev, stream = ext.dtype_code(x), x.device, ext.stream_of(x)
    w = dw_weight.to(x.dtype).contiguous()
    dt = dt.to(x.dtype).contiguous()
    dx = torch.empty_like(x)  # x's layout (channels-last stays so)
    lib.downsampled_attention_dwconv_split_dx(
        w.data_ptr(), dt.data_ptr(), dx.data_ptr(), dx.stride(), B, d, H, W, k, bool(shortcut),
        code, dev.index, stream,
    )  # fmt: skip
    splits = _cuda_dwconv_split_dw_plan(B, d, H, W, k, code, dev.index)
    partial = torch.empty(B, splits, taps + 1, d, dtype=torch.float32, device=dev)
    lib.downsampled_attention_dwconv_split_dw(
        x.data_ptr(), x.stride(), dt.data_ptr(), partial.data_ptr(), B, d, H, W, k, splits,
        code, dev.index, stream,
    )  # fmt: skip
    sums = partial.sum((0, 1))  # (taps + 1, d) float32, over samples and splits in a fixed order
    d_weight = sums[:taps].t().reshape(dw_weight.shape).to(dw_weight.dtype)
    return dx, d_weight, sums[taps].to(dw_weight.dtype)


# ----------------------------------------------------------------------------------------------
# CUDA: attention within the groups (csrc/downsampled_attention.cu, TF32 tensor cores), and the
# layer around it: dwconv + split kernel, qkv projection (cuBLAS), prep (RoPE, normalisation,
# scale), attention with the merge in its store, output projection (cuBLAS/cuDNN).

CUDA_MAX_HEAD_DIM = 128
CUDA_MAX_TOKENS = 65535 * 64  # fastdit._C.DOWNSAMPLED_ATTENTION_MAX_TOKENS: tokens per group


def _cuda_attention_reason(t: torch.Tensor, hd: int, problems: int, n: int) -> str:
    """problems: groups x heads, one attention each; n: tokens per group."""
    from .. import _ext

    if t.dtype not in _ext.DTYPE_CODES:
        return f"the cuda kernels take float32, float16 or bfloat16, not {t.dtype}"
    if hd % 2 or hd > CUDA_MAX_HEAD_DIM:
        return f"the cuda attention kernels take an even head dim <= {CUDA_MAX_HEAD_DIM}, got {hd}"
    if n > CUDA_MAX_TOKENS or problems >= 2**31:
        return (
            f"the cuda attention kernels take groups x heads < 2^31 and n <= {CUDA_MAX_TOKENS} "
            f"tokens per group (their grid), got {problems} and n = {n}"
        )
    if t.is_cuda:
        if torch.cuda.get_device_capability(t.device) < (8, 0):
            return "the cuda attention kernels run on TF32 tensor cores (mma.sync): sm_80 or newer"
        lib, _ = _cuda_lib()
        if not lib.downsampled_attention_fits(hd, t.device.index):
            return (
                f"the cuda attention kernels for head dim {hd} need more shared memory per block "
                "than this GPU offers (99 KB on sm_86/89/120: head dims above 64)"
            )
    return ""


def _cuda_supports_attention(q, k, v, logit_scale, cosine) -> str:
    heads, n, hd = q.shape[-3:]  # q: (G, heads, n, hd) or (B, 4, heads, n, hd)
    return _cuda_attention_reason(q, hd, q.numel() // (n * hd), n)


def _cuda_supports_layer(x, dw_weight, *params) -> str:
    B, d, H, W = x.shape
    num_heads = params[6]
    if dw_weight.shape[-1] > CUDA_DWCONV_MAX_K:
        return f"the cuda depthwise conv takes k <= {CUDA_DWCONV_MAX_K}, got {dw_weight.shape[-1]}"
    if H * W >= 2**31:
        return f"the cuda depthwise conv takes H * W < 2^31, got {H} x {W}"
    return _cuda_attention_reason(x, d // num_heads, 4 * B * num_heads, (H // 2) * (W // 2))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> list[int]:
    """A (G, heads, n, hd) view with unit channel stride: its (group, head, token) strides."""
    return list(t.stride()[:3])


class _CudaAttention:
    """The attention problems of one call: q, k, v as (G, heads, n, hd) views with unit channel
    stride (a copy only where a view cannot be had), and q^, k^ prepared by the prep kernel."""

    def __init__(self, q, k, v, logit_scale, cosine: bool, table: torch.Tensor | None):
        self.lib, self.ext = _cuda_lib()
        self.q, self.k, self.v = (self._groups(t) for t in (q, k, v))
        self.G, self.heads, self.n, self.hd = self.q.shape
        self.hdp = self.lib.downsampled_attention_padded_head_dim(self.hd)
        self.table = None if table is None else table.to(torch.float32).contiguous()
        self.scale = None
        if cosine:
            self.scale = cosine_scale(logit_scale)
        dev = self.q.device
        self.tail = (
            self.G, self.heads, self.n, self.hd, self.hdp, self.ext.dtype_code(self.q), dev.index,
            self.ext.stream_of(self.q),
        )  # fmt: skip
        self.qh = torch.empty(self.G, self.heads, self.n, self.hdp, dtype=torch.float32, device=dev)
        self.kh = torch.empty_like(self.qh)
        self.lib.downsampled_attention_prep(
            self.q.data_ptr(), _rows(self.q), self.k.data_ptr(), _rows(self.k), _ptr(self.table),
            _ptr(self.scale), self.qh.data_ptr(), self.kh.data_ptr(), *self.tail,
        )  # fmt: skip

    @staticmethod
    def _groups(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *t.shape[-3:])
        return t if t.stride(-1) == 1 else t.contiguous()

    @staticmethod
    def _layout(
        t: torch.Tensor, gw: int, written: bool
    ) -> tuple[torch.Tensor, list[int], int, int]:
        """(the tensor the kernel addresses, its strides, merge, gw) of an output-shaped tensor:
        the (B, d, H, W) image of the layer (gw > 0: the merge) or a (..., heads, n, hd) tensor
        as (G, heads, n, hd). That view of a tensor the kernel reads may be a copy (leading
        dimensions that do not merge); of one it writes it must be a view (else an error)."""
        if gw:
            return t, list(t.stride()), 1, gw
        t = t.view(-1, *t.shape[-3:]) if written else t.reshape(-1, *t.shape[-3:])
        return t, list(t.stride()), 0, 1

    def forward(self, out: torch.Tensor, gw: int = 0) -> None:
        out, strides, merge, gw = self._layout(out, gw, written=True)
        self.lib.downsampled_attention_fwd(
            self.qh.data_ptr(), self.kh.data_ptr(), self.v.data_ptr(), _rows(self.v),
            out.data_ptr(), strides, merge, gw, 0, 0, 0, True, False, *self.tail,
        )  # fmt: skip

    def backward(self, dout, dq, dk, dv, out=None, gw: int = 0) -> torch.Tensor:
        """Fills dq, dk, dv ((..., heads, n, hd), any strides with unit channel stride) and, when
        given, ``out`` (recomputed; it must share dout's strides); returns d logit_scale (heads,)
        in fp32 before the clamp's mask."""
        dev = self.q.device
        if out is not None:
            out, out_strides, _, _ = self._layout(out, gw, written=True)
        dout, strides, merge, gw = self._layout(dout, gw, written=False)
        if out is not None and out_strides != strides:
            raise AssertionError("o and d o share one set of strides")
        lse = torch.empty(self.G, self.heads, self.n, dtype=torch.float32, device=dev)
        delta, dlogit = torch.empty_like(lse), torch.empty_like(lse)
        self.lib.downsampled_attention_fwd(
            self.qh.data_ptr(), self.kh.data_ptr(), self.v.data_ptr(), _rows(self.v),
            _ptr(out), strides, merge, gw, dout.data_ptr(), lse.data_ptr(), delta.data_ptr(),
            out is not None, True, *self.tail,
        )  # fmt: skip
        dqh, dkh = torch.empty_like(self.qh), torch.empty_like(self.kh)
        dq, dk, dv = (t.view(-1, *t.shape[-3:]) for t in (dq, dk, dv))  # written: views
        self.lib.downsampled_attention_bwd(
            self.qh.data_ptr(), self.kh.data_ptr(), self.v.data_ptr(), _rows(self.v),
            dout.data_ptr(), strides, merge, gw, lse.data_ptr(), delta.data_ptr(),
            dqh.data_ptr(), dkh.data_ptr(), dlogit.data_ptr(), dv.data_ptr(), _rows(dv),
            *self.tail,
        )  # fmt: skip
        self.lib.downsampled_attention_post(
            self.q.data_ptr(), _rows(self.q), self.k.data_ptr(), _rows(self.k), _ptr(self.table),
            _ptr(self.scale), dqh.data_ptr(), dkh.data_ptr(), dq.data_ptr(), _rows(dq),
            dk.data_ptr(), _rows(dk), *self.tail,
        )  # fmt: skip
        return dlogit.sum((0, 2))  # over groups and tokens, in a fixed order


def _cuda_attention_forward(q, k, v, logit_scale, cosine) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _CudaAttention(q, k, v, logit_scale, cosine, None).forward(out)
    return out


def _cuda_attention_backward(grads, inputs) -> list[torch.Tensor]:
    q, k, v, logit_scale, cosine = inputs
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dls = _CudaAttention(q, k, v, logit_scale, cosine, None).backward(grads[0], dq, dk, dv)
    return [dq, dk, dv, _logit_scale_grad(dls, logit_scale, cosine)]


def _cuda_attention(x, qkv, logit_scale, heads, rope, cosine, table) -> _CudaAttention:
    B, d, H, W = x.shape
    if rope and table is None:
        table = rope_table(d // heads, (H // 2, W // 2), torch.float32, x.device)
    q, k, v = (_heads_view(qkv, i, heads) for i in range(3))
    return _CudaAttention(q, k, v, logit_scale, cosine, table if rope else None)


def _cuda_layer_attend(x, qkv, logit_scale, heads, rope, cosine, table, image) -> None:
    _cuda_attention(x, qkv, logit_scale, heads, rope, cosine, table).forward(image, x.shape[3] // 2)


def _cuda_layer_attend_backward(x, qkv, logit_scale, heads, rope, cosine, table, image, d_image,
                                dq, dk, dv) -> torch.Tensor:  # fmt: skip
    attention = _cuda_attention(x, qkv, logit_scale, heads, rope, cosine, table)
    return attention.backward(d_image, dq, dk, dv, out=image, gw=x.shape[3] // 2)


def _cuda_layer_forward(*inputs) -> torch.Tensor:
    return layer_forward_with(_cuda_dwconv_split, _cuda_layer_attend, *inputs)


def _cuda_layer_backward(grads, inputs) -> list[torch.Tensor]:
    return layer_backward_with(
        _cuda_dwconv_split, _cuda_dwconv_split_backward, _cuda_layer_attend_backward, grads, inputs
    )


_attention.register(
    "cuda",
    _cuda_attention_forward,
    backward=_cuda_attention_backward,
    supports=_cuda_supports_attention,
)
_layer.register(
    "cuda", _cuda_layer_forward, backward=_cuda_layer_backward, supports=_cuda_supports_layer
)
