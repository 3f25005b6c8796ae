"""ONNX export (fastdit/onnx): every op's translation, the models' graphs in onnxruntime (CPU).

The error measure is ``max |onnxruntime - PyTorch| / max |PyTorch|`` (fastdit.onnx.relative_error)
on random inputs, with the models' weights perturbed so that the zero-initialised adaLN and
final layers do not make the outputs trivial. PyTorch runs fp32 with the ``torch`` backend.

Tolerances: fp32 graphs 1e-4 (they measure about 1e-6). fp16 graphs, against the fp32
PyTorch model: ``FP16_TOL`` = 5e-3 (DiT-S/2 and U-DiT-S measure about 1e-3, within twice
PyTorch's own fp16 error on the same inputs; see the README).

Slow tests (DiT-XL/2 and U-DiT-B in fp32, the real-size fp16 graphs, the command line with a
registered model) take a minute or two and several GB each: marked ``slow``, they run with
FASTDIT_SLOW=1, which ``make test`` (and so CI) sets unless given SLOW=0.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastdit  # noqa: E402
import fastdit.onnx as fx  # noqa: E402
from fastdit.models import DiT  # noqa: E402

_EXPORTER_REASON = fx.exporter_unavailable_reason()
if _EXPORTER_REASON:
    pytest.skip(_EXPORTER_REASON, allow_module_level=True)

FP32_TOL = 1e-4
FP16_TOL = 5e-3
STANDARD_DOMAINS = {"", "ai.onnx"}

_SLOW_SKIP = pytest.mark.skipif(
    os.environ.get("FASTDIT_SLOW") != "1", reason="slow (minutes, GBs): set FASTDIT_SLOW=1"
)


def slow(test):
    """Marked ``slow`` (``-m "not slow"`` deselects it) and skipped unless FASTDIT_SLOW=1."""
    return pytest.mark.slow(_SLOW_SKIP(test))


def _perturbed(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """The model with every trainable weight moved by N(0, std), backend torch, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return fastdit.nn.set_backend(model, "torch").eval()


def _graph_checks(path: Path) -> onnx.ModelProto:
    """onnx.checker clean (full check, with shape inference), standard domains only."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= STANDARD_DOMAINS, f"custom-domain nodes in the graph: {domains}"
    assert {o.domain for o in proto.opset_import} <= STANDARD_DOMAINS
    return proto


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, **kwargs)
    return _perturbed(model, std=0.05)


# ----------------------------------------------------------------------------------------------
# The translation table


def test_translation_table_covers_every_op():
    from fastdit.ops import adaln, downsampled_attention, patchify

    table = fx.translation_table()
    ops = [op for module in (adaln, patchify, downsampled_attention) for op in module.OPS]
    expected = {getattr(torch.ops.fastdit, op.name).default for op in ops}
    assert set(table) == expected
    assert all(callable(fn) for fn in table.values())


def test_an_exporter_without_translations_is_refused(monkeypatch, tmp_path):
    """torch 2.4's torch.onnx.export takes no custom_translation_table: said before any work."""

    def old_export(model, args, f=None, *, dynamo=False, opset_version=None):
        raise AssertionError("not to be called")

    monkeypatch.setattr(torch.onnx, "export", old_export)
    with pytest.raises(RuntimeError, match="has no custom_translation_table.*upgrade torch"):
        fx.export_onnx(DiT(input_size=8, depth=1, hidden_size=32, num_heads=2), tmp_path / "m")


def test_import_fastdit_needs_no_onnx():
    # Beyond what torch's Dynamo imports itself (torch 2.4's imports onnxruntime when present;
    # fastdit imports Dynamo either way).
    code = (
        "import sys, torch._dynamo; before = set(sys.modules); import fastdit; fastdit.export_onnx;"
        "new = set(sys.modules) - before;"
        "assert not {'onnx', 'onnxscript', 'onnxruntime'} & new, sorted(new)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# ----------------------------------------------------------------------------------------------
# Every op, in one graph: each output against the eager op


class AllOps(nn.Module):
    """Every fastdit op (and each variant: layouts, orders, switches) with its own output."""

    def __init__(self, d: int = 16, heads: int = 2, channels: int = 3, p: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(1)

        def param(*shape, std=0.3):
            return nn.Parameter(torch.randn(*shape, generator=g) * std)

        self.p, self.grid = p, (2, 3)  # a 4 x 6 image: a 2 x 3 patch grid, a 2 x 3 group grid
        n = self.grid[0] * self.grid[1]
        self.embed_w, self.embed_b = param(d, channels, p, p), param(d)
        self.pos3, self.pos2 = param(1, n, d), param(n, d)
        self.final_w, self.final_b = param(p * p * channels, d), param(p * p * channels)
        self.dw_w, self.dw_b = param(d, 1, 5, 5), param(d)
        self.qkv_w, self.qkv_b = param(3 * d, d), param(3 * d)
        self.logit_scale = nn.Parameter(torch.tensor([2.3, 5.0]).reshape(heads, 1, 1))
        self.out_w, self.out_b = param(d, d, 1, 1), param(d)
        self.heads = heads

    def forward(self, tok, img, pix, cond, q, k, v):
        s1, s2, s3 = cond.unbind(1)  # (B, D) each
        f = fastdit
        outs = [
            f.adaln_modulate(tok, s1, s2),
            f.adaln_modulate(img, s1, s2, 1e-5),
            f.adaln_modulate(img.contiguous(memory_format=torch.channels_last), s1, s2),
            *f.gated_adaln(tok, tok.flip(1), s3, s1, s2),
            *f.gated_adaln(img, img.flip(2), s3, s1, s2),
            f.patchify(pix, self.p, order="cpq"),
            f.patchify(pix, self.p, order="pqc"),
            f.unpatchify(f.patchify(pix, self.p, order="cpq") * 2, self.p, self.grid, order="cpq"),
            f.unpatchify(f.patchify(pix, self.p, order="pqc"), self.p, self.grid, order="pqc"),
            f.patch_embed(pix, self.embed_w, self.embed_b, self.pos3),
            f.patch_embed(pix, self.embed_w, self.embed_b, self.pos2),
            f.final_layer(tok, s1, s2, self.final_w, self.final_b, self.p, self.grid),
            f.polyphase_split(img),
            f.polyphase_merge(f.polyphase_split(img) + 1, self.grid),
            f.polyphase_merge(f.polyphase_split(img), self.grid, channels_last=True),
            f.rope2d(q, self.grid),
            f.rope2d(q[:, 0, 0], self.grid),
            f.rope2d(q.flatten(0, 1)[:, :, :3], (1, 3)),
            f.attention_in_groups(q, k, v, self.logit_scale),
            f.attention_in_groups(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), None, cosine=False
            ),  # fmt: skip
        ]
        weights = (self.dw_w, self.dw_b, self.qkv_w, self.qkv_b, self.logit_scale, self.out_w,
                   self.out_b)  # fmt: skip
        outs.append(f.downsampled_attention(img, *weights, self.heads))
        outs.append(
            f.downsampled_attention(
                img, *weights, self.heads, rope=False, cosine=False, shortcut=False
            )  # fmt: skip
        )
        return tuple(outs)


def _all_ops_inputs(batch: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(batch, *shape, generator=g).to(dtype)

    # tok (B, 6, 16), img (B, 16, 4, 6), pix (B, 3, 4, 6), cond (B, 3, 16), q/k/v (B, 4, 2, 6, 8)
    return (
        r(6, 16),
        r(16, 4, 6),
        r(3, 4, 6),
        r(3, 16) * 0.5,
        r(4, 2, 6, 8),
        r(4, 2, 6, 8),
        r(4, 2, 6, 8),
    )


def _export_module(module: nn.Module, inputs, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), fx._quiet_exporter():
        program = torch.onnx.export(
            module.eval(),
            inputs,
            dynamo=True,
            custom_translation_table=fx.translation_table(),
            dynamic_shapes=tuple({0: batch} for _ in inputs),
            optimize=False,
            verbose=False,
        )
    fx.simplify(program.model)
    program.save(str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_op_matches_eager(tmp_path, dtype):
    """fp32: within FP32_TOL of the eager op. fp16: against the fp32 eager op, at most twice
    the error of the eager op run in fp16 (plus 1e-3), the rule fastdit's kernels follow."""
    module = fastdit.nn.set_backend(AllOps(), "torch")
    low = copy.deepcopy(module).to(dtype)
    path = _export_module(low, _all_ops_inputs(2, dtype), tmp_path / "ops.onnx")
    proto = _graph_checks(path)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["LayerNormalization"] >= 5 and ops["Softmax"] == 4 and ops["Conv"] >= 4
    assert not {"Cos", "Sin"} & set(ops)  # RoPE: constant tables, real arithmetic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = _all_ops_inputs(batch, seed=batch)
        with torch.no_grad():
            expected = module(*inputs)  # fp32 eager
            eager_low = low(*(x.to(dtype) for x in inputs))
        feed = {i.name: x.to(dtype).numpy() for i, x in zip(session.get_inputs(), inputs)}
        got = session.run(None, feed)
        assert len(got) == len(expected)
        for i, (out, ref, same) in enumerate(zip(got, expected, eager_low)):
            assert tuple(out.shape) == tuple(ref.shape), i
            err = fx.relative_error(torch.from_numpy(out.astype("float32")), ref)
            tol = FP32_TOL
            if dtype != torch.float32:
                tol = 2 * fx.relative_error(same, ref) + 1e-3
            assert err < tol, f"output {i}: relative error {err:.2e} > {tol:.2e} (batch {batch})"


# ----------------------------------------------------------------------------------------------
# The models


@pytest.fixture(scope="module")
def dit_s2(tmp_path_factory):
    model = _perturbed(fastdit.models.create("DiT-S/2"))
    path = fx.export_onnx(model, tmp_path_factory.mktemp("dit") / "dit_s2.onnx")
    return model, path


@pytest.fixture(scope="module")
def udit_s(tmp_path_factory):
    """U-DiT-S with a fixed batch of 2: the dynamic-batch export of U-DiT's graph takes twice
    as long (about 50 s here); it runs in the slow tests, and every U-DiT op is checked at
    batches 1 and 3 on one graph in test_every_op_matches_eager."""
    model = _perturbed(fastdit.models.create("U-DiT-S"))
    model.train()  # export_onnx exports the folded inference form and puts the mode back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("udit") / "udit_s.onnx"
    fx.export_onnx(model, path, batch_size=2, dynamic_batch=False)
    return model, path, state


def test_dit_s2_graph(dit_s2):
    model, path = dit_s2
    proto = _graph_checks(path)
    names = {i.name: _dims(i) for i in proto.graph.input}
    assert names == {"x": ["batch", 4, 32, 32], "t": ["batch"], "y": ["batch"]}
    assert [(o.name, _dims(o)) for o in proto.graph.output] == [("out", ["batch", 8, 32, 32])]
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["LayerNormalization"] == 2 * 12 + 1  # adaLN: one per norm, no decomposition
    assert {i.type.tensor_type.elem_type for i in proto.graph.input} == {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_s2_matches_pytorch(dit_s2, batch):
    model, path = dit_s2
    assert fx.compare_with_torch(model, path, batch_size=batch, seed=batch) < FP32_TOL


def test_dit_b4_matches_pytorch(tmp_path):
    model = _perturbed(fastdit.models.create("DiT-B/4"))
    path = fx.export_onnx(model, tmp_path / "dit_b4.onnx", dynamic_batch=False)
    _graph_checks(path)
    assert fx.compare_with_torch(model, path, batch_size=2) < FP32_TOL


def test_udit_s_matches_pytorch(udit_s):
    model, path, _ = udit_s
    assert fx.compare_with_torch(model, path, batch_size=2) < FP32_TOL


def test_udit_s_graph_is_the_folded_form(udit_s):
    model, path, state = udit_s
    proto = _graph_checks(path)
    assert {i.name: _dims(i) for i in proto.graph.input}["x"] == [2, 4, 32, 32]
    names = [init.name for init in proto.graph.initializer]
    assert not [n for n in names if "project_in" in n or "dwconv" in n]  # no train-form FFN
    numel = sum(int(torch.tensor(list(init.dims)).prod()) for init in proto.graph.initializer)
    folded = model.parameter_count(folded=True)
    assert folded <= numel < folded * 1.02  # + the norm constants and RoPE tables
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["Softmax"] == 2 * sum(model.depth)  # one attention per sub-layer
    # the model is left as it was: training mode, train-form weights untouched, not folded
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_fp16_graph(tmp_path):
    model = tiny_dit()
    path = fx.export_onnx(model, tmp_path / "fp16.onnx", dtype="fp16")
    proto = _graph_checks(path)
    x, t, _ = proto.graph.input
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert t.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert next(model.parameters()).dtype == torch.float32  # exported from a copy
    for batch in (1, 3):
        assert fx.compare_with_torch(model, path, batch_size=batch) < FP16_TOL


def test_ort_transformer_optimizer_keeps_outputs(dit_s2):
    """onnxruntime's transformer optimiser (BERT fusions) on the DiT graph: it fuses each gated
    residual Add with the following LayerNormalization (SkipLayerNormalization, 24 in
    DiT-S/2); it finds no attention to fuse. Its BiasGelu fusion is left off: it replaces the
    tanh-approximated GELU of DiT by the exact one (a 3e-5 relative change)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model, path = dit_s2
    options = FusionOptions("bert")
    options.enable_bias_gelu = False
    optimized = optimize_model(
        str(path), model_type="bert", num_heads=6, hidden_size=384,
        optimization_options=options,
    )  # fmt: skip
    fused = optimized.get_fused_operator_statistics()
    assert fused["SkipLayerNormalization"] == 24
    inputs = fx.model_inputs(model, 2, generator=torch.Generator().manual_seed(2))
    plain = fx.run_onnxruntime(path, inputs)
    session = ort.InferenceSession(
        optimized.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert fx.relative_error(fx.run_onnxruntime(None, inputs, session=session), plain) < 1e-5


# ----------------------------------------------------------------------------------------------
# Options: classifier-free guidance, opsets, static batch, backends, external data


def test_cfg_graph(tmp_path):
    model = tiny_dit()
    path = fx.export_onnx(model, tmp_path / "cfg.onnx", cfg=True, guidance_channels="all")
    proto = _graph_checks(path)
    assert [i.name for i in proto.graph.input] == ["x", "t", "y", "cfg_scale"]
    assert _dims(proto.graph.input[0])[0] == "2*half"
    for batch, scale in ((2, 4.0), (6, 1.5)):
        err = fx.compare_with_torch(
            model, path, batch_size=batch, cfg=True, cfg_scale=scale, guidance_channels="all"
        )
        assert err < FP32_TOL


def test_lowest_opset(tmp_path):
    model = tiny_dit()
    path = fx.export_onnx(model, tmp_path / "m.onnx", opset=17)
    proto = _graph_checks(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    assert fx.compare_with_torch(model, path, batch_size=2) < FP32_TOL


def test_highest_opset_static_batch_external_data(tmp_path, monkeypatch):
    model = tiny_dit()
    monkeypatch.setattr(fx, "_EXTERNAL_DATA_BYTES", 0)  # as a model over 2 GB would be written
    path = fx.export_onnx(
        model, tmp_path / "static.onnx", batch_size=3, dynamic_batch=False, opset=25
    )
    assert (tmp_path / "static.onnx.data").is_file()
    proto = _graph_checks(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 25
    assert _dims(proto.graph.input[0]) == [3, 4, 8, 8]
    assert fx.compare_with_torch(model, path, batch_size=3) < FP32_TOL


def test_export_ignores_the_run_time_backend(tmp_path):
    """The graph comes from the translations: a model set to a backend that cannot run here
    (cuda on a CPU machine) exports all the same, and keeps its setting."""
    model = fastdit.nn.set_backend(tiny_dit(), "cuda")
    path = fx.export_onnx(model, tmp_path / "m.onnx")
    assert model.blocks[0].backend == "cuda"
    fastdit.nn.set_backend(model, "torch")
    assert fx.compare_with_torch(model, path, batch_size=2) < FP32_TOL


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error before any export work


@pytest.fixture
def no_export(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(torch.onnx, "export", fail)
    monkeypatch.setattr(torch.export, "export", fail)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype=torch.bfloat16), ValueError, "dtype must be torch.float32"),
        (dict(dtype=torch.float64), ValueError, "dtype must be"),
        (dict(dtype="int8"), ValueError, "dtype must be"),
        (dict(opset=16), ValueError, "opset must be None .* from 17"),
        (dict(opset=26), ValueError, "opset must be"),
        (dict(opset="18"), ValueError, "opset must be"),
        (dict(opset=True), ValueError, "opset must be"),
        (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
        (dict(cfg=True, batch_size=3), ValueError, "with cfg=True, batch_size .* must be even"),
        (dict(cfg=True, guidance_channels=9), ValueError, "guidance_channels must be"),
        (dict(dynamic_batch="yes"), ValueError, "dynamic_batch must be True or False"),
    ],
)
def test_bad_arguments(tmp_path, no_export, kwargs, error, match):
    model = tiny_dit()
    with pytest.raises(error, match=f"fastdit.export_onnx: {match}"):
        fx.export_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


def test_bad_model_and_path(tmp_path, no_export):
    with pytest.raises(TypeError, match="model must be a fastdit DiT or U-DiT.*Linear"):
        fx.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        fx.export_onnx(tiny_dit(), tmp_path / "missing" / "m.onnx")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        fx.export_onnx(tiny_dit(), tmp_path)


def test_missing_onnx_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ImportError, match=r"needs onnxscript: pip install 'fastdit\[onnx\]'"):
        fx.export_onnx(tiny_dit(), tmp_path / "m.onnx")


# ----------------------------------------------------------------------------------------------
# The command line


def _cli(monkeypatch, capsys, *args: str) -> tuple[int | str | None, str]:
    from fastdit import __main__ as cli

    monkeypatch.setattr(sys, "argv", ["python -m fastdit", "export", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err + (code if isinstance(code, str) else "")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--model", "DiT-Q/3", "--out", "{tmp}/m.onnx"], "unknown model 'DiT-Q/3'"),
        (["--model", "DiT-S/8", "--out", "{tmp}/m.onnx", "--opset", "12"], "opset must be"),
        (["--model", "DiT-S/8", "--out", "{tmp}/m.onnx", "--dtype", "bf16"], "invalid choice"),
        (["--model", "DiT-S/8", "--out", "{tmp}/no/m.onnx"], "does not exist"),
        (["--model", "DiT-S/8"], "the following arguments are required: --out"),
        (
            ["--model", "DiT-S/8", "--out", "{tmp}/m.onnx", "--cfg", "--guidance-channels", "9"],
            "guidance_channels must be an int in 1..8",
        ),
        (
            ["--model", "DiT-S/8", "--out", "{tmp}/m.onnx", "--cfg", "--guidance-channels", "x"],
            "guidance_channels must be a positive int, None or 'all', got 'x'",
        ),
        (
            ["--model", "DiT-S/8", "--out", "{tmp}/m.onnx", "--guidance-channels", "all"],
            "--guidance-channels applies only with --cfg",
        ),
    ],
)
def test_cli_errors(monkeypatch, capsys, tmp_path, no_export, args, match):
    code, out = _cli(monkeypatch, capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code not in (0, None) and match in out


def test_cli_reads_training_checkpoints(monkeypatch, capsys, tmp_path, no_export):
    """A training checkpoint (weights under 'ema', pickled argparse args beside them) needs
    --trusted, and a DiT's input size comes from it: a 512 px DiT-S/8 (64 x 64 latents)
    builds without --input-size. The export itself is stopped (no_export): the loading is
    what this checks."""
    from fastdit.models import create

    path = tmp_path / "ckpt.pt"
    weights = create("DiT-S/8", input_size=64).state_dict()
    torch.save({"ema": weights, "args": argparse.Namespace(image_size=512)}, path)
    args = ["--model", "DiT-S/8", "--out", str(tmp_path / "m.onnx"), "--checkpoint", str(path)]
    code, out = _cli(monkeypatch, capsys, *args)
    assert code not in (0, None) and "--trusted" in out, out
    with pytest.raises(AssertionError, match="the export started"):
        _cli(monkeypatch, capsys, *args, "--trusted")


@slow
def test_cli_export_and_check(monkeypatch, capsys, tmp_path):
    code, out = _cli(
        monkeypatch, capsys, "--model", "DiT-S/8", "--out", str(tmp_path / "s8.onnx"),
        "--opset", "18", "--check",
    )  # fmt: skip
    assert code == 0, out
    assert "wrote" in out and "max relative error" in out
    _graph_checks(tmp_path / "s8.onnx")


# ----------------------------------------------------------------------------------------------
# Slow: the large configs and real-size fp16 graphs


@slow
@pytest.mark.parametrize("name", ["DiT-XL/2", "U-DiT-B"])
def test_large_models_match_pytorch(tmp_path, name):
    model = _perturbed(fastdit.models.create(name))
    path = fx.export_onnx(model, tmp_path / "large.onnx")
    if name == "DiT-XL/2":  # 2.7 GB of weights: beside the graph
        assert (tmp_path / "large.onnx.data").is_file()
    proto = onnx.load(str(path), load_external_data=False)
    assert {node.domain for node in proto.graph.node} <= STANDARD_DOMAINS
    onnx.checker.check_model(str(path), full_check=True)
    for batch in (1, 2):
        assert fx.compare_with_torch(model, path, batch_size=batch, seed=batch) < FP32_TOL


@slow
@pytest.mark.parametrize("name", ["DiT-S/2", "U-DiT-S"])
def test_real_size_fp16(tmp_path, name):
    model = _perturbed(fastdit.models.create(name))
    path = fx.export_onnx(model, tmp_path / "fp16.onnx", dtype=torch.float16)
    _graph_checks(path)
    for batch in (1, 3):  # measured: DiT-S/2 5e-4, U-DiT-S 1e-3 (PyTorch fp16: 2e-3)
        assert fx.compare_with_torch(model, path, batch_size=batch, seed=batch) < FP16_TOL


@slow
def test_udit_s_dynamic_batch(tmp_path):
    model = _perturbed(fastdit.models.create("U-DiT-S"))
    path = fx.export_onnx(model, tmp_path / "udit_s.onnx")
    proto = _graph_checks(path)
    assert _dims(proto.graph.input[0]) == ["batch", 4, 32, 32]
    for batch in (1, 3):
        assert fx.compare_with_torch(model, path, batch_size=batch, seed=batch) < FP32_TOL
