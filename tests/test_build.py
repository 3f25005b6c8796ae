"""The build of fastdit._C and the pure-Python install (CPU-only; no GPU needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a source install needs from the repository (no build outputs, no .git, no venv).
SOURCE_ITEMS = ("pyproject.toml", "setup.py", "CMakeLists.txt", "README.md", "csrc", "fastdit")


def _nvcc() -> str | None:
    """nvcc as setup.py finds it: CUDA_HOME/CUDA_PATH, else PATH, else /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = Path(home) / "bin" / "nvcc"
            return str(candidate) if candidate.is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


needs_build = pytest.mark.skipif(
    _nvcc() is None or os.environ.get("FASTDIT_BUILD_CUDA") == "0",
    reason="nvcc not found (or FASTDIT_BUILD_CUDA=0): fastdit._C is not expected to be built",
)


def _copy_sources(dest: Path) -> Path:
    """A clean copy of the sources, so installs here never see stale build outputs."""
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info")
    for name in SOURCE_ITEMS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def _pip_install(source: Path, target: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
        "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), str(source),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _needed_libraries(path: Path) -> list[str]:
    readelf = shutil.which("readelf")
    if readelf:
        out = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True).stdout
        lines = [line for line in out.splitlines() if "(NEEDED)" in line]
        return [line.split("[", 1)[1].split("]", 1)[0] for line in lines]
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("neither readelf nor ldd is available")
    out = subprocess.run([ldd, str(path)], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The extension, as built into this environment


@needs_build
def test_extension_imports_and_reports():
    from fastdit import _C, _ext

    module, reason = _ext.load()
    assert module is _C and reason == ""

    info = _C.build_info()
    assert set(info) >= {"cuda_version", "archs", "compiler"}
    major, minor = info["cuda_version"].split(".")
    assert int(major) >= 11 and int(minor) >= 0
    assert info["archs"] and info["archs"] != "unknown"
    assert "nvcc" in info["compiler"]

    count = _C.device_count()
    assert isinstance(count, int) and count >= 0

    reason = _C.runtime_check(0)
    assert isinstance(reason, str)
    import torch

    if not torch.cuda.is_available():
        assert reason, "runtime_check(0) must explain why there is no usable GPU"
    else:
        # Where torch sees a GPU, the extension built here must run on it: otherwise every cuda
        # test skips (the reason is theirs to skip on) and the run looks green for no test run.
        here = torch.cuda.current_device()
        assert _C.runtime_check(here) == "", f"fastdit._C on cuda:{here}: {_C.runtime_check(here)}"
        assert _ext.cuda_unavailable_reason() == ""
    assert _C.runtime_check(10_000)  # no such device, never a crash


@needs_build
def test_extension_links_no_torch_and_static_cudart():
    from fastdit import _C

    needed = _needed_libraries(Path(_C.__file__))
    assert needed, "could not read the NEEDED entries"
    forbidden = ("libtorch", "libc10", "libtorch_python", "libcudart.so")
    bad = [lib for lib in needed if lib.startswith(forbidden)]
    assert not bad, f"fastdit._C must not link {bad} dynamically (NEEDED: {needed})"


@needs_build
def test_extension_validates_arguments():
    from fastdit import _C

    good = dict(
        x_ptr=256, shift_ptr=256, scale_ptr=256, out_ptr=256, B=2, L=3, D=8, eps=1e-6,
        dtype=0, cond_dtype=0, device=0, stream=0,
    )  # fmt: skip
    bad_cases = [
        dict(dtype=3), dict(dtype=-1), dict(cond_dtype=3), dict(dtype=1, cond_dtype=2),
        dict(B=-1), dict(L=-2), dict(D=0), dict(D=2**31),
        dict(eps=-1.0), dict(device=-1), dict(x_ptr=0), dict(out_ptr=0),
        dict(B=2**40, L=2**20, D=2**10),
    ]  # fmt: skip
    for change in bad_cases:
        with pytest.raises(ValueError, match=r"fastdit\._C\.adaln_modulate_fwd"):
            _C.adaln_modulate_fwd(**{**good, **change})
    # Empty work is a no-op, even without a GPU.
    assert _C.adaln_modulate_fwd(**{**good, "B": 0}) is None
    assert _C.adaln_modulate_fwd(**{**good, "L": 0}) is None
    if _C.device_count() == 0:
        # The CUDA error becomes a RuntimeError naming the op (here: no driver / no device).
        with pytest.raises(RuntimeError, match=r"^fastdit\._C\.adaln_modulate_fwd: "):
            _C.adaln_modulate_fwd(**good)


# ---------------------------------------------------------------------------------------------
# Source installs (each pip call is --no-build-isolation --no-deps: no network, a few seconds)


def test_pure_python_install(tmp_path):
    source = _copy_sources(tmp_path / "src")
    site = tmp_path / "site"
    env = {**os.environ, "FASTDIT_BUILD_CUDA": "0"}
    result = _pip_install(source, site, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((site / "fastdit").glob("_C*")), "FASTDIT_BUILD_CUDA=0 must not build _C"

    # An editable install of the repository in this environment would still serve fastdit._C
    # from the source tree (setuptools' editable finder on sys.meta_path): drop that finder.
    check = (
        "import sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]; "
        "import fastdit._ext as e; m, r = e.load(); "
        f"assert e.__file__.startswith({str(site)!r}), e.__file__; "
        "assert m is None and r, (m, r); "
        "assert e.cuda_unavailable_reason() == r; "
        "import torch, fastdit; from fastdit.models import create; "
        "assert fastdit.__file__.startswith(e.__file__.rsplit('/', 1)[0]); "
        "x, s = torch.randn(1, 2, 8), torch.zeros(1, 8); "
        "assert torch.allclose(fastdit.adaln_modulate(x, s, s), "
        "torch.nn.functional.layer_norm(x, (8,), eps=1e-6), atol=1e-6); "
        "status = fastdit.backends()['adaln']['cuda']; "
        "assert not status.available and 'not built' in status.reason, status; "
        "m = create('DiT-S/8', input_size=8); "
        "assert m(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1])).shape "
        "== (1, 8, 8, 8); print(r)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not built" in run.stdout


def test_required_build_without_nvcc_fails_clearly(tmp_path):
    source = _copy_sources(tmp_path / "src")
    empty = tmp_path / "no-cuda"
    empty.mkdir()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    path = [p for p in path if not (Path(p) / "nvcc").exists()]
    env = {
        **os.environ,
        "FASTDIT_BUILD_CUDA": "1",
        "CUDA_HOME": str(empty),
        "CUDA_PATH": str(empty),
        "PATH": os.pathsep.join(path),
    }
    result = _pip_install(source, tmp_path / "site", env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "nvcc" in output and "FASTDIT_BUILD_CUDA=1" in output, output
