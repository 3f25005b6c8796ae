"""An independent, plain transcription of the forward of U-DiT's ``DownSample_Attn``.

It follows the released code (``udit_models.py`` of YuchuanTian/U-DiT) step by step, written
without fastdit and without einops, so that fastdit's layer can be checked against it. It is
deliberately built differently from fastdit's reference: the polyphase split and merge use
strided slices, RoPE2D uses complex numbers and the released table (including its
``int(sqrt(n))`` row length), attention is spelled out with einsum.

One deliberate difference from the released code: it casts q and k with ``.float()`` before
RoPE, which would lose float64; here they go to float32 or float64, whichever is wider, so a
float64 run stays float64 throughout. For float32 inputs the computation is the released one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_SCALE_MAX = 4.6052  # the released literal: torch.clamp(self.logit_scale, max=4.6052)


def released_freqs_cis(head_dim: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The released ``precompute_freqs_cis_2d(head_dim, n)``: (n, head_dim/2) complex.

    Row length int(sqrt(n)) (the released code assumes a square grid); entry 2j turns by
    ``x_pos * f_j`` (the column), entry 2j+1 by ``y_pos * f_j`` (the row).
    """
    side = int(n**0.5)
    pos = torch.arange(n)
    x_pos, y_pos = pos % side, pos // side
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 4)[: head_dim // 4].to(dtype) / head_dim))
    x_ang = torch.outer(x_pos.to(dtype), freqs)
    y_ang = torch.outer(y_pos.to(dtype), freqs)
    x_cis = torch.polar(torch.ones_like(x_ang), x_ang)
    y_cis = torch.polar(torch.ones_like(y_ang), y_ang)
    return torch.stack([x_cis, y_cis], dim=-1).reshape(n, head_dim // 2)


def released_attention_forward(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    logit_scale: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    num_heads: int,
    *,
    rope: bool = True,
    cosine: bool = True,
    shortcut: bool = True,
) -> torch.Tensor:
    """``DownSample_Attn.forward`` with down_factor 2, on a (B, d, H, W) input.

    Parameters as in the state dict: ``downsampler.layer.{weight,bias}`` (d, 1, k, k), (d,);
    ``to_qkv.{weight,bias}`` (3d, d), (3d,); ``logit_scale`` (heads, 1, 1);
    ``to_out.{weight,bias}`` (d, d, 1, 1), (d,). rope: posemb_type='rope2d'; cosine:
    attn_type='v2'; shortcut: down_shortcut=1.
    """
    b, d, h, w = x.shape
    heads, hd = num_heads, d // num_heads
    gh, gw = h // 2, w // 2
    n = gh * gw

    # DownSampler: conv + shortcut, then 'b d (h dh) (w dw) -> b (dh dw) (h w) d'
    ksize = dw_weight.shape[-1]
    y = F.conv2d(x, dw_weight, dw_bias, stride=1, padding=(ksize - 1) // 2, groups=d)
    if shortcut:
        y = y + x
    groups = []
    for dh in range(2):
        for dw in range(2):
            sub = y[:, :, dh::2, dw::2]  # (b, d, gh, gw)
            groups.append(sub.reshape(b, d, n).transpose(1, 2))  # (b, n, d)
    tokens = torch.stack(groups, dim=1)  # (b, 4, n, d)

    qkv = tokens @ qkv_weight.t() + qkv_bias  # nn.Linear
    q, k, v = qkv.chunk(3, dim=-1)
    # 'b p n (h d) -> b p n h d': channel c is channel c % hd of head c // hd
    q, k, v = (t.reshape(b, 4, n, heads, hd) for t in (q, k, v))

    if rope:
        ct = torch.promote_types(x.dtype, torch.float32)
        cis = released_freqs_cis(hd, n, ct).to(x.device)[None, :, None, :]  # (1, n, 1, hd/2)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(b * 4, n, heads, hd).to(ct)
            tc = torch.view_as_complex(t.reshape(b * 4, n, heads, hd // 2, 2).contiguous())
            out = torch.view_as_real(tc * cis).flatten(3)
            return out.to(x.dtype).reshape(b, 4, n, heads, hd)

        q, k = rotate(q), rotate(k)

    # 'b p n h d -> b p h n d'
    q, k, v = (t.permute(0, 1, 3, 2, 4) for t in (q, k, v))
    if cosine:
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        attn = torch.einsum("bphid,bphjd->bphij", qn, kn)
        attn = attn * torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp()
    else:
        attn = torch.einsum("bphid,bphjd->bphij", q, k) * (hd**-0.5)
    attn = attn.softmax(dim=-1)
    o = torch.einsum("bphij,bphjd->bphid", attn, v)  # (b, 4, heads, n, hd)

    # 'b (dh dw) he (h w) d -> b (he d) (h dh) (w dw)'
    o = o.permute(0, 1, 2, 4, 3).reshape(b, 4, d, gh, gw)  # channel = head * hd + i
    image = x.new_zeros(b, d, h, w)
    for g in range(4):
        dh, dw = divmod(g, 2)
        image[:, :, dh::2, dw::2] = o[:, g]
    return F.conv2d(image, out_weight, out_bias)


def random_attention_params(
    d: int, heads: int, ksize: int = 5, dtype: torch.dtype = torch.float64, generator=None
) -> dict[str, torch.Tensor]:
    """Random parameters shaped as in a released state dict, scaled like trained ones."""

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator).mul(std).to(dtype)

    return {
        "dw_weight": randn(d, 1, ksize, ksize, std=1.0 / ksize),
        "dw_bias": randn(d, std=0.1),
        "qkv_weight": randn(3 * d, d, std=1.0 / math.sqrt(d)),
        "qkv_bias": randn(3 * d, std=0.1),
        "logit_scale": (math.log(10.0) + randn(heads, 1, 1, std=0.5)),
        "out_weight": randn(d, d, 1, 1, std=1.0 / math.sqrt(d)),
        "out_bias": randn(d, std=0.1),
    }
