"""The benchmark suite's machinery, on the CPU: what must not fail on a GPU machine's first,
time-limited run (bench/gpu_check.sh), where a suite is stopped from outside and one reference
function is compiled for every shape measured."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import pytest
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


def test_compiled_variants_run_last_and_a_failure_is_one_line(tmp_path, capsys):
    """A cold torch.compile can take a case's whole share: the other variants are timed (and
    written) before it. A failing variant's note is its message's first line (one table row),
    its traceback goes to stderr."""
    ctx = _context(tmp_path)
    ctx.start_suite("demo", budget_s=60.0)
    rows: list[common.Row] = []

    def broken(x):
        raise RuntimeError("first line\nsecond line")

    variants = {"eager": torch.neg, "compile": torch.abs, "cuda": broken, "triton": torch.neg}
    common.bench_case(rows, ctx, "demo op", "(64,)", torch.float32, lambda: [torch.ones(64)],
                      variants)  # fmt: skip
    assert [r.backend for r in rows] == ["eager", "cuda", "triton", "compile"]
    assert rows[1].note == "failed: first line"
    assert "second line" in capsys.readouterr().err
    assert "second line" not in (tmp_path / "demo.md").read_text()


def test_a_failed_compiled_variant_is_compiled_again_without_caches(tmp_path, monkeypatch):
    """A compiled variant that fails (a broken entry in Inductor's caches on disk, left by a
    background compile stopped mid-write) is tried once more with the caches off: timed, with a
    note, if that works; a failed row if it fails again. Other variants are not retried, nor
    any once the process's retries are spent."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(common, "_retries_without_caches", [3])
    ctx = _context(tmp_path)
    ctx.start_suite("demo", budget_s=60.0)
    calls = {"compile": 0, "cuda": 0}
    caches_off = []

    def broken_cache(x):  # fails while Inductor's caches are on
        calls["compile"] += 1
        caches_off.append(inductor.force_disable_caches)
        if not inductor.force_disable_caches:
            raise ImportError("main.so: file too short")
        return torch.neg(x)

    def always(name):
        def fn(x):
            calls[name] += 1
            raise RuntimeError(f"{name} is broken")

        return fn

    variants = {"compile": broken_cache, "cuda": always("cuda"), "fastdit+compile": torch.abs}
    rows: list[common.Row] = []
    common.bench_case(rows, ctx, "demo op", "(64,)", torch.float32, lambda: [torch.ones(64)],
                      variants)  # fmt: skip
    by = {r.backend: r for r in rows}
    assert by["compile"].time_us > 0
    assert by["compile"].note == "compiled again without caches after: main.so: file too short"
    assert caches_off[0] is False and all(caches_off[1:]) and inductor.force_disable_caches is False
    assert calls["cuda"] == 1 and by["cuda"].note == "failed: cuda is broken"
    assert by["fastdit+compile"].time_us > 0 and by["fastdit+compile"].note == ""

    rows.clear()
    calls["compile"] = 0
    common.bench_case(rows, ctx, "demo op", "(64,)", torch.float32, lambda: [torch.ones(64)],
                      {"compile": always("compile")})  # fmt: skip
    assert calls["compile"] == 2  # the first call of each try
    assert rows[0].note == "failed: compile is broken" and rows[0].time_us != rows[0].time_us

    rows.clear()
    calls["compile"] = 0
    common._retries_without_caches[0] = 0
    common.bench_case(rows, ctx, "demo op", "(64,)", torch.float32, lambda: [torch.ones(64)],
                      {"compile": always("compile")})  # fmt: skip
    assert calls["compile"] == 1 and rows[0].note == "failed: compile is broken"


def test_inputs_rotate_through_the_l2_flush_bytes_on_a_gpu():
    made = []

    def inputs(n):
        def make():
            made.append(1)
            return [torch.empty(n, dtype=torch.uint8), 3, None]  # non-tensors count nothing

        return make

    assert len(common.input_sets(inputs(1 << 20), rotate=False)) == 1
    assert len(common.input_sets(inputs(100 << 20), rotate=True)) == 3  # 256 MB / 100 MB
    assert len(common.input_sets(inputs(1 << 20), rotate=True)) == 64  # at most 64
    assert len(common.input_sets(inputs(1 << 30), rotate=True)) == 1
    assert len(common.input_sets(lambda: (), rotate=True)) == 1
    assert len(made) == 1 + 3 + 64 + 1


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


def _call_once(fn, make_inputs, device, **_):
    """common.time_call for the model cases' tests: their wiring is checked, not the timing."""
    fn(*make_inputs())
    return 1.0


def test_udit_tricks_training_step_runs(tmp_path, monkeypatch):
    """The GPU run's first models case (issue 6's end-to-end target), both forms (bf16 weights;
    float32 weights under bf16 autocast), on a small U-DiT on the CPU: every row timed, none
    failed, the notes say which model and which precision each row is."""
    import bench_models

    monkeypatch.setenv("FASTDIT_BACKEND", "torch")  # Triton's interpreter would take minutes

    monkeypatch.setattr(common, "time_call", _call_once)
    ctx = _context(tmp_path)
    ctx.start_suite("models", budget_s=600.0)
    rows: list[common.Row] = []
    from fastdit.models import UDiT

    autocast_on = []  # per model call: was autocast on, and what dtype were the weights

    def seen(module, args, out):
        if isinstance(module, UDiT):
            autocast_on.append(
                (torch.is_autocast_enabled("cpu"), module.t_embedder_1.mlp[0].weight.dtype)
            )

    hook = torch.nn.modules.module.register_module_forward_hook(seen)
    try:
        bench_models._udit_tricks(ctx, rows, "U-DiT-S", batch=1, latent=16)
    finally:
        hook.remove()
    bf16, f32 = torch.bfloat16, torch.float32
    assert autocast_on == [(False, bf16)] * 3 + [(True, f32)] * 3
    variants = ["eager", "fastdit", "fastdit channels-last"]
    assert [(r.bench, r.backend) for r in rows] == [
        ("U-DiT-S train step fwd+bwd", b) for b in variants
    ] + [("U-DiT-S train step, autocast fwd+bwd", b) for b in variants]
    for row in rows:
        assert row.time_us > 0 and "failed" not in row.note, row
    assert "without the tricks" in rows[3].note and "autocast" in rows[3].note
    assert "with the tricks; bf16 weights" in rows[1].note
    assert "channels_last=True; fp32 weights" in rows[5].note
    with open(tmp_path / "models.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_udit_sampling_times_both_layouts(tmp_path, monkeypatch):
    """The GPU run's U-DiT sampling case on a small U-DiT on the CPU: eager, fastdit and fastdit
    channels-last rows, each timed, and the channels-last model's attention layers really see
    channels-last images (the default model's channels-first ones)."""
    import bench_models

    from fastdit.nn.udit import DownsampledAttention

    monkeypatch.setenv("FASTDIT_BACKEND", "torch")
    monkeypatch.setattr(common, "time_call", _call_once)
    ctx = _context(tmp_path)
    ctx.start_suite("models", budget_s=600.0)
    layouts = []

    def seen(module, args):
        if isinstance(module, DownsampledAttention):
            x = args[0]
            layouts.append(
                x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            )

    hook = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    rows: list[common.Row] = []
    try:
        bench_models._udit_sampling(ctx, rows, "U-DiT-S", batch=1, latent=16)
    finally:
        hook.remove()
    assert [(r.bench, r.backend) for r in rows] == [
        ("U-DiT-S sampling fwd", b) for b in ("eager", "fastdit", "fastdit channels-last")
    ]
    for row in rows:
        assert row.time_us > 0 and "failed" not in row.note, row
    per_call = len(layouts) // 3
    assert per_call > 0 and layouts == [False] * (2 * per_call) + [True] * per_call


def test_overhead_suite_times_the_dispatch_on_a_stub_kernel(tmp_path, monkeypatch):
    """The host-overhead suite on the CPU: eager, torch and stub rows for every op, forward and
    fwd+bwd; the stub kernel really served its calls, forward and backward, and every kernel
    and the backends' availability are restored afterwards."""
    import importlib

    import bench_overhead

    backends = importlib.import_module("fastdit.backends")
    ops = [op for _, op, *_ in bench_overhead._cases(torch.device("cpu"), torch.float32)]
    kernels = [dict(op.kernels) for op in ops]
    reason = backends.unavailable_reason
    monkeypatch.setattr(common, "time_call", _call_once)
    ctx = _context(tmp_path)
    ctx.start_suite("overhead", budget_s=600.0)
    rows = bench_overhead.run(ctx)
    for op in ops:
        assert op.last_backend == op.last_backward_backend == "triton", op.name
    expected = [
        (f"{op.name} host {kind}", backend)
        for op in ops
        for kind in ("fwd", "fwd+bwd")
        for backend in ("eager", "torch", "stub")
    ]
    assert [(r.bench, r.backend) for r in rows] == expected
    for row in rows:
        assert row.time_us > 0 and "failed" not in row.note, row
    assert [dict(op.kernels) for op in ops] == kernels
    assert backends.unavailable_reason is reason


def _warm_context(shard: int, shards: int) -> common.Context:
    ctx = _context(None)
    ctx.warm = (shard, shards)
    ctx.start_suite("demo")
    return ctx


def test_warm_compiles_each_compiled_variant_once_across_shards_and_times_nothing(monkeypatch):
    """--warm-compiles I/N: the shards together call every case's compiled variants exactly once
    (forward, or forward and backward as the timed run does), never the other variants, time
    nothing and keep no row."""

    def no_timing(*args, **kwargs):
        raise AssertionError("a warm run timed something")

    monkeypatch.setattr(common, "time_call", no_timing)
    calls: list[tuple[str, int, bool]] = []

    def variant(name):
        def fn(x):
            calls.append((name, x.shape[0], torch.is_grad_enabled() and x.requires_grad))
            return x * 2

        return fn

    variants = {v: variant(v) for v in ("eager", "compile", "fastdit+compile", "cuda")}
    sizes = range(1, 41)
    per_shard = []
    for shard in range(3):
        ctx = _warm_context(shard, 3)
        rows: list[common.Row] = []
        before = len(calls)
        for n in sizes:
            inputs = lambda n=n: [torch.randn(n)]  # noqa: E731
            common.bench_case(rows, ctx, "demo op", f"({n},)", torch.float32, inputs, variants)
            common.bench_case(rows, ctx, "demo op", f"({n},)", torch.float32, inputs, variants,
                              backward=True)  # fmt: skip
        assert rows == []
        per_shard.append(len(calls) - before)
    assert {name for name, _, _ in calls} == {"compile", "fastdit+compile"}
    expected = {(v, n, grad) for v in ("compile", "fastdit+compile") for n in sizes
                for grad in (False, True)}  # fmt: skip
    assert sorted(calls) == sorted(expected)  # each exactly once, over all shards
    assert all(count > 0 for count in per_shard), per_shard  # the hash spreads the cases


def test_warm_models_suite_builds_only_the_models_its_shard_compiles(monkeypatch):
    """In a warm run with the GPU's cases the models suite builds no U-DiT (none of its rows is
    compiled), and builds DiT-XL/2 only in the shard that compiles it, which calls the compiled
    model once (a DiT-S/2 stands in for it here)."""
    import bench_models

    import fastdit.models

    built, compiled_calls = [], []
    create = fastdit.models.create

    def small_create(name, **kwargs):
        built.append(name)
        return create("DiT-S/2", **kwargs)

    def fake_compiled(fn, backend="inductor"):
        def run(*inputs):
            compiled_calls.append(type(fn).__name__)
            return fn(*inputs)

        return run

    monkeypatch.setattr(bench_models, "create", small_create)
    monkeypatch.setattr(fastdit.models, "create", small_create)  # what the U-DiT cases call
    monkeypatch.setattr(common, "compiled", fake_compiled)
    monkeypatch.setenv("FASTDIT_BACKEND", "torch")
    for shard in range(4):
        ctx = _warm_context(shard, 4)
        ctx.suite, ctx.quick = "models", False
        assert bench_models.run(ctx) == []
    assert built == ["DiT-XL/2"] and compiled_calls == ["DiT"]


_CACHE_SCRIPT = """
import sys, torch
sys.path.insert(0, {bench!r})
import common
from torch._dynamo.utils import counters

def reference(x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],)) * 1.5 + 0.25

warm = sys.argv[1] == "warm"
ctx = common.Context(torch.device("cpu"), (torch.float32,), True, common.Limits("cpu", 1.0),
                     warm=(0, 1) if warm else None)
ctx.start_suite("demo")
rows = []
common.bench_case(rows, ctx, "ln", "(8, 96)", torch.float32, lambda: [torch.randn(8, 96)],
                  {{"compile": common.compiled(reference)}})
assert (rows == []) == warm, rows
print("hits", counters["inductor"]["fxgraph_cache_hit"])
"""


def test_a_warm_run_fills_the_cache_that_the_timed_run_reads(tmp_path):
    """The point of --warm-compiles: a graph compiled by a warm process is loaded from
    Inductor's on-disk cache by the timed process (a hit, not a second compilation)."""
    import os
    import subprocess

    script = tmp_path / "cache.py"
    script.write_text(_CACHE_SCRIPT.format(bench=str(Path(common.__file__).parent)))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("TRITON_INTERPRET", None)

    def run(mode):
        done = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split()[-1]

    assert run("warm") == "0"  # compiled, nothing to hit yet
    assert run("timed") == "1"  # the timed process loads the warm process's graph


def test_results_name_the_commit_sent_where_the_tree_has_no_git(monkeypatch):
    """A lent GPU machine gets a copy of the tree without .git, perhaps inside another git
    work tree: the results carry FASTDIT_COMMIT (what gpu_check.sh's caller sets) wherever it is
    set, else git's answer, else "unknown"."""
    import subprocess

    def repository(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, "fedcba9\n" if "rev-parse" in args else "", "")

    def no_repository(args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(common.subprocess, "run", repository)
    monkeypatch.setenv("FASTDIT_COMMIT", "0123abc")
    assert common.header(torch.device("cpu"))["commit"] == "0123abc"
    monkeypatch.delenv("FASTDIT_COMMIT")
    assert common._git_commit() == "fedcba9"
    monkeypatch.setattr(common.subprocess, "run", no_repository)
    assert common._git_commit() == "unknown"


def test_targets_read_the_suites_results(tmp_path):
    """bench/targets.py on files written by common.write_results: a target met, one missed
    (its worst row named), a backward share derived from the fwd and fwd+bwd rows, the dtype
    filter, baselines left out (cast-first ones too), a case not run counted as not measured
    for each kernel it names, a suite with no file not measured."""
    import targets

    def row(bench, backend, t, gbps=None, of=None, eager=None, comp=None, dtype="bfloat16"):
        return common.Row(bench, "DiT-XL/2 B256", dtype, backend, t, gbps=gbps, of_limit=of,
                          vs_eager=eager, vs_compile=comp)  # fmt: skip

    copy = common.Limits("GPU", 3000.0)
    adaln = [
        row("gated_adaln fwd", "eager", 1000.0, 600.0, 0.2, 1.0, 0.5),
        row("gated_adaln fwd", "cuda", 100.0, 2700.0, 0.9, 10.0, 4.0),
        row("gated_adaln fwd", "triton", 120.0, 2250.0, 0.75, 8.0, 3.0),
        row("gated_adaln fwd", "cuda cast-first", 300.0, 900.0, 0.3, 3.3, 1.1),  # a baseline
        row("gated_adaln fwd", "copy", 95.0, 2850.0, 0.95, 10.5, 4.2),  # a baseline
        # fwd+bwd (cuda): the forward's 270 MB in 100 us, then 360 MB in 150 us (2400 GB/s)
        row("gated_adaln fwd+bwd", "cuda", 250.0, (270e3 + 360e3) / 250, None, 3.5, 1.1),
        row("gated_adaln fwd+bwd", "triton", float("nan")),  # failed: not measured
        row("adaln_modulate fwd", "cuda, triton", float("nan")),  # a case not run
    ]
    common.write_results(tmp_path, "adaln", adaln, copy, {"device": "H100", "commit": "abc"})
    downs = [
        row("downsampled_attention fwd", "cuda", 10.0, eager=2.5, comp=1.4),
        row("downsampled_attention fwd", "cuda", 10.0, eager=1.0, comp=0.5, dtype="float32"),
    ]
    common.write_results(tmp_path, "downsampled_attention", downs, copy, {})

    verdicts = {(v.target.what, v.backend): v for v in targets.check(tmp_path)}
    fwd = verdicts[("adaln forward: >= 85 % of the copy bandwidth", "cuda")]
    assert (fwd.status, fwd.met, fwd.measured) == ("met, partly measured", 1, 1)
    assert fwd.not_measured == 1  # the modulate case not run counts against cuda and triton
    fwd = verdicts[("adaln forward: >= 85 % of the copy bandwidth", "triton")]
    assert (fwd.status, fwd.worst["of_limit"], fwd.not_measured) == ("MISSED", 0.75, 1)
    assert fwd.worst["copy"] == 0.95  # the same case's copy, beside the worst row
    assert {b for _, b in verdicts} == {"cuda", "triton", "(none)"}  # no baseline judged
    bwd = verdicts[("adaln backward: >= 70 % of the copy bandwidth", "cuda")]
    assert bwd.status == "met"
    assert abs(bwd.worst["bwd_share"] - 0.8) < 1e-9  # 2400 GB/s of 3000 over the 150 us
    assert verdicts[("adaln backward: >= 70 % of the copy bandwidth", "triton")].not_measured == 1
    step = verdicts[("gated_adaln (the block step): >= 1.2x torch.compile", "cuda")]
    assert (step.status, step.met, step.measured, step.worst["vs_compile"]) == ("MISSED", 1, 2, 1.1)
    assert math.isnan(step.worst["copy"])  # a speed-up target: no copy share beside it
    eager = verdicts[("downsampled_attention layer, bf16: >= 2x eager", "cuda")]
    assert (eager.status, eager.measured) == ("met", 1)  # the float32 row is not a bf16 target's
    models = [v for (what, _), v in verdicts.items() if what.startswith("U-DiT-L")]
    assert [(v.backend, v.status) for v in models] == [("(none)", "not measured")]

    assert targets.main([str(tmp_path)]) == 0
    text = (tmp_path / "targets.md").read_text()
    assert "- device: H100" in text and "- commit: abc" in text
    assert "75%: gated_adaln fwd, DiT-XL/2 B256, bfloat16 (a copy of its inputs: 95%)" in text
    assert (
        "| 4 | gated_adaln (the block step): >= 1.2x torch.compile | cuda | MISSED | 1 / 2 "
        "| 1.10x: gated_adaln fwd+bwd, DiT-XL/2 B256, bfloat16 |" in text
    )
    assert targets.main([str(tmp_path / "missing")]) == 2


def test_attention_tile_sweep_checks_each_candidate_against_the_default(tmp_path, monkeypatch):
    """bench/tune_attention_tiles.py on its tiny CPU shape (Triton's interpreter): a row per
    kernel and candidate, the default tiles first with no difference, another tile's output
    within the dtype's rounding of the default's, one that writes a wrong value marked
    MISMATCH, attention_tiles put back afterwards, a tile tl.dot cannot take refused."""
    from fastdit.backends import triton_unavailable_reason

    if triton_unavailable_reason(torch.device("cpu")):
        pytest.skip(triton_unavailable_reason(torch.device("cpu")))
    import tune_attention_tiles as tune

    from fastdit.triton import downsampled_attention as kernels

    monkeypatch.setattr(common, "time_call", _call_once)
    default = kernels.attention_tiles

    def sweep(*args: str) -> list[list[str]]:
        monkeypatch.setattr(sys, "argv", ["tune", "--out", str(tmp_path), *args])
        tune.main()
        assert kernels.attention_tiles is default
        text = (tmp_path / "tune_attention_tiles.md").read_text()
        return [line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| tiny")]

    rows = sweep("--candidates", "32x32x4", "--dtype", "bf16")
    assert [(r[0], r[1]) for r in rows] == [
        (k, t) for k in ("fwd", "dq", "dkdv") for t in ("16x16x4", "32x32x4")
    ]
    for kernel, tiles, _us, _ratio, diff, note in rows:
        if tiles == "16x16x4":
            assert (float(diff), note) == (0.0, "default |"), (kernel, note)
        else:
            assert float(diff) < tune.MISMATCH[torch.bfloat16] and note == " |", (kernel, note)

    real = kernels._forward

    def wrong_at_32(pb, *args, **kw):  # a tile that loses a value
        out = real(pb, *args, **kw)
        if pb.tiles["fwd"]["BM"] == 32 and pb.out is not None:
            pb.out[0, :, 0, 0] += 1.0
        return out

    monkeypatch.setattr(kernels, "_forward", wrong_at_32)
    rows = sweep("--candidates", "32x32x4", "--kernels", "fwd")
    assert [r[-1] for r in rows] == ["default |", "MISMATCH |"]

    monkeypatch.setattr(sys, "argv", ["tune", "--candidates", "8x16x4"])
    with pytest.raises(SystemExit):
        tune.main()
