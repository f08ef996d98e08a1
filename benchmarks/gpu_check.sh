#!/usr/bin/env bash
# GPU check for fastkd on a short window: an H100 / H200 machine with 16 cores and no network, under 12
# minutes in all.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [REPORT_PATH]
#
# Stages, in order, each under its own time limit (`timeout`), and all under a total budget: a stage's limit
# is min(its own, what is left of the budget); a stage with under 10 s left is not started.
#
#   stage              limit   what
#   machine             30 s   GPU, driver, torch, nvcc, CPU capability, Liger-Kernel version
#   build              240 s   pip install --no-build-isolation -e . for this machine only: FASTKD_CUDA=1,
#                              TORCH_CUDA_ARCH_LIST=<the visible GPU's capability>, MAX_JOBS=16, and the CPU
#                              library of the best ISA this CPU runs (setup.py's FASTKD_CPU_ISAS=auto). On
#                              failure the report holds the log's tail and every later stage is skipped.
#   smoke              120 s   tests/test_smoke.py (pytest -m smoke): every op family once on cpu and cuda
#                              against the float64 reference, and the check that it touches every op
#   sanitize_memcheck   60 s   compute-sanitizer memcheck over benchmarks/sanitize_workload.py (every kernel,
#                              minimal shapes, no caching allocator so that out-of-bounds accesses are seen)
#   sanitize_racecheck  60 s   compute-sanitizer racecheck over the same workload, fastkd's kernels only
#   tests              rest    the rest of the test suite on cuda (pytest -k cuda -m "not smoke"), leaving
#                              BENCH_S for the benchmark
#   bench              150 s   python -m fastkd.bench --suite quick (Liger-Kernel rows when importable)
#   bench_llm          rest    if time remains: the LLM head, fused linear KD at 8192 x 4096 x 128256 bf16
#
# Limits: FASTKD_GPU_CHECK_BUDGET_S (total, default 720) and <STAGE>_S (BUILD_S, SMOKE_S, MEMCHECK_S,
# RACECHECK_S, TESTS_S, BENCH_S, BENCH_LLM_S) in seconds. PYTHON: the interpreter (default python3).
#
# The report (default gpu_report.txt, or $OUT/gpu_report.txt when $OUT is set) is appended to as each stage
# ends, so a stage cut short, or the whole command killed, leaves the earlier stages' results in it. Each stage
# ends with one machine-readable line
#   STAGE <name> <pass|fail|timeout|skipped|nobudget|killed> <seconds>
# and the report with "RESULT PASS" or "RESULT FAIL". Every stage's full output goes to gpu_check.log beside
# the report (written live); the benchmark's JSON to gpu_bench.json / gpu_bench_llm.json. Exit status 0 only if
# every stage passed or was skipped by design (the build in a dry run when fastkd imports, racecheck in a dry
# run, bench_llm when under 60 s are left); fail, timeout, nobudget (under 10 s left) or killed make it 1 (and
# a failed build skips every later stage).
#
# Dry run (--dry-run or FASTKD_GPU_CHECK_DRY_RUN=1), for a CPU machine (CI, under ~2 minutes on 2 cores): the
# same flow with no GPU. The build is skipped when fastkd's kernels already import (else a CPU-only build);
# the smoke tests run on cpu; the sanitizer workload runs on cpu without compute-sanitizer (the command it
# would run is printed) and checks that it covers every registered op; a small subset of the other tests
# (DRY_TESTS, DRY_TESTS_K: test_kd.py's quick tests) and a tiny benchmark run; then the report's stage lines are
# checked.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY="${FASTKD_GPU_CHECK_DRY_RUN:-0}"
REPORT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) REPORT="$arg" ;;
  esac
done
REPORT="${REPORT:-${OUT:-.}/gpu_report.txt}"
DIR="$(dirname "$REPORT")"
mkdir -p "$DIR"
LOG="$DIR/gpu_check.log"
PY="${PYTHON:-python3}"
BUDGET_S="${FASTKD_GPU_CHECK_BUDGET_S:-720}"
BUILD_S="${BUILD_S:-240}" SMOKE_S="${SMOKE_S:-120}" MEMCHECK_S="${MEMCHECK_S:-60}" RACECHECK_S="${RACECHECK_S:-60}"
TESTS_S="${TESTS_S:-600}" BENCH_S="${BENCH_S:-150}" BENCH_LLM_S="${BENCH_LLM_S:-240}"
DRY_TESTS="${DRY_TESTS:-tests/test_kd.py}"  # dry run: the "tests" stage's subset (files, and a -k expression)
DRY_TESTS_K="${DRY_TESTS_K:-not oracle and not opcheck and not compile and not low_precision}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
PYTEST=("$PY" -m pytest -p no:cacheprovider)
export PYTHONUNBUFFERED=1

START=$SECONDS
FAILED=0
CURRENT="" CURRENT_T0=0 CURRENT_OFFSET=0 CHILD=""
: > "$REPORT"
: > "$LOG"

say() { printf '%s\n' "$*" >> "$REPORT"; printf '%s\n' "$*"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
stage_line() {  # name status seconds
  say "STAGE $1 $2 $3"
  case "$2" in fail|timeout|nobudget|killed) FAILED=1 ;; esac
}
# Killed (TERM, INT, HUP) while a stage runs: stop it, keep the tail of its output and say so in the report.
# shellcheck disable=SC2317  # reached through the trap
on_kill() {
  trap - TERM INT HUP
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    tail -c "+$CURRENT_OFFSET" "$LOG" | tail -n 20 >> "$REPORT"
  fi
  [ -n "$CURRENT" ] && stage_line "$CURRENT" killed $((SECONDS - CURRENT_T0))
  say "RESULT FAIL (killed)"
  exit 143
}
trap on_kill TERM INT HUP

# run_stage NAME LIMIT_S TAIL_LINES CMD...: runs CMD under min(LIMIT_S, what is left), its output into the log,
# then appends the output's last TAIL_LINES lines and the STAGE line to the report. Returns CMD's status.
run_stage() {
  local name=$1 limit=$2 tail_lines=$3 rem rc status t0 offset
  shift 3
  rem=$(left)
  [ "$rem" -lt "$limit" ] && limit=$rem
  say ""
  say "===== $name: $(printf '%q ' "$@" | cut -c1-300)"
  if [ "$rem" -lt 10 ] || [ "$limit" -lt 1 ]; then
    stage_line "$name" nobudget 0
    return 1
  fi
  printf '\n===== %s (limit %s s): %s\n' "$name" "$limit" "$*" >> "$LOG"
  offset=$(($(wc -c < "$LOG") + 1))
  CURRENT=$name CURRENT_T0=$SECONDS CURRENT_OFFSET=$offset t0=$SECONDS
  # in the background, so that a TERM to this script runs on_kill at once (bash defers traps until a
  # foreground child exits)
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CURRENT="" CHILD=""
  tail -c "+$offset" "$LOG" | tail -n "$tail_lines" >> "$REPORT"
  case $rc in
    0) status=pass ;;
    124|137) status=timeout; say "(stopped at its limit of $limit s)" ;;
    *) status=fail; say "(exit status $rc)" ;;
  esac
  stage_line "$name" "$status" $((SECONDS - t0))
  return $rc
}
skip_stage() { say ""; say "===== $1: skipped ($2)"; stage_line "$1" skipped 0; }

say "fastkd GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) $([ "$DRY" = 1 ] && echo '(dry run: cpu, no compute-sanitizer)')"
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || rev="$rev (modified)"
else
  rev="? (not a git checkout)"
fi
say "budget ${BUDGET_S} s; git ${rev}"

# ---- machine ---------------------------------------------------------------------------------------------
# shellcheck disable=SC2317  # run by timeout through bash -c (exported)
machine() {
  if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    nvcc --version | tail -1
  fi
  "$PY" - <<'EOF'
import torch, torch.backends.cpu
from importlib.metadata import version, PackageNotFoundError
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
print("cpu capability", torch.backends.cpu.get_cpu_capability())
try:
    print("liger-kernel", version("liger-kernel"))
except PackageNotFoundError:
    print("liger-kernel not installed: no Liger-Kernel rows")
EOF
}
export -f machine
export DRY PY
run_stage machine 30 20 bash -c machine

# ---- build -----------------------------------------------------------------------------------------------
# The CPU library for the best ISA this CPU runs (setup.py's default), the CUDA kernels for the visible GPU.
built=0
if [ "$DRY" = 1 ] && "$PY" -c "import fastkd, sys; sys.exit(0 if fastkd.build_info()['compiled'] else 1)" 2>/dev/null; then
  skip_stage build "dry run: fastkd's kernels already import"
  built=1
elif [ "$DRY" = 1 ]; then
  FASTKD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    run_stage build "$BUILD_S" 50 "$PY" -m pip install --no-build-isolation --no-deps -e . && built=1
elif ! cap=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null); then
  say "no CUDA GPU visible to torch (on a CPU machine use --dry-run)"
  stage_line build fail 0
else
  say "building for sm ${cap} and this CPU's ISA"
  FASTKD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" \
    MAX_JOBS="${MAX_JOBS:-16}" \
    run_stage build "$BUILD_S" 50 "$PY" -m pip install --no-build-isolation --no-deps -e . && built=1
fi
if [ "$built" = 1 ]; then
  need_cuda=$([ "$DRY" = 1 ] && echo False || echo True)
  "$PY" -c "import fastkd, json; i = fastkd.build_info(); print(json.dumps(i)); assert i['compiled'], i
assert i['cuda'] or not $need_cuda, 'no CUDA kernels in the build'" >> "$REPORT" 2>&1 ||
    { say "fastkd does not import with its kernels"; built=0; FAILED=1; }
fi

if [ "$built" != 1 ]; then
  for s in smoke sanitize_memcheck sanitize_racecheck tests bench bench_llm; do skip_stage "$s" "no build"; done
else
  # ---- smoke: every op family once, cpu and cuda, and the coverage check ---------------------------------
  run_stage smoke "$SMOKE_S" 15 "${PYTEST[@]}" -q -m smoke tests/test_smoke.py

  # ---- compute-sanitizer ---------------------------------------------------------------------------------
  # memcheck without the caching allocator (an access past a tensor's end inside a cached block goes unseen);
  # racecheck (shared-memory hazards) on fastkd's kernels only (kernel names in namespace fastkd)
  workload=("$PY" benchmarks/sanitize_workload.py --device cuda)
  memcheck=("$SANITIZER" --tool memcheck --error-exitcode 9 "${workload[@]}")
  racecheck=("$SANITIZER" --tool racecheck --error-exitcode 9 --kernel-name kns=fastkd "${workload[@]}")
  if [ "$DRY" = 1 ]; then
    say "would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${memcheck[*]}"
    say "instead (dry run): the same workload on cpu, with its coverage check"
    run_stage sanitize_memcheck "$MEMCHECK_S" 10 env OMP_NUM_THREADS=1 "$PY" benchmarks/sanitize_workload.py \
      --device cpu --check-coverage
    say "would run: ${racecheck[*]}"
    skip_stage sanitize_racecheck "dry run: the workload ran in sanitize_memcheck"
  else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitize_memcheck "$MEMCHECK_S" 12 "${memcheck[@]}"
    run_stage sanitize_racecheck "$RACECHECK_S" 12 "${racecheck[@]}"
  fi

  # ---- the rest of the test suite (on cuda), leaving time for the quick benchmark --------------------------
  tests_limit=$(($(left) - BENCH_S))
  [ "$tests_limit" -gt "$TESTS_S" ] && tests_limit=$TESTS_S
  if [ "$DRY" = 1 ]; then
    read -r -a dry_tests <<< "$DRY_TESTS"
    run_stage tests "$tests_limit" 15 "${PYTEST[@]}" -q -m "not smoke" -k "$DRY_TESTS_K" "${dry_tests[@]}"
  else
    run_stage tests "$tests_limit" 40 "${PYTEST[@]}" -q -rfE -m "not smoke" -k cuda tests
  fi

  # ---- benchmark -----------------------------------------------------------------------------------------
  if [ "$DRY" = 1 ]; then
    run_stage bench "$BENCH_S" 20 "$PY" -m fastkd.bench --loss kd --shapes 64x1000 --no-compile --repeats 1 \
      --json "$DIR/gpu_bench.json"
    skip_stage bench_llm "dry run"
  else
    bench=("$PY" -m fastkd.bench --suite quick)
    run_stage bench "$BENCH_S" 80 "${bench[@]}" --json "$DIR/gpu_bench.json"
    if [ "$(left)" -ge 60 ]; then
      run_stage bench_llm "$BENCH_LLM_S" 30 "$PY" -m fastkd.bench --loss fused_linear --dtype bfloat16 \
        --no-compile --json "$DIR/gpu_bench_llm.json"
    else
      skip_stage bench_llm "$(left) s left"
    fi
  fi
fi

# ---- the report itself: one STAGE line per stage -----------------------------------------------------------
for s in machine build smoke sanitize_memcheck sanitize_racecheck tests bench bench_llm; do
  grep -Eq "^STAGE $s (pass|fail|timeout|skipped|nobudget) [0-9]+$" "$REPORT" || { say "no STAGE line for $s"; FAILED=1; }
done
say ""
say "total $((SECONDS - START)) s"
if [ "$FAILED" = 0 ]; then say "RESULT PASS"; else say "RESULT FAIL"; fi
exit "$FAILED"
