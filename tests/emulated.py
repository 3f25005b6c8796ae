"""The CUDA kernels of csrc/ built for the CPU against tests/cuda_emu/emulate.h (every CUDA
thread a fiber), as Python modules with fastdit._C's entries: how the .cu files are tested on
machines without a GPU. Built once per source hash under build/cuda_emu (~20 s each)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMU = REPO / "tests" / "cuda_emu"
# FASTDIT_EMU_SANITIZE=1 (tests/test_sanitized.py): AddressSanitizer, for global and shared
# memory accessed out of bounds (what compute-sanitizer's memcheck finds on a GPU), and UBSan's
# alignment check, for vector loads and stores at addresses their width does not divide (a
# "misaligned address" fault on a GPU).
SANITIZE = ["-g", "-fsanitize=address,alignment", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]  # fmt: skip


def _cuda_include() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var]) / "include"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return None
    for candidate in (Path(nvcc).resolve().parents[1] / "include", Path("/usr/local/cuda/include")):
        if (candidate / "cuda_fp16.h").exists():
            return candidate
    return None


def build(family: str):
    """csrc/<family>.cu with tests/cuda_emu/<family>_module.cpp as the module <family>_emu;
    skips the calling test where the emulation cannot be built."""
    cxx, include = shutil.which("g++") or shutil.which("c++"), _cuda_include()
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    if cxx is None or include is None or pybind11 is None or sys.platform != "linux":
        pytest.skip("the CPU emulation needs Linux, a C++17 compiler, the CUDA headers, pybind11")
    name = f"{family}_emu"
    module, emulate = EMU / f"{family}_module.cpp", EMU / "emulate.h"
    digest = hashlib.sha256()
    for path in (REPO / "csrc" / f"{family}.cu", REPO / "csrc" / "common.cuh", emulate, module):
        digest.update(path.read_bytes())
    sanitize = SANITIZE if os.environ.get("FASTDIT_EMU_SANITIZE") == "1" else []
    digest.update(f"{cxx} {include} {sys.version} {sanitize}".encode())
    out_dir = REPO / "build" / "cuda_emu" / digest.hexdigest()[:16]
    target = out_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-DFASTDIT_EMULATE",
            "-include", str(emulate), f"-I{include}", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}", "-w", *sanitize, str(module), "-o", str(tmp),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        os.replace(tmp, target)
    spec = importlib.util.spec_from_file_location(name, target)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded
