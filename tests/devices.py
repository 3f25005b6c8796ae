"""Where this test session's kernel backends run."""

from __future__ import annotations

import torch


def kernel_device() -> torch.device:
    """The host under Triton's interpreter (CI, and any machine without a GPU), else the GPU.

    Tests that check which backend ``auto`` picked put their tensors here, so that the check
    runs on a GPU machine too instead of finding no kernel for host tensors.
    """
    from fastdit.backends import triton_interpreting

    if triton_interpreting() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def kernel_backends(device: torch.device) -> list[str]:
    """The kernel backends that can run on ``device``, in ``auto``'s order of preference."""
    from fastdit.backends import unavailable_reason

    return [b for b in ("cuda", "triton") if not unavailable_reason(b, device)]
