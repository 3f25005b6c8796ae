"""ONNX translations of the patchify family (``fastdit/ops/patchify.py``).

Every op is a permutation of values, a convolution or a matrix product, so each lowers to
``Reshape``/``Transpose`` around ``Conv`` or ``MatMul``:

- ``patchify(x, p, order)``: ``Reshape(x, (B, C, h, p, w, p))``, ``Transpose`` to
  ``(B, h, w, C, p, p)`` ("cpq") or ``(B, h, w, p, p, C)`` ("pqc"), ``Reshape`` to
  ``(B, N, C*p*p)``;
- ``unpatchify(tokens, p, (h, w), order)``: the inverse chain;
- ``patch_embed(x, weight, bias, pos_embed)``: ``Conv(strides=p)``, ``Reshape`` to
  ``(B, D, N)``, ``Transpose`` to ``(B, N, D)``, ``Add(pos_embed)``;
- ``final_layer(x, shift, scale, weight, bias, p, (h, w), eps)``: the adaln family's
  modulated LayerNormalization, ``MatMul(Transpose(weight)) + bias`` (the transposed weight is
  folded into a constant by the exporter's optimiser), then ``unpatchify`` with order "pqc".

Reshapes keep the batch with a 0 (copy) entry, so the graph takes any batch size.
"""

from __future__ import annotations

from ._build import ints, op, static
from .adaln import modulate


def _patchify(x, p: int, order: str):
    C = static(x, 1, "the channels of the image")
    h = static(x, 2, "the image height") // p
    w = static(x, 3, "the image width") // p
    t = op.Reshape(x, ints([0, C, h, p, w, p]))  # (n, c, i, a, j, b)
    perm = [0, 2, 4, 1, 3, 5] if order == "cpq" else [0, 2, 4, 3, 5, 1]
    return op.Reshape(op.Transpose(t, perm=perm), ints([0, h * w, C * p * p]))


def _unpatchify(tokens, p: int, grid, order: str, C: int):
    h, w = (int(g) for g in grid)
    if order == "cpq":
        t = op.Transpose(op.Reshape(tokens, ints([0, h, w, C, p, p])), perm=[0, 3, 1, 4, 2, 5])
    else:
        t = op.Transpose(op.Reshape(tokens, ints([0, h, w, p, p, C])), perm=[0, 5, 1, 3, 2, 4])
    return op.Reshape(t, ints([0, C, h * p, w * p]))  # t: (n, c, i, a, j, b)


def _linear(x, weight, bias):
    return op.Add(op.MatMul(x, op.Transpose(weight, perm=[1, 0])), bias)


def patchify(x, patch_size: int, order: str, backend: str):
    return _patchify(x, int(patch_size), order)


def unpatchify(tokens, patch_size: int, grid: list[int], order: str, backend: str):
    p = int(patch_size)
    return _unpatchify(tokens, p, grid, order, static(tokens, 2, "the token width") // (p * p))


def patch_embed(x, weight, bias, pos_embed, backend: str):
    D = static(weight, 0, "the embedding width")
    p = static(weight, 3, "the patch size")
    y = op.Conv(x, weight, bias, kernel_shape=[p, p], strides=[p, p])  # (B, D, h, w)
    tokens = op.Transpose(op.Reshape(y, ints([0, D, -1])), perm=[0, 2, 1])
    return op.Add(tokens, pos_embed)


def final_layer(
    x, shift, scale, weight, bias, patch_size: int, grid: list[int], eps: float, backend: str
):
    p = int(patch_size)
    D = static(x, 2, "the token width D")
    C = static(weight, 0, "the outputs of the final Linear") // (p * p)
    y = _linear(modulate(x, shift, scale, eps, 3, D, x.dtype), weight, bias)  # (B, N, p*p*C)
    return _unpatchify(y, p, grid, "pqc", C)


# op name (torch.ops.fastdit.<name>) -> translation
TRANSLATIONS = {
    "patchify": patchify,
    "unpatchify": unpatchify,
    "patch_embed": patch_embed,
    "final_layer": final_layer,
}
