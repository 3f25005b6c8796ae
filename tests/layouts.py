"""Inputs laid out in memory otherwise than contiguously, shared by the kernel tests."""

from __future__ import annotations

import torch


def nan_gapped(t: torch.Tensor) -> torch.Tensor:
    """t's values as every other element of a buffer with nan between: a kernel that reads the
    gaps (instead of honouring the strides, or copying) puts nan in its result."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
