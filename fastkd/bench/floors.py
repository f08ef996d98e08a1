"""The floors: the least work any implementation of a case must do, measured in the same run.

Logit losses: a fused fwd+bwd reads the student and the teacher once and writes a gradient into fresh memory
once. CPU: cloning one N x V tensor (a read plus a first touch of fresh pages, as the new gradient must be)
plus summing another (top-k: the clone alone). GPU: 3 (top-k: 2) * N * V * itemsize over the measured
device-to-device copy bandwidth.
Relation losses (RKD, SP, PKT, CC): the GEMMs (the student and teacher Gram matrices and the gradient GEMM,
timed with torch.mm); AT: the memory floor (clone the student map, read the teacher map).
LLM head: the three GEMMs alone (logits h W^T, hidden-state gradient dlogits W, weight gradient dlogits^T h).
"""

from __future__ import annotations

import math
import statistics

import torch

from fastkd.bench.timing import time_ms, time_with_peak


def _copy_bandwidth(x: torch.Tensor, device: str, repeats: int) -> float:
    """Bytes per second of a device-to-device copy of x (read + write)."""
    buf = torch.empty_like(x)
    ms = statistics.median(time_ms(lambda: buf.copy_(x), device, repeats, 2))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def logits_floor_ms(n: int, v: int, dtype: torch.dtype, device: str, repeats: int,
                    reads_teacher: bool = True) -> float:
    """The memory floor of a fused fwd+bwd over [n, v] logits (``reads_teacher``: a dense teacher too)."""
    x = torch.randn(n, v, device=device).to(dtype)
    if device == "cuda":
        return (3 if reads_teacher else 2) * x.numel() * x.element_size() / _copy_bandwidth(x, device, repeats) * 1e3
    clone_ms = statistics.median(time_ms(lambda: x.clone(), device, repeats, 1))
    if not reads_teacher:
        return clone_ms
    y = torch.randn(n, v, device=device).to(dtype)
    return clone_ms + statistics.median(time_ms(lambda: y.sum(), device, repeats, 1))


def relation_floor_ms(loss: str, s_shape: tuple, t_shape: tuple, dtype: torch.dtype, device: str,
                      repeats: int) -> float:
    """RKD, SP, PKT, CC: the GEMM floor; AT: the memory floor (see the module docstring)."""
    n = s_shape[0]
    x = torch.randn(n, math.prod(s_shape[1:]), device=device).to(dtype)
    y = torch.randn(n, math.prod(t_shape[1:]), device=device).to(dtype)
    if loss == "at":
        if device == "cuda":
            return (2 * x.numel() + y.numel()) * x.element_size() / _copy_bandwidth(x, device, repeats) * 1e3
        return statistics.median(time_ms(lambda: x.clone(), device, repeats, 1)) + statistics.median(
            time_ms(lambda: y.sum(), device, repeats, 1))
    g = torch.mm(x, x.t())

    def gemms() -> None:
        torch.mm(x, x.t())
        torch.mm(y, y.t())
        torch.mm(g, x)

    return statistics.median(time_ms(gemms, device, repeats, 1))


def llm_floor_ms(n: int, h: int, v: int, dtype: torch.dtype, device: str, repeats: int, warmup: int,
                 slow_ms: float, slow_repeats: int) -> float:
    """The GEMMs every fwd+bwd through the lm_head does, timed alone (as the LLM-head steps are timed)."""
    x = torch.randn(n, h, device=device).to(dtype)
    w = torch.randn(v, h, device=device).to(dtype)
    g = torch.randn(n, v, device=device).to(dtype)

    def gemms() -> None:
        torch.mm(x, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), x)

    if device == "cuda":
        gemms()  # cuBLAS workspaces, as the steps' first call
    times, _ = time_with_peak(gemms, device, repeats, warmup, slow_ms, slow_repeats)
    return statistics.median(times)

