#!/usr/bin/env bash
# Everything a GPU machine should check, in one go, from the repository root:
#   bash benchmarks/run_gpu.sh [build] [test] [sanitize] [bench]     (default: all four)
# build     compile stitchops._C in place (no network needed: --no-deps, no build isolation)
# test      the whole pytest suite on the GPU (cuda backend on the real kernels, timm parity)
# sanitize  compute-sanitizer memcheck / synccheck / racecheck over the cuda-backend tests
# bench     bench_least_squares, bench_sparse_delta, bench_token_cluster,
#           bench_focus_attention, bench_lora and
#           bench_stitched on the GPU, then the acceptance targets they declare, read off
#           the results (benchmarks/acceptance.py)
# Logs and result files go to $OUT if set (else benchmarks/results/logs/); the benchmark
# JSON files are also written to benchmarks/results/ as usual.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-benchmarks/results/logs}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build test sanitize bench)
PY="${PYTHON:-python3}"
status=0

step() {  # step NAME COMMAND...: run, log to $LOGS/NAME.log, report the time
  local name=$1
  shift
  local start=$SECONDS
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}

for s in "${STEPS[@]}"; do
  case "$s" in
    build)
      "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
      step build env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-deps --no-build-isolation -e .
      step info "$PY" -m stitchops info
      ;;
    test)
      # Spread over 8 processes when pytest-xdist is there (the GPU image has it): most of
      # the time goes into compiling Triton kernels, one CPU core per compile.
      parallel=()
      "$PY" -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}" --dist loadscope)
      step test "$PY" -m pytest -q -rs --durations=15 "${parallel[@]}" \
        --ignore=tests/test_cuda_sanitizer.py
      ;;
    sanitize) step sanitize "$PY" -m pytest -q -rs tests/test_cuda_sanitizer.py ;;
    bench)
      # least_squares first: it is quick and one of the acceptance targets, while bench_lora
      # autotunes 32 shape keys × 7-9 tilings and may be cut short by a time limit (it saves
      # its results after every case, the acceptance shape first).
      step bench_least_squares "$PY" benchmarks/bench_least_squares.py
      step bench_sparse_delta "$PY" benchmarks/bench_sparse_delta.py --device cuda
      step bench_token_cluster "$PY" benchmarks/bench_token_cluster.py --device cuda
      step bench_focus_attention "$PY" benchmarks/bench_focus_attention.py --device cuda
      step bench_lora "$PY" benchmarks/bench_lora.py
      step bench_stitched "$PY" benchmarks/bench_stitched.py --device cuda
      cp benchmarks/results/*.json "$LOGS/" 2>/dev/null || true
      step acceptance "$PY" benchmarks/acceptance.py
      ;;
    *) echo "unknown step $s (build, test, sanitize, bench)"; exit 2 ;;
  esac
done
exit $status
