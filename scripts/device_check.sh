#!/usr/bin/env bash
# The one prepared GPU run (issue 15), under 8 minutes on an H200 (torch 2.11, triton 3.6, no internet):
#   0. installs the carried peer wheels (.whl/, from scripts/fetch_device_wheels.sh) into /tmp/site,
#   1. builds the extension in place (sm_90),
#   2. calibrates the card (bf16 matmul, device copy) once, then runs the issue's five GPU benchmarks
#      (benchmarks/gpu/bench_*.py), each in its own process against its baselines on the same inputs,
#      each under its own time limit: a failing peer or benchmark prints its error and the run goes on,
#   3. runs pytest -m gpu (time-capped), then the older per-op benchmarks (token_kl, paged_attention),
#   4. if time is left, the GPU perf gate with loose limits (the ratios thresholds.yaml's gpu rows need),
#   5. prints one table, and leaves in $OUT (at most 6 files, no folders): device_check.log (all of
#      this output), build.log, gpu_tests.log, gpu_bench.json, table.txt, gate_gpu.json.
# Usage: bash scripts/device_check.sh [--dry-run] [--quick] [--only NAME,NAME] [--no-build] [--no-tests]
#        [--no-gate] [--budget SECONDS]
#   --dry-run: no GPU needed: skips the build and the gate, collects the gpu tests without running them,
#              and runs every benchmark in its CPU smoke mode (tiny shapes, TRITON_INTERPRET=1), so the
#              plumbing (wheels, time limits, partial rows, merge, table, JSON) is checked anywhere.
# Set SCORE_COMMIT=<hash> when the tree has no .git (the device copy), so the results name their commit.
set -uo pipefail
# All of it in one function: bash parses the whole file before running it, so editing the script while a
# run is under way cannot change that run.
main() {
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0 QUICK="" ONLY="" BUILD=1 TESTS=1 GATE=1 BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=--quick ;;
    --only) ONLY=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --no-gate) GATE=0 ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "device_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ] && [ $DRY = 1 ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
OUTDIR=${OUT:-/tmp/score_device_out}
WORK=$(mktemp -d /tmp/score_device.XXXXXX)
mkdir -p "$OUTDIR" "$WORK/res"
exec > >(tee "$OUTDIR/device_check.log") 2>&1
TEE_PID=$!
RC=0  # non-zero when the build, a gpu test or a benchmark failed (the run itself always goes on)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${SCORE_COMMIT:-}" ]; then
  if SCORE_COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD -- 2>/dev/null || SCORE_COMMIT="$SCORE_COMMIT+dirty"
  else
    SCORE_COMMIT=unknown
  fi
fi
export SCORE_COMMIT
SMOKE=""
if [ $DRY = 1 ]; then SMOKE=--smoke; export TRITON_INTERPRET=1; BUILD=0; GATE=0; fi
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
status() { echo "[$(elapsed)s] $*"; }
# seconds a stage may take: its own cap, clipped to what is left of the run's budget (minus a reserve
# for the summary); 0 means skip it
left_for() { local cap=$1 rest=$(( BUDGET - $(date +%s) + t0 - 15 )); [ $rest -lt 0 ] && rest=0
             [ $cap -lt $rest ] && echo $cap || echo $rest; }

status "device_check: commit $SCORE_COMMIT, dry-run=$DRY, budget ${BUDGET}s, out $OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv,noheader 2>&1 | head -2

# 0. peers, from the carried wheels (never from an index: the device has none)
SITE=$WORK/site
if ls .whl/*.whl >/dev/null 2>&1; then
  if timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"  # --no-deps: only the peers are there, nothing of the image to shadow
    status "wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    status "wheels: install FAILED (the peers' rows will say not installed)"
  fi
else
  status "wheels: none in .whl/ (run scripts/fetch_device_wheels.sh here first); peers not installed"
fi
$PY - <<'EOF'
import importlib.metadata as m
for n in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy", "flash-attn"):
    try:
        v = m.version(n)
    except m.PackageNotFoundError:
        v = "-"
    print(f"  {n} {v}")
EOF

# 1. build
build=skipped
if [ $BUILD = 1 ] && [ "$(left_for 180)" -ge 10 ]; then
  status "building the extension (sm_90)"
  if TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 timeout "$(left_for 180)" $PY setup.py -q build_ext --inplace \
      >"$OUTDIR/build.log" 2>&1; then
    build=ok
  else
    build=FAILED RC=1; tail -30 "$OUTDIR/build.log"
  fi
fi
if [ $DRY = 1 ]; then status "build: $build"
else status "build: $build; backends: $($PY -c 'import score_kernels as s; print(s.backends())' 2>&1 | tail -1)"; fi

# 2. benchmarks: one calibration, then one process per benchmark, each with its own limit (seconds)
run_benches() {
  local spec name cap file lim rc
  for spec in $1; do
    name=${spec%%:*} cap=${spec##*:} file=${spec%%:*}
    [ $DRY = 1 ] && file=smoke
    FILES+=("$WORK/res/$file.json" "$WORK/res/$file.jsonl")
    lim=$(left_for "$cap")
    if [ "$lim" -lt 10 ]; then status "bench $name: skipped (run budget spent)"; continue; fi
    status "bench $name (limit ${lim}s)"
    # the soft budget lets a benchmark skip its last variants itself; timeout is the hard stop
    timeout -k 5 "$lim" $PY benchmarks/gpu_bench.py $SMOKE $QUICK --only "$name" --peak "$WORK/res/peak.json" \
      --budget $(( lim * 8 / 10 )) --partial "$WORK/res/$file.jsonl" --out "$WORK/res/$file.json"
    rc=$?
    [ $rc -ne 0 ] && RC=1
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status "bench $name: KILLED at its ${lim}s limit (partial rows kept)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && status "bench $name: exit $rc (see above)"
  done
}
# the issue's five first (the measurement is what the run is for), the older per-op ones after the tests
MAIN="linear_logprobs:130 engine:100 score_step:90 pg:60 linear_kl:40"
EXTRA="token_kl:25 paged_attention:30"
[ -n "$ONLY" ] && MAIN=$(for b in ${ONLY//,/ }; do echo "$b:120"; done) EXTRA=""
if [ $DRY = 1 ]; then
  # one process for all of them (the same loop with one entry): on a CPU each Python start-up with torch
  # costs more than a smoke benchmark
  all=$(for spec in $MAIN $EXTRA; do printf '%s,' "${spec%%:*}"; done)
  MAIN="${all%,}:400" EXTRA=""
else
  status "calibrating"
  timeout 60 $PY benchmarks/gpu_bench.py --calibrate --out "$WORK/res/peak.json" || status "calibration FAILED"
fi
FILES=("$WORK/res/peak.json")  # merged in run order
run_benches "$MAIN"

# 3. pytest -m gpu (-v: a run stopped at its limit still shows which tests passed)
tests="skipped"
lim=$(left_for 100)
if [ $TESTS = 1 ] && [ $DRY = 0 ] && [ "$lim" -lt 20 ]; then  # (and timeout 0 would mean no limit at all)
  tests="skipped (run budget spent)"
elif [ $TESTS = 1 ]; then
  if [ $DRY = 1 ]; then
    status "pytest -m gpu (dry run: collection only)"
    timeout 120 $PY -m pytest tests -m gpu -q --collect-only -p no:cacheprovider >"$OUTDIR/gpu_tests.log" 2>&1
  else
    status "pytest -m gpu (limit ${lim}s)"
    timeout "$lim" $PY -m pytest tests -m gpu -v -rfE --timeout=60 -p no:cacheprovider \
      >"$OUTDIR/gpu_tests.log" 2>&1
  fi
  trc=$?
  [ $trc -ne 0 ] && RC=1
  tests="rc=$trc ($(grep -oE '[0-9]+ (passed|failed|skipped|errors?|deselected|tests? collected)' "$OUTDIR/gpu_tests.log" \
    | tr '\n' ' '))"
  grep -E "FAILED|ERROR" "$OUTDIR/gpu_tests.log" | head -20
  tail -3 "$OUTDIR/gpu_tests.log"
fi
status "gpu tests: $tests"
run_benches "$EXTRA"

# 4. the GPU perf gate with loose limits: the paired ratios that thresholds.yaml's gpu rows are made from
gate=skipped
lim=$(left_for 120)
if [ $GATE = 1 ] && [ "$lim" -ge 40 ]; then
  status "perf gate, gpu shapes, loose limits (limit ${lim}s)"
  $PY -c "import yaml; ops = yaml.safe_load(open('benchmarks/thresholds.yaml'))['gpu']; \
yaml.safe_dump({'gpu': {o: {'time': 1e9} for o in ops}}, open('$WORK/loose.yaml', 'w'))"
  timeout -k 5 "$lim" $PY -m pytest benchmarks/test_bench_token_kl.py benchmarks/test_bench_rl.py \
    benchmarks/test_bench_logprobs.py benchmarks/test_bench_paged.py -q -p no:cacheprovider --perf-gate \
    --bench-machine gpu --bench-memory --bench-rounds 3 --bench-thresholds "$WORK/loose.yaml" \
    --benchmark-json "$OUTDIR/gate_gpu.json" >"$WORK/gate.log" 2>&1
  gate="rc=$?"
  tail -22 "$WORK/gate.log"
fi

# 5. one table, one JSON
echo
echo "================ device check summary ================"
# clocks and temperature right after the load: a throttled card explains low numbers
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1 | tr '\n' ' ' && echo
$PY benchmarks/gpu_bench.py --merge "${FILES[@]}" \
  --out "$OUTDIR/gpu_bench.json" --table "$OUTDIR/table.txt" 2>&1
$PY - "$OUTDIR/gpu_bench.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
p = d.get("peak") or {}
print(f"device {d.get('device')} | commit {d.get('commit')} | bf16 matmul {p.get('matmul_bf16_tflops', 0):.0f} TF/s"
      f" | copy {p.get('copy_gbs', 0):.0f} GB/s | peers {d.get('versions')}")
for k, v in sorted(d.get("benchmarks", {}).items()):
    print(f"  bench {k}: {v}")
EOF
echo "build: $build | gpu tests: $tests | gate: $gate | $(elapsed)s | files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the device tool collects $OUT
exit $RC
}
main "$@"
