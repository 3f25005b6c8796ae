"""Benchmark of the patchify family: DiT's patch embedding and final layer, and the layout ops.

Shapes: DiT-XL/2, DiT-B/4 and DiT-S/8 at 256 px (latent 32x32) and 512 px (64x64). Variants:
eager PyTorch (the reference), torch.compile of the reference, and each kernel backend that can
run here.

Floors (elem = bytes per element, K = C*p*p, P = p*p*C_out):
  patch_embed: read x (B*C*H*W) + weight (D*K) + pos (N*D), write B*N*D;  2*B*N*D*K FLOP
  final_layer: read x (B*N*D) + shift/scale + weight (P*D), write B*P*N;  2*B*N*D*P FLOP
  patchify / unpatchify: read and write the image once, 2*B*C*H*W

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
    cases = []
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
            n = (size // p) ** 2
            k, out = channels * p * p, out_channels * p * p

            def embed_inputs(batch=batch, size=size, dim=dim, p=p, n=n, dtype=dtype):
                return [
                    torch.randn(batch, channels, size, size, device=dev, dtype=dtype),
                    torch.randn(dim, channels, p, p, device=dev, dtype=dtype) * 0.1,
                    torch.randn(dim, device=dev, dtype=dtype),
                    torch.randn(1, n, dim, device=dev, dtype=dtype),
                ]

            def final_inputs(batch=batch, dim=dim, n=n, out=out, dtype=dtype):
                return [
                    torch.randn(batch, n, dim, device=dev, dtype=dtype),
                    torch.randn(batch, dim, device=dev, dtype=dtype) * 0.1,
                    torch.randn(batch, dim, device=dev, dtype=dtype) * 0.1,
                    torch.randn(out, dim, device=dev, dtype=dtype) * 0.02,
                    torch.randn(out, device=dev, dtype=dtype),
                ]

            def image_inputs(batch=batch, size=size, dtype=dtype):
                return [torch.randn(batch, channels, size, size, device=dev, dtype=dtype)]

            def embed_ref(x, w, b, pos):
                return P.reference_patch_embed(x, w, b, pos)

            def final_ref(x, shift, scale, w, b, p=p, size=size):
                return P.reference_final_layer(x, shift, scale, w, b, p, [size // p] * 2, 1e-6)

            def patchify_ref(x, p=p):
                return P.reference_patchify(x, p, "cpq")

            image = batch * channels * size * size
            cases = [
                ("patch_embed", P._patch_embed, embed_ref, embed_inputs, (),
                 image + dim * k + n * dim + batch * n * dim, 2 * batch * n * dim * k),
                ("final_layer", P._final_layer, final_ref, final_inputs, (p, [size // p] * 2, 1e-6),
                 batch * n * dim + 2 * batch * dim + out * dim + batch * n * out,
                 2 * batch * n * dim * out),
                ("patchify", P._patchify, patchify_ref, image_inputs, (p, "cpq"), 2 * image, 0),
            ]  # fmt: skip
            for name, op, ref, make, extra, elements, flops in cases:
                variants = {"eager": ref, "compile": common.compiled(ref)}
                for backend, reason in common.kernel_backends([op], dev).items():
                    if not reason:
                        variants[backend] = lambda *a, op=op, b=backend, e=extra: op(
                            *a, *e, backend=b
                        )
                for backward in (False, True) if ctx.backward else (False,):
                    if backward and name == "patchify":
                        continue
                    common.bench_case(
                        rows, ctx, name, label, dtype, make, variants,
                        bytes_moved=elements * elem * (2 if backward else 1),
                        flops=flops * (3 if backward else 1), backward=backward,
                    )  # fmt: skip
    common.add_ratios(rows)
    return rows


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__)
    common.report(run(ctx), ctx, "patchify", out)
