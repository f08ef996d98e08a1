"""The report as text: a header (machine, threads, load, how times are summarized), one table per loss (printed
as soon as its last case is measured), and a footer (floors, column notes, warnings)."""

from __future__ import annotations

from typing import Dict, List

import torch

from fastkd.bench.cases import DTYPES, LLM_IGNORE_EVERY, LLM_TEMPERATURE, LOSSES, TOPK_K
from fastkd.bench.report import SPREAD_WARN, Report, Row, load_warning, warnings
from fastkd.bench.timing import size_str

SPREAD_HEAD = f"{'min-max ms':>17}"


def _spread(row: Row) -> str:
    """The min-max of the timed samples ("1 run" for a single one), '!' where the spread is too wide."""
    if row.timed_runs == 1 or len(row.times_ms) < 2:
        return f"{'(1 run)':>17}"
    low, high = min(row.times_ms), max(row.times_ms)
    return f"{f'{low:.2f}-{high:.2f}':>16}{'!' if row.noisy else ' '}"


def _peak(row: Row) -> str:
    return "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"


def _ratio(x, width: int = 6, digits: int = 2) -> str:
    return "" if x is None else f"{x:{width}.{digits}f}x"


def _not_ok(row: Row, width: int) -> str:
    """The line of a row that has no timing: skipped (and why) or failed (and how)."""
    return f"{row.shape:>{width}} {row.impl:>14}  " + (f"skipped ({row.skipped})" if row.skipped else f"failed: {row.error}")


def _fastkd_speedup(report: Report, loss: str, row: Row) -> str:
    """How many times faster fastkd is than this row at the same shape ('' for fastkd itself or without one)."""
    fast = report.find(loss, row.shape, "fastkd")
    return "" if row.impl == "fastkd" or fast is None or not fast.ok else f"{row.median_ms / fast.median_ms:8.2f}x"


def header(report: Report) -> List[str]:
    """The run's conditions: what ran where, threads, load, and how the columns summarize the samples."""
    fk = report.fastkd
    # build_info's summary, e.g. "CPU kernels: avx2; CUDA kernels for 9.0 compiled, no GPU visible"
    kernels = fk.get("summary") or (f"CPU kernels: {fk.get('cpu_isa')}" if fk.get("compiled")
                                    else "NOT compiled (the plain-PyTorch reference)")
    lines = [f"fastkd {fk.get('version')} | fwd+bwd | {report.device}: {report.device_name} | {report.dtype} | "
             f"T={report.temperature} | threads={report.threads} | torch {report.torch} | {kernels}"]
    load = report.load_avg_start
    load_text = "load average n/a" if not load else f"load average {load[0]:.2f} (1 min) on {report.cores} cores"
    lines.append(f"suite: {report.suite or 'explicit --loss'} | {report.date} | {load_text} | median of the timed "
                 f"runs; spread: min-max, '!' where (max - min) / median > {SPREAD_WARN:.0%}")
    warning = load_warning(report)
    return lines + ([warning] if warning else [])


def _logit_table(report: Report, loss: str) -> List[str]:
    lines = [f"{'shape':>14} {'impl':>14} {'median ms':>10} {SPREAD_HEAD} {'GB/s':>8} {'x floor':>8} {'fastkd x':>9} "
             f"{'peak MB':>9}"]
    for row in report.rows_of(loss):
        if not row.ok:
            lines.append(_not_ok(row, 14))
            continue
        speed = _fastkd_speedup(report, loss, row)
        lines.append(f"{row.shape:>14} {row.impl:>14} {row.median_ms:10.2f} {_spread(row)} {row.gbps:8.1f} "
                     f"{row.floor_ratio:8.2f} {speed:>9} {_peak(row):>9}")
    return lines


def _feature_table(report: Report, loss: str) -> List[str]:
    rows = report.rows_of(loss)
    if LOSSES[loss].sweep:
        lines = [f"{'N x D':>22} {'median ms':>10} {SPREAD_HEAD} {'runs':>4} {'x prev':>7} {'(N^3)':>7} "
                 f"{'peak MB':>9} {'x prev':>7} {'(N^2)':>7}"]
        prev = None
        for row in rows:
            if not row.ok:
                lines.append(f"{row.shape:>22}  failed: {row.error or row.skipped}")
                continue
            n = int(row.shape.split("x")[0])
            r3 = "" if prev is None else f"{(n / prev) ** 3:6.1f}x"
            r2 = "" if prev is None else f"{(n / prev) ** 2:6.1f}x"
            lines.append(f"{row.shape:>22} {row.median_ms:10.2f} {_spread(row)} {row.timed_runs or 0:>4} "
                         f"{_ratio(row.time_vs_prev):>7} {r3:>7} {_peak(row):>9} {_ratio(row.peak_vs_prev):>7} "
                         f"{r2:>7}")
            prev = n
        return lines
    lines = [f"{'shape':>22} {'impl':>14} {'median ms':>10} {SPREAD_HEAD} {'runs':>4} {'x floor':>8} "
             f"{'fastkd x':>9} {'peak MB':>9}"]
    for row in rows:
        if not row.ok:
            lines.append(_not_ok(row, 22))
            continue
        speed = _fastkd_speedup(report, loss, row)
        lines.append(f"{row.shape:>22} {row.impl:>14} {row.median_ms:10.2f} {_spread(row)} {row.timed_runs or 0:>4} "
                     f"{row.floor_ratio:8.2f} {speed:>9} {_peak(row):>9}")
    return lines


def _llm_table(report: Report, loss: str) -> List[str]:
    rows = report.rows_of(loss)
    sweep = LOSSES[loss].sweep
    head = f"{'tokens x H x V':>18} {'impl':>14} {'median ms':>10} {SPREAD_HEAD} {'runs':>4} {'tokens/s':>9}"
    lines = [head + (f" {'x prev':>7} {'peak MB':>9} {'x prev':>7} {'(tokens)':>8}" if sweep else
                     f" {'x floor':>8} {'vs eager':>9} {'peak MB':>9} {'/ eager':>8}")]
    prev_tokens: Dict[str, int] = {}  # sweep: each impl's previous token count
    for row in rows:
        if not row.ok:
            lines.append(f"{row.shape:>18} {row.impl:>14}  " +
                         (f"skipped ({row.skipped})" if row.skipped else f"failed: {row.error}"))
            continue
        start = (f"{row.shape:>18} {row.impl:>14} {row.median_ms:10.2f} {_spread(row)} {row.timed_runs or 0:>4} "
                 f"{row.tokens_per_s:9.0f}")
        if sweep:
            tokens = int(row.shape.split("x")[0])
            nr = f"{tokens / prev_tokens[row.impl]:6.1f}x" if row.impl in prev_tokens else ""
            prev_tokens[row.impl] = tokens
            lines.append(f"{start} {_ratio(row.time_vs_prev):>7} {_peak(row):>9} {_ratio(row.peak_vs_prev):>7} "
                         f"{nr:>8}")
            continue
        speed = "" if row.impl == "eager" else _ratio(row.speedup_vs_eager, 8)
        rel = "" if row.impl == "eager" or row.peak_vs_eager is None else f"{row.peak_vs_eager:8.3f}"
        lines.append(f"{start} {row.floor_ratio:8.2f} {speed:>9} {_peak(row):>9} {rel:>8}")
    if not sweep:
        for key, ms in report.floors_ms.items():
            if key.startswith(loss + " "):
                lines.append(f"{key.split()[1]:>18} {'GEMM floor':>14} {ms:10.2f}  "
                             "(h W^T, dlogits W, dlogits^T h alone)")
        lines += _llm_targets(report, rows)
    return lines


def _llm_targets(report: Report, rows: List[Row]) -> List[str]:
    """The acceptance figures for fastkd fused at each shape. CPU: peak extra memory at most 1/8 of the eager
    step's, time at most eager's. GPU: peak extra memory beyond the weight gradient (V x H in the weight's
    dtype) below 2.0 GB, and the teacher-head time at most Liger-Kernel's."""
    ok = {(r.shape, r.impl): r for r in rows if r.ok}
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        fused, eager = ok.get((shape, "fastkd fused")), ok.get((shape, "eager"))
        if fused is None or fused.peak_extra_mb is None:
            continue
        spawned = [r for (s, impl), r in ok.items() if s == shape and impl.startswith("fastkd tp")]
        if spawned:
            lines += [_tp_target(report, shape, fused, r) for r in spawned]
            continue
        if report.device == "cuda":
            _, h, v = (int(x) for x in shape.split("x"))
            itemsize = torch.tensor([], dtype=DTYPES[report.llm_dtype]).element_size()
            beyond = fused.peak_extra_mb * 2**20 - v * h * itemsize
            text = (f"peak {size_str(fused.peak_extra_mb * 2**20)}, beyond the weight gradient "
                    f"{size_str(max(0, beyond))} (< 2.0 GB: {beyond < 2e9})")
            head, liger = ok.get((shape, "fastkd head")), ok.get((shape, "liger"))
            if head is not None and liger is not None:
                text += (f"; fastkd head time / liger's {head.median_ms / liger.median_ms:.2f} "
                         f"(<= 1: {head.median_ms <= liger.median_ms})")
        elif eager is not None and fused.peak_vs_eager is not None:
            text = (f"peak / eager's {fused.peak_vs_eager:.3f} (<= 1/8: {fused.peak_vs_eager <= 0.125}); time / "
                    f"eager's {fused.median_ms / eager.median_ms:.2f} (<= 1: {fused.median_ms <= eager.median_ms})")
        else:
            continue
        lines.append(f"{shape:>18} {'target':>14}  fastkd fused: {text}")
    return lines


def _tp_target(report: Report, shape: str, fused: Row, row: Row) -> str:
    """The vocabulary-parallel row against the single-process fused head: its largest rank's peak extra memory
    over the single-process head's weight-gradient term (the V x H float32 accumulator; float64 for float64),
    and its time over the single-process time."""
    _, h, v = (int(x) for x in shape.split("x"))
    grad_bytes = v * h * (8 if report.llm_dtype == "float64" else 4)
    world = int(row.impl[len("fastkd tp"):] or 1)
    text = f"{row.impl}: time / fastkd fused's {row.median_ms / fused.median_ms:.2f}"
    if row.peak_extra_mb is not None:
        peak = row.peak_extra_mb * 2**20
        text += (f"; per-rank peak {size_str(peak)} = {peak / grad_bytes:.2f} x the single-process weight gradient "
                 f"({size_str(grad_bytes)}; its 1/{world}: {size_str(grad_bytes / world)}), single-process peak "
                 f"{size_str(fused.peak_extra_mb * 2**20)}")
    return f"{shape:>18} {'target':>14}  {text}"


def loss_table(report: Report, loss: str) -> str:
    """One loss's table: its title, then a row per implementation and shape."""
    spec = LOSSES[loss]
    title = f"== {spec.title}"
    if spec.kind == "llm":
        title += f" | {report.llm_dtype}, T={LLM_TEMPERATURE:g}, 1 token in {LLM_IGNORE_EVERY} ignored"
    body = {"logits": _logit_table, "features": _feature_table, "llm": _llm_table}[spec.kind](report, loss)
    return "\n".join(["", title] + body)


def footer(report: Report) -> List[str]:
    """Floors, what the columns mean, what was skipped and why, the compilation times and the warnings."""
    lines = [""]
    if report.floors_ms:
        lines.append("floor (ms): " + ", ".join(f"{k}: {v:.2f}" for k, v in report.floors_ms.items()))
    for key, b in report.teacher_bytes.items():
        lines.append(f"teacher input, {key}: dense logits {b['dense_logits'] / 2**20:.1f} MB vs top-{TOPK_K} "
                     f"values+indices {b['topk_values_and_indices'] / 2**20:.2f} MB "
                     f"({b['dense_logits'] / b['topk_values_and_indices']:.0f}x smaller)")
    kinds = {LOSSES[r.loss].kind for r in report.rows if r.loss in LOSSES}
    if "logits" in kinds:
        lines.append("'fastkd x' = how many times faster fastkd is than that row; 'x floor' = time / memory floor "
                     "(dense: clone one N x V tensor + read another; top-k: clone the student).")
    if "features" in kinds:
        lines.append("relation losses: shapes are [N, ...] features (STUDENT:TEACHER when they differ), teacher "
                     "without grad; 'x floor' = time / (GEMM floor: student + teacher Gram and the gradient GEMM, "
                     "torch.mm; AT: clone the student map + read the teacher map); 'runs' = timed calls (1: a "
                     "call slower than the --slow-s limit, timed once without warmup).")
    if "llm" in kinds:
        lines.append("LLM head: tokens x hidden x vocab; a step = fwd+bwd to the gradients of the hidden states and "
                     "the lm_head weight; peak MB = beyond the inputs (hidden states, weights, teacher logits), "
                     "gradients included; 'vs eager' = eager time / this time; 'x floor' = time / the three GEMMs "
                     "alone; 'runs' = timed calls after a warmup (1 in a slow sweep: its first call); head "
                     "rows (GPU) take the teacher as hidden states + lm_head, as Liger-Kernel does.")
    if report.memory_budget_gb is not None and any(r.skipped and r.skipped.startswith("needs ~") for r in report.rows):
        lines.append(f"skipped: eager / torch.compile RKD and unfused LLM-head steps whose estimated memory exceeds "
                     f"the budget ({size_str(report.memory_budget_gb * 1e9)}: --mem-fraction of the "
                     f"{'GPU memory' if report.device == 'cuda' else 'RAM'}, at most 90% of what is free).")
    if kinds:
        lines.append("peak MB: a step's extra memory, taken in its first call after any compilation, untimed (CPU: "
                     "resident-set growth after the heap's free pages are handed back; GPU: the allocator's peak).")
    compiled = [r.compile_s for r in report.rows if r.compile_s is not None]
    if compiled:
        lines.append(f"torch.compile: {len(compiled)} first calls (the compilation, never timed) took "
                     f"{sum(compiled):.0f} s in all.")
    if report.elapsed_s is not None:
        lines.append(f"measured in {report.elapsed_s:.0f} s" + (" (PARTIAL: interrupted)" if report.partial else ""))
    return lines + warnings(report)


def format_report(report: Report) -> str:
    """The whole report: the header, every loss's table, the footer."""
    losses = dict.fromkeys(r.loss for r in report.rows if r.loss in LOSSES)
    return "\n".join(header(report) + [loss_table(report, loss) for loss in losses] + footer(report))
