"""U-DiT (Tian et al., "U-DiTs: Downsample Tokens in U-Shaped Diffusion Transformers", 2024).

The released architecture (``udit_models.py`` of YuchuanTian/U-DiT) on fastdit's ops, with the
authors' parameter names, so their checkpoints (``U-DiT-B-1000k.pt``, ...: train-form state
dicts) load with ``strict=True`` and give the same outputs, in training form and folded; see
SPEC.md section 2 and :mod:`fastdit.nn.udit`.

Unlike the released constructors, ``U_DiT_S/B/L(**kwargs)`` honour their keyword arguments
(``num_classes``, ``input_size``, ``learn_sigma``, ``class_dropout_prob``, widths, heads,
depths, the ablation switches, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nn.embedders import LabelEmbedder, TimestepEmbedder
from ..nn.udit import (
    Downsample,
    FeedForward,
    OverlapPatchEmbed,
    UDiTBlock,
    UDiTFinalLayer,
    Upsample,
    _check_down_factor,
    fold,
    run_udit_blocks,
    unfold,
)
from .dit import guided_forward

STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


class UDiT(nn.Module):
    """U-shaped Diffusion Transformer: ``forward(x (B, C, H, W), t (B,), y (B,))``.

    Returns ``(B, C_out, H, W)`` (``C_out = 2 * in_channels`` with ``learn_sigma``: noise, then
    variance). H and W must be multiples of 8 (two halvings, then the attention's stride-2
    split); ``input_size`` is recorded (as ``input_size``) but any such size runs, RoPE2D
    following the true grid.

    Layout, with C = ``hidden_size`` and stage block counts ``depth`` (each block two attention +
    FFN pairs): ``x_embedder`` (Conv3x3(in, C)) -> ``encoder_level_1`` (C, c1) -> ``down1_2``
    -> ``encoder_level_2`` (2C, half grid, c2) -> ``down2_3`` -> ``latent`` (4C, quarter grid,
    c3) -> ``up3_2``, concat with encoder 2, ``reduce_chan_level2`` (Conv1x1(4C, 2C)) ->
    ``decoder_level_2`` (2C, c2) -> ``up2_1``, concat with encoder 1, ``reduce_chan_level1``
    (Conv1x1(2C, 2C)) -> ``decoder_level_1`` (2C, full grid, c2) -> ``output`` (Conv3x3) ->
    ``final_layer`` (c2). ``c_k = t_embedder_k(t) + y_embedder_k(y)`` at widths C, 2C, 4C.

    Arguments as the released ``U_DiT`` (class defaults; the configs are :func:`U_DiT_S` etc.),
    the ablation switches defaulting to the released models' settings: ``ffn_type`` ('rep' or
    'basic'), ``rep``, ``attn_type`` ('v2' or None), ``posemb_type`` ('rope2d' or None),
    ``downsampler`` ('dwconv5'), ``down_shortcut``. fastdit's own, keyword-only:

    - ``backend``: passed to every fastdit op (see :func:`fastdit.nn.set_backend`);
    - ``fuse_blocks`` (True): fuse each residual add with the next norm across the blocks of a
      stage (:func:`fastdit.nn.run_udit_blocks`); False calls the blocks one by one;
    - ``fused_attention`` (True): one ``downsampled_attention`` op per attention layer; False
      runs its stages (with cached RoPE2D tables);
    - ``channels_last`` (False): run the network in channels-last memory (same parameters and
      state dict, same results up to rounding); the output is returned contiguous;
    - ``shared_label_dropout`` (False): in training, drop the same labels in all three label
      embedders (one draw, by ``y_embedder_1``); the released code draws once per stage.

    Re-parameterisation: ``eval()`` folds every FFN (:meth:`fold`), ``train()`` unfolds; the
    trained parameters are never written, the state dict is always the train form.
    """

    def __init__(
        self,
        input_size: int = 32,
        down_factor: int | Sequence[int] = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: Sequence[int] = (2, 5, 8, 5, 2),
        num_heads: int = 16,
        mlp_ratio: float = 4,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        rep: bool = True,
        ffn_type: str = "rep",
        attn_type: str | None = "v2",
        posemb_type: str | None = "rope2d",
        downsampler: str | int = "dwconv5",
        down_shortcut: bool = True,
        *,
        backend: str | None = None,
        fuse_blocks: bool = True,
        fused_attention: bool = True,
        channels_last: bool = False,
        shared_label_dropout: bool = False,
    ):
        super().__init__()
        factors = list(down_factor) if isinstance(down_factor, (list, tuple)) else [down_factor]
        for f in factors:
            _check_down_factor(f)
        depth = list(depth)
        if len(depth) != 5 or any(isinstance(d, bool) or not isinstance(d, int) for d in depth):
            raise ValueError(f"U-DiT: depth must be 5 block counts, got {depth!r}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.depth = depth
        self.fuse_blocks = fuse_blocks
        self.channels_last = channels_last
        self.shared_label_dropout = shared_label_dropout

        C = hidden_size
        block_kwargs = dict(
            mlp_ratio=mlp_ratio, rep=rep, ffn_type=ffn_type, attn_type=attn_type,
            posemb_type=posemb_type, downsampler=downsampler, down_shortcut=down_shortcut,
            backend=backend, fused_attention=fused_attention,
        )  # fmt: skip

        def stage(count: int, size: int, width: int) -> nn.ModuleList:
            return nn.ModuleList(
                [UDiTBlock(size, width, num_heads, **block_kwargs) for _ in range(count)]
            )

        # registration order = the released state dict's order
        self.x_embedder = OverlapPatchEmbed(in_channels, C, bias=True)
        self.t_embedder_1 = TimestepEmbedder(C)
        self.y_embedder_1 = LabelEmbedder(num_classes, C, class_dropout_prob)
        self.t_embedder_2 = TimestepEmbedder(2 * C)
        self.y_embedder_2 = LabelEmbedder(num_classes, 2 * C, class_dropout_prob)
        self.t_embedder_3 = TimestepEmbedder(4 * C)
        self.y_embedder_3 = LabelEmbedder(num_classes, 4 * C, class_dropout_prob)
        self.encoder_level_1 = stage(depth[0], input_size, C)
        self.down1_2 = Downsample(C)
        self.encoder_level_2 = stage(depth[1], input_size // 2, 2 * C)
        self.down2_3 = Downsample(2 * C)
        self.latent = stage(depth[2], input_size // 4, 4 * C)
        self.up3_2 = Upsample(4 * C)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_2 = stage(depth[3], input_size // 2, 2 * C)
        self.up2_1 = Upsample(2 * C)
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_1 = stage(depth[4], input_size, 2 * C)
        self.output = nn.Conv2d(2 * C, 2 * C, kernel_size=3, stride=1, padding=1, bias=True)
        self.final_layer = UDiTFinalLayer(2 * C, self.out_channels, backend=backend)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------
    # Initialisation, sizes, folding

    def blocks(self) -> list[UDiTBlock]:
        """Every block, stage by stage."""
        return [block for name in STAGES for block in getattr(self, name)]

    def initialize_weights(self) -> None:
        """adaLN-Zero, as the released code: every block starts as the identity, output 0.

        Xavier-uniform weights and zero biases for every Linear and Conv2d (depthwise ones
        too); ``x_embedder.proj`` like a Linear (its weight viewed as (C, in*3*3)); the label
        tables and the timestep MLPs' weights normal(std 0.02); both adaLN outputs of every
        block, the final adaLN and ``final_layer.out_proj`` zeroed; ``logit_scale`` = ln 10.
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for k in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{k}").embedding_table.weight, std=0.02)
            t_emb = getattr(self, f"t_embedder_{k}")
            nn.init.normal_(t_emb.mlp[0].weight, std=0.02)
            nn.init.normal_(t_emb.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation1[-1] for b in self.blocks()]
        zeroed += [b.adaLN_modulation2[-1] for b in self.blocks()]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.out_proj]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def fold(self) -> UDiT:
        """Fold every re-parameterised FFN now (``eval()`` does it too); returns self.

        Call it before exporting or compiling for inference, and after writing into a
        parameter's ``.data`` in place (``p.data.copy_(...)``): a forward refolds by itself after
        ``load_state_dict``, in-place parameter updates and ``p.data = ...``, but PyTorch's
        version counter does not see writes through ``.data``. The folded form runs
        out of training mode.
        """
        return fold(self)

    def unfold(self) -> UDiT:
        """Drop the folded FFN weights (rebuilt on the next ``eval()`` or forward out of
        training); returns self."""
        return unfold(self)

    def parameter_count(self, folded: bool = False) -> int:
        """Trainable parameters as trained, or (``folded=True``) what the inference form holds:
        each re-parameterised FFN counted as its folded weights. Works on the meta device."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if folded:
            for ffn in self.modules():
                if isinstance(ffn, FeedForward) and ffn.rep:
                    total += ffn.folded_numel() - sum(p.numel() for p in ffn.parameters())
        return total

    # ------------------------------------------------------------------------------------------
    # Forward

    def conditioning(
        self, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_k = t_embedder_k(t) + y_embedder_k(y)`` for k = 1, 2, 3 ((B, C), (B, 2C), (B, 4C)).

        In training, labels are dropped (replaced by the null id ``num_classes``) with
        probability ``class_dropout_prob``: by default with one draw per embedder, in the
        released order (``torch.rand`` for stage 1, then 2, then 3); with
        ``shared_label_dropout`` one draw (``y_embedder_1``'s) for all three.
        """
        drop = None
        first = self.y_embedder_1
        if self.shared_label_dropout and self.training and first.dropout_prob > 0:
            drop = first.drop_mask(y).to(torch.int64)
        conds = []
        for k in (1, 2, 3):
            t_emb = getattr(self, f"t_embedder_{k}")(t)
            y_emb = getattr(self, f"y_embedder_{k}")(y, self.training, force_drop_ids=drop)
            conds.append(t_emb + y_emb)
        return conds[0], conds[1], conds[2]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _stage(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self._layout(x)
        if self.fuse_blocks:
            return run_udit_blocks(blocks, x, c)
        for block in blocks:
            x = block(x, c)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents (cast to the model's dtype), H and W multiples of
        8; t: (B,) timesteps (integer or floating); y: (B,) labels (``num_classes`` = null).
        Returns (B, out_channels, H, W) in the model's dtype (the autocast dtype under
        ``torch.autocast``: its last layer is a convolution)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"U-DiT: x must be (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        H, W = x.shape[-2:]
        if H % 8 or W % 8:
            raise ValueError(
                f"U-DiT: the latent height and width must be multiples of 8 (two halvings, "
                f"then the attention's stride-2 split), got {H}x{W}"
            )
        x = self.x_embedder(self._layout(x.to(self.x_embedder.proj.weight.dtype)))
        c1, c2, c3 = self.conditioning(t, y)
        enc1 = self._stage(self.encoder_level_1, x, c1)
        enc2 = self._stage(self.encoder_level_2, self.down1_2(enc1), c2)
        latent = self._stage(self.latent, self.down2_3(enc2), c3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(latent), enc2], dim=1))
        dec2 = self._stage(self.decoder_level_2, dec2, c2)
        dec1 = self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))
        dec1 = self._stage(self.decoder_level_1, dec1, c2)
        out = self.final_layer(self._layout(self.output(dec1)), c2)
        return out.contiguous()

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | str | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance, as the released code (and DiT's).

        The caller doubles the batch: x (2B, ...) whose FIRST half is used for both halves,
        t (2B,), y (2B,) = [class labels, null labels]. The model runs on the doubled batch; on
        the first ``guidance_channels`` output channels both halves become
        ``uncond + cfg_scale * (cond - uncond)``; the other channels are left as computed.

        ``guidance_channels=3`` (the default) is the released quirk (3 of the 4 noise
        channels); ``None`` or ``"all"`` guides all ``in_channels`` noise channels.
        """
        return guided_forward(self, "U-DiT", x, t, y, cfg_scale, guidance_channels)


U_DiT = UDiT  # the authors' name

# ----------------------------------------------------------------------------------------------
# The configurations

# The settings shared by the released configs.
RELEASED = dict(
    down_factor=2, depth=[2, 5, 8, 5, 2], ffn_type="rep", rep=True, mlp_ratio=2,
    attn_type="v2", posemb_type="rope2d", downsampler="dwconv5", down_shortcut=True,
)  # fmt: skip


def U_DiT_S(**kwargs) -> UDiT:
    """U-DiT-S: C = 96, 4 heads; keyword arguments override anything."""
    return UDiT(**{**RELEASED, "hidden_size": 96, "num_heads": 4, **kwargs})


def U_DiT_B(**kwargs) -> UDiT:
    """U-DiT-B: C = 192, 8 heads; keyword arguments override anything."""
    return UDiT(**{**RELEASED, "hidden_size": 192, "num_heads": 8, **kwargs})


def U_DiT_L(**kwargs) -> UDiT:
    """U-DiT-L: C = 384, 16 heads; keyword arguments override anything."""
    return UDiT(**{**RELEASED, "hidden_size": 384, "num_heads": 16, **kwargs})


UDiT_models: dict[str, Callable[..., UDiT]] = {
    "U-DiT-S": U_DiT_S,
    "U-DiT-B": U_DiT_B,
    "U-DiT-L": U_DiT_L,
}
