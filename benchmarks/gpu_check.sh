#!/usr/bin/env bash
# One-command GPU check for fastkd, for a machine with an NVIDIA GPU and no network:
#   bash benchmarks/gpu_check.sh [REPORT_PATH]
# 1. builds fastkd with CUDA against the torch installed there (no build isolation, nothing downloaded),
# 2. runs the whole test suite (every test runs on cpu and cuda),
# 3. runs compute-sanitizer memcheck and racecheck over the kernels on small inputs,
# 4. runs the benchmark (eager, torch.compile, Liger-Kernel if installed, fastkd; the logit losses, the
#    relation / feature losses RKD, SP, PKT, CC, AT with the RKD N sweep, and the LLM head: fused linear KD at
#    8192 x 4096 x 128256 bf16 against Liger-Kernel's fused linear JSD, with its token sweep),
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
# Liger-Kernel is benchmarked when importable (pip install liger-kernel beforehand; nothing is downloaded here)
"$PY" -c "from importlib.metadata import version; print('liger-kernel', version('liger-kernel'))" 2>/dev/null | tee -a "$REPORT" || echo "liger-kernel not installed: no Liger-Kernel rows" | tee -a "$REPORT"

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
# relation / feature losses (issue 5): N = 0, 1, 2 and odd sizes, student width != teacher width, mixed
# dtypes, teacher gradients (SP, PKT, CC, AT), every weight / kernel / reduction / mode, strided input
for n, d_s, d_t in [(0, 3, 5), (1, 3, 3), (2, 5, 7), (7, 33, 16), (33, 130, 257), (70, 1, 4)]:
    for ds, dt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16), (torch.float64, torch.float64),
                   (torch.float32, torch.bfloat16)]:
        fs = torch.randn(n, d_s, device="cuda", dtype=ds, requires_grad=True)
        ft = torch.randn(n, d_t, device="cuda", dtype=dt, requires_grad=True)
        losses = [
            fastkd.rkd_loss(fs, ft), fastkd.rkd_loss(fs, ft, 0.0, 1.0), fastkd.rkd_loss(fs, ft, 1.0, 0.0),
            fastkd.sp_loss(fs, ft), fastkd.sp_loss(fs, ft, reduction="sum"), fastkd.pkt_loss(fs, ft),
            fastkd.cc_loss(fs, ft), fastkd.cc_loss(fs, ft, "bilinear", reduction="sum"),
            fastkd.cc_loss(fs, ft, max_p=4), fastkd.rkd_loss(fs.t().contiguous().t(), ft),
        ]
        sum(l.float() for l in losses).backward()
# RKD: exact duplicates (both sides, student only) and a large common offset take the flagged-pair paths
for n, d in [(9, 17), (64, 300)]:
    x = torch.randn(n, d, device="cuda")
    x[n // 2:] = x[0]
    y = torch.randn(n, d, device="cuda")
    for fs, ft in [(x, x * 2), (x, y), (x + 100.0, y - 50.0)]:
        fs = fs.clone().requires_grad_(True)
        fastkd.rkd_loss(fs, ft).backward()
# AT: code / paper, p = 2 and 3, pooling either way, 3-D maps, different channel counts, lists with weights
for shape_s, shape_t in [((4, 3, 8, 8), (4, 5, 4, 4)), ((4, 6, 4, 4), (4, 2, 8, 8)), ((5, 3, 7, 7), (5, 3, 7, 7)),
                         ((3, 2, 11), (3, 4, 11)), ((0, 2, 4, 4), (0, 2, 4, 4))]:
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        gs = torch.randn(shape_s, device="cuda", dtype=dt, requires_grad=True)
        gt = torch.randn(shape_t, device="cuda", dtype=dt, requires_grad=True)
        losses = [fastkd.at_loss(gs, gt), fastkd.at_loss(gs, gt, 3.0), fastkd.at_loss(gs, gt, mode="paper"),
                  fastkd.at_loss([gs, gs], [gt, gt], weights=[0.5, 2.0]), fastkd.sp_loss([gs, gs], [gt, gt], weights=[1.0, 3.0])]
        sum(l.float() for l in losses).backward()
# fused linear head (issue 6): the response / top-k kernels writing their gradient in place over the logits
# chunk, every teacher kind, a padded teacher vocabulary, the fused CE, reduction "none" (recomputed in
# backward), bf16 (the fp32 weight-gradient accumulation of bf16 GEMMs) and fp32, odd sizes
for dt in (torch.float32, torch.bfloat16):
    h = torch.randn(2, 13, 24, device="cuda", dtype=dt, requires_grad=True)
    w = (torch.randn(301, 24, device="cuda", dtype=dt) / 5).requires_grad_(True)
    b = torch.randn(301, device="cuda", dtype=dt, requires_grad=True)
    th = torch.randn(2, 13, 20, device="cuda", dtype=dt)
    tw = torch.randn(290, 20, device="cuda", dtype=dt) / 5
    y = torch.randint(-1, 301, (2, 13), device="cuda")
    vals, idx = (h @ w.t()).detach().topk(7, dim=-1)
    for red in ("batchmean", "none"):
        losses = [
            fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(th, tw), student_bias=b, loss="jsd", beta=0.3,
                                        labels=y, ignore_index=-1, hard_label_weight=0.5, reduction=red, chunk_size=5),
            fastkd.fused_linear_kd_loss(h, w, th @ tw.t(), labels=y, ignore_index=-1, reduction=red, chunk_size=4),
            fastkd.fused_linear_kd_loss(h, w[:290], th @ tw.t(), loss="reverse_kl", reduction=red, chunk_size=7),
            fastkd.fused_linear_kd_loss(h, w, fastkd.TopKTeacher(vals, idx), labels=y, ignore_index=-1,
                                        hard_label_weight=0.2, soft_weight=0.8, reduction=red, chunk_size=6),
        ]
        sum(l.float().sum() for l in losses).backward()
torch.cuda.synchronize()
print("sanitizer workload done")
PYEOF
for tool in memcheck racecheck; do
  echo "-- $tool" | tee -a "$REPORT"
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" /tmp/fastkd_sanitize.py 2>&1 | tail -5 | tee -a "$REPORT" || status=1
done

section "benchmark"
# eager baselines and fastkd compute the same relation and LLM-head losses on this device (fast; before the long run)
"$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_relation.py benchmarks/test_bench_fused_linear.py -k test_same_loss 2>&1 | tail -3 | tee -a "$REPORT" || status=1
# every loss (logit losses, RKD / RKD N sweep / SP / PKT / CC / AT, then the LLM head and its token sweep, bf16)
# on its default CUDA shapes
"$PY" -m fastkd.bench --json "${REPORT%.txt}.json" 2>/dev/null | tee -a "$REPORT" || status=1
"$PY" -m fastkd.bench --loss kd,jsd,reverse_kl,tvd --dtype bfloat16 --shapes 8192x128256,4096x32000 --no-compile 2>/dev/null | tee -a "$REPORT" || status=1

section "result: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
