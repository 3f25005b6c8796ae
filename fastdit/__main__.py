"""``python -m fastdit info | bench [args] | export --model NAME --out FILE [...]``."""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import sys
from pathlib import Path


def info() -> None:
    import torch

    import fastdit
    from fastdit import _ext
    from fastdit.backends import requested, triton_import_reason, triton_interpreting

    print(f"fastdit {fastdit.__version__}  python {platform.python_version()}")
    cuda = torch.version.cuda or "none (CPU build)"
    print(f"torch {torch.__version__}  CUDA {cuda}  GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm {cap})")
    reason = triton_import_reason()
    if reason:
        print(f"triton: {reason}")
    else:
        import triton

        mode = " (TRITON_INTERPRET=1: CPU interpreter)" if triton_interpreting() else ""
        print(f"triton {triton.__version__}{mode}")
    module, reason = _ext.load()
    if module is None:
        print(f"fastdit._C: {reason}")
    else:
        print(f"fastdit._C: built {module.build_info()}")
    env = os.environ.get("FASTDIT_BACKEND")
    if env:
        try:
            requested("adaln", None)  # parses FASTDIT_BACKEND
            print(f"FASTDIT_BACKEND: {env!r}")
        except ValueError as e:
            print(f"FASTDIT_BACKEND: {env!r} is INVALID, every op call will raise: {e}")
    else:
        print("FASTDIT_BACKEND: unset (auto)")
    print()
    print(f"{'family':22s} {'backend':8s} status")
    for family, row in fastdit.backends().items():
        for backend, status in row.items():
            state = "available" if status.available else f"unavailable: {status.reason}"
            ops = f"  [{', '.join(status.ops)}]" if status.ops and status.available else ""
            print(f"{family:22s} {backend:8s} {state}{ops}")


def bench(args: list[str]) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not script.exists():
        sys.exit(
            "the benchmark suite lives in the source tree's bench/ folder, which this install "
            "does not have: clone the repository and run `make bench` (or python bench/run.py)"
        )
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


_EXPORT_ARGS = [
    ("--model", dict(required=True, help="a registered name: DiT-XL/2, U-DiT-B, ...")),
    ("--checkpoint", dict(help="weights to load first (a state dict, or a training checkpoint "
                          "with 'ema'); default: the model's initial weights. A DiT's input "
                          "size is read from it unless --input-size is given")),
    ("--trusted", dict(action="store_true", help="read --checkpoint with pickled objects "
                       "allowed (the released training checkpoints store their 'args'): this "
                       "can run code from the file, so only for files you trust")),
    ("--out", dict(required=True, help="the .onnx file to write")),
    ("--dtype", dict(default="fp32", choices=["fp32", "fp16"])),
    ("--opset", dict(type=int, help="ONNX opset, 17..25 (default: the exporter's)")),
    ("--input-size", dict(type=int, help="latent H = W (default: the model's, 32 = 256 px)")),
    ("--batch-size", dict(type=int, default=2, help="example batch (fixed: --static-batch)")),
    ("--static-batch", dict(action="store_true", help="fix the batch size in the graph")),
    ("--cfg", dict(action="store_true", help="export forward_with_cfg: the doubled batch and "
                   "a cfg_scale input")),
    ("--guidance-channels", dict(help="with --cfg: output channels to guide (default 3, the "
                                 "released quirk; 'all': every noise channel)")),
    ("--check", dict(action="store_true", help="then run the graph in onnxruntime (CPU) on "
                     "random inputs and print its error against PyTorch")),
]  # fmt: skip


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a DiT or U-DiT to ONNX (needs pip install 'fastdit[onnx]')",
        description="Export a fastdit model to an ONNX graph that onnxruntime, TensorRT, ... "
        "run: inputs x (B, C, H, W), t (B,) int64, y (B,) int64 [, cfg_scale], output out. "
        "U-DiT is exported in its folded inference form.",
    )
    for flag, kwargs in _EXPORT_ARGS:
        p.add_argument(flag, **kwargs)


def export(args: argparse.Namespace) -> None:
    import torch

    from fastdit.models import create, load_checkpoint
    from fastdit.onnx import check_export_args, compare_with_torch, export_onnx

    channels = args.guidance_channels
    if channels is not None and not args.cfg:
        sys.exit("error: --guidance-channels applies only with --cfg")
    channels = 3 if channels is None else int(channels) if channels.isdigit() else channels
    options = dict(
        batch_size=args.batch_size, dtype=args.dtype, opset=args.opset,
        dynamic_batch=not args.static_batch, cfg=args.cfg, guidance_channels=channels,
    )  # fmt: skip
    try:
        check_export_args(args.out, **options)  # fail before building the model
        kwargs = {} if args.input_size is None else {"input_size": args.input_size}
        if args.checkpoint:
            model = load_checkpoint(args.model, args.checkpoint, trusted=args.trusted, **kwargs)
        else:
            model = create(args.model, **kwargs)
        check_export_args(args.out, model=model, **options)  # guidance_channels against it
    except (ValueError, TypeError, ImportError, OSError, KeyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    path = export_onnx(model, args.out, **options)
    files = [path, path.with_name(path.name + ".data")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB) from {args.model}, {args.dtype}")
    if args.check:
        batch = args.batch_size if args.static_batch else 3 + (1 if args.cfg else 0)
        err = compare_with_torch(model.to(torch.float32), path, batch_size=batch, cfg=args.cfg,
                                 guidance_channels=channels)  # fmt: skip
        print(f"onnxruntime (CPU) vs PyTorch (fp32), batch {batch}: max relative error {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends can run here and why not")
    sub.add_parser("bench", help="the benchmark suite (arguments pass to bench/run.py)")
    _export_parser(sub)
    args, rest = parser.parse_known_args()
    if args.command == "info":
        info()
    elif args.command == "bench":
        bench(rest)
    elif args.command == "export":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        export(args)


if __name__ == "__main__":
    main()
