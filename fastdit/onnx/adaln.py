"""ONNX translations of the adaln family (``fastdit/ops/adaln.py``).

``adaln_modulate(x, shift, scale, eps)`` = ``LayerNorm(x) * (1 + scale) + shift``:

- tokens ``(B, L, D)``: ``LayerNormalization(axis=-1)`` with a unit Scale, then ``Mul``/``Add``
  with ``scale``/``shift`` unsqueezed to ``(B, 1, D)``;
- images ``(B, D, H, W)``: the same on ``Transpose(x, [0, 2, 3, 1])`` (channels last, so the
  norm runs over the last axis), transposed back. ONNX tensors have no memory format: a
  channels-last input needs nothing else.

``gated_adaln(x, y, gate, shift, scale, eps)`` = ``(r, adaln_modulate(r, ...))`` with
``r = x + gate * y``: ``Mul``, ``Add``, then the above.

LayerNormalization keeps its statistics in float32 for float16 inputs (``stash_type=1``), as
fastdit's kernels do.
"""

from __future__ import annotations

import onnx_ir as ir

from ._build import const, layer_norm_last, op, static, unsqueeze


def modulate(x, shift, scale, eps: float, rank: int, dim: int, dtype: ir.DataType):
    """``LayerNorm(x) * (1 + scale) + shift`` for x of ``rank`` 3 (B, L, D) or 4 (B, D, H, W),
    ``dim`` = D; shift, scale (B, D)."""
    axes = [1] if rank == 3 else [1, 2]  # (B, D) -> broadcast against (B, L, D) or (B, H, W, D)
    last = x if rank == 3 else op.Transpose(x, perm=[0, 2, 3, 1])
    h = layer_norm_last(last, dim, dtype, eps)
    one_plus = op.Add(unsqueeze(scale, axes), const(1.0, dtype))
    h = op.Add(op.Mul(h, one_plus), unsqueeze(shift, axes))
    return h if rank == 3 else op.Transpose(h, perm=[0, 3, 1, 2])


def _dim(x) -> tuple[int, int]:
    rank = len(x.shape)
    return rank, static(x, -1 if rank == 3 else 1, "the normalised dimension D")


def adaln_modulate(x, shift, scale, eps: float, backend: str):
    rank, dim = _dim(x)
    return modulate(x, shift, scale, eps, rank, dim, x.dtype)


def gated_adaln(x, y, gate, shift, scale, eps: float, backend: str):
    rank, dim = _dim(x)
    residual = op.Add(x, op.Mul(unsqueeze(gate, [1] if rank == 3 else [2, 3]), y))
    return residual, modulate(residual, shift, scale, eps, rank, dim, x.dtype)


# op name (torch.ops.fastdit.<name>) -> translation
TRANSLATIONS = {"adaln_modulate": adaln_modulate, "gated_adaln": gated_adaln}
