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
  of patchify with the same order (exact: only a permutation of the values). The default
  orders differ, each DiT's at its end of the network: ``"cpq"`` for patchify (the patch
  embedding's weight), ``"pqc"`` for unpatchify (the final layer's output); a round trip
  passes one order to both.
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

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import _autocast, _checks
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


def _image_contract(x: torch.Tensor, p: int) -> str:
    if p < 1 or x.dim() != 4 or x.shape[2] % p or x.shape[3] % p:
        return (
            f"x must be (B, C, H, W) with H and W multiples of patch_size = {p} >= 1, got shape "
            f"{tuple(x.shape)}"
        )
    return ""


def _tokens_contract(tokens: torch.Tensor, K: int, p: int, grid: Sequence[int]) -> str:
    if p < 1 or K % (p * p) or len(grid) != 2 or grid[0] * grid[1] != tokens.shape[1]:
        return (
            f"tokens (B, h * w, p * p * C) = {tuple(tokens.shape[:2])} + ({K},) do not match "
            f"patch_size = {p} and grid = {tuple(grid)}"
        )
    return ""


def _unpatchify_contract(tokens, patch_size, grid, order) -> str:
    if tokens.dim() != 3:
        return f"tokens must be (B, N, K), got shape {tuple(tokens.shape)}"
    return _tokens_contract(tokens, tokens.shape[2], patch_size, grid)


def _patch_embed_contract(x, weight, bias, pos_embed) -> str:
    if weight.dim() != 4 or x.dim() != 4:
        return "x must be (B, C, H, W) and weight (D, C, p, p)"
    D, p = weight.shape[0], weight.shape[-1]
    reason = _image_contract(x, p)
    if reason:
        return reason
    N = (x.shape[2] // p) * (x.shape[3] // p)
    return _checks.contract(
        ("x", x, None),
        ("weight", weight, (D, x.shape[1], p, p)),
        ("bias", bias, (D,)),
        ("pos_embed", pos_embed, (1, N, D) if pos_embed.dim() == 3 else (N, D)),
    )


def _final_layer_contract(x, shift, scale, weight, bias, patch_size, grid, eps) -> str:
    if x.dim() != 3 or weight.dim() != 2:
        return "x must be (B, N, D) and weight (p * p * C, D)"
    (B, _, D), K = x.shape, weight.shape[0]
    return _tokens_contract(x, K, patch_size, grid) or _checks.contract(
        ("x", x, None),
        ("shift", shift, (B, D)),
        ("scale", scale, (B, D)),
        ("weight", weight, (K, D)),
        ("bias", bias, (K,)),
    )


_patchify = Op(
    FAMILY,
    "patchify",
    "Tensor x, int patch_size, str order",
    outputs=1,
    reference=reference_patchify,
    differentiable=("x",),
    contract=lambda x, patch_size, order: _image_contract(x, patch_size),
)
_unpatchify = Op(
    FAMILY,
    "unpatchify",
    "Tensor tokens, int patch_size, SymInt[] grid, str order",
    outputs=1,
    reference=reference_unpatchify,
    differentiable=("tokens",),
    contract=_unpatchify_contract,
)
_patch_embed = Op(
    FAMILY,
    "patch_embed",
    "Tensor x, Tensor weight, Tensor bias, Tensor pos_embed",
    outputs=1,
    reference=reference_patch_embed,
    differentiable=("x", "weight", "bias", "pos_embed"),
    contract=_patch_embed_contract,
)
_final_layer = Op(
    FAMILY,
    "final_layer",
    "Tensor x, Tensor shift, Tensor scale, Tensor weight, Tensor bias, int patch_size, "
    "SymInt[] grid, float eps",
    outputs=1,
    reference=reference_final_layer,
    differentiable=("x", "shift", "scale", "weight", "bias"),
    contract=_final_layer_contract,
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
    token the values are ordered (channel, row, column) for ``order="cpq"`` (the default: a
    Conv2d weight's order) or (row, column, channel) for ``order="pqc"`` (the default of
    :func:`unpatchify`, DiT's output order: pass the same order to both for a round trip).
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
    """Lay patch tokens back out as an image: the inverse of :func:`patchify` called with the
    same ``order``.

    tokens: (B, N, p*p*C); grid: (h, w) with h * w == N, default a square grid.
    Returns (B, C, h*p, w*p). ``order="pqc"`` (the default) is DiT's unpatchify: tokens read as
    (B, h, w, p, p, C), then the einsum ``nhwpqc->nchpwq``. Note that :func:`patchify`'s default
    is ``"cpq"`` (DiT's patch embedding): ``unpatchify(patchify(x, p), p)`` permutes the values
    of a multi-channel x; ``unpatchify(patchify(x, p, order=o), p, order=o)`` returns x.
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
    ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed``. Under
    ``torch.autocast`` the inputs are first cast to the widest dtype among them.
    """
    x, weight, bias, pos_embed = _autocast.promote(x, weight, bias, pos_embed)
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
    Under ``torch.autocast`` the inputs are first cast to the widest dtype among them.
    """
    x, shift, scale, weight, bias = _autocast.promote(x, shift, scale, weight, bias)
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
#
# cuda (csrc/patchify.cu through fastdit._C), below.

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


# ----------------------------------------------------------------------------------------------
# The cuda backend: csrc/patchify.cu through fastdit._C. What each kernel serves, and what it
# declines (``auto`` then takes triton):
#
# - patchify / unpatchify, forward and backward (each is the other's backward): any strides on
#   both sides (channels-last and strided views included; the backward writes the gradient in the
#   input's own layout), C * p * p <= 8192 (a token is staged in shared memory).
# - patch_embed, forward and backward: x with any strides; weight, bias and pos_embed are made
#   contiguous here (small); D <= 2**20, C * p * p <= 2**16. The backward reduces dweight, dbias
#   and dpos without atomics: float32 partial sums from the kernel, added here over the partial
#   index by torch (a fixed order, so the result is deterministic).
# - final_layer, forward and backward: x must be contiguous (B, N, D) (strided x is declined: it
#   is a big activation, triton reads it by strides); dout any strides; D <= 8192 and
#   p * p * C <= 512 (rows of dy and a 4-row slab of the gradient live in shared memory), and
#   D <= 2048 unless D % 4 == 0 with 4-element aligned tensors. The forward reads the Linear
#   weight transposed, (D, p*p*C), which is made here (a small copy per call).
#
# All three dtypes (float32, float16, bfloat16); float64 goes to torch.

ORDER_CODES = {"cpq": 0, "pqc": 1}

CUDA_PATCHIFY_MAX_K = 8192  # fastdit._C.PATCHIFY_MAX_K
CUDA_PATCH_EMBED_MAX_D = 1 << 20  # fastdit._C.PATCH_EMBED_MAX_D
CUDA_PATCH_EMBED_MAX_K = 1 << 16  # fastdit._C.PATCH_EMBED_MAX_K
CUDA_FINAL_LAYER_MAX_D = 8192  # fastdit._C.FINAL_LAYER_MAX_D
CUDA_FINAL_LAYER_MAX_K = 512  # fastdit._C.FINAL_LAYER_MAX_K
CUDA_FINAL_LAYER_MAX_SCALAR_D = 2048  # fastdit._C.FINAL_LAYER_BWD_MAX_SCALAR_D
_MAX_ROWS = 2**31  # the kernels count the B * N tokens with 32-bit integers


# ----------------------------------------------------------------------------------------------
# What the cuda kernels serve


def _cuda_dtype_reason(t: torch.Tensor) -> str:
    from .. import _ext

    if t.dtype not in _ext.DTYPE_CODES:
        return f"the cuda kernels take float32, float16 or bfloat16, got {t.dtype}"
    return ""


def _cuda_rows_reason(batch: int, tokens: int, height: int, width: int) -> str:
    """The extension's 32-bit counts: tokens in all, and the image's height and width."""
    if batch * tokens >= _MAX_ROWS:
        return f"the cuda kernels take fewer than 2**31 tokens in all, got {batch} x {tokens}"
    if max(height, width) >= _MAX_ROWS:
        return f"the cuda kernels take images under 2**31 pixels a side, got {height} x {width}"
    return ""


def _cuda_supports_patchify(x: torch.Tensor, patch_size: int, order: str) -> str:
    B, C, H, W = x.shape
    K = C * patch_size * patch_size
    if K > CUDA_PATCHIFY_MAX_K:
        return (
            "the cuda kernel stages whole tokens in shared memory and takes C * patch_size**2 "
            f"<= {CUDA_PATCHIFY_MAX_K}, got {K}"
        )
    tokens = (H // patch_size) * (W // patch_size)
    return _cuda_dtype_reason(x) or _cuda_rows_reason(B, tokens, H, W)


def _cuda_supports_unpatchify(
    tokens: torch.Tensor, patch_size: int, grid: list[int], order: str
) -> str:
    B, N, K = tokens.shape
    if K > CUDA_PATCHIFY_MAX_K:
        return (
            "the cuda kernel stages whole tokens in shared memory and takes C * patch_size**2 "
            f"<= {CUDA_PATCHIFY_MAX_K}, got {K}"
        )
    H, W = grid[0] * patch_size, grid[1] * patch_size
    return _cuda_dtype_reason(tokens) or _cuda_rows_reason(B, N, H, W)


def _cuda_supports_patch_embed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> str:
    B, _, H, W = x.shape
    D, C, p, _ = weight.shape
    if D > CUDA_PATCH_EMBED_MAX_D:
        return f"the cuda kernel takes D <= {CUDA_PATCH_EMBED_MAX_D}, got {D}"
    if C * p * p > CUDA_PATCH_EMBED_MAX_K:
        return f"the cuda kernel takes C * p * p <= {CUDA_PATCH_EMBED_MAX_K}, got {C * p * p}"
    return _cuda_dtype_reason(x) or _cuda_rows_reason(B, (H // p) * (W // p), H, W)


def _cuda_supports_final_layer(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size: int,
    grid: list[int],
    eps: float,
) -> str:
    reason = _cuda_dtype_reason(x)
    if reason:
        return reason
    B, N, D = x.shape
    K = weight.shape[0]
    if not x.is_contiguous():
        return (
            "the cuda kernel reads x as contiguous (B, N, D) rows (x is strided): strided "
            "tokens go to the triton kernel"
        )
    if D > CUDA_FINAL_LAYER_MAX_D:
        return (
            "the cuda kernel keeps 4 rows of the gradient in shared memory and takes "
            f"D <= {CUDA_FINAL_LAYER_MAX_D}, got {D}"
        )
    if K > CUDA_FINAL_LAYER_MAX_K:
        return (
            "the cuda kernel keeps rows of the output gradient in shared memory and takes "
            f"p * p * C <= {CUDA_FINAL_LAYER_MAX_K}, got {K}"
        )
    if D > CUDA_FINAL_LAYER_MAX_SCALAR_D and (D % 4 or x.data_ptr() % (4 * x.element_size())):
        return (
            f"the cuda backward takes D > {CUDA_FINAL_LAYER_MAX_SCALAR_D} only with D % 4 == 0 "
            f"and 4-element aligned tensors (4 channels per access), got D = {D}"
        )
    return _cuda_rows_reason(B, N, grid[0] * patch_size, grid[1] * patch_size)


# ----------------------------------------------------------------------------------------------
# Forward and backward


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A small operand (weight, bias, pos_embed, shift, scale) contiguous and 16-byte aligned,
    so that the kernels' vector paths apply (a copy only when it is not already so)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _lib():
    from .. import _ext

    return _ext.require(), _ext


def _permute(
    lib,
    ext,
    entry: str,
    src: torch.Tensor,
    dst: torch.Tensor,
    image: torch.Tensor,
    p: int,
    order: str,
) -> None:
    """dst = patchify(src) (entry "patchify": src an image) or unpatchify(src) ("unpatchify":
    src tokens), strides on both sides; ``image`` is whichever side gives the sizes."""
    B, C, H, W = image.shape
    getattr(lib, entry)(
        src.data_ptr(), src.stride(), dst.data_ptr(), dst.stride(), B, C, H, W, p,
        ORDER_CODES[order], ext.dtype_code(src), src.device.index, ext.stream_of(src),
    )  # fmt: skip


def _cuda_patchify(x: torch.Tensor, patch_size: int, order: str) -> torch.Tensor:
    lib, ext = _lib()
    B, C, H, W = x.shape
    p = patch_size
    out = torch.empty(B, (H // p) * (W // p), C * p * p, dtype=x.dtype, device=x.device)
    _permute(lib, ext, "patchify", x, out, x, p, order)
    return out


def _cuda_patchify_backward(grads, inputs) -> list[torch.Tensor]:
    lib, ext = _lib()
    x, p, order = inputs
    dx = torch.empty_like(x)  # x's layout (channels-last stays so)
    _permute(lib, ext, "unpatchify", grads[0], dx, x, p, order)
    return [dx]


def _cuda_unpatchify(
    tokens: torch.Tensor, patch_size: int, grid: list[int], order: str
) -> torch.Tensor:
    lib, ext = _lib()
    B, _, K = tokens.shape
    p = patch_size
    h, w = (int(g) for g in grid)
    out = torch.empty(B, K // (p * p), h * p, w * p, dtype=tokens.dtype, device=tokens.device)
    _permute(lib, ext, "unpatchify", tokens, out, out, p, order)
    return out


def _cuda_unpatchify_backward(grads, inputs) -> list[torch.Tensor]:
    lib, ext = _lib()
    tokens, p, grid, order = inputs
    dout = grads[0]
    dtokens = torch.empty_like(tokens)
    _permute(lib, ext, "patchify", dout, dtokens, dout, p, order)
    return [dtokens]


def _cuda_patch_embed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    lib, ext = _lib()
    B, C, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    N = (H // p) * (W // p)
    w, b, pos = _dense(weight), _dense(bias), _dense(pos_embed.reshape(N, D))
    out = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    lib.patch_embed_fwd(
        x.data_ptr(), x.stride(), w.data_ptr(), b.data_ptr(), pos.data_ptr(), out.data_ptr(),
        B, C, H, W, p, D, ext.dtype_code(x), x.device.index, ext.stream_of(x),
    )  # fmt: skip
    return out


@functools.lru_cache(maxsize=256)
def _cuda_patch_embed_plan(
    B: int, C: int, H: int, W: int, p: int, D: int, dtype: int, index: int
) -> tuple[int, int]:
    """(samples splits, dweight partials) of the backward: fastdit._C sizes about two waves of
    resident blocks from the kernel's occupancy on this GPU."""
    lib, _ = _lib()
    return tuple(lib.patch_embed_bwd_plan(B, C, H, W, p, D, dtype, index))


def _cuda_patch_embed_backward(grads, inputs) -> list[torch.Tensor]:
    lib, ext = _lib()
    x, weight, bias, pos_embed = inputs
    B, C, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    N, K = (H // p) * (W // p), C * p * p
    code, dev = ext.dtype_code(x), x.device
    splits, partials = _cuda_patch_embed_plan(B, C, H, W, p, D, code, dev.index)
    dout, w = grads[0].contiguous(), _dense(weight)
    dx = torch.empty_like(x)  # x's layout
    dweight_partial = torch.empty(partials, D, K, dtype=torch.float32, device=dev)
    dpos_partial = torch.empty(splits, N, D, dtype=torch.float32, device=dev)
    lib.patch_embed_bwd(
        x.data_ptr(), x.stride(), w.data_ptr(), dout.data_ptr(), dx.data_ptr(), dx.stride(),
        dweight_partial.data_ptr(), dpos_partial.data_ptr(), B, C, H, W, p, D, splits,
        code, dev.index, ext.stream_of(x),
    )  # fmt: skip
    # Fixed-order float32 sums over the partials (deterministic), rounded once to the dtype.
    dpos32 = dpos_partial.sum(0)
    dweight = dweight_partial.sum(0).to(x.dtype).view(D, C, p, p)
    dbias = dpos32.sum(0).to(x.dtype)
    dpos = dpos32.to(x.dtype).view(pos_embed.shape)
    return [dx, dweight, dbias, dpos]


def _cuda_final_layer(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size: int,
    grid: list[int],
    eps: float,
) -> torch.Tensor:
    lib, ext = _lib()
    B, N, D = x.shape
    K, p = weight.shape[0], patch_size
    C = K // (p * p)
    h, w = (int(g) for g in grid)
    sh, sc, b = _dense(shift), _dense(scale), _dense(bias)
    weight_t = weight.t().contiguous()  # (D, p*p*C): what the forward kernel reads
    out = torch.empty(B, C, h * p, w * p, dtype=x.dtype, device=x.device)
    lib.final_layer_fwd(
        x.data_ptr(), sh.data_ptr(), sc.data_ptr(), weight_t.data_ptr(), b.data_ptr(),
        out.data_ptr(), out.stride(), B, C, h, w, p, D, eps,
        ext.dtype_code(x), x.device.index, ext.stream_of(x),
    )  # fmt: skip
    return out


@functools.lru_cache(maxsize=256)
def _cuda_final_layer_plan(
    B: int, C: int, h: int, w: int, p: int, D: int, dtype: int, index: int
) -> tuple[int, int, int]:
    """(row splits, weight splits, dweight partials) of the backward on this GPU."""
    lib, _ = _lib()
    return tuple(lib.final_layer_bwd_plan(B, C, h, w, p, D, dtype, index))


def _cuda_final_layer_backward(grads, inputs) -> list[torch.Tensor]:
    lib, ext = _lib()
    x, shift, scale, weight, bias, p, grid, eps = inputs
    B, N, D = x.shape
    K = weight.shape[0]
    C = K // (p * p)
    h, w = (int(g) for g in grid)
    code, dev = ext.dtype_code(x), x.device
    row_splits, weight_splits, partials = _cuda_final_layer_plan(B, C, h, w, p, D, code, dev.index)
    dout = grads[0]  # any strides
    sh, sc, wt = _dense(shift), _dense(scale), _dense(weight)
    dx = torch.empty_like(x)  # contiguous, as x
    f32 = dict(dtype=torch.float32, device=dev)
    stats = torch.empty(B * N, 2, **f32)  # per-token mean and 1 / std, for the second kernel
    dmod_partial = torch.empty(2, B, row_splits, D, **f32)
    dweight_partial = torch.empty(partials, D, K, **f32)  # transposed: (D, K) per partial
    dbias_partial = torch.empty(partials, K, **f32)
    lib.final_layer_bwd(
        x.data_ptr(), sh.data_ptr(), sc.data_ptr(), wt.data_ptr(), dout.data_ptr(),
        dout.stride(), dx.data_ptr(), stats.data_ptr(), dmod_partial.data_ptr(),
        dweight_partial.data_ptr(), dbias_partial.data_ptr(), B, C, h, w, p, D, eps,
        row_splits, weight_splits, code, dev.index, ext.stream_of(x),
    )  # fmt: skip
    # Fixed-order float32 sums over the splits and partials (deterministic), rounded once.
    dshift = dmod_partial[0].sum(1).to(x.dtype)
    dscale = dmod_partial[1].sum(1).to(x.dtype)
    dweight = dweight_partial.sum(0).t().to(x.dtype, memory_format=torch.contiguous_format)
    dbias = dbias_partial.sum(0).to(x.dtype)
    return [dx, dshift, dscale, dweight, dbias]


_patchify.register(
    "cuda", _cuda_patchify, backward=_cuda_patchify_backward, supports=_cuda_supports_patchify
)
_unpatchify.register(
    "cuda",
    _cuda_unpatchify,
    backward=_cuda_unpatchify_backward,
    supports=_cuda_supports_unpatchify,
)
_patch_embed.register(
    "cuda",
    _cuda_patch_embed,
    backward=_cuda_patch_embed_backward,
    supports=_cuda_supports_patch_embed,
)
_final_layer.register(
    "cuda",
    _cuda_final_layer,
    backward=_cuda_final_layer_backward,
    supports=_cuda_supports_final_layer,
)
