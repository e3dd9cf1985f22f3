#!/usr/bin/env bash
# The GPU round (benchmarks/gpu_round.py): one command for one lent-GPU call.
#   bash benchmarks/run_gpu.sh                   the first part: versions, build, info, the
#                                                 kernel tests with compute-sanitizer memcheck,
#                                                 the quick benchmarks, the acceptance verdict
#   bash benchmarks/run_gpu.sh --part second     synccheck / racecheck, the rest of the suite,
#                                                 the benchmarks' full sweeps
#   bash benchmarks/run_gpu.sh --dry-run         the plan of steps with their caps
# --deadline SECONDS (default 560) bounds the whole round, its summary included. Files go to
# $OUT (default benchmarks/results/round/): summary.txt, round.log, junit.xml, results.json.
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_round.py "$@"
