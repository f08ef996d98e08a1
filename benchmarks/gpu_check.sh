#!/usr/bin/env bash
# One-command GPU check for fastkd, for a machine with an NVIDIA GPU and no network:
#   bash benchmarks/gpu_check.sh [REPORT_PATH]
# 1. builds fastkd with CUDA against the torch installed there (no build isolation, nothing downloaded),
# 2. runs the whole test suite (every test runs on cpu and cuda),
# 3. runs compute-sanitizer memcheck and racecheck over the kernels on small inputs,
# 4. runs the benchmark (eager, torch.compile, Liger-Kernel if installed, fastkd),
# and writes everything into one report file (default: gpu_report.txt, or $OUT/gpu_report.txt when $OUT is set).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT="${1:-${OUT:-.}/gpu_report.txt}"
PY="${PYTHON:-python3}"
: > "$REPORT"
section() { printf '\n===== %s =====\n' "$*" | tee -a "$REPORT"; }
status=0

section "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -1; } 2>&1 | tee -a "$REPORT"

section "build (FASTKD_CUDA=1)"
cap=$("$PY" -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"
if ! FASTKD_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m pip install --no-build-isolation --no-deps -e . >build.log 2>&1; then
  tail -50 build.log | tee -a "$REPORT"; echo "BUILD FAILED" | tee -a "$REPORT"; exit 1
fi
"$PY" -c "import fastkd, json; print(json.dumps(fastkd.build_info()))" 2>&1 | tee -a "$REPORT"

section "tests (cpu + cuda)"
"$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee -a "$REPORT" || status=1

section "compute-sanitizer"
cat > /tmp/fastkd_sanitize.py <<'PYEOF'
import torch, fastkd
for shape in [(1, 2), (3, 7), (5, 1003), (2, 4099), (4, 3, 130)]:
    V = shape[-1]
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        s = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
        t = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
        labels = torch.randint(-1, min(V, 3), shape[:-1], device="cuda")
        for red in ("batchmean", "none"):
            losses = [
                fastkd.kd_loss(s, t, 2.0, reduction=red, labels=labels, ignore_index=-1),
                fastkd.kd_loss(s, t, 2.0, reduction=red, labels=labels, ignore_index=-1, alpha=0.3),
                fastkd.reverse_kl_loss(s, t, 2.0, reduction=red, labels=labels, ignore_index=-1),
                fastkd.jsd_loss(s, t, 0.3, 2.0, reduction=red, labels=labels, ignore_index=-1),
                fastkd.tvd_loss(s, t, 2.0, reduction=red, labels=labels, ignore_index=-1),
                fastkd.dkd_loss(s, t, labels, 1.0, 8.0, 4.0, reduction=red, ignore_index=-1),
            ]
            k = min(V, 5)
            vals, idx = t.detach().topk(k, dim=-1)
            losses.append(fastkd.topk_kd_loss(s, vals, idx, 2.0, reduction=red, labels=labels, ignore_index=-1))
            lp = torch.log_softmax(t.detach().float(), -1).topk(k, dim=-1)
            losses.append(fastkd.topk_kd_loss(s, lp.values, lp.indices, values_are="logprobs", tail="bucket",
                                              reduction=red, labels=labels, ignore_index=-1))
            sum(l.sum() for l in losses).backward()
    # unaligned rows (odd vocab, sliced view) take the scalar path
    base = torch.randn(6, 133, device="cuda")
    fastkd.kd_loss(base[:, 1:], base[:, :-1].flip(0))
    fastkd.jsd_loss(base[:, 1:], base[:, :-1].flip(0))
torch.cuda.synchronize()
print("sanitizer workload done")
PYEOF
for tool in memcheck racecheck; do
  echo "-- $tool" | tee -a "$REPORT"
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" /tmp/fastkd_sanitize.py 2>&1 | tail -5 | tee -a "$REPORT" || status=1
done

section "benchmark"
"$PY" -m fastkd.bench --json "${REPORT%.txt}.json" 2>/dev/null | tee -a "$REPORT" || status=1
"$PY" -m fastkd.bench --loss kd,jsd,reverse_kl,tvd --dtype bfloat16 --shapes 8192x128256,4096x32000 --no-compile 2>/dev/null | tee -a "$REPORT" || status=1

section "result: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
