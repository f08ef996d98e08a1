"""Argument checks shared by the fused ops and the plain-PyTorch reference: one set of rules, one set of
messages, each naming the offending argument."""

from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-dim tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits must be on the student's device {student_logits.device}, got {teacher_logits.device}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits: the vocabulary (last) dimension must not be empty")


def check_labels(labels: Optional[torch.Tensor], student_logits: torch.Tensor) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits without the vocabulary "
            f"dimension), got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(f"labels must be on the logits' device {student_logits.device}, got {labels.device}")


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python number, not a tensor")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}") from None
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index
