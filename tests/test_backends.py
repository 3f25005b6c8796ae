"""Backend selection: FASTDIT_BACKEND, backend=, auto's fallback, and the report of what runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from devices import kernel_backends, kernel_device

import fastdit
from fastdit.backends import BackendError
from fastdit.ops import adaln

backends = importlib.import_module("fastdit.backends")  # fastdit.backends is the function


def test_requested_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested("adaln", None) == "auto"
    assert backends.requested("adaln", "torch") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert all(backends.requested(f, None) == "triton" for f in backends.FAMILIES)
    assert backends.requested("adaln", "cuda") == "cuda"  # the argument wins
    monkeypatch.setenv(backends.ENV_VAR, "adaln=triton, patchify=cuda")
    assert backends.requested("adaln", None) == "triton"
    assert backends.requested("patchify", None) == "cuda"
    assert backends.requested("downsampled_attention", None) == "auto"


@pytest.mark.parametrize(
    "value, match",
    [
        ("fast", "unknown backend 'fast'"),
        ("adaln=fast", "unknown backend 'fast'"),
        ("attention=cuda", "not 'family=backend' with a family among"),
        ("adaln", "unknown backend 'adaln'"),
        ("adaln=torch,cuda", "'cuda' is not 'family=backend'"),
    ],
)
def test_bad_environment_values_are_errors(monkeypatch, value, match):
    monkeypatch.setenv(backends.ENV_VAR, value)
    with pytest.raises(ValueError, match=match):
        backends.requested("adaln", None)


def test_environment_choice_reaches_the_op(monkeypatch):
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    shift, scale = torch.randn(2, 2, 8, dtype=torch.float64)
    monkeypatch.setenv(backends.ENV_VAR, "adaln=cuda")
    with pytest.raises(BackendError, match="adaln_modulate: backend 'cuda' cannot serve"):
        fastdit.adaln_modulate(x, shift, scale)
    monkeypatch.setenv(backends.ENV_VAR, "patchify=cuda")  # another family: adaln is auto
    fastdit.adaln_modulate(x, shift, scale)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    fastdit.adaln_modulate(x.float(), shift.float(), scale.float())
    assert adaln._modulate.last_backend == "torch"


def test_ops_without_kernels_run_the_reference_under_the_environment(monkeypatch):
    """FASTDIT_BACKEND picks among kernels: U-DiT's unfused path calls ops that have none
    (polyphase_split, polyphase_merge, rope2d), which run the reference under it; an explicit
    backend= is still refused."""
    from fastdit.ops import downsampled_attention as attention

    x = torch.randn(2, 3, 4, 6)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    split = fastdit.polyphase_split(x)
    assert attention._split.last_backend == "torch"
    merged = fastdit.polyphase_merge(split, (2, 3))
    assert torch.equal(merged, x) and attention._merge.last_backend == "torch"
    with pytest.raises(BackendError, match="there is no triton kernel for polyphase_split$"):
        fastdit.polyphase_split(x, backend="triton")


def test_direct_op_calls_meet_the_kernels_contract(monkeypatch):
    """torch.ops.fastdit.* called directly skips the public functions' checks: a kernel backend
    then checks its contract (shapes, one device) and declines, instead of reading outside its
    buffers. Calls through the public functions (and their backward) do not pay for it."""
    x, s = torch.randn(2, 4, 8), torch.randn(2, 8)
    if adaln._modulate.why_not("triton", (x, s, s, 1e-6)):
        pytest.skip("the triton kernel cannot run here")
    raw = torch.ops.fastdit
    for args, match in [
        ((x, s[:1], s), r"shift must have shape \(2, 8\), got \(1, 8\)"),
        ((x, s, s[:, :4]), r"scale must have shape \(2, 8\), got \(2, 4\)"),
    ]:
        with pytest.raises(BackendError, match="backend 'triton' cannot serve this call: " + match):
            raw.adaln_modulate(*args, 1e-6, "triton")
    # (the dispatcher sends mixed devices elsewhere first; the contract checks them too)
    assert (
        adaln._modulate.contract(x, s, s.to("meta"), 1e-6) == "scale is on meta, not on cpu with x"
    )
    raw.adaln_modulate(x, s[:1], s, 1e-6, "auto")  # the reference serves it (broadcasting)
    assert adaln._modulate.last_backend == "torch"
    image = torch.randn(1, 3, 5, 4)
    with pytest.raises(BackendError, match=r"H and W multiples of patch_size = 2"):
        raw.patchify(image, 2, "cpq", "triton")
    q = torch.randn(4, 2, 16, 8)
    with pytest.raises(BackendError, match=r"k must have shape \(4, 2, 16, 8\)"):
        raw.attention_in_groups(q, q[:, :, :8], q, torch.zeros(2, 1, 1), True, "triton")

    calls = []
    contract = adaln._modulate.contract
    monkeypatch.setattr(adaln._modulate, "contract", lambda *a: calls.append(1) or contract(*a))
    xg = x.clone().requires_grad_()
    fastdit.adaln_modulate(xg, s, s, backend="triton").sum().backward()
    assert adaln._modulate.last_backward_backend == "triton" and not calls
    raw.adaln_modulate(x, s, s, 1e-6, "triton")
    assert calls
    # A direct call the reference served (a broadcast scale) gets its backward checked too.
    monkeypatch.setattr(adaln._modulate, "contract", contract)
    raw.adaln_modulate(xg, s, s[:1], 1e-6, "auto").sum().backward()
    assert adaln._modulate.last_backward_backend == "torch"


def test_direct_backward_calls_get_cotangents_shaped_like_the_outputs(monkeypatch):
    """torch.ops.fastdit.*_backward called directly may pass cotangents unlike the outputs,
    which the kernels would read with the outputs' sizes: every backend refuses them, naming
    the cotangent. Autograd's calls (cotangents made for the outputs) are not checked."""
    from fastdit.ops import patchify

    raw = torch.ops.fastdit
    x, s = torch.randn(2, 4, 8), torch.randn(2, 8)
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(ValueError, match=r"adaln_modulate_backward: grad0 has shape "
                                             r"\(2, 4, 4\), its output \(2, 4, 8\)$"):  # fmt: skip
            raw.adaln_modulate_backward(x[..., :4], x, s, s, 1e-6, backend)
    with pytest.raises(ValueError, match=r"gated_adaln_backward: grad1 has shape \(2, 1, 8\)"):
        raw.gated_adaln_backward(x, x[:, :1], x, x, s, s, s, 1e-6, "auto")
    # (the dispatcher sends mixed devices elsewhere first; the check covers them too)
    reason = adaln._modulate._grads_reason([x.to("meta")], [x, s, s, 1e-6])
    assert reason == "grad0 is on meta, the inputs on cpu"
    image = torch.randn(2, 3, 4, 6)
    tokens = patchify.reference_patchify(image, 2, "cpq")
    with pytest.raises(ValueError, match=r"patchify_backward: grad0 has shape \(2, 5, 12\)"):
        raw.patchify_backward(tokens[:, :5], image, 2, "cpq", "auto")
    q = torch.randn(4, 2, 16, 8)
    with pytest.raises(ValueError, match=r"attention_in_groups_backward: grad0 has shape"):
        raw.attention_in_groups_backward(q[:, :1], q, q, q, torch.zeros(2, 1, 1), True, "auto")
    # cotangents of the outputs' shapes pass, in any layout
    grads = raw.adaln_modulate_backward(x.transpose(0, 1).contiguous().transpose(0, 1), x, s, s,
                                        1e-6, "auto")  # fmt: skip
    assert [tuple(g.shape) for g in grads] == [(2, 4, 8), (2, 8), (2, 8)]

    calls = []
    reason = adaln._modulate._grads_reason
    monkeypatch.setattr(adaln._modulate, "_grads_reason", lambda *a: calls.append(1) or reason(*a))
    xg = x.clone().requires_grad_()
    fastdit.adaln_modulate(xg, s, s).sum().backward()
    assert not calls
    raw.adaln_modulate(xg, s, s, 1e-6, "auto").sum().backward()  # a direct call's forward
    assert calls


def test_auto_never_fails_where_the_reference_serves(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randn(1, 2, 5, dtype=dtype)
        shift = torch.randn(1, 5, dtype=dtype)
        out = fastdit.adaln_modulate(x, shift, shift)
        assert out.dtype == dtype


def test_an_explicit_backend_without_backward_fails_before_running(monkeypatch):
    """A backend named explicitly must serve the backward too when gradients are needed."""
    device = kernel_device()
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    shift, scale = torch.randn(2, 2, 8, device=device)
    if adaln._modulate.why_not("triton", (x, shift, scale, 1e-6)):
        pytest.skip("the triton kernel cannot run here")
    # every kernel backend present loses its backward (on a GPU auto would take cuda's)
    for name in kernel_backends(device):
        kernel = adaln._modulate.kernels[name]
        monkeypatch.setitem(adaln._modulate.kernels, name, kernel._replace(backward=None))
    with pytest.raises(BackendError, match="has no backward yet"):
        fastdit.adaln_modulate(x, shift, scale, backend="triton")
    with torch.no_grad():
        fastdit.adaln_modulate(x, shift, scale, backend="triton")  # no gradient: fine
    # auto runs the kernel's forward and, lacking its backward, the reference's.
    fastdit.adaln_modulate(x, shift, scale).sum().backward()
    assert adaln._modulate.last_backward_backend == "torch"
    assert x.grad is not None


def test_backends_table():
    table = fastdit.backends()
    assert set(table) == set(backends.FAMILIES)
    for family, row in table.items():
        assert set(row) == set(backends.BACKENDS)
        assert row["torch"].available and row["torch"].reason == ""
        assert row["torch"].ops, f"{family} has no reference ops"
        for status in row.values():
            assert status.available == (status.reason == "")
    assert "adaln_modulate" in table["adaln"]["torch"].ops
    assert "gated_adaln" in table["adaln"]["torch"].ops
    if not torch.cuda.is_available():
        assert not table["adaln"]["cuda"].available
        assert table["adaln"]["cuda"].reason


def test_reasons_name_the_cause():
    cpu = torch.device("cpu")
    if not torch.cuda.is_available():
        assert backends.unavailable_reason("cuda", cpu)
        assert backends.unavailable_reason("cuda", None)
    if backends.triton_interpreting() and not backends.triton_import_reason():
        assert backends.unavailable_reason("triton", cpu) == ""
    with pytest.raises(ValueError, match="unknown backend"):
        backends.unavailable_reason("metal", cpu)


def _info(env: dict[str, str]) -> str:
    """What ``python -m fastdit info`` prints with this environment."""
    command = [sys.executable, "-m", "fastdit", "info"]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, check=True, timeout=120
    ).stdout


def test_info_command_lists_every_family_and_backend():
    out = _info({k: v for k, v in os.environ.items() if k != backends.ENV_VAR})
    assert "torch " in out and "fastdit._C" in out
    for family in backends.FAMILIES:
        for backend in backends.BACKENDS:
            assert any(line.split()[:2] == [family, backend] for line in out.splitlines()), (
                f"no line for {family} {backend}:\n{out}"
            )


def test_info_command_flags_an_invalid_environment():
    out = _info({**os.environ, backends.ENV_VAR: "Triton"})  # names are lower case
    assert "FASTDIT_BACKEND: 'Triton' is INVALID" in out and "unknown backend 'Triton'" in out


@pytest.mark.parametrize(
    "version, ok", [("3.0.0", False), ("3.5.1", False), ("3.6.0", True), ("3.10.0+git1a2b", True)]
)
def test_triton_older_than_tested_is_refused(monkeypatch, version, ok):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    backends.triton_import_reason.cache_clear()
    try:
        reason = backends.triton_import_reason()
    finally:
        monkeypatch.undo()
        backends.triton_import_reason.cache_clear()
    if ok:
        assert reason == ""
    else:
        assert f"Triton {version} is older than 3.6" in reason


def test_second_derivative_through_an_op_is_an_error_naming_it():
    """The backward ops have no derivative. create_graph=True through a fastdit op still gives
    the first-order gradients, with a graph (a gradient penalty on parameters downstream of the
    op works), but backpropagating through the op's backward raises instead of missing its
    second derivative."""
    x = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 8, 32, dtype=torch.float64)
    vectors = [torch.randn(2, 32, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    _, h = fastdit.gated_adaln(x, y, *vectors, backend="torch")
    loss = (h @ w).pow(2).sum()
    gx, gw = torch.autograd.grad(loss, [x, w], create_graph=True)
    _, h_ref = adaln.reference_gated(x, y, *vectors, 1e-6)
    gx_ref, gw_ref = torch.autograd.grad((h_ref @ w).pow(2).sum(), [x, w])
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    (loss + gw.pow(2).sum()).backward()  # a penalty on w: first order through the op, fine
    assert x.grad is not None and w.grad is not None
    with pytest.raises(RuntimeError, match="gated_adaln: its backward is not differentiable"):
        gx.pow(2).sum().backward()
    assert type(h.grad_fn).__name__.startswith("fastdit_gated_adaln")  # profiles name the op


def _layer_inputs():
    d, heads = 16, 2
    shapes = [(2, d, 8, 8), (d, 1, 5, 5), (d,), (3 * d, d), (3 * d,), (heads, 1, 1), (d, d, 1, 1),
              (d,)]  # fmt: skip
    return [torch.randn(s, dtype=torch.float64) * 0.3 for s in shapes], heads


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_forward_mode_ad_runs_the_reference(backend):
    """torch.func.jvp and torch.autograd.forward_ad through an op: the kernels have no JVP, so
    the op runs its reference, and the primal and tangent are the reference's (they used to come
    back with no tangent, i.e. a silent zero)."""
    import torch.autograd.forward_ad as fwAD

    from fastdit.ops import downsampled_attention as da
    from fastdit.ops import patchify

    x, y = torch.randn(2, 4, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64)
    v = [torch.randn(2, 32, dtype=torch.float64) for _ in range(3)]
    image = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer, heads = _layer_inputs()
    cases = [  # op, reference, primals (the first differentiated)
        (fastdit.gated_adaln, lambda *a: adaln.reference_gated(*a, 1e-6), [x, y, *v]),
        (fastdit.adaln_modulate, lambda *a: adaln.reference_modulate(*a, 1e-6), [x, *v[:2]]),
        (lambda t, **k: fastdit.patchify(t, 2, order="pqc", **k),
         lambda t: patchify.reference_patchify(t, 2, "pqc"), [image]),
        (lambda *a, **k: fastdit.downsampled_attention(*a, heads, **k),
         lambda *a: da.reference_layer(*a, heads, True, True, True), layer),
    ]  # fmt: skip
    for op, reference, primals in cases:
        tangents = [torch.randn_like(p) for p in primals]

        def through_op(*a, op=op):
            return op(*a, backend=backend)

        got = torch.func.jvp(through_op, tuple(primals), tuple(tangents))
        want = torch.func.jvp(reference, tuple(primals), tuple(tangents))
        for g, w in zip(
            torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
        ):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        with fwAD.dual_level():
            dual = fwAD.make_dual(primals[0], tangents[0])
            out = through_op(dual, *primals[1:])
            out = out[-1] if isinstance(out, tuple) else out
            tangent = fwAD.unpack_dual(out).tangent
        assert tangent is not None and tangent.abs().max() > 0


def test_forward_mode_ad_through_an_op_backward_is_an_error():
    """A dual cotangent reaching an op's backward (forward-over-reverse after a forward run
    without tangents) is refused, not dropped."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    v = [torch.randn(2, 32, dtype=torch.float64) for _ in range(2)]
    out = fastdit.adaln_modulate(x, *v, backend="torch")
    with fwAD.dual_level():
        cotangent = fwAD.make_dual(torch.ones_like(out), torch.ones_like(out))
        with pytest.raises(RuntimeError, match="adaln_modulate: forward-mode AD through its back"):
            torch.autograd.grad(out, x, cotangent)


def test_torch_func_gradient_transforms_run_the_reference():
    """torch.func.grad, vjp, jacrev and per-sample gradients (vmap of grad) through an op: an
    autograd.Function cannot serve torch.func, so the op runs its reference (these used to fail
    with "must override the setup_context staticmethod"); the results are the reference's."""
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    y = torch.randn(3, 4, 32, dtype=torch.float64)
    v = [torch.randn(3, 32, dtype=torch.float64) for _ in range(3)]

    def op(x, y, *v):
        return fastdit.gated_adaln(x, y, *v)[1].pow(2).sum()

    def ref(x, y, *v):
        return adaln.reference_gated(x, y, *v, 1e-6)[1].pow(2).sum()

    for transform in (torch.func.grad, torch.func.jacrev):
        torch.testing.assert_close(transform(op)(x, y, *v), transform(ref)(x, y, *v))
    (got,) = torch.func.vjp(lambda x: op(x, y, *v), x)[1](torch.tensor(1.0, dtype=x.dtype))
    (want,) = torch.func.vjp(lambda x: ref(x, y, *v), x)[1](torch.tensor(1.0, dtype=x.dtype))
    torch.testing.assert_close(got, want)
    per_sample = [t[:, None] for t in (x, y, *v)]
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(op))(*per_sample),
        torch.func.vmap(torch.func.grad(ref))(*per_sample),
    )
