"""adaLN: the LayerNorm + modulation that opens every DiT and U-DiT sub-layer.

Two layouts, one per model family:

- tokens ``(B, L, D)`` (DiT): the norm runs over the last dimension;
- images ``(B, D, H, W)`` (U-DiT): the norm runs over the channel dimension, for every pixel;
  the tensor may be channels-first (contiguous) or channels-last in memory, and the outputs
  keep its memory format.

The conditioning tensors ``shift``, ``scale`` and ``gate`` are ``(B, D)``: one vector per sample,
broadcast over its tokens or pixels.

Ops:

- ``adaln_modulate(x, shift, scale, eps)`` = ``LayerNorm(x) * (1 + scale) + shift``, where
  LayerNorm has no affine weights and uses the biased variance:
  ``(x - mean) / sqrt(var + eps)`` with mean and var over D.
- ``gated_adaln(x, y, gate, shift, scale, eps)`` = ``(r, adaln_modulate(r, shift, scale, eps))``
  with ``r = x + gate * y``: the gated residual add that closes one sub-layer fused with the
  norm and modulation that open the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
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
    residual = _checks.same_layout(x + _per_sample(gate, x) * y, x)
    return residual, reference_modulate(residual, shift, scale, eps)


_modulate = Op(
    FAMILY,
    "adaln_modulate",
    "Tensor x, Tensor shift, Tensor scale, float eps",
    outputs=1,
    reference=reference_modulate,
    differentiable=("x", "shift", "scale"),
)
_gated = Op(
    FAMILY,
    "gated_adaln",
    "Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps",
    outputs=2,
    reference=reference_gated,
    differentiable=("x", "y", "gate", "shift", "scale"),
)
OPS = (_modulate, _gated)


# ----------------------------------------------------------------------------------------------
# The public functions


def _check(op: str, x: torch.Tensor, conds: dict[str, torch.Tensor]) -> None:
    _checks.tensor(op, "x", x, ndim=(3, 4))
    batch, dim = x.shape[0], (x.shape[-1] if x.dim() == 3 else x.shape[1])
    if x.numel() == 0:
        raise ValueError(f"fastdit.{op}: x is empty, shape {tuple(x.shape)}")
    layout = "(B, L, D)" if x.dim() == 3 else "(B, D, H, W)"
    for name, t in conds.items():
        _checks.tensor(op, name, t, ndim=2, like=x)
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
    """
    _check("adaln_modulate", x, {"shift": shift, "scale": scale})
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
    x, y: (B, L, D) or (B, D, H, W), the same shape; gate, shift, scale: (B, D).
    """
    _check("gated_adaln", x, {"gate": gate, "shift": shift, "scale": scale})
    _checks.tensor("gated_adaln", "y", y, like=x)
    _checks.shape("gated_adaln", "y", y, x.shape, "the shape of x")
    eps = _checks.positive("gated_adaln", "eps", eps)
    return _gated(x, y, gate, shift, scale, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# Kernel backends


def _cuda_supports(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> str:
    from .. import _ext

    if x.dtype not in _ext.DTYPE_CODES:
        return f"the cuda kernel takes float32, float16 or bfloat16, got {x.dtype}"
    if x.dim() != 3 and not (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ):
        return "the cuda kernel takes (B, L, D) tokens or channels-last (B, D, H, W) images"
    if x.dim() == 3 and not x.is_contiguous():
        return "the cuda kernel takes contiguous (B, L, D) tokens"
    if not (shift.is_contiguous() and scale.is_contiguous()):
        return "the cuda kernel takes contiguous shift and scale"
    return ""


def _cuda_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> torch.Tensor:
    from .. import _ext

    C, _ = _ext.load()
    out = _checks.empty_like_layout(x)  # channels-last stays so: (B, H*W, D) rows in memory
    batch = x.shape[0]
    dim = x.shape[-1] if x.dim() == 3 else x.shape[1]
    C.adaln_modulate_fwd(
        x.data_ptr(), shift.data_ptr(), scale.data_ptr(), out.data_ptr(),
        batch, x.numel() // (batch * dim), dim, eps,
        _ext.dtype_code(x), x.device.index, _ext.stream_of(x),
    )  # fmt: skip
    return out


_modulate.register(
    "triton",
    lazy("fastdit.triton.adaln", "modulate_forward"),
    supports=lazy("fastdit.triton.adaln", "supports"),
)
_modulate.register("cuda", _cuda_modulate, supports=_cuda_supports)
