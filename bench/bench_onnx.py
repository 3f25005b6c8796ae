"""ONNX export, measured: onnxruntime against PyTorch on the same model (informational).

For DiT-S/2 and U-DiT-S at 256 px (latent 32x32), batch 2: the model exported with
``fastdit.export_onnx`` and run by every onnxruntime execution provider available here (CPU;
with onnxruntime-gpu, CUDA and TensorRT), against PyTorch running the same model: ``eager``
(every fastdit op on its plain PyTorch reference) and, on a GPU, ``fastdit`` (the fastest
backend for each op). Each onnxruntime row also gives the export time, the graph's node count
and its error against PyTorch in fp32; ``vs_eager`` is PyTorch eager's time over the row's.
On a GPU provider the inputs and outputs stay in device memory (onnxruntime's I/O binding), as
PyTorch's do, so neither side's time includes host-device copies.

``--compare`` adds the alternative export route the exporter choice was measured against: the
same model exported with the ops decomposed into their references (so ``torch.export``'s ATen
decompositions and the exporter's stock translations build the graph) instead of fastdit's
ONNX translations. See ``fastdit/onnx/__init__.py`` for the conclusion.

    python bench/bench_onnx.py [--models DiT-S/2,U-DiT-S] [--batch 2] [--dtype fp32|fp16]
                               [--compare] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from fastdit.models import create  # noqa: E402
from fastdit.nn import set_backend  # noqa: E402


def _missing() -> str:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            return f"{name} is not installed: pip install 'fastdit[onnx]'"
    return ""


def export_decomposed(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """The alternative route: the references traced into ATen, the exporter's stock lowering."""
    import fastdit.onnx as fx

    model = copy.deepcopy(model).to(dtype).eval()
    batch = torch.export.Dim("batch", min=1)
    with common.references_only(), torch.no_grad(), fx._quiet_exporter():
        program = torch.onnx.export(
            fx._Forward(model).eval(), fx.model_inputs(model, 2, dtype=dtype), dynamo=True,
            dynamic_shapes=({0: batch},) * 3, input_names=["x", "t", "y"],
            output_names=["out"], optimize=False, verbose=False,
        )  # fmt: skip
    fx.simplify(program.model)
    program.save(str(path))


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in ort.get_available_providers()]


def _session(path: Path, provider: str):
    import onnxruntime as ort

    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    return ort.InferenceSession(str(path), providers=providers)


def _ort_call(session, provider: str, inputs, device: torch.device):
    """A call that runs the session once. On a GPU provider the inputs and outputs stay in
    device memory (I/O binding), so the time is the graph's, not host-device copies'."""
    import numpy as np
    import onnxruntime as ort

    feed = {}
    for spec, value in zip(session.get_inputs(), inputs):
        array = value.cpu().numpy()
        feed[spec.name] = array.astype(np.float16) if spec.type == "tensor(float16)" else array
    if provider == "CPUExecutionProvider":
        return lambda: session.run(None, feed)
    index = device.index or 0
    binding = session.io_binding()
    held = {k: ort.OrtValue.ortvalue_from_numpy(a, "cuda", index) for k, a in feed.items()}
    for name, value in held.items():
        binding.bind_ortvalue_input(name, value)
    for spec in session.get_outputs():
        binding.bind_output(spec.name, "cuda", index)

    def call(binding=binding, held=held):  # held: the device inputs live as long as the call
        session.run_with_iobinding(binding)

    return call


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def run(ctx: common.Context, names=("DiT-S/2", "U-DiT-S"), batch: int = 2,
        compare: bool = False) -> list[common.Row]:  # fmt: skip
    rows: list[common.Row] = []
    reason = _missing()
    if reason:
        print(f"onnx: {reason}")
        return rows
    with tempfile.TemporaryDirectory(prefix="fastdit-onnx-") as work:
        _run(ctx, rows, Path(work), names, batch, compare)
    common.add_ratios(rows)
    return rows


def _run(ctx, rows, work: Path, names, batch: int, compare: bool) -> None:
    import fastdit.onnx as fx

    for dtype in ctx.dtypes:
        dt = str(dtype).removeprefix("torch.")
        for name in names:
            torch.manual_seed(0)
            model = create(name).eval()
            with torch.no_grad():  # adaLN-Zero makes the blocks the identity: perturb
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            inputs = fx.model_inputs(model, batch)
            shape = f"{name} {tuple(inputs[0].shape)}"
            label = f"{name} fwd"

            # PyTorch
            variants = {"eager": "torch"}
            if ctx.device.type == "cuda":
                variants["fastdit"] = None
            for backend, choice in variants.items():
                m = set_backend(copy.deepcopy(model), choice).to(ctx.device, dtype)
                args = [inputs[0].to(ctx.device, dtype), *(i.to(ctx.device) for i in inputs[1:])]
                with torch.no_grad():
                    t = common.time_call(lambda m=m, a=args: m(*a), lambda: (), ctx.device)
                rows.append(common.Row(label, shape, dt, backend, t))
                del m
            model = set_backend(model, "torch")  # the fp32 CPU reference of the error column

            # ONNX: fastdit's translations (and the decomposed alternative)
            routes = {"translations": None}
            if compare:
                routes["decomposed"] = export_decomposed
            for route, exporter in routes.items():
                path = work / f"{name.replace('/', '_')}_{dt}_{route}.onnx"
                start = time.perf_counter()
                if exporter is None:
                    fx.export_onnx(model, path, dtype=dtype)
                else:
                    exporter(model, path, dtype)
                export_s = time.perf_counter() - start
                err = fx.compare_with_torch(model, path, batch_size=batch)
                for provider in _providers(ctx.device):
                    short = provider.removesuffix("ExecutionProvider")
                    try:
                        session = _session(path, provider)
                        call = _ort_call(session, provider, inputs, ctx.device)
                        t = common.time_call(call, lambda: (), torch.device("cpu"))
                    except Exception as e:  # noqa: BLE001  (reported, not fatal)
                        note = f"failed: {common.first_line(e)}"
                        rows.append(common.Row(label, shape, dt, f"ort {short} ({route})",
                                               float("nan"), note=note))  # fmt: skip
                        continue
                    note = (f"export {export_s:.0f} s, {_nodes(path)} nodes, rel. err vs "
                            f"torch fp32 {err:.1e}")  # fmt: skip
                    rows.append(common.Row(label, shape, dt, f"ort {short} ({route})", t,
                                           note=note))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="DiT-S/2,U-DiT-S")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", action="append", choices=["fp32", "fp16"], help="repeatable")
    p.add_argument("--compare", action="store_true", help="also the decomposed export route")
    p.add_argument("--out", type=Path, help="folder for the CSV and markdown results")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = tuple(common.DTYPES[d] for d in (args.dtype or ["fp32"]))
    ctx = common.Context(device, dtypes, True, common.Limits(common.device_name(device), 0.0))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        print(f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}")
    print(f"device: {common.device_name(device)}")
    rows = run(ctx, names, args.batch, args.compare)
    common.report(rows, ctx, "onnx", args.out)


if __name__ == "__main__":
    main()
