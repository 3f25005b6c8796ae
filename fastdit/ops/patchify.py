"""patchify: the moves between DiT's latent image and its tokens, and the layers around them.

Shapes: an image is ``(B, C, H, W)``; with patch size ``p`` (H and W multiples of p) it has a
grid of ``h x w = (H/p) x (W/p)`` patches and ``N = h * w`` tokens, numbered row-major over the
grid: token ``n = i * w + j`` is the patch at grid row ``i``, column ``j``, which covers pixels
``(i*p + a, j*p + b)`` for ``a, b in 0..p-1`` (``a``: row in the patch, ``b``: column in it).

A token holds the patch's ``C * p * p`` values in one of two orders:

- ``"cpq"``: index ``(c * p + a) * p + b``, the flattening order of a ``Conv2d(C, D, p,
  stride=p)`` weight ``(D, C, p, p)``; so ``patchify(x, p) @ w.reshape(D, -1).T + bias`` is that
  convolution, flattened to tokens;
- ``"pqc"``: index ``(a * p + b) * C + c``, the order of DiT's final Linear (its unpatchify
  reads tokens as ``(B, h, w, p, p, C)`` and lays them out with the einsum
  ``nhwpqc->nchpwq``).

Ops:

- ``patchify(x, p, order)``: ``(B, C, H, W) -> (B, N, C*p*p)``,
  ``out[n, i*w + j, token index of (c, a, b)] = x[n, c, i*p + a, j*p + b]``.
- ``unpatchify(tokens, p, (h, w), order)``: ``(B, N, p*p*C) -> (B, C, h*p, w*p)``, the inverse
  of patchify with the same order (exact: only a permutation of the values).
- ``patch_embed(x, weight, bias, pos_embed)``: DiT's input embedding,
  ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed`` with weight
  ``(D, C, p, p)``, bias ``(D,)``, pos_embed ``(1, N, D)`` or ``(N, D)``; returns ``(B, N, D)``.
- ``final_layer(x, shift, scale, weight, bias, p, (h, w), eps)``: DiT's FinalLayer after its
  adaLN Linear, ``unpatchify(Linear(LayerNorm(x) * (1 + scale) + shift), p, (h, w), "pqc")``
  with x ``(B, N, D)``, shift and scale ``(B, D)``, weight ``(p*p*C, D)``, bias ``(p*p*C,)``;
  LayerNorm has no affine weights and uses the biased variance (the adaln family's
  ``adaln_modulate``). Returns ``(B, C, h*p, w*p)``.

Outputs are fresh contiguous tensors in the input's dtype; inputs may be non-contiguous or
channels-last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _checks
from ._op import Op, lazy
from .adaln import reference_modulate

FAMILY = "patchify"
ORDERS = ("cpq", "pqc")


# ----------------------------------------------------------------------------------------------
# The reference


def reference_patchify(x: torch.Tensor, patch_size: int, order: str) -> torch.Tensor:
    p = patch_size
    B, C, H, W = x.shape
    h, w = H // p, W // p
    t = x.reshape(B, C, h, p, w, p)  # (n, c, i, a, j, b)
    if order == "cpq":
        t = t.permute(0, 2, 4, 1, 3, 5)  # (n, i, j, c, a, b)
    else:
        t = t.permute(0, 2, 4, 3, 5, 1)  # (n, i, j, a, b, c)
    return t.clone(memory_format=torch.contiguous_format).view(B, h * w, C * p * p)


def reference_unpatchify(
    tokens: torch.Tensor, patch_size: int, grid: Sequence[int], order: str
) -> torch.Tensor:
    p = patch_size
    h, w = grid
    B, _, K = tokens.shape
    C = K // (p * p)
    if order == "cpq":
        t = tokens.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)
    else:
        t = tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    # t: (n, c, i, a, j, b)
    return t.clone(memory_format=torch.contiguous_format).view(B, C, h * p, w * p)


def reference_patch_embed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    p = weight.shape[-1]
    y = F.conv2d(x, weight, bias, stride=p)  # (B, D, h, w)
    return (y.flatten(2).transpose(1, 2) + pos_embed).contiguous()


def reference_final_layer(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size: int,
    grid: Sequence[int],
    eps: float,
) -> torch.Tensor:
    y = F.linear(reference_modulate(x, shift, scale, eps), weight, bias)  # (B, N, p*p*C)
    return reference_unpatchify(y, patch_size, grid, "pqc")


_patchify = Op(
    FAMILY,
    "patchify",
    "Tensor x, int patch_size, str order",
    outputs=1,
    reference=reference_patchify,
    differentiable=("x",),
)
_unpatchify = Op(
    FAMILY,
    "unpatchify",
    "Tensor tokens, int patch_size, SymInt[] grid, str order",
    outputs=1,
    reference=reference_unpatchify,
    differentiable=("tokens",),
)
_patch_embed = Op(
    FAMILY,
    "patch_embed",
    "Tensor x, Tensor weight, Tensor bias, Tensor pos_embed",
    outputs=1,
    reference=reference_patch_embed,
    differentiable=("x", "weight", "bias", "pos_embed"),
)
_final_layer = Op(
    FAMILY,
    "final_layer",
    "Tensor x, Tensor shift, Tensor scale, Tensor weight, Tensor bias, int patch_size, "
    "SymInt[] grid, float eps",
    outputs=1,
    reference=reference_final_layer,
    differentiable=("x", "shift", "scale", "weight", "bias"),
)
OPS = (_patchify, _unpatchify, _patch_embed, _final_layer)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _order(op: str, order: object) -> str:
    if order not in ORDERS:
        raise ValueError(
            f"fastdit.{op}: order must be 'cpq' (channel, row, column in the patch: a Conv2d "
            f"weight's order) or 'pqc' (row, column, channel: DiT's final layer), got {order!r}"
        )
    return order  # type: ignore[return-value]


def _grid(op: str, grid: object, n: int) -> list[int]:
    """(h, w) with h * w == n; None means a square grid."""
    if grid is None:
        # Not math.isqrt: n may be a SymInt under torch.compile. sqrt of a square is exact.
        side = torch.sym_int(torch.sym_sqrt(n))
        if side * side != n:
            raise ValueError(
                f"fastdit.{op}: {n} tokens do not form a square grid; pass grid=(h, w) "
                "with h * w == N"
            )
        return [side, side]
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 2
        or not all(isinstance(g, (int, torch.SymInt)) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"fastdit.{op}: grid must be a pair of ints (h, w), got {grid!r}")
    h, w = grid
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(
            f"fastdit.{op}: grid {(h, w)} must be positive with h * w == N, the number of "
            f"tokens ({n})"
        )
    return [h, w]


def _image(op: str, x: torch.Tensor, p: int) -> None:
    """x is a non-empty (B, C, H, W) image with H and W multiples of p."""
    _checks.tensor(op, "x", x, ndim=4)
    _checks.nonempty(op, "x", x)
    H, W = x.shape[-2:]
    if H % p or W % p:
        raise ValueError(
            f"fastdit.{op}: the height and width of x (B, C, H, W) = {tuple(x.shape)} must be "
            f"multiples of the patch size {p}"
        )


# ----------------------------------------------------------------------------------------------
# The public functions


def patchify(
    x: torch.Tensor, patch_size: int, *, order: str = "cpq", backend: str | None = None
) -> torch.Tensor:
    """Cut an image into patch tokens.

    x: (B, C, H, W), any memory layout, H and W multiples of ``patch_size`` p.
    Returns (B, N, C*p*p), N = (H/p) * (W/p), tokens row-major over the patch grid. Within a
    token the values are ordered (channel, row, column) for ``order="cpq"`` (a Conv2d
    weight's order) or (row, column, channel) for ``order="pqc"``.
    """
    p = _checks.count("patchify", "patch_size", patch_size)
    order = _order("patchify", order)
    _image("patchify", x, p)
    return _patchify(x, p, order, backend=backend)


def unpatchify(
    tokens: torch.Tensor,
    patch_size: int,
    grid: Sequence[int] | None = None,
    *,
    order: str = "pqc",
    backend: str | None = None,
) -> torch.Tensor:
    """Lay patch tokens back out as an image: the inverse of :func:`patchify`.

    tokens: (B, N, p*p*C); grid: (h, w) with h * w == N, default a square grid.
    Returns (B, C, h*p, w*p). ``order="pqc"`` (the default) is DiT's unpatchify: tokens read as
    (B, h, w, p, p, C), then the einsum ``nhwpqc->nchpwq``.
    """
    op = "unpatchify"
    p = _checks.count(op, "patch_size", patch_size)
    order = _order(op, order)
    _checks.tensor(op, "tokens", tokens, ndim=3)
    _checks.nonempty(op, "tokens", tokens)
    if tokens.shape[-1] % (p * p):
        raise ValueError(
            f"fastdit.{op}: the last dimension of tokens (B, N, p*p*C) = {tuple(tokens.shape)} "
            f"must be a multiple of patch_size**2 = {p * p}"
        )
    hw = _grid(op, grid, tokens.shape[1])
    return _unpatchify(tokens, p, hw, order, backend=backend)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """DiT's input embedding: a stride-p patch convolution to tokens, plus positions.

    x: (B, C, H, W), any memory layout; weight: (D, C, p, p), the Conv2d weight (square
    kernel, stride p = its size, H and W multiples of p); bias: (D,); pos_embed: (1, N, D) or
    (N, D), N = (H/p) * (W/p). Returns (B, N, D) =
    ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed``.
    """
    op = "patch_embed"
    _checks.tensor(op, "x", x, ndim=4)
    _checks.tensor(op, "weight", weight, ndim=4, like=x)
    D, C, p = weight.shape[0], x.shape[1], weight.shape[-1]
    if weight.shape[1] != C or weight.shape[2] != p or p < 1 or D < 1:
        raise ValueError(
            f"fastdit.{op}: weight must have shape (D, C, p, p) (the Conv2d weight: D outputs, "
            f"C = {C} input channels of x, a square p x p kernel), got {tuple(weight.shape)}"
        )
    _image(op, x, p)
    n = (x.shape[2] // p) * (x.shape[3] // p)
    _checks.tensor(op, "bias", bias, ndim=1, like=x)
    _checks.shape(op, "bias", bias, (D,), "one per output channel of weight (D, C, p, p)")
    _checks.tensor(op, "pos_embed", pos_embed, ndim=(2, 3), like=x)
    expected = (1, n, D) if pos_embed.dim() == 3 else (n, D)
    _checks.shape(
        op, "pos_embed", pos_embed, expected, f"one D-vector per token of the {n}-patch grid"
    )
    return _patch_embed(x, weight, bias, pos_embed, backend=backend)


def final_layer(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size: int,
    grid: Sequence[int] | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """DiT's FinalLayer after its adaLN Linear: norm, modulate, Linear, unpatchify.

    x: (B, N, D) tokens; shift, scale: (B, D); weight: (p*p*C, D) and bias: (p*p*C,), the
    ``final_layer.linear`` Linear; grid: (h, w) with h * w == N, default square.
    Returns ``unpatchify(Linear(LayerNorm(x) * (1 + scale) + shift), p, grid, order="pqc")``,
    shape (B, C, h*p, w*p); LayerNorm without affine weights, biased variance, eps as given.
    """
    op = "final_layer"
    p = _checks.count(op, "patch_size", patch_size)
    eps = _checks.positive(op, "eps", eps)
    _checks.tensor(op, "x", x, ndim=3)
    _checks.nonempty(op, "x", x)
    B, N, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        _checks.tensor(op, name, t, ndim=2, like=x)
        _checks.shape(op, name, t, (B, D), "one D-vector per sample of x (B, N, D)")
    _checks.tensor(op, "weight", weight, ndim=2, like=x)
    K = weight.shape[0]
    if weight.shape[1] != D or K == 0 or K % (p * p):
        raise ValueError(
            f"fastdit.{op}: weight must have shape (p*p*C, D) (the final Linear: D = {D} "
            f"channels of x in, p*p*C out, a positive multiple of patch_size**2 = {p * p}), "
            f"got {tuple(weight.shape)}"
        )
    _checks.tensor(op, "bias", bias, ndim=1, like=x)
    _checks.shape(op, "bias", bias, (K,), "one per output of weight (p*p*C, D)")
    hw = _grid(op, grid, N)
    return _final_layer(x, shift, scale, weight, bias, p, hw, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# Kernel backends
#
# triton (fastdit/triton/patchify.py): every op forward and backward, any input strides,
# float32 / float16 / bfloat16 (float64 is declined: auto serves it with torch).

_TRITON = "fastdit.triton.patchify"
for _op, _name in (
    (_patchify, "patchify"),
    (_unpatchify, "unpatchify"),
    (_patch_embed, "patch_embed"),
    (_final_layer, "final_layer"),
):
    _op.register(
        "triton",
        lazy(_TRITON, f"{_name}_forward"),
        backward=lazy(_TRITON, f"{_name}_backward"),
        supports=lazy(_TRITON, f"supports_{_name}"),
    )
