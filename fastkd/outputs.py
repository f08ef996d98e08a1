"""Structured return values of fastkd's losses."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["LossParts"]


class LossParts(NamedTuple):
    """A loss together with its soft (distillation) and hard (cross-entropy) parts.

    Returned by :func:`fastkd.kd_loss` and :class:`fastkd.KDLoss` with ``return_parts=True``. It unpacks like
    a tuple (``loss, soft, hard = fastkd.kd_loss(..., return_parts=True)``) and its fields are named.

    Attributes:
        loss: the training loss, ``alpha * hard + beta * soft`` (``beta`` defaulting to ``1 - alpha``); the
            only field that carries a gradient.
        soft: the reduced distillation term (``T^2 * KL(p_teacher || p_student)`` by default), unweighted
            and detached: for logging.
        hard: the reduced cross-entropy of the student logits (temperature 1) against the labels, unweighted
            and detached; 0 when ``alpha == 0`` (it is then not computed).

    All three have the shape of the loss: a scalar, or one value per row for ``reduction="none"``.
    """

    loss: Tensor
    soft: Tensor
    hard: Tensor
