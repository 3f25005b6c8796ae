"""``python -m fastdit info | bench [args]``."""

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
    from fastdit.backends import triton_import_reason, triton_interpreting

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
    print(f"FASTDIT_BACKEND: {env!r}" if env else "FASTDIT_BACKEND: unset (auto)")
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdit")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends can run here and why not")
    sub.add_parser("bench", help="the benchmark suite (arguments pass to bench/run.py)")
    args, rest = parser.parse_known_args()
    if args.command == "info":
        info()
    elif args.command == "bench":
        bench(rest)


if __name__ == "__main__":
    main()
