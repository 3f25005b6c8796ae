"""What every family's ONNX translations share: the opset, constants, shapes and casts.

The translations are ONNX Script functions run in trace mode by ``torch.onnx.export``: each
receives the fx node's tensor arguments as symbolic tensors (with a known dtype and a shape
whose batch dimension may be symbolic) and its other arguments as Python values, and records
standard ONNX nodes. The values a translation creates carry no dtype or shape while it runs,
so every size and dtype is read from the node's inputs and passed down explicitly, and every
constant is typed. Only the batch dimension (axis 0) may be dynamic: every other size a
translation needs must be static, and :func:`static` says so when it is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

__all__ = ["cast", "compute_type", "const", "ints", "layer_norm_last", "op", "static", "unsqueeze"]

_NUMPY = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64,
          ir.DataType.FLOAT16: np.float16}  # fmt: skip


def static(x, axis: int, what: str) -> int:
    """The size of ``x`` along ``axis`` as an int; an error if it is only known at run time."""
    dim = x.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(
            f"fastdit ONNX export: {what} (axis {axis} of a {x.shape} tensor) must have a static "
            f"size; only the batch dimension may be dynamic"
        )
    return dim


def ints(values: Sequence[int]):
    """An int64 1-D constant (Reshape shapes, axes)."""
    return op.Constant(value_ints=[int(v) for v in values])


def const(array: np.ndarray | float, dtype: ir.DataType):
    """A constant tensor of ``dtype`` (float32, float64 or float16)."""
    return op.Constant(value=ir.tensor(np.asarray(array, dtype=_NUMPY[dtype])))


def compute_type(dtype: ir.DataType) -> ir.DataType:
    """float32 for float32/float16/bfloat16, float64 for float64 (fastdit's compute types)."""
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def cast(x, dtype: ir.DataType, to: ir.DataType):
    """``x`` (of ``dtype``) as ``to``: a Cast only where the types differ."""
    return x if dtype == to else op.Cast(x, to=to)


def unsqueeze(x, axes: Sequence[int]):
    return op.Unsqueeze(x, ints(axes))


def layer_norm_last(x, dim: int, dtype: ir.DataType, eps: float):
    """LayerNormalization (opset 17) over the last axis (of size ``dim``), without affine
    weights: a unit Scale and a zero Bias (given explicitly: onnxruntime's transformer optimiser
    fuses LayerNormalization nodes with all three inputs only). Statistics in float32 for
    float16 inputs (``stash_type=1``, the default)."""
    scale, bias = const(np.ones(dim), dtype), const(np.zeros(dim), dtype)
    out, _, _ = op.LayerNormalization(x, scale, bias, axis=-1, epsilon=float(eps))
    return out
