"""The cuda backend of the patchify family: fastdit._C's entries and their Python glue.

Three kinds of tests:

- without a GPU, against the built fastdit._C: every entry validates its arguments on the host
  (ValueError naming the entry), empty work is a no-op, and with no device the call fails with a
  RuntimeError naming the entry; the glue's ``_cuda_supports_*`` reasons, on CPU tensors;
- without a GPU, csrc/patchify.cu compiled for the CPU with tests/cuda_emu/emulate.h (every CUDA
  thread a fiber, barriers and shuffles emulated): the glue and the kernels' index arithmetic,
  checked against the float64 reference under the tolerance rule, in several thread orders;
- on a GPU (marked ``gpu``): each op through fastdit with backend="cuda", forward and backward,
  against the float64 reference; outputs poisoned with NaN; the backward's determinism.

Rule (DESIGN.md, Tests; tests/tolerance.py): max abs error against float64 <= 2 x eager
PyTorch's in the same dtype + a tiny floor. patchify / unpatchify are exact.
"""

from __future__ import annotations

import importlib
import re

import emulated
import pytest
import torch
from layouts import nan_filled_empty, nan_gapped
from tolerance import assert_close_to_reference

import fastdit
from fastdit import _ext

P = G = importlib.import_module("fastdit.ops.patchify")  # G: where the cuda glue lives

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPS = {
    "patchify": P._patchify,
    "unpatchify": P._unpatchify,
    "patch_embed": P._patch_embed,
    "final_layer": P._final_layer,
}


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
    common = dict(dtype=0, device=0, stream=0)
    image = dict(B=2, C=4, H=4, W=4, patch_size=2)  # N = 4 tokens of K = 16
    x_strides, t_strides = (64, 16, 4, 1), (64, 16, 1)
    image_bad = [
        dict(dtype=3), dict(dtype=-1), dict(device=-1), dict(B=-1), dict(C=0), dict(patch_size=0),
        dict(H=5), dict(W=-2), dict(H=2**31, W=2), dict(B=2**20, H=2**16, W=2**16),
    ]  # fmt: skip
    permute = dict(**image, order=0, **common)
    patchify = dict(x_ptr=PTR, x_strides=x_strides, out_ptr=PTR, out_strides=t_strides, **permute)
    unpatchify = dict(
        tokens_ptr=PTR, tokens_strides=t_strides, out_ptr=PTR, out_strides=x_strides, **permute
    )
    permute_bad = image_bad + [
        dict(order=2), dict(C=600, patch_size=4),  # K = 9600 > PATCHIFY_MAX_K
    ]  # fmt: skip
    embed = dict(
        x_ptr=PTR, x_strides=x_strides, weight_ptr=PTR, bias_ptr=PTR, pos_ptr=PTR, out_ptr=PTR,
        **image, D=8, **common,
    )  # fmt: skip
    embed_bad = image_bad + [
        dict(D=0), dict(D=2**20 + 1), dict(C=2**17, patch_size=1), dict(x_ptr=0),
        dict(weight_ptr=0), dict(bias_ptr=0), dict(pos_ptr=0), dict(out_ptr=0),
        dict(x_strides=(64, 16, 4)), dict(x_strides=(64, 16, 4, -1)),
        dict(x_strides=(2**62, 2**62, 4, 1)),
    ]  # fmt: skip
    embed_bwd = dict(
        x_ptr=PTR, x_strides=x_strides, weight_ptr=PTR, dout_ptr=PTR, dx_ptr=PTR,
        dx_strides=x_strides, dweight_partial_ptr=PTR, dpos_partial_ptr=PTR, **image, D=8,
        splits=2, **common,
    )  # fmt: skip
    embed_bwd_bad = image_bad + [
        dict(D=0), dict(splits=0), dict(splits=3), dict(dx_ptr=0), dict(dout_ptr=0),
        dict(dweight_partial_ptr=0), dict(dpos_partial_ptr=0), dict(dx_strides=(1, 1)),
    ]  # fmt: skip
    final = dict(B=2, C=8, h=2, w=3, patch_size=2, D=40, eps=1e-6, **common)  # K = 32
    final_bad = [
        dict(dtype=5), dict(device=-1), dict(B=-1), dict(C=0), dict(patch_size=0), dict(h=-1),
        dict(w=2**31), dict(D=0), dict(D=8193), dict(C=9, patch_size=8),  # K = 576 > 512
        dict(eps=-1.0), dict(eps=float("nan")), dict(eps=float("inf")),
    ]  # fmt: skip
    final_fwd = dict(
        x_ptr=PTR, shift_ptr=PTR, scale_ptr=PTR, weight_t_ptr=PTR, bias_ptr=PTR, out_ptr=PTR,
        out_strides=(384, 48, 6, 1), **final,
    )  # fmt: skip
    final_fwd_bad = final_bad + [
        dict(x_ptr=0), dict(weight_t_ptr=0), dict(bias_ptr=0), dict(out_ptr=0),
        dict(out_strides=(384, 48, 6)),
    ]  # fmt: skip
    final_bwd = dict(
        x_ptr=PTR, shift_ptr=PTR, scale_ptr=PTR, weight_ptr=PTR, dout_ptr=PTR,
        dout_strides=(384, 48, 6, 1), dx_ptr=PTR, stats_ptr=PTR, dmod_partial_ptr=PTR,
        dweight_partial_ptr=PTR, dbias_partial_ptr=PTR, **final, row_splits=2,
        weight_splits=2,
    )  # fmt: skip
    final_bwd_bad = final_bad + [
        dict(row_splits=0), dict(row_splits=7), dict(weight_splits=0), dict(weight_splits=3),
        dict(stats_ptr=0), dict(dmod_partial_ptr=0), dict(dweight_partial_ptr=0),
        dict(dbias_partial_ptr=0), dict(dout_strides=(1, 1, 1, -1)),
        # D > 2048 needs 4-channel accesses: D % 4 == 0 and aligned pointers
        dict(D=2050), dict(D=4096, x_ptr=PTR + 2),
    ]  # fmt: skip
    return {
        "patchify": (patchify, permute_bad + [dict(x_ptr=0), dict(out_strides=(1,))], "BHW"),
        "unpatchify": (unpatchify, permute_bad + [dict(tokens_ptr=0)], "BHW"),
        "patch_embed_fwd": (embed, embed_bad, "BHW"),
        "patch_embed_bwd": (embed_bwd, embed_bwd_bad, "BHW"),
        "final_layer_fwd": (final_fwd, final_fwd_bad, "Bhw"),
        "final_layer_bwd": (final_bwd, final_bwd_bad, "Bhw"),
    }


@pytest.mark.parametrize("name", list(_entries()))
def test_extension_validates_the_patchify_entries(name):
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


def test_extension_validates_the_patchify_plans():
    C = _extension()
    embed = dict(B=2, C=4, H=8, W=8, patch_size=2, D=16, dtype=0, device=0)
    final = dict(B=2, C=8, h=2, w=2, patch_size=2, D=16, dtype=0, device=0)
    for name, good, bad in [
        ("patch_embed_bwd_plan", embed,
         [dict(B=0), dict(H=0), dict(D=0), dict(dtype=7), dict(device=-1), dict(H=7)]),
        ("final_layer_bwd_plan", final,
         [dict(B=0), dict(h=0), dict(D=9000), dict(dtype=7), dict(device=-1), dict(C=200)]),
    ]:  # fmt: skip
        fn = getattr(C, name)
        for change in bad:
            with pytest.raises(ValueError, match=rf"fastdit\._C\.{name}: "):
                fn(**{**good, **change})
        if C.device_count() == 0:
            with pytest.raises(RuntimeError, match=rf"^fastdit\._C\.{name}: "):
                fn(**good)


def test_extension_limits_match_the_glue():
    C = _extension()
    assert C.PATCHIFY_MAX_K == G.CUDA_PATCHIFY_MAX_K
    assert C.PATCH_EMBED_MAX_D == G.CUDA_PATCH_EMBED_MAX_D
    assert C.PATCH_EMBED_MAX_K == G.CUDA_PATCH_EMBED_MAX_K
    assert C.FINAL_LAYER_MAX_D == G.CUDA_FINAL_LAYER_MAX_D
    assert C.FINAL_LAYER_MAX_K == G.CUDA_FINAL_LAYER_MAX_K
    assert C.FINAL_LAYER_BWD_MAX_SCALAR_D == G.CUDA_FINAL_LAYER_MAX_SCALAR_D


def test_kernels_compile_for_sm80_and_sm90_with_known_spills_only(tmp_path):
    """ptxas's report of every kernel of csrc/patchify.cu for the two architectures the build
    targets by default: no stack frame, no spilled register, but in the register-capped
    final_layer backward rows."""
    usage = emulated.ptxas_usage("patchify", [80, 90], tmp_path)
    assert {arch for _, arch, _ in usage} == {"sm_80", "sm_90"} and len(usage) > 100, len(usage)
    # final_layer's backward rows, capped at 96 registers so that two DiT-XL/2 blocks (9 warps)
    # fit an SM (csrc/patchify.cu): its 4-channel kernels may spill a few bytes (nvcc 13.0: 8)
    allowed = {name: 16 for name, _, _ in usage if re.search(r"fl_rows_kernelI\w+Li4E", name)}
    spilled = [(name, arch, u) for name, arch, u in usage if max(u[:3]) > allowed.get(name, 0)]
    assert not spilled, spilled
    assert len(allowed) == 3, sorted(allowed)  # the names parse: three dtypes
    rows = [u[3] for name, _, u in usage if "fl_rows_kernel" in name]
    assert len(rows) == 12 and max(rows) <= 96, rows


# ----------------------------------------------------------------------------------------------
# What the cuda kernels decline, and why (CPU tensors: only shapes, dtypes, layouts are read)


def _final_args(B=2, N=4, D=16, p=2, C=8, dtype=torch.float32, device="cpu"):
    x = torch.empty(B, N, D, dtype=dtype, device=device)
    shift = scale = torch.empty(B, D, dtype=dtype, device=device)
    K = p * p * C
    weight, bias = torch.empty(K, D, dtype=dtype, device=device), torch.empty(K, dtype=dtype)
    return [x, shift, scale, weight, bias, p, [2, N // 2], 1e-6]


def test_supports_reasons():
    f64, f32 = torch.float64, torch.float32
    x = torch.empty(2, 4, 8, 8)
    assert G._cuda_supports_patchify(x, 2, "cpq") == ""
    assert "float64" in G._cuda_supports_patchify(x.double(), 2, "cpq")
    assert "8192" in G._cuda_supports_patchify(torch.empty(1, 3, 53, 53), 53, "pqc")
    tokens = torch.empty(2, 16, 16)
    assert G._cuda_supports_unpatchify(tokens, 2, [4, 4], "pqc") == ""
    assert G._cuda_supports_unpatchify(tokens[:, :, ::2], 2, [4, 4], "pqc") == ""  # strides ok
    assert "float64" in G._cuda_supports_unpatchify(tokens.double(), 2, [4, 4], "pqc")
    assert "8192" in G._cuda_supports_unpatchify(torch.empty(1, 1, 8196), 2, [1, 1], "cpq")
    cl = x.contiguous(memory_format=torch.channels_last)
    assert G._cuda_supports_patchify(cl, 2, "pqc") == ""

    w, b, pos = torch.empty(32, 4, 2, 2), torch.empty(32), torch.empty(1, 16, 32)
    assert G._cuda_supports_patch_embed(cl, w, b, pos) == ""
    assert "float64" in G._cuda_supports_patch_embed(x.to(f64), w, b, pos)
    meta = dict(device="meta")
    big_d = torch.empty(2**20 + 1, 4, 2, 2, **meta)
    assert "D <=" in G._cuda_supports_patch_embed(x, big_d, b, pos)
    big_k = torch.empty(8, 2**15, 2, 2, **meta)
    assert "C * p * p" in G._cuda_supports_patch_embed(torch.empty(1, 2**15, 2, 2, **meta),
                                                       big_k, b, pos)  # fmt: skip

    assert G._cuda_supports_final_layer(*_final_args()) == ""
    assert "float64" in G._cuda_supports_final_layer(*_final_args(dtype=f64))
    args = _final_args()
    args[0] = torch.empty(2, 16, 4).transpose(1, 2)  # (2, 4, 16) strided
    assert "contiguous" in G._cuda_supports_final_layer(*args)
    assert "D <= 8192" in G._cuda_supports_final_layer(*_final_args(D=8196, device="meta"))
    assert G._cuda_supports_final_layer(*_final_args(C=33)) == ""  # K = 132
    assert "512" in G._cuda_supports_final_layer(*_final_args(p=8, C=9))
    assert "D % 4" in G._cuda_supports_final_layer(*_final_args(D=2050, dtype=f32))
    assert G._cuda_supports_final_layer(*_final_args(D=2048 + 4)) == ""


def test_supports_mirrors_the_extensions_32_bit_limits():
    """Where the extension would reject a call for its 32-bit counts (B * N tokens, H and W), the
    cuda backend declines it first, so that auto serves it with another backend: the same
    boundary on both sides (meta tensors; the extension's checks run before any launch)."""
    C = _extension()
    meta = dict(device="meta")
    per = (2**31 - 1) // 3  # B * N = 2^31 - 2 with N = 3 tokens (2 x 6 pixels, p = 2)
    cases = [  # (B, H, W, accepted)
        (per, 2, 6, True), (per + 1, 2, 6, False), (1, 2**31, 2, False), (1, 2, 2**31, False),
        (1, 2**31 - 2, 2, True),
    ]  # fmt: skip
    good = _entries()["patchify"][0]
    for B, H, W, accepted in cases:
        x = torch.empty(B, 4, H, W, **meta)
        reason = G._cuda_supports_patchify(x, 2, "cpq")
        assert (reason == "") == accepted, (B, H, W, reason)
        tokens = torch.empty(B, (H // 2) * (W // 2), 16, **meta)
        assert (G._cuda_supports_unpatchify(tokens, 2, [H // 2, W // 2], "cpq") == "") == accepted
        if C.device_count() == 0:  # (on a GPU the call would launch on the stand-in pointers)
            error = RuntimeError if accepted else ValueError
            with pytest.raises(error, match=r"^fastdit\._C\.patchify: "):
                C.patchify(**{**good, "B": B, "H": H, "W": W})


# ----------------------------------------------------------------------------------------------
# The kernels on the CPU: csrc/patchify.cu built with tests/cuda_emu/emulate.h


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels as a module with fastdit._C's patchify entries (tests/emulated.py)."""
    return emulated.build("patchify")


@pytest.fixture
def glue_on_cpu(emu, monkeypatch):
    """The cuda glue, calling the emulated kernels on CPU tensors."""
    monkeypatch.setattr(_ext, "load", lambda: (emu, ""))
    monkeypatch.setattr(_ext, "stream_of", lambda t: 0)
    G._cuda_patch_embed_plan.cache_clear()
    G._cuda_final_layer_plan.cache_clear()
    emu.configure(order=2, sms=2, seed=1)
    yield emu
    G._cuda_patch_embed_plan.cache_clear()
    G._cuda_final_layer_plan.cache_clear()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _grads_rule(op, grads, inputs, cotangent, what):
    """The kernel's gradients against the float64 reference's, eager's as the yardstick."""
    diff = [inputs[i] for i in op.diff_index]
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    truth = op._reference_backward([cotangent.double()], as64)
    eager = op._reference_backward([cotangent], inputs)
    assert len(grads) == len(diff)
    for name, got, e, t, x in zip(
        [op.arg_names[i] for i in op.diff_index], grads, eager, truth, diff
    ):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_close_to_reference(got, e, t, f"{what}: d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(
    "B, C, H, W, p", [(1, 4, 8, 8, 2), (2, 4, 12, 20, 2), (3, 3, 12, 8, 4), (2, 8, 16, 24, 8),
                      (1, 4, 6, 10, 1), (2, 5, 9, 15, 3), (1, 4, 8, 1040, 2)],
)  # fmt: skip
def test_emulated_patchify_unpatchify(glue_on_cpu, B, C, H, W, p, layout, dtype):
    x = _layout(torch.randn(B, C, H, W).to(dtype), layout)
    for order in ("cpq", "pqc"):
        tokens = G._cuda_patchify(x, p, order)
        assert torch.equal(tokens, P.reference_patchify(x, p, order)), order
        grid = [H // p, W // p]
        t_in = _layout(tokens, "strided" if layout == "strided" else "contiguous")
        image = G._cuda_unpatchify(t_in, p, grid, order)
        assert torch.equal(image, x), order
        # Backwards: each op's gradient is the other op, written in the input's layout.
        (dx,) = G._cuda_patchify_backward([t_in], [x, p, order])
        assert dx.stride() == torch.empty_like(x).stride() and torch.equal(dx, x)
        (dt,) = G._cuda_unpatchify_backward([_layout(image, layout)], [t_in, p, grid, order])
        assert dt.stride() == torch.empty_like(t_in).stride() and torch.equal(dt, tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "C, H, W, p", [(2048, 4, 8, 2), (4096, 2, 16, 1), (8192, 1, 8, 1), (1536, 4, 8, 2)]
)
def test_emulated_patchify_of_wide_patches(glue_on_cpu, C, H, W, p, dtype):
    """Patches of up to 8192 values from 16-byte aligned NCHW images: tiles one or two patches
    wide, whose widening to whole 16-byte vectors must not take the staging past 48 KB of shared
    memory (the emulator fails a launch over 48 KB made without the opt-in, as a GPU does)."""
    x = torch.randn(1, C, H, W).to(dtype)
    for order in ("cpq", "pqc"):
        tokens = G._cuda_patchify(x, p, order)
        assert torch.equal(tokens, P.reference_patchify(x, p, order)), order
        (dx,) = G._cuda_patchify_backward([tokens], [x, p, order])
        assert torch.equal(dx, x), order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "B, C, H, W, p, D", [(1, 4, 8, 8, 2, 40), (3, 4, 16, 12, 2, 100), (2, 3, 8, 16, 4, 136),
                         (2, 4, 16, 16, 8, 64), (1, 5, 6, 9, 3, 33)],
)  # fmt: skip
def test_emulated_patch_embed(glue_on_cpu, B, C, H, W, p, D, layout, dtype):
    g = torch.Generator().manual_seed(B * 1009 + D)
    x = _layout(torch.randn(B, C, H, W, generator=g).to(dtype), layout)
    weight = (torch.randn(D, C, p, p, generator=g) * 0.3).to(dtype)
    bias = torch.randn(D, generator=g).to(dtype)
    N = (H // p) * (W // p)
    pos = torch.randn(N, D, generator=g).to(dtype)
    if D % 2 == 0:
        pos = pos.reshape(1, N, D)  # both (1, N, D) and (N, D)
    inputs = [x, weight, bias, pos]
    what = f"patch_embed {B, C, H, W, p, D} {layout} {dtype}"
    out = G._cuda_patch_embed(*inputs)
    truth = P.reference_patch_embed(*(t.double() for t in inputs))
    assert_close_to_reference(out, P.reference_patch_embed(*inputs), truth, what)
    cot = torch.randn(out.shape, generator=g).to(dtype)
    grads = G._cuda_patch_embed_backward([cot], inputs)
    assert grads[0].stride() == torch.empty_like(x).stride()
    _grads_rule(P._patch_embed, grads, inputs, cot, what)


def _final_inputs(B, h, w, p, C, D, dtype, g):
    N, K = h * w, p * p * C
    x = (torch.randn(B, N, D, generator=g) * 2 + 0.5).to(dtype)  # off-centre rows
    shift = (torch.randn(B, D, generator=g) * 0.5).to(dtype)
    scale = (torch.randn(B, D, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(K, D, generator=g) / D**0.5).to(dtype)
    bias = torch.randn(K, generator=g).to(dtype)
    return [x, shift, scale, weight, bias, p, [h, w], 1e-6]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, h, w, p, C, D", [(1, 4, 4, 2, 8, 40), (2, 3, 5, 2, 4, 100), (3, 2, 2, 4, 8, 64),
                         (2, 3, 4, 2, 8, 1152), (1, 2, 3, 8, 8, 36), (2, 3, 3, 3, 5, 77),
                         (2, 9, 8, 2, 4, 48)],
)  # fmt: skip
def test_emulated_final_layer(glue_on_cpu, B, h, w, p, C, D, dtype):
    g = torch.Generator().manual_seed(B * 7919 + D)
    inputs = _final_inputs(B, h, w, p, C, D, dtype, g)
    what = f"final_layer {B, h, w, p, C, D} {dtype}"
    out = G._cuda_final_layer(*inputs)
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    truth = P.reference_final_layer(*as64)
    assert_close_to_reference(out, P.reference_final_layer(*inputs), truth, what)
    cot = torch.randn(out.shape, generator=g).to(dtype)
    if B > 1:
        cot = cot.contiguous(memory_format=torch.channels_last)  # dout by strides
    _grads_rule(P._final_layer, G._cuda_final_layer_backward([cot], inputs), inputs, cot, what)


@pytest.mark.parametrize("max_smem", [12 * 1024, 6 * 1024], ids=["2 rows", "1 row"])
def test_emulated_final_layer_with_little_shared_memory(glue_on_cpu, max_smem):
    """On GPUs with less shared memory the backward keeps fewer rows of g (and W in global)."""
    glue_on_cpu.configure(order=2, sms=2, seed=5, max_smem=max_smem)
    g = torch.Generator().manual_seed(max_smem)
    inputs = _final_inputs(2, 3, 3, 2, 8, 1152, torch.bfloat16, g)
    cot = torch.randn(2, 8, 6, 6, generator=g).to(torch.bfloat16)
    grads = G._cuda_final_layer_backward([cot], inputs)
    _grads_rule(P._final_layer, grads, inputs, cot, f"final_layer, {max_smem} B of smem")


def test_emulated_final_layer_row_splits(glue_on_cpu):
    """The backward's blocks per sample fill the waves of resident blocks best (2 SMs x 2 blocks
    emulated: 4 slots), at most one per tile of 4 tokens: 3 samples fill 75 % of the slots at
    1 to 3 splits, all of them at 4 (resident // B, 1, would leave a slot idle)."""
    assert glue_on_cpu.final_layer_bwd_plan(3, 8, 8, 8, 2, 64, 0, None)[0] == 4
    assert glue_on_cpu.final_layer_bwd_plan(1, 8, 8, 8, 2, 64, 0, None)[0] == 4
    assert glue_on_cpu.final_layer_bwd_plan(3, 8, 2, 2, 2, 64, 0, None)[0] == 1  # one tile
    assert glue_on_cpu.final_layer_bwd_plan(4, 8, 8, 8, 2, 64, 0, None)[0] == 1  # a full wave


def test_emulated_backward_is_deterministic_in_any_thread_order(glue_on_cpu):
    """Fibers and blocks in forward, reverse and random orders: bitwise-identical gradients
    (the same splits; no reduction depends on the order threads run in)."""
    g = torch.Generator().manual_seed(3)
    fl = _final_inputs(3, 4, 4, 2, 8, 72, torch.float32, g)
    fl_cot = torch.randn(3, 8, 8, 8, generator=g)
    x = torch.randn(3, 4, 16, 16, generator=g)
    pe = [x, torch.randn(40, 4, 2, 2, generator=g), torch.randn(40, generator=g),
          torch.randn(64, 40, generator=g)]  # fmt: skip
    pe_cot = torch.randn(3, 64, 40, generator=g)
    runs = []
    for order in (0, 1, 2, 2):
        glue_on_cpu.configure(order=order, sms=3, seed=order + len(runs))
        runs.append(
            G._cuda_final_layer_backward([fl_cot], fl) + G._cuda_patch_embed_backward([pe_cot], pe)
        )
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# On a GPU

REASON = _ext.cuda_unavailable_reason()
needs_gpu = pytest.mark.skipif(bool(REASON), reason=REASON or "available")
GRIDS = [(32, 32), (6, 10)]


def _check_op(name, inputs, what):
    """fastdit.<name>(*inputs, backend="cuda") and its backward (through the op's autograd)
    against float64, outputs and gradients allocated full of NaN; the backward run twice must
    agree bitwise."""
    op = OPS[name]
    fn = getattr(fastdit, name)
    leaves = [
        t.detach().requires_grad_(i in op.diff_index) if isinstance(t, torch.Tensor) else t
        for i, t in enumerate(inputs)
    ]
    if name in ("patchify", "unpatchify"):  # order is keyword-only

        def call():
            return fn(*leaves[:-1], order=leaves[-1], backend="cuda")
    else:

        def call():
            return fn(*leaves, backend="cuda")

    with nan_filled_empty():
        out = call()
    assert op.last_backend == "cuda"
    as64 = [t.double() if isinstance(t, torch.Tensor) else t for t in inputs]
    assert_close_to_reference(out, op.reference(*inputs), op.reference(*as64), what)
    cot = torch.randn_like(out)
    diff = [leaves[i] for i in op.diff_index]
    with nan_filled_empty():
        grads = torch.autograd.grad(out, diff, cot)
    assert op.last_backward_backend == "cuda"
    _grads_rule(op, list(grads), inputs, cot, what)
    with nan_filled_empty():
        again = torch.autograd.grad(call(), diff, cot)
    for a, b in zip(grads, again):
        assert torch.equal(a, b), f"{what}: the backward is not deterministic"


def _patchify_case(order, B, C, p, grid, layout, dtype, device):
    h, w = grid
    x = _layout(torch.randn(B, C, h * p, w * p, device=device).to(dtype), layout)
    what = f"{order} {B, C, p, grid} {layout} {dtype}"
    _check_op("patchify", [x, p, order], what)
    tokens = P.reference_patchify(x, p, order)
    tokens = _layout(tokens, "strided") if layout == "strided" else tokens
    _check_op("unpatchify", [tokens, p, [h, w], order], what)


def _patch_embed_case(B, D, C, p, grid, layout, dtype, device):
    h, w = grid
    gen = torch.Generator(device=device).manual_seed(B * 7 + D + C * p)
    x = torch.randn(B, C, h * p, w * p, generator=gen, device=device).to(dtype)
    x = _layout(x, layout)
    weight = (torch.randn(D, C, p, p, generator=gen, device=device) * 0.2).to(dtype)
    bias = torch.randn(D, generator=gen, device=device).to(dtype)
    pos = torch.randn(1, h * w, D, generator=gen, device=device).to(dtype)
    _check_op("patch_embed", [x, weight, bias, pos], f"{B, D, C, p, grid} {layout} {dtype}")


def _final_layer_case(B, D, C, p, grid, dtype, device):
    h, w = grid
    gen = torch.Generator(device=device).manual_seed(B * 13 + D + C * p)
    N, K = h * w, p * p * C
    x = (torch.randn(B, N, D, generator=gen, device=device) * 2 + 0.5).to(dtype)
    shift = (torch.randn(B, D, generator=gen, device=device) * 0.5).to(dtype)
    scale = (torch.randn(B, D, generator=gen, device=device) * 0.5).to(dtype)
    weight = (torch.randn(K, D, generator=gen, device=device) / D**0.5).to(dtype)
    bias = torch.randn(K, generator=gen, device=device).to(dtype)
    inputs = [x, shift, scale, weight, bias, p, [h, w], 1e-6]
    _check_op("final_layer", inputs, f"{B, D, C, p, grid} {dtype}")


@pytest.fixture
def cuda_backend_on_cpu(glue_on_cpu, monkeypatch):
    """backend="cuda" served on CPU tensors by the emulated kernels, through the ops' dispatch
    and autograd (the same checks as on a GPU, at small sizes)."""
    backends = importlib.import_module("fastdit.backends")  # fastdit.backends is a function
    real = backends.unavailable_reason
    monkeypatch.setattr(
        backends,
        "unavailable_reason",
        lambda backend, device=None: "" if backend == "cuda" else real(backend, device),
    )
    return "cpu"


def test_emulated_ops_gapped_parameters(cuda_backend_on_cpu):
    """Weights, biases, pos_embed, shift and scale strided with nan between their elements (and
    the embedding's weight permuted in memory): the glue hands the kernels dense copies."""
    x = torch.randn(2, 4, 8, 12)
    weight = torch.randn(4, 2, 2, 24).permute(3, 0, 1, 2) * 0.3
    bias, pos = nan_gapped(torch.randn(24)), nan_gapped(torch.randn(1, 24, 24))
    _check_op("patch_embed", [x, weight, bias, pos], "patch_embed, gapped parameters")
    tokens = torch.randn(2, 6, 48)
    shift, scale, bias = (
        nan_gapped(torch.randn(*shape) * 0.5) for shape in ((2, 48), (2, 48), (16,))
    )
    weight = nan_gapped(torch.randn(16, 48) * 48**-0.5)
    _check_op("final_layer", [tokens, shift, scale, weight, bias, 2, [2, 3], 1e-6],
              "final_layer, gapped parameters")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "order, B, C, p, grid, layout",
    [("cpq", 1, 4, 2, (6, 10), "contiguous"), ("pqc", 3, 3, 2, (4, 4), "channels_last"),
     ("pqc", 2, 8, 4, (2, 3), "strided"), ("cpq", 1, 4, 8, (1, 2), "channels_last")],
)  # fmt: skip
def test_emulated_ops_patchify(cuda_backend_on_cpu, order, B, C, p, grid, layout, dtype):
    _patchify_case(order, B, C, p, grid, layout, dtype, cuda_backend_on_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B, D, C, p, grid, layout",
    [(1, 100, 4, 2, (6, 10), "contiguous"), (3, 64, 4, 4, (2, 3), "channels_last"),
     (2, 36, 8, 2, (3, 3), "contiguous")],
)  # fmt: skip
def test_emulated_ops_patch_embed(cuda_backend_on_cpu, B, D, C, p, grid, layout, dtype):
    _patch_embed_case(B, D, C, p, grid, layout, dtype, cuda_backend_on_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "B, D, C, p, grid", [(1, 100, 8, 2, (6, 10)), (3, 64, 4, 2, (2, 3)), (2, 40, 8, 4, (2, 2))]
)
def test_emulated_ops_final_layer(cuda_backend_on_cpu, B, D, C, p, grid, dtype):
    _final_layer_case(B, D, C, p, grid, dtype, cuda_backend_on_cpu)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("C, p", [(4, 2), (4, 4), (8, 8), (3, 2)])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("order", ["cpq", "pqc"])
def test_gpu_patchify_unpatchify(order, B, C, p, grid, layout, dtype):
    _patchify_case(order, B, C, p, grid, layout, dtype, "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C, p, grid", [(2048, 2, (4, 8)), (4096, 1, (2, 16)), (8192, 1, (1, 8))])
def test_gpu_patchify_of_wide_patches(C, p, grid, dtype):
    """Patches of 4096-8192 values (the shared-memory bound of the emulated twin above)."""
    for order in ("cpq", "pqc"):
        _patchify_case(order, 2, C, p, grid, "contiguous", dtype, "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("C, p", [(4, 2), (4, 4), (4, 8), (8, 2)])
@pytest.mark.parametrize("D", [1152, 100])
@pytest.mark.parametrize("B", [1, 3])
def test_gpu_patch_embed(B, D, C, p, grid, layout, dtype):
    _patch_embed_case(B, D, C, p, grid, layout, dtype, "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("C, p", [(8, 2), (4, 2), (8, 4), (8, 8)])
@pytest.mark.parametrize("D", [1152, 100, 384])
@pytest.mark.parametrize("B", [1, 3])
def test_gpu_final_layer(B, D, C, p, grid, dtype):
    _final_layer_case(B, D, C, p, grid, dtype, "cuda")


def _entries_case(C, device, dev, stream, sync, dtype):
    """The entries called directly on NaN-filled outputs (the backward's partial sums too): a
    kernel that leaves an element unwritten fails here whatever the allocator does."""
    code = CODES[dtype]
    B, Cc, p, h, w, D = 3, 4, 2, 6, 10, 100
    x = torch.randn(B, Cc, h * p, w * p, device=device).to(dtype)
    tokens = torch.full((B, h * w, Cc * p * p), float("nan"), dtype=dtype, device=device)
    C.patchify(x.data_ptr(), x.stride(), tokens.data_ptr(), tokens.stride(), B, Cc, h * p,
               w * p, p, 1, code, dev, stream)  # fmt: skip
    image = torch.full_like(x, float("nan")).contiguous(memory_format=torch.channels_last)
    C.unpatchify(tokens.data_ptr(), tokens.stride(), image.data_ptr(), image.stride(), B, Cc,
                 h * p, w * p, p, 1, code, dev, stream)  # fmt: skip
    sync()
    assert torch.equal(tokens, P.reference_patchify(x, p, "pqc")) and torch.equal(image, x)

    weight = torch.randn(D, Cc, p, p, device=device).to(dtype)
    bias, pos = torch.randn(D, device=device).to(dtype), torch.randn(h * w, D, device=device)
    pos = pos.to(dtype)
    out = torch.full((B, h * w, D), float("nan"), dtype=dtype, device=device)
    C.patch_embed_fwd(x.data_ptr(), x.stride(), weight.data_ptr(), bias.data_ptr(),
                      pos.data_ptr(), out.data_ptr(), B, Cc, h * p, w * p, p, D, code, dev,
                      stream)  # fmt: skip
    splits, parts = C.patch_embed_bwd_plan(B, Cc, h * p, w * p, p, D, code, dev)
    dx = torch.full_like(x, float("nan"))
    dwp = torch.full((parts, D, Cc * p * p), float("nan"), device=device)
    dpp = torch.full((splits, h * w, D), float("nan"), device=device)
    C.patch_embed_bwd(x.data_ptr(), x.stride(), weight.data_ptr(), out.data_ptr(),
                      dx.data_ptr(), dx.stride(), dwp.data_ptr(), dpp.data_ptr(), B, Cc, h * p,
                      w * p, p, D, splits, code, dev, stream)  # fmt: skip
    sync()
    for t in (out, dx, dwp, dpp):
        assert torch.isfinite(t).all()

    Cf, K = 8, p * p * 8
    xs = torch.randn(B, h * w, D, device=device).to(dtype)
    shift, scale = torch.randn(B, D, device=device).to(dtype), torch.randn(B, D, device=device)
    scale = scale.to(dtype)
    wl, bl = torch.randn(K, D, device=device).to(dtype), torch.randn(K, device=device).to(dtype)
    wt = wl.t().contiguous()
    img = torch.full((B, Cf, h * p, w * p), float("nan"), dtype=dtype, device=device)
    C.final_layer_fwd(xs.data_ptr(), shift.data_ptr(), scale.data_ptr(), wt.data_ptr(),
                      bl.data_ptr(), img.data_ptr(), img.stride(), B, Cf, h, w, p, D, 1e-6, code,
                      dev, stream)  # fmt: skip
    rows, wsplits, parts = C.final_layer_bwd_plan(B, Cf, h, w, p, D, code, dev)
    f32 = dict(device=device, dtype=torch.float32)
    dxs = torch.full_like(xs, float("nan"))
    stats = torch.full((B * h * w, 2), float("nan"), **f32)
    dmod = torch.full((2, B, rows, D), float("nan"), **f32)
    dwl = torch.full((parts, D, K), float("nan"), **f32)
    dbl = torch.full((parts, K), float("nan"), **f32)
    C.final_layer_bwd(xs.data_ptr(), shift.data_ptr(), scale.data_ptr(), wl.data_ptr(),
                      img.data_ptr(), img.stride(), dxs.data_ptr(), stats.data_ptr(),
                      dmod.data_ptr(), dwl.data_ptr(), dbl.data_ptr(), B, Cf, h, w, p, D, 1e-6,
                      rows, wsplits, code, dev, stream)  # fmt: skip
    sync()
    for t in (img, dxs, stats, dmod, dwl, dbl):
        assert torch.isfinite(t).all()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_entries_write_every_output_element(dtype):
    stream = torch.cuda.current_stream().cuda_stream
    _entries_case(_extension(), "cuda", torch.cuda.current_device(), stream,
                  torch.cuda.synchronize, dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_entries_write_every_output_element(glue_on_cpu, dtype):
    _entries_case(glue_on_cpu, "cpu", 0, 0, lambda: None, dtype)
