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
    one_rounding: bool = False,
) -> None:
    """got: the backend's output; eager: the reference in got's dtype; truth: float64 reference.

    one_rounding: also allow one unit of rounding of got's dtype at the result's magnitude. For
    results of a handful of values that sum a whole batch (a per-head scale's gradient): there
    eager's error is a single draw of where its last rounding fell (measured: fp16 eager 0.0017
    off where the same value before rounding was up to 0.01 off), not a measure of its accuracy.
    """
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == eager.dtype, f"{what}: dtype {got.dtype} != {eager.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element left unwritten?)"
    err, eager_err = max_error(got, truth), max_error(eager, truth)
    magnitude = max(1.0, truth.abs().max().item())
    bound = 2 * eager_err + FLOOR[got.dtype] * magnitude
    if one_rounding:
        bound += torch.finfo(got.dtype).eps * magnitude
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"
