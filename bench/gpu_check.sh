#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build fastdit for it, run every test (the GPU
# ones included, Triton compiled for the GPU), run the benchmark suite, and write everything
# under the folder given (default bench/results/<gpu>/<date>).
#
#   bash bench/gpu_check.sh [OUT_DIR] [all|tests|bench] [SUITES]
#
# The second argument runs only the tests or only the benchmarks (after the build, which is
# incremental on a second call), for machines that give one command 10 minutes: run "tests",
# then "bench", with the same OUT_DIR. SUITES (comma-separated, default
# adaln,patchify,downsampled_attention,models,overhead) picks benchmark suites; they share
# BENCH_SECONDS (default 450) by weight, so "bench downsampled_attention,models" gives those two
# more time.
# Each suite writes its results after every case and stops starting cases when its share is
# spent (the rest are listed as not run).
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
SUITES=${3:-adaln,patchify,downsampled_attention,models,overhead}
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

# One test file: its own pytest process, so that a kernel fault (a sticky CUDA error) or a hang
# costs that file only, and TEST_JOBS files compile their Triton kernels at once. tests/<file>.txt
# lists every test as it ends and tests/<file>.failures.txt every failure's report as it
# happens, so a file stopped at the deadline still says what ran and what failed (its junit XML
# is written only at the end); a test running over 60 s has its stack dumped.
run_test_file() {
  local file=$1 name left
  name=$(basename "$file" .py)
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -le 5 ]; then echo "$name: not run (TEST_TIMEOUT spent)"; return 1; fi
  FASTDIT_TEST_TRITON_GPU=1 FASTDIT_TEST_FAILURES="$OUT/tests/$name.failures.txt" timeout "$left" \
    ${SANITIZER:+"$SANITIZER_BIN" --tool "$SANITIZER" --error-exitcode 86 --print-limit 20} \
    $PY -m pytest -v --no-header -p no:cacheprovider -o faulthandler_timeout=60 --durations=10 \
    -k "not emulated and not spills" --junitxml="$OUT/tests/$name.xml" "$file" \
    > "$OUT/tests/$name.txt" 2>&1
  local rc=$?
  # pytest's exit code 5: every test of the file deselected or skipped, not a failure
  echo "$name: $(tail -n 1 "$OUT/tests/$name.txt") (exit $rc)"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
}

if [ "$PART" != bench ]; then
  # The CPU-only checks (the CUDA emulator's tests, compile-and-count-spills, the sanitizers)
  # ran in CI; here the kernels run for real. Largest files first, TEST_JOBS (4) at a time, all
  # within TEST_TIMEOUT (300 s). TEST_FILES="tests/a.py tests/b.py" runs only those;
  # SANITIZER=memcheck (or racecheck, initcheck, synccheck) runs them under compute-sanitizer
  # (many times slower: pick a few files), a report failing the file.
  step "tests (Triton compiled for the GPU; the CPU emulator's tests left to CI)"
  rm -rf "$OUT/tests"; mkdir -p "$OUT/tests"
  export -f run_test_file
  SANITIZER_BIN=$(command -v compute-sanitizer \
    || echo "$(dirname "$(command -v nvcc)")/compute-sanitizer")
  export OUT PY SANITIZER SANITIZER_BIN DEADLINE=$(( $(date +%s) + ${TEST_TIMEOUT:-300} ))
  { if [ -n "${TEST_FILES:-}" ]; then printf '%s\n' $TEST_FILES; else ls -S tests/test_*.py; fi; } \
    | grep -v -e test_adaln_cuda_emu -e test_sanitized \
    | xargs -P "${TEST_JOBS:-4}" -I{} bash -c 'run_test_file {}' | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[2]}" -eq 0 ] || status=1
  cat "$OUT"/tests/*.failures.txt 2>/dev/null | head -n 200
fi
[ "$PART" = tests ] && { echo; echo "results in $OUT (status $status)"; exit $status; }

# Each suite under its own share of BENCH_SECONDS (by weight): --budget stops it starting cases
# once its share is spent, and `timeout` (45 s later) stops a case that hangs. bf16 is the
# default on a GPU; the adaln and patchify families also run in fp32 (their issues' targets
# cover both). Worst case: BENCH_SECONDS of benchmarks, 5 minutes of tests, 1-2 of build.
step "benchmarks ($SUITES)"
declare -A weight=([adaln]=3 [patchify]=2 [downsampled_attention]=3 [models]=3 [overhead]=1)
declare -A extra=([adaln]="--dtype bf16 --dtype fp32" [patchify]="--dtype bf16 --dtype fp32")
total=0
for suite in ${SUITES//,/ }; do
  [ -n "${weight[$suite]:-}" ] || { echo "unknown suite $suite"; exit 2; }
  total=$(( total + weight[$suite] ))
done
for suite in ${SUITES//,/ }; do
  share=$(( ${BENCH_SECONDS:-450} * weight[$suite] / total ))
  timeout $(( share + 45 )) $PY bench/run.py --only "$suite" ${extra[$suite]:-} --budget "$share" \
    --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "suite $suite failed or ran past its time"; status=1; }
done

echo; echo "results in $OUT (status $status)"
exit $status
