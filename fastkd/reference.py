"""Plain-PyTorch implementations of fastkd's losses.

They are the test oracle (run in float64) and what fastkd runs, with a warning, where the compiled kernels
are missing. Same signatures, same argument checks and the same conventions as the fused versions:
masked rows (label == ignore_index) do not count, all-masked input gives 0, and vocabulary entries where
the teacher has zero probability (e.g. -inf logits on both sides) contribute exactly 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastkd import _validation as v

__all__ = ["kd_loss", "reduce_rows"]


def reduce_rows(
    per_row: torch.Tensor, reduction: str, counted: torch.Tensor | int, vocab: int
) -> torch.Tensor:
    """Applies a fastkd reduction to per-row losses (masked rows already 0)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    denom = torch.as_tensor(counted, device=per_row.device).clamp_min(1).to(per_row.dtype)
    if reduction == "mean":
        denom = denom * vocab
    return total / denom


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
) -> torch.Tensor:
    """Hinton KD in plain PyTorch: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over the last dim.
    See :func:`fastkd.kd_loss` for the arguments."""
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = v.check_temperature(temperature)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
    p = log_p.exp()
    # p * (log p - log q), with 0 where the teacher has no mass (avoids 0 * (-inf - -inf) = NaN).
    per_row = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device)).sum(-1)
    if scale_by_temperature:
        per_row = per_row * (t * t)
    counted: torch.Tensor | int = per_row.numel()
    if labels is not None:
        keep = labels != ignore_index
        per_row = torch.where(keep, per_row, torch.zeros((), dtype=dtype, device=per_row.device))
        counted = keep.sum()
    return reduce_rows(per_row, reduction, counted, student_logits.shape[-1])
