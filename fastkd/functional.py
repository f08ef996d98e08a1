"""Functional interface of fastkd's losses. Argument order is always (student, teacher[, target])."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from fastkd import _ops_loader, reference
from fastkd import _validation as v

__all__ = ["kd_loss"]

_warned = False


def _use_kernels() -> bool:
    global _warned
    if _ops_loader.LOADED:
        return True
    if not _warned:
        warnings.warn(
            "fastkd's compiled kernels are not available "
            f"({_ops_loader.LOAD_ERROR}); running the plain-PyTorch reference instead (correct, but slow). "
            "Reinstall with `pip install --no-build-isolation .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True
    return False


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
    r"""Hinton knowledge-distillation loss, fused.

    .. math:: T^2 \cdot \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)

    summed over the last (vocabulary) dimension; every leading index is a row.

    Args:
        student_logits: raw student logits ``[..., V]`` (float32, float16, bfloat16 or float64).
        teacher_logits: raw teacher logits, same shape and device; its dtype may differ (e.g. a bf16
            teacher with an fp32 student). It receives a gradient only if it requires grad.
        temperature: softmax temperature ``T > 0``.
        reduction: ``"batchmean"`` (sum / counted rows: the KD convention), ``"sum"``, ``"mean"``
            (sum / (counted rows * V), as ``nn.KLDivLoss``) or ``"none"`` (per row, shape ``[...]``).
        labels: optional integer tensor of shape ``[...]``; rows whose label equals ``ignore_index`` are
            not counted (token-level LLM distillation). If every row is ignored the loss is 0 and the
            gradient is 0.
        ignore_index: label value of ignored rows.
        scale_by_temperature: multiply by ``T^2`` (Hinton's convention, keeps gradient magnitudes
            independent of ``T``). ``False`` gives the bare KL.

    Returns:
        The loss, in the promoted dtype of the inputs (computed in float32, or float64 for float64 input).

    Rows with 0 elements (empty batches) give 0 for every reduction except ``"none"`` (an empty tensor).
    NaN or +inf logits propagate to the loss; -inf logits at the same entries of teacher and student
    (masked tokens) are valid and contribute nothing.
    """
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = v.check_temperature(temperature)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    if not _use_kernels():
        return reference.kd_loss(
            student_logits,
            teacher_logits,
            t,
            reduction=reduction,
            labels=labels,
            ignore_index=ignore_index,
            scale_by_temperature=scale_by_temperature,
        )
    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.fastkd.kd_forward(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        t,
        ignore_index,
        reduction,
        bool(scale_by_temperature),
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    if reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    return loss
