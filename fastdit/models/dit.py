"""DiT (Peebles & Xie, 2022): the released architecture on fastdit's ops.

Constructor arguments, parameter names, initialisation and outputs are the released code's
(facebookresearch/DiT ``models.py``), so its checkpoints (``DiT-XL-2-256x256.pt``, ...) load
with ``strict=True`` and give the same outputs; see SPEC.md section 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn.dit import DiTBlock, FinalLayer, PatchEmbed, run_blocks
from ..nn.embedders import LabelEmbedder, TimestepEmbedder
from ..ops.patchify import unpatchify

# ----------------------------------------------------------------------------------------------
# The fixed 2-D sine-cosine position table


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``(M,)`` positions to ``(M, embed_dim)`` float64: ``[sin(pos w_k), cos(pos w_k)]``.

    ``k = 0..embed_dim/2 - 1`` and ``w_k = 1 / 10000^(k / (embed_dim/2))``; sines first.
    """
    if embed_dim % 2:
        raise ValueError(f"get_1d_sincos_pos_embed: embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device="cpu") / half)
    angles = pos.to(torch.float64).reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """DiT's (MAE's) fixed position table for an ``h x w`` patch grid: ``(h*w, embed_dim)``.

    Float64, on the CPU. Tokens are row-major over the grid (token ``i*w + j`` = row i,
    column j). Channels ``[0, D/2)`` encode the COLUMN j and ``[D/2, D)`` the ROW i, each as
    :func:`get_1d_sincos_pos_embed` with ``D/2`` channels: with ``k = 0..D/4-1`` and
    ``w_k = 1 / 10000^(k / (D/4))``, ``[sin(j w_k) for all k, cos(j w_k) for all k]``.
    ``embed_dim`` must be a multiple of 4.
    """
    if embed_dim % 4:
        raise ValueError(
            f"get_2d_sincos_pos_embed: embed_dim must be a multiple of 4, got {embed_dim}"
        )
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(h, dtype=torch.float64, device="cpu").repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device="cpu").repeat(h)
    return torch.cat(
        [
            get_1d_sincos_pos_embed(embed_dim // 2, cols),
            get_1d_sincos_pos_embed(embed_dim // 2, rows),
        ],
        dim=1,
    )


# ----------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """Diffusion Transformer: ``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W)``.

    Arguments as the released code's: ``input_size`` (latent H = W), ``patch_size``,
    ``in_channels``, ``hidden_size``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``class_dropout_prob`` (label dropout in training; the null class id is ``num_classes``),
    ``num_classes``, ``learn_sigma`` (C_out = 2 * in_channels: noise, then variance).
    fastdit's own, keyword-only:

    - ``backend``: passed to every fastdit op (see :func:`fastdit.nn.set_backend`);
    - ``fuse_blocks`` (default True): fuse each block's last residual add with the next
      block's norm (:func:`fastdit.nn.run_blocks`); same result, one pass over the tokens less
      per block. Set False to call ``blocks[i](x, c)`` one by one (e.g. for forward hooks).

    ``pos_embed`` is an ``nn.Parameter`` with ``requires_grad=False`` (in the state dict and in
    ``parameters()``, as in the released code), a float32 copy of the float64 table from
    :func:`get_2d_sincos_pos_embed`.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        backend: str | None = None,
        fuse_blocks: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"DiT: input_size {input_size} is not a multiple of patch_size {patch_size}"
            )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.fuse_blocks = fuse_blocks

        self.x_embedder = PatchEmbed(
            input_size, patch_size, in_channels, hidden_size, bias=True, backend=backend
        )
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, backend=backend)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend=backend)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """adaLN-Zero, as the released code: every block starts as the identity, output 0.

        Xavier-uniform Linear weights with zero biases; the patch conv like a Linear (its
        weight viewed as (D, C*p*p)) with zero bias; the label table and the timestep MLP's
        weights normal(std 0.02); every adaLN output Linear and the final Linear zeroed;
        ``pos_embed`` filled with the sine-cosine table.
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        with torch.no_grad():
            table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
            self.pos_embed.copy_(table.float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, p*p*C)`` to images ``(B, C, H, W)`` (the einsum ``nhwpqc->nchpwq``).

        ``forward`` does not need it (the final layer gives the image); kept for code that
        calls it.
        """
        return unpatchify(x, self.patch_size, self.x_embedder.grid_size, order="pqc")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents (cast to the model's dtype); t: (B,) timesteps
        (integer or floating); y: (B,) class labels (``num_classes`` = null). Returns
        (B, out_channels, H, W) in the model's dtype (float32 for a float32 model under
        ``torch.autocast``: README, Mixed precision). In training mode labels are dropped with
        probability ``class_dropout_prob``."""
        if tuple(x.shape[-2:]) != self.x_embedder.img_size:
            raise ValueError(
                f"DiT: this model was built for {self.x_embedder.img_size[0]}x"
                f"{self.x_embedder.img_size[1]} latents (input_size), got x of shape "
                f"{tuple(x.shape)}"
            )
        x = x.to(self.x_embedder.proj.weight.dtype)  # as U-DiT: f32 latents into a bf16 model
        x = self.x_embedder(x, self.pos_embed)  # (B, N, D), positions added
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        if self.fuse_blocks:
            x = run_blocks(self.blocks, x, c)
        else:
            for block in self.blocks:
                x = block(x, c)
        return self.final_layer(x, c, self.x_embedder.grid_size)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | str | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance, as the released code.

        The batch is doubled by the caller: x (2B, ...) whose FIRST half is used for both
        halves, t (2B,), y (2B,) = [class labels, null labels]. The model runs on the doubled
        batch; on the first ``guidance_channels`` output channels both halves become
        ``uncond + cfg_scale * (cond - uncond)``; the other channels are left as computed.

        ``guidance_channels=3`` (the default) is the released code's quirk: it guides only 3 of
        the 4 noise channels, which the published FIDs were measured with. ``None`` or
        ``"all"`` guides all ``in_channels`` noise channels (the usual form, never the
        variance channels).
        """
        return guided_forward(self, "DiT", x, t, y, cfg_scale, guidance_channels)


def guided_forward(
    model: nn.Module,
    name: str,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    guidance_channels: int | str | None,
) -> torch.Tensor:
    """The body of ``forward_with_cfg`` shared by DiT and U-DiT (``name`` prefixes errors)."""
    if guidance_channels is None or guidance_channels == "all":
        g = model.in_channels
    elif isinstance(guidance_channels, int) and not isinstance(guidance_channels, bool):
        g = guidance_channels
        if not 0 < g <= model.out_channels:
            raise ValueError(
                f"{name}.forward_with_cfg: guidance_channels must be in 1..{model.out_channels}, "
                f"got {g}"
            )
    else:
        raise TypeError(
            f"{name}.forward_with_cfg: guidance_channels must be an int, None or 'all', "
            f"got {guidance_channels!r}"
        )
    half = x[: len(x) // 2]
    model_out = model.forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = model_out[:, :g], model_out[:, g:]
    cond_eps, uncond_eps = eps[: len(eps) // 2], eps[len(eps) // 2 :]
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# ----------------------------------------------------------------------------------------------
# The 12 configurations


def DiT_XL_2(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models: dict[str, Callable[..., DiT]] = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}  # fmt: skip
