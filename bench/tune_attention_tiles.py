"""Tile sweep of the triton backend's attention kernels (fastdit/triton/downsampled_attention.py).

Each of the three kernels (fwd, dq, dkdv) is timed alone at every attention shape of U-DiT-B
(head dims 24, 48, 96 at 256 and 512 px; U-DiT-S and -L share the head dims, with 4 and 16
heads) for each candidate tile BM x BN with W warps, the other two kernels left at their
defaults (``attention_tiles``), launched as the U-DiT layer launches them: RoPE2D, cosine
attention, the output merged into the image. bf16 unless --dtype says otherwise.

Why: the defaults were chosen without a GPU, as tiles that compile for sm_90 without register
spills at head dims 24 and 48 (tests/test_triton_compile.py); which tiles are fastest only a
GPU says. The kernels' floor is the tensor cores' time for their products (TF32x3 logits: three
products each) plus one read of q, k, v; at 16 x 16 tiles with 4 warps the key prologue (RoPE,
normalisation) is redone for every 16 query rows, and each warp's share of a tile is below one
mma instruction's shape. Registers and spills of a candidate compiled for sm_90 without a GPU:
tests/test_triton_compile.py's ``_compile``.

A row gives the kernel's median time, its ratio to the default tiles' time (below 1: faster),
and the largest difference from the default tiles' output on the same inputs relative to the
output's largest magnitude ("diff"): tiles change only the order of fp32 sums, so a few units
of the dtype's rounding at most; more is marked MISMATCH (a bug, not a speed). A candidate that
does not compile or launch (registers, shared memory) gets its error's first line. The inputs
rotate through more memory than the L2 cache holds on a GPU (bench/common.py's input_sets).

    python bench/tune_attention_tiles.py [--dtype bf16] [--candidates 16x16x4,64x32x8,...]
                                         [--budget SECONDS] [--out DIR]

On a CPU (TRITON_INTERPRET=1) one tiny shape runs: a check of the script, its times mean
nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.ops.downsampled_attention import _heads_view  # noqa: E402

CANDIDATES = "16x16x4,32x16x4,32x32x4,64x16x4,64x32x4,64x32x8,128x32x8,64x64x8"
C, HEADS = 192, 8  # U-DiT-B
# a difference from the default tiles' output above this share of its largest magnitude
MISMATCH = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _shapes(quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(label, batch, d, heads, grid side): every attention layer shape of U-DiT-B's encoder
    (the decoder's dec1 is enc1's with twice the channels: head dim 48 at n of the full grid)."""
    if quick:
        return [("tiny hd 24 n 36", 1, 48, 2, 12)]
    shapes = []
    for px, batch in ((256, 16), (512, 4)):
        side = px // 8
        for stage, d, s in (("enc1", C, side), ("enc2", 2 * C, side // 2),
                            ("latent", 4 * C, side // 4)):  # fmt: skip
            n = s * s // 4
            shapes.append((f"U-DiT-B {stage} {px}px B{batch} hd {d // HEADS} n {n}", batch, d,
                           HEADS, s))  # fmt: skip
    return shapes


def _candidates(text: str) -> list[dict]:
    """Tiles from text such as "64x32x8,32x32x4": BM x BN with that many warps."""
    out = []
    for item in filter(None, (c.strip() for c in text.split(","))):
        try:
            bm, bn, warps = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a candidate is BMxBNxWARPS, e.g. 64x32x8; got {item!r}"
            ) from None
        if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16):
            raise argparse.ArgumentTypeError(
                f"BM and BN are powers of two >= 16 (tl.dot's smallest side) and the warps a "
                f"power of two <= 16; got {item!r}"
            )
        out.append(dict(BM=bm, BN=bn, num_warps=warps))
    return out


class _Inputs:
    """One shape's tensors: the (B, 4, n, 3d) projection the layer's attention reads, d image,
    the outputs, and for the backward kernels (``backward``) the forward's row statistics."""

    def __init__(self, kernels, batch, d, heads, side, dtype, device, seed, backward):
        gen = torch.Generator(device=device).manual_seed(seed)
        n = side * side // 4
        self.heads = heads
        self.x = torch.empty(batch, d, side, side, dtype=dtype, device=device)  # its shape
        self.qkv = torch.randn(batch, 4, n, 3 * d, generator=gen, device=device).to(dtype)
        self.ls = torch.full((heads, 1, 1), math.log(10.0), dtype=dtype, device=device)
        self.d_image = torch.randn(self.x.shape, generator=gen, device=device).to(dtype)
        self.image = torch.empty_like(self.x)
        self.dqkv = torch.zeros_like(self.qkv)
        self.dq, self.dk, self.dv = (_heads_view(self.dqkv, i, heads) for i in range(3))
        self.stats = (
            kernels._forward(self.problem(kernels), self.d_image, store_o=False)
            if backward
            else None
        )

    def problem(self, kernels):
        """The layer's attention problem, with the tiles attention_tiles gives now."""
        return kernels._layer_problem(
            self.x, self.qkv, self.ls, self.heads, True, True, None, self.image
        )

    def tensors(self) -> list[torch.Tensor]:
        return [
            t for t in (self.qkv, self.d_image, self.image, self.dqkv, self.stats) if t is not None
        ]


def _launch(kernels, kernel: str, pb, inp: _Inputs) -> list[torch.Tensor]:
    """Runs one kernel; returns what it wrote."""
    if kernel == "fwd":
        kernels._forward(pb)
        return [inp.image]
    if kernel == "dq":
        dls = kernels._backward_dq(pb, inp.d_image, inp.stats, inp.dq)
        return [inp.dq, dls]
    kernels._backward_dkdv(pb, inp.d_image, inp.stats, inp.dk, inp.dv)
    return [inp.dk, inp.dv]


def _relative_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        scale = r.float().abs().max().item() or 1.0
        worst = max(worst, (g.float() - r.float()).abs().max().item() / scale)
    return worst


def _tiles_name(tiles: dict) -> str:
    return f"{tiles['BM']}x{tiles['BN']}x{tiles['num_warps']}"


def _sweep(kernels, kernel: str, shape: tuple, candidates: list[dict], dtype, device, row):
    """Rows for one kernel at one shape: the default tiles, then each other candidate."""
    label, batch, d, heads, side = shape
    n, hd = side * side // 4, d // heads
    default_tiles = kernels.attention_tiles
    default = default_tiles(n, hd, dtype, kernel)
    backward = kernel != "fwd"
    check = _Inputs(kernels, batch, d, heads, side, dtype, device, 0, backward)
    ref = [t.clone() for t in _launch(kernels, kernel, check.problem(kernels), check)]
    seeds = iter(range(1, 10**9))

    def make_inputs():  # a fresh set each call: input_sets rotates them past the L2 cache
        inp = _Inputs(kernels, batch, d, heads, side, dtype, device, next(seeds), backward)
        return [inp.problem(kernels), inp, *inp.tensors()]

    def launch(pb, inp, *_):
        return _launch(kernels, kernel, pb, inp)

    base_us = None
    for tiles in [default] + [c for c in candidates if c != default]:

        def pick(n_, hd_, dtype_=torch.bfloat16, kernel_="fwd", tiles=tiles):
            return dict(tiles) if kernel_ == kernel else default_tiles(n_, hd_, dtype_, kernel_)

        kernels.attention_tiles = pick  # read when a problem is made: make_inputs, problem()
        try:
            diff = _relative_diff(_launch(kernels, kernel, check.problem(kernels), check), ref)
            us = common.time_call(launch, make_inputs, device, budget_s=0.3)
        except Exception as e:  # a tile that does not compile or launch: one line
            row(label, kernel, _tiles_name(tiles), "", "", "", f"failed: {common.first_line(e)}")
            continue
        finally:
            kernels.attention_tiles = default_tiles
        base_us = base_us or us
        note = "default" if tiles == default else "MISMATCH" if diff > MISMATCH[dtype] else ""
        row(label, kernel, _tiles_name(tiles), f"{us:.1f}", f"{us / base_us:.2f}", f"{diff:.1e}",
            note)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument(
        "--candidates", type=_candidates, default=_candidates(CANDIDATES),
        help=f"comma-separated BMxBNxWARPS (default {CANDIDATES})",
    )  # fmt: skip
    p.add_argument("--kernels", default="fwd,dq,dkdv", help="comma-separated, of fwd, dq, dkdv")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="start no shape after it")
    p.add_argument("--quick", action="store_true", help="one tiny shape (automatic on a CPU)")
    p.add_argument("--out", type=Path, help="folder for tune_attention_tiles.md")
    args = p.parse_args()
    chosen = [k.strip() for k in args.kernels.split(",") if k.strip()]

    from fastdit.backends import triton_unavailable_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = triton_unavailable_reason(device)
    if reason:
        sys.exit(f"the triton backend cannot run here: {reason}")
    from fastdit.triton import downsampled_attention as kernels

    unknown = sorted(set(chosen) - set(kernels.ATTENTION_KERNELS))
    if unknown:
        p.error(f"unknown kernel(s) {unknown}; choose from {kernels.ATTENTION_KERNELS}")
    dtype = common.DTYPES[args.dtype]
    deadline = time.monotonic() + args.budget if args.budget else math.inf
    lines = [f"# tune_attention_tiles ({args.dtype})", ""]
    lines += [f"- {k}: {v}" for k, v in common.header(device).items()]
    lines += ["", "| shape | kernel | tiles | time (us) | vs default | diff | note |",
              "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    print("\n".join(lines), flush=True)

    def row(*cells) -> None:
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(lines[-1], flush=True)

    for shape in _shapes(args.quick or device.type == "cpu"):
        if time.monotonic() > deadline:
            row(shape[0], "", "", "", "", "", "not run: the budget is spent")
            continue
        for kernel in chosen:
            _sweep(kernels, kernel, shape, args.candidates, dtype, device, row)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_attention_tiles.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / 'tune_attention_tiles.md'}")


if __name__ == "__main__":
    main()
