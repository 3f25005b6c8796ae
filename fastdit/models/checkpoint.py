"""Loading the authors' weights (and training checkpoints) into fastdit's models."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

# Entries of a training checkpoint that hold a model's state dict, in order of preference.
STATE_DICT_KEYS = ("ema", "model", "state_dict")
# Prefixes added by wrappers: DistributedDataParallel ("module.") and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _read(path: PathLike, map_location: Any, trusted: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        raise RuntimeError(
            f"fastdit.load_checkpoint: {os.fspath(path)!r} holds pickled Python objects besides "
            "tensors (the released DiT training script stores its argparse 'args' next to the "
            "weights), so torch.load(weights_only=True) refuses it. Loading such a file runs "
            "code from it: if you trust the file, pass trusted=True (on the command line: "
            "--trusted); otherwise load it once in "
            "a safe place and save only the weights, e.g. "
            "torch.save(torch.load(path, weights_only=False)['ema'], 'weights.pt')."
            f"\ntorch.load said: {e}"
        ) from e


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict inside ``obj``: ``obj`` itself, or its "ema", "model" or
    "state_dict" entry (first found), with a "module." (DistributedDataParallel) or
    "_orig_mod." (torch.compile) prefix removed when every key has it."""
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"fastdit.load_checkpoint: expected a state dict or a checkpoint dict, got "
            f"{type(obj).__name__}"
        )
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not obj:
        raise ValueError(
            "fastdit.load_checkpoint: not a state dict (entries that are not tensors: "
            f"{not_tensors[:8]}), and no {', '.join(repr(k) for k in STATE_DICT_KEYS)} entry "
            "holding one"
        )
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _dit_kwargs(name: str, state: Mapping[str, torch.Tensor], kwargs: dict) -> dict:
    """For a DiT name: the input size the checkpoint was trained at (256 or 512 px)."""
    pos, proj = state.get("pos_embed"), state.get("x_embedder.proj.weight")
    if not name.startswith("DiT-") or "input_size" in kwargs or pos is None or proj is None:
        return kwargs
    side = math.isqrt(pos.shape[-2])
    if side * side == pos.shape[-2]:
        kwargs = {**kwargs, "input_size": side * proj.shape[-1]}
    return kwargs


def _build_from(name: str, kwargs: dict, state: Mapping[str, torch.Tensor], copy: bool):
    """Build the model on the meta device and take the checkpoint's tensors as its parameters:
    no random initialisation to throw away (seconds for DiT-XL), no second copy in memory.
    None when the state dict does not cover every parameter and buffer (then the caller
    builds the model normally)."""
    from . import create

    device = torch.empty(0).device  # where create() would have put the model
    with torch.device("meta"):
        model = create(name, **kwargs)
    targets = model.state_dict(keep_vars=True)
    if set(targets) != set(state):
        return None
    model.load_state_dict(
        {k: v.to(device=device, dtype=targets[k].dtype, copy=copy) for k, v in state.items()},
        strict=True,
        assign=True,
    )
    tensors = list(model.parameters()) + list(model.buffers())
    return None if any(t.is_meta for t in tensors) else model


def load_checkpoint(
    model_or_name: nn.Module | str,
    path_or_state_dict: PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    trusted: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Load weights into a model and return the model.

    model_or_name: a model, or a registered name (``"DiT-XL/2"``, see
        :func:`fastdit.models.create`), built with ``model_kwargs``; for a DiT name the
        ``input_size`` is read from the checkpoint's ``pos_embed`` unless given (so
        ``DiT-XL-2-512x512.pt`` builds a 64x64-latent model). A model built from a name skips
        the random initialisation when the checkpoint holds every parameter (it is built on
        the meta device and given the checkpoint's tensors, copied from a dict passed in, taken
        as they are from a file).
    path_or_state_dict: a state dict; a training checkpoint dict, whose ``"ema"`` entry is
        used (else ``"model"``, else ``"state_dict"``); or a path to a file holding either.
        A ``"module."`` prefix on every key (a model saved inside DistributedDataParallel) is
        removed, and so is torch.compile's ``"_orig_mod."``.
    strict: as ``nn.Module.load_state_dict``.
    map_location: as ``torch.load``.
    trusted: files are read with ``torch.load(weights_only=True)``, which refuses pickled
        Python objects (the released training checkpoints store their ``args``); with
        ``trusted=True`` such a file is read with ``weights_only=False``, which can run code
        from it: only for files you trust. Without it the error says what to do.
    """
    if isinstance(path_or_state_dict, Mapping):
        obj = path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = _read(path_or_state_dict, map_location, trusted)
    else:
        raise TypeError(
            "fastdit.load_checkpoint: path_or_state_dict must be a path or a dict, got "
            f"{type(path_or_state_dict).__name__}"
        )
    state = extract_state_dict(obj)
    if isinstance(model_or_name, str):
        kwargs = _dit_kwargs(model_or_name, state, model_kwargs)
        model = _build_from(model_or_name, kwargs, state, copy=obj is path_or_state_dict)
        if model is not None:
            return model
        from . import create

        model = create(model_or_name, **kwargs)
    elif isinstance(model_or_name, nn.Module):
        if model_kwargs:
            raise TypeError(
                f"fastdit.load_checkpoint: model arguments {sorted(model_kwargs)} given with a "
                "model already built; they apply to a name only"
            )
        model = model_or_name
    else:
        raise TypeError(
            "fastdit.load_checkpoint: model_or_name must be an nn.Module or a model name, got "
            f"{type(model_or_name).__name__}"
        )
    model.load_state_dict(state, strict=strict)
    return model
