"""Benchmark of the adaln family: adaln_modulate and gated_adaln, forward and forward+backward.

Shapes: DiT-XL/2 tokens (B 32 and 256, N 256, D 1152) and the U-DiT-B stages (B 32; widths 192,
384, 768 on 32x32, 16x16, 8x8 latents, and the decoder's 384 on 32x32, the largest tensor),
each in U-DiT's default channels-first memory ("cf": both kernel backends run their
tile-of-tokens kernels on it) and channels-last ("cl"). Variants: eager PyTorch (the
reference), torch.compile of the reference, and each kernel backend that can run here; in the
forward also "copy", PyTorch copying the row tensors (x, or x and y) to new ones: the op's
bytes at its size, for how near the copy bandwidth (measured on 256 MiB) a shape can come.

Floor (bytes that must move; N = B*L*D elements, elem = bytes per element):
  adaln_modulate fwd:      read x; write out                       2 N  (+ 2 B*D: shift, scale)
  adaln_modulate bwd:      read x, dout; write dx                  3 N  (+ 3 B*D: scale; dshift,
                                                                         dscale)
  gated_adaln fwd:         read x, y; write r, out                 4 N  (+ 3 B*D)
  gated_adaln bwd:         read x, y, dr, dout; write dx, dy       6 N  (+ 5 B*D: gate, scale;
                                                                         dgate, dshift, dscale)
  fwd+bwd rows count both: modulate 5 N + 5 B*D, gated 10 N + 8 B*D (times elem). The backward
  recomputes the row statistics (and r) from the inputs: nothing is saved but the inputs. The
  kernels' fp32 partial sums (B * splits * D per gradient, written and read once, mostly in L2)
  and the harness's torch.ones_like cotangents are not in the floor, so they count against the
  kernels' GB/s. On channels-first images the kernels (CUDA and Triton) read each tile twice
  (statistics, then outputs; the second read hits L2 when the resident tiles fit there): the
  floor counts it once, so a second read from memory shows as lost bandwidth.

Mixed precision (the "gated_adaln autocast" rows, DiT shapes): a float32 residual x with a
bf16 branch y and bf16 gate, shift, scale, as under torch.autocast; r and out are float32, d y
and the vectors' gradients bf16. Floor: fwd read x (4), y (2), write r, out (8): 14 N bytes;
fwd+bwd adds read x, y, dr, dout, write dx, dy: 20 N more, 34 N. Variants: eager and
torch.compile of the released code's formula under autocast (x + gate * y, the product in bf16,
then LayerNorm and modulation in float32), each kernel reading the bf16 tensors as they are,
and each kernel on the branch first cast to float32 (what fastdit did before: 22 N and 52 N
bytes with the casts).

Targets (H100, the issue): fwd >= 85 % and bwd >= 70 % of the copy bandwidth measured in the same
run; the fused step (gated_adaln) >= 3x eager and >= 1.2x torch.compile of the reference. A
kernel row whose backward did not run on that kernel says so in its note.

Run alone: python bench/bench_adaln.py [--quick] [--dtype bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.ops import adaln  # noqa: E402


def _shapes(quick: bool) -> list[tuple[str, tuple[int, ...], bool]]:
    """(label, shape, channels_last): tokens, and U-DiT's (B, D, H, W) images in both memory
    layouts (its default channels-first, which the kernels take in tiles of tokens; and
    channels-last, rows of D like tokens). Labels of images end in "cf" or "cl"."""
    if quick:
        images = [("U-DiT-B stage1 B2", (2, 192, 32, 32))]
        tokens = [("DiT-XL/2 B2", (2, 256, 1152), False)]
    else:
        images = [
            ("U-DiT-B 192x32x32 B32", (32, 192, 32, 32)),
            ("U-DiT-B 384x16x16 B32", (32, 384, 16, 16)),
            ("U-DiT-B 768x8x8 B32", (32, 768, 8, 8)),
            ("U-DiT-B 384x32x32 B32", (32, 384, 32, 32)),  # decoder_level_1
        ]
        # B 256 first: the training batch, measured even when a short run's budget stops early
        tokens = [("DiT-XL/2 B256", (256, 256, 1152), False),
                  ("DiT-XL/2 B32", (32, 256, 1152), False)]  # fmt: skip
    return tokens + [
        (f"{label} {'cl' if last else 'cf'}", shape, last)
        for label, shape in images
        for last in (False, True)
    ]


def run(ctx: common.Context) -> list[common.Row]:
    rows: list[common.Row] = []
    ops = {"adaln_modulate": adaln._modulate, "gated_adaln": adaln._gated}
    for name, op in ops.items():
        for backend, reason in common.kernel_backends([op], ctx.device).items():
            if reason:
                print(f"  {name}: {backend} not benchmarked here: {reason}")
    for dtype in ctx.dtypes:
        elem = torch.finfo(dtype).bits // 8
        for label, shape, last in _shapes(ctx.quick):
            batch = shape[0]
            dim = shape[-1] if len(shape) == 3 else shape[1]
            numel = 1
            for s in shape:
                numel *= s

            def make(n_tensors, shape=shape, batch=batch, dim=dim, dtype=dtype, last=last):
                def inputs():
                    x = [
                        torch.randn(shape, device=ctx.device, dtype=dtype) for _ in range(n_tensors)
                    ]
                    if last:
                        x = [t.contiguous(memory_format=torch.channels_last) for t in x]
                    c = [torch.randn(batch, dim, device=ctx.device, dtype=dtype) * 0.1
                         for _ in range(n_tensors + 1)]  # fmt: skip
                    return x + c

                return inputs

            def ref_mod(x, shift, scale):
                return adaln.reference_modulate(x, shift, scale, 1e-6)

            def ref_gated(x, y, gate, shift, scale):
                return adaln.reference_gated(x, y, gate, shift, scale, 1e-6)

            n, bd = numel, batch * dim
            cases = [  # name, op, reference, row tensors in, floor elements fwd / fwd+bwd
                ("adaln_modulate", adaln._modulate, ref_mod, 1, 2 * n + 2 * bd, 5 * n + 5 * bd),
                ("gated_adaln", adaln._gated, ref_gated, 2, 4 * n + 3 * bd, 10 * n + 8 * bd),
            ]
            for name, op, ref, n_x, elements, elements_bwd in cases:
                variants = {"eager": ref, "compile": common.compiled(ref)}
                for backend, reason in common.kernel_backends([op], ctx.device).items():
                    if not reason:
                        variants[backend] = lambda *a, op=op, b=backend: op(*a, 1e-6, backend=b)
                shape_s = f"{label} {tuple(shape)}"
                common.bench_case(
                    rows, ctx, name, shape_s, dtype, make(n_x),
                    {**variants, "copy": common.copy_of_inputs(n_x)},
                    bytes_moved=elements * elem,
                )  # fmt: skip
                if ctx.backward:
                    before = len(rows)
                    common.bench_case(
                        rows, ctx, name, shape_s, dtype, make(n_x), variants,
                        bytes_moved=elements_bwd * elem, backward=True,
                    )  # fmt: skip
                    common.check_backward_backend(rows[before:], op, variants, make(n_x))
    if torch.bfloat16 in ctx.dtypes:
        for label, shape, _ in _shapes(ctx.quick):
            if len(shape) == 3:
                _autocast_case(rows, ctx, label, shape)
    return rows


def _released_gated(x, y, gate, shift, scale):
    """The released DiT block's gated residual and the next modulated norm, as eager PyTorch
    runs it under autocast (gate * y in bf16, added to the float32 x)."""
    r = x + gate[:, None] * y
    out = F.layer_norm(r, (r.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return r, out


def _autocast_case(rows: list[common.Row], ctx: common.Context, label: str, shape) -> None:
    batch, _, dim = shape
    low = torch.bfloat16

    def inputs():
        x = torch.randn(shape, device=ctx.device)
        y = torch.randn(shape, device=ctx.device, dtype=low)
        return [x, y] + [torch.randn(batch, dim, device=ctx.device, dtype=low) * 0.1
                         for _ in range(3)]  # fmt: skip

    def autocast(fn):
        return common.under_autocast(fn, ctx.device, low)

    variants = {
        "eager": autocast(_released_gated),
        "compile": autocast(common.compiled(_released_gated)),
    }
    for backend, reason in common.kernel_backends([adaln._gated], ctx.device).items():
        if reason:
            continue
        variants[backend] = autocast(lambda *a, b=backend: adaln.gated_adaln(*a, backend=b))
        variants[f"{backend} cast-first"] = autocast(
            lambda x, *a, b=backend: adaln.gated_adaln(x, *(t.float() for t in a), backend=b)
        )
    n, bd = batch * shape[1] * dim, batch * dim
    cases = [(False, 14 * n + 6 * bd)] + ([(True, 34 * n + 16 * bd)] if ctx.backward else [])
    for backward, nbytes in cases:
        before = len(rows)
        common.bench_case(
            rows, ctx, "gated_adaln autocast", f"{label} {tuple(shape)}", low, inputs, variants,
            bytes_moved=nbytes, backward=backward,
        )  # fmt: skip
        for row in rows[before:]:
            row.dtype = "fp32+bf16"
        if backward:
            common.check_backward_backend(rows[before:], adaln._gated, variants, inputs)


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__, "adaln")
    common.report(run(ctx), ctx, "adaln", out)
