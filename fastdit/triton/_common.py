"""Helpers every Triton kernel family shares: rounding, dtypes, devices."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = triton_interpreting()  # Triton's CPU interpreter runs the kernels (see _dot)
RTNE_BF16 = INTERPRETED  # see _round


@triton.jit
def _round(v, DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 ``v`` rounded to DTYPE. Compiled, ``.to`` rounds to nearest even; Triton's CPU
    interpreter truncates float32 -> bfloat16, so there (RTNE_BF16) the rounding is done on the
    bits first: add 0x7FFF plus the lowest kept bit, clear the 16 dropped bits."""
    if RTNE_BF16 and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32; fp32 tiles in IEEE precision (never TF32). The CPU
    interpreter multiplies bfloat16 tiles as raw integers; there the tiles are widened to fp32
    first (exact: a product of two bfloat16 values fits in fp32)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


def dtype_reason(t: torch.Tensor) -> str:
    if t.dtype not in DTYPES:
        return f"the triton kernel takes float32, float16 or bfloat16, got {t.dtype}"
    return ""


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def wave_splits(samples: int, resident: int, max_splits: int) -> int:
    """Programs per sample for a grid of ``samples`` x splits equal programs over ``resident``
    program slots: the count in [1, max_splits] whose programs fill their waves best, the fewest
    among equals, at most four waves of programs (more only adds partial sums). The rule of
    csrc/common.cuh's wave_splits: rounding resident / samples down leaves slots idle when
    samples does not divide them (200 samples over 264 slots: 76 % at one split, 95 % at 5)."""
    resident, samples = max(1, resident), max(1, samples)
    best, best_fill = 1, 0.0
    for s in range(1, max(1, min(max_splits, 4 * resident // samples)) + 1):
        blocks = samples * s
        fill = blocks / (-(-blocks // resident) * resident)
        if fill > best_fill:
            best, best_fill = s, fill
    return best
