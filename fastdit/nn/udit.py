"""U-DiT's layers as drop-in modules: the authors' parameter names, fastdit's ops inside.

U-DiT (Tian et al., 2024; ``udit_models.py`` of YuchuanTian/U-DiT) works on the latent grid,
channels-first ``(B, D, H, W)``. Every module here keeps the released module's parameter names,
so the authors' state dicts load with ``strict=True``; each takes ``backend=None`` (a plain
attribute, see :func:`fastdit.nn.set_backend`) for the fastdit ops it calls.

- :class:`DownsampledAttention` (the authors' ``DownSample_Attn``): the ``downsampled_attention``
  op. RoPE2D is the real-arithmetic :class:`RoPE2D` with cached tables on the staged path.
- :class:`FeedForward`: the re-parameterised FFN. Its inference (folded) form is built from the
  trained parameters into non-persistent buffers, never written into them; see the class.
- :class:`UDiTBlock` (``U_DiTBlock``): two attention + FFN sub-layers with adaLN-Zero; every
  residual add is fused with the next norm and modulation (``gated_adaln``).
- :class:`UDiTFinalLayer` (the authors' ``FinalLayer``), :class:`Downsample`,
  :class:`Upsample`, :class:`OverlapPatchEmbed`, :class:`ConvMlp` (the ablation's plain FFN),
  :class:`LayerNorm2d`.

Differences from the released code, on purpose:

- folding never touches a trained parameter: ``eval()`` twice, ``eval()`` then ``train()``,
  and a state dict saved after ``eval()`` all stay right, and the folded tensors follow
  ``.to()``, ``.half()``, ``.bfloat16()``;
- RoPE2D uses the true group grid ``(H/2, W/2)`` (the released table assumes a square one:
  equal on square grids) and real arithmetic (no complex tensors);
- the parameter-free norms are kept as modules for their ``eps`` only; the normalisation runs
  inside the adaLN ops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.adaln import adaln_modulate, gated_adaln
from ..ops.downsampled_attention import (
    ROPE_THETA,
    attention_in_groups,
    downsampled_attention,
    polyphase_merge,
    polyphase_split,
)
from .dit import _split


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _is_channels_last(x: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


# ----------------------------------------------------------------------------------------------
# Norm, patch embedding, down- and upsampling


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, D, H, W)``, for every pixel (the authors' class).

    U-DiT's blocks use it without affine weights (nothing in the state dict); there it only
    carries ``eps``, the norm itself runs inside the adaLN ops.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class OverlapPatchEmbed(nn.Module):
    """``proj``: Conv2d(in_c, embed_dim, 3, padding 1): latents to features, same grid."""

    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """``body``: Conv3x3(n, n/2, no bias), PixelUnshuffle(2): (B, n, H, W) -> (B, 2n, H/2, W/2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PixelUnshuffle(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """``body``: Conv3x3(n, 2n, no bias), PixelShuffle(2): (B, n, H, W) -> (B, n/2, 2H, 2W)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PixelShuffle(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ----------------------------------------------------------------------------------------------
# RoPE2D


class RoPE2D(nn.Module):
    """U-DiT's 2-D rotary position embedding in real arithmetic, with cached tables.

    For a head dim ``h`` (a multiple of 4), ``f_j = 1 / 10000^(4j / h)`` for ``j < h/4``; the
    token at row ``r``, column ``c`` of the ``(gh, gw)`` group grid turns channel pair
    ``m = (2m, 2m+1)`` by ``theta_{2j} = c * f_j`` and ``theta_{2j+1} = r * f_j``::

        out[2m]   = x[2m] * cos(theta_m) - x[2m+1] * sin(theta_m)
        out[2m+1] = x[2m] * sin(theta_m) + x[2m+1] * cos(theta_m)

    the released complex product ``(x[2m] + i x[2m+1]) * exp(i theta_m)`` (equal to it on the
    square grids the released code supports), computed in float32 (float64 for float64 x).

    The ``(2, n, h/2)`` table of cos and sin for a grid is a non-persistent buffer
    ``table_{gh}x{gw}_{f32|f64}``: built on first use, then reused; it follows ``.to()``,
    is rebuilt when found on another device or in another dtype (after ``.half()``), and is
    never in the state dict. Under ``torch.compile`` a missing table is computed in the graph
    instead of being stored.
    """

    def __init__(self, head_dim: int, theta: float = ROPE_THETA):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE2D: head_dim must be a multiple of 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def build_table(
        self, grid: Sequence[int], device: torch.device | None = None, dtype=torch.float32
    ) -> torch.Tensor:
        """A fresh ``(2, gh*gw, head_dim/2)`` table: cos, then sin, of every angle."""
        gh, gw = int(grid[0]), int(grid[1])
        h = self.head_dim
        freqs = 1.0 / self.theta ** (torch.arange(0, h, 4, device=device, dtype=dtype) / h)
        cols = torch.arange(gw, device=device, dtype=dtype)[:, None] * freqs  # (gw, h/4)
        rows = torch.arange(gh, device=device, dtype=dtype)[:, None] * freqs  # (gh, h/4)
        angles = torch.stack(
            (cols[None].expand(gh, gw, -1), rows[:, None].expand(gh, gw, -1)), dim=-1
        ).reshape(gh * gw, h // 2)
        return torch.stack((torch.cos(angles), torch.sin(angles)))

    def table(self, grid: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The cached table for ``grid`` on ``device`` in ``dtype`` (built if needed)."""
        name = f"table_{int(grid[0])}x{int(grid[1])}_{'f64' if dtype == torch.float64 else 'f32'}"
        cached = self._buffers.get(name)
        if cached is not None and cached.device == device and cached.dtype == dtype:
            return cached
        table = self.build_table(grid, device, dtype)
        if not _compiling():
            self.register_buffer(name, table, persistent=False)
        return table

    def clear_cache(self) -> None:
        """Drop every cached table."""
        for name in [n for n in self._buffers if n.startswith("table_")]:
            del self._buffers[name]

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """x: (..., n, head_dim), tokens row-major on ``grid`` = (gh, gw). Returns x's dtype."""
        ct = _compute_dtype(x.dtype)
        cos, sin = self.table(grid, x.device, ct).unbind(0)
        pairs = x.to(ct).unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention


def _kernel_size(downsampler: str | int) -> int:
    """'dwconv5' (the released spelling) or 5 -> 5; odd sizes only."""
    if isinstance(downsampler, int) and not isinstance(downsampler, bool):
        k = downsampler
    else:
        m = re.fullmatch(r"dwconv(\d+)", str(downsampler))
        if m is None:
            raise ValueError(
                f"U-DiT: downsampler must be 'dwconv<k>' (e.g. 'dwconv5', the released "
                f"models') or an odd int, got {downsampler!r}"
            )
        k = int(m[1])
    if k < 1 or k % 2 == 0:
        raise ValueError(f"U-DiT: the downsampler's kernel size must be odd, got {k}")
    return k


def _check_down_factor(down_factor: object) -> None:
    if down_factor != 2:
        raise ValueError(
            f"U-DiT: only down_factor=2 (four stride-2 sub-images, every released model) is "
            f"supported, got {down_factor!r}"
        )


class DownSampler(nn.Module):
    """``layer``: the depthwise k x k conv (with bias) of the attention's downsampler.

    ``forward(x)`` = ``polyphase_split(layer(x) + x)`` (the shortcut with ``down_shortcut``):
    (B, d, H, W) -> the tokens (B, 4, n, d) of the four stride-2 sub-images.
    """

    def __init__(self, dim: int, kernel_size: int = 5, down_shortcut: bool = True, *, backend=None):
        super().__init__()
        self.layer = nn.Conv2d(
            dim, dim, kernel_size, stride=1, padding=(kernel_size - 1) // 2, groups=dim
        )
        self.down_factor = 2
        self.down_shortcut = bool(down_shortcut)
        self.backend = backend

    def filtered(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(x) + x`` (``layer(x)`` without the shortcut), still an image."""
        y = self.layer(x)
        return y + x if self.down_shortcut else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return polyphase_split(self.filtered(x), backend=self.backend)


class DownsampledAttention(nn.Module):
    """U-DiT's attention over downsampled tokens (the authors' ``DownSample_Attn``).

    ``(B, d, H, W) -> (B, d, H, W)``, H and W even: the ``downsampled_attention`` op (see
    :mod:`fastdit.ops.downsampled_attention` for the formula). Parameters: ``downsampler.layer``
    (depthwise k x k, bias), ``to_qkv`` (Linear(d, 3d), bias as ``bias``: True in U-DiT's
    blocks), ``logit_scale`` ((heads, 1, 1), initially ln 10; only with cosine attention),
    ``to_out`` (Conv1x1(d, d)).

    Arguments as the released class (``input_size`` is unused, as there); the released ablation
    switches: ``posemb_type`` ('rope2d' or None), ``attn_type`` ('v2' = cosine attention, or
    None = softmax(q k^T / sqrt(hd))), ``downsampler`` ('dwconv<k>'), ``down_shortcut``.
    Defaults are the released models' settings. ``down_factor`` must be 2.

    ``fused`` (default True): one ``downsampled_attention`` op. False: the staged path
    (``polyphase_split``, ``to_qkv``, :class:`RoPE2D` with its cached tables,
    ``attention_in_groups``, ``polyphase_merge``, ``to_out``), equal up to rounding.
    """

    def __init__(
        self,
        dim: int,
        input_size: int | None = None,
        down_factor: int = 2,
        num_heads: int = 8,
        bias: bool = True,
        posemb_type: str | None = "rope2d",
        attn_type: str | None = "v2",
        downsampler: str | int = "dwconv5",
        down_shortcut: bool = True,
        *,
        backend: str | None = None,
        fused: bool = True,
    ):
        super().__init__()
        _check_down_factor(down_factor)
        if posemb_type not in (None, "rope2d"):
            raise ValueError(f"U-DiT: posemb_type must be 'rope2d' or None, got {posemb_type!r}")
        if attn_type not in (None, "v2"):
            raise ValueError(f"U-DiT: attn_type must be 'v2' or None, got {attn_type!r}")
        if dim % num_heads:
            raise ValueError(f"U-DiT: num_heads {num_heads} does not divide the width {dim}")
        head_dim = dim // num_heads
        if posemb_type == "rope2d" and head_dim % 4:
            raise ValueError(
                f"U-DiT: RoPE2D needs a head dim divisible by 4, got {dim} / {num_heads} = "
                f"{head_dim}"
            )
        self.input_resolution = (input_size, input_size)
        self.dim = dim
        self.heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.dh = self.dw = 2
        self.posemb_type = posemb_type
        self.attn_type = attn_type
        self.to_qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if attn_type == "v2":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        else:
            self.register_parameter("logit_scale", None)
        self.rope = RoPE2D(head_dim) if posemb_type == "rope2d" else None
        self.downsampler = DownSampler(
            dim, _kernel_size(downsampler), bool(down_shortcut), backend=backend
        )
        self.backend = backend
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv_bias = self.to_qkv.bias
        if qkv_bias is None:
            qkv_bias = x.new_zeros(3 * self.dim)
        if self.fused:
            dw = self.downsampler.layer
            table = None
            if self.rope is not None:
                grid = (x.shape[-2] // 2, x.shape[-1] // 2)
                table = self.rope.table(grid, x.device, _compute_dtype(x.dtype))
            return downsampled_attention(
                x, dw.weight, dw.bias, self.to_qkv.weight, qkv_bias, self.logit_scale,
                self.to_out.weight, self.to_out.bias, self.heads,
                rope=self.rope is not None, cosine=self.logit_scale is not None,
                shortcut=self.downsampler.down_shortcut, rope_table=table, backend=self.backend,
            )  # fmt: skip
        return self.staged(x)

    def staged(self, x: torch.Tensor) -> torch.Tensor:
        """The layer step by step (the ``fused=False`` path)."""
        grid = (x.shape[-2] // 2, x.shape[-1] // 2)
        tokens = polyphase_split(self.downsampler.filtered(x), backend=self.backend)  # (B, 4, n, d)
        qkv = F.linear(tokens, self.to_qkv.weight, self.to_qkv.bias)
        q, k, v = (u.unflatten(-1, (self.heads, -1)).transpose(2, 3) for u in qkv.chunk(3, -1))
        if self.rope is not None:
            q, k = self.rope(q, grid), self.rope(k, grid)
        o = attention_in_groups(
            q, k, v, self.logit_scale, cosine=self.logit_scale is not None, backend=self.backend
        )  # (B, 4, heads, n, hd)
        o = o.transpose(2, 3).flatten(-2)  # (B, 4, n, d), channel = head * hd + i
        image = polyphase_merge(o, grid, channels_last=_is_channels_last(x), backend=self.backend)
        return self.to_out(image)


DownSample_Attn = DownsampledAttention  # the authors' name


# ----------------------------------------------------------------------------------------------
# Feed-forward layers


class ConvMlp(nn.Module):
    """The ablation's plain FFN (the authors' ``Mlp`` with ``ffn_type='basic'``).

    ``fc2(GELU_tanh(fc1(x)))`` with ``fc1`` Conv1x1(d, hidden), ``fc2`` Conv1x1(hidden, d).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
        approximate: str = "tanh",
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=bias)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


_FOLDED = (
    "folded_in_weight",
    "folded_in_bias",
    "folded_dw_weight",
    "folded_dw_bias",
    "folded_out_weight",
    "folded_out_bias",
)


def _refold_after_load(module: FeedForward, incompatible_keys) -> None:
    if module.is_folded:
        module.fold()


class FeedForward(nn.Module):
    """U-DiT's feed-forward layer, hidden width ``m = int(dim * ffn_expansion_factor)``.

    With ``rep=True`` (every released model), the train form, the authors' parameters:
    ``project_in`` = Conv1x1(d, m/2), Conv1x1(m/2, m); exact GELU; ``h + dw5(h) + dw3(h) +
    dw1(h)`` with ``dwconv.0/1/2`` depthwise 5x5 / 3x3 / 1x1; ``project_out`` =
    Conv1x1(m, m/2), Conv1x1(m/2, d). With ``rep=False``: ``project_in`` Conv1x1(d, m), GELU,
    ``dwconv`` depthwise 5x5, ``project_out`` Conv1x1(m, d). All convs with bias as ``bias``.

    The inference (folded) form of the ``rep`` layer: one Conv1x1(d, m), GELU, one depthwise 5x5
    whose kernel is ``dw5 + pad(dw3) + pad(dw1 + 1)`` (biases summed), one Conv1x1(m, d).

    Folding, done right:

    - :meth:`fold` builds the folded weights (in float32 or wider, then cast to the parameters'
      dtype) into the non-persistent buffers ``folded_*``; it never writes into a parameter.
      ``eval()`` folds, ``train()`` drops the buffers; :meth:`unfold` drops them too.
    - the buffers follow ``.to()``, ``.half()``, ``.bfloat16()`` and are never in the state dict
      (which always holds the train form);
    - the fold is redone after ``load_state_dict``, and, in eager mode, when a parameter has
      changed in place since (its version counter moved: an optimizer step, an edit under
      ``torch.no_grad()``);
    - out of training mode the folded form runs (folding first when needed, in eager mode);
      under ``torch.compile`` an unfolded layer runs its train form, which is equal. The
      folded weights are detached: out of training, gradients reach the input, not the
      parameters (fine-tune in training mode, as the released code).
    """

    def __init__(
        self,
        dim: int,
        ffn_expansion_factor: float = 2.0,
        bias: bool = True,
        rep: bool = False,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        self.rep = bool(rep)
        self.bias = bool(bias)
        self.dim = dim
        self.hidden_features = hidden = int(dim * ffn_expansion_factor)
        if self.rep:
            self.project_in = nn.Sequential(
                nn.Conv2d(dim, hidden // 2, kernel_size=1, bias=bias),
                nn.Conv2d(hidden // 2, hidden, kernel_size=1, bias=bias),
            )
            self.dwconv = nn.ModuleList(
                [
                    nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=bias)
                    for k in (5, 3, 1)
                ]
            )
            self.project_out = nn.Sequential(
                nn.Conv2d(hidden, hidden // 2, kernel_size=1, bias=bias),
                nn.Conv2d(hidden // 2, dim, kernel_size=1, bias=bias),
            )
        else:
            self.project_in = nn.Conv2d(dim, hidden, kernel_size=1, bias=bias)
            self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden, bias=bias)
            self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)
        for name in _FOLDED:
            self.register_buffer(name, None, persistent=False)
        self._fold_versions: tuple[tuple[int, int], ...] | None = None
        self.backend = backend  # unused: convolutions run in PyTorch
        self.register_load_state_dict_post_hook(_refold_after_load)

    # ------------------------------------------------------------------------------------------
    # Folding

    @property
    def is_folded(self) -> bool:
        return self.folded_dw_weight is not None

    def _sources(self) -> list[torch.Tensor]:
        return [p for _, p in sorted(self.named_parameters())]

    def _versions(self) -> tuple[tuple[int, int], ...] | None:
        """Each parameter's version counter (in-place updates) and address (``p.data = ...``,
        as ``torch.nn.utils.vector_to_parameters`` does). Writes through ``p.data`` in place
        (``p.data.copy_(...)``) change neither: after them, call :meth:`fold`."""
        try:
            return tuple((p._version, p.data_ptr()) for p in self._sources())
        except RuntimeError:  # inference tensors keep no version counter
            return None

    def folded_numel(self) -> int:
        """How many numbers the folded form holds (from the shapes; works on meta)."""
        if not self.rep:
            return sum(p.numel() for p in self.parameters())
        d, m, b = self.dim, self.hidden_features, int(self.bias)
        return (d * m + m * b) + (m * 25 + m * b) + (m * d + d * b)

    def fold(self) -> FeedForward:
        """(Re)build the folded weights from the current parameters; returns self."""
        if not self.rep:
            return self
        with torch.inference_mode(False), torch.no_grad():
            w_in = self.project_in[0].weight
            ct = _compute_dtype(w_in.dtype)

            def mat(conv: nn.Conv2d) -> torch.Tensor:
                return conv.weight.to(ct).flatten(1)  # (out, in)

            def chain(first: nn.Conv2d, second: nn.Conv2d):
                w = mat(second) @ mat(first)
                b = None
                if self.bias:
                    b = mat(second) @ first.bias.to(ct) + second.bias.to(ct)
                return w[:, :, None, None], b

            in_w, in_b = chain(*self.project_in)
            out_w, out_b = chain(*self.project_out)
            dw5, dw3, dw1 = self.dwconv
            dw_w = (
                dw5.weight.to(ct)
                + F.pad(dw3.weight.to(ct), (1, 1, 1, 1))
                + F.pad(dw1.weight.to(ct) + 1.0, (2, 2, 2, 2))  # + 1: the identity branch
            )
            dw_b = None
            if self.bias:
                dw_b = dw5.bias.to(ct) + dw3.bias.to(ct) + dw1.bias.to(ct)
            dtype = w_in.dtype
            for name, value in zip(_FOLDED, (in_w, in_b, dw_w, dw_b, out_w, out_b)):
                setattr(self, name, None if value is None else value.to(dtype).contiguous())
        self._fold_versions = self._versions()
        return self

    def unfold(self) -> FeedForward:
        """Drop the folded weights (the train form runs until the next fold)."""
        for name in _FOLDED:
            setattr(self, name, None)
        self._fold_versions = None
        return self

    def train(self, mode: bool = True) -> FeedForward:
        super().train(mode)
        if self.rep:
            if mode:
                self.unfold()
            else:
                self.fold()
        return self

    # Conversions (.to(), .half()) and copies (deepcopy, pickling) carry the parameters and the
    # folded buffers over together, but may give the parameters fresh version counters: take
    # a new snapshot, so that only a real change of a parameter refolds.
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.is_folded:
            self._fold_versions = self._versions()
        return self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.is_folded:
            self._fold_versions = self._versions()

    def _stale(self) -> bool:
        if not self.is_folded:
            return True
        versions = self._versions()
        return versions is not None and versions != self._fold_versions

    # ------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rep and not self.training:
            if not _compiling() and self._stale():
                self.fold()
            if self.is_folded:
                return self.forward_folded(x)
        return self.forward_train(x)

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """The train form (the parameters as trained)."""
        h = F.gelu(self.project_in(x))
        if not self.rep:
            return self.project_out(self.dwconv(h))
        out = h
        for conv in self.dwconv:
            out = out + conv(h)
        return self.project_out(out)

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The folded form (after :meth:`fold`)."""
        h = F.gelu(F.conv2d(x, self.folded_in_weight, self.folded_in_bias))
        h = F.conv2d(
            h, self.folded_dw_weight, self.folded_dw_bias, padding=2, groups=self.hidden_features
        )
        return F.conv2d(h, self.folded_out_weight, self.folded_out_bias)


def feed_forwards(module: nn.Module) -> Iterable[FeedForward]:
    """Every :class:`FeedForward` inside ``module`` (and itself)."""
    return (m for m in module.modules() if isinstance(m, FeedForward))


def fold(module: nn.Module) -> nn.Module:
    """Fold every re-parameterised :class:`FeedForward` in ``module`` now; returns it.

    ``eval()`` does this too, and a forward out of training mode refolds after
    ``load_state_dict``, in-place updates of a parameter (``p.mul_()``, ``p.copy_()``, optimizer
    steps) and ``p.data = ...``. Call it explicitly before exporting or compiling, and after
    writing into ``p.data`` in place (``p.data.copy_(...)``, some EMA code): PyTorch's version
    counter does not see those writes.
    """
    for m in feed_forwards(module):
        m.fold()
    return module


def unfold(module: nn.Module) -> nn.Module:
    """Drop the folded weights of every :class:`FeedForward` in ``module``; returns it."""
    for m in feed_forwards(module):
        m.unfold()
    return module


# ----------------------------------------------------------------------------------------------
# The block


class SubLayer(NamedTuple):
    """One ``x = x + gate * fn(LN(x) * (1 + scale) + shift)`` step."""

    fn: nn.Module
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor
    eps: float
    backend: str | None


def run_sublayers(x: torch.Tensor, subs: Sequence[SubLayer]) -> torch.Tensor:
    """Apply the sub-layers in order, each residual add fused with the next norm
    (``gated_adaln``); the first norm is an ``adaln_modulate``, the last add plain."""
    if not subs:
        return x
    first = subs[0]
    h = adaln_modulate(x, first.shift, first.scale, first.eps, backend=first.backend)
    for i, sub in enumerate(subs):
        y = sub.fn(h)
        if i + 1 == len(subs):
            return x + sub.gate[:, :, None, None] * y
        nxt = subs[i + 1]
        x, h = gated_adaln(x, y, sub.gate, nxt.shift, nxt.scale, nxt.eps, backend=nxt.backend)
    raise AssertionError("unreachable")


class UDiTBlock(nn.Module):
    """One U-DiT block (the authors' ``U_DiTBlock``): TWO attention + FFN pairs in series.

    ``forward(x (B, d, H, W), c (B, d))``. ``adaLN_modulation{k}`` = Sequential(SiLU,
    Linear(d, 6d)) gives shift/scale/gate for ``attn{k}`` then ``mlp{k}``; with parameter-free
    channel norms ``norm1k``, ``norm2k`` (eps 1e-6), for k = 1, 2::

        x = x + gate_msa * attn{k}(LN(x) * (1 + scale_msa) + shift_msa)
        x = x + gate_mlp * mlp{k}(LN(x) * (1 + scale_mlp) + shift_mlp)

    Arguments as the released class; ``ffn_type`` 'rep' (:class:`FeedForward`, ``rep`` selects
    the re-parameterised form) or 'basic' (:class:`ConvMlp`, tanh GELU); the attention's
    ablation switches by keyword (see :class:`DownsampledAttention`). fastdit's own:
    ``backend``, ``fused_attention``.
    """

    def __init__(
        self,
        input_size: int | None,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        down_factor: int = 2,
        rep: bool = True,
        ffn_type: str = "rep",
        *,
        posemb_type: str | None = "rope2d",
        attn_type: str | None = "v2",
        downsampler: str | int = "dwconv5",
        down_shortcut: bool = True,
        backend: str | None = None,
        fused_attention: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if ffn_type not in ("rep", "basic"):
            raise ValueError(f"U-DiT: ffn_type must be 'rep' or 'basic', got {ffn_type!r}")
        attn_kwargs = dict(
            down_factor=down_factor, num_heads=num_heads, bias=True, posemb_type=posemb_type,
            attn_type=attn_type, downsampler=downsampler, down_shortcut=down_shortcut,
            backend=backend, fused=fused_attention,
        )  # fmt: skip

        def ffn() -> nn.Module:
            if ffn_type == "rep":
                return FeedForward(hidden_size, mlp_ratio, rep=rep, backend=backend)
            return ConvMlp(hidden_size, int(hidden_size * mlp_ratio))

        def modulation() -> nn.Module:
            return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

        # registration order = the released state dict's order
        self.norm11 = LayerNorm2d(hidden_size, eps=eps, affine=False)
        self.attn1 = DownsampledAttention(hidden_size, input_size, **attn_kwargs)
        self.norm21 = LayerNorm2d(hidden_size, eps=eps, affine=False)
        self.mlp1 = ffn()
        self.adaLN_modulation1 = modulation()
        self.norm12 = LayerNorm2d(hidden_size, eps=eps, affine=False)
        self.attn2 = DownsampledAttention(hidden_size, input_size, **attn_kwargs)
        self.norm22 = LayerNorm2d(hidden_size, eps=eps, affine=False)
        self.mlp2 = ffn()
        self.adaLN_modulation2 = modulation()
        self.backend = backend

    def sublayers(self, c: torch.Tensor) -> list[SubLayer]:
        """The block's four sub-layers with their (B, d) conditioning vectors."""
        m1 = _split(self.adaLN_modulation1(c), 6)
        m2 = _split(self.adaLN_modulation2(c), 6)
        b = self.backend
        return [
            SubLayer(self.attn1, m1[0], m1[1], m1[2], self.norm11.eps, b),
            SubLayer(self.mlp1, m1[3], m1[4], m1[5], self.norm21.eps, b),
            SubLayer(self.attn2, m2[0], m2[1], m2[2], self.norm12.eps, b),
            SubLayer(self.mlp2, m2[3], m2[4], m2[5], self.norm22.eps, b),
        ]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return run_sublayers(x, self.sublayers(c))


U_DiTBlock = UDiTBlock  # the authors' name


def run_udit_blocks(
    blocks: Sequence[UDiTBlock] | nn.ModuleList, x: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``for block in blocks: x = block(x, c)`` with every residual add fused into the next
    norm, across blocks too (one pass over x less per block). Same result; forward hooks on
    the blocks themselves do not fire."""
    subs = [sub for block in blocks for sub in block.sublayers(c)]
    return run_sublayers(x, subs)


# ----------------------------------------------------------------------------------------------
# The final layer


class UDiTFinalLayer(nn.Module):
    """U-DiT's last layer (the authors' ``FinalLayer``): ``(B, d, H, W), c (B, d) -> (B, C, H, W)``.

    ``adaLN_modulation`` = Sequential(SiLU, Linear(d, 2d)) gives shift, scale; then
    ``out_proj(LN(x) * (1 + scale) + shift)`` with ``out_proj`` Conv3x3(d, C) and the norm
    parameter-free (``norm_final``, eps 1e-6).
    """

    def __init__(
        self, hidden_size: int, out_channels: int, *, backend: str | None = None, eps=1e-6
    ):
        super().__init__()
        self.norm_final = LayerNorm2d(hidden_size, eps=eps, affine=False)
        self.out_proj = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.backend = backend

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _split(self.adaLN_modulation(c), 2)
        h = adaln_modulate(x, shift, scale, self.norm_final.eps, backend=self.backend)
        return self.out_proj(h)
