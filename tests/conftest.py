"""Test set-up: Triton runs through its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before Triton defines a kernel, so before fastdit is imported.
Set FASTDIT_TEST_TRITON_GPU=1 (bench/gpu_check.sh does) to compile the Triton kernels for the GPU
instead.
"""

import os

if os.environ.get("FASTDIT_TEST_TRITON_GPU", "0") == "0":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTDIT_BACKEND", None)  # tests choose their backends explicitly
# cuBLAS gives the same bits on every stream (a CUDA graph's capture stream against the default
# one: tests/test_streams.py) only with a fixed workspace; read when its first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests hold fp32 to IEEE fp32: torch's default lets cuDNN run fp32 convolutions in TF32
# (about 1e-3 relative), which would make eager fp32, the tolerance rule's yardstick, that far
# off on a GPU, and compiled and kernel paths disagree by that much.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
# Nor may cuBLAS sum fp16 / bf16 products in reduced precision, which it does for some shapes
# and not others: the glue's own matmuls (weight gradients) and eager autograd's, of other
# layouts, could then round apart for no fault of a kernel.
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
# Tests compare gradients of repeated runs bitwise (the torch backend's convolutions included):
# cuDNN may otherwise pick a weight-gradient algorithm that sums with atomics.
torch.backends.cudnn.deterministic = True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# FASTDIT_TEST_FAILURES=<file> (bench/gpu_check.sh sets it): every failure's report is appended
# to that file as it happens, so a run stopped by a time limit still tells what failed and why.
def pytest_runtest_logreport(report):
    path = os.environ.get("FASTDIT_TEST_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
            f.write(f"{report.longreprtext}\n\n")
