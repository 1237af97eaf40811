#!/usr/bin/env bash
# GPU check for a machine with one H100 (torch 2.11, triton 3.6, no internet), under 8 minutes:
#   1. builds the extension in place (CUDA build, sm_90),
#   2. runs pytest -m gpu,
#   3. runs the GPU benchmarks (benchmarks/gpu_bench.py),
#   4. writes JSON results to $OUT when set, and prints a short table last.
# Usage: bash scripts/device_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/score_device_out}
mkdir -p "$OUTDIR"
QUICK=${1:-}
t0=$(date +%s)
status() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

status "device: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
status "building extension"
if TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 timeout 240 $PY setup.py -q build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
  build=ok
else
  build=FAILED; tail -30 "$OUTDIR/build.log"
fi
status "build: $build; backends: $($PY -c 'import score_kernels as s; print(s.backends())' 2>&1 | tail -1)"

status "pytest -m gpu"
timeout 200 $PY -m pytest tests -m gpu -q --timeout=120 -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUTDIR/gpu_tests.xml" >"$OUTDIR/gpu_tests.log" 2>&1
tests_rc=$?
tail -25 "$OUTDIR/gpu_tests.log"

status "GPU benchmarks"
timeout 240 $PY benchmarks/gpu_bench.py $QUICK --out "$OUTDIR/gpu_bench.json" >"$OUTDIR/gpu_bench.log" 2>&1
bench_rc=$?
grep -v "^\[bench" "$OUTDIR/gpu_bench.log" | grep -iE "error|Traceback" | head -10

echo
echo "================ device check summary ================"
echo "build: $build | gpu tests rc=$tests_rc ($(grep -oE '[0-9]+ (passed|failed|skipped|error)' "$OUTDIR/gpu_tests.log" | tr '\n' ' ')) | bench rc=$bench_rc | $(( $(date +%s) - t0 ))s"
grep -E "^device|^op |^[a-z_]+ +[A-Za-z]=" "$OUTDIR/gpu_bench.log" || tail -40 "$OUTDIR/gpu_bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
