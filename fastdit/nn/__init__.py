"""Drop-in modules with the authors' parameter names, running on fastdit's ops.

Swap them into your own DiT code (state dicts keep loading with ``strict=True``), or use the
complete models in :mod:`fastdit.models`.
"""

from .dit import Attention, DiTBlock, FinalLayer, Mlp, PatchEmbed, run_blocks, set_backend
from .embedders import LabelEmbedder, TimestepEmbedder, timestep_features

__all__ = [
    "Attention",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "run_blocks",
    "set_backend",
    "timestep_features",
]
