"""NaN where a kernel must not look and where it must write, shared by the kernel tests: inputs
laid out otherwise than contiguously, and outputs allocated full of NaN."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def nan_gapped(t: torch.Tensor) -> torch.Tensor:
    """t's values as every other element of a buffer with nan between: a kernel that reads the
    gaps (instead of honouring the strides, or copying) puts nan in its result."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]


@contextlib.contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Within the block, torch.empty and torch.empty_like (which the ops' glue allocates its
    outputs, gradients and scratch with) return floating-point tensors filled with NaN, so an
    element a kernel leaves unwritten shows as NaN, whichever memory the allocator hands out.

    (Leaving NaN in a large freed block of the CUDA caching allocator does not do it: blocks
    of 1 MiB or less come from a pool of their own, and a rerun reuses the blocks its previous
    run freed, holding last run's correct values.)"""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return allocate_nan

    torch.empty, torch.empty_like = nan_filled(real_empty), nan_filled(real_empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
