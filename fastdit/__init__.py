"""fastdit: fast kernels and drop-in modules for Diffusion Transformers (DiT, U-DiT).

Every op has a plain PyTorch reference (the spec) and faster backends (CUDA, Triton) held to it;
see :func:`backends` for what can run here.
"""

from . import models, nn, ops
from .backends import BackendError, backends
from .models import load_checkpoint
from .onnx import export_onnx
from .ops.adaln import adaln_modulate, gated_adaln
from .ops.downsampled_attention import (
    attention_in_groups,
    downsampled_attention,
    polyphase_merge,
    polyphase_split,
    rope2d,
)
from .ops.patchify import final_layer, patch_embed, patchify, unpatchify

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "adaln_modulate",
    "attention_in_groups",
    "backends",
    "downsampled_attention",
    "export_onnx",
    "final_layer",
    "gated_adaln",
    "load_checkpoint",
    "models",
    "nn",
    "ops",
    "patch_embed",
    "patchify",
    "polyphase_merge",
    "polyphase_split",
    "rope2d",
    "unpatchify",
]
