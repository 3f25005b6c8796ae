"""The emulated CUDA kernel tests once more, built with AddressSanitizer and UBSan's alignment
check (tests/emulated.py, FASTDIT_EMU_SANITIZE=1): on the CPU, what compute-sanitizer's memcheck
would report on a GPU. A kernel that reads or writes global memory outside its tensors, or its
shared memory outside the block's allocation, or moves a vector at an address its width does
not divide, fails here instead of corrupting memory (or faulting) on a GPU.

The emulated modules are loaded into a Python that was not built with ASan, so the run is a
child process with the ASan runtime preloaded (and libstdc++, whose exceptions ASan intercepts).
The canary tests prove the set-up reports what it should: an emulated kernel given a tensor one
element too short, and a misaligned 16-byte load, are caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The kernel tests of the three families, and the cuda backend's tests through the Python glue
# (strided views, the merged image's store), the two slowest left out.
EMULATED = [
    "tests/test_adaln_cuda_emu.py",
    "tests/test_patchify_cuda.py",
    "tests/test_downsampled_attention_cuda.py",
    "tests/test_downsampled_attention.py",
]
SELECT = "cuda and not spills and not opcheck and not 1024_tokens"
REPORTS = ("ERROR: AddressSanitizer", "runtime error:")


def _runtime(name: str) -> str:
    if torch.cuda.is_available():  # the cuda tests would run the GPU kernels, not the emulator
        pytest.skip("a CPU check: on a GPU, run compute-sanitizer")
    cxx = shutil.which("g++")
    if cxx is None or sys.platform != "linux":
        pytest.skip("the sanitized emulation needs Linux and g++")
    path = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.skip(f"g++ has no {name}")
    return path


def _run_sanitized(args: list[str], logs: Path, timeout: int) -> tuple[int, str, list[str]]:
    """(return code, output, sanitizer reports) of ``python args`` under the sanitizers."""
    env = dict(os.environ)
    env.update(
        FASTDIT_EMU_SANITIZE="1",
        LD_PRELOAD=f"{_runtime('libasan.so')} {_runtime('libstdc++.so')}",
        ASAN_OPTIONS=f"detect_leaks=0:log_path={logs}/asan",
        UBSAN_OPTIONS=f"print_stacktrace=1:log_path={logs}/ubsan",
    )
    run = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    reports = [p.read_text() for p in sorted(logs.iterdir())]
    reports = [r for r in reports if any(key in r for key in REPORTS)]
    return run.returncode, run.stdout + run.stderr, reports


def test_sanitizers_catch_an_out_of_bounds_read(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import torch
        import emulated
        emu = emulated.build("adaln")
        B, L, D = 1, 3, 64
        x = torch.randn(B * L * D - 1)  # one element short
        shift, scale, out = torch.randn(B, D), torch.randn(B, D), torch.empty(B, L, D)
        emu.adaln_modulate_fwd(x.data_ptr(), shift.data_ptr(), scale.data_ptr(),
                               out.data_ptr(), B, L, D, 1e-6, 0, 0, None, None)
        print("not caught")
        """
    )
    code, output, reports = _run_sanitized(["-c", script], tmp_path, timeout=900)
    assert code != 0 and "not caught" not in output, output[-4000:]
    assert any("heap-buffer-overflow" in r for r in reports), (output[-2000:], reports)


def test_sanitizer_flags_catch_a_misaligned_vector_load(tmp_path):
    """The flags the emulated modules are built with (tests/emulated.py) report a 16-byte load
    at an address 4 bytes off, as a GPU would fault on it (the launchers pick vector widths by
    alignment, so no entry can be made to do it)."""
    import emulated

    cxx = shutil.which("g++")
    _runtime("libasan.so")
    source = tmp_path / "misaligned.cpp"
    source.write_text(
        textwrap.dedent(
            """
            #include <cstdio>
            #include <cstdlib>
            struct alignas(16) Pack { float v[4]; };
            int main(int argc, char**) {
              float* p = static_cast<float*>(std::calloc(16, sizeof(float)));
              const Pack pack = *reinterpret_cast<const Pack*>(p + argc);  // 4 bytes off
              std::printf("not caught %f\\n", pack.v[0]);
            }
            """
        )
    )
    exe = tmp_path / "misaligned"
    subprocess.run([cxx, "-std=c++17", "-O1", *emulated.SANITIZE, str(source), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "not caught" not in run.stdout, run.stdout + run.stderr
    assert "misaligned address" in run.stderr, run.stderr


# One run a file (minutes each under ASan): make test's parallel pytest processes share them.
@pytest.mark.parametrize("path", EMULATED, ids=lambda p: Path(p).stem)
def test_emulated_kernels_under_sanitizers(path, tmp_path):
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", SELECT]
    code, output, reports = _run_sanitized(args, tmp_path, timeout=3000)
    assert not reports, "\n\n".join(r[:6000] for r in reports)
    assert code == 0, output[-6000:]
