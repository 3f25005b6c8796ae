#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build fastdit for it, run every test (the GPU
# ones included, Triton compiled for the GPU), run the benchmark suite, and write everything
# under the folder given (default bench/results/<gpu>/<date>).
#
#   bash bench/gpu_check.sh [OUT_DIR] [all|tests|bench]
#
# The second argument runs only the tests or only the benchmarks (after the build, which is
# incremental on a second call), for machines that give one command 10 minutes: run "tests",
# then "bench", with the same OUT_DIR.
#
# Uses the Python on PATH (PY=... to choose) with its own torch; installs nothing from the
# network (fastdit is built with --no-build-isolation --no-deps). Budget: about 12 minutes on
# an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_' | tr -cd '[:alnum:]_-')
OUT=${1:-bench/results/${gpu:-unknown_gpu}/$(date -u +%Y-%m-%d)}
PART=${2:-all}
case "$PART" in all|tests|bench) ;; *) echo "second argument: all, tests or bench (got $PART)"; exit 2;; esac
mkdir -p "$OUT"
status=0
step() { echo; echo "== $* =="; }

step "machine" | tee "$OUT/machine.txt"
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -n 2; git rev-parse HEAD; } 2>&1 | tee -a "$OUT/machine.txt"

step "build (FASTDIT_BUILD_CUDA=1, archs: the GPU present)"
start=$(date +%s)
if ! FASTDIT_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -m fastdit info 2>&1 | tee "$OUT/info.txt"

if [ "$PART" != bench ]; then
  # The CPU-only checks (CUDA emulator, compile-and-count-spills) ran in CI; here the kernels
  # run for real.
  step "tests (Triton compiled for the GPU; the CPU emulator's tests left to CI)"
  FASTDIT_TEST_TRITON_GPU=1 timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q --no-header \
    -p no:cacheprovider --ignore=tests/test_adaln_cuda_emu.py -k "not emulated and not spills" \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt" | tail -n 30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
[ "$PART" = tests ] && { echo; echo "results in $OUT (status $status)"; exit $status; }

# Each suite under its own time limit (seconds), so one slow suite cannot starve the others.
# bf16 is the default on a GPU; the adaln and patchify families also run in fp32 (their issues'
# targets cover both). Worst case: about 8 minutes of benchmarks, 3 of tests, 1-2 of build.
step "benchmarks"
for spec in "adaln:150:--dtype bf16 --dtype fp32" "patchify:100:--dtype bf16 --dtype fp32" "downsampled_attention:90:" "models:150:"; do
  IFS=: read -r suite limit args <<< "$spec"
  timeout "$limit" $PY bench/run.py --only "$suite" $args --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "suite $suite failed or ran past ${limit} s"; status=1; }
done

echo; echo "results in $OUT (status $status)"
exit $status
