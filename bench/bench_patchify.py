"""Benchmark of the patchify family: DiT's patch embedding and final layer, and the layout ops.

Shapes: DiT-XL/2 at 256 px and B 256 (training), then DiT-XL/2, DiT-B/4 and DiT-S/8 at 256 px
(latent 32x32, B 32) and 512 px (64x64, B 8).
Variants: eager PyTorch (the reference), torch.compile of the reference, and each kernel backend
that can run here; forward, and forward+backward. The layout ops' forward also has "copy",
PyTorch copying the input to a new tensor: the same bytes at the same size, for how near the
copy bandwidth (measured on 256 MiB) a shape this small can come.

Floors, the bytes that must move (elements times the dtype's size; K = C*p*p, Q = p*p*C_out
outputs per token, M = B*N tokens, I = B*C*H*W the latent image):
  patch_embed fwd:  read x (I), weight (D K), bias, pos (N D); write tokens (M D)
              bwd:  read d tokens (M D), x, weight; write d x (I), d weight, d bias, d pos
  final_layer fwd:  read x (M D), shift, scale (2 B D), weight (Q D), bias; write image (M Q)
              bwd:  read d image (M Q), x, shift, scale, weight (not the bias); write d x
                    (M D), d shift, d scale, d weight, d bias
  patchify, unpatchify: read and write the image once each way (2 I)
The fwd+bwd rows count both. FLOPs: 2 M D K (embedding), 2 M D Q (final layer), three times
that forward+backward. "of limit" is the share of whichever limit measured in the same run
(copy bandwidth, matmul peak) the row comes closer to: here always the bandwidth.

Targets (H100, the issue): the layout ops >= 85 % of the copy bandwidth; patch_embed and
final_layer >= 1.5x eager and >= 1.2x torch.compile, forward and forward+backward.

U-DiT's PixelUnshuffle / PixelShuffle transitions are not benchmarked here: on channels-first
activations (U-DiT's default) each is one permuting copy in PyTorch already, at the layout
ops' floor; on channels-last activations PixelUnshuffle(2) is ``patchify(x, 2, "cpq")`` read
as an image (see fastdit/ops/patchify.py).

Run alone: python bench/bench_patchify.py [--quick] [--dtype bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.ops import patchify as P  # noqa: E402

# name -> (hidden size D, patch size p)
CONFIGS = {"DiT-XL/2": (1152, 2), "DiT-B/4": (768, 4), "DiT-S/8": (384, 8)}


def _cases(quick: bool) -> list[tuple[str, int, int, int, int]]:
    if quick:
        return [("DiT-XL/2 256px B2", 2, 32, 1152, 2)]
    # DiT-XL/2's training batch first: the shape bench/results/NOTES.md predicts, measured even
    # when a short run's budget stops the suite early
    cases = [("DiT-XL/2 256px B256", 256, 32, 1152, 2)]
    for name, (dim, p) in CONFIGS.items():
        for px, batch in ((256, 32), (512, 8)):
            cases.append((f"{name} {px}px B{batch}", batch, px // 8, dim, p))
    return cases


def run(ctx: common.Context) -> list[common.Row]:
    rows: list[common.Row] = []
    ops = [P._patch_embed, P._final_layer, P._patchify, P._unpatchify]
    for op in ops:
        for backend, reason in common.kernel_backends([op], ctx.device).items():
            if reason:
                print(f"  {op.name}: {backend} not benchmarked here: {reason}")
    channels, out_channels = 4, 8
    dev = ctx.device
    for dtype in ctx.dtypes:
        elem = torch.finfo(dtype).bits // 8
        for label, batch, size, dim, p in _cases(ctx.quick):
            grid = [size // p] * 2
            n = grid[0] * grid[1]
            k, q, m = channels * p * p, out_channels * p * p, batch * n
            image = batch * channels * size * size

            def embed_inputs(batch=batch, size=size, dim=dim, p=p, n=n, dtype=dtype):
                return [
                    torch.randn(batch, channels, size, size, device=dev, dtype=dtype),
                    torch.randn(dim, channels, p, p, device=dev, dtype=dtype) * 0.1,
                    torch.randn(dim, device=dev, dtype=dtype),
                    torch.randn(1, n, dim, device=dev, dtype=dtype),
                ]

            def final_inputs(batch=batch, dim=dim, n=n, q=q, dtype=dtype):
                return [
                    torch.randn(batch, n, dim, device=dev, dtype=dtype),
                    torch.randn(batch, dim, device=dev, dtype=dtype) * 0.1,
                    torch.randn(batch, dim, device=dev, dtype=dtype) * 0.1,
                    torch.randn(q, dim, device=dev, dtype=dtype) * 0.02,
                    torch.randn(q, device=dev, dtype=dtype),
                ]

            def image_inputs(batch=batch, size=size, dtype=dtype):
                return [torch.randn(batch, channels, size, size, device=dev, dtype=dtype)]

            def token_inputs(batch=batch, n=n, dtype=dtype, width=out_channels * p * p):
                return [torch.randn(batch, n, width, device=dev, dtype=dtype)]

            def embed_ref(x, w, b, pos):
                return P.reference_patch_embed(x, w, b, pos)

            def final_ref(x, shift, scale, w, b, p=p, grid=grid):
                return P.reference_final_layer(x, shift, scale, w, b, p, grid, 1e-6)

            def patchify_ref(x, p=p):
                return P.reference_patchify(x, p, "cpq")

            def unpatchify_ref(t, p=p, grid=grid):
                return P.reference_unpatchify(t, p, grid, "pqc")

            small_embed = dim * k + dim + n * dim
            small_final = 2 * batch * dim + q * dim + q
            out_image = m * q
            cases = [  # name, op, reference, inputs, extra args, floor fwd / bwd (elements), FLOP
                ("patch_embed", P._patch_embed, embed_ref, embed_inputs, (),
                 image + small_embed + m * dim, m * dim + 2 * image + small_embed + dim * k,
                 2 * m * dim * k),
                ("final_layer", P._final_layer, final_ref, final_inputs, (p, grid, 1e-6),
                 m * dim + small_final + out_image, out_image + 2 * m * dim + 2 * small_final - q,
                 2 * m * dim * q),
                ("patchify", P._patchify, patchify_ref, image_inputs, (p, "cpq"),
                 2 * image, 2 * image, 0),
                ("unpatchify", P._unpatchify, unpatchify_ref, token_inputs, (p, grid, "pqc"),
                 2 * out_image, 2 * out_image, 0),
            ]  # fmt: skip
            for name, op, ref, make, extra, fwd, bwd, flops in cases:
                variants = {"eager": ref, "compile": common.compiled(ref)}
                for backend, reason in common.kernel_backends([op], dev).items():
                    if not reason:
                        variants[backend] = lambda *a, op=op, b=backend, e=extra: op(
                            *a, *e, backend=b
                        )
                shape = f"{label} {'x'.join(map(str, grid))} D{dim}"
                # a layout op (no FLOPs): its bytes against a copy of its input, the same size
                copy = {} if flops else {"copy": common.copy_of_inputs(1)}
                common.bench_case(
                    rows, ctx, name, shape, dtype, make, {**variants, **copy},
                    bytes_moved=fwd * elem, flops=flops,
                )  # fmt: skip
                if ctx.backward:
                    before = len(rows)
                    common.bench_case(
                        rows, ctx, name, shape, dtype, make, variants,
                        bytes_moved=(fwd + bwd) * elem, flops=3 * flops, backward=True,
                    )  # fmt: skip
                    common.check_backward_backend(rows[before:], op, variants, make)
    return rows


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__, "patchify")
    common.report(run(ctx), ctx, "patchify", out)
