"""Argument checks shared by the op families: every message names the op and the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _autocast

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    like: torch.Tensor | None = None,
    like_name: str = "x",
    same_dtype: bool = True,
) -> torch.Tensor:
    """``t`` is a floating tensor of the given rank, on the device of ``like`` (the argument
    named ``like_name``) and, with ``same_dtype``, of its dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastdit.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastdit.{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"fastdit.{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if like is not None:
        if same_dtype and t.dtype != like.dtype:
            cast = ""
            if _autocast.autocast_dtype(t) is not None:
                cast = " (the dtypes after the cast this op makes under torch.autocast)"
            raise TypeError(
                f"fastdit.{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}"
                f"{cast}; cast them to one dtype"
            )
        if t.device != like.device:
            raise ValueError(
                f"fastdit.{op}: {name} is on {t.device} but {like_name} is on {like.device}"
            )
    return t


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"fastdit.{op}: {name} must have shape {tuple(expected)} ({meaning}), "
            f"got {tuple(t.shape)}"
        )


def nonempty(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"fastdit.{op}: {name} is empty, shape {tuple(t.shape)}")


def count(op: str, name: str, value: object) -> int:
    """A whole number >= 1 (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fastdit.{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"fastdit.{op}: {name} must be >= 1, got {value}")
    return value


def flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fastdit.{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def positive(op: str, name: str, value: float) -> float:
    """A finite number > 0 (an eps: infinity would silently zero the normalised values)."""
    value = float(value)
    if not 0 < value < math.inf:
        raise ValueError(f"fastdit.{op}: {name} must be positive and finite, got {value}")
    return value


def contract(*specs: tuple[str, torch.Tensor | None, Sequence[int] | None]) -> str:
    """'' if every tensor of ``(name, tensor, expected shape or None)`` has its shape and all
    are on the first one's device (the first must be a tensor), else why not: what the
    kernels need to stay inside their buffers (an op's contract). The public functions check
    more and raise; for calls that skip them (``torch.ops.fastdit.*`` called directly, compiled
    graphs) a kernel backend whose contract fails declines (Op.why_not)."""
    device = specs[0][1].device
    for name, t, expected in specs:
        if t is None:
            continue
        if expected is not None and t.shape != tuple(expected):
            return f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}"
        if t.device != device:
            return f"{name} is on {t.device}, not on {device} with {specs[0][0]}"
    return ""


def same_layout(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` in ``x``'s memory format: channels-last stays channels-last, else contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``x`` in the layout :func:`same_layout` gives."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
