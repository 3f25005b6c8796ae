"""Drop-in modules with the authors' parameter names, running on fastdit's ops.

Swap them into your own DiT or U-DiT code (state dicts keep loading with ``strict=True``), or use
the complete models in :mod:`fastdit.models`.
"""

from .dit import Attention, DiTBlock, FinalLayer, Mlp, PatchEmbed, run_blocks, set_backend
from .embedders import LabelEmbedder, TimestepEmbedder, timestep_features
from .udit import (
    ConvMlp,
    Downsample,
    DownSample_Attn,
    DownsampledAttention,
    DownSampler,
    FeedForward,
    LayerNorm2d,
    OverlapPatchEmbed,
    RoPE2D,
    U_DiTBlock,
    UDiTBlock,
    UDiTFinalLayer,
    Upsample,
    fold,
    run_udit_blocks,
    unfold,
)

__all__ = [
    "Attention",
    "ConvMlp",
    "DiTBlock",
    "DownSample_Attn",
    "DownSampler",
    "Downsample",
    "DownsampledAttention",
    "FeedForward",
    "FinalLayer",
    "LabelEmbedder",
    "LayerNorm2d",
    "Mlp",
    "OverlapPatchEmbed",
    "PatchEmbed",
    "RoPE2D",
    "TimestepEmbedder",
    "UDiTBlock",
    "UDiTFinalLayer",
    "U_DiTBlock",
    "Upsample",
    "fold",
    "run_blocks",
    "run_udit_blocks",
    "set_backend",
    "timestep_features",
    "unfold",
]
