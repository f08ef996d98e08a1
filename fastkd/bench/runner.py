"""Runs the cases: for each, its floor, then every implementation's fwd+bwd on the same inputs (time, spread,
peak extra memory), rows appended to the report as they are measured, a callback when a loss's last case is
done (its table can print at once) and a progress line on stderr with the elapsed time and an estimate of
what is left. A KeyboardInterrupt keeps every row measured so far in the report, then propagates.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch

from fastkd.bench import floors, tp
from fastkd.bench.cases import (LLM_TEMPERATURE, LOSSES, Case, Step, estimated_bytes, feature_inputs,
                                implementations, llm_inputs, logit_inputs)
from fastkd.bench.liger import error_text
from fastkd.bench.report import Report, Row
from fastkd.bench.timing import first_call_s, memory_budget_bytes, size_str, time_with_peak

MEM_FRACTION = 0.6  # eager / compiled RKD and the unfused LLM-head baselines only where their estimated memory
                    # fits this fraction of RAM / GPU memory
LLM_SLOW_MS = 1000.0  # an LLM-head first call slower than this is followed by LLM_SLOW_REPEATS timed calls at most
LLM_SLOW_REPEATS = {False: 2, True: 0}  # by sweep; 0: the first call is the one timed run
COMPILED = ("torch.compile", "liger chunked")  # implementations whose first call compiles
COMPILE_PRIOR_S = 10.0  # a compilation's duration until one has been measured (cold cache, 2-core CPU: 5-30 s)


@dataclass
class Options:
    """How to measure. ``llm_dtype``: the LLM-head cases' own dtype; ``slow_ms``: relation losses, a call
    slower than this is timed once without warmup."""

    device: str
    dtype: torch.dtype
    llm_dtype: torch.dtype
    temperature: float = 4.0
    repeats: int = 5
    warmup: int = 2
    compile_baseline: bool = True
    slow_compile: bool = False
    slow_ms: float = 5000.0
    mem_fraction: float = MEM_FRACTION
    quiet: bool = False


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class Progress:
    """One stderr line per step: ``[step/total | elapsed m:ss | ~m:ss left] message``. What is left is estimated
    from the mean duration of the finished steps of each kind (compilations, floors, timed runs); a kind not yet
    seen counts as the mean of all finished steps, a compilation as COMPILE_PRIOR_S."""

    def __init__(self, kinds: List[str], quiet: bool) -> None:
        self.kinds = kinds
        self.quiet = quiet
        self.start = time.perf_counter()
        self.durations: Dict[str, List[float]] = {}
        self.index = 0
        self.last: Optional[float] = None

    def estimate_left(self) -> Optional[float]:
        done = [d for ds in self.durations.values() for d in ds]
        if not done:
            return None
        prior = {"compile": COMPILE_PRIOR_S}
        overall = statistics.mean(done)
        return sum(statistics.mean(self.durations.get(k, [prior.get(k, overall)])) for k in self.kinds[self.index - 1:])

    def step(self, msg: str) -> None:
        now = time.perf_counter()
        if self.last is not None and 0 < self.index <= len(self.kinds):
            self.durations.setdefault(self.kinds[self.index - 1], []).append(now - self.last)
        self.last = now
        self.index += 1
        if self.quiet:
            return
        left = self.estimate_left()
        eta = "" if left is None else f" | ~{_clock(left)} left"
        print(f"[{self.index}/{len(self.kinds)} | {_clock(now - self.start)} elapsed{eta}] {msg}", file=sys.stderr,
              flush=True)


def _kind(impl: str) -> str:
    return "compile" if impl in COMPILED else "run"


def _has_floor(case: Case) -> bool:
    return not LOSSES[case.loss].sweep


def _floor_ms(report: Report, case: Case, dtype: torch.dtype, opts: Options, progress: Progress) -> Optional[float]:
    """Measures and records the case's floor (None for the sweeps)."""
    spec = LOSSES[case.loss]
    if not _has_floor(case):
        return None
    progress.step(f"{case.loss} {case.label}: " + {"logits": "memory floor", "features": "floor",
                                                   "llm": "GEMM floor"}[spec.kind])
    few = max(3, opts.repeats // 2)
    if spec.kind == "logits":
        floor = floors.logits_floor_ms(*case.shape, dtype, opts.device, few, reads_teacher=case.loss != "topk")
    elif spec.kind == "features":
        floor = floors.relation_floor_ms(case.loss, case.shape, case.teacher, dtype, opts.device, few)
    else:
        floor = floors.llm_floor_ms(*case.shape, dtype, opts.device, opts.repeats, opts.warmup, LLM_SLOW_MS,
                                    LLM_SLOW_REPEATS[False])
    report.floors_ms[f"{case.loss} {case.label}"] = floor
    return floor


def _bind_inputs(case: Case, dtype: torch.dtype, opts: Options, teacher_head: bool,
                 report: Report) -> Callable[[Step], Callable[[], None]]:
    """Makes the case's inputs once; returns what binds an implementation to them as one fwd+bwd step (the
    gradients are dropped after each call)."""
    spec = LOSSES[case.loss]
    if spec.kind == "llm":
        hidden, weight, inp = llm_inputs(*case.shape, dtype, opts.device, teacher_head)

        def bind_llm(fn: Step) -> Callable[[], None]:
            def llm_step() -> None:
                try:
                    fn(hidden, weight, inp, LLM_TEMPERATURE).backward()
                finally:
                    hidden.grad = weight.grad = None

            return llm_step

        return bind_llm
    if spec.kind == "logits":
        s, inp = logit_inputs(case.loss, *case.shape, dtype, opts.device)
        if case.loss == "topk":
            n, v = case.shape
            report.teacher_bytes[f"{case.loss} {case.label}"] = {
                "dense_logits": n * v * s.element_size(),
                "topk_values_and_indices": inp[2].numel() * inp[2].element_size() + inp[3].numel() * 8}
        temperature = opts.temperature
    else:
        s, inp = feature_inputs(case.shape, case.teacher, dtype, opts.device)
        temperature = 0.0

    def bind(fn: Step) -> Callable[[], None]:
        def one_step() -> None:
            try:
                fn(s, inp, temperature).backward()
            finally:
                s.grad = None

        return one_step

    return bind


def _measure(case: Case, name: str, step: Callable[[], None], opts: Options, floor: Optional[float],
             itemsize: int) -> Row:
    """Times one implementation of the case and takes its peak extra memory (:func:`time_with_peak`): a call
    slower than its kind's limit (relation losses: --slow-s; the LLM head: LLM_SLOW_MS) is timed once (the LLM
    head: LLM_SLOW_REPEATS more calls follow)."""
    spec = LOSSES[case.loss]
    compiled = name in COMPILED
    compile_s = first_call_s(step, opts.device) if compiled else None
    if spec.kind == "llm" and opts.device == "cuda" and not compiled:
        step()  # cuBLAS workspaces and Triton autotuning
    slow_ms, slow_repeats = {"logits": (math.inf, 0), "features": (opts.slow_ms, 0),
                             "llm": (LLM_SLOW_MS, LLM_SLOW_REPEATS[spec.sweep])}[spec.kind]
    times, peak = time_with_peak(step, opts.device, opts.repeats, max(0, opts.warmup - compiled), slow_ms,
                                 slow_repeats)  # the compiling call was a warmup too
    med = statistics.median(times)
    extra: Dict[str, float] = {}
    if spec.kind == "logits":
        dense = case.loss != "topk"
        extra["gbps"] = (3 if dense else 2) * math.prod(case.shape) * itemsize / (med * 1e-3) / 1e9
    if spec.kind == "llm":
        extra["tokens_per_s"] = case.shape[0] / (med * 1e-3)
    return Row.measured(case.loss, case.label, name, times, floor_ratio=float("nan") if floor is None else med / floor,
                        peak_extra_mb=None if peak is None else peak / 2**20, compile_s=compile_s, **extra)


def _measure_spawned(case: Case, name: str, impl: "tp.SpawnedHead", opts: Options, floor: Optional[float]) -> Row:
    """The vocabulary-parallel head in spawned processes (:func:`tp.measure`): the slowest rank's times, the
    largest rank's peak extra memory."""
    dtype_name = str(opts.llm_dtype).replace("torch.", "")
    out = tp.measure(impl, case.shape, dtype_name, opts.repeats, opts.warmup, LLM_SLOW_MS, LLM_SLOW_REPEATS[False])
    times, peaks = out["times"], out["peaks"]
    med = statistics.median(times)
    peak = None if any(p is None for p in peaks) else max(peaks)
    return Row.measured(case.loss, case.label, name, times, floor_ratio=float("nan") if floor is None else med / floor,
                        peak_extra_mb=None if peak is None else peak / 2**20, tokens_per_s=case.shape[0] / (med * 1e-3))


def _relate(results: Dict[str, Row], kind: str) -> None:
    """Each measured row's speedups over eager and torch.compile (LLM head: its peak memory / eager's)."""
    ok = {name: r for name, r in results.items() if r.ok}
    for row in ok.values():
        if "eager" in ok:
            row.speedup_vs_eager = ok["eager"].median_ms / row.median_ms
        if "torch.compile" in ok:
            row.speedup_vs_compile = ok["torch.compile"].median_ms / row.median_ms
        if kind == "llm" and "eager" in ok and row.peak_extra_mb is not None and ok["eager"].peak_extra_mb:
            row.peak_vs_eager = row.peak_extra_mb / ok["eager"].peak_extra_mb


def _append(report: Report, rows: List[Row]) -> None:
    """Appends a case's rows; in a sweep, each row's ratios to the same implementation at the previous point."""
    for row in rows:
        if LOSSES[row.loss].sweep and row.ok:
            prev = next((r for r in reversed(report.rows) if r.loss == row.loss and r.impl == row.impl), None)
            if prev is not None and prev.ok:
                row.time_vs_prev = row.median_ms / prev.median_ms
                if row.peak_extra_mb and prev.peak_extra_mb:
                    row.peak_vs_prev = row.peak_extra_mb / prev.peak_extra_mb
        report.rows.append(row)


def _run_case(report: Report, case: Case, impls: Dict[str, Union[Step, str]], opts: Options,
              progress: Progress) -> None:
    spec = LOSSES[case.loss]
    dtype = opts.llm_dtype if spec.kind == "llm" else opts.dtype
    itemsize = torch.tensor([], dtype=dtype).element_size()
    key = f"{case.loss} {case.label}"
    floor = _floor_ms(report, case, dtype, opts, progress)
    bind = _bind_inputs(case, dtype, opts, "fastkd head" in impls, report)
    results: Dict[str, Row] = {}
    try:
        for name, fn in impls.items():
            need = None if isinstance(fn, str) else estimated_bytes(case, name, itemsize)
            budget = None if need is None else memory_budget_bytes(opts.device, opts.mem_fraction)
            if isinstance(fn, tp.SpawnedHead):
                progress.step(f"{key}: {name} ({fn.world} gloo processes)")
                try:
                    results[name] = _measure_spawned(case, name, fn, opts, floor)
                except Exception as e:  # noqa: BLE001 - a failed spawn is a failed row
                    results[name] = Row.failed(case.loss, case.label, name, error=error_text(e))
            elif isinstance(fn, str):
                progress.step(f"{key}: {name} skipped ({fn})")
                results[name] = Row.failed(case.loss, case.label, name, skipped=fn)
            elif need is not None and budget is not None and need > budget:
                progress.step(f"{key}: {name} skipped (needs ~{size_str(need)}, budget {size_str(budget)})")
                results[name] = Row.failed(case.loss, case.label, name, skipped=f"needs ~{size_str(need)}")
            else:
                progress.step(f"{key}: {name}")
                try:
                    results[name] = _measure(case, name, bind(fn), opts, floor, itemsize)
                except Exception as e:  # e.g. out of memory, or a Liger-Kernel version with another API
                    results[name] = Row.failed(case.loss, case.label, name, error=error_text(e))
                    gc.collect()
                    if opts.device == "cuda":
                        torch.cuda.empty_cache()
    finally:  # on Ctrl-C too: what was measured stays
        _relate(results, spec.kind)
        _append(report, list(results.values()))
        report.note_load()
        del bind
        _collect_and_freeze()


def _collect_and_freeze() -> None:
    """Collects the garbage, then moves every surviving object to the collector's permanent generation: the
    collections that start each peak-memory window then scan only what the run created since (a full
    collection over torch's and inductor's objects takes ~0.2-0.3 s, dozens of times per run). Frozen objects
    are still freed by reference counting; :func:`run_cases` unfreezes them when it ends."""
    gc.collect()
    gc.freeze()


def run_cases(report: Report, cases: List[Case], opts: Options,
              on_loss_done: Optional[Callable[[str], None]] = None) -> Report:
    """Measures every case into ``report`` (rows appended as they are measured); ``on_loss_done(loss)`` is
    called after the last case of each loss. Returns the report, with ``elapsed_s`` set."""
    start = time.perf_counter()
    plans = [(case, implementations(case.loss, opts.device, opts.compile_baseline, opts.slow_compile))
             for case in cases]
    if any(LOSSES[c.loss].kind == "llm" for c in cases):
        report.llm_dtype = str(opts.llm_dtype).replace("torch.", "")
    if any(estimated_bytes(c, "eager", 1) is not None for c in cases):
        budget = memory_budget_bytes(opts.device, opts.mem_fraction)
        report.memory_budget_gb = None if budget is None else budget / 1e9
    kinds = []
    for case, impls in plans:
        kinds += ["floor"] * _has_floor(case) + [_kind(name) for name in impls]
    progress = Progress(kinds, opts.quiet)
    _collect_and_freeze()
    try:
        for i, (case, impls) in enumerate(plans):
            _run_case(report, case, impls, opts, progress)
            if on_loss_done is not None and (i + 1 == len(plans) or plans[i + 1][0].loss != case.loss):
                on_loss_done(case.loss)
    finally:
        gc.unfreeze()
        report.elapsed_s = time.perf_counter() - start
    return report
