"""DiT: fastdit's modules and models against a plain transcription of the released code.

``dit_reference`` stands in for the authors' ``models.py``; its state dicts load into
fastdit's models with ``strict=True`` and the outputs must agree in fp32 to 1e-5 (relative to
the output's largest value).
"""

from __future__ import annotations

import argparse
import math

import dit_reference as ref
import pytest
import torch
from devices import kernel_backends, kernel_device

import fastdit
from fastdit import models
from fastdit.models import DiT, get_2d_sincos_pos_embed, load_checkpoint
from fastdit.nn import DiTBlock, LabelEmbedder, TimestepEmbedder, set_backend

NAMES = [f"DiT-{size}/{p}" for size in ("XL", "L", "B", "S") for p in (2, 4, 8)]
CONFIGS = {  # the paper's table: depth, hidden size D, heads
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}
# A small model for the tests that need no particular config.
TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def expected_state(name: str, input_size: int = 32) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the released model, from the config numbers alone."""
    size, p = name[4:].split("/")
    depth, D, _ = CONFIGS[size]
    p, C, classes = int(p), 4, 1000
    N = (input_size // p) ** 2
    table = {
        "pos_embed": (1, N, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        table.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })  # fmt: skip
    table.update({
        "final_layer.linear.weight": (p * p * 2 * C, D),
        "final_layer.linear.bias": (p * p * 2 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })  # fmt: skip
    return table


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def pair(name: str, **kwargs) -> tuple[torch.nn.Module, DiT]:
    """The reference with PyTorch's default (random, non-zero) init, and fastdit's model with
    the reference's weights loaded strictly."""
    reference = ref.build(name, **kwargs)
    model = load_checkpoint(name, reference.state_dict(), **kwargs)
    return reference, model


def inputs(batch: int, size: int, classes: int = 1000):
    x = torch.randn(batch, 4, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, classes + 1, (batch,))
    return x, t, y


# ----------------------------------------------------------------------------------------------
# Names, shapes, sizes


def test_registry():
    assert list(models.DiT_models) == NAMES
    assert set(NAMES) <= set(models.MODELS)
    assert models.names()[: len(NAMES)] == NAMES
    with pytest.raises(ValueError, match=r"unknown model 'DiT-M/2'.*DiT-XL/2.*DiT-S/8"):
        models.create("DiT-M/2")
    with pytest.raises(ValueError, match="registered already"):
        models.register("DiT-XL/2", lambda **kw: None)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_names_and_shapes(name):
    with torch.device("meta"):
        model = models.create(name)
        reference = ref.build(name)
    expected = expected_state(name)
    assert shapes(model) == expected
    assert shapes(reference) == expected  # the stand-in for the authors' code agrees too
    size, p = name[4:].split("/")
    assert type(model) is DiT and model.patch_size == int(p)
    assert len(model.blocks) == CONFIGS[size][0] and model.num_heads == CONFIGS[size][2]


def test_dit_xl_2_size():
    with torch.device("meta"):
        model = models.create("DiT-XL/2")
    assert len(model.state_dict()) == 292
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert sum(math.prod(s) for s in expected_state("DiT-XL/2").values()) == 675_129_632
    # pos_embed: a parameter (so in parameters() and the state dict) that is not trained
    assert not model.pos_embed.requires_grad
    assert any(p is model.pos_embed for p in model.parameters())
    with torch.device("meta"):
        big = models.create("DiT-XL/2", input_size=64)  # 512 px
    assert big.pos_embed.shape == (1, 1024, 1152)


# ----------------------------------------------------------------------------------------------
# Outputs against the reference


@pytest.mark.parametrize(
    "name, size, backend, fuse",
    [
        ("DiT-S/2", 16, None, True),
        ("DiT-S/2", 8, "torch", False),
        ("DiT-B/4", 16, "torch", True),
    ],
)
def test_matches_reference(name, size, backend, fuse):
    reference, model = pair(name, input_size=size)
    set_backend(model, backend)
    model.fuse_blocks = fuse
    reference.eval(), model.eval()
    x, t, y = inputs(2, size)
    with torch.no_grad():
        want = reference(x, t, y)
        got = model(x, t, y)
    assert got.shape == (2, 8, size, size) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    # the unpatchify kept for callers agrees with the einsum
    tokens = torch.randn(2, (size // model.patch_size) ** 2, model.patch_size**2 * 8)
    assert torch.equal(model.unpatchify(tokens), reference.unpatchify(tokens))


def test_train_mode_label_dropout():
    reference, model = pair("DiT-S/2", input_size=8)
    set_backend(model, "torch")  # the backends are compared in test_matches_reference
    reference.train(), model.train()
    x, t, y = inputs(8, 8)
    y = y.clamp(max=999)
    for m in (reference, model):
        m.y_embedder.dropout_prob = 0.5
    torch.manual_seed(1)
    mask = torch.rand(8) < 0.5
    assert mask.any() and not mask.all()  # this seed drops some labels, not all
    with torch.no_grad():
        torch.manual_seed(1)  # the same draw in both: the authors' torch.rand call
        want = reference(x, t, y)
        torch.manual_seed(1)
        got = model(x, t, y)
        assert rel_err(got, want) < 1e-5
        # the dropped labels are the null class: eval with those labels gives the same
        model.eval()
        assert rel_err(model(x, t, torch.where(mask, 1000, y)), want) < 1e-5
        # dropout disabled: train mode equals the reference's eval mode
        model.train()
        model.y_embedder.dropout_prob = 0.0
        assert rel_err(model(x, t, y), reference.eval()(x, t, y)) < 1e-5
    # forced drops, identically in both embedders
    force = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1])
    emb_ref = reference.y_embedder(y, False, force_drop_ids=force)
    emb = model.y_embedder(y, False, force_drop_ids=force)
    assert torch.equal(emb, emb_ref)
    assert torch.equal(emb[0], model.y_embedder.embedding_table.weight[1000])


def test_backward_matches_reference():
    reference = ref.DiT(**TINY, class_dropout_prob=0.0)
    model = load_checkpoint(DiT(**TINY, class_dropout_prob=0.0), reference.state_dict())
    device = kernel_device()  # where auto finds kernels: the check at the end needs them
    reference, model = reference.to(device), model.to(device)
    x, t, y = (v.to(device) for v in inputs(2, 8, classes=9))
    w = torch.randn(2, 8, 8, 8, device=device)
    (reference(x, t, y) * w).sum().backward()
    (model(x, t, y) * w).sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
            continue
        want = ref_params[name].grad
        assert rel_err(p.grad, want) < 1e-4, name
    # auto: the patchify family's kernels ran both ways wherever a kernel backend is available
    from fastdit.ops import patchify as P

    if kernel_backends(device):
        for op in (P._patch_embed, P._final_layer):
            assert op.last_backend in ("cuda", "triton"), op.name
            assert op.last_backward_backend in ("cuda", "triton"), op.name


def test_forward_with_cfg():
    reference = ref.DiT(**TINY).eval()
    model = load_checkpoint(DiT(**TINY), reference.state_dict()).eval()
    x, t, _ = inputs(4, 8)
    t = torch.cat([t[:2], t[:2]])
    y = torch.tensor([3, 7, 10, 10])  # labels, then the null class
    scale = 4.0
    with torch.no_grad():
        out = model(torch.cat([x[:2], x[:2]]), t, y)  # the doubled batch, first half twice
        cond, uncond = out[:2], out[2:]
        guided = uncond + scale * (cond - uncond)
        for channels, g in ((3, 3), ("all", 4), (None, 4), (8, 8)):
            got = model.forward_with_cfg(x, t, y, scale, guidance_channels=channels)
            assert got.shape == out.shape
            for half in (got[:2], got[2:]):
                torch.testing.assert_close(half[:, :g], guided[:, :g], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[:, g:], out[:, g:], rtol=0, atol=0)
        # the default is the released code's 3-channel quirk
        want = reference.forward_with_cfg(x, t, y, scale)
        assert rel_err(model.forward_with_cfg(x, t, y, scale), want) < 1e-5
    with pytest.raises(ValueError, match="guidance_channels must be in 1..8"):
        model.forward_with_cfg(x, t, y, scale, guidance_channels=9)
    with pytest.raises(TypeError, match="guidance_channels"):
        model.forward_with_cfg(x, t, y, scale, guidance_channels="some")


def test_wrong_input_size():
    model = DiT(**TINY)
    with pytest.raises(ValueError, match="built for 8x8 latents"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


# ----------------------------------------------------------------------------------------------
# Initialisation


def test_adaln_zero_init():
    model = DiT(**TINY)
    D, p = 64, 2
    x, t, y = inputs(2, 8, classes=10)
    c = torch.randn(2, D)
    tokens = torch.randn(2, 16, D)
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(tokens, c), tokens)  # every block starts as the identity
        out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.equal(out, torch.zeros_like(out))
    zeroed = [b.adaLN_modulation[1] for b in model.blocks]
    zeroed += [model.final_layer.adaLN_modulation[1], model.final_layer.linear]
    for layer in zeroed:
        assert not layer.weight.any() and not layer.bias.any()
    for block in model.blocks:  # Xavier-uniform weights, zero biases
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            fan_out, fan_in = layer.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert 0.5 * bound < layer.weight.abs().max() <= bound
            assert not layer.bias.any()
    conv = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (4 * p * p + D))
    assert 0.5 * bound < conv.abs().max() <= bound and not model.x_embedder.proj.bias.any()
    for w in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight):
        assert 0.01 < w.std() < 0.03
    assert not model.t_embedder.mlp[0].bias.any() and not model.t_embedder.mlp[2].bias.any()
    table = get_2d_sincos_pos_embed(D, 4).float()[None]
    assert torch.equal(model.pos_embed.data, table)


def test_pos_embed_2x2_by_hand():
    # D = 8: quarter = 2 frequencies, w = (1, 1/100). Token n = 2 * row + col.
    def expected(row, col):
        half = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
        return half + [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]

    want = torch.tensor([expected(r, c) for r in range(2) for c in range(2)], dtype=torch.float64)
    table = get_2d_sincos_pos_embed(8, 2)
    assert table.dtype == torch.float64 and table.shape == (4, 8)
    torch.testing.assert_close(table, want, rtol=0, atol=1e-15)
    # the model stores it as float32 (1, N, D); the reference agrees
    model = DiT(input_size=4, patch_size=2, hidden_size=8, depth=1, num_heads=2)
    assert torch.equal(model.pos_embed.data, want.float()[None])
    torch.testing.assert_close(ref.sincos_table(8, 2), want, rtol=0, atol=1e-15)
    # non-square grids: rows and columns as for the square table
    rect = get_2d_sincos_pos_embed(8, (2, 3))
    assert torch.equal(rect[4], torch.tensor(expected(1, 1), dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Embedders


def test_timestep_embedder():
    emb = TimestepEmbedder(16, frequency_embedding_size=4)
    # half = 2 frequencies: exp(0) = 1 and exp(-ln(10000) / 2) = 0.01; [cos, cos, sin, sin]
    f = emb.timestep_embedding(torch.tensor([0, 2]), 4)
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(2), math.cos(0.02), math.sin(2), 0.02]])
    want[1, 3] = math.sin(0.02)
    torch.testing.assert_close(f, want, rtol=0, atol=1e-6)
    assert f.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        assert emb.to(dtype)(torch.tensor([5, 999])).dtype == dtype


def test_label_embedder():
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10
    emb = LabelEmbedder(10, 8, 0.5)
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.arange(8)
    table = emb.embedding_table.weight
    assert torch.equal(emb(labels, False), table[:8])  # no dropout outside training
    force = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1])
    got = emb(labels, False, force_drop_ids=force)
    want = table[torch.where(force == 1, 10, labels)]
    assert torch.equal(got, want)
    # a generator makes the draw reproducible, apart from the global generator
    a, b = LabelEmbedder(10, 8, 0.5), LabelEmbedder(10, 8, 0.5)
    a.generator, b.generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.token_drop(torch.arange(64)), b.token_drop(torch.arange(64)))
    dropped = a.token_drop(torch.arange(64)) == 10
    assert dropped.any() and not dropped.all()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_load_checkpoint(tmp_path):
    reference = ref.DiT(**TINY)
    state = reference.state_dict()
    x, t, y = inputs(2, 8, classes=10)
    with torch.no_grad():
        want = reference.eval()(x, t, y)

    def check(model):
        assert isinstance(model, DiT)
        with torch.no_grad():
            assert rel_err(model.eval()(x, t, y), want) < 1e-5

    for source in (
        state,
        {"ema": state, "model": {}, "opt": {}},
        {"model": state},
        {f"module.{k}": v for k, v in state.items()},
        {"ema": {f"module.{k}": v for k, v in state.items()}},
    ):
        check(load_checkpoint(DiT(**TINY), source))

    path = tmp_path / "ckpt.pt"
    torch.save({"ema": state, "model": state}, path)
    check(load_checkpoint(DiT(**TINY), path))
    check(load_checkpoint(DiT(**TINY), str(path)))

    # a training checkpoint with pickled Python objects, as the released train.py writes
    path = tmp_path / "train.pt"
    torch.save({"ema": state, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_checkpoint(DiT(**TINY), path)
    check(load_checkpoint(DiT(**TINY), path, trusted=True))

    # strictness: a missing key fails unless strict=False
    partial = {k: v for k, v in state.items() if k != "final_layer.linear.bias"}
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        load_checkpoint(DiT(**TINY), partial)
    load_checkpoint(DiT(**TINY), partial, strict=False)
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(DiT(**TINY), {"args": 1})


def test_load_checkpoint_by_name():
    reference = ref.build("DiT-S/8", input_size=16)  # pos_embed says: 16x16 latents
    model = load_checkpoint("DiT-S/8", reference.state_dict())
    assert isinstance(model, DiT) and model.x_embedder.img_size == (16, 16)
    assert not model.pos_embed.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad
    params = dict(model.named_parameters())
    for k, v in reference.state_dict().items():  # copies of the dict's tensors, not aliases
        assert torch.equal(params[k], v) and params[k].data_ptr() != v.data_ptr()
    # a dict without every parameter: built normally, loaded non-strictly
    partial = {k: v for k, v in reference.state_dict().items() if k != "pos_embed"}
    loose = load_checkpoint("DiT-S/8", partial, strict=False, input_size=16)
    assert torch.equal(loose.pos_embed, get_2d_sincos_pos_embed(384, 2).float()[None])
    x, t, y = inputs(1, 16)
    with torch.no_grad():
        assert rel_err(model.eval()(x, t, y), reference.eval()(x, t, y)) < 1e-5
    with pytest.raises(ValueError, match="unknown model"):
        load_checkpoint("DiT-XXL/2", reference.state_dict())


# ----------------------------------------------------------------------------------------------
# Dtypes and compilation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    reference = ref.DiT(**TINY).eval()
    model = load_checkpoint(DiT(**TINY), reference.state_dict()).eval()
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    assert model.pos_embed.dtype == dtype
    x, t, y = inputs(2, 8, classes=10)
    with torch.no_grad():
        got = model(x.to(dtype), t, y)
        want = reference(x, t, y)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) < 0.05


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    # DiT-S/2 through AOT autograd (one graph, no break); Inductor's code generation on a
    # small two-block model (compiling DiT-S/2's twelve blocks takes it ~40 s on a CPU)
    if compiler == "inductor":
        model = load_checkpoint(DiT(**TINY), ref.DiT(**TINY).state_dict())
    else:
        _, model = pair("DiT-S/2", input_size=8)
    torch._dynamo.reset()
    compiled = torch.compile(model.eval(), fullgraph=True, backend=compiler)
    x, t, y = inputs(2, 8, classes=model.num_classes)
    with torch.no_grad():
        want = model(x, t, y)
        got = compiled(x, t, y)
    assert rel_err(got, want) < 1e-5


def test_jvp_through_the_model_matches_the_released_code():
    """torch.func.jvp through DiT (continuous-time consistency training takes JVPs of the
    network): fastdit's ops run their references under forward-mode AD, so the tangent equals
    the released code's instead of missing the ops' contributions."""
    reference = ref.DiT(**TINY)
    model = load_checkpoint(DiT(**TINY), reference.state_dict())
    for p in reference.parameters():  # adaLN-Zero would make the blocks the identity
        p.data.add_(torch.randn_like(p) * 0.05)
    model.load_state_dict(reference.state_dict())
    x, t, y = inputs(2, 8, classes=10)
    tangent = torch.randn(2, 4, 8, 8)
    # (PyTorch's fused attention kernels have no forward-mode AD; its math one has.)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        _, got = torch.func.jvp(lambda x: model(x, t, y), (x,), (tangent,))
    _, want = torch.func.jvp(lambda x: reference(x, t, y), (x,), (tangent,))
    assert rel_err(got, want) < 1e-5 and want.abs().max() > 0


def test_public_names():
    assert fastdit.load_checkpoint is load_checkpoint
    assert isinstance(DiTBlock(64, 4), torch.nn.Module)
