"""End-to-end: one model forward (and forward+backward), fastdit against eager PyTorch.

On a GPU: DiT-XL/2 at 256 px (latent 32x32), batch 32, in each dtype of the run. On a CPU (the
quick default): DiT-S/2 on a 16x16 latent, batch 2, fp32. Variants:

- eager: the same model with every fastdit op's plain PyTorch reference called directly (no
  custom-op node: ``common.references_only``), i.e. what the authors' code computes, op for op;
- compile: torch.compile of that eager model, under references_only too, so that Inductor fuses
  across the ops as it would in the authors' code;
- fastdit: the model as shipped (``auto`` backends: the fastest kernel that serves each call);
- fastdit+compile (CPU default only): torch.compile of the shipped model (fastdit ops stay
  single graph nodes).

On a GPU with backward, first: U-DiT-L's training step with its tricks on fastdit against the
model without them in eager PyTorch (issue 6's end-to-end target), with bf16 weights and with
float32 weights under bf16 autocast (``_udit_tricks``). On a GPU, next: U-DiT-B's folded
sampling forward (``_udit_sampling``). Both time fastdit's U-DiT in each memory layout
(channels-first, the default, and ``channels_last=True``): which one to run is measured, not
assumed. DiT-XL/2, whose torch.compile may be cold (a minute or more), comes last.

Matmul-bound: the row's TFLOP/s counts the model's multiply-adds (DiT-XL/2: 118.6 G per image
at 256 px, SPEC.md) against the matmul peak measured in the same run.

Run alone: python bench/bench_models.py [--quick] [--dtype bf16]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.models import create  # noqa: E402
from fastdit.nn import set_backend  # noqa: E402


def _dit_flops(model: torch.nn.Module, batch: int) -> int:
    """2 * multiply-adds of one forward (linear layers, patch conv, attention), per batch."""
    d = model.pos_embed.shape[-1]
    n = model.pos_embed.shape[1]
    p = model.patch_size
    depth = len(model.blocks)
    per_block = n * (3 * d * d + d * d + 8 * d * d) + 2 * n * n * d + 6 * d * d
    total = depth * per_block + n * d * model.in_channels * p * p
    total += n * d * p * p * model.out_channels + 2 * d * d + 256 * d + d * d
    return 2 * batch * total


def _model_inputs(ctx: common.Context, batch: int, channels: int, size: int, dtype: torch.dtype):
    """A maker of a model's (x, t, y): latents of that size and dtype, timesteps, labels."""

    def inputs():
        return [
            torch.randn(batch, channels, size, size, device=ctx.device, dtype=dtype),
            torch.randint(0, 1000, (batch,), device=ctx.device),
            torch.randint(0, 1000, (batch,), device=ctx.device),
        ]

    return inputs


def _channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same U-DiT (same weights, same fold state) run in channels-last memory."""
    copied = copy.deepcopy(model)
    copied.channels_last = True
    return copied


def run(ctx: common.Context) -> list[common.Row]:
    rows: list[common.Row] = []
    warming = ctx.warm is not None  # only the compiled variants run: DiT's forward
    if ctx.backward and not ctx.quick and not warming:  # first: issue 6's target, no compile
        _udit_tricks(ctx, rows)
    if not ctx.quick and not warming:  # next, no compile either; DiT-XL/2's compile last
        _udit_sampling(ctx, rows)
    if ctx.quick:
        name, size, batch = "DiT-S/2", 16, 2
    else:
        name, size, batch = "DiT-XL/2", 32, 32
    for dtype in ctx.dtypes:
        inputs = _model_inputs(ctx, batch, 4, size, dtype)
        label = f"{name} {(batch, 4, size, size)}"
        if not ctx.owns(name, label, dtype):  # another shard compiles this model
            continue
        torch.manual_seed(0)
        model = create(name, input_size=size).to(ctx.device, dtype).eval()
        for p in model.parameters():  # adaLN-Zero makes the blocks the identity: perturb
            p.data.add_(torch.randn_like(p) * 0.02)
        eager = copy.deepcopy(model)
        set_backend(eager, "torch")

        # eager and compile: the reference ops called directly, no custom-op nodes (see
        # common.references_only), so Inductor fuses across them as it would the authors' code.
        variants = {
            "eager": common.on_references(eager),
            "compile": common.on_references(common.compiled(eager)),
            "fastdit": model,
        }
        if ctx.quick:  # on a GPU, compiling DiT-XL/2 twice costs more than the row is worth
            variants["fastdit+compile"] = common.compiled(model)
        flops = _dit_flops(model, batch)
        common.bench_case(rows, ctx, name, label, dtype, inputs, variants, flops=flops)
        if ctx.backward and not ctx.quick:
            model.train()
            eager.train()
            common.bench_case(
                rows, ctx, name, label, dtype, inputs,
                {"eager": common.on_references(eager), "fastdit": model},
                flops=3 * flops, backward=True,
            )  # fmt: skip
    return rows


def _udit_tricks(
    ctx: common.Context,
    rows: list[common.Row],
    name: str = "U-DiT-L",
    batch: int = 8,
    latent: int = 32,
) -> None:
    """U-DiT-L's training step (forward+backward, 256 px, batch 8) with all of its tricks
    (cosine attention, RoPE2D, the shortcut, the re-parameterised FFN) on fastdit's kernels,
    against the same model without them (the released ablation switches off) in eager
    PyTorch: the tricks should cost nothing (the authors measured 0.84 against 1.55 steps/s).
    The "eager" row is the model without tricks; vs_eager >= 1 on the fastdit row is the
    target. Twice: with bf16 weights, and with float32 weights under bf16 autocast (mixed
    precision training, as most runs train); fastdit's model in both memory layouts each time.
    ``name``, ``batch``, ``latent``: smaller runs (the CPU test of this function)."""
    from fastdit.models import create as create_model

    dtype = torch.bfloat16
    off = dict(ffn_type="basic", attn_type=None, posemb_type=None, down_shortcut=False)
    for autocast in (False, True):
        weights = torch.float32 if autocast else dtype
        torch.manual_seed(0)
        tricks = create_model(name).to(ctx.device, weights).train()
        plain = create_model(name, **off).to(ctx.device, weights).train()
        set_backend(plain, "torch")
        inputs = _model_inputs(ctx, batch, 4, latent, weights)
        variants = {
            "eager": common.on_references(plain),
            "fastdit": tricks,
            "fastdit channels-last": _channels_last_copy(tricks),
        }
        label, mode = f"{name} train step", "bf16 weights"
        if autocast:
            variants = {k: common.under_autocast(v, ctx.device, dtype) for k, v in variants.items()}
            label, mode = f"{name} train step, autocast", "fp32 weights, bf16 autocast"
        before = len(rows)
        shape = f"{name} {(batch, 4, latent, latent)}"
        common.bench_case(rows, ctx, label, shape, dtype, inputs, variants, backward=True)
        notes = {
            "eager": f"without the tricks, eager PyTorch; {mode}",
            "fastdit": f"with the tricks; {mode}",
            "fastdit channels-last": f"with the tricks, channels_last=True; {mode}",
        }
        for row in rows[before:]:
            row.note = row.note or notes.get(row.backend, "")
        ctx.checkpoint(rows)


def _udit_sampling(
    ctx: common.Context,
    rows: list[common.Row],
    name: str = "U-DiT-B",
    batch: int = 32,
    latent: int = 32,
) -> None:
    """U-DiT-B's sampling forward (256 px, batch 32, folded FFNs: ``eval()``) in each dtype of
    the run: eager PyTorch (the same model on its ops' references), fastdit as shipped
    (channels-first activations) and fastdit with ``channels_last=True``. No compiled row: on a
    GPU, compiling U-DiT-B costs more of the suite's time than the row is worth (the per-layer
    compiled baselines are in the downsampled_attention and adaln suites). ``name``,
    ``batch``, ``latent``: smaller runs (the CPU test of this function)."""
    for dtype in ctx.dtypes:
        torch.manual_seed(0)
        model = create(name).to(ctx.device, dtype)
        for p in model.parameters():  # adaLN-Zero makes the blocks the identity: perturb
            p.data.add_(torch.randn_like(p) * 0.02)
        model.eval()  # folds the re-parameterised FFNs from the perturbed weights
        eager = copy.deepcopy(model)
        set_backend(eager, "torch")
        inputs = _model_inputs(ctx, batch, 4, latent, dtype)
        variants = {
            "eager": common.on_references(eager),
            "fastdit": model,
            "fastdit channels-last": _channels_last_copy(model),
        }
        before = len(rows)
        shape = f"{name} {(batch, 4, latent, latent)}"
        common.bench_case(rows, ctx, f"{name} sampling", shape, dtype, inputs, variants)
        for row in rows[before:]:
            if row.backend == "fastdit channels-last":
                row.note = row.note or "channels_last=True"
        ctx.checkpoint(rows)


if __name__ == "__main__":
    ctx, out = common.standalone_context(__doc__, "models")
    common.report(run(ctx), ctx, "models", out)
