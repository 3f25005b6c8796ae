"""Benchmark of U-DiT's downsampled-token attention layer (the downsampled_attention family).

Shapes: every attention layer shape of U-DiT-S, -B and -L (widths C, 2C, 4C on the full, half
and quarter latent grid, and 2C on the full grid in the decoder) at 256 px (latent 32x32) and
512 px (64x64). Variants: eager PyTorch (the reference layer), torch.compile of it, each kernel
backend that can run here, and "sdpa core" (bench "downsampled_attention core"): PyTorch's
scaled_dot_product_attention alone on already split, normalised q, k, v, the floor of the
layer's attention core; each layer row's note gives the share of its time that core takes.

FLOP count (multiply-adds x 2): per token 25*d (depthwise 5x5) + 3*d^2 (to_qkv) + d^2 (to_out),
plus 2 * n * d per token for the attention within its group of n = H*W/4 tokens.

Run alone: python bench/bench_downsampled_attention.py [--quick] [--dtype bf16]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.ops import downsampled_attention as A  # noqa: E402

# name -> (C, heads)
CONFIGS = {"U-DiT-S": (96, 4), "U-DiT-B": (192, 8), "U-DiT-L": (384, 16)}


def _cases(quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(label, batch, d, heads, grid side)."""
    if quick:
        return [("U-DiT-S enc1 256px B2", 2, 96, 4, 32)]
    cases = []  # U-DiT-L first (issue 6's end-to-end target), 256 px before 512 px
    for px, batch in ((256, 16), (512, 4)):
        for name, (c, heads) in reversed(CONFIGS.items()):
            side = px // 8
            stages = (("enc1", c, side), ("enc2", 2 * c, side // 2), ("latent", 4 * c, side // 4),
                      ("dec1", 2 * c, side))  # fmt: skip
            for stage, d, s in stages:
                cases.append((f"{name} {stage} {px}px B{batch}", batch, d, heads, s))
    return cases


def run(ctx: common.Context) -> list[common.Row]:
    rows: list[common.Row] = []
    for backend, reason in common.kernel_backends([A._layer], ctx.device).items():
        if reason:
            print(f"  downsampled_attention: {backend} not benchmarked here: {reason}")
    dev = ctx.device
    dtypes = ctx.dtypes if ctx.quick else (torch.bfloat16,)
    for dtype in dtypes:
        for label, batch, d, heads, side in _cases(ctx.quick):
            tokens = side * side
            n = tokens // 4
            hd = d // heads

            def layer_inputs(batch=batch, d=d, heads=heads, side=side, dtype=dtype):
                def w(*dims, std):
                    return (torch.randn(*dims, device=dev) * std).to(dtype)

                return [
                    w(batch, d, side, side, std=1.0),
                    w(d, 1, 5, 5, std=0.2), w(d, std=0.1),
                    w(3 * d, d, std=d**-0.5), w(3 * d, std=0.1),
                    torch.full((heads, 1, 1), math.log(10.0), device=dev, dtype=dtype),
                    w(d, d, 1, 1, std=d**-0.5), w(d, std=0.1),
                ]  # fmt: skip

            def core_inputs(batch=batch, heads=heads, n=n, hd=hd, dtype=dtype):
                qkv = torch.randn(3, batch * 4, heads, n, hd, device=dev, dtype=dtype)
                q, k, v = F.normalize(qkv, dim=-1).unbind(0)
                return [q, k, v]

            def layer_ref(*args, heads=heads):
                return A.reference_layer(*args, heads, True, True, True)

            def sdpa_core(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, scale=10.0)

            flops = 2 * batch * tokens * (25 * d + 4 * d * d + 2 * n * d)
            variants = {"eager": layer_ref, "compile": common.compiled(layer_ref)}
            for backend, reason in common.kernel_backends([A._layer], dev).items():
                if not reason:
                    variants[backend] = lambda *a, b=backend, h=heads: A._layer(
                        *a, h, True, True, True, None, backend=b
                    )
            shape = f"{label} d{d} h{heads} {side}x{side}"
            for backward in (False, True) if ctx.backward else (False,):
                core = len(rows)
                common.bench_case(
                    rows, ctx, "downsampled_attention core", shape, dtype, core_inputs,
                    {"sdpa core": sdpa_core}, flops=2 * batch * tokens * 2 * n * d
                    * (3 if backward else 1), backward=backward,
                )  # fmt: skip
                layer = len(rows)
                common.bench_case(
                    rows, ctx, "downsampled_attention", shape, dtype, layer_inputs, variants,
                    flops=flops * (3 if backward else 1), backward=backward,
                )  # fmt: skip
                _note_core_share(rows[core:layer], rows[layer:])
    return rows


def _note_core_share(core: list[common.Row], layer: list[common.Row]) -> None:
    """Notes on each layer row: the share of its time that SDPA alone takes on the same
    attention problems, already split (the floor of the layer's attention core). The core's
    rows have a bench name of their own, so that no ratio pairs them with the layer's eager and
    compile rows."""
    if len(core) != 1 or not math.isfinite(core[0].time_us):
        return
    for row in layer:
        if math.isfinite(row.time_us):
            share = f"sdpa core alone: {core[0].time_us / row.time_us:.0%} of this time"
            row.note = f"{row.note}; {share}" if row.note else share


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__, "downsampled_attention")
    common.report(run(ctx), ctx, "downsampled_attention", out)
