"""Which backends can serve here, why the others cannot, and the selection rule.

Every op family (``adaln``, ``patchify``, ``downsampled_attention``) has up to three backends:

- ``cuda``: kernels in csrc/, reached through the compiled extension ``fastdit._C``;
- ``triton``: kernels in ``fastdit/triton/`` (on a GPU, or on the CPU under ``TRITON_INTERPRET=1``);
- ``torch``: the plain PyTorch reference, which serves every call.

A call names a backend with ``backend=`` or, when that is ``None``, through the environment
variable ``FASTDIT_BACKEND``: either one name for all families (``FASTDIT_BACKEND=triton``) or
comma-separated ``family=backend`` pairs (``FASTDIT_BACKEND=adaln=triton,patchify=cuda``);
families left out use ``auto``. ``auto`` tries ``cuda``, then ``triton``, then ``torch`` and
takes the first that supports the call (device, dtype, shape, layout, gradients), so it never
fails where the reference can serve. A backend named explicitly that cannot serve a call raises
:class:`BackendError` saying why.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

import torch

FAMILIES = ("adaln", "patchify", "downsampled_attention")
BACKENDS = ("cuda", "triton", "torch")
AUTO = "auto"
ENV_VAR = "FASTDIT_BACKEND"

# family -> backend -> names of the ops (and their backward) that backend implements.
# Filled by the op modules as they register kernels (fastdit/ops/<family>.py).
_IMPLEMENTED: dict[str, dict[str, set[str]]] = {f: {b: set() for b in BACKENDS} for f in FAMILIES}


class BackendError(RuntimeError):
    """A backend named explicitly cannot serve a call; the message says why."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # "" when available, else why not
    ops: tuple[str, ...]  # the ops of the family this backend implements


def note_implemented(family: str, backend: str, op: str) -> None:
    _IMPLEMENTED[family][backend].add(op)


# ----------------------------------------------------------------------------------------------
# Machine-level availability


@functools.cache
def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter.

    Triton reads TRITON_INTERPRET when a kernel is defined, so set it before importing fastdit.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest Triton release the kernels are tested with (interpreted, and compiled for sm_90).
# Older ones are refused: Triton 3.0 (torch 2.4's) cannot even interpret them.
MIN_TRITON = (3, 6)


@functools.cache
def triton_import_reason() -> str:
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not installed or failed to import ({type(e).__name__}: {e})"
    version = getattr(triton, "__version__", "0")
    release = tuple(int(v) for v in re.findall(r"\d+", version)[:2])
    if release < MIN_TRITON:
        oldest = ".".join(map(str, MIN_TRITON))
        return (
            f"Triton {version} is older than {oldest}, the oldest release fastdit's Triton "
            f"kernels are tested with (pip install 'triton>={oldest}', or a torch that brings it)"
        )
    return ""


def triton_unavailable_reason(device: torch.device | None = None) -> str:
    """'' when Triton kernels can run on ``device`` (default: wherever they could run here)."""
    reason = triton_import_reason()
    if reason:
        return reason
    if triton_interpreting():
        if device is not None and device.type != "cpu":
            return f"TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only, got {device.type}"
        return ""
    if device is not None and device.type != "cuda":
        return (
            f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a {device.type} tensor"
        )
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU visible to torch (set TRITON_INTERPRET=1 to run the Triton kernels "
            "on the CPU through Triton's interpreter, slowly)"
        )
    return ""


def cuda_unavailable_reason(device: torch.device | None = None) -> str:
    """'' when the compiled kernels can run on ``device`` (default: on this machine's GPU)."""
    from . import _ext

    if device is not None and device.type != "cuda":
        reason = _ext.cuda_unavailable_reason()
        if reason:
            return reason
        return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
    index = None if device is None else device.index
    return _ext.cuda_unavailable_reason(index)


def unavailable_reason(backend: str, device: torch.device | None = None) -> str:
    if backend == "torch":
        return ""
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS + (AUTO,)}")


def backends() -> dict[str, dict[str, BackendStatus]]:
    """Per family and backend: can it serve here, why not, and which ops it implements."""
    from . import ops  # noqa: F401  (importing the op modules registers their kernels)

    table: dict[str, dict[str, BackendStatus]] = {}
    for family in FAMILIES:
        row = {}
        for backend in BACKENDS:
            implemented = tuple(sorted(_IMPLEMENTED[family][backend]))
            reason = unavailable_reason(backend)
            if not implemented:
                reason = f"no {backend} kernels for {family} yet"
            row[backend] = BackendStatus(not reason, reason, implemented)
        table[family] = row
    return table


# ----------------------------------------------------------------------------------------------
# Which backend a call asked for


_PARSED: dict[str, dict[str, str]] = {}


def _parse_env(value: str) -> dict[str, str]:
    if value not in _PARSED:
        _PARSED[value] = _parse(value)
    return _PARSED[value]


def _parse(value: str) -> dict[str, str]:
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        _check_name(value, f"{ENV_VAR}={value!r}")
        return {f: value for f in FAMILIES}
    choice: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        family, sep, backend = (s.strip() for s in item.partition("="))
        if not sep or family not in FAMILIES:
            raise ValueError(
                f"{ENV_VAR}={value!r}: {item!r} is not 'family=backend' with a family among "
                f"{FAMILIES}"
            )
        _check_name(backend, f"{ENV_VAR}={value!r}")
        choice[family] = backend
    return choice


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS + (AUTO,):
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKENDS + (AUTO,)}")


def requested(family: str, backend: str | None) -> str:
    """The backend a call asks for: its ``backend=`` argument, else FASTDIT_BACKEND, else auto."""
    if backend is not None:
        _check_name(backend, f"backend={backend!r}")
        return backend
    return _parse_env(_environment()).get(family, AUTO)


@torch.compiler.assume_constant_result
def _environment() -> str:
    """FASTDIT_BACKEND as it is now: read when a compiled graph is traced and fixed in it (the
    Dynamo of torch 2.4 cannot trace ``os.environ.get`` of an unset variable)."""
    return os.environ.get(ENV_VAR, "")
