"""The CUDA kernels of csrc/ built for the CPU against tests/cuda_emu/emulate.h (every CUDA
thread a fiber), as Python modules with fastdit._C's entries: how the .cu files are tested on
machines without a GPU. Built once per source hash under build/cuda_emu (~20 s each).

Also ptxas's resource report of a .cu file compiled for real GPU architectures (registers,
spills), which needs nvcc but no GPU."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
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


@functools.cache
def poison_locals(cxx: str) -> tuple[str, ...]:
    """The flag that fills every automatic variable of the kernels with a byte pattern (GCC 12+,
    Clang 8+), so that a read of a register no code wrote gives a wrong result here, as garbage
    would on a GPU; empty where the compiler lacks it."""
    flag = "-ftrivial-auto-var-init=pattern"
    probe = subprocess.run(
        [cxx, flag, "-x", "c++", "-fsyntax-only", "-"], input="", capture_output=True, text=True
    )
    return (flag,) if probe.returncode == 0 else ()


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


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _command(cxx: str, include: Path, *extra: str) -> list[str]:
    """g++ compiling C++ against emulate.h, with the flags every emulated build shares."""
    return [cxx, "-std=c++17", "-O1", "-DFASTDIT_EMULATE", "-include", str(EMU / "emulate.h"),
            f"-I{include}", "-w", *poison_locals(cxx), *extra]  # fmt: skip


def build_program(source: str, exe: Path) -> Path:
    """A stand-alone C++ program compiled against emulate.h as the modules are (for the
    emulator's own tests); skips the calling test where the emulation cannot be built."""
    cxx, include = compiler(), _cuda_include()
    if cxx is None or include is None or sys.platform != "linux":
        pytest.skip("the CPU emulation needs Linux, a C++17 compiler and the CUDA headers")
    path = exe.with_suffix(".cpp")
    path.write_text(source)
    cmd = _command(cxx, include, str(path), "-o", str(exe))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


def build(family: str):
    """csrc/<family>.cu with tests/cuda_emu/<family>_module.cpp as the module <family>_emu;
    skips the calling test where the emulation cannot be built."""
    cxx, include = compiler(), _cuda_include()
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
    flags = [*poison_locals(cxx), *sanitize]
    digest.update(f"{cxx} {include} {sys.version} {flags}".encode())
    out_dir = REPO / "build" / "cuda_emu" / digest.hexdigest()[:16]
    target = out_dir / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = _command(
            cxx, include, "-shared", "-fPIC", f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}", *sanitize, str(module), "-o", str(tmp),
        )  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        os.replace(tmp, target)
    spec = importlib.util.spec_from_file_location(name, target)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def nvcc() -> str | None:
    """nvcc as setup.py finds it: CUDA_HOME/CUDA_PATH, else PATH, else /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            return str(candidate) if candidate.is_file() else None
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


def ptxas_usage(family: str, archs: list[int], tmp_path: Path) -> list[tuple[str, str, tuple]]:
    """csrc/<family>.cu compiled as setup.py does (-O3) for each sm_<arch> in archs, with ptxas's
    report: [(mangled kernel name, "sm_90", (stack frame, spill stores, spill loads, registers))]
    in bytes and registers, one entry per kernel and architecture. Skips without nvcc."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc not found")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    source, obj = REPO / "csrc" / f"{family}.cu", tmp_path / f"{family}.o"
    cmd = [compiler, "-std=c++17", "-O3", f"-I{REPO / 'csrc'}", "-Xptxas", "-v", *gencode,
           "-c", str(source), "-o", str(obj)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    pattern = re.compile(
        r"Compiling entry function '(\w+)' for '(sm_\d+)'\n.*?"
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
        r".*?Used (\d+) registers",
        re.S,
    )
    found = [(m[1], m[2], tuple(map(int, m.groups()[2:]))) for m in pattern.finditer(result.stderr)]
    assert len(found) == result.stderr.count("Compiling entry function"), result.stderr[-4000:]
    return found
