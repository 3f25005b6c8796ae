"""Complete models and the name registry (``"DiT-XL/2"``, ``"U-DiT-B"``, ...).

``MODELS`` maps every name to its constructor; a model family adds its names with
:func:`register` (or ``MODELS.update``). ``create(name, **kwargs)`` builds one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .checkpoint import load_checkpoint
from .dit import (
    DiT,
    DiT_B_2,
    DiT_B_4,
    DiT_B_8,
    DiT_L_2,
    DiT_L_4,
    DiT_L_8,
    DiT_models,
    DiT_S_2,
    DiT_S_4,
    DiT_S_8,
    DiT_XL_2,
    DiT_XL_4,
    DiT_XL_8,
    get_2d_sincos_pos_embed,
)
from .udit import U_DiT, U_DiT_B, U_DiT_L, U_DiT_S, UDiT, UDiT_models

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, constructor: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Add ``name`` to the registry (an error if it is there already, unless ``overwrite``)."""
    if name in MODELS and not overwrite and MODELS[name] is not constructor:
        raise ValueError(f"fastdit.models: the name {name!r} is registered already")
    MODELS[name] = constructor


def names() -> list[str]:
    """The registered model names, in registration order."""
    return list(MODELS)


def create(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` (e.g. ``"DiT-XL/2"``) with ``kwargs`` passed on
    (``input_size=64`` for 512 px DiT, ``num_classes=...``, ``backend=...``, ...)."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(
            f"fastdit.models.create: unknown model {name!r}; known: {', '.join(MODELS)}"
        ) from None
    return constructor(**kwargs)


for _name, _constructor in {**DiT_models, **UDiT_models}.items():
    register(_name, _constructor)

__all__ = [
    "MODELS",
    "DiT",
    "DiT_B_2",
    "DiT_B_4",
    "DiT_B_8",
    "DiT_L_2",
    "DiT_L_4",
    "DiT_L_8",
    "DiT_S_2",
    "DiT_S_4",
    "DiT_S_8",
    "DiT_XL_2",
    "DiT_XL_4",
    "DiT_XL_8",
    "DiT_models",
    "UDiT",
    "UDiT_models",
    "U_DiT",
    "U_DiT_B",
    "U_DiT_L",
    "U_DiT_S",
    "create",
    "get_2d_sincos_pos_embed",
    "load_checkpoint",
    "names",
    "register",
]
