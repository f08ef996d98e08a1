r"""Cosine distillation, fused: :func:`cosine_loss` and :class:`CosineLoss` (issue 14).

Per row (every leading index of ``[..., V]`` logits is a row), on the **raw** logits (no temperature, no softmax):

.. math:: \beta \,\big(1 - \cos(s, t)\big) + \alpha\, \mathrm{CE}(s, y), \qquad
          \cos(s, t) = \frac{\langle s, t\rangle}{\max(\lVert s\rVert, \epsilon)\,\max(\lVert t\rVert, \epsilon)}

(``torch.nn.functional.cosine_similarity``'s clamping), computed by one operator, ``torch.ops.fastkd.cosine_forward``,
which reads the logits once for the loss and the gradients (three sums in a first sweep, the gradient in a
second; the cross-entropy at temperature 1, when ``alpha != 0``, in the same kernel).

The conventions of every fastkd response loss (:mod:`fastkd.functional`) hold, with one difference that follows
from the cosine being one value per row, not per vocabulary entry: ``"mean"`` divides by the counted rows, like
``"batchmean"`` (as the cross-entropy part of :func:`fastkd.kd_loss` and ``nn.CosineEmbeddingLoss``'s
``"mean"``); there is no division by ``V``.

Liger-Kernel's ``LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=w_h, weight_soft_loss=w_s, beta=b,
ignore_index=i, temperature=T)`` (fused head; its ``distillation_loss_fn`` on the logits) computes
``w_h * CE_sum / n + w_s * sum_rows b * (1 - cos(s/T, t/T)) / n`` with ``n = max(#(labels != i), 1)`` over the
whole batch, the CE at ``T = 1`` (Liger normalizes both rows first with ``F.normalize(eps=1e-12)``, which
changes ``cos`` only for rows of norm below ``eps``; the temperature cancels in the cosine). The mapping:

* no label equals ``ignore_index``: ``cosine_loss(s, t, beta=w_s * b, alpha=w_h, labels=labels)``
  (``"batchmean"``), exactly;
* some do: Liger still sums the cosine over the ignored rows (only its CE masks them) while dividing by the
  unmasked count; fastkd leaves ignored rows out of both terms. Liger's value is then
  ``cosine_loss(s, t, w_s * b, num_items_in_batch=n) + w_h * cosine_loss(s, t, 0.0, alpha=1.0, labels=labels)``
  (``n`` as above);
* ``return_soft_hard_loss=True``: Liger's ``soft_loss`` is ``w_s``-free and includes ``b``, i.e.
  ``b * parts.soft`` of ``return_parts=True`` here (``parts.soft`` is the reduced ``1 - cos``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fastkd import _validation as v
from fastkd import reference
from fastkd.functional import NumItems, _num_items_tensor, _use_kernels
from fastkd.outputs import LossParts

__all__ = ["cosine_loss", "CosineLoss"]


def _check_cosine(student_logits, teacher_logits, beta, labels, reduction, ignore_index, alpha, eps, num_items,
                  return_parts, token_weights=None):
    """The Python-side checks (tensor kinds and Python types; the op checks ranges again, naming the same
    arguments). Kept here rather than in fastkd/_validation.py: built from its helpers."""
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    n = v.check_num_items(num_items, reduction)
    b = v.check_nonneg_weight("beta", beta)
    a = v.check_nonneg_weight("alpha", alpha)
    e = v.check_positive("eps", eps)
    v.check_flags(return_parts=return_parts)
    if a != 0.0:
        # the range of the targets is checked by the op (one pass; its message names 'labels')
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels", check_range=False)
    w = v.check_token_weights(token_weights, student_logits)
    return b, a, e, n, w


def cosine_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    alpha: float = 0.0,
    eps: float = 1e-8,
    num_items_in_batch: NumItems = None,
    return_parts: bool = False,
    token_weights: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, LossParts]:
    r"""Cosine distillation on raw logits, fused: :math:`\beta (1 - \cos(s, t)) + \alpha\,\mathrm{CE}(s, y)` per
    row (Liger-Kernel's ``LigerFusedLinearCosineSimilarityLoss`` on logits; the mapping of its weights and
    normalization is in :mod:`fastkd.cosine`).

    Args:
        student_logits: raw student logits ``[..., V]`` (float32, float16, bfloat16 or float64).
        teacher_logits: raw teacher logits, same shape and device; its dtype may differ. It receives a gradient
            only if it requires grad.
        beta: weight of ``1 - cos`` (finite, >= 0).
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"`` (also sum / counted rows: the
            cosine is one value per row) or ``"none"`` (shape ``[...]``).
        labels: integer tensor ``[...]``: rows equal to ``ignore_index`` are not counted (value 0, gradient 0);
            with ``alpha != 0`` the class targets of the cross-entropy (required then).
        ignore_index: label value of ignored rows.
        alpha: weight of the student's hard-label cross-entropy at temperature 1 (finite, >= 0).
        eps: the norms' lower clamp (``F.cosine_similarity``'s ``eps``), > 0.
        num_items_in_batch: divisor replacing the counted rows (``"batchmean"`` / ``"mean"`` only).
        return_parts: return :class:`fastkd.LossParts` ``(loss, soft, hard)``: ``soft`` the reduced ``1 - cos``
            and ``hard`` the reduced cross-entropy (0 when ``alpha == 0``), detached; ``loss = beta * soft +
            alpha * hard``.
        token_weights: optional per-row weights ``[...]`` (the logits' leading shape, floating point, no
            gradient): each counted row's loss (cosine and cross-entropy) is multiplied by its weight; the divisor
            of "batchmean" / "mean" stays the counted rows (or ``num_items_in_batch``), as in
            :func:`fastkd.kd_loss`. The fused op computes the rows; their weighted sum is O(rows).

    Entries that are -inf in both student and teacher (masked tokens) are left out of the vectors; a row that is
    -inf everywhere on both sides contributes 0. NaN, +inf, or -inf on one side only make the loss NaN. A zero
    row (norm below ``eps``) has ``cos = 0``. Logits of magnitude above ~1e19 overflow float32's squared norm
    (NaN). Float16 gradients are returned in float32 by the op and rounded after the upstream gradient is applied.
    Double backward raises (use :func:`fastkd.reference.cosine_loss`).
    """
    b, a, e, n, w = _check_cosine(student_logits, teacher_logits, beta, labels, reduction, ignore_index, alpha, eps,
                                  num_items_in_batch, return_parts, token_weights)
    if not _use_kernels():
        return reference.cosine_loss(student_logits, teacher_logits, b, reduction=reduction, labels=labels,
                                     ignore_index=ignore_index, alpha=a, eps=e, num_items_in_batch=n,
                                     return_parts=return_parts, token_weights=w)
    if w is not None:  # the op's rows, weighted, then reduced as the reference reduces them
        rows = cosine_loss(student_logits, teacher_logits, b, reduction="none", labels=labels,
                           ignore_index=ignore_index, alpha=a, eps=e, return_parts=True)
        _, counted = reference._keep_rows(labels, ignore_index, rows.loss.shape, rows.loss.device)
        w = reference.counted_weights(w, labels, ignore_index)  # an ignored row is dropped, its weight too
        parts = [reference.reduce_rows(x * w.to(x.dtype), reduction, counted, 1, n) for x in rows]
        return LossParts(*parts) if return_parts else parts[0]
    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss, soft, hard, _, _ = torch.ops.fastkd.cosine_forward(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        _num_items_tensor(n),
        b,
        a,
        e,
        ignore_index,
        reduction,
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    if reduction == "none":
        lead = student_logits.shape[:-1]
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return LossParts(loss, soft, hard) if return_parts else loss


class CosineLoss(nn.Module):
    r"""Cosine distillation (fused): ``beta * (1 - cos(s, t)) + alpha * CE(s, target)`` per row on raw logits;
    see :func:`fastkd.cosine_loss`.

    Args:
        beta: weight of ``1 - cos`` (default 1).
        alpha: weight of the hard-label cross-entropy (default 0; a target is then required).
        reduction, ignore_index, eps, return_parts: as :func:`fastkd.cosine_loss`.

    Shape:
        ``forward(student_logits [..., V], teacher_logits [..., V], target [...] or None, *,
        num_items_in_batch=None, token_weights=None)`` (``token_weights``: as :func:`fastkd.cosine_loss`).

    Liger's ``LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=w_h, weight_soft_loss=w_s, beta=b)`` on
    logits, when no target equals ``ignore_index``: ``CosineLoss(beta=w_s * b, alpha=w_h)``
    (:mod:`fastkd.cosine` has the general mapping).
    """

    def __init__(
        self,
        beta: float = 1.0,
        alpha: float = 0.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        eps: float = 1e-8,
        return_parts: bool = False,
    ) -> None:
        super().__init__()
        self.beta = v.check_nonneg_weight("beta", beta)
        self.alpha = v.check_nonneg_weight("alpha", alpha)
        self.reduction = v.check_reduction(reduction)
        self.ignore_index = v.check_ignore_index(ignore_index)
        self.eps = v.check_positive("eps", eps)
        self.return_parts = v.check_bool("return_parts", return_parts)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        *,
        num_items_in_batch: NumItems = None,
        token_weights: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, LossParts]:
        return cosine_loss(student_logits, teacher_logits, self.beta, reduction=self.reduction, labels=target,
                           ignore_index=self.ignore_index, alpha=self.alpha, eps=self.eps,
                           num_items_in_batch=num_items_in_batch, return_parts=self.return_parts,
                           token_weights=token_weights)

    def extra_repr(self) -> str:
        return (f"beta={self.beta!r}, alpha={self.alpha!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index!r}, eps={self.eps!r}, return_parts={self.return_parts!r}")


def fused_linear_cosine_loss(student_hidden, student_weight, teacher, *, student_bias=None, beta=None,
                             temperature=1.0, labels=None, ignore_index=-100, hard_label_weight=0.0, soft_weight=None,
                             reduction="batchmean", chunk_size=None, scale_by_temperature=None,
                             num_items_in_batch=None, return_parts=False, student_softcap=None,
                             student_logit_scale=None, teacher_softcap=None, teacher_logit_scale=None,
                             token_weights=None, fused=True, **params):
    r"""``fastkd.fused_linear_kd_loss(..., loss="cosine")``: the student's logits ``h W^T + b`` (and a
    ``TeacherHead``'s) chunk by chunk, never all at once, and on each chunk the cosine kernel of
    :func:`cosine_loss`, which writes the logits' gradient in place; then the GEMMs of the head's gradients.

    Its value is :func:`cosine_loss` on the full logits with ``beta = soft_weight * beta`` and
    ``alpha = hard_label_weight``: per row ``soft_weight * beta * (1 - cos(s, t)) + hard_label_weight * CE(s, y)``,
    ``beta`` (the cosine's weight, Liger's ``beta``) defaulting to 1 and ``soft_weight`` to
    ``1 - hard_label_weight`` (the head's convention). Liger's ``LigerFusedLinearCosineSimilarityLoss(
    weight_hard_loss=w_h, weight_soft_loss=w_s, beta=b)`` is ``hard_label_weight=w_h, soft_weight=w_s, beta=b``
    when no label equals ``ignore_index`` (:mod:`fastkd.cosine` has the general mapping). The only parameter is
    ``eps`` (default 1e-8). ``temperature`` is accepted and has no effect (the cosine is scale invariant; Liger
    divides both sides by it); ``scale_by_temperature=True`` is an error. The teacher: dense logits or a
    ``TeacherHead`` with the student's vocabulary (no ``TopKTeacher``: a cosine needs every entry). Returns
    float32 (float64 for float64 input), as the fused head. ``token_weights`` ``[...]`` (one per token, no
    gradient): each counted row's loss (cosine and cross-entropy) times its weight, the divisor unchanged, as
    :func:`cosine_loss` (the fused op scales each row's logits gradient by it). ``fused=False`` runs the unfused
    composition (the reference: full logits, then :func:`fastkd.reference.cosine_loss`)."""
    from fastkd import _validation_head as vh
    from fastkd.fused_linear import _autocast_head, _rows, default_chunk_size

    v.check_temperature(temperature)  # a number (no effect): a tensor temperature would get no gradient
    unknown = set(params) - {"eps"}
    if unknown:
        raise TypeError(f"loss='cosine' takes the parameter eps only, got {sorted(unknown)}")
    eps = v.check_positive("eps", params.get("eps", 1e-8))
    b = 1.0 if beta is None else v.check_nonneg_weight("beta", beta)
    if scale_by_temperature:
        raise ValueError("scale_by_temperature: loss='cosine' has no T^2 factor (the cosine is scale invariant)")
    if fused:
        student_hidden, student_weight, student_bias, teacher = _autocast_head(student_hidden, student_weight,
                                                                              student_bias, teacher)
    # every other argument as the head checks it (loss "kl" stands in for the registry's checks; no parameters)
    kind, teacher_vocab, t, _, hard, soft, n, _ = vh.check_fused_linear(
        student_hidden, student_weight, teacher, student_bias, "kl", None, temperature, labels, ignore_index,
        hard_label_weight, soft_weight, reduction, chunk_size, num_items_in_batch, False, return_parts, {})
    head = vh.check_head_transforms(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, kind)
    weights = v.check_token_weights(token_weights, student_hidden)
    vocab = student_weight.shape[0]
    if kind == "topk" or teacher_vocab != vocab:
        raise ValueError("loss='cosine' needs dense teacher logits or a fastkd.TeacherHead with the student's "
                         f"vocabulary ({vocab}), got " + ("a TopKTeacher" if kind == "topk" else
                                                           f"a teacher vocabulary of {teacher_vocab}"))
    if not fused or not _use_kernels():
        return _cosine_head_reference(student_hidden, student_weight, student_bias, teacher, kind, head, soft * b,
                                      hard, eps, labels, ignore_index, reduction, n, return_parts, weights)
    lead = student_hidden.shape[:-1]
    hidden = _rows(student_hidden)
    rows = hidden.shape[0]
    dense = _rows(teacher).detach() if kind == "dense" else None
    t_hidden = t_weight = t_bias = None
    if kind == "head":
        t_hidden = _rows(teacher.hidden).detach()
        t_weight = teacher.weight.detach()
        t_bias = None if teacher.bias is None else teacher.bias.detach()
    grad_on = torch.is_grad_enabled()
    out, soft_part, hard_part, _, _, _, _ = torch.ops.fastkd.fused_linear_kd_forward(
        hidden, student_weight, student_bias, dense, t_hidden, t_weight, t_bias, None, None,
        _rows(labels, last=False), _num_items_tensor(n), None, "cosine", [eps], t, soft * b, hard, ignore_index,
        reduction, False, False, False,
        default_chunk_size(rows, vocab, hidden.device) if chunk_size is None else int(chunk_size), *head,
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
        None if weights is None else _rows(weights, last=False))
    if reduction == "none":
        out, soft_part, hard_part = out.reshape(lead), soft_part.reshape(lead), hard_part.reshape(lead)
    return LossParts(out, soft_part, hard_part) if return_parts else out


def _cosine_head_reference(hidden, weight, bias, teacher, kind, head, beta, alpha, eps, labels, ignore_index,
                           reduction, n, return_parts, token_weights=None):
    """The unfused composition: the full logits in float32 (float64), then reference.cosine_loss."""
    f = torch.nn.functional
    s_scale, s_cap, t_scale, t_cap = head
    acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    up = (lambda x: None if x is None else x.to(acc))  # noqa: E731
    logits = reference.head_transform(f.linear(up(hidden), up(weight), up(bias)), s_scale, s_cap)
    if kind == "head":
        t_logits = f.linear(up(teacher.hidden), up(teacher.weight), up(teacher.bias))
    else:
        t_logits = teacher
    t_logits = reference.head_transform(t_logits.detach(), t_scale, t_cap)
    if t_logits.dtype == torch.float64:
        logits = logits.double()
    return reference.cosine_loss(logits, t_logits, beta, reduction=reduction, labels=labels,
                                 ignore_index=ignore_index, alpha=alpha, eps=eps, num_items_in_batch=n,
                                 return_parts=return_parts, token_weights=token_weights)
