"""DiT's layers as drop-in modules: the authors' parameter names, fastdit's ops inside.

Each module takes ``backend=None`` (also a plain attribute, changeable later; see
:func:`set_backend`), passed to the fastdit ops it calls: ``None`` follows ``FASTDIT_BACKEND``
and otherwise picks the fastest backend that can serve the call.

Differences from the released code, on purpose:

- :class:`FinalLayer` returns the image ``(B, C, H, W)``: the unpatchify is fused into the
  ``final_layer`` op (the authors' ``FinalLayer`` returns tokens and ``DiT.unpatchify`` lays
  them out).
- :class:`DiTBlock` keeps ``norm1``/``norm2`` (parameter-free LayerNorms, as in the authors'
  code) for their ``eps`` only; the normalisation itself runs inside the adaLN ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.adaln import adaln_modulate, gated_adaln
from ..ops.patchify import final_layer, patch_embed


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _split(m: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """(B, parts*D) -> parts contiguous (B, D) tensors, in order (what the kernels want)."""
    B = m.shape[0]
    return m.view(B, parts, -1).transpose(0, 1).contiguous().unbind(0)


class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` to patch tokens ``(B, N, D)``: a stride-p Conv2d, flattened.

    Arguments and attributes as timm's ``PatchEmbed`` (``img_size``, ``patch_size``,
    ``grid_size``, ``num_patches``; parameters ``proj.weight``, ``proj.bias``).
    ``forward(x, pos_embed=None)``: with ``pos_embed`` (``(1, N, D)`` or ``(N, D)``) the
    position table is added inside the ``patch_embed`` op (one pass); without it the tokens
    are returned as timm's module does, for the caller to add positions.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"PatchEmbed: square patches only, got {self.patch_size}")
        self.grid_size = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        self.backend = backend

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.proj.weight, self.proj.bias
        if pos_embed is None:
            return F.conv2d(x, weight, bias, stride=self.patch_size).flatten(2).transpose(1, 2)
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        return patch_embed(x, weight, bias, pos_embed, backend=self.backend)


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(B, N, D)`` (timm's ``Attention`` as DiT uses it).

    ``qkv`` Linear(D, 3D), heads split the channels (head_dim = D / num_heads), softmax
    attention with scale head_dim^-0.5 (``F.scaled_dot_product_attention``), ``proj``
    Linear(D, D). ``qkv_bias`` defaults to True, DiT's setting (timm's default is False).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, *, backend: str | None = None
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend  # unused for now: attention runs in torch's SDPA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with the tanh-approximated GELU (DiT's ``approx_gelu``)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        approximate: str = "tanh",
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class DiTBlock(nn.Module):
    """One DiT block with adaLN-Zero conditioning: ``forward(x (B, N, D), c (B, D))``.

    ``adaLN_modulation`` = Sequential(SiLU, Linear(D, 6D)) gives shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp; then

        x = x + gate_msa * attn(LN(x) * (1 + scale_msa) + shift_msa)
        x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)

    with LN parameter-free (eps 1e-6). The first line's norm is ``adaln_modulate``; the
    attention's residual add and the second norm are one ``gated_adaln``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        backend: str | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.backend = backend

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six (B, D) conditioning vectors, contiguous, in the authors' order."""
        return _split(self.adaLN_modulation(c), 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        h = adaln_modulate(x, shift_msa, scale_msa, self.norm1.eps, backend=self.backend)
        x, h = gated_adaln(
            x, self.attn(h), gate_msa, shift_mlp, scale_mlp, self.norm2.eps, backend=self.backend
        )
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


def run_blocks(blocks: list[DiTBlock] | nn.ModuleList, x: torch.Tensor, c: torch.Tensor):
    """``for block in blocks: x = block(x, c)``, with every residual add fused into a norm.

    Each block's MLP residual add is fused (``gated_adaln``) with the next block's ``norm1``
    and modulation, so x is read and written once less per block than with the blocks called
    one by one. The result is the same; forward hooks on the blocks themselves do not fire.
    """
    blocks = list(blocks)
    if not blocks:
        return x
    mods = [b.modulation(c) for b in blocks]
    first = blocks[0]
    h = adaln_modulate(x, mods[0][0], mods[0][1], first.norm1.eps, backend=first.backend)
    for i, block in enumerate(blocks):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
        x, h = gated_adaln(
            x, block.attn(h), gate_msa, shift_mlp, scale_mlp, block.norm2.eps,
            backend=block.backend,
        )  # fmt: skip
        if i + 1 == len(blocks):
            return x + gate_mlp.unsqueeze(1) * block.mlp(h)
        nxt = blocks[i + 1]
        x, h = gated_adaln(
            x, block.mlp(h), gate_mlp, mods[i + 1][0], mods[i + 1][1], nxt.norm1.eps,
            backend=nxt.backend,
        )  # fmt: skip
    raise AssertionError("unreachable")


class FinalLayer(nn.Module):
    """DiT's last layer: ``(B, N, D)`` tokens and ``c (B, D)`` to the image ``(B, C, H, W)``.

    ``adaLN_modulation`` = Sequential(SiLU, Linear(D, 2D)) gives shift, scale; then
    ``linear(LN(x) * (1 + scale) + shift)`` (``linear``: Linear(D, p*p*C)) and the unpatchify
    (tokens read as (B, h, w, p, p, C)), all in the ``final_layer`` op. Unlike the authors'
    FinalLayer, which returns the tokens, this returns the image. ``grid`` = (h, w), default
    square.
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        *,
        backend: str | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.backend = backend

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        shift, scale = _split(self.adaLN_modulation(c), 2)
        return final_layer(
            x, shift, scale, self.linear.weight, self.linear.bias, self.patch_size, grid,
            self.norm_final.eps, backend=self.backend,
        )  # fmt: skip


def set_backend(module: nn.Module, backend: str | None) -> nn.Module:
    """Set ``backend`` on every fastdit layer inside ``module`` (and on it); returns it."""
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return module
