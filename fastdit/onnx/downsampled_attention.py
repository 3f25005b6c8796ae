"""ONNX translations of the downsampled_attention family
(``fastdit/ops/downsampled_attention.py``).

- ``polyphase_split(x)``: ``Reshape(x, (B, d, gh, 2, gw, 2))``, ``Transpose`` to
  ``(B, 2, 2, gh, gw, d)``, ``Reshape`` to ``(B, 4, n, d)``; ``polyphase_merge`` is the
  inverse chain (its ``channels_last`` flag is a memory format, which ONNX tensors do not have).
- ``rope2d(x, grid)``: real arithmetic. The cos and sin tables ``(n, h/2)`` are computed at
  export time by the reference's own code (float32, float64 for float64 graphs) and stored as
  constants; x is cast to that type, reshaped to ``(..., n, h/2, 2)``, split into the pair's
  halves a and b, and ``(a cos - b sin, a sin + b cos)`` concatenated back and reshaped to
  ``(..., n, h)``: ``Mul``, ``Sub``, ``Add``, ``Split``, ``Concat``, no complex numbers and no
  custom node.
- ``attention_in_groups(q, k, v, logit_scale, cosine)``: in float32 (float64), cosine
  attention ``q / max(ReduceL2(q), 1e-12)`` (the same for k), logits
  ``MatMul(q, Transpose(k)) * Exp(Min(logit_scale, 4.6052))``, ``Softmax(axis=-1)``,
  ``MatMul(v)``; the ablation ``cosine=False`` scales by ``hd^-0.5`` instead.
- ``downsampled_attention(...)``: the layer, composed from the above: a depthwise ``Conv``
  (``group = d``) plus the shortcut, ``polyphase_split``, ``MatMul``/``Add`` for ``to_qkv``,
  heads split with ``Reshape``/``Transpose``/``Split``, rope2d, the attention, heads merged,
  ``polyphase_merge`` and the 1x1 ``Conv`` of ``to_out``.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from ..ops.downsampled_attention import LOGIT_SCALE_MAX, NORMALIZE_EPS, _rope_tables
from ._build import cast, compute_type, const, ints, op, static


def _split(x, d: int, gh: int, gw: int):
    """(B, d, 2gh, 2gw) -> (B, 4, gh*gw, d)."""
    t = op.Reshape(x, ints([0, d, gh, 2, gw, 2]))  # (n, c, i, a, j, b)
    t = op.Transpose(t, perm=[0, 3, 5, 2, 4, 1])  # (n, a, b, i, j, c)
    return op.Reshape(t, ints([0, 4, gh * gw, d]))


def _merge(t, d: int, grid):
    """(B, 4, gh*gw, d) -> (B, d, 2gh, 2gw)."""
    gh, gw = (int(g) for g in grid)
    u = op.Reshape(t, ints([0, 2, 2, gh, gw, d]))  # (n, a, b, i, j, c)
    u = op.Transpose(u, perm=[0, 5, 3, 1, 4, 2])  # (n, c, i, a, j, b)
    return op.Reshape(u, ints([0, d, 2 * gh, 2 * gw]))


def _rope(x, grid, rank: int, hd: int, dtype: ir.DataType):
    """RoPE2D of x (..., n, hd) of ``rank`` and ``dtype``, n row-major on ``grid``."""
    ct = compute_type(dtype)
    torch_ct = torch.float64 if ct == ir.DataType.DOUBLE else torch.float32
    cos, sin = _rope_tables(hd, [int(g) for g in grid], torch_ct, torch.device("cpu"))
    cos = const(cos.numpy()[:, :, None], ct)  # (n, hd/2, 1)
    sin = const(sin.numpy()[:, :, None], ct)
    pairs = op.Reshape(cast(x, dtype, ct), ints([0] * (rank - 1) + [hd // 2, 2]))
    a, b = op.Split(pairs, axis=-1, num_outputs=2)  # (..., n, hd/2, 1) each
    turned = op.Concat(
        op.Sub(op.Mul(a, cos), op.Mul(b, sin)), op.Add(op.Mul(a, sin), op.Mul(b, cos)), axis=-1
    )
    return cast(op.Reshape(turned, ints([0] * (rank - 1) + [hd])), ct, dtype)


def _normalize(u, ct: ir.DataType):
    norm = op.ReduceL2(u, ints([-1]), keepdims=1)
    return op.Div(u, op.Max(norm, const(NORMALIZE_EPS, ct)))


def _attention(q, k, v, logit_scale, cosine: bool, rank: int, hd: int, dtype: ir.DataType,
               scale_dtype: ir.DataType):  # fmt: skip
    """Attention over the last two axes of q, k, v (..., n, hd) of ``rank`` and ``dtype``."""
    ct = compute_type(dtype)
    q, k, v = cast(q, dtype, ct), cast(k, dtype, ct), cast(v, dtype, ct)
    if cosine:
        q, k = _normalize(q, ct), _normalize(k, ct)
        limit = const(LOGIT_SCALE_MAX, ct)
        scale = op.Exp(op.Min(cast(logit_scale, scale_dtype, ct), limit))  # (heads, 1, 1)
    else:
        scale = const(hd**-0.5, ct)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    logits = op.Mul(op.MatMul(q, op.Transpose(k, perm=perm)), scale)
    return cast(op.MatMul(op.Softmax(logits, axis=-1), v), ct, dtype)


def _image_sizes(x) -> tuple[int, int, int]:
    d = static(x, 1, "the channels of the image")
    gh = static(x, 2, "the image height") // 2
    gw = static(x, 3, "the image width") // 2
    return d, gh, gw


def polyphase_split(x, backend: str):
    return _split(x, *_image_sizes(x))


def polyphase_merge(t, grid: list[int], channels_last: bool, backend: str):
    return _merge(t, static(t, 3, "the channels of the tokens"), grid)


def rope2d(x, grid: list[int], backend: str):
    return _rope(x, grid, len(x.shape), static(x, -1, "the head dim"), x.dtype)


def attention_in_groups(q, k, v, logit_scale, cosine: bool, backend: str):
    hd = static(q, -1, "the head dim")
    return _attention(
        q, k, v, logit_scale, bool(cosine), len(q.shape), hd, q.dtype, logit_scale.dtype
    )


def downsampled_attention(
    x,
    dw_weight,
    dw_bias,
    qkv_weight,
    qkv_bias,
    logit_scale,
    out_weight,
    out_bias,
    num_heads: int,
    rope: bool,
    cosine: bool,
    shortcut: bool,
    rope_table=None,  # the cached table equals the constants _rope builds: not read
    backend: str = "auto",
):
    d, gh, gw = _image_sizes(x)
    n, heads, dtype = gh * gw, int(num_heads), x.dtype
    hd = d // heads
    ksize = static(dw_weight, 3, "the depthwise kernel")
    pad = ksize // 2
    y = op.Conv(x, dw_weight, dw_bias, group=d, kernel_shape=[ksize, ksize], pads=[pad] * 4)
    if shortcut:
        y = op.Add(y, x)
    qkv = op.Add(op.MatMul(_split(y, d, gh, gw), op.Transpose(qkv_weight, perm=[1, 0])), qkv_bias)
    qkv = op.Reshape(qkv, ints([0, 4, n, 3, heads, hd]))  # (B, 4, n, 3, heads, hd)
    qkv = op.Transpose(qkv, perm=[3, 0, 1, 4, 2, 5])  # (3, B, 4, heads, n, hd)
    q, k, v = (op.Squeeze(u, ints([0])) for u in op.Split(qkv, axis=0, num_outputs=3))
    if rope:
        q, k = _rope(q, (gh, gw), 5, hd, dtype), _rope(k, (gh, gw), 5, hd, dtype)
    o = _attention(q, k, v, logit_scale, bool(cosine), 5, hd, dtype, logit_scale.dtype)
    o = op.Reshape(op.Transpose(o, perm=[0, 1, 3, 2, 4]), ints([0, 4, n, d]))  # (B, 4, n, d)
    return op.Conv(_merge(o, d, (gh, gw)), out_weight, out_bias, kernel_shape=[1, 1])


# op name (torch.ops.fastdit.<name>) -> translation
TRANSLATIONS = {
    "polyphase_split": polyphase_split,
    "polyphase_merge": polyphase_merge,
    "rope2d": rope2d,
    "attention_in_groups": attention_in_groups,
    "downsampled_attention": downsampled_attention,
}
