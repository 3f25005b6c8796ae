"""Host overhead: what one fastdit op call costs the host, against the eager PyTorch it replaces.

A sampling step at a small batch is launch-bound: each op takes the host's time (Python,
PyTorch's dispatcher, the kernel launches), not the GPU's. Here every op the models call runs
on tiny tensors (one sample: 16 tokens of 64 channels; U-DiT's layer on a 64-channel 8x8
image), back to back, so a row's time is the host time of one call (on a GPU, the events'
interval, which the host's enqueueing sets when it is the slower side):

- eager: the op's plain PyTorch reference, the several PyTorch calls the fused kernel replaces;
- torch: the same reference through fastdit's public function (checks, dispatch, autograd);
- cuda, triton: the kernels, where they run (on a GPU);
- stub (CPU only): the public function with a kernel that does almost nothing (it clones its
  first input(s); its backward writes zero gradients), registered for the call. The kernels
  cannot be timed on a CPU (Triton's interpreter), so this row isolates the machinery a GPU
  kernel's launch goes through.

Run alone: python bench/bench_overhead.py [--quick] [--no-backward]
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import fastdit  # noqa: E402
from fastdit.ops import adaln, downsampled_attention, patchify  # noqa: E402
from fastdit.ops._op import Kernel, Op  # noqa: E402

_backends = importlib.import_module("fastdit.backends")  # (fastdit.backends is the function)


def _cases(device: torch.device, dtype: torch.dtype):
    """(name, Op, inputs maker, eager reference, public call taking backend=)."""
    B, L, D, heads = 1, 16, 64, 2

    def randn(*shape):
        return lambda: torch.randn(shape, device=device, dtype=dtype) * 0.1

    def maker(*parts):
        return lambda: [p() for p in parts]

    tokens, vec = randn(B, L, D), randn(B, D)
    layer = [randn(B, D, 8, 8), randn(D, 1, 5, 5), randn(D), randn(3 * D, D), randn(3 * D),
             randn(heads, 1, 1), randn(D, D, 1, 1), randn(D)]  # fmt: skip
    return [
        ("adaln_modulate", adaln._modulate, maker(tokens, vec, vec),
         lambda *a: adaln.reference_modulate(*a, 1e-6),
         lambda *a, backend: fastdit.adaln_modulate(*a, backend=backend)),
        ("gated_adaln", adaln._gated, maker(tokens, tokens, vec, vec, vec),
         lambda *a: adaln.reference_gated(*a, 1e-6),
         lambda *a, backend: fastdit.gated_adaln(*a, backend=backend)),
        ("patch_embed", patchify._patch_embed,
         maker(randn(B, 4, 8, 8), randn(D, 4, 2, 2), randn(D), randn(L, D)),
         patchify.reference_patch_embed,
         lambda *a, backend: fastdit.patch_embed(*a, backend=backend)),
        ("final_layer", patchify._final_layer, maker(tokens, vec, vec, randn(32, D), randn(32)),
         lambda *a: patchify.reference_final_layer(*a, 2, (4, 4), 1e-6),
         lambda *a, backend: fastdit.final_layer(*a, patch_size=2, backend=backend)),
        ("downsampled_attention", downsampled_attention._layer, maker(*layer),
         lambda *a: downsampled_attention.reference_layer(*a, heads, True, True, True),
         lambda *a, backend: fastdit.downsampled_attention(*a, heads, backend=backend)),
    ]  # fmt: skip


@contextlib.contextmanager
def stub_kernel(op: Op, name: str = "triton") -> Iterator[None]:
    """``op``'s ``name`` backend replaced, for the block, by a kernel that clones the op's first
    input(s) (as many as it has outputs) and writes zero gradients, available on any device."""
    saved_kernel, saved_reason = op.kernels.get(name), _backends.unavailable_reason

    def forward(*inputs):
        outs = tuple(t.clone() for t in inputs[: op.outputs])
        return outs[0] if op.outputs == 1 else outs

    def backward(grads, inputs):
        return [torch.zeros_like(inputs[i]) for i in op.diff_index]

    def reason(backend, device=None):
        return "" if backend == name else saved_reason(backend, device)

    op.kernels[name] = Kernel(forward, backward, lambda *inputs: "")
    _backends.unavailable_reason = reason
    try:
        yield
    finally:
        _backends.unavailable_reason = saved_reason
        if saved_kernel is None:
            del op.kernels[name]
        else:
            op.kernels[name] = saved_kernel


def run(ctx: common.Context) -> list[common.Row]:
    rows: list[common.Row] = []
    if ctx.warm is not None:  # no torch.compile variant to warm
        return rows
    with common.host_timing():
        _run(ctx, rows)
    return rows


def _run(ctx: common.Context, rows: list[common.Row]) -> None:
    for dtype in ctx.dtypes:
        for name, op, make, eager, call in _cases(ctx.device, dtype):
            variants: dict[str, Callable[..., object]] = {
                "eager": eager,
                "torch": lambda *a, call=call: call(*a, backend="torch"),
            }
            for backend, reason in common.kernel_backends([op], ctx.device).items():
                if not reason:
                    variants[backend] = lambda *a, call=call, b=backend: call(*a, backend=b)
            stub = {"stub": lambda *a, call=call: call(*a, backend="triton")}
            shape = f"tiny {tuple(make()[0].shape)}"
            for backward in (False, True) if ctx.backward else (False,):
                label = f"{name} host"
                common.bench_case(rows, ctx, label, shape, dtype, make, variants, backward=backward)
                if ctx.device.type == "cpu":
                    with stub_kernel(op):
                        common.bench_case(rows, ctx, label, shape, dtype, make, stub,
                                          backward=backward)  # fmt: skip
                    rows[-1].note = rows[-1].note or "a do-nothing kernel: the dispatch alone"


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__, "overhead")
    common.report(run(ctx), ctx, "overhead", out)
