"""Every GPU kernel runs on the caller's current stream, forward and backward, and can be
captured in a CUDA graph (GPU only).

The check that would fail: the inputs are written on a side stream behind a long
``torch.cuda._sleep``, and the op is called on that stream. A kernel launched on any other
stream (the legacy default stream, a stream cached at import, the device's current stream
of another thread) runs before the inputs arrive, reads the zeros they replace, and gives a
result far from the one computed on the default stream. Side streams from PyTorch's pool are
non-blocking, so the legacy default stream does not wait for them.

CUDA graphs (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``) are how small
sampling batches escape the host's launch overhead. Capture fails on a host synchronisation or
a call the capture forbids; a replay is wrong if a kernel reads anything fixed at capture
other than the captured tensors' addresses (a size, a pointer cached by the glue, a scratch
buffer allocated outside the graph's pool).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdit

pytestmark = pytest.mark.gpu

# About 0.1 s at the H100's ~2 GHz: far longer than launching any of these ops from Python.
SLEEP_CYCLES = 200_000_000


def _cases():
    """(op, kwargs, input shapes) for every op that has a GPU backend."""
    B, L, D = 2, 256, 96
    heads, hd, n = 2, 48, 64
    layer = [(B, D, 16, 16), (D, 1, 5, 5), (D,), (3 * D, D), (3 * D,), (heads, 1, 1), (D, D, 1, 1),
             (D,)]  # fmt: skip
    return {
        "adaln_modulate": ({}, [(B, L, D), (B, D), (B, D)]),
        "gated_adaln": ({}, [(B, L, D), (B, L, D), (B, D), (B, D), (B, D)]),
        "patchify": ({"patch_size": 2}, [(B, 4, 32, 32)]),
        "unpatchify": ({"patch_size": 2}, [(B, L, 2 * 2 * 8)]),
        "patch_embed": ({}, [(B, 4, 32, 32), (D, 4, 2, 2), (D,), (L, D)]),
        "final_layer": ({"patch_size": 2}, [(B, L, D), (B, D), (B, D), (2 * 2 * 8, D), (32,)]),
        "attention_in_groups": ({}, [(4 * B, heads, n, hd)] * 3 + [(heads, 1, 1)]),
        "downsampled_attention": ({"num_heads": heads}, layer),
    }


def _gpu_pairs():
    cases = _cases()
    return [
        pytest.param(family, op, backend, id=f"{op}-{backend}")
        for family, statuses in fastdit.backends().items()
        for backend in ("cuda", "triton")
        for op in statuses[backend].ops
        if op in cases
    ]


def test_every_gpu_op_has_a_case():
    """A GPU op added without a case here would go unchecked."""
    ops = {op for f in fastdit.backends().values() for b in ("cuda", "triton") for op in f[b].ops}
    assert ops <= set(_cases()), f"no stream case for {sorted(ops - set(_cases()))}"


def _step(op, kwargs, inputs, cotangents):
    """The op's outputs and the gradients of <outputs, cotangents> for every input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = getattr(fastdit, op)(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _randn(shapes, g):
    return [torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in shapes]


def _prepare(family, op, backend):
    """(kwargs with the backend, input shapes, the generator, inputs, cotangents) of a case,
    or a skip where the backend cannot run it on a GPU here."""
    status = fastdit.backends()[family][backend]
    if not status.available:
        pytest.skip(status.reason)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter runs on the host; set FASTDIT_TEST_TRITON_GPU=1")
    kwargs, shapes = _cases()[op]
    kwargs = {**kwargs, "backend": backend}
    g = torch.Generator(device="cuda").manual_seed(len(op))
    inputs = _randn(shapes, g)
    outs = getattr(fastdit, op)(*inputs, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [torch.randn(o.shape, generator=g, device="cuda") for o in outs]
    return kwargs, shapes, g, inputs, cots


@pytest.mark.parametrize("family, op, backend", _gpu_pairs())
def test_runs_on_the_current_stream(family, op, backend):
    kwargs, _, _, inputs, cots = _prepare(family, op, backend)
    ref = _step(op, kwargs, inputs, cots)
    zeros = [torch.zeros_like(t) for t in inputs]
    stale = _step(op, kwargs, zeros, cots)
    assert any(not torch.equal(a, b) for a, b in zip(stale, ref)), "the check cannot fail"

    buffers = [torch.zeros_like(t) for t in inputs]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for b, t in zip(buffers, inputs):
            b.copy_(t)
        got = _step(op, kwargs, buffers, cots)
    torch.cuda.synchronize()
    names = [f"output {i}" for i in range(len(cots))] + [f"grad {i}" for i in range(len(inputs))]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{op} {backend} {name}: {m}")


@pytest.mark.parametrize("family, op, backend", _gpu_pairs())
def test_replays_in_a_cuda_graph(family, op, backend):
    """The op, forward and backward, captured once: each replay on new values copied into the
    captured inputs gives, bit for bit, what an eager call on those values gives."""
    kwargs, shapes, g, static, cots = _prepare(family, op, backend)

    # Warm up on a side stream, as torch.cuda.graph's documentation asks: Triton compiles its
    # kernels and the glue makes its one-time calls (kernel attributes, occupancy) there.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        previous = _step(op, kwargs, static, cots)
        _step(op, kwargs, static, cots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(op, kwargs, static, cots)  # nothing runs yet: addresses only

    names = [f"output {i}" for i in range(len(cots))] + [f"grad {i}" for i in range(len(shapes))]
    for replay in range(2):
        fresh = _randn(shapes, g)
        for s, t in zip(static, fresh):
            s.copy_(t)
        graph.replay()
        expected = _step(op, kwargs, fresh, cots)
        torch.cuda.synchronize()
        # A replay that ran nothing, or ran on the previous values, would leave these.
        assert any(not torch.equal(a, b) for a, b in zip(previous, expected)), (
            "the check cannot fail"
        )
        for name, a, b in zip(names, captured, expected):
            where = f"{op} {backend} replay {replay} {name}"
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, w=where: f"{w}: {m}")
        previous = expected
