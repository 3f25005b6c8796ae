"""An independent, plain transcription of the released U-DiT, to stand in for the authors' code.

It follows ``udit_models.py`` of YuchuanTian/U-DiT module by module, with the authors' module
and parameter names (so its state dicts are the released checkpoints' layout), written without
fastdit. The attention layer is ``udit_attention_reference.released_attention_forward`` (complex
RoPE with the released square-grid table, einsum attention, strided-slice polyphase split).

The released code's behaviours kept here:

- ``FeedForward`` with ``rep`` folds in ``train(False)`` (so on ``eval()``) and runs the folded
  form out of training; ``train(True)`` drops the folded tensors. The fold is the released
  formula. ``inplace_fold = True`` (a class attribute, False by default) reproduces the released
  defect exactly: the 5x5 kernel is folded INTO the live ``dwconv.0.weight`` (a ``.detach()``
  shares storage), so a second ``eval()`` or ``eval(); train()`` corrupts the model. With it
  False the same formula writes into a fresh tensor, so the transcription stays usable.
- the released ``rep=False`` FFN cannot be folded (its ``train(False)`` indexes a plain conv and
  raises ``TypeError``); here it simply runs unfolded.
- each stage's label embedder draws its own ``torch.rand`` mask, stage 1, 2, 3 in order.
- ``forward_with_cfg`` guides the first 3 channels only.
- unlike the released constructors, :func:`build` honours its keyword arguments (test configs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from udit_attention_reference import released_attention_forward

RELEASED_CONFIGS = {  # hidden size C, heads
    "U-DiT-S": (96, 4),
    "U-DiT-B": (192, 8),
    "U-DiT-L": (384, 16),
}
RELEASED_SETTINGS = dict(
    depth=[2, 5, 8, 5, 2],
    mlp_ratio=2,
    ffn_type="rep",
    rep=1,
    attn_type="v2",
    posemb_type="rope2d",
    downsampler="dwconv5",
    down_shortcut=1,
)


def channel_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The released ``LayerNorm2d`` without affine weights: permute, layer_norm, permute back."""
    y = x.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), eps=eps)
    return y.permute(0, 3, 1, 2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(-1).unsqueeze(-1)) + shift.unsqueeze(-1).unsqueeze(-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DownSampler(nn.Module):
    def __init__(self, dim: int, ksize: int, shortcut: bool):
        super().__init__()
        self.layer = nn.Conv2d(dim, dim, ksize, stride=1, padding=(ksize - 1) // 2, groups=dim)
        self.down_shortcut = shortcut


class DownSample_Attn(nn.Module):
    def __init__(self, dim, num_heads, posemb_type, attn_type, downsampler, down_shortcut):
        super().__init__()
        self.heads = num_heads
        self.rope = posemb_type == "rope2d"
        self.cosine = attn_type == "v2"
        self.to_qkv = nn.Linear(dim, dim * 3, bias=True)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if self.cosine:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.downsampler = DownSampler(dim, int(downsampler[-1]), bool(down_shortcut))

    def forward(self, x):
        return released_attention_forward(
            x,
            self.downsampler.layer.weight,
            self.downsampler.layer.bias,
            self.to_qkv.weight,
            self.to_qkv.bias,
            self.logit_scale if self.cosine else None,
            self.to_out.weight,
            self.to_out.bias,
            self.heads,
            rope=self.rope,
            cosine=self.cosine,
            shortcut=self.downsampler.down_shortcut,
        )


class FeedForward(nn.Module):
    inplace_fold = False  # True: the released code's in-place fold, defect included

    def __init__(self, dim, ffn_expansion_factor, rep):
        super().__init__()
        self.rep = bool(rep)
        self.hidden = hidden = int(dim * ffn_expansion_factor)
        self.folded = None
        if self.rep:
            self.project_in = nn.Sequential(
                nn.Conv2d(dim, hidden // 2, 1), nn.Conv2d(hidden // 2, hidden, 1)
            )
            self.dwconv = nn.ModuleList(
                [
                    nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden),
                    nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                    nn.Conv2d(hidden, hidden, 1, padding=0, groups=hidden),
                ]
            )
            self.project_out = nn.Sequential(
                nn.Conv2d(hidden, hidden // 2, 1), nn.Conv2d(hidden // 2, dim, 1)
            )
        else:
            self.project_in = nn.Conv2d(dim, hidden, 1)
            self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
            self.project_out = nn.Conv2d(hidden, dim, 1)

    def _fold(self):
        def merge(seq):
            w1, w2 = seq[0].weight.detach().squeeze(), seq[1].weight.detach().squeeze()
            b1, b2 = seq[0].bias.detach(), seq[1].bias.detach()
            return (w2 @ w1)[:, :, None, None], w2 @ b1 + b2

        k5 = self.dwconv[0].weight.detach()
        if not self.inplace_fold:
            k5 = k5.clone()
        k5[:, :, 1:4, 1:4] += self.dwconv[1].weight.detach()
        k5[:, :, 2:3, 2:3] += self.dwconv[2].weight.detach() + 1.0
        kb = sum(conv.bias.detach() for conv in self.dwconv)
        self.folded = (*merge(self.project_in), k5, kb, *merge(self.project_out))

    def train(self, mode=True):
        super().train(mode)
        if self.rep:
            if mode:
                self.folded = None
            else:
                self._fold()
        return self

    def forward(self, x):
        if self.rep and not self.training:
            w_in, b_in, k5, kb, w_out, b_out = self.folded
            h = F.gelu(F.conv2d(x, w_in, b_in))
            h = F.conv2d(h, k5, kb, padding=2, groups=self.hidden)
            return F.conv2d(h, w_out, b_out)
        h = F.gelu(self.project_in(x))
        if self.rep:
            out = h
            for conv in self.dwconv:
                out = out + conv(h)
        else:
            out = self.dwconv(h)
        return self.project_out(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class U_DiTBlock(nn.Module):
    def __init__(self, d, heads, mlp_ratio, rep, ffn_type, **attn):
        super().__init__()

        def ffn():
            if ffn_type == "rep":
                return FeedForward(d, mlp_ratio, rep)
            return Mlp(d, int(d * mlp_ratio))

        self.attn1 = DownSample_Attn(d, heads, **attn)
        self.mlp1 = ffn()
        self.adaLN_modulation1 = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.attn2 = DownSample_Attn(d, heads, **attn)
        self.mlp2 = ffn()
        self.adaLN_modulation2 = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        for attn, mlp, ada in (
            (self.attn1, self.mlp1, self.adaLN_modulation1),
            (self.attn2, self.mlp2, self.adaLN_modulation2),
        ):
            s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = ada(c).chunk(6, dim=1)
            g_msa, g_mlp = g_msa[:, :, None, None], g_mlp[:, :, None, None]
            x = x + g_msa * attn(modulate(channel_layer_norm(x), s_msa, sc_msa))
            x = x + g_mlp * mlp(modulate(channel_layer_norm(x), s_mlp, sc_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, d, out_channels):
        super().__init__()
        self.out_proj = nn.Conv2d(d, out_channels, 3, stride=1, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(modulate(channel_layer_norm(x), shift, scale))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, 3, stride=1, padding=1, bias=True)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n, n // 2, 3, 1, 1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n, n * 2, 3, 1, 1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class U_DiT(nn.Module):
    """The released ``U_DiT`` (constructor arguments as there, PyTorch's default init)."""

    def __init__(
        self,
        in_channels=4,
        hidden_size=96,
        depth=(2, 5, 8, 5, 2),
        num_heads=4,
        mlp_ratio=2,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        rep=1,
        ffn_type="rep",
        attn_type="v2",
        posemb_type="rope2d",
        downsampler="dwconv5",
        down_shortcut=1,
        input_size=None,  # unused, as in the released code
        down_factor=2,
    ):
        super().__init__()
        assert down_factor == 2
        C = hidden_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        blk = dict(
            mlp_ratio=mlp_ratio,
            rep=rep,
            ffn_type=ffn_type,
            posemb_type=posemb_type,
            attn_type=attn_type,
            downsampler=downsampler,
            down_shortcut=down_shortcut,
        )

        def stage(n, d):
            return nn.ModuleList([U_DiTBlock(d, num_heads, **blk) for _ in range(n)])

        self.x_embedder = OverlapPatchEmbed(in_channels, C)
        for k, width in ((1, C), (2, 2 * C), (3, 4 * C)):
            setattr(self, f"t_embedder_{k}", TimestepEmbedder(width))
            setattr(self, f"y_embedder_{k}", LabelEmbedder(num_classes, width, class_dropout_prob))
        self.encoder_level_1 = stage(depth[0], C)
        self.down1_2 = Downsample(C)
        self.encoder_level_2 = stage(depth[1], 2 * C)
        self.down2_3 = Downsample(2 * C)
        self.latent = stage(depth[2], 4 * C)
        self.up3_2 = Upsample(4 * C)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, 1)
        self.decoder_level_2 = stage(depth[3], 2 * C)
        self.up2_1 = Upsample(2 * C)
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, 1)
        self.decoder_level_1 = stage(depth[4], 2 * C)
        self.output = nn.Conv2d(2 * C, 2 * C, 3, stride=1, padding=1)
        self.final_layer = FinalLayer(2 * C, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x)
        c1 = self.t_embedder_1(t) + self.y_embedder_1(y, self.training)
        c2 = self.t_embedder_2(t) + self.y_embedder_2(y, self.training)
        c3 = self.t_embedder_3(t) + self.y_embedder_3(y, self.training)
        enc1 = x
        for block in self.encoder_level_1:
            enc1 = block(enc1, c1)
        enc2 = self.down1_2(enc1)
        for block in self.encoder_level_2:
            enc2 = block(enc2, c2)
        lat = self.down2_3(enc2)
        for block in self.latent:
            lat = block(lat, c3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(lat), enc2], 1))
        for block in self.decoder_level_2:
            dec2 = block(dec2, c2)
        dec1 = self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], 1))
        for block in self.decoder_level_1:
            dec1 = block(dec1, c2)
        return self.final_layer(self.output(dec1), c2)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def build(name: str, **kwargs) -> U_DiT:
    """A released config by name, with ``kwargs`` overriding anything."""
    C, heads = RELEASED_CONFIGS[name]
    return U_DiT(**{**RELEASED_SETTINGS, "hidden_size": C, "num_heads": heads, **kwargs})


def randomize_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random non-zero weights of trained-like scale, in place: every weight
    normal(0, 1/sqrt(fan_in)) (depthwise kernels 1/k), biases normal(0, 0.1), label tables
    normal(0, 1), ``logit_scale`` ln 10 + normal(0, 0.5) (some heads above the 4.6052 clamp)."""

    def randn(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).mul(std).to(t)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.copy_(math.log(10.0) + randn(p, 0.5))
            elif name.endswith("embedding_table.weight"):
                p.copy_(randn(p, 1.0))
            elif p.dim() == 1:
                p.copy_(randn(p, 0.1))
            else:
                p.copy_(randn(p, 1.0 / math.sqrt(p[0].numel())))
    return model
