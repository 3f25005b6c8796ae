"""The tolerance rule of DESIGN.md, shared by every kernel test.

A backend's result, measured against the float64 reference, may be off by at most twice what
eager PyTorch is off by in the same dtype, plus a tiny floor (FLOOR[dtype] times the larger of 1
and the result's magnitude), so that an eager result that happens to be exact does not demand
an exact kernel.
"""

from __future__ import annotations

import torch

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item()


def assert_close_to_reference(
    got: torch.Tensor,
    eager: torch.Tensor,
    truth: torch.Tensor,
    what: str = "",
    *,
    summed_terms: int = 0,
) -> None:
    """got: the backend's output; eager: the reference in got's dtype; truth: float64 reference.

    summed_terms: for a result of a handful of values, each an fp32 sum of about that many
    terms over the whole batch (a per-head scale's gradient). There eager's error is one draw
    of where a long sum's roundings fell (measured on the U-DiT attention layer over six seeds:
    kernel and eager errors spread over the same range, 1.2e-5 to 3.9e-5 in fp32, so "twice
    eager" fails on an unlucky draw), so the bound also allows the sum's expected rounding,
    eps(fp32) * sqrt(summed_terms), and one rounding to got's dtype, times the magnitude.
    """
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == eager.dtype, f"{what}: dtype {got.dtype} != {eager.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    err, eager_err = max_error(got, truth), max_error(eager, truth)
    magnitude = max(1.0, truth.abs().max().item())
    bound = 2 * eager_err + FLOOR[got.dtype] * magnitude
    if summed_terms:
        fp32 = torch.finfo(torch.float32).eps
        bound += (torch.finfo(got.dtype).eps + fp32 * summed_terms**0.5) * magnitude
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"
