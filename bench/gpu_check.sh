#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build fastdit for it, run every test (the GPU
# ones included, Triton compiled for the GPU), run the benchmark suite, and write everything
# under the folder given (default bench/results/<gpu>/<date>), all within TOTAL_SECONDS.
#
#   bash bench/gpu_check.sh [OUT_DIR] [all|tests|bench] [SUITES]
#
# TOTAL_SECONDS (default 540: one 10-minute command with a minute to spare) bounds the whole
# run. What is left after the build goes to the tests (TEST_TIMEOUT: 45 % of it when the
# benchmarks follow, all of it with "tests") and then to the benchmarks (BENCH_SECONDS: the
# rest); either variable set by hand wins. The second argument runs only the tests or only the
# benchmarks (the build is incremental on a second call with the same checkout): "tests", then
# "bench", give each part a whole command. SUITES (comma-separated, default
# adaln,patchify,downsampled_attention,models,overhead) picks benchmark suites; they share
# BENCH_SECONDS by weight, so "bench downsampled_attention,models" gives those two more time.
# Each suite writes its results after every case and stops starting cases when its share is
# spent (the rest are listed as not run).
#
# Uses python3 on PATH (else python; PY=... to choose) with its own torch; installs nothing
# from the network (fastdit is built with --no-build-isolation --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
begin=$(date +%s)
END=$(( begin + ${TOTAL_SECONDS:-540} ))
left() { echo $(( END - $(date +%s) )); }
# python3 first: on the lent machines it is the interpreter that holds PyTorch
PY=${PY:-$(command -v python3 || command -v python || echo python)}
# unbuffered: a suite or test stopped by `timeout` keeps what it printed in the logs
export PYTHONUNBUFFERED=1
WARM_JOBS=${WARM_JOBS:-6}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_' | tr -cd '[:alnum:]_-')
OUT=${1:-bench/results/${gpu:-unknown_gpu}/$(date -u +%Y-%m-%d)}
PART=${2:-all}
SUITES=${3:-adaln,patchify,downsampled_attention,models,overhead}
case "$PART" in all|tests|bench) ;; *) echo "second argument: all, tests or bench (got $PART)"; exit 2;; esac
# Each suite's share of BENCH_SECONDS, and its arguments: bf16 is the default on a GPU; the adaln
# and patchify families also run in fp32 (their issues' targets cover both).
declare -A weight=([adaln]=3 [patchify]=2 [downsampled_attention]=3 [models]=3 [overhead]=1)
declare -A extra=([adaln]="--dtype bf16 --dtype fp32" [patchify]="--dtype bf16 --dtype fp32")
for suite in ${SUITES//,/ }; do
  [ -n "${weight[$suite]:-}" ] || { echo "unknown suite $suite (choose from ${!weight[*]})"; exit 2; }
done
mkdir -p "$OUT"
status=0
step() { echo; echo "== $* =="; }

step "machine" | tee "$OUT/machine.txt"
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; nvcc --version | tail -n 2; } 2>&1 | tee -a "$OUT/machine.txt"
# FASTDIT_COMMIT, where the caller sets it, names the commit (a lent machine gets a copy of the
# tree without git's metadata, perhaps inside some other git work tree); else git's HEAD.
commit=${FASTDIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a "$OUT/machine.txt"

# torch.compile's baselines cost more than the timings: every case compiles the reference for
# its own shapes (Inductor lowering, code generation, Triton builds: seconds each, over two
# hundred graphs in the full suite). WARM_JOBS processes (default 6, each with one Inductor
# compile thread) compile them in the background from here on, beside the build and the tests,
# into Inductor's caches on disk; the timed run then loads each graph from there. They are
# stopped before the first timing, whatever they have not reached is compiled by the timed run
# as before (and a cache entry one of them was writing when stopped, if broken, fails its first
# try there: bench/common.py compiles it again without the caches). WARM_JOBS=0 turns this off.
# A GPU in an exclusive compute mode takes one process at a time: no background compiles there.
mode=$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -n1)
case "$mode" in Exclusive*) echo "compute mode $mode: no background compiles"; WARM_JOBS=0;; esac
warm_pids=()
if [ "$PART" != tests ] && [ "$WARM_JOBS" -gt 0 ]; then
  step "compiling the torch.compile baselines in the background ($WARM_JOBS jobs)"
  rm -rf "$OUT/warm"; mkdir -p "$OUT/warm"
  # each job in its own process group (setsid), so that stop_warm ends it and all it started
  export PY
  runs=""  # "suite:its arguments;" for each suite; models first: its graph (DiT-XL/2's
  # forward, 28 blocks) is the longest compile, and its shard would otherwise reach it last
  for suite in ${SUITES//,/ }; do
    run="$suite:${extra[$suite]:-};"
    if [ "$suite" = models ]; then runs="$run$runs"; else runs+=$run; fi
  done
  for (( i = 0; i < WARM_JOBS; i++ )); do
    setsid bash -c '
      IFS=";" read -ra runs <<< "$1"
      for run in "${runs[@]}"; do
        PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=1 $PY bench/run.py --only "${run%%:*}" \
          ${run#*:} --warm-compiles "$2"
      done' warm "$runs" "$i/$WARM_JOBS" > "$OUT/warm/$i.txt" 2>&1 < /dev/null &
    warm_pids+=($!)
  done
fi
warm_signal() {  # send $1 to every background compile's process group; fails if none is left
  local pid alive=1
  for pid in "${warm_pids[@]}"; do kill "$1" -- "-$pid" 2>/dev/null && alive=0; done
  return $alive
}
stop_warm() {  # let the compiles run until $1 (epoch seconds), then end them and their children
  [ ${#warm_pids[@]} -gt 0 ] || return 0
  while [ "$(date +%s)" -lt "$1" ] && warm_signal -0; do sleep 2; done
  warm_signal -TERM
  # a killed compile can take a moment to go; then no one is spared
  for _ in {1..20}; do warm_signal -0 || break; sleep 1; done
  warm_signal -KILL
  wait 2>/dev/null
  echo "compiled ahead: $(cat "$OUT"/warm/*.txt | grep -c ': [0-9.]* s$') compiled variants" \
    "(forward or forward+backward of a case), $(cat "$OUT"/warm/*.txt | grep -c ': failed') failed"
  warm_pids=()
}
trap 'stop_warm 0' EXIT

step "build (FASTDIT_BUILD_CUDA=1, archs: the GPU present)"
start=$(date +%s)
# at most what is left less two minutes (but a minute at least: `timeout 0` never stops), so a
# build that hangs still leaves the logs to read
build_s=$(( $(left) - 120 )); [ "$build_s" -ge 60 ] || build_s=60
FASTDIT_BUILD_CUDA=1 timeout -k 10 "$build_s" \
  $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  case $rc in 124|137) why="stopped at its limit of $build_s s";; *) why="exit $rc";; esac
  echo "BUILD FAILED after $(( $(date +%s) - start )) s ($why)"; stop_warm 0; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -m fastdit info 2>&1 | tee "$OUT/info.txt"
if [ "$PART" = all ]; then tests_s=$(( $(left) * 45 / 100 )); else tests_s=$(( $(left) - 10 )); fi
TEST_TIMEOUT=${TEST_TIMEOUT:-$tests_s}

# One test file: its own pytest process, so that a kernel fault (a sticky CUDA error) or a hang
# costs that file only, and TEST_JOBS files compile their Triton kernels at once. tests/<file>.txt
# lists every test as it ends and tests/<file>.failures.txt every failure's report as it
# happens, so a file stopped at the deadline still says what ran and what failed (its junit XML
# is written only at the end); a test running over 60 s has its stack dumped.
run_test_file() {
  local file=$1 name left began took
  name=$(basename "$file" .py)
  began=$(date +%s)
  left=$(( DEADLINE - began ))
  if [ "$left" -le 5 ]; then echo "$name: not run (TEST_TIMEOUT spent)"; return 1; fi
  FASTDIT_TEST_TRITON_GPU=1 FASTDIT_TEST_FAILURES="$OUT/tests/$name.failures.txt" timeout -k 10 "$left" \
    ${SANITIZER:+"$SANITIZER_BIN" --tool "$SANITIZER" --error-exitcode 86 --print-limit 20} \
    $PY -m pytest -v --no-header -p no:cacheprovider -o faulthandler_timeout=60 --durations=10 \
    -k "not emulated and not spills" --junitxml="$OUT/tests/$name.xml" "$file" \
    > "$OUT/tests/$name.txt" 2>&1
  local rc=$?
  # pytest's exit code 5: every test of the file deselected or skipped, not a failure
  case $rc in
    0|1|5) echo "$name: $(tail -n 1 "$OUT/tests/$name.txt") (exit $rc)";;
    # 124: stopped at the deadline; 137: killed, 10 s after that or before it (out of memory)
    124|137) took=$(( $(date +%s) - began ))
      if [ "$took" -ge "$left" ]; then took="at the deadline"
      else took="killed after $took s, before the deadline"; fi
      echo "$name: stopped ($took), the last test begun:" \
      "$(grep '^tests/.*::' "$OUT/tests/$name.txt" | tail -n 1 \
         | sed -E 's/ +(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS).*$//; s/ +$//') (exit $rc)";;
    # a file that cannot be collected (exit 2), pytest's own error (3, 4), a crash, the
    # sanitizer's errors (86): no test's report tells why, the end of the log does
    *) echo "$name: no verdict (exit $rc)"
       { echo "=== $name: exit $rc, the end of its log"; tail -n 30 "$OUT/tests/$name.txt"
         echo; } >> "$OUT/tests/$name.failures.txt";;
  esac
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
}

if [ "$PART" != bench ]; then
  # The CPU-only checks (the CUDA emulator's tests, compile-and-count-spills, Triton's kernels
  # compiled for sm_90 and their resources counted, the sanitizers) ran in CI; here the kernels
  # run for real. TEST_JOBS (6) files at a time, all within TEST_TIMEOUT.
  # TEST_FILES="tests/a.py tests/b.py" runs only those; SANITIZER=memcheck (or racecheck,
  # initcheck, synccheck) runs them under compute-sanitizer (many times slower: pick a few
  # files), a report failing the file.
  step "tests (Triton compiled for the GPU; the CPU emulator's tests left to CI; ${TEST_TIMEOUT} s)"
  rm -rf "$OUT/tests"; mkdir -p "$OUT/tests"
  export -f run_test_file
  SANITIZER_BIN=$(command -v compute-sanitizer \
    || echo "$(dirname "$(command -v nvcc)")/compute-sanitizer")
  export OUT PY SANITIZER SANITIZER_BIN DEADLINE=$(( $(date +%s) + TEST_TIMEOUT ))
  # The files with GPU-only tests first (the kernels called directly, streams and graphs:
  # nothing else runs them), then the rest, largest first.
  gpu_files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
  { if [ -n "${TEST_FILES:-}" ]; then printf '%s\n' $TEST_FILES
    else ls -S $gpu_files; ls -S tests/test_*.py | grep -vxF "$gpu_files"; fi; } \
    | grep -v -e test_adaln_cuda_emu -e test_emulator -e test_sanitized -e test_triton_compile \
    | xargs -P "${TEST_JOBS:-6}" -I{} bash -c 'run_test_file {}' | tee "$OUT/tests.txt"
  [ "${PIPESTATUS[2]}" -eq 0 ] || status=1
  cat "$OUT"/tests/*.failures.txt 2>/dev/null | head -n 200
fi
[ "$PART" = tests ] && { echo; echo "results in $OUT (status $status, $(( $(date +%s) - begin )) s)"; exit $status; }

# Each suite under its own share of BENCH_SECONDS (by weight): --budget stops it starting cases
# once its share is spent, and `timeout` (45 s later) stops a case that hangs.
step "benchmarks ($SUITES)"
# The background compiles may run on for a fifth of the time left (WARM_SECONDS), no longer.
stop_warm $(( $(date +%s) + ${WARM_SECONDS:-$(( $(left) / 5 ))} ))
total=0
for suite in ${SUITES//,/ }; do total=$(( total + weight[$suite] )); done
# What is left, less the start of one suite (limits measured, imports: ~15 s) and the overrun
# of a last case (~30 s). Each suite's share is taken from the time left when it starts, so a
# suite that ends early, or starts late, moves the others' shares with it.
BENCH_SECONDS=${BENCH_SECONDS:-$(( $(left) - 45 ))}
echo "benchmark budget: $BENCH_SECONDS s"
: > "$OUT/bench.txt"  # a second "bench" call into this folder starts the log afresh
bench_end=$(( $(date +%s) + BENCH_SECONDS ))
for suite in ${SUITES//,/ }; do
  share=$(( (bench_end - $(date +%s) - 15) * weight[$suite] / total ))
  total=$(( total - weight[$suite] ))
  if [ "$share" -lt 10 ]; then
    echo "suite $suite: not run (the benchmark time is spent)" | tee -a "$OUT/bench.txt"
    status=1; continue
  fi
  timeout -k 10 $(( share + 45 )) $PY bench/run.py --only "$suite" ${extra[$suite]:-} --budget "$share" \
    --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    124|137) echo "suite $suite: stopped, past its time or out of memory (exit $rc)"; status=1;;
    *) echo "suite $suite failed (exit $rc)"; status=1;;
  esac
done

# The issues' targets against the rows just written: targets.md (a target missed is a finding,
# not a failure of the check).
step "targets"
$PY bench/targets.py "$OUT" || echo "bench/targets.py failed"

echo; echo "results in $OUT (status $status, $(( $(date +%s) - begin )) s)"
exit $status
