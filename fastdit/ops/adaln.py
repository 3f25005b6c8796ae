"""adaLN: the LayerNorm + modulation that opens every DiT and U-DiT sub-layer.

Two layouts, one per model family:

- tokens ``(B, L, D)`` (DiT): the norm runs over the last dimension;
- images ``(B, D, H, W)`` (U-DiT): the norm runs over the channel dimension, for every pixel;
  the tensor may be channels-first (contiguous) or channels-last in memory, and the outputs
  keep its memory format.

The conditioning tensors ``shift``, ``scale`` and ``gate`` are ``(B, D)``: one vector per sample,
broadcast over its tokens or pixels.

Dtypes: one for all inputs; under ``torch.autocast``, x takes the widest and the others keep
theirs (a float32 residual stream next to a bfloat16 branch and vectors, fastdit/ops/_autocast.py).
The results have x's dtype and equal those on every input cast to it first; the gradients have
their inputs' dtypes. The references make that cast; the kernels read each tensor in its dtype.

Ops:

- ``adaln_modulate(x, shift, scale, eps)`` = ``LayerNorm(x) * (1 + scale) + shift``, where
  LayerNorm has no affine weights and uses the biased variance:
  ``(x - mean) / sqrt(var + eps)`` with mean and var over D.
- ``gated_adaln(x, y, gate, shift, scale, eps)`` = ``(r, adaln_modulate(r, shift, scale, eps))``
  with ``r = x + gate * y``: the gated residual add that closes one sub-layer fused with the
  norm and modulation that open the next.

Backends (bottom of this file): ``cuda`` and ``triton`` run both ops forward and backward in one
pass over the rows each way (channels-first images in Triton: two passes over each tile of
tokens, the second expected from L2 where the tiles fit); the backward recomputes the row
statistics (and r) from the inputs and sums over tokens in a fixed order (deterministic).
``cuda`` takes tokens and channels-last images (D <= 8192) and contiguous channels-first images
(any D: tiles of 32 tokens, two passes, as the Triton kernels); float64 goes to ``torch``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _autocast, _checks
from ._op import Op, lazy

FAMILY = "adaln"


# ----------------------------------------------------------------------------------------------
# The reference


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B, D) conditioning tensor shaped to broadcast against x."""
    return t[:, None, :] if x.dim() == 3 else t[:, :, None, None]


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 3:
        return F.layer_norm(x, (x.shape[-1],), eps=eps)
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), eps=eps).movedim(-1, 1)


def reference_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    shift, scale = shift.to(x.dtype), scale.to(x.dtype)  # (a no-op but under autocast)
    out = _layer_norm(x, eps) * (1 + _per_sample(scale, x)) + _per_sample(shift, x)
    return _checks.same_layout(out, x)


def reference_gated(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, gate = y.to(x.dtype), gate.to(x.dtype)  # (a no-op but under autocast)
    residual = _checks.same_layout(x + _per_sample(gate, x) * y, x)
    return residual, reference_modulate(residual, shift, scale, eps)


def _contract(x: torch.Tensor, y: torch.Tensor | None, **conds: torch.Tensor) -> str:
    """The kernels' needs (Op's contract): y like x, each conditioning vector (B, D)."""
    if x.dim() not in (3, 4):
        return f"x must be (B, L, D) or (B, D, H, W), got shape {tuple(x.shape)}"
    B, D = x.shape[0], x.shape[-1] if x.dim() == 3 else x.shape[1]
    vectors = [(name, t, (B, D)) for name, t in conds.items()]
    return _checks.contract(("x", x, None), ("y", y, x.shape), *vectors)


_modulate = Op(
    FAMILY,
    "adaln_modulate",
    "Tensor x, Tensor shift, Tensor scale, float eps",
    outputs=1,
    reference=reference_modulate,
    differentiable=("x", "shift", "scale"),
    contract=lambda x, shift, scale, eps: _contract(x, None, shift=shift, scale=scale),
)
_gated = Op(
    FAMILY,
    "gated_adaln",
    "Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps",
    outputs=2,
    reference=reference_gated,
    differentiable=("x", "y", "gate", "shift", "scale"),
    contract=lambda x, y, gate, shift, scale, eps: _contract(
        x, y, gate=gate, shift=shift, scale=scale
    ),
)
OPS = (_modulate, _gated)


# ----------------------------------------------------------------------------------------------
# The public functions


def _check(op: str, x: torch.Tensor, conds: dict[str, torch.Tensor], same_dtype: bool) -> None:
    _checks.tensor(op, "x", x, ndim=(3, 4))
    batch, dim = x.shape[0], (x.shape[-1] if x.dim() == 3 else x.shape[1])
    if x.numel() == 0:
        raise ValueError(f"fastdit.{op}: x is empty, shape {tuple(x.shape)}")
    layout = "(B, L, D)" if x.dim() == 3 else "(B, D, H, W)"
    for name, t in conds.items():
        _checks.tensor(op, name, t, ndim=2, like=x, same_dtype=same_dtype)
        _checks.shape(op, name, t, (batch, dim), f"one D-vector per sample of x {layout}")


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``, LayerNorm without affine weights.

    x: (B, L, D) tokens, or (B, D, H, W) normalised over D (channels-first or channels-last
    memory); shift, scale: (B, D). Returns x's shape, dtype and memory format.
    Under ``torch.autocast`` the inputs may differ in dtype: x is cast to the widest dtype
    among them, the result's; shift and scale are read in their own dtypes, with the result of
    casting them to it first.
    """
    x, shift, scale = _autocast.promote_first(x, shift, scale)
    mixed = _autocast.autocast_dtype(x) is not None
    _check("adaln_modulate", x, {"shift": shift, "scale": scale}, same_dtype=not mixed)
    eps = _checks.positive("adaln_modulate", "eps", eps)
    return _modulate(x, shift, scale, eps, backend=backend)


def gated_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual add fused with the next norm and modulation.

    Returns ``(r, LayerNorm(r) * (1 + scale) + shift)`` with ``r = x + gate * y``.
    x, y: (B, L, D) or (B, D, H, W), the same shape; gate, shift, scale: (B, D). Under
    ``torch.autocast`` the inputs may differ in dtype: x is cast to the widest dtype among them,
    the results' (a float32 residual stream stays float32); y, gate, shift and scale are read in
    their own dtypes (a bfloat16 branch is not copied to float32), with the results of casting
    them to it first, and their gradients come in their dtypes.
    """
    x, y, gate, shift, scale = _autocast.promote_first(x, y, gate, shift, scale)
    mixed = _autocast.autocast_dtype(x) is not None
    _check("gated_adaln", x, {"gate": gate, "shift": shift, "scale": scale}, same_dtype=not mixed)
    _checks.tensor("gated_adaln", "y", y, like=x, same_dtype=not mixed)
    _checks.shape("gated_adaln", "y", y, x.shape, "the shape of x")
    eps = _checks.positive("gated_adaln", "eps", eps)
    return _gated(x, y, gate, shift, scale, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# Kernel backends
#
# triton (fastdit/triton/adaln.py): forward and backward of both ops, every layout the reference
# takes that reads as rows of D with one stride per dimension (tokens, channels-first and
# channels-last images, strided views), each tensor in its own dtype; D <= 16384 where x's
# channels are adjacent (whole rows in registers), any D for channels-first x (token tiles,
# channels in chunks); float64 is declined (auto: torch).
#
# cuda (csrc/adaln.cu through fastdit._C): forward and backward of both ops for contiguous
# (B, L, D) tokens and channels-last (B, D, H, W) images, D <= 8192 (the backward holds a row in
# registers), and contiguous channels-first images, any D (tiles of 32 tokens); contiguous
# (B, D) conditioning vectors; y and the vectors in x's dtype, or all float16 or all bfloat16
# next to float32 x (the kernels are built for those pairs). Other calls (strided tokens or
# images, rows in mixed memory formats, other dtype mixes) are declined with the reason, so
# auto serves them with triton (or torch).
#
# Both backwards recompute the row statistics (and r) from the saved inputs, and reduce over
# tokens deterministically: fixed-order partial sums per (sample, split) in a float32 scratch
# tensor allocated in Python (here for cuda; fastdit._C never allocates), then a fixed-order sum
# over the splits.

_TRITON = "fastdit.triton.adaln"
_modulate.register(
    "triton",
    lazy(_TRITON, "modulate_forward"),
    backward=lazy(_TRITON, "modulate_backward"),
    supports=lazy(_TRITON, "supports_modulate"),
)
_gated.register(
    "triton",
    lazy(_TRITON, "gated_forward"),
    backward=lazy(_TRITON, "gated_backward"),
    supports=lazy(_TRITON, "supports_gated"),
)

CUDA_MAX_D = 8192  # fastdit._C.ADALN_BWD_MAX_D, rows (tokens, channels-last images)
CUDA_CF_TOKENS = 32  # the tokens of a channels-first tile (csrc/adaln.cu, kCfTokens)


def _cuda_channels_first(x: torch.Tensor) -> bool:
    """Whether the cuda kernels read x as a channels-first image: 4-D and not channels-last in
    memory (where H * W == 1 or D == 1 the two orders are one, and x is read as rows)."""
    return x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)


def _cuda_reason(
    x: torch.Tensor, rows: dict[str, torch.Tensor], conds: dict[str, torch.Tensor]
) -> str:
    from .. import _ext

    if x.dtype not in _ext.DTYPE_CODES:
        return f"the cuda kernel takes float32, float16 or bfloat16, got {x.dtype}"
    others = {name: t for name, t in (rows | conds).items() if name != "x"}
    dtypes = {t.dtype for t in others.values()}
    narrow = x.dtype == torch.float32 and dtypes <= {torch.float16, torch.bfloat16}
    if len(dtypes) > 1 or not (dtypes == {x.dtype} or narrow):
        got = ", ".join(f"{name} {t.dtype}" for name, t in others.items())
        return (
            f"the cuda kernel takes {', '.join(others)} in one dtype, x's ({x.dtype}) or, with "
            f"float32 x, float16 or bfloat16; got {got}"
        )
    dim = x.shape[-1] if x.dim() == 3 else x.shape[1]
    channels_first = _cuda_channels_first(x)
    if dim > CUDA_MAX_D and not channels_first:
        return (
            f"the cuda kernels keep a row in registers and take D <= {CUDA_MAX_D} for tokens "
            f"and channels-last images, got {dim}"
        )
    length = x.numel() // max(1, x.shape[0] * dim)
    if x.shape[0] >= 2**31 or length >= 2**31:
        return (
            "the cuda backward counts samples and the rows of a sample in 32 bits and takes "
            f"B < 2^31 and L < 2^31, got B={x.shape[0]}, L={length}"
        )
    tiles = -(-length // CUDA_CF_TOKENS)
    if channels_first and dim > 2**31 - 129:
        return f"the cuda channels-first kernels take D <= 2^31 - 129, got {dim}"
    if channels_first and x.shape[0] * tiles >= 2**31:
        return (
            "the cuda channels-first kernels run a block per 32 tokens and take "
            f"B * ceil(L / 32) < 2^31, got B={x.shape[0]}, L={length}"
        )
    for name, t in rows.items():
        if t.dim() == 4 and channels_first and not t.is_contiguous():
            return (
                f"the cuda kernel takes a channels-first x with contiguous (B, D, H, W) images "
                f"({name} is not)"
            )
        if (
            t.dim() == 4
            and not channels_first
            and not t.is_contiguous(memory_format=torch.channels_last)
        ):
            return (
                f"the cuda kernel takes a channels-last x with channels-last (B, D, H, W) "
                f"images ({name} is not)"
            )
        if t.dim() == 3 and not t.is_contiguous():
            return f"the cuda kernel takes contiguous (B, L, D) tokens ({name} is strided)"
    for name, t in conds.items():
        if not t.is_contiguous():
            return f"the cuda kernel takes a contiguous {name}"
    return ""


def _cuda_supports_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> str:
    return _cuda_reason(x, {"x": x}, {"shift": shift, "scale": scale})


def _cuda_supports_gated(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> str:
    return _cuda_reason(x, {"x": x, "y": y}, {"gate": gate, "shift": shift, "scale": scale})


def _rows_of(x: torch.Tensor) -> tuple[int, int, int]:
    """(B, L, D) of x read as rows: channels-last images are (B, H*W, D) in memory."""
    batch = x.shape[0]
    dim = x.shape[-1] if x.dim() == 3 else x.shape[1]
    return batch, x.numel() // (batch * dim), dim


def _cuda_memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a cotangent) in the memory order the cuda kernels read ``like`` in (copied if
    needed): rows of D, or a contiguous channels-first image."""
    rows = like.dim() == 4 and not _cuda_channels_first(like)
    return t.contiguous(memory_format=torch.channels_last if rows else torch.contiguous_format)


@functools.lru_cache(maxsize=256)
def _cuda_splits(
    batch: int, length: int, dim: int, dtype: int, gated: bool, index: int, channels_first: bool
) -> int:
    """Blocks per sample in the backward. Rows: fastdit._C picks the count whose blocks fill
    the waves of resident blocks best (at most four waves, each block >= 16 rows), from the
    occupancy of the kernel whose tensors all have the rows' dtype on this GPU. A narrower y
    and vectors take the same count, hence the same order of the sums over tokens: the
    gradients of the inputs widened, rounded once. Channels-first: the tiles of 32 tokens,
    ceil(L / 32), on every GPU."""
    from .. import _ext

    C, _ = _ext.load()
    return C.adaln_bwd_splits(batch, length, dim, dtype, gated, index, channels_first)


def _cuda_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    from .. import _ext

    C, _ = _ext.load()
    out = _checks.empty_like_layout(x)  # channels-last stays so: (B, H*W, D) rows in memory
    C.adaln_modulate_fwd(
        x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr(), *_rows_of(x), eps,
        _ext.dtype_code(x), _ext.dtype_code(shift), x.device.index, _ext.stream_of(x),
        _cuda_channels_first(x),
    )  # fmt: skip
    return out


def _cuda_gated(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .. import _ext

    C, _ = _ext.load()
    residual, out = _checks.empty_like_layout(x), _checks.empty_like_layout(x)
    C.adaln_gated_fwd(
        x.data_ptr(), y.data_ptr(), gate.data_ptr(), shift.data_ptr(), scale.data_ptr(),
        residual.data_ptr(), out.data_ptr(), *_rows_of(x), eps,
        _ext.dtype_code(x), _ext.dtype_code(y), x.device.index, _ext.stream_of(x),
        _cuda_channels_first(x),
    )  # fmt: skip
    return residual, out


def _cuda_modulate_backward(grads, inputs) -> list[torch.Tensor]:
    from .. import _ext

    C, _ = _ext.load()
    x, shift, scale, eps = inputs
    dout = _cuda_memory_order(grads[0], x)
    batch, length, dim = _rows_of(x)
    codes = _ext.dtype_code(x), _ext.dtype_code(scale)
    channels_first = _cuda_channels_first(x)
    splits = _cuda_splits(batch, length, dim, codes[0], False, x.device.index, channels_first)
    dx = torch.empty_like(x)  # x's own memory order: what the fake backward promises
    dshift, dscale = torch.empty_like(shift), torch.empty_like(scale)
    partial = torch.empty(2 * batch * splits * dim, dtype=torch.float32, device=x.device)
    C.adaln_modulate_bwd(
        x.data_ptr(), scale.data_ptr(), dout.data_ptr(), dx.data_ptr(), dshift.data_ptr(),
        dscale.data_ptr(), partial.data_ptr(), batch, length, dim, splits, eps,
        *codes, x.device.index, _ext.stream_of(x), channels_first,
    )  # fmt: skip
    return [dx, dshift, dscale]


def _cuda_gated_backward(grads, inputs) -> list[torch.Tensor]:
    from .. import _ext

    C, _ = _ext.load()
    x, y, gate, shift, scale, eps = inputs
    dres, dout = _cuda_memory_order(grads[0], x), _cuda_memory_order(grads[1], x)
    batch, length, dim = _rows_of(x)
    codes = _ext.dtype_code(x), _ext.dtype_code(y)
    channels_first = _cuda_channels_first(x)
    splits = _cuda_splits(batch, length, dim, codes[0], True, x.device.index, channels_first)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    dgate, dshift, dscale = (torch.empty_like(t) for t in (gate, shift, scale))
    partial = torch.empty(3 * batch * splits * dim, dtype=torch.float32, device=x.device)
    C.adaln_gated_bwd(
        x.data_ptr(), y.data_ptr(), gate.data_ptr(), scale.data_ptr(), dres.data_ptr(),
        dout.data_ptr(), dx.data_ptr(), dy.data_ptr(), dgate.data_ptr(), dshift.data_ptr(),
        dscale.data_ptr(), partial.data_ptr(), batch, length, dim, splits, eps,
        *codes, x.device.index, _ext.stream_of(x), channels_first,
    )  # fmt: skip
    return [dx, dy, dgate, dshift, dscale]


_modulate.register(
    "cuda", _cuda_modulate, backward=_cuda_modulate_backward, supports=_cuda_supports_modulate
)
_gated.register("cuda", _cuda_gated, backward=_cuda_gated_backward, supports=_cuda_supports_gated)
