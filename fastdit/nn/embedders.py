"""The conditioning embedders shared by DiT and U-DiT: timesteps and class labels.

Parameter names are the released DiT code's (``mlp.0``, ``mlp.2``, ``embedding_table``), so
the authors' state dicts load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, ``(B,) -> (B, dim)`` in float32.

    With ``half = dim // 2`` and frequencies ``f_i = exp(-ln(max_period) * i / half)`` for
    ``i = 0..half-1``, the features are ``[cos(t f_0..), sin(t f_0..)]`` (cosines first), plus
    one zero column when ``dim`` is odd. ``t`` may be integer or floating (fractional steps).
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimestepEmbedder(nn.Module):
    """Timesteps ``(B,)`` to vectors ``(B, hidden_size)``: sinusoidal features, then an MLP.

    ``mlp`` = Linear(frequency_embedding_size, D), SiLU, Linear(D, D) (state-dict names
    ``mlp.0``, ``mlp.2``). The features are computed in float32 and cast to the dtype of
    ``mlp.0.weight``, so a model converted with ``.half()`` or ``.to(torch.bfloat16)`` runs.
    """

    def __init__(
        self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """The authors' static method: :func:`timestep_features` (float32)."""
        return timestep_features(t, dim, max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``(B,)`` to vectors ``(B, hidden_size)``, with classifier-free-guidance dropout.

    ``embedding_table`` has ``num_classes + 1`` rows when ``dropout_prob > 0``: the last row,
    id ``num_classes``, is the null class (unconditional). ``forward(labels, train,
    force_drop_ids=None)`` as in the authors' code: in training (``train=True`` and
    ``dropout_prob > 0``) each label is replaced by the null id with probability
    ``dropout_prob``; ``force_drop_ids`` (a ``(B,)`` tensor, 1 = drop) replaces the random draw,
    in training or not.

    The random draw is ``torch.rand(B, device=labels.device) < dropout_prob``, exactly the
    authors' call, so under the same seed the same labels are dropped. Hooks for other schemes:

    - ``generator``: set this attribute to a ``torch.Generator`` to draw from it instead of the
      global generator;
    - ``force_drop_ids``: pass one mask to several embedders (U-DiT has three) to drop the same
      labels in all of them (the released U-DiT draws independently for each).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.generator: torch.Generator | None = None

    def drop_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """A fresh random ``(B,)`` bool mask: True where a label is to be dropped."""
        if self.generator is None:
            u = torch.rand(labels.shape[0], device=labels.device)
        else:
            g = self.generator
            u = torch.rand(labels.shape[0], generator=g, device=g.device).to(labels.device)
        return u < self.dropout_prob

    def token_drop(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replace dropped labels by the null id ``num_classes``."""
        if force_drop_ids is None:
            drop = self.drop_mask(labels)
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self,
        labels: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
