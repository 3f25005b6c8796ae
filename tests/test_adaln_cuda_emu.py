"""csrc/adaln.cu run on the CPU: the cuda backend of the adaln family without a GPU.

csrc/adaln.cu is compiled with g++ against tests/cuda_emu/emulate.h (every CUDA thread a fiber,
barriers and shuffles emulated, thread and block orders forward, reverse or random) into a
module with fastdit._C's adaln entries over host pointers (tests/cuda_emu/adaln_module.cpp).
The kernels' index arithmetic, reductions, vector and scalar paths, row-group shapes and split
bookkeeping are checked here on every machine with a C++ compiler and the CUDA headers:

- the entries called directly on NaN-poisoned outputs (and a NaN-poisoned partial-sum scratch),
  forward and backward of both ops, float32 / float16 / bfloat16, (B, L, D) tokens and
  channels-last (B, D, H, W) images, D from 1 to 8192 (every forward and backward kernel shape
  the launchers pick), and channels-first images (tiles of 32 tokens, 1 or 4 per thread, any D),
  against the float64 reference under the tolerance rule (DESIGN.md, Tests; tests/tolerance.py:
  error <= 2 x eager's in the same dtype + a tiny floor);
- the backward with several split counts (1, counts that do not divide L, empty splits, one row
  per split), bitwise identical when run again in another thread and block order;
- misaligned pointers (the scalar path) and rows longer than the register kernels hold;
- the Python glue (fastdit.ops.adaln's _cuda_* functions, split count from the emulated
  adaln_bwd_splits) through the ops' dispatch and autograd with backend="cuda".

Skipped (not failed) where g++, the CUDA headers or pybind11 are missing. The fiber emulation
is slow (~1 us per barrier per thread), so large D goes with few rows.
"""

from __future__ import annotations

import importlib
import re

import emulated
import pytest
import torch
from tolerance import assert_close_to_reference

import fastdit
from fastdit import _ext
from fastdit.ops import adaln as A

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPS = {False: A._modulate, True: A._gated}
EPS = 1e-6
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# The module: csrc/adaln.cu built for the CPU


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels as a module with fastdit._C's adaln entries (tests/emulated.py)."""
    return emulated.build("adaln")


@pytest.fixture
def kernels(emu):
    emu.configure(order=2, sms=2, seed=1)
    return emu


# ----------------------------------------------------------------------------------------------
# Inputs and the entries on NaN-poisoned outputs


def _image_hw(L: int) -> tuple[int, int]:
    """H, W with H * W = L (a wide image when L factors, else one column)."""
    for h in range(int(L**0.5), 0, -1):
        if L % h == 0:
            return h, L // h
    return 1, L


def _rows_like(B, L, D, layout, dtype, g, scale=1.0, offset=0.0):
    t = (torch.randn(B, L, D, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "tokens":
        return t
    h, w = _image_hw(L)
    if layout == "channels_first":  # a contiguous (B, D, H, W) image
        image = t.reshape(B, h, w, D).permute(0, 3, 1, 2).contiguous()
        assert A._cuda_channels_first(image)
        return image
    # (B, H*W, D) rows in memory, seen as a channels-last (B, D, H, W) image
    image = t.reshape(B, h, w, D).permute(0, 3, 1, 2)
    assert image.is_contiguous(memory_format=torch.channels_last)
    return image


def _inputs(gated, B, L, D, layout, dtype, seed):
    """The op's inputs (off-centre rows so that a one-pass variance would show) and the
    cotangents of its outputs, in x's layout."""
    g = torch.Generator().manual_seed(seed)
    x = _rows_like(B, L, D, layout, dtype, g, 2.0, 0.5)
    conds = [(torch.randn(B, D, generator=g, dtype=torch.float64) * 0.5).to(dtype) for _ in "sc"]
    if gated:
        y = _rows_like(B, L, D, layout, dtype, g, 1.5)
        gate = (torch.randn(B, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
        inputs = [x, y, gate, *conds, EPS]
    else:
        inputs = [x, *conds, EPS]
    cots = [_rows_like(B, L, D, layout, dtype, g) for _ in range(2 if gated else 1)]
    return inputs, cots


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _forward(C, gated, inputs):
    """The forward entry on NaN-filled outputs: out, or (r, out)."""
    x, eps = inputs[0], inputs[-1]
    sizes = (*A._rows_of(x), eps, CODES[x.dtype], CODES[inputs[1].dtype], None, 0,
             A._cuda_channels_first(x))  # fmt: skip
    if gated:
        x, y, gate, shift, scale, _ = inputs
        r, out = torch.full_like(x, NAN), torch.full_like(x, NAN)
        C.adaln_gated_fwd(_p(x), _p(y), _p(gate), _p(shift), _p(scale), _p(r), _p(out), *sizes)
        return r, out
    x, shift, scale, _ = inputs
    out = torch.full_like(x, NAN)
    C.adaln_modulate_fwd(_p(x), _p(shift), _p(scale), _p(out), *sizes)
    return out


def _backward(C, gated, inputs, cots, splits):
    """The backward entry on NaN-filled gradients and scratch: (gradients, partial)."""
    x, eps = inputs[0], inputs[-1]
    B, L, D = A._rows_of(x)
    sizes = (B, L, D, splits, eps, CODES[x.dtype], CODES[inputs[1].dtype], None, 0,
             A._cuda_channels_first(x))  # fmt: skip
    diff = [inputs[i] for i in OPS[gated].diff_index]
    grads = [torch.full_like(t, NAN) for t in diff]
    partial = torch.full(((3 if gated else 2) * B * splits * D,), NAN, dtype=torch.float32)
    if gated:
        x, y, gate, _, scale, _ = inputs
        dr, dout = cots
        C.adaln_gated_bwd(
            _p(x), _p(y), _p(gate), _p(scale), _p(dr), _p(dout), *map(_p, grads), _p(partial),
            *sizes,
        )  # fmt: skip
    else:
        x, _, scale, _ = inputs
        C.adaln_modulate_bwd(_p(x), _p(scale), _p(cots[0]), *map(_p, grads), _p(partial), *sizes)
    return grads, partial


def _as64(inputs):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]


def _check_forward(gated, got, inputs, what):
    op = OPS[gated]
    truth, eager = op.reference(*_as64(inputs)), op.reference(*inputs)
    if not gated:
        got, truth, eager = (got,), (truth,), (eager,)
    for name, g, e, t in zip(("r", "out") if gated else ("out",), got, eager, truth):
        assert_close_to_reference(g, e, t, f"{what}: {name}")


def _check_backward(gated, grads, inputs, cots, what):
    op = OPS[gated]
    truth = op._reference_backward([c.double() for c in cots], _as64(inputs))
    eager = op._reference_backward(cots, inputs)
    names = [op.arg_names[i] for i in op.diff_index]
    for name, g, e, t in zip(names, grads, eager, truth):
        assert_close_to_reference(g, e, t, f"{what}: d{name}")


def _case(C, gated, B, L, D, layout, dtype, splits, seed=0):
    """Forward and backward against the reference; the backward again in another thread and
    block order must agree bitwise (partial sums included)."""
    inputs, cots = _inputs(gated, B, L, D, layout, dtype, seed + B * 7919 + L * 31 + D)
    what = f"{'gated' if gated else 'modulate'} B={B} L={L} D={D} {layout} {dtype} splits={splits}"
    _check_forward(gated, _forward(C, gated, inputs), inputs, what)
    grads, partial = _backward(C, gated, inputs, cots, splits)
    assert torch.isfinite(partial).all(), f"{what}: a partial-sum row left unwritten"
    _check_backward(gated, grads, inputs, cots, what)
    C.configure(order=1, sms=2, seed=0)
    again, partial_again = _backward(C, gated, inputs, cots, splits)
    C.configure(order=2, sms=2, seed=1)
    assert torch.equal(partial, partial_again), f"{what}: partial sums not deterministic"
    for a, b in zip(grads, again):
        assert torch.equal(a, b), f"{what}: the backward is not deterministic"


# ----------------------------------------------------------------------------------------------
# The entries: every kernel shape, both layouts, the three dtypes

GATED = pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=str)


def _splits(L: int) -> int:
    """A split count that does not divide L where there is one (the glue's would be 1 or 2)."""
    return {1: 1, 7: 3, 37: 2}.get(L, 1)


# (B, L, layout): both batch sizes and every L in tokens; the kernels see channels-last images
# as the same rows, so fewer of them (the glue's handling of images is test_emulated_ops').
SHAPES = [(1, 1, "tokens"), (3, 1, "tokens"), (1, 7, "tokens"), (3, 7, "tokens"),
          (1, 37, "tokens"), (3, 37, "tokens"), (3, 7, "channels_last"),
          (1, 37, "channels_last")]  # fmt: skip


@GATED
@DTYPE
@pytest.mark.parametrize("B, L, layout", SHAPES)
@pytest.mark.parametrize("D", [1, 96])
def test_emulated_short_rows(kernels, gated, dtype, B, L, layout, D):
    """D = 1 (a row of one; 8-lane row groups in the backward), D = 96 (warp per row; 16-lane
    or 32-lane groups, several rows per block)."""
    _case(kernels, gated, B, L, D, layout, dtype, _splits(L))


@GATED
@pytest.mark.parametrize(
    "B, L, layout, dtype",
    [(1, 1, "tokens", t) for t in DTYPES]
    + [(3, 7, "channels_last", t) for t in DTYPES]
    + [(1, 37, "tokens", torch.float32), (1, 37, "tokens", torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("D", [1000, 1152])
def test_emulated_model_rows(kernels, gated, dtype, B, L, layout, D):
    """D = 1000 (8 vectors per lane, or 4, in warp-per-row; 128-256-thread row groups) and
    1152 (DiT-XL: a 128-thread block per row in fp32; 160-thread row groups)."""
    _case(kernels, gated, B, L, D, layout, dtype, _splits(L))


@GATED
@DTYPE
@pytest.mark.parametrize("B, L, layout", [(3, 1, "tokens"), (1, 7, "channels_last")])
@pytest.mark.parametrize("D", [4097, 8192])
def test_emulated_long_rows(kernels, gated, dtype, B, L, layout, D):
    """D = 4097 (scalar accesses: a 1024-thread block per row; 288-thread groups of 16 elements
    per thread) and 8192 (the largest the backward takes: 256-512-thread rows; 512-thread
    groups; gated re-reads y and dr)."""
    _case(kernels, gated, B, L, D, layout, dtype, _splits(L))


def _tiles(L: int) -> int:
    """The channels-first backward's splits: its tiles of 32 tokens."""
    return -(-L // 32)


# (B, L, D): L = 32 and 36 (4 tokens a thread: 32 channel slots; a second tile of one vector),
# L = 15 (1 token a thread: 8 slots), D below, at and past the first chunk of 4 channels a slot
# (D = 33: one slot with a fifth channel), U-DiT's widths 96 to 1536, and 8200 (past the row
# kernels' 8192: any D).
CF_SHAPES = [(2, 32, 96), (1, 36, 100), (3, 15, 33), (1, 64, 384), (2, 20, 1536)]


@GATED
@DTYPE
@pytest.mark.parametrize("B, L, D", CF_SHAPES)
def test_emulated_channels_first(kernels, gated, dtype, B, L, D):
    _case(kernels, gated, B, L, D, "channels_first", dtype, _tiles(L))


@GATED
def test_emulated_channels_first_takes_any_d(kernels, gated):
    _case(kernels, gated, 1, 8, 8200, "channels_first", torch.float32, 1)


def _hard_inputs(case: str, gated: bool, shape, first: int, gen):
    """float32 inputs (shift and scale 0) and cotangents that break the statistics' shortcuts
    (``first``: the channels of the first chunk): see
    test_emulated_channels_first_statistics_hold_on_hard_inputs."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "large_mean":
        x += 1e4
    else:
        x *= 0.05
        x[:, :first] += 1.0
        x[:, first:] -= first / (shape[1] - first)  # the mean stays near 0
    zero = torch.zeros(shape[:2], dtype=torch.float64)
    inputs = [x, zero, zero]
    if gated:  # r = x + gate * y, close to x
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
        gate = 0.01 * torch.randn(shape[:2], generator=gen, dtype=torch.float64)
        inputs = [x, y, gate, zero, zero]
    dout = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case == "dout_mean":
        dout = 1.0 + 0.01 * dout
    cots = [torch.randn(shape, generator=gen), dout] if gated else [dout]
    return [t.float() for t in inputs] + [1e-6], [c.float() for c in cots]


@GATED
@pytest.mark.parametrize("case", ["large_mean", "chunks_apart", "dout_mean"])
@pytest.mark.parametrize("per_thread", [4, 1], ids=["4_tokens", "1_token"])
def test_emulated_channels_first_statistics_hold_on_hard_inputs(kernels, gated, case, per_thread):
    """The channels-first kernels take each token's statistics in one pass: values shifted by
    the first chunk's mean (4 channels of each slot: 128 channels with 4 tokens a thread and 32
    slots, 32 with 1 token and 8 slots), groups of 4 channels merged into each thread's running
    mean and sum of squares, the slots merged in order. float32, D = 1536 (U-DiT-L) and, gated,
    1500 (a short second tile with 4 tokens a thread). Within the tolerance rule on a mean of
    1e4 (E[x^2] - mean^2 keeps no digit; without the shift the merged means are rounded at 1e4
    and modulate's forward fails), a mean near 0 with the first chunk 20 standard deviations
    from the rest (with 1 token a thread, 192 channels each, shifted sums without the group
    merge fail at 7 times the bound), and a cotangent whose mean is 100 times its spread
    (mean(g n) as a difference of large sums cancels)."""
    if per_thread == 4:
        shape, first = ((2, 1500, 6, 6) if gated else (2, 1536, 4, 4)), 128
    else:  # L % 4 != 0
        shape, first = ((2, 1500, 5, 7) if gated else (2, 1536, 5, 5)), 32
    gen = torch.Generator().manual_seed(3)
    inputs, cots = _hard_inputs(case, gated, shape, first, gen)
    what = f"{case} {'gated' if gated else 'modulate'}"
    _check_forward(gated, _forward(kernels, gated, inputs), inputs, what)
    grads, partial = _backward(kernels, gated, inputs, cots, _tiles(shape[2] * shape[3]))
    assert torch.isfinite(partial).all()
    _check_backward(gated, grads, inputs, cots, what)


def test_emulated_channels_first_long_images_sum_their_tiles_accurately(kernels):
    """A 256 x 256 image is 2048 tiles, so d shift and d scale add 2048 partial rows: one long
    fp32 sum of them went past the tolerance rule (1.3 x the bound on d scale here, 0.7-1.0 at
    other seeds), runs of 32 and then the runs' totals stay under 0.25 of it."""
    L, D = 65536, 64
    inputs, cots = _inputs(False, 1, L, D, "channels_first", torch.float32, 0)
    grads, partial = _backward(kernels, False, inputs, cots, _tiles(L))
    assert torch.isfinite(partial).all()
    _check_backward(False, grads, inputs, cots, f"modulate L={L} D={D}")


@GATED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_channels_first_misaligned_takes_one_token_a_thread(kernels, gated, dtype):
    """L % 4 == 0 but x and the cotangents one element off 8/16-byte alignment: 1 token a
    thread, 8 channel slots."""
    B, L, D = 2, 36, 100
    inputs, cots = _inputs(gated, B, L, D, "channels_first", dtype, 17)
    inputs[0] = _misaligned(inputs[0])
    cots = [_misaligned(c) for c in cots]
    what = f"misaligned channels-first {'gated' if gated else 'modulate'} {dtype}"
    _check_forward(gated, _forward(kernels, gated, inputs), inputs, what)
    grads, partial = _backward(kernels, gated, inputs, cots, _tiles(L))
    assert torch.isfinite(partial).all()
    _check_backward(gated, grads, inputs, cots, what)


# ----------------------------------------------------------------------------------------------
# Splits, orders, alignment, long rows


@GATED
@pytest.mark.parametrize(
    "L, splits, dtype",
    [(37, 3, torch.float32), (37, 5, torch.bfloat16), (37, 37, torch.float32),
     (7, 5, torch.float32), (7, 5, torch.float16), (7, 7, torch.bfloat16)],
    ids=str,
)  # fmt: skip
def test_emulated_backward_splits(kernels, gated, dtype, L, splits):
    """Any split count in [1, L] gives the gradients: uneven splits, empty trailing splits
    (L=7, splits=5: 2 rows each, the last split has none), one row per split."""
    _case(kernels, gated, 2, L, 96, "tokens", dtype, splits, seed=splits)


@GATED
def test_emulated_backward_is_deterministic_in_any_thread_order(kernels, gated):
    """Fibers and blocks in forward, reverse and random orders, different SM counts: the same
    splits give bitwise-identical gradients."""
    for D in (96, 1152):
        inputs, cots = _inputs(gated, 3, 19, D, "tokens", torch.float32, D)
        runs = []
        for order, sms in ((0, 1), (1, 2), (2, 3), (2, 8)):
            kernels.configure(order=order, sms=sms, seed=order + sms)
            runs.append(_backward(kernels, gated, inputs, cots, 3))
        for grads, partial in runs[1:]:
            assert torch.equal(partial, runs[0][1])
            for a, b in zip(grads, runs[0][0]):
                assert torch.equal(a, b)


def _misaligned(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """t copied into a view that starts ``elements`` elements into its storage (one: not
    16-byte aligned)."""
    buf = torch.full((t.numel() + elements,), NAN, dtype=t.dtype)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


@GATED
@DTYPE
@pytest.mark.parametrize("D", [96, 1152])
def test_emulated_misaligned_pointers_take_the_scalar_path(kernels, gated, dtype, D):
    """x and the cotangents misaligned: scalar accesses (D = 96: 96-thread row groups, two per
    block, reductions across 3 warps; D = 1152: 128-thread rows of 8 elements each)."""
    B, L, splits = 2, 5, 2
    inputs, cots = _inputs(gated, B, L, D, "tokens", dtype, D + 3)
    inputs[0] = _misaligned(inputs[0])
    cots = [_misaligned(c) for c in cots]
    assert inputs[0].data_ptr() % 16 != 0
    what = f"misaligned {'gated' if gated else 'modulate'} D={D} {dtype}"
    _check_forward(gated, _forward(kernels, gated, inputs), inputs, what)
    grads, partial = _backward(kernels, gated, inputs, cots, splits)
    assert torch.isfinite(partial).all()
    _check_backward(gated, grads, inputs, cots, what)


@GATED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_forward_rows_longer_than_registers(kernels, gated, dtype):
    """D = 8193 (scalar) goes to the forward kernel that re-reads the row from memory: the
    glue never sends it (D <= 8192), the entries take it."""
    inputs, _ = _inputs(gated, 2, 1, 8193, "tokens", dtype, 8193)
    _check_forward(gated, _forward(kernels, gated, inputs), inputs, f"D=8193 {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_constant_rows(kernels, dtype):
    """Variance 0: out = shift exactly (the mean of a constant row is exact)."""
    B, L, D = 2, 3, 1152
    g = torch.Generator().manual_seed(11)
    shift, scale = (torch.randn(2, B, D, generator=g) * 0.5).to(dtype)
    x = torch.full((B, L, D), 3.0, dtype=dtype)
    out = _forward(kernels, False, [x, shift, scale, 1e-5])
    assert torch.equal(out, shift[:, None].expand_as(out))


def test_emulated_splits_helper(kernels):
    """adaln_bwd_splits (host code) on the emulated device: 2 blocks per SM resident, >= 16
    rows per split, at most L splits."""
    assert kernels.adaln_bwd_splits(1, 37, 96, 0, False, None) == 2  # 4 resident, 37 // 16
    assert kernels.adaln_bwd_splits(3, 37, 96, 0, True, None) == 1  # 4 // 3
    assert kernels.adaln_bwd_splits(1, 7, 96, 1, False, None) == 1
    kernels.configure(order=2, sms=64, seed=1)
    assert kernels.adaln_bwd_splits(2, 4096, 1152, 2, True, None) == 64  # 128 resident // 2
    # the splits whose blocks fill the waves best, not resident // B: 80 samples over 128 slots
    # fill 62.5 % of one wave at one split each (and at 2), 93.75 % of two at 3; at most four
    # waves of blocks (6 splits here), the fewest splits among equal fills (3, not 6)
    assert kernels.adaln_bwd_splits(80, 4096, 1152, 2, True, None) == 3
    assert kernels.adaln_bwd_splits(128, 4096, 1152, 2, True, None) == 1  # one full wave
    assert kernels.adaln_bwd_splits(100, 4096, 1152, 2, True, None) == 5  # 500 of 512 slots
    # ... 1 to 4 splits fill 78 %: with at least 16 rows a split, 64 rows allow 4, so 1
    assert kernels.adaln_bwd_splits(100, 64, 1152, 2, True, None) == 1
    assert kernels.adaln_bwd_splits(600, 4096, 1152, 2, True, None) == 1  # past four waves

    # the Triton kernels' copy of the rule (fastdit/triton/_common.py) agrees everywhere
    pytest.importorskip("triton")
    from fastdit.triton._common import wave_splits

    for B in (1, 2, 3, 5, 7, 31, 64, 80, 100, 127, 129, 200, 255, 256, 300, 511, 513):
        for L in (1, 15, 16, 33, 64, 100, 256, 1024, 4096):
            got = kernels.adaln_bwd_splits(B, L, 1152, 2, True, None)
            assert got == wave_splits(B, 128, min(L // 16, L)), (B, L)
    # channels-first: the tiles of 32 tokens, whatever the device
    for L, tiles in ((1, 1), (32, 1), (33, 2), (1024, 32)):
        assert kernels.adaln_bwd_splits(2, L, 96, 0, True, None, channels_first=True) == tiles
        assert tiles == -(-L // A.CUDA_CF_TOKENS)  # the glue's copy of the tile size


# ----------------------------------------------------------------------------------------------
# The glue: backend="cuda" through the ops' dispatch and autograd, served by the emulation


@pytest.fixture
def cuda_on_cpu(kernels, monkeypatch):
    backends = importlib.import_module("fastdit.backends")  # fastdit.backends is a function
    real = backends.unavailable_reason
    monkeypatch.setattr(
        backends,
        "unavailable_reason",
        lambda backend, device=None: "" if backend == "cuda" else real(backend, device),
    )
    monkeypatch.setattr(_ext, "load", lambda: (kernels, ""))
    monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
    A._cuda_splits.cache_clear()
    yield kernels
    A._cuda_splits.cache_clear()


@GATED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B, L, D, layout",
    [(1, 37, 96, "tokens"), (3, 6, 1152, "channels_last"), (2, 1, 1, "tokens"),
     (2, 35, 100, "channels_first")],
)  # fmt: skip
def test_emulated_ops(cuda_on_cpu, gated, dtype, B, L, D, layout):
    op = OPS[gated]
    fn = fastdit.gated_adaln if gated else fastdit.adaln_modulate
    inputs, cots = _inputs(gated, B, L, D, layout, dtype, 5 + D)
    if layout == "channels_last":
        cots = [c.contiguous() for c in cots]  # the glue makes the cotangents row-major
    elif layout == "channels_first":  # and channels-first ones contiguous
        cots = [c.contiguous(memory_format=torch.channels_last) for c in cots]
    leaves = [
        t.detach().requires_grad_(i in op.diff_index) if isinstance(t, torch.Tensor) else t
        for i, t in enumerate(inputs)
    ]
    what = f"ops {'gated' if gated else 'modulate'} B={B} L={L} D={D} {layout} {dtype}"
    out = fn(*leaves, backend="cuda")
    assert op.last_backend == "cuda"
    _check_forward(gated, tuple(o.detach() for o in out) if gated else out.detach(), inputs, what)
    diff = [leaves[i] for i in op.diff_index]
    grads = torch.autograd.grad(out, diff, cots)
    assert op.last_backward_backend == "cuda"
    for g, x in zip(grads, diff):
        assert g.stride() == x.stride(), what
    _check_backward(gated, list(grads), inputs, cots, what)
    again = torch.autograd.grad(fn(*leaves, backend="cuda"), diff, cots)
    for a, b in zip(grads, again):
        assert torch.equal(a, b), f"{what}: the backward is not deterministic"


# ----------------------------------------------------------------------------------------------
# Mixed dtypes (autocast): float32 rows, float16 or bfloat16 y and (B, D) vectors


@GATED
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B, L, D, layout, offset",
    [
        (3, 7, 96, "tokens", 0),  # 16-lane row groups; the branch in 8-byte vectors
        (1, 37, 1152, "channels_last", 0),  # a 128-thread row
        (2, 5, 2304, "tokens", 0),  # the backward re-reads y and dr (16 elements a thread)
        (2, 5, 97, "tokens", 0),  # D * 4 bytes not a multiple of 16: scalar accesses
        (2, 5, 96, "tokens", 1),  # the branch 2-byte aligned: scalar accesses
        (2, 5, 96, "tokens", 4),  # the branch 8-byte aligned: the vector path still
        (2, 36, 100, "channels_first", 0),  # 4 tokens a thread: the branch in 8-byte vectors
        (1, 36, 96, "channels_first", 1),  # the branch 2-byte aligned: 1 token a thread
    ],
)
def test_emulated_mixed_dtypes_give_the_cast_inputs_bits(
    kernels, gated, low, B, L, D, layout, offset
):
    """Read as they are, the low-precision tensors give what the float32 kernel gives on them
    widened (exact), bit for bit: the same r, out and d x; d y, d gate, d shift, d scale are
    the float32 kernel's rounded once to their dtype."""
    inputs, cots = _inputs(gated, B, L, D, layout, torch.float32, D + L)
    mixed = [t.to(low) if 0 < i < len(inputs) - 1 else t for i, t in enumerate(inputs)]
    cast = [t.float() if isinstance(t, torch.Tensor) else t for t in mixed]
    if offset:  # both at the same element offset, so both take the same path
        mixed[1], cast[1] = _misaligned(mixed[1], offset), _misaligned(cast[1], offset)
    got, want = _forward(kernels, gated, mixed), _forward(kernels, gated, cast)
    for g, w in zip(*((o if gated else (o,)) for o in (got, want))):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    splits = _tiles(L) if layout == "channels_first" else 2
    grads, partial = _backward(kernels, gated, mixed, cots, splits)
    want_grads, want_partial = _backward(kernels, gated, cast, cots, splits)
    assert torch.equal(partial, want_partial)
    for i, g, w in zip(OPS[gated].diff_index, grads, want_grads):
        assert g.dtype == mixed[i].dtype and torch.equal(g, w.to(g.dtype)), OPS[gated].arg_names[i]


def test_emulated_mixed_dtypes_through_autocast(cuda_on_cpu):
    """Under autocast the glue sends float32 x with a bfloat16 branch to the kernels as they
    are: the op's results and gradients are those on the widened inputs; pairs the kernels are
    not built for are declined with the reason."""
    inputs, cots = _inputs(True, 2, 6, 96, "channels_last", torch.float32, 3)
    x = inputs[0].detach().requires_grad_()
    low = [t.to(torch.bfloat16).requires_grad_() for t in inputs[1:5]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastdit.gated_adaln(x, *low, backend="cuda")
    assert A._gated.last_backend == "cuda"
    got_grads = torch.autograd.grad(got, [x, *low], [c.contiguous() for c in cots])
    assert A._gated.last_backward_backend == "cuda"
    widened = [t.detach().float().requires_grad_() for t in low]
    want = fastdit.gated_adaln(x, *widened, backend="cuda")
    want_grads = torch.autograd.grad(want, [x, *widened], [c.contiguous() for c in cots])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    for g, w, leaf in zip(got_grads, want_grads, [x, *low]):
        assert g.dtype == leaf.dtype and torch.equal(g, w.to(g.dtype))
    y, gate, shift, scale = low
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastdit.adaln_modulate(x, shift, scale, backend="cuda")
    assert A._modulate.last_backend == "cuda"
    got_grads = torch.autograd.grad(got, [x, shift, scale], cots[1].contiguous())
    assert A._modulate.last_backward_backend == "cuda"
    want = fastdit.adaln_modulate(x, widened[2], widened[3], backend="cuda")
    want_grads = torch.autograd.grad(want, [x, widened[2], widened[3]], cots[1].contiguous())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for g, w, leaf in zip(got_grads, want_grads, [x, shift, scale]):
        assert g.dtype == leaf.dtype and torch.equal(g, w.to(g.dtype))
    reason = A._cuda_supports_gated(x.detach(), y, gate.half(), shift, scale, EPS)
    assert "in one dtype" in reason and "gate torch.float16" in reason
    reason = A._cuda_supports_modulate(x.detach().half(), shift.detach(), scale.detach(), EPS)
    assert "with float32 x, float16 or bfloat16" in reason
    assert A._cuda_supports_modulate(x.detach(), shift.detach(), scale.detach(), EPS) == ""


# ----------------------------------------------------------------------------------------------
# Register use of the real build (nvcc, no GPU)

# The kernels allowed to spill, with the most bytes allowed (of stack frame, spill stores and
# spill loads, as ptxas counts them; nvcc 13.0 gives 8-632): the gated backward with 16
# scalars per thread (V = 1, D > 2048 off the 16-byte path) and with four float4 vectors per
# thread (float32, D > 2048), by template arguments (V, ITERS, GATED) read from the mangled
# names; and, for sm_80 only, the forward's register kernels, where ptxas trades 8 bytes for
# 32-48 registers. Everything else: no stack frame, no spill.
BWD_SPILLS = {(1, 16, True): 768, (4, 4, True): 64}
BWD_ARGS = re.compile(r"adaln_bwd_kernelI\w+?Li(\d+)ELi(\d+)ELi\d+ELb([01])E")


def _allowed_spill(name: str, arch: str) -> int:
    match = BWD_ARGS.search(name)
    if match:
        return BWD_SPILLS.get((int(match[1]), int(match[2]), match[3] == "1"), 0)
    return 8 if arch == "sm_80" and "adaln_fwd_regs_kernel" in name else 0


def test_kernels_compile_for_sm80_and_sm90_with_known_spills_only(tmp_path):
    """ptxas's report of every kernel of csrc/adaln.cu for the default build's architectures.
    Until the backward's row pointers went through opaque() (csrc/common.cuh), ptxas kept
    every element's address live across the row loop: spills of up to 1724 bytes on sm_90, and
    16 to 72 on the float32 vector paths (D = 1152, DiT-XL/2 in float32, among them)."""
    usage = emulated.ptxas_usage("adaln", [80, 90], tmp_path)
    spilled = [(n, arch, u) for n, arch, u in usage if max(u[:3]) > _allowed_spill(n, arch)]
    assert not spilled, spilled
    seen = {(int(m[1]), int(m[2]), m[3] == "1") for n, _, _ in usage if (m := BWD_ARGS.search(n))}
    assert set(BWD_SPILLS) < seen, sorted(seen)  # the names parse, and the allowances bite
    # the gated 16-bit backward with one vector a thread: <= 96 registers, so that four blocks
    # of DiT-XL/2's 160 threads fit an SM (97, ptxas's own choice, allows three); two dtypes,
    # three row-group widths, two architectures
    capped = [u[3] for n, _, u in usage if "adaln_bwd_capped_kernel" in n]
    assert len(capped) == 12 and max(capped) <= 96, capped
