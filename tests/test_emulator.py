"""The CPU emulator of the CUDA kernels (tests/cuda_emu/emulate.h) checked on itself: what it
promises to show of a wrong kernel, it shows. Each case is a small kernel compiled into a program
as tests/emulated.py builds the kernel modules, run in a fixed thread and block order."""

from __future__ import annotations

import subprocess
import textwrap

import emulated
import pytest

HEADER = """
#include <cstdio>
#include <stdexcept>
"""


def _run(tmp_path, body: str) -> str:
    exe = emulated.build_program(HEADER + textwrap.dedent(body), tmp_path / "case")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={"EMU_ORDER": "fwd"})  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_each_block_starts_with_nan_in_dynamic_shared_memory(tmp_path):
    """A block that reads shared memory it did not write reads NaN, even where the block before
    it wrote there (per-launch filling would hand it that block's 1.0)."""
    source = """
        __global__ void kernel(float* seen) {
          float* smem = static_cast<float*>(::emu::dynamic_smem());
          if (threadIdx.x == 0) seen[blockIdx.x] = smem[5];
          __syncthreads();
          smem[threadIdx.x] = 1.0f;
        }
        int main() {
          float seen[3] = {0.f, 0.f, 0.f};
          ::emu::launcher(kernel, dim3(3), dim3(32), 32 * sizeof(float))(seen);
          std::printf("%f %f %f\\n", seen[0], seen[1], seen[2]);
        }
    """
    out = _run(tmp_path, source)
    assert [v.lstrip("-") for v in out.split()] == ["nan"] * 3, out


def test_an_unwritten_local_reads_a_pattern_not_zero(tmp_path):
    """Automatic variables are filled with a byte pattern (-ftrivial-auto-var-init=pattern), so
    a kernel that reads a register before writing it gets garbage here as on a GPU."""
    cxx = emulated.compiler()
    if cxx is None or not emulated.poison_locals(cxx):
        pytest.skip("the compiler cannot fill automatic variables")
    source = """
        __attribute__((noinline)) float partial(int n, const float* x) {
          float acc[4];  // acc[n..3] never written
          for (int i = 0; i < n; ++i) acc[i] = x[i];
          return acc[3];
        }
        __global__ void kernel(const float* x, float* out) { out[threadIdx.x] = partial(2, x); }
        int main() {
          float x[4] = {1.f, 2.f, 3.f, 4.f}, out[32];
          ::emu::launcher(kernel, dim3(1), dim3(32), 0)(x, out);
          std::printf("%g\\n", out[31]);
        }
    """
    out = _run(tmp_path, source)
    assert float(out) != 0.0, out


def test_a_barrier_not_every_thread_reaches_is_a_deadlock(tmp_path):
    """Half of a warp in a shuffle while the other half waits at __syncthreads: neither can go
    on (threads that have exited count as arrived, as on a GPU, so it takes a waiting thread)."""
    source = """
        __global__ void kernel(float* out) {
          float v = threadIdx.x;
          if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
          else __syncthreads();
          out[threadIdx.x] = v;
        }
        int main() {
          float out[64];
          try {
            ::emu::launcher(kernel, dim3(1), dim3(64), 0)(out);
            std::printf("not caught\\n");
          } catch (const std::exception& e) {
            std::printf("%s\\n", e.what());
          }
        }
    """
    out = _run(tmp_path, source)
    assert "deadlock" in out, out
