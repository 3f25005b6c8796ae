"""The cuda kernels of U-DiT's depthwise conv + polyphase split (csrc/downsampled_attention.cu):
fastdit._C's downsampled_attention_dwconv_split* entries and their Python glue
(``_cuda_dwconv_split`` and ``_cuda_dwconv_split_backward`` in
fastdit/ops/downsampled_attention.py).

Three kinds of tests:

- without a GPU, against the built fastdit._C: every entry validates its arguments on the host
  (ValueError naming the entry), empty work is a no-op, and with no device the call fails with a
  RuntimeError naming the entry;
- without a GPU, csrc/downsampled_attention.cu compiled for the CPU with
  tests/cuda_emu/emulate.h (every CUDA thread a fiber): the glue and the kernels' index
  arithmetic against the float64 reference, both layouts, awkward sizes, NaN-poisoned outputs
  and scratch, bitwise-deterministic weight gradients in any block order;
- on a GPU (marked ``gpu``): the same against the float64 reference with the real fastdit._C.

Rule (DESIGN.md, Tests; tests/tolerance.py): max abs error against float64 <= 2 x eager
PyTorch's in the same dtype + a tiny floor.
"""

from __future__ import annotations

import importlib
import re

import emulated
import pytest
import torch
import torch.nn.functional as F
from layouts import nan_filled_empty
from tolerance import assert_close_to_reference

from fastdit import _ext

G = importlib.import_module("fastdit.ops.downsampled_attention")  # where the cuda glue lives

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ENTRY = "downsampled_attention_dwconv_split"


def _extension():
    module, reason = _ext.load()
    if module is None:
        pytest.skip(reason)
    return module


# ----------------------------------------------------------------------------------------------
# Host-side validation of the entries (no GPU needed)

PTR = 256  # a 16-byte aligned stand-in address; nothing is dereferenced before validation


def _entries():
    """(entry, good keyword arguments, bad changes, keywords whose 0 means no work)."""
    size = dict(B=2, d=8, H=4, W=6, k=5)
    common = dict(dtype=0, device=0, stream=0)
    strides = (192, 24, 6, 1)
    bad = [
        dict(dtype=3), dict(dtype=-1), dict(device=-1), dict(B=-1), dict(d=0), dict(d=2**31),
        dict(H=5), dict(W=-2), dict(H=2**30 + 2), dict(H=2**16, W=2**16), dict(k=4), dict(k=9),
        dict(k=0), dict(k=-1), dict(B=2**40, d=2**20, H=2**10, W=2**10),
    ]  # fmt: skip
    fwd = dict(
        x_ptr=PTR, x_strides=strides, weight_ptr=PTR, bias_ptr=PTR, t_ptr=PTR, **size,
        shortcut=True, **common,
    )  # fmt: skip
    fwd_bad = bad + [
        dict(x_ptr=0), dict(weight_ptr=0), dict(bias_ptr=0), dict(t_ptr=0),
        dict(x_strides=(192, 24, 6)), dict(x_strides=(192, 24, 6, -1)),
        dict(x_strides=(2**62, 2**62, 6, 1)),
    ]  # fmt: skip
    dx = dict(
        weight_ptr=PTR, dt_ptr=PTR, dx_ptr=PTR, dx_strides=strides, **size, shortcut=False,
        **common,
    )  # fmt: skip
    dx_bad = bad + [dict(weight_ptr=0), dict(dt_ptr=0), dict(dx_ptr=0), dict(dx_strides=(1,))]
    dw = dict(x_ptr=PTR, x_strides=strides, dt_ptr=PTR, partial_ptr=PTR, **size, splits=1, **common)
    dw_bad = bad + [
        dict(splits=0), dict(splits=10**6), dict(x_ptr=0), dict(dt_ptr=0), dict(partial_ptr=0),
        dict(x_strides=(1, 1, 1)),
    ]  # fmt: skip
    return {
        ENTRY: (fwd, fwd_bad, "BHW"),
        ENTRY + "_dx": (dx, dx_bad, "BHW"),
        ENTRY + "_dw": (dw, dw_bad, "BHW"),
    }


@pytest.mark.parametrize("name", list(_entries()))
def test_extension_validates_the_dwconv_split_entries(name):
    C = _extension()
    good, bad, empty = _entries()[name]
    fn = getattr(C, name)
    for change in bad:
        with pytest.raises(ValueError, match=rf"fastdit\._C\.{name}: "):
            fn(**{**good, **change})
    for key in empty:  # no work: a no-op, even without a GPU (and with null pointers)
        nulls = {k: 0 for k in good if k.endswith("_ptr")}
        assert fn(**{**good, **nulls, key: 0}) is None
    if C.device_count() == 0:
        with pytest.raises(RuntimeError, match=rf"^fastdit\._C\.{name}: "):
            fn(**good)


def test_extension_validates_the_dwconv_split_plan():
    C = _extension()
    name = ENTRY + "_dw_plan"
    fn = getattr(C, name)
    good = dict(B=2, d=8, H=4, W=6, k=5, dtype=0, device=0)
    for change in [dict(B=0), dict(H=0), dict(d=0), dict(k=2), dict(dtype=7), dict(device=-1),
                   dict(W=3)]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"fastdit\._C\.{name}: "):
            fn(**{**good, **change})
    if C.device_count() == 0:
        with pytest.raises(RuntimeError, match=rf"^fastdit\._C\.{name}: "):
            fn(**good)


def test_extension_limits_match_the_glue():
    assert _extension().DOWNSAMPLED_ATTENTION_DWCONV_MAX_K == G.CUDA_DWCONV_MAX_K
    assert _extension().DOWNSAMPLED_ATTENTION_MAX_TOKENS == G.CUDA_MAX_TOKENS


def test_cuda_declines_with_reasons():
    """What the cuda backend leaves to triton/torch under auto, and why: on CPU and meta tensors
    (only dtypes and shapes are read), including the extension's grid limits, so that auto
    falls back instead of the extension raising."""
    meta = dict(device="meta")

    def attention(G_, heads, n, hd, dtype=torch.float32, **kw):
        q = torch.empty(G_, heads, n, hd, dtype=dtype, **kw)
        return G._cuda_supports_attention(q, q, q, torch.empty(heads, 1, 1), True)

    def layer(B, d, H, W, heads, k=5, **kw):
        x = torch.empty(B, d, H, W, **kw)
        dw = torch.empty(d, 1, k, k, **kw)
        return G._cuda_supports_layer(x, dw, None, None, None, None, None, None, heads)

    assert attention(8, 2, 64, 48) == "" and layer(2, 96, 16, 16, 2) == ""
    q5 = torch.empty(2, 4, 2, 64, 48)  # (B, 4, heads, n, hd) is taken too
    assert G._cuda_supports_attention(q5, q5, q5, torch.empty(2, 1, 1), True) == ""
    q5 = torch.empty(2**14, 4, 2**15, 1, 2, **meta)  # B * 4 * heads = 2^31
    assert "groups x heads < 2^31" in G._cuda_supports_attention(q5, q5, q5, None, True)
    assert "float32, float16 or bfloat16" in attention(8, 2, 64, 48, torch.float64)
    assert "even head dim <= 128" in attention(8, 2, 64, 47)
    assert "even head dim <= 128" in attention(8, 2, 64, 130)
    assert attention(1, 1, G.CUDA_MAX_TOKENS, 2, **meta) == ""
    assert "tokens per group" in attention(1, 1, G.CUDA_MAX_TOKENS + 1, 2, **meta)
    assert "groups x heads < 2^31" in attention(2**16, 2**15, 1, 2, **meta)
    assert "k <= 7" in layer(2, 96, 16, 16, 2, k=9)
    assert "H * W < 2^31" in layer(1, 2, 2**16, 2**15, 1, **meta)
    assert "tokens per group" in layer(1, 2, 4098, 4096, 1, **meta)  # n = 2049 x 2048
    assert "groups x heads < 2^31" in layer(2**27, 32, 2, 2, 16, **meta)


# One architecture a test (minutes each on CI's machine): parallel pytest processes share them.
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_sm80_and_sm90_without_spills(arch, tmp_path):
    """ptxas's report of every kernel of csrc/downsampled_attention.cu (the dwconv kernels: 3 x 3
    dtypes x 4 kernel sizes; the attention kernels: prep, post, fwd x 2, dq, dkdv x 3 dtypes x 5
    head dims), for sm_80 and sm_90: no stack frame, no spilled register, except the attention
    backward's dq and dkdv kernels, which may spill a few registers (at most 64 bytes: ptxas
    trades them at 128-255 registers, mostly at head dims 96 and 128; to tune on a GPU). On
    sm_90 the forward at head dims 48 and 64 fits 168 registers: three blocks an SM, as many as
    its shared memory allows (unbounded, ptxas took up to 238)."""
    usage = emulated.ptxas_usage("downsampled_attention", [arch], tmp_path)
    assert len(usage) == 3 * 3 * 4 + 2 * 3 + 4 * 3 * 5, len(usage)
    assert {a for _, a, _ in usage} == {f"sm_{arch}"}
    if arch == 90:
        bounded = [
            (name, u[3])
            for name, _, u in usage
            if re.match(r"_ZN7fastdit4attn10fwd_kernelI\w+Li(48|64)E", name)
        ]
        assert len(bounded) == 3 * 2 * 2 and all(regs <= 168 for _, regs in bounded), bounded
    allowed = re.compile(r"_ZN7fastdit4attn\d+(dq|dkdv)_kernel")
    spilled = [
        (name, target, u)
        for name, target, u in usage
        if u[:3] != (0, 0, 0) and not (allowed.match(name) and max(u[:3]) <= 64)
    ]
    assert not spilled, spilled


# ----------------------------------------------------------------------------------------------
# The reference and the checks


def _reference(x, weight, bias, shortcut):
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return G.reference_split(y + x if shortcut else y)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _inputs(B, d, H, W, k, dtype, layout, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed + B * 1009 + d * 31 + H * 7 + W + k)
    x = _layout(torch.randn(B, d, H, W, generator=g, device=device).to(dtype), layout)
    weight = (torch.randn(d, 1, k, k, generator=g, device=device) / k).to(dtype)
    bias = torch.randn(d, generator=g, device=device).to(dtype)
    dt = torch.randn(B, 4, (H // 2) * (W // 2), d, generator=g, device=device).to(dtype)
    return x, weight, bias, dt


def _check(x, weight, bias, dt, shortcut, what):
    """The glue's forward and backward against float64, eager PyTorch in the dtype the
    yardstick; dx in x's memory layout, the weight gradients in the weight's dtype. Outputs,
    gradients and scratch are allocated full of NaN."""
    with nan_filled_empty():
        t = G._cuda_dwconv_split(x, weight, bias, shortcut)
    as64 = [u.double() for u in (x, weight, bias)]
    assert t.is_contiguous()
    assert_close_to_reference(
        t, _reference(x, weight, bias, shortcut), _reference(*as64, shortcut), f"{what}: t"
    )
    with nan_filled_empty():
        grads = G._cuda_dwconv_split_backward(x, weight, dt, shortcut)
    assert grads[0].stride() == torch.empty_like(x).stride(), f"{what}: dx layout"

    def autograd(inputs, cot):
        leaves = [u.detach().requires_grad_() for u in inputs]
        return torch.autograd.grad(_reference(*leaves, shortcut), leaves, cot)

    eager = autograd((x, weight, bias), dt)
    truth = autograd(as64, dt.double())
    for name, got, e, tr, like in zip(("dx", "dweight", "dbias"), grads, eager, truth,
                                      (x, weight, bias)):  # fmt: skip
        assert got.shape == like.shape and got.dtype == like.dtype, f"{what}: {name}"
        assert_close_to_reference(got, e, tr, f"{what}: {name}")


# ----------------------------------------------------------------------------------------------
# The kernels on the CPU: csrc/downsampled_attention.cu built with tests/cuda_emu/emulate.h


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels as a module with fastdit._C's entries (tests/emulated.py)."""
    return emulated.build("downsampled_attention")


@pytest.fixture
def glue_on_cpu(emu, monkeypatch):
    """The cuda glue, calling the emulated kernels on CPU tensors."""
    monkeypatch.setattr(_ext, "load", lambda: (emu, ""))
    monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
    G._cuda_dwconv_split_dw_plan.cache_clear()
    emu.configure(order=2, sms=2, seed=1)
    yield emu
    G._cuda_dwconv_split_dw_plan.cache_clear()


# (B, d, H, W, k, layout): d not a multiple of the 32-channel tile (and, for 16-bit, not of the
# 8-channel vectors: 100, 36), H != W, batch 1 and 3, the image smaller than, equal to and larger
# than one tile, every supported k.
EMULATED_CASES = [
    (1, 24, 6, 10, 5, "contiguous"),
    (3, 40, 8, 8, 3, "channels_last"),
    (2, 100, 6, 6, 5, "channels_last"),
    (1, 36, 10, 6, 3, "contiguous"),
    (2, 24, 4, 18, 5, "strided"),
    (1, 64, 16, 40, 5, "channels_last"),
    (1, 40, 18, 22, 5, "contiguous"),
    (3, 8, 4, 4, 7, "contiguous"),
    (1, 16, 6, 6, 1, "channels_last"),
]


@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "no-shortcut"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, d, H, W, k, layout", EMULATED_CASES)
def test_emulated_dwconv_split(glue_on_cpu, B, d, H, W, k, layout, dtype, shortcut):
    x, weight, bias, dt = _inputs(B, d, H, W, k, dtype, layout)
    _check(x, weight, bias, dt, shortcut, f"{B, d, H, W, k} {layout} {dtype} {shortcut}")


def test_emulated_cases_cover_several_splits(glue_on_cpu):
    """The weight gradient's split of the tiles is exercised (splits > 1) by some cases."""
    splits = [
        G._cuda_dwconv_split_dw_plan(B, d, H, W, k, 0, None) for B, d, H, W, k, _ in EMULATED_CASES
    ]
    assert max(splits) > 1 and min(splits) == 1


def _entries_case(C, device, dev, stream, sync, dtype, layout, shortcut):
    """The entries called directly on NaN-filled outputs and scratch: an element the kernels
    leave unwritten fails here whatever the allocator does. The dw partials are checked for
    every legal number of splits (1 .. the tiles of the image)."""
    B, d, H, W, k = 3, 40, 10, 34, 5
    code = CODES[dtype]
    x, weight, bias, dt = _inputs(B, d, H, W, k, dtype, layout, device)
    t = torch.full((B, 4, (H // 2) * (W // 2), d), float("nan"), dtype=dtype, device=device)
    getattr(C, ENTRY)(x.data_ptr(), x.stride(), weight.data_ptr(), bias.data_ptr(),
                      t.data_ptr(), B, d, H, W, k, shortcut, code, dev, stream)  # fmt: skip
    dx = torch.full_like(x, float("nan"))
    getattr(C, ENTRY + "_dx")(weight.data_ptr(), dt.data_ptr(), dx.data_ptr(), dx.stride(), B, d,
                              H, W, k, shortcut, code, dev, stream)  # fmt: skip
    sync()
    as64 = [u.double() for u in (x, weight, bias)]
    what = f"entries {dtype} {layout} {shortcut}"
    assert_close_to_reference(t, _reference(x, weight, bias, shortcut),
                              _reference(*as64, shortcut), f"{what}: t")  # fmt: skip
    leaves = [u.detach().requires_grad_() for u in as64]
    truth = torch.autograd.grad(_reference(*leaves, shortcut), leaves, dt.double())
    assert torch.isfinite(dx).all(), f"{what}: dx"
    assert (dx.double() - truth[0]).abs().max() < 0.1 * truth[0].abs().max()
    plan = getattr(C, ENTRY + "_dw_plan")(B, d, H, W, k, code, dev)
    counts = {1, plan}
    if hasattr(C, "dwconv_split_tiles"):  # the emulated module: up to one split per tile
        tiles = C.dwconv_split_tiles(H, W, k, 2)
        assert 1 <= plan <= tiles and tiles > 1
        counts.add(tiles)
    for splits in sorted(counts):
        partial = torch.full((B, splits, k * k + 1, d), float("nan"), device=device)
        getattr(C, ENTRY + "_dw")(x.data_ptr(), x.stride(), dt.data_ptr(), partial.data_ptr(), B,
                                  d, H, W, k, splits, code, dev, stream)  # fmt: skip
        sync()
        assert torch.isfinite(partial).all(), f"{what}: {splits} splits"
        sums = partial.double().sum((0, 1))
        dw = sums[: k * k].t().reshape(d, 1, k, k)
        for got, expected in ((dw, truth[1]), (sums[k * k], truth[2])):
            assert (got - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "no-shortcut"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_entries_write_every_output_element(glue_on_cpu, dtype, layout, shortcut):
    _entries_case(glue_on_cpu, "cpu", 0, 0, lambda: None, dtype, layout, shortcut)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_backward_is_deterministic_in_any_block_order(glue_on_cpu, layout):
    """Fibers and blocks in forward, reverse and random orders: bitwise-identical results (the
    same splits; no reduction depends on the order threads or blocks run in)."""
    x, weight, bias, dt = _inputs(2, 40, 16, 40, 5, torch.float32, layout)
    runs = []
    for order in (0, 1, 2, 2):
        glue_on_cpu.configure(order=order, sms=3, seed=order + len(runs))
        G._cuda_dwconv_split_dw_plan.cache_clear()
        t = G._cuda_dwconv_split(x, weight, bias, True)
        runs.append((t, *G._cuda_dwconv_split_backward(x, weight, dt, True)))
    assert G._cuda_dwconv_split_dw_plan(2, 40, 16, 40, 5, 0, None) > 1
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# On a GPU

REASON = _ext.cuda_unavailable_reason()
needs_gpu = pytest.mark.skipif(bool(REASON), reason=REASON or "available")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "no-shortcut"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("k", [5, 3, 7])
@pytest.mark.parametrize(
    "B, d, H, W", [(1, 100, 6, 10), (3, 192, 32, 32), (2, 384, 16, 16), (1, 24, 34, 18),
                   (2, 768, 8, 8)],
)  # fmt: skip
def test_gpu_dwconv_split(B, d, H, W, k, layout, dtype, shortcut):
    x, weight, bias, dt = _inputs(B, d, H, W, k, dtype, layout, "cuda")
    _check(x, weight, bias, dt, shortcut, f"{B, d, H, W, k} {layout} {dtype} {shortcut}")
    with nan_filled_empty():
        first = G._cuda_dwconv_split_backward(x, weight, dt, shortcut)
        again = G._cuda_dwconv_split_backward(x, weight, dt, shortcut)
    for a, b in zip(first, again):
        assert torch.equal(a, b), "the backward is not deterministic"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_entries_write_every_output_element(dtype, layout):
    stream = torch.cuda.current_stream().cuda_stream
    _entries_case(_extension(), "cuda", torch.cuda.current_device(), stream,
                  torch.cuda.synchronize, dtype, layout, True)  # fmt: skip
