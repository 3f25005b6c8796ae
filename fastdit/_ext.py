"""The compiled extension fastdit._C, and turning tensors into what it takes.

fastdit._C has no torch in it: its functions take raw pointers, sizes, a dtype code, a device
index and a CUDA stream handle, all as Python ints. This module loads it (or says why it cannot)
and provides the conversions. It imports nothing else from fastdit.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

# Dtype codes shared with csrc/common.cuh.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
}

NOT_BUILT = (
    "fastdit._C is not built (install with nvcc present, or FASTDIT_BUILD_CUDA=1 to require it)"
)

_loaded: tuple[ModuleType | None, str] | None = None
_base_reason: str | None = None
_device_reasons: dict[int, str] = {}


def load() -> tuple[ModuleType | None, str]:
    """(fastdit._C, "") if the extension imports, else (None, why not). Cached."""
    global _loaded
    if _loaded is None:
        _loaded = _import()
    return _loaded


def require() -> ModuleType:
    """fastdit._C, or RuntimeError saying why not: the kernels' glue calls it after the backend
    check has already said the extension is there (a safety net)."""
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    return module


def _import() -> tuple[ModuleType | None, str]:
    try:
        if importlib.util.find_spec("fastdit._C") is None:
            return None, NOT_BUILT
        return importlib.import_module("fastdit._C"), ""
    except Exception as exc:  # ImportError, OSError from the loader, ...
        return None, f"fastdit._C failed to import: {type(exc).__name__}: {exc}"


def dtype_code(t: torch.Tensor) -> int:
    """The extension's code for t's dtype; TypeError naming the dtype if it has none."""
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(
            f"fastdit._C takes float32, float16 or bfloat16 tensors, got {t.dtype}"
        ) from None


# torch._C._cuda_getCurrentRawStream(index) gives the handle as an int without building a
# torch.cuda.Stream object (what torch.compile's generated code calls before each launch); CPU
# builds of torch lack it.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t: torch.Tensor) -> int:
    """The handle (cudaStream_t as an int) of the current stream of t's device."""
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor) -> int:
    """The address of t's first element."""
    return t.data_ptr()


def cuda_unavailable_reason(device_index: int | None = None) -> str:
    """The empty string if the cuda backend (fastdit._C) can run on that CUDA device here, else
    the first reason why not. None means torch's current CUDA device. Cached per device index."""
    global _base_reason
    if _base_reason is None:
        _base_reason = _process_reason()
    if _base_reason:
        return _base_reason
    index = torch.cuda.current_device() if device_index is None else int(device_index)
    if index not in _device_reasons:
        module, _ = load()
        try:
            _device_reasons[index] = module.runtime_check(index)
        except Exception as exc:  # a broken build must not take the caller down
            reason = f"fastdit._C.runtime_check failed: {type(exc).__name__}: {exc}"
            _device_reasons[index] = reason
    return _device_reasons[index]


def _process_reason() -> str:
    """The reasons that hold for every device: extension, torch build, GPU visibility."""
    module, reason = load()
    if module is None:
        return reason
    if torch.version.cuda is None:
        if getattr(torch.version, "hip", None):
            return "this torch is a ROCm build; fastdit._C needs CUDA"
        return "this torch is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    return ""
