"""nn.Module drop-ins for fastkd's losses, including aliases named as in the frameworks users come from."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastkd import _validation as v
from fastkd.functional import kd_loss

__all__ = ["KDLoss", "DistillKL"]


class KDLoss(nn.Module):
    r"""Hinton knowledge-distillation loss (fused): ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Args:
        temperature: softmax temperature ``T > 0`` (default 4, the CIFAR KD setting).
        reduction: ``"batchmean"`` (default), ``"sum"``, ``"mean"`` or ``"none"``; see :func:`fastkd.kd_loss`.
        ignore_index: rows whose label equals this are not counted.
        scale_by_temperature: multiply by ``T^2`` (default True).

    Shape:
        ``forward(student_logits [..., V], teacher_logits [..., V], labels [...] or None)``.

    Example::

        criterion = fastkd.KDLoss(temperature=4.0)
        loss = criterion(student(x), teacher(x).detach())
    """

    def __init__(
        self,
        temperature: float = 4.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        scale_by_temperature: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = v.check_temperature(temperature)
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.scale_by_temperature = bool(scale_by_temperature)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            self.temperature,
            reduction=self.reduction,
            labels=labels,
            ignore_index=self.ignore_index,
            scale_by_temperature=self.scale_by_temperature,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"scale_by_temperature={self.scale_by_temperature}"
        )


class DistillKL(KDLoss):
    """Drop-in for RepDistiller's ``DistillKL(T)``: ``KL(p_t || p_s) * T^2 / batch_size`` over ``[B, C]``
    logits, the same value and gradient (the teacher is used as given: detach it, as RepDistiller's
    training loop does, unless you want its gradient)."""

    def __init__(self, T: float) -> None:
        super().__init__(temperature=T, reduction="batchmean")
        self.T = self.temperature

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(y_s, y_t)
