"""The benchmark suite's machinery, on the CPU: what must not fail on a GPU machine's first,
time-limited run (bench/gpu_check.sh), where a suite is stopped from outside and one reference
function is compiled for every shape measured."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def _context(out: Path) -> common.Context:
    device = torch.device("cpu")
    return common.Context(
        device, (torch.float32,), True, common.Limits("cpu", 1.0), out=out, head={"date": "now"}
    )


def test_compiled_baseline_serves_more_shapes_than_dynamos_default_limit():
    def reference(x):
        return torch.nn.functional.gelu(x) * 2

    for n in range(1, 13):  # Dynamo's default: 8 compilations per code object
        x = torch.randn(n, 3)
        torch.testing.assert_close(common.compiled(reference, backend="eager")(x), reference(x))


def test_results_written_after_every_case_and_budget_stops_new_cases(tmp_path):
    ctx = _context(tmp_path)
    ctx.start_suite("demo", budget_s=60.0)
    rows: list[common.Row] = []

    def inputs():
        return [torch.randn(64)]

    variants = {"eager": torch.neg, "compile": torch.abs}
    common.bench_case(rows, ctx, "demo op", "(64,)", torch.float32, inputs, variants)
    with open(tmp_path / "demo.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["backend"] for r in written] == ["eager", "compile"]
    assert float(written[1]["vs_eager"]) > 0  # ratios filled in on every write

    ctx.deadline = time.monotonic() - 1  # the budget is spent: the next case does not run
    common.bench_case(rows, ctx, "demo op", "(128,)", torch.float32, inputs, variants)
    with open(tmp_path / "demo.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 3
    assert written[2]["shape"] == "(128,)" and "not run" in written[2]["note"]
    assert "not run" in (tmp_path / "demo.md").read_text()


def test_fwd_bwd_timing_starts_each_call_without_gradients(tmp_path):
    """Every timed training step starts from no gradients (as after zero_grad(set_to_none=True)):
    the parameters end with one call's gradient, not the sum over every call timed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    common.bench_case([], _context(None), "linear", "(4, 8)", torch.float32, lambda: [x],
                      {"eager": common.on_references(model)}, backward=True)  # fmt: skip
    timed = model.weight.grad.clone()
    model.weight.grad = None
    model(x).backward(torch.ones(4, 8))
    torch.testing.assert_close(timed, model.weight.grad)


def test_references_only_calls_the_reference_directly():
    from fastdit.ops import adaln

    x, shift, scale = torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 16)
    adaln._modulate.last_backend = None
    out = common.on_references(lambda *a: adaln._modulate(*a, 1e-6))(x, shift, scale)
    assert adaln._modulate.last_backend is None  # no dispatch: not a custom-op call
    torch.testing.assert_close(out, adaln.reference_modulate(x, shift, scale, 1e-6))
    adaln._modulate(x, shift, scale, 1e-6)
    assert adaln._modulate.last_backend is not None  # restored afterwards
