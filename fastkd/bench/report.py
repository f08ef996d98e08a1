"""A benchmark run as data: its rows (one implementation of one case), the machine and the conditions it ran
under (threads, load average), its JSON form, and the warnings it deserves.

Spread: every row keeps its timed samples; its spread is (max - min) / median. A row whose spread exceeds
:data:`SPREAD_WARN` is marked as noisy (its median is not to be trusted to better than that), and the run
warns once. The run also warns when the 1-minute load average, at its start or at any case, exceeded the
number of cores this process may use: other processes then take turns with the benchmark's threads, and on
the CPU small shapes time as multiples of the OpenMP pool's scheduling quantum (~8 ms).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch

import fastkd

SCHEMA_VERSION = 2  # 1: the single-module fastkd.bench (no spread, no run conditions)
SPREAD_WARN = 0.25  # (max - min) / median above this marks a row as noisy


@dataclass
class Row:
    """One implementation of one case. Times in ms (the median of ``times_ms``); NaN where it failed or was
    skipped (``error`` / ``skipped`` say why)."""

    loss: str
    shape: str
    impl: str
    median_ms: float
    min_ms: float
    gbps: float
    floor_ratio: float
    speedup_vs_eager: Optional[float] = None  # eager's median / this row's
    speedup_vs_compile: Optional[float] = None  # torch.compile's median / this row's
    peak_extra_mb: Optional[float] = None
    error: Optional[str] = None
    skipped: Optional[str] = None  # e.g. "needs ~51 GB": the eager RKD beyond the memory budget
    timed_runs: Optional[int] = None
    time_vs_prev: Optional[float] = None  # sweeps: ratio to the previous point
    peak_vs_prev: Optional[float] = None
    tokens_per_s: Optional[float] = None  # LLM head
    peak_vs_eager: Optional[float] = None  # LLM head: peak extra memory / the eager step's
    max_ms: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    compile_s: Optional[float] = None  # torch.compile: the first call (the compilation), never timed

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None

    @property
    def spread(self) -> Optional[float]:
        """(max - min) / median of the timed samples; None with fewer than two."""
        if not self.ok or len(self.times_ms) < 2 or not self.median_ms > 0:
            return None
        return (max(self.times_ms) - min(self.times_ms)) / self.median_ms

    @property
    def noisy(self) -> bool:
        return self.spread is not None and self.spread > SPREAD_WARN

    @classmethod
    def measured(cls, loss: str, shape: str, impl: str, times: List[float], **kw: Any) -> "Row":
        """A row from its timed samples (gbps and floor_ratio NaN unless given)."""
        times = list(times)
        kw.setdefault("gbps", float("nan"))
        kw.setdefault("floor_ratio", float("nan"))
        return cls(loss, shape, impl, statistics.median(times), min(times), max_ms=max(times), times_ms=times,
                   timed_runs=len(times), **kw)

    @classmethod
    def failed(cls, loss: str, shape: str, impl: str, **kw: Any) -> "Row":
        """A row that was not measured (``error=`` or ``skipped=``)."""
        nan = float("nan")
        return cls(loss, shape, impl, nan, nan, nan, nan, **kw)


@dataclass
class Report:
    """A run: its conditions and rows. ``partial``: interrupted (Ctrl-C) before its last case."""

    device: str
    device_name: str
    dtype: str
    temperature: float
    threads: int
    torch: str
    fastkd: Dict = field(default_factory=dict)
    floors_ms: Dict[str, float] = field(default_factory=dict)
    teacher_bytes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)
    memory_budget_gb: Optional[float] = None  # eager / compiled RKD, unfused LLM-head steps above it are skipped
    llm_dtype: Optional[str] = None  # LLM head: its own default dtype (bfloat16 on a GPU)
    schema_version: int = SCHEMA_VERSION
    suite: Optional[str] = None  # "quick", "full", or None for an explicit --loss
    date: str = ""
    command: List[str] = field(default_factory=list)
    cores: Optional[int] = None
    load_avg_start: Optional[List[float]] = None  # 1, 5 and 15 minutes
    load_avg_max: Optional[float] = None  # the highest 1-minute load average seen at any case
    partial: bool = False
    elapsed_s: Optional[float] = None

    def rows_of(self, loss: str, shape: Optional[str] = None) -> List[Row]:
        return [r for r in self.rows if r.loss == loss and (shape is None or r.shape == shape)]

    def find(self, loss: str, shape: str, impl: str) -> Optional[Row]:
        return next((r for r in self.rows if (r.loss, r.shape, r.impl) == (loss, shape, impl)), None)

    def note_load(self) -> None:
        """Takes the current 1-minute load average into ``load_avg_max``."""
        load = load_average()
        if load is not None:
            self.load_avg_max = max(load[0], self.load_avg_max or 0.0)

    @property
    def overloaded(self) -> bool:
        """The 1-minute load average exceeded the usable cores at the start or at some case."""
        if not self.cores:
            return False
        loads = [x for x in (self.load_avg_start[0] if self.load_avg_start else None, self.load_avg_max)
                 if x is not None]
        return any(x > self.cores for x in loads)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo) where the OS says it."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_report(device: str, dtype: torch.dtype, temperature: float, suite: Optional[str],
               command: List[str]) -> Report:
    """An empty report of a run starting now, with the machine and its conditions."""
    return Report(device=device, device_name=machine_name(device), dtype=str(dtype).replace("torch.", ""),
                  temperature=temperature, threads=torch.get_num_threads(), torch=torch.__version__,
                  fastkd=fastkd.build_info(), suite=suite, date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  command=list(command), cores=usable_cores(), load_avg_start=load_average())


def load_warning(report: Report) -> Optional[str]:
    """The warning for a run whose 1-minute load average exceeded its usable cores, or None."""
    if not report.overloaded:
        return None
    start = report.load_avg_start[0] if report.load_avg_start else float("nan")
    return (f"WARNING: 1-minute load average {start:.2f} at the start, {report.load_avg_max or start:.2f} at most, "
            f"above the {report.cores} usable cores: other processes share them, small shapes time as noise "
            "(try OMP_NUM_THREADS=1 / --threads 1, or a quiet machine; the average lags by a minute or so, so a "
            "build that just ended still counts at the start).")


def spread_warning(report: Report) -> Optional[str]:
    """The one warning for the rows whose spread is too wide to trust, or None."""
    noisy = [r for r in report.rows if r.noisy]
    if not noisy:
        return None
    return (f"WARNING: {len(noisy)} row(s) marked '!' have a spread (max - min) / median above {SPREAD_WARN:.0%}: "
            "their medians are not to be trusted to better than that.")


def warnings(report: Report) -> List[str]:
    """Why the run's figures may not be trusted: an overloaded machine, noisy rows."""
    return [w for w in (load_warning(report), spread_warning(report)) if w]


def to_json(report: Report) -> str:
    """The report as JSON (NaN written as NaN, as Python's json module reads it back)."""
    return json.dumps(asdict(report), indent=2, default=str)


def save_json(report: Report, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_json(report) + "\n")


def from_dict(data: Dict[str, Any]) -> Report:
    """A report from its JSON form (of this schema or the first: missing fields take their defaults, unknown
    ones are dropped)."""
    row_keys = {f.name for f in fields(Row)}
    report_keys = {f.name for f in fields(Report)} - {"rows"}
    report = Report(**{k: v for k, v in data.items() if k in report_keys})
    report.rows = [Row(**{k: v for k, v in r.items() if k in row_keys}) for r in data.get("rows", [])]
    if "schema_version" not in data:
        report.schema_version = 1
    return report


def load_json(path: str) -> Report:
    with open(path) as f:
        return from_dict(json.load(f))
