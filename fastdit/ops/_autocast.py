"""What fastdit's ops do inside ``torch.autocast`` (mixed precision).

Autocast casts the inputs of the ops it knows (matrix products and convolutions to its
lower-precision dtype) and leaves the rest to type promotion, so inside an autocast region a
DiT block sees a float32 residual stream next to bfloat16 activations and conditioning vectors.
Outside autocast a fastdit op takes one dtype per call; under autocast each takes its inputs'
dtypes the way eager PyTorch treats the ops it fuses, casting some of them before its
argument checks:

- :func:`promote_first`, for the adaLN family: ``x`` (the residual stream) goes to the widest
  floating dtype among the inputs, the dtype type promotion gives ``x + gate * y`` in eager
  PyTorch, and the results have it; ``y`` and the conditioning vectors keep their dtypes, and
  every backend reads them as they are, with the results of casting them to ``x``'s dtype first
  (bit for bit: a widening cast is exact). So a bfloat16 branch next to a float32 residual is
  neither copied to float32 nor saved for the backward in float32, and its gradient is written
  in bfloat16 directly.
- :func:`promote`, for ``patch_embed`` and ``final_layer`` (elementwise work and normalisations
  around a thin matrix product): every floating input goes to the widest floating dtype among
  them; the result has that dtype.
- :func:`lower`, for the ops whose cost is matrix products (``attention_in_groups`` and the
  whole ``downsampled_attention`` layer): the inputs autocast would cast for those products go
  to the autocast dtype (float64 stays, as autocast leaves it); ``logit_scale`` keeps its
  dtype, as in eager PyTorch, where ``exp(min(logit_scale, 4.6052))`` runs in float32.

Outside autocast, or on a device autocast does not cover for the call, nothing is cast (and
mixed dtypes are an error the checks report).

Inside an op, autocast is off (:func:`off`): a backend computes in its inputs' dtype, so every
backend, and the fake implementation ``torch.compile`` traces with, returns the same dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# The device types autocast covers (torch.amp.is_autocast_available would say, but Dynamo in
# torch 2.4 cannot trace it: a graph break in every compiled model).
_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(t: Any) -> torch.dtype | None:
    """The dtype autocast casts to for ``t``'s device, or None where it is off there."""
    if not isinstance(t, torch.Tensor):
        return None
    kind = t.device.type
    if kind not in _DEVICES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def promote(*tensors: Any) -> tuple[Any, ...]:
    """Under autocast (for the first tensor's device), every floating tensor cast to the
    widest floating dtype among them; anything else, and everything outside autocast, as
    given."""
    if autocast_dtype(tensors[0]) is None:
        return tensors
    dtypes = [t.dtype for t in tensors if _floating(t)]
    if not dtypes:
        return tensors
    widest = dtypes[0]
    for dtype in dtypes[1:]:
        widest = torch.promote_types(widest, dtype)
    return tuple(t.to(widest) if _floating(t) else t for t in tensors)


def promote_first(first: Any, *rest: Any) -> tuple[Any, ...]:
    """Under autocast (for ``first``'s device), ``first`` cast to the widest floating dtype among
    all the tensors; the rest, and everything outside autocast, as given."""
    if autocast_dtype(first) is None or not _floating(first):
        return (first, *rest)  # (a non-floating x: the op's checks reject it)
    widest = first.dtype
    for t in rest:
        if _floating(t):
            widest = torch.promote_types(widest, t.dtype)
    return (first.to(widest), *rest)


def lower(*tensors: Any) -> tuple[Any, ...]:
    """Under autocast (for the first tensor's device), every floating tensor other than
    float64 cast to the autocast dtype; anything else, and everything outside autocast, as
    given."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if _floating(t) and t.dtype != torch.float64 else t for t in tensors)


def off(inputs: Any) -> contextlib.AbstractContextManager:
    """A context with autocast off for the device of the first tensor in ``inputs`` (where it
    is on), for the body of an op: the torch backend's matrix products would otherwise run in
    the autocast dtype, and its results differ from the kernels' in dtype and value."""
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if autocast_dtype(first) is None:
        return contextlib.nullcontext()
    return torch.autocast(first.device.type, enabled=False)
