"""Measurement primitives: wall-clock (CPU) or CUDA-event (GPU) times of a step, peak extra memory (CUDA
allocator, or the process's resident-set high-water mark on Linux), and the memory budget that decides
which baselines are too big to run.

Policies (see the package docs): a compiled step's first call, its compilation, is timed on its own and never
counted; the next call is the peak-memory window and a warmup, or, when slower than ``slow_ms``, the one timed
run.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Callable, List, Optional, Tuple

import torch

Thunk = Callable[[], None]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Thunk, device: str, repeats: int, warmup: int) -> List[float]:
    """``warmup`` untimed calls, then the times in ms of ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def first_call_s(fn: Thunk, device: str) -> float:
    """Runs fn once (a compiled step's compilation) and returns how long it took in seconds."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _rss_field(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_reset() -> Optional[int]:
    """Resets the process's peak RSS (Linux) and returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_field("VmRSS")
    except OSError:
        return None


def _malloc_trim() -> None:
    """Hands the C heap's free pages back to the OS (glibc), so that the next call's resident-set growth
    counts every page it touches, not only those beyond what earlier calls left in the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_begin(device: str, trim: bool = False) -> Optional[int]:
    """Starts a peak-memory window: the baseline (allocated CUDA bytes, or the RSS after resetting its
    high-water mark), None where it cannot be measured."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return base
    if trim:
        _malloc_trim()
    return _peak_rss_reset()


def peak_end(device: str, base: Optional[int]) -> Optional[int]:
    """Peak extra bytes since :func:`peak_begin`."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if base is None:
        return None
    peak = _rss_field("VmHWM")
    return None if peak is None else max(0, peak - base)


def time_with_peak(fn: Thunk, device: str, repeats: int, warmup: int, slow_ms: float = math.inf,
                   slow_repeats: int = 0) -> Tuple[List[float], Optional[int]]:
    """Times one step and takes its peak extra memory. The first call is the peak-memory window (after the C
    heap's free pages are handed back, so that every page it touches counts) and the first warmup; when it
    took longer than ``slow_ms``, at most ``slow_repeats`` timed calls follow (with 0, that call is the one
    timed run: the eager RKD takes ~30 s per call at N = 512 on a 2-core CPU), else ``warmup - 1`` more
    warmups and ``repeats`` timed calls. Returns (times in ms, peak extra bytes or None)."""
    base = peak_begin(device, trim=True)
    first = time_ms(fn, device, 1, 0)[0]
    peak = peak_end(device, base)
    if first > slow_ms:
        return (time_ms(fn, device, min(repeats, slow_repeats), 0) if slow_repeats else [first]), peak
    return time_ms(fn, device, repeats, max(0, warmup - 1)), peak


def memory_budget_bytes(device: str, fraction: float) -> Optional[int]:
    """``fraction`` of the machine's RAM (of the GPU's memory), and at most 90% of what is free right now."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # memory cached by the allocator from earlier cases is free for this one
        free, total = torch.cuda.mem_get_info()
        return int(min(fraction * total, 0.9 * free))
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, val = line.split(":", 1)
                info[key] = int(val.split()[0]) * 1024
        return int(min(fraction * info["MemTotal"], 0.9 * info.get("MemAvailable", info["MemTotal"])))
    except (OSError, KeyError, ValueError):
        return None


def size_str(nbytes: float) -> str:
    """Bytes as "12 GB", "3.2 GB" or "800 MB"."""
    if nbytes >= 10e9:
        return f"{nbytes / 1e9:.0f} GB"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 0.1e9 else f"{nbytes / 1e6:.0f} MB"
