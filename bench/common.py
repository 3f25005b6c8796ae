"""What every benchmark script shares: timing, the machine's limits, result rows and files.

Timing (DESIGN.md, "Benchmarks"): on a GPU, CUDA events around each call, the median of many
calls after warm-up, rotating through enough copies of the inputs that they do not all fit in
the L2 cache; on the CPU, the median of wall-clock calls. The limits are measured in the same
run: a large device-to-device copy (bytes read + written per second) and a large matrix product
in the benchmark's dtype.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 * 2**20  # rotate inputs through at least this much memory on a GPU


@dataclass
class Row:
    bench: str  # e.g. "adaln_modulate fwd"
    shape: str
    dtype: str
    backend: str  # "eager", "compile", "cuda", "triton", ...
    time_us: float
    gbps: float | None = None  # achieved bandwidth, counting only the bytes that must move
    tflops: float | None = None
    of_limit: float | None = None  # share of the copy bandwidth or the matmul peak measured
    # here, whichever is larger (the limit the row is closer to)
    vs_eager: float | None = None  # eager time / this time
    vs_compile: float | None = None  # compile time / this time
    note: str = ""


@dataclass
class Limits:
    device: str
    copy_gbps: float
    matmul_tflops: dict[str, float] = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_sets(make_inputs: Callable[[], Sequence[object]], rotate: bool) -> list[Sequence[object]]:
    """One set of inputs, or with ``rotate`` as many as hold L2_FLUSH_BYTES in their tensors (at
    most 64), so that no timed call finds its inputs in the L2 cache where an earlier call left
    them. Counted from the inputs alone: the bytes a call writes or reads twice do not rotate."""
    sets = [make_inputs()]
    size = sum(t.nbytes for t in sets[0] if isinstance(t, torch.Tensor))
    if rotate and size:
        sets += [make_inputs() for _ in range(min(64, -(-L2_FLUSH_BYTES // size)) - 1)]
    return sets


HOST_TIMING = False  # set by host_timing(): time the host's pace of calls, the GPU given no lead


@contextlib.contextmanager
def host_timing():
    """time_call without the GPU's lead (bench_overhead: the host's pace is what it measures)."""
    global HOST_TIMING
    saved, HOST_TIMING = HOST_TIMING, True
    try:
        yield
    finally:
        HOST_TIMING = saved


LEAD_S = 0.002  # the longest lead a call's events get (seconds of GPU spin)
SPIN_HZ = 2.0e9  # clock cycles a second assumed for torch.cuda._sleep: more than an H100's


def time_call(
    fn: Callable[..., object],
    make_inputs: Callable[[], Sequence[object]],
    device: torch.device,
    *,
    min_reps: int = 5,
    budget_s: float = 0.5,
) -> float:
    """Median time of ``fn(*inputs)`` in microseconds; on a GPU the calls rotate through
    ``input_sets``, and each is the GPU's time between two events around it.

    On a GPU, unless HOST_TIMING, each call's events follow a spin of the GPU (LEAD_S at most,
    about one whole call) during which the host enqueues the call: without that lead a call
    whose host work (Python, dispatch, launches) outlasts its kernels, a 10-50 us kernel of
    these benches, is timed at the host's pace, as the GPU idles between its launches."""
    inputs = input_sets(make_inputs, rotate=device.type == "cuda")
    copies = len(inputs)
    for i in range(2):  # warm-up (and compilation, for torch.compile)
        fn(*inputs[i % copies])
    synchronize(device)
    start = time.perf_counter()
    fn(*inputs[0])
    synchronize(device)
    once = time.perf_counter() - start
    lead = device.type == "cuda" and not HOST_TIMING
    # the lead spins the GPU for up to one call's wall time: half the budget's calls
    reps = int(max(min_reps, min(200, budget_s / max(once, 1e-6) / (2 if lead else 1))))
    samples = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        spin = int(min(once, LEAD_S) * SPIN_HZ)
        for i, (begin, end) in enumerate(events):
            if lead:
                torch.cuda._sleep(spin)
            begin.record()
            fn(*inputs[i % copies])
            end.record()
        synchronize(device)
        samples = [begin.elapsed_time(end) * 1e3 for begin, end in events]
    else:
        for i in range(reps):
            start = time.perf_counter()
            fn(*inputs[i % copies])
            samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def measure_limits(device: torch.device, dtypes: Sequence[torch.dtype]) -> Limits:
    """The copy bandwidth and matmul peak of this device, measured now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # bytes per buffer
    buffers = (
        torch.ones(n, dtype=torch.uint8, device=device),
        torch.empty(n, dtype=torch.uint8, device=device),
    )
    t = time_call(lambda a, b: b.copy_(a), lambda bufs=buffers: bufs, device, min_reps=10)
    copy_gbps = 2 * n / t / 1e3  # bytes read + bytes written
    del buffers
    peaks = {}
    for dtype in dtypes:
        size = 8192 if device.type == "cuda" else 1024
        pair = tuple(torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        t = time_call(torch.mm, lambda pair=pair: pair, device, min_reps=5)
        peaks[str(dtype).removeprefix("torch.")] = 2 * size**3 / t / 1e6
    return Limits(device_name(device), copy_gbps, peaks)


COMPILES_PER_FUNCTION = 1024


def compiled(fn: Callable[..., object], backend: str = "inductor") -> Callable[..., object]:
    """torch.compile of ``fn``, the strongest baseline PyTorch offers without hand kernels.

    A suite compiles one reference function (one code object) for every shape it measures, and
    Dynamo allows 8 compilations per code object by default; past that, fullgraph=True fails.
    The limits are raised so that every shape gets its own compiled graph."""
    import torch._dynamo.config as dynamo

    for new, old in (("recompile_limit", "cache_size_limit"),
                     ("accumulated_recompile_limit", "accumulated_cache_size_limit")):  # fmt: skip
        name = new if hasattr(dynamo, new) else old  # the old names before torch 2.6
        setattr(dynamo, name, max(getattr(dynamo, name), COMPILES_PER_FUNCTION))
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


@contextlib.contextmanager
def references_only():
    """Every fastdit op call runs its plain PyTorch reference directly (no custom-op node): what
    the authors' code computes, as they compute it. torch.compile then sees through the ops (an
    opaque custom op would keep Inductor from fusing across it), and an ONNX export decomposes
    them into ATen."""
    from fastdit.ops._op import Op

    call = Op.__call__
    Op.__call__ = lambda self, *inputs, backend=None: self.reference(*inputs)  # type: ignore
    try:
        yield
    finally:
        Op.__call__ = call  # type: ignore[method-assign]


def _within(fn: Callable[..., object], context: Callable[[], object]) -> Callable[..., object]:
    """``fn`` (a model, or a wrapped one) called inside ``context()``; a model's parameters
    stay reachable (bench_case's fwd+bwd resets their gradients)."""

    def run(*inputs):
        with context():
            return fn(*inputs)

    if hasattr(fn, "parameters"):
        run.parameters = fn.parameters
    return run


def on_references(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` (a model, or its compiled form) called under references_only()."""
    return _within(fn, references_only)


def under_autocast(
    fn: Callable[..., object], device: torch.device, dtype: torch.dtype
) -> Callable[..., object]:
    """``fn`` called inside ``torch.autocast(device, dtype)``: mixed precision training,
    float32 weights."""
    return _within(fn, lambda: torch.autocast(device.type, dtype=dtype))


def copy_of_inputs(count: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A variant that copies the first ``count`` inputs of a case (its activations, which hold
    nearly all of a memory-bound op's bytes) into new tensors: the same bytes in and out as the
    op, at the op's sizes, inputs and allocations, moved by PyTorch's copy kernel. Its row
    (backend "copy", timed like any other, its GB/s counted with the op's floor) shows how
    near the copy bandwidth, measured on 256 MiB buffers, a shape this small can come at all:
    a few MB take a few microseconds, where a kernel's start and end are no longer small."""

    def copy(*inputs):
        return tuple(torch.empty_like(t).copy_(t) for t in inputs[:count])

    return copy


def add_ratios(rows: list[Row]) -> None:
    """Fill vs_eager / vs_compile from the eager and compile rows of the same bench and shape."""
    base: dict[tuple[str, str, str, str], float] = {}
    for r in rows:
        if r.backend in ("eager", "compile"):
            base[(r.bench, r.shape, r.dtype, r.backend)] = r.time_us
    for r in rows:
        eager = base.get((r.bench, r.shape, r.dtype, "eager"))
        comp = base.get((r.bench, r.shape, r.dtype, "compile"))
        r.vs_eager = eager / r.time_us if eager else None
        r.vs_compile = comp / r.time_us if comp else None


def _git_commit() -> str:
    """FASTDIT_COMMIT where the caller set it (a lent machine gets a copy of the tree without
    git's metadata, perhaps inside another git work tree); else the checkout's commit (short,
    "-dirty" with uncommitted changes to tracked files)."""
    if os.environ.get("FASTDIT_COMMIT"):
        return os.environ["FASTDIT_COMMIT"]
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def header(device: torch.device) -> dict[str, str]:
    triton_version = "not installed"
    with contextlib.suppress(Exception):
        import triton

        triton_version = triton.__version__
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_rows(rows: Sequence[Row]) -> None:
    cols = "bench shape dtype backend time_us GB/s TFLOP/s of_limit vs_eager vs_compile note"
    print(" | ".join(cols.split()))
    for r in rows:
        print(
            " | ".join(
                [
                    r.bench,
                    r.shape,
                    r.dtype,
                    r.backend,
                    f"{r.time_us:.1f}",
                    _fmt(r.gbps, ".0f"),
                    _fmt(r.tflops, ".1f"),
                    _fmt(r.of_limit, ".0%"),
                    _fmt(r.vs_eager, ".2f"),
                    _fmt(r.vs_compile, ".2f"),
                    r.note,
                ]
            )
        )


def write_results(
    out_dir: Path, name: str, rows: Sequence[Row], limits: Limits, head: dict[str, str]
) -> None:
    """``<out_dir>/<name>.csv`` and ``<out_dir>/<name>.md``, each replaced whole (written
    aside, then renamed): a suite stopped from outside mid-write keeps its previous files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0]).keys()) if rows else ["bench"])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    _replace(out_dir / f"{name}.csv", buffer.getvalue())
    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in head.items()]
    lines.append(f"- copy bandwidth measured: {limits.copy_gbps:.0f} GB/s")
    for dtype, peak in limits.matmul_tflops.items():
        lines.append(f"- matmul peak measured ({dtype}): {peak:.1f} TFLOP/s")
    lines += [
        "",
        "| bench | shape | dtype | backend | time (us) | GB/s | TFLOP/s | of limit "
        "| vs eager | vs compile | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.bench} | {r.shape} | {r.dtype} | {r.backend} | {r.time_us:.1f} "
            f"| {_fmt(r.gbps, '.0f')} | {_fmt(r.tflops, '.1f')} | {_fmt(r.of_limit, '.0%')} "
            f"| {_fmt(r.vs_eager, '.2f')} | {_fmt(r.vs_compile, '.2f')} | {r.note} |"
        )
    _replace(out_dir / f"{name}.md", "\n".join(lines) + "\n")


def _replace(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that the file is, at any moment, the old or the new one."""
    aside = path.with_name(f".{path.name}.partial")
    with open(aside, "w", newline="") as f:
        f.write(text)
    os.replace(aside, path)


@dataclass
class Context:
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    quick: bool  # the small CPU default
    limits: Limits
    backward: bool = True
    out: Path | None = None  # the results folder: <suite>.csv / .md rewritten after every case
    suite: str = ""
    deadline: float | None = None  # time.monotonic() after which no case starts
    head: dict[str, str] = field(default_factory=dict)
    # (shard, shards): time nothing, only fill torch.compile's on-disk caches by calling each
    # compiled variant of this shard's cases once (see _warm_compiled)
    warm: tuple[int, int] | None = None

    def start_suite(self, suite: str, budget_s: float | None = None) -> None:
        """Name the suite whose rows the next cases write, and give it ``budget_s`` seconds."""
        self.suite = suite
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def owns(self, bench: str, shape: str, dtype: torch.dtype) -> bool:
        """When warming the compile caches: does this shard compile that case? Cases are dealt
        to shards by a hash of their key, so every shard decides alike without counting."""
        if self.warm is None:
            return True
        shard, shards = self.warm
        key = f"{self.suite}|{bench}|{shape}|{_dt(dtype)}"
        return zlib.crc32(key.encode()) % shards == shard

    def checkpoint(self, rows: list[Row]) -> None:
        """Write the rows so far, so that a suite stopped from outside keeps what it measured."""
        if self.out is not None and self.suite and rows:
            add_ratios(rows)
            write_results(self.out, self.suite, rows, self.limits, self.head)


def kernel_backends(ops: Sequence[object], device: torch.device) -> dict[str, str]:
    """backend -> '' if it can run every op given here on ``device``, else why not."""
    from fastdit.backends import unavailable_reason

    result = {}
    for backend in ("cuda", "triton"):
        reason = "" if all(backend in op.kernels for op in ops) else "no kernel yet"
        reason = reason or unavailable_reason(backend, device)
        if not reason and device.type == "cpu":
            reason = "Triton's CPU interpreter checks correctness, its timings mean nothing"
        result[backend] = reason
    return result


def bench_case(
    rows: list[Row],
    ctx: Context,
    bench: str,
    shape: str,
    dtype: torch.dtype,
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    variants: dict[str, Callable[..., object]],
    *,
    bytes_moved: int = 0,
    flops: int = 0,
    backward: bool = False,
) -> None:
    """Time every variant (name -> fn over the inputs) on one case and append its rows.

    With ``backward``, each call runs the forward and then the backward of every output with a
    cotangent of ones, the inputs requiring gradients. When warming the compile caches
    (``ctx.warm``), only this shard's cases run, each compiled variant once, and no row is kept.
    """
    label = f"{bench} {'fwd+bwd' if backward else 'fwd'}"
    if ctx.warm is not None:
        if ctx.owns(bench, shape, dtype):
            _warm_compiled(ctx, label, shape, make_inputs, variants, backward)
        return
    if ctx.deadline is not None and time.monotonic() > ctx.deadline:
        rows.append(Row(label, shape, _dt(dtype), ", ".join(variants), float("nan"),
                        note="not run: the suite's time budget was spent"))  # fmt: skip
        ctx.checkpoint(rows)
        return
    make = _with_grad(make_inputs) if backward else make_inputs
    # torch.compile's variants last: a cold compile can take a case's whole share of the time,
    # and the rows timed before it are kept (written after each variant) if it is cut off
    for name, fn in sorted(variants.items(), key=lambda item: is_compiled(item[0])):
        call = _step(fn) if backward else fn

        def timed(call=call):
            with contextlib.nullcontext() if backward else torch.no_grad():
                return time_call(call, make, ctx.device)

        try:
            t, note = timed(), ""
        except Exception as e:  # noqa: BLE001  (a failing variant is reported, not fatal)
            print(f"{label} {shape} {_dt(dtype)} {name} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)  # the whole story, in the run's log
            t, note = math.nan, f"failed: {first_line(e)}"
            in_time = ctx.deadline is None or time.monotonic() < ctx.deadline
            if is_compiled(name) and in_time and _retries_without_caches[0] > 0:
                t, note = _compile_again_without_caches(timed, e)
        row = Row(label, shape, _dt(dtype), name, t, note=note)
        if math.isnan(t):
            rows.append(row)
            ctx.checkpoint(rows)
            continue
        shares = []
        if bytes_moved:
            row.gbps = bytes_moved / t / 1e3
            shares.append(row.gbps / ctx.limits.copy_gbps)
        if flops:
            row.tflops = flops / t / 1e6
            peak = ctx.limits.matmul_tflops.get(_dt(dtype))
            shares += [row.tflops / peak] if peak else []
        row.of_limit = max(shares) if shares else None  # the limit this row comes closer to
        rows.append(row)
        ctx.checkpoint(rows)


# A background compile stopped mid-write (gpu_check.sh) can leave a broken entry in Inductor's
# caches on disk, which fails a compile that would work. A compiled variant that fails is tried
# once more without the caches, within its suite's time, a few times a process at most: a
# failure that recurs on every shape (a graph break, say) must not double every compile.
_retries_without_caches = [3]


def _compile_again_without_caches(timed: Callable[[], float], error: Exception):
    """(time, note) of ``timed()`` compiled afresh, Inductor's caches off; (NaN, note) if it
    fails again, the note naming both errors where they differ."""
    from torch import _dynamo
    from torch._inductor import config as inductor_config

    _retries_without_caches[0] -= 1
    print("compiling it again without Inductor's caches", file=sys.stderr)
    try:
        _dynamo.reset()
        with inductor_config.patch(force_disable_caches=True):
            return timed(), f"compiled again without caches after: {first_line(error)}"
    except Exception as again:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        note = f"failed: {first_line(error)}"
        if first_line(again) != first_line(error):
            note += f"; without caches: {first_line(again)}"
        return math.nan, note


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, for one row of a table."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _step(fn: Callable[..., object]) -> Callable[..., None]:
    """One training step through ``fn``: the forward, then the backward of every output with a
    cotangent of ones."""

    def call(*inputs):
        # A training step starts with no gradients (zero_grad(set_to_none=True)); else every
        # call after the first would also time AccumulateGrad's in-place adds.
        params = fn.parameters() if hasattr(fn, "parameters") else ()
        for t in (*inputs, *params):
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return call


def _with_grad(make_inputs: Callable[[], Sequence[object]]) -> Callable[[], list[object]]:
    """``make_inputs`` whose floating-point tensors require gradients."""

    def make():
        return [t.detach().requires_grad_() if t.is_floating_point() else t for t in make_inputs()]

    return make


def is_compiled(variant: str) -> bool:
    """A variant that runs torch.compile's code ("compile", "fastdit+compile", ...)."""
    return "compile" in variant


def _warm_compiled(
    ctx: Context,
    label: str,
    shape: str,
    make_inputs: Callable[[], Sequence[object]],
    variants: dict[str, Callable[..., object]],
    backward: bool,
) -> None:
    """Call each torch.compile variant of one case once, as bench_case would (same inputs, same
    grad mode), so its compiled graphs land in Inductor's caches on disk; time nothing."""
    make = _with_grad(make_inputs) if backward else make_inputs
    for name, fn in variants.items():
        if not is_compiled(name):
            continue
        start = time.perf_counter()
        try:
            with contextlib.nullcontext() if backward else torch.no_grad():
                (_step(fn) if backward else fn)(*make())
            synchronize(ctx.device)
            result = f"{time.perf_counter() - start:.1f} s"
        except Exception as e:  # noqa: BLE001  (the timed run will report it)
            result = f"failed: {type(e).__name__}: {e}"
        print(f"warm {ctx.suite}: {label} {shape} {name}: {result}", flush=True)


def check_backward_backend(rows: list[Row], op, variants, make_inputs) -> None:
    """Notes on a kernel's fwd+bwd row whose backward ran on another backend (then it is not a
    number for that kernel's backward): one more fwd+bwd call per kernel, outside the timing."""
    for row in rows:
        if row.backend not in ("cuda", "triton") or row.note:
            continue
        op.last_backward_backend = None
        try:
            inputs = [t.detach().requires_grad_() for t in make_inputs()]
            out = variants[row.backend](*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        except Exception as e:  # noqa: BLE001  (this row's note, not the end of the suite)
            print(
                f"{row.bench} {row.shape} {row.dtype} {row.backend} check failed:", file=sys.stderr
            )
            traceback.print_exc(file=sys.stderr)
            row.note = f"backward check failed: {first_line(e)}"
            continue
        if op.last_backward_backend != row.backend:
            row.note = f"backward ran on {op.last_backward_backend}, not {row.backend}"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parser(doc: str | None):
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small default (automatic on CPU)")
    p.add_argument("--full", action="store_true", help="the full shapes even on a CPU")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--out", type=Path, help="folder for the CSV and markdown results")
    p.add_argument(
        "--budget", type=float, metavar="SECONDS",
        help="per suite: cases that would start later are listed as not run",
    )  # fmt: skip
    p.add_argument(
        "--warm-compiles", type=_shard, metavar="I/N",
        help="time nothing: compile the torch.compile variants of shard I of N (0-based) of the\n"
        "cases, filling Inductor's caches on disk for a later timed run with the same arguments",
    )  # fmt: skip
    return p


def _shard(text: str) -> tuple[int, int]:
    import argparse

    try:
        shard, shards = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/4; got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"shard I must be in 0..N-1; got {text!r}")
    return shard, shards


def context_from(args) -> Context:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # float32 means IEEE float32 in every variant, as in the tests (tests/conftest.py): cuDNN
        # would otherwise run eager's and Inductor's float32 convolutions on TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = False
    quick = args.quick or (device.type == "cpu" and not args.full)
    default = ("bf16",) if device.type == "cuda" else ("fp32",)
    dtypes = tuple(DTYPES[d] for d in (args.dtype or default))
    warm = getattr(args, "warm_compiles", None)
    if warm is not None:  # nothing is timed: no limits, no results
        # Inductor picks each generated kernel's launch configuration by timing the candidates
        # at its first call, and by default keeps the winner beside the kernel. A warm process
        # shares the GPU with the others and the tests, so its winners are not kept: the flag
        # is written into each kernel's code (and is not part of the graph cache's key), so the
        # timed run's first calls time the candidates again, alone on the GPU.
        import torch._inductor.config as inductor

        inductor.autotune_local_cache = False
        print(f"device: {device_name(device)}; compiling shard {warm[0]} of {warm[1]}")
        return Context(device, dtypes, quick, Limits(device_name(device), float("nan")),
                       backward=not args.no_backward, warm=warm)  # fmt: skip
    print(f"device: {device_name(device)}; measuring copy bandwidth and matmul peak ...")
    limits = measure_limits(device, dtypes)
    peaks = ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in limits.matmul_tflops.items())
    print(f"limits: copy {limits.copy_gbps:.0f} GB/s; matmul {peaks}")
    return Context(
        device, dtypes, quick, limits, backward=not args.no_backward, out=args.out,
        head=header(device),
    )  # fmt: skip


def standalone_context(doc: str | None, suite: str) -> tuple[Context, Path | None]:
    args = parser(doc).parse_args()
    ctx = context_from(args)
    ctx.start_suite(suite, args.budget)
    return ctx, args.out


def report(rows: Sequence[Row], ctx: Context, name: str, out: Path | None) -> None:
    if ctx.warm is not None:  # nothing was timed
        return
    print_rows(rows)
    if out is not None:
        add_ratios(rows)
        write_results(out, name, rows, ctx.limits, ctx.head or header(ctx.device))
        print(f"wrote {out / (name + '.csv')} and .md")
