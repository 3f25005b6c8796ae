"""Build script: the package metadata lives in pyproject.toml; this file builds fastdit._C.

fastdit._C (csrc/, built by CMakeLists.txt) is compiled when nvcc is found. Environment:

  FASTDIT_BUILD_CUDA   unset: build fastdit._C if nvcc is found, else install pure-Python
                       (a failed build warns and installs pure-Python too);
                       1: the build is required, a missing nvcc or a failed build is an error;
                       0: pure-Python install, no compiler needed.
  FASTDIT_CUDA_ARCHS   CUDA targets, e.g. "90", "80;90", "90a", "8.0 9.0" (CMake syntax, with
                       "-real"/"-virtual" allowed). Default: the GPUs present (nvidia-smi), else
                       "80-real;90" (sm_80 and sm_90 code, plus PTX for 9.0 that newer GPUs JIT).
  CUDA_HOME/CUDA_PATH  the CUDA toolkit; when set, nvcc is taken from its bin/ only. Otherwise
                       nvcc is looked up on PATH, then in /usr/local/cuda/bin.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT_NAME = "fastdit._C"
DEFAULT_ARCHS = "80-real;90"


def log(message: str) -> None:
    print(f"fastdit setup: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    raise SystemExit(f"fastdit setup: error: {message}")


def build_mode() -> str:
    """'auto', '1' or '0', from FASTDIT_BUILD_CUDA."""
    value = os.environ.get("FASTDIT_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    fail(f"FASTDIT_BUILD_CUDA must be 0 or 1 (or unset), got {value!r}")
    return "auto"  # unreachable


def find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc, "") or (None, where it was looked for)."""
    exe = "nvcc.exe" if os.name == "nt" else "nvcc"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = Path(home) / "bin" / exe
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate), ""
            return None, f"{var}={home} has no bin/{exe}"
    on_path = shutil.which(exe)
    if on_path:
        return on_path, ""
    default = Path("/usr/local/cuda/bin") / exe
    if default.is_file() and os.access(default, os.X_OK):
        return str(default), ""
    return None, "not on PATH, CUDA_HOME and CUDA_PATH unset, no /usr/local/cuda/bin/nvcc"


_ARCH = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(-real|-virtual)?$")


def normalize_archs(text: str) -> str:
    """'8.0, 9.0a' -> '80;90a'; keeps CMake's -real/-virtual and native/all/all-major."""
    items = [item for item in re.split(r"[;,\s]+", text.strip()) if item]
    if not items:
        fail("FASTDIT_CUDA_ARCHS is empty")
    out = []
    for item in items:
        if item in ("native", "all", "all-major"):
            out.append(item)
            continue
        match = _ARCH.match(item)
        if not match:
            fail(f"FASTDIT_CUDA_ARCHS: cannot read {item!r} (expected e.g. 90, 9.0, 90a, 80-real)")
        major, minor, suffix, kind = match.groups()
        number = major + minor if minor is not None else major
        out.append(number + suffix + (kind or ""))
    return ";".join(out)


def detect_archs() -> tuple[str, str]:
    """(CUDA archs in CMake syntax, where they came from)."""
    env = os.environ.get("FASTDIT_CUDA_ARCHS", "").strip()
    if env:
        return normalize_archs(env), "FASTDIT_CUDA_ARCHS"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result = subprocess.run(
                [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            caps = {
                line.strip().replace(".", "")
                for line in result.stdout.splitlines()
                if re.fullmatch(r"\d+\.\d+", line.strip())
            }
        except (OSError, subprocess.SubprocessError):
            caps = set()
        if caps:
            return ";".join(sorted(caps, key=int)), "the GPUs present (nvidia-smi)"
    return DEFAULT_ARCHS, "default, no GPU found"


def find_cmake() -> str | None:
    try:  # the cmake package from the build requirements
        import cmake

        candidate = Path(cmake.CMAKE_BIN_DIR) / ("cmake.exe" if os.name == "nt" else "cmake")
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return shutil.which("cmake")


def find_ninja() -> str | None:
    try:
        import ninja

        candidate = Path(ninja.BIN_DIR) / ("ninja.exe" if os.name == "nt" else "ninja")
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return shutil.which("ninja")


class BuildFailed(Exception):
    pass


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path, nvcc: str) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt and copies the module to where setuptools expects the extension."""

    def run(self) -> None:
        try:
            super().run()
        except BuildFailed as exc:
            if MODE == "1":
                fail(f"{exc} (FASTDIT_BUILD_CUDA=1 requires fastdit._C)")
            log(
                f"WARNING: {exc}. Installing fastdit pure-Python, without fastdit._C: the cuda "
                "backend will be unavailable. Set FASTDIT_BUILD_CUDA=1 to make this an error, "
                "or FASTDIT_BUILD_CUDA=0 to skip the build."
            )
            for ext in self.extensions:  # no stale module from an earlier build
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []
            self.distribution.ext_modules = []

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            import pybind11
        except ImportError as exc:
            raise BuildFailed("pybind11 >= 2.12 is not installed (pip install pybind11)") from exc

        cmake = find_cmake()
        if cmake is None:
            raise BuildFailed("cmake >= 3.24 was not found (pip install cmake)")
        ninja = find_ninja()
        archs, archs_from = detect_archs()
        # A fixed folder in the source tree (not build_temp, which is a fresh temporary folder
        # for editable installs), so that a rebuild only recompiles what changed.
        tag = f"{sys.implementation.cache_tag}-{'ninja' if ninja else 'make'}"
        build_dir = Path(ext.sourcedir) / "build" / f"cmake-{tag}"
        out_dir = build_dir / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [
            cmake, "-S", ext.sourcedir, "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DFASTDIT_CUDA_ARCHS={archs}",
            f"-DFASTDIT_OUTPUT_DIR={out_dir}",
        ]  # fmt: skip
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = str(os.cpu_count() or 1)
        build = [cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs]

        log(f"building {ext.name} with {ext.nvcc} for CUDA archs {archs} ({archs_from})")
        for command in (configure, build):
            try:
                subprocess.run(command, check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                step = "configure" if command is configure else "compile"
                why = (
                    f"exit status {exc.returncode}"
                    if isinstance(exc, subprocess.CalledProcessError)
                    else str(exc)
                )
                raise BuildFailed(
                    f"building {ext.name} failed at the CMake {step} step ({why}; "
                    "the compiler output is above)"
                ) from exc

        built = sorted(p for p in out_dir.glob("_C*") if p.suffix in (".so", ".pyd"))
        if len(built) != 1:
            raise BuildFailed(f"expected one _C module in {out_dir}, found {built}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)
        shutil.copymode(built[0], dest)


class BuildPy(build_py):
    """Says once why fastdit._C is skipped, and leaves no stale module in a pure build."""

    def run(self) -> None:
        super().run()
        if not self.distribution.ext_modules:
            if SKIP_REASON:
                log(SKIP_REASON)
            for stale in Path(self.build_lib, "fastdit").glob("_C.*"):
                stale.unlink()


MODE = build_mode()
NVCC, NVCC_WHERE = find_nvcc()
SKIP_REASON = ""
ext_modules: list[Extension] = []
if MODE == "0":
    SKIP_REASON = "FASTDIT_BUILD_CUDA=0: skipping fastdit._C, installing pure-Python"
elif NVCC is None:
    if MODE == "1":
        fail(f"FASTDIT_BUILD_CUDA=1 but nvcc was not found ({NVCC_WHERE}); install the CUDA "
             "toolkit or point CUDA_HOME at it")  # fmt: skip
    SKIP_REASON = (
        f"nvcc not found ({NVCC_WHERE}): skipping fastdit._C, installing pure-Python "
        "(set CUDA_HOME, or FASTDIT_BUILD_CUDA=1 to make this an error)"
    )
else:
    ext_modules = [CMakeExtension(EXT_NAME, ROOT, NVCC)]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
