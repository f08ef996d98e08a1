"""Functional interface of fastkd's losses. Argument order is always (student, teacher[, target]).

Response-based losses (:func:`kd_loss`, :func:`reverse_kl_loss`, :func:`jsd_loss`, :func:`tvd_loss`,
:func:`dkd_loss`, :func:`topk_kd_loss`): every function flattens the leading dimensions of ``[..., V]`` logits
into rows and runs one fused operator (``torch.ops.fastkd.response_forward`` or
``torch.ops.fastkd.topk_kd_forward``) that computes the loss and its gradients in one read of the logits.
The relation- and feature-based losses (:func:`rkd_loss`, :func:`sp_loss`, :func:`pkt_loss`, :func:`cc_loss`,
:func:`at_loss`, :func:`nst_loss`, :func:`hint_loss`) are documented in the second half of this module.

Conventions shared by every response-based loss:

* ``labels`` / ``target``: rows whose label equals ``ignore_index`` do not count (value 0, gradient 0); if
  every row is ignored the loss is 0 and the gradient 0, never NaN.
* ``reduction``: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"`` (sum / (counted rows * V), as
  ``nn.KLDivLoss``) or ``"none"`` (one value per row, shape ``[...]``).
* ``num_items_in_batch``: replaces the number of counted rows as the divisor of ``"batchmean"`` and
  ``"mean"`` (gradient accumulation: divide by the global count of items, as Hugging Face / TRL do).
* Vocabulary entries that are ``-inf`` in both student and teacher (masked tokens) contribute exactly 0.
  A row that is ``-inf`` in every entry of both sides (fully masked) contributes exactly 0 with a zero
  gradient and still counts in the divisor (which depends only on ``labels`` / ``num_items_in_batch``).
* A NaN or ``+inf`` logit in a counted row makes the loss NaN (never a finite number); empty input gives 0.
* Computed in float32 (float64 for float64 input); the result has the inputs' promoted dtype. Float16
  gradients are recomputed in backward under a loss scale (an upstream gradient != 1), so that entries
  below float16's range are not flushed before the scale applies. Double backward raises.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F

from fastkd import _ops_loader, reference
from fastkd import _validation as v
from fastkd.outputs import LossParts

__all__ = [
    "kd_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "tvd_loss",
    "dkd_loss",
    "topk_kd_loss",
    "rkd_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "sp_loss",
    "pkt_loss",
    "cc_loss",
    "at_loss",
    "nst_loss",
    "hint_loss",
]

NumItems = Union[None, int, float, torch.Tensor]

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


def _num_items_tensor(num_items: NumItems) -> Optional[torch.Tensor]:
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    return torch.tensor(float(num_items), dtype=torch.float64)


def _response(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_items: NumItems,
    divergence: str,
    temperature: float,
    *,
    params: Sequence[float] = (),
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_temperature: bool = False,
):
    """Runs fastkd::response_forward on [..., V] logits; returns (loss, soft, hard) shaped for reduction.
    ``params``: the divergence's parameters in registry order (fastkd/divergences.py)."""
    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss, soft, hard, _, _ = torch.ops.fastkd.response_forward(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        _num_items_tensor(num_items),
        divergence,
        list(params),
        temperature,
        soft_weight,
        hard_weight,
        ignore_index,
        reduction,
        bool(scale_by_temperature),
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    if reduction == "none":
        lead = student_logits.shape[:-1]
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return loss, soft, hard


def _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index, num_items):
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = v.check_temperature(temperature)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    n = v.check_num_items(num_items, reduction)
    return t, n


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    alpha: float = 0.0,
    beta: Optional[float] = None,
    num_items_in_batch: NumItems = None,
    return_parts: bool = False,
) -> Union[torch.Tensor, LossParts]:
    r"""Hinton knowledge-distillation loss, fused, optionally mixed with the hard-label cross-entropy.

    .. math:: \alpha \cdot \mathrm{CE}(s, y) + \beta \cdot T^2 \cdot
              \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big),
              \qquad \beta = 1 - \alpha \text{ unless given}

    summed over the last (vocabulary) dimension; every leading index is a row. With the default
    ``alpha=0`` it is plain KD (RepDistiller ``DistillKL``, mdistiller ``kd_loss``).

    Args:
        student_logits: raw student logits ``[..., V]`` (float32, float16, bfloat16 or float64).
        teacher_logits: raw teacher logits, same shape and device; its dtype may differ (e.g. a bf16
            teacher with an fp32 student). It receives a gradient only if it requires grad.
        temperature: softmax temperature ``T > 0`` of the distillation term.
        reduction: ``"batchmean"`` (the KD convention), ``"sum"``, ``"mean"`` or ``"none"``. The cross-entropy
            part is divided by the counted rows for both ``"batchmean"`` and ``"mean"`` (as
            ``nn.CrossEntropyLoss(reduction="mean")``).
        labels: integer tensor ``[...]``: rows equal to ``ignore_index`` are not counted, and with
            ``alpha != 0`` these are the class targets of the cross-entropy (required then).
        ignore_index: label value of ignored rows.
        scale_by_temperature: multiply the KL by ``T^2`` (Hinton's convention). ``False`` gives the bare KL.
        alpha: weight of the hard-label cross-entropy (computed at temperature 1 in the same pass).
        beta: weight of the distillation term; defaults to ``1 - alpha``.
        num_items_in_batch: divisor replacing the counted rows (``"batchmean"``/``"mean"`` only).
        return_parts: also return the reduced parts: a :class:`fastkd.LossParts` ``(loss, soft, hard)``,
            where ``soft`` (the unweighted KD term) and ``hard`` (the unweighted cross-entropy; 0 when
            ``alpha == 0``) are detached, for logging.

    torchdistill's ``KDLoss`` returns the bare KL when ``alpha`` is 0/None or no targets are given
    (``kd_loss(s, t, T, scale_by_temperature=False)``) and ``alpha * CE + beta * T^2 * KL`` otherwise
    (``kd_loss(s, t, T, labels=targets, alpha=alpha, beta=beta)``).

    Returns:
        The loss, in the promoted dtype of the inputs (computed in float32, or float64 for float64 input),
        or a :class:`fastkd.LossParts` with ``return_parts=True``.

    NaN or +inf logits propagate to the loss; -inf logits at the same entries of teacher and student
    (masked tokens) are valid and contribute nothing.
    """
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    a, b = v.check_mix_weights(alpha, beta)
    v.check_flags(scale_by_temperature=scale_by_temperature, return_parts=return_parts)
    if a != 0.0:
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels", check_range=False)
    if not _use_kernels():
        return reference.kd_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                 ignore_index=ignore_index, scale_by_temperature=scale_by_temperature, alpha=a,
                                 beta=beta, num_items_in_batch=n, return_parts=return_parts)
    loss, soft, hard = _response(student_logits, teacher_logits, labels, n, "kl", t, soft_weight=b, hard_weight=a,
                                 ignore_index=ignore_index, reduction=reduction,
                                 scale_by_temperature=scale_by_temperature)
    return LossParts(loss, soft, hard) if return_parts else loss


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    r"""Reverse KL, fused: :math:`T^2 \cdot \mathrm{KL}(\mathrm{softmax}(s/T) \,\|\, \mathrm{softmax}(t/T))`
    per row (mode-seeking; TRL's generalized JSD with ``beta=1``, MiniLLM's objective).

    Arguments as :func:`fastkd.kd_loss`. Where the teacher gives a vocabulary entry probability 0 but the
    student does not, the divergence is ``+inf``, as the mathematics says; entries that are -inf on both
    sides contribute 0.
    """
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    v.check_flags(scale_by_temperature=scale_by_temperature)
    if not _use_kernels():
        return reference.reverse_kl_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                         ignore_index=ignore_index, scale_by_temperature=scale_by_temperature,
                                         num_items_in_batch=n)
    return _response(student_logits, teacher_logits, labels, n, "reverse_kl", t, ignore_index=ignore_index,
                     reduction=reduction, scale_by_temperature=scale_by_temperature)[0]


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence, fused, with the semantics of TRL's GKD
    ``generalized_jsd_loss``:

    .. math:: \beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\, \mathrm{KL}(q \,\|\, m), \qquad
              m = \beta p + (1 - \beta) q,\; p = \mathrm{softmax}(t/T),\; q = \mathrm{softmax}(s/T)

    ``beta=0`` is ``KL(p || q)`` (forward KL) and ``beta=1`` is ``KL(q || p)`` (reverse KL), as in TRL.
    No ``T^2`` factor.

    Args:
        beta: mixing weight in ``[0, 1]``.
        reduction: as :func:`fastkd.kd_loss`, with TRL's convention kept for ``"batchmean"`` without labels:
            the sum is divided by ``student_logits.shape[0]`` (the batch size ``B`` for ``[B, T, V]`` input,
            not ``B * T``). With labels it is divided by the number of unmasked rows. ``"none"`` gives one
            value per row (TRL returns one per vocabulary entry; sum them over ``V`` to compare).
        labels, ignore_index, num_items_in_batch: as :func:`fastkd.kd_loss`.

    Entries that underflow or are -inf on both sides contribute exactly 0 (TRL's formulation gives NaN
    for -inf entries).
    """
    b = v.check_beta_unit(beta)
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    if not _use_kernels():
        return reference.jsd_loss(student_logits, teacher_logits, b, t, reduction=reduction, labels=labels,
                                  ignore_index=ignore_index, num_items_in_batch=n)
    if reduction == "batchmean" and labels is None and n is None and student_logits.dim() >= 3 \
            and student_logits.shape[0] > 0:
        n = student_logits.shape[0]  # TRL: jsd.sum() / jsd.size(0) (empty input: 0, as every loss)
    # beta 0 and 1 (forward and reverse KL, TRL's convention) are run by those kernels: the op resolves them
    return _response(student_logits, teacher_logits, labels, n, "jsd", t, params=(b,), ignore_index=ignore_index,
                     reduction=reduction)[0]


def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    r"""Total variation distance, fused: :math:`\tfrac12 \sum_j |p_j - q_j|` per row, with
    ``p = softmax(t/T)``, ``q = softmax(s/T)`` and no ``T^2`` factor. The gradient takes the subgradient
    ``sign(0) = 0`` where ``p_j == q_j`` (as ``torch.abs``). Arguments as :func:`fastkd.kd_loss`.
    """
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    if not _use_kernels():
        return reference.tvd_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                  ignore_index=ignore_index, num_items_in_batch=n)
    return _response(student_logits, teacher_logits, labels, n, "tvd", t, ignore_index=ignore_index,
                     reduction=reduction)[0]


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    r"""Decoupled KD (Zhao et al., CVPR 2022), fused: :math:`T^2 (\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`
    per row, with the defaults and value of mdistiller's ``dkd_loss(logits_student, logits_teacher, target,
    alpha, beta, temperature)``.

    TCKD is the KL between the binary distributions ``[p_y, 1 - p_y]`` and ``[q_y, 1 - q_y]`` of the target
    class; NCKD the KL between teacher and student softmaxes over the non-target classes only. Both are
    computed exactly from log-sum-exps (no ``-1000`` masking, no log of a probability), so the result stays
    finite where mdistiller's formulation overflows (e.g. logit gaps of thousands).

    Args:
        target: integer class indices ``[...]`` in ``[0, V)``; rows equal to ``ignore_index`` do not count.
        alpha, beta: weights of TCKD and NCKD (finite, >= 0).
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` (mdistiller: sum / batch size), ``"sum"``, ``"mean"``, ``"none"``.

    The warmup factor ``min(epoch / warmup, 1)`` of mdistiller's DKD distiller is applied by
    :class:`fastkd.DKDLoss`. Needs ``V >= 2``. A row that is -inf everywhere on both sides (target
    included) contributes 0, as in every response loss; a row whose non-target entries are all -inf on both
    sides has no non-target distribution and gives NaN.
    """
    t, n = _check_common(student_logits, teacher_logits, None, temperature, reduction, ignore_index,
                         num_items_in_batch)
    a = v.check_nonneg_weight("alpha", alpha)
    b = v.check_nonneg_weight("beta", beta)
    # the range of the targets is checked by the op (one pass; its message names 'target')
    v.check_target(target, student_logits, ignore_index, required=True, name="target", check_range=False)
    if student_logits.shape[-1] < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got V={student_logits.shape[-1]}")
    if not _use_kernels():
        return reference.dkd_loss(student_logits, teacher_logits, target, a, b, t, reduction=reduction,
                                  ignore_index=ignore_index, num_items_in_batch=n)
    return _response(student_logits, teacher_logits, target, n, "dkd", t, params=(a, b),
                     ignore_index=ignore_index, reduction=reduction, scale_by_temperature=True)[0]


def _resolve_scale(spec, scale_by_temperature, where: str) -> bool:
    """``scale_by_temperature`` for a divergence: None is its own default (T^2 for the KL-type divergences);
    True where the divergence has no T^2 factor (JSD, TVD) is an error."""
    return v.resolve_scale_by_temperature(scale_by_temperature, spec.name)


def _divergence(spec, where: str, student_logits, teacher_logits, params, temperature, *, reduction="batchmean",
                labels=None, ignore_index=-100, scale_by_temperature=None, num_items_in_batch=None):
    """The response op for any registered divergence. Python checks what the op cannot see (tensor and Python
    types); the op checks the parameters' ranges (ValueError naming the parameter)."""
    values = spec.resolve(params, where)
    scale = _resolve_scale(spec, scale_by_temperature, where)
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    if spec.family == "decoupled":
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels", check_range=False)
    if not _use_kernels():
        return reference.divergence_loss(student_logits, teacher_logits, spec.name, t, reduction=reduction,
                                         labels=labels, ignore_index=ignore_index, scale_by_temperature=scale,
                                         num_items_in_batch=n, **dict(zip(spec.param_names, values)))
    return _response(student_logits, teacher_logits, labels, n, spec.name, t, params=values,
                     ignore_index=ignore_index, reduction=reduction, scale_by_temperature=scale)[0]


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: Optional[bool] = None,
    num_items_in_batch: NumItems = None,
    **params: float,
) -> torch.Tensor:
    r"""Any registered response divergence by name, fused (one read of the logits for the loss and its
    gradients): ``divergence_loss(s, t, "skew_kl", 2.0, skew=0.2)``. The divergences, their parameters and
    defaults are listed in :data:`fastkd.divergences.REGISTRY` (and the README's table).

    Args:
        student_logits, teacher_logits: raw logits ``[..., V]``, as :func:`fastkd.kd_loss`.
        divergence: its name, e.g. ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ``"dkd"``.
        temperature: softmax temperature ``T > 0``.
        reduction, labels, ignore_index, num_items_in_batch: as :func:`fastkd.kd_loss`. For ``"dkd"`` the labels
            are the class targets (required). ``"batchmean"`` always divides by the counted rows (the named
            :func:`fastkd.jsd_loss` keeps TRL's division of ``[B, T, V]`` input by ``B``).
        scale_by_temperature: multiply by ``T^2``; None means the divergence's default (yes for the KL-type
            divergences, no for ``"jsd"`` and ``"tvd"``, where True is an error).
        **params: the divergence's parameters by name (e.g. ``beta=0.3`` for ``"jsd"``); omitted ones take
            their defaults. A parameter the divergence does not have is a TypeError, one out of its range a
            ValueError.

    The special-value rules of every response loss apply (module docstring).
    """
    from fastkd import divergences

    return _divergence(divergences.get(divergence), "divergence_loss", student_logits, teacher_logits, params,
                       temperature, reduction=reduction, labels=labels, ignore_index=ignore_index,
                       scale_by_temperature=scale_by_temperature, num_items_in_batch=num_items_in_batch)


def _generate_functions() -> List[str]:
    """The functions of the registered divergences that are not written by hand (fastkd/divergences.py)."""
    from fastkd import _codegen, divergences

    made = []
    for spec in divergences.REGISTRY.values():
        if spec.generated:
            globals()[spec.function] = _codegen.make_function(spec, _divergence, __name__, "fused")
            made.append(spec.function)
    return made


__all__ += ["divergence_loss"] + _generate_functions()


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    values_are: str = "logits",
    tail: str = "renormalize",
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    r"""KD against a sparse teacher (offline / cached top-k logits), fused:
    :math:`T^2 \sum_k p_k (\log p_k - \log q_{i_k})` per row, ``q = softmax(s/T)`` over the full vocabulary.

    The teacher costs ``O(rows * k)`` memory. Its distribution over the ``k`` kept entries:

    * ``values_are="logits"``: ``p = softmax(values / T)`` over the kept entries: the missing tail is
      dropped and the kept mass renormalized to 1 (with ``k = V`` this is exactly :func:`fastkd.kd_loss`).
    * ``values_are="logprobs"``: the values are log-probabilities of the target distribution, used as
      given (already at the distillation temperature; no ``/T`` is applied to them). With
      ``tail="renormalize"`` they are renormalized over the kept entries; with ``tail="bucket"`` the
      teacher's missing mass ``1 - sum(exp(values))`` is kept as one extra bucket, matched against the
      student's mass outside the kept set (summed exactly over the non-kept entries): the term
      ``p_tail * (log p_tail - log q_tail)`` is added.

    Args:
        teacher_topk_values: ``[..., k]`` float, with the student's leading dimensions; must not require grad.
        teacher_topk_indices: ``[..., k]`` int64/int32 vocabulary indices, distinct within a row (as
            ``torch.topk`` returns them) and in ``[0, V)`` on counted rows.
        Other arguments as :func:`fastkd.kd_loss`.
    """
    t = v.check_temperature(temperature)
    v.check_topk(student_logits, teacher_topk_values, teacher_topk_indices, values_are, tail)
    v.check_labels(labels, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    n = v.check_num_items(num_items_in_batch, reduction)
    v.check_flags(scale_by_temperature=scale_by_temperature)
    if not _use_kernels():
        return reference.topk_kd_loss(student_logits, teacher_topk_values, teacher_topk_indices, t,
                                      values_are=values_are, tail=tail, reduction=reduction, labels=labels,
                                      ignore_index=ignore_index, scale_by_temperature=scale_by_temperature,
                                      num_items_in_batch=n)
    vocab, k = student_logits.shape[-1], teacher_topk_values.shape[-1]
    loss, _ = torch.ops.fastkd.topk_kd_forward(
        student_logits.reshape(-1, vocab),
        teacher_topk_values.reshape(-1, k),
        teacher_topk_indices.reshape(-1, k),
        None if labels is None else labels.reshape(-1),
        _num_items_tensor(n),
        t,
        values_are == "logprobs",
        tail == "bucket",
        ignore_index,
        reduction,
        bool(scale_by_temperature),
        torch.is_grad_enabled() and student_logits.requires_grad,
    )
    if reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    return loss


# --------------------------------------------------------------------------------------------------------
# Relation-based losses (RKD, SP, PKT, CC) and feature-based losses (AT, NST, FitNet hints).
#
# Features are [N, ...] tensors, one sample per leading index, flattened per sample to [N, D] (reshape with
# explicit sizes: N may be 0 and the input may be strided); student and teacher widths may differ. Computed in
# float32 (float64 if either input is float64); the loss has the promoted input dtype, each gradient its
# input's dtype. N = 0 gives 0 with zero gradients. The fused ops (torch.ops.fastkd.{rkd,sp,pkt,cc,at}_forward)
# return the loss and, for each input that needs one, its gradient computed in the same pass; their autograd
# (C++) returns that gradient times the incoming one. Argument checks run here, before the op, with the
# messages of fastkd.reference.
# --------------------------------------------------------------------------------------------------------
Features = Union[torch.Tensor, Sequence[torch.Tensor]]

_ops_present: Set[str] = set()
_warned_missing_ops: Set[str] = set()


def _relation_kernel(op: str) -> bool:
    """Whether ``torch.ops.fastkd.<op>`` can run: the compiled kernels are loaded and this build defines the op
    (a build older than the relation losses does not; the reference runs then, with one warning per op)."""
    if not _use_kernels():
        return False
    if op in _ops_present:
        return True
    if hasattr(torch.ops.fastkd, op):
        _ops_present.add(op)
        return True
    if op not in _warned_missing_ops:
        warnings.warn(
            f"this build of fastkd's compiled kernels has no torch.ops.fastkd.{op}; running the plain-PyTorch "
            "reference instead (correct, but slow). Rebuild with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_missing_ops.add(op)
    return False


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _flat2d(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, D] with explicit sizes (``reshape(0, -1)`` is an error)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _flat3d(x: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [N, C, S]."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


# shared with the reference: (promoted output dtype, compute dtype) and an exact 0 tied to the inputs' graph
_dtypes = reference._dtypes
_zero_loss = reference._zero_loss
_NORMALIZE_EPS = reference._NORMALIZE_EPS


def _layer_names(i: int, is_list: bool) -> Tuple[str, str]:
    return (f"g_s[{i}]", f"g_t[{i}]") if is_list else ("g_s", "g_t")


def _weighted_sum(losses: List[torch.Tensor], weights: List[float]) -> torch.Tensor:
    total = None
    for w, term in zip(weights, losses):
        term = term if w == 1.0 else w * term
        total = term if total is None else total + term
    return total


# ---- RKD ---------------------------------------------------------------------------------------------------
def _rkd(f_s: torch.Tensor, f_t: torch.Tensor, distance_weight: float, angle_weight: float) -> torch.Tensor:
    """Validated inputs; ``torch.ops.fastkd.rkd_forward``'s differentiable output 0 (the weighted loss)."""
    loss, _, _, _ = torch.ops.fastkd.rkd_forward(
        _flat2d(f_s), _flat2d(f_t).detach(), distance_weight, angle_weight, _wants_grad(f_s)
    )
    return loss


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    r"""Relational knowledge distillation (Park et al., CVPR 2019), fused:
    ``distance_weight * L_dist + angle_weight * L_angle`` (see :func:`rkd_distance_loss` and
    :func:`rkd_angle_loss` for the two terms).

    Anchors: RepDistiller ``RKDLoss(w_d=25, w_a=50)``, mdistiller ``rkd_loss(f_s, f_t)`` (``squared=False``,
    ``eps=1e-12``), torchdistill ``RKDLoss(dist_factor, angle_factor, reduction='mean')``; same value and
    gradient. A term whose weight is 0 is not computed and contributes exactly 0 (torchdistill skips a 0/None
    factor too).

    Args:
        f_s: student features ``[N, ...]``, flattened per sample to ``[N, D_s]`` (float32, float16, bfloat16
            or float64).
        f_t: teacher features ``[N, ...]`` (``D_t`` may differ from ``D_s``), same device. It never receives a
            gradient (the anchors compute it under ``no_grad``): ``f_t.grad`` stays None even if it requires
            grad.
        distance_weight, angle_weight: finite, >= 0.

    Returns:
        A 0-dim loss in the promoted input dtype.

    Deviations from the anchors: N = 1 (and N = 0) gives 0 with a zero gradient (the anchors: NaN, a mean
    over no pairs). Kept on purpose: the anchors' ~1e12-scale gradient for rows that are exact duplicates in
    the student but not in the teacher (``F.normalize`` of a zero difference, clamped at 1e-12).

    Numerics: no ``N x N x D`` or ``N^3`` tensor is allocated (the anchors allocate both: 12 GB at N = 512,
    D = 2048). Distances and angles are translation invariant, so the kernel centers the features and forms
    the Gram matrix of the centered features in float64; pairs the Gram matrix cannot resolve (duplicates,
    near duplicates) are recomputed from their differences. This stays exact where the anchors' fp32
    ``|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>`` cancels (features with a large common offset, e.g. post-ReLU).
    Deterministic run to run (no float atomics); the Gram GEMM is not bitwise across thread counts.
    """
    v.check_feature_pair(f_s, f_t)
    wd = v.check_nonneg_weight("distance_weight", distance_weight)
    wa = v.check_nonneg_weight("angle_weight", angle_weight)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_loss(f_s, f_t, wd, wa)
    return _rkd(f_s, f_t, wd, wa)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    r"""The unweighted RKD distance term, fused:

    .. math:: \frac{1}{N^2} \sum_{i,j} \mathrm{SmoothL1}\Big(\frac{d^s_{ij}}{\mu_s} - \frac{d^t_{ij}}{\mu_t}\Big),
              \qquad d_{ij} = \sqrt{\max(\lVert x_i - x_j \rVert^2, 10^{-12})}\ (i \ne j),\ d_{ii} = 0

    with ``mu`` the mean of the N(N-1) off-diagonal distances (the anchors' ``d[d > 0].mean()``; the
    student's mean is differentiated through, as in the anchors), SmoothL1 with beta 1, averaged over all N^2
    entries (the zero diagonal counts). Duplicated rows have distance 1e-6 (the clamp) and no gradient.
    ``rkd_loss(f_s, f_t, 1.0, 0.0)``; arguments and conventions as :func:`rkd_loss` (the teacher gets no
    gradient; N < 2 gives 0).
    """
    v.check_feature_pair(f_s, f_t)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_distance_loss(f_s, f_t)
    return _rkd(f_s, f_t, 1.0, 0.0)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    r"""The unweighted RKD angle term, fused:

    .. math:: \frac{1}{N^3} \sum_{i,j,k} \mathrm{SmoothL1}\big(\langle e^s_{ij}, e^s_{ik} \rangle
              - \langle e^t_{ij}, e^t_{ik} \rangle\big), \qquad e_{ij} = \mathrm{normalize}(x_j - x_i)

    (``F.normalize``, eps 1e-12: the zero vector for ``j == i`` and for duplicated rows; those zero entries
    count in the N^3 mean, as in the anchors). ``rkd_loss(f_s, f_t, 0.0, 1.0)``; arguments and conventions as
    :func:`rkd_loss`. O(N^3) time and O(N^2) memory (the anchors: an ``N x N x D`` tensor and ``N^3`` angles).
    """
    v.check_feature_pair(f_s, f_t)
    if not _relation_kernel("rkd_forward"):
        return reference.rkd_angle_loss(f_s, f_t)
    return _rkd(f_s, f_t, 0.0, 1.0)


# ---- SP ----------------------------------------------------------------------------------------------------
def _sp_pair(f_s: torch.Tensor, f_t: torch.Tensor, reduction: str, normalize: str = "l2") -> torch.Tensor:
    """One validated layer pair: 0-dim loss. The fused op normalizes the Gram rows by their L2 norm; the L1
    normalization of torchdistill runs as the plain-PyTorch composition (exact value and gradient)."""
    if normalize == "l1":
        return reference._sp_single(f_s, f_t, reduction, p=1.0)
    if not _relation_kernel("sp_forward"):
        return reference.sp_loss(f_s, f_t, reduction=reduction)
    loss, _, _ = torch.ops.fastkd.sp_forward(
        _flat2d(f_s), _flat2d(f_t), reduction, _wants_grad(f_s), _wants_grad(f_t)
    )
    return loss


def _sp_layers(g_s: Features, g_t: Features, reduction: str, normalize: str = "l2") -> Tuple[List[torch.Tensor], bool]:
    """Validates (reduction, normalize, layers) and returns the per-layer 0-dim losses and whether lists were
    given."""
    v.check_relation_reduction(reduction)
    v.check_choice("normalize", normalize, tuple(v.SP_NORMALIZE))
    list_s, list_t, is_list = v.check_layers(g_s, g_t)
    return [_sp_pair(a, b, reduction, normalize) for a, b in zip(list_s, list_t)], is_list


def sp_loss(
    g_s: Features,
    g_t: Features,
    *,
    reduction: str = "batchmean",
    weights: Optional[Sequence[float]] = None,
    normalize: str = "l2",
) -> torch.Tensor:
    r"""Similarity-preserving KD (Tung & Mori, ICCV 2019), fused. Per layer, with ``F`` the features flattened
    to ``[N, D]``:

    .. math:: G = \mathrm{normalize}_{\text{rows}}(F F^\top), \qquad
              L = \lVert G_t - G_s \rVert_F^2 \,/\, N^2 \ (\text{"batchmean"}) \text{ or } /\, 1 \ (\text{"sum"})

    (row normalization as ``F.normalize(G)``, eps 1e-12; not centered, not translation invariant).

    Anchors: RepDistiller ``Similarity()`` (per layer, batchmean; RepDistiller weights it by 3000) and
    mdistiller ``sp_loss(g_s, g_t)`` (the sum over layers) normalize the rows of ``G`` by their **L2** norm (the
    default, ``normalize="l2"``). torchdistill's ``SPKDLoss(reduction)`` computes ``normalize(G, 1)``: the second
    positional argument of ``F.normalize`` is ``p``, so its rows are **L1**-normalized and its values differ;
    ``normalize="l1"`` reproduces it exactly (value and gradient), as does :class:`fastkd.SPKDLoss`
    ("batchmean" divides by N^2, any other reduction of torchdistill does not: our ``"sum"``).

    Args:
        g_s, g_t: one feature pair (two tensors ``[N, ...]``, widths may differ) or two equal-length non-empty
            lists/tuples of layer tensors.
        reduction: ``"batchmean"`` (default) or ``"sum"``.
        weights: for lists, one finite weight >= 0 per layer (default all 1): the result is
            ``sum_l weights[l] * loss_l`` (torchdistill's per-pair weights).
        normalize: ``"l2"`` (default; RepDistiller, mdistiller) or ``"l1"`` (torchdistill ``SPKDLoss``). The
            fused kernel implements ``"l2"``; ``"l1"`` runs as a plain-PyTorch composition (exact value and
            gradient, not fused: two N x N Gram matrices and autograd's intermediates).

    Returns:
        A 0-dim loss (RepDistiller/mdistiller return shape (1,), which broadcasts the same; the
        :class:`fastkd.Similarity` module keeps their per-layer shape (1,)). The teacher gets the exact
        gradient iff it requires grad (the anchors do not detach it). N = 0 gives 0.

    Numerics: two N x N Gram matrices per layer (GEMMs), fp32 accumulation, memory O(N^2), deterministic run to run (the Gram GEMMs are not bitwise across thread counts).
    """
    losses, _ = _sp_layers(g_s, g_t, reduction, normalize)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


# ---- PKT ---------------------------------------------------------------------------------------------------
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), fused. With ``F`` flattened to
    ``[N, D]`` on each side:

    .. math:: \hat x_i = \frac{x_i}{\lVert x_i \rVert + \epsilon}, \quad S = \frac{\hat X \hat X^\top + 1}{2},
              \quad P = S / \mathrm{rowsum}(S), \quad
              L = \frac{1}{N^2} \sum_{ij} P^t_{ij} \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    NaN entries of ``x_hat`` are set to 0, as the anchors do.

    Anchors: RepDistiller ``PKT()`` (``cosine_similarity_loss``, RepDistiller weights it by 30000),
    mdistiller ``pkt_loss``, torchdistill ``PKTLoss(eps=1e-7)``; same value and gradient.

    Args:
        f_s, f_t: student and teacher features ``[N, ...]`` (widths may differ), flattened per sample (the
            anchors need ``[N, D]``). The teacher gets the exact gradient iff it requires grad.
        eps: finite, > 0.

    Deviation: a zero student row gets the finite gradient of ``x / (||x|| + eps)`` (the anchors'
    ``sqrt(sum(x^2))`` gives NaN there). N = 0 gives 0.

    Numerics: the loss is a mean of N^2 log-ratio terms that cancel: in fp32 it carries ~1e-8 absolute error
    (so does the eager anchor). Memory O(N^2), deterministic run to run (not bitwise across thread counts: GEMMs).
    """
    v.check_feature_pair(f_s, f_t)
    e = v.check_positive("eps", eps)
    if not _relation_kernel("pkt_forward"):
        return reference.pkt_loss(f_s, f_t, e)
    loss, _, _ = torch.ops.fastkd.pkt_forward(_flat2d(f_s), _flat2d(f_t), e, _wants_grad(f_s), _wants_grad(f_t))
    return loss


# ---- CC ----------------------------------------------------------------------------------------------------
def cc_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    max_p: int = 2,
    reduction: str = "batchmean",
) -> torch.Tensor:
    r"""Correlation congruence (Peng et al., ICCV 2019), fused, with torchdistill ``CCKDLoss`` semantics.
    With ``G = F F^T`` on each side's ``[N, D]`` features:

    .. math:: C = G \ (\text{"bilinear"}), \qquad
              C = e^{-2\gamma} \sum_{p=0}^{P} \frac{(2\gamma)^p}{p!} G^{\circ p} \ (\text{"gaussian"}), \qquad
              L = \lVert C_s - C_t \rVert_F \,/\, N^2 \ (\text{"batchmean"}) \text{ or } /\, 1 \ (\text{"sum"})

    "gaussian" is the order-``P`` Taylor expansion of ``exp(-gamma ||x_i - x_j||^2)`` (exact for unit-norm
    rows); the features are used as given, not normalized (torchdistill feeds the raw outputs of its
    ``Linear4CCKD`` layer). Note the loss is the Frobenius norm itself, **not squared** (``torch.dist``), as
    torchdistill; its gradient at ``C_s == C_t`` is 0.

    Args:
        f_s, f_t: features ``[N, ...]`` (widths may differ). The teacher gets the exact gradient iff it
            requires grad.
        kernel: ``"gaussian"`` (default) or ``"bilinear"``.
        gamma: finite, > 0; max_p: int >= 1 (a bool is rejected). Both validated for "bilinear" too.
        reduction: ``"batchmean"`` (torchdistill's shipped config) or ``"sum"`` (the undivided norm).

    torchdistill builds ``C`` with a Python loop over rows; here it is elementwise on ``G``. N = 0 gives 0
    (the anchor: NaN). RepDistiller's ``Correlation`` is a different loss (consecutive pairs only).
    Memory O(N^2), deterministic run to run (not bitwise across thread counts: GEMMs).
    """
    v.check_feature_pair(f_s, f_t)
    v.check_choice("kernel", kernel, v.CC_KERNELS)
    gm = v.check_positive("gamma", gamma)
    mp = v.check_max_p(max_p)
    v.check_relation_reduction(reduction)
    if not _relation_kernel("cc_forward"):
        return reference.cc_loss(f_s, f_t, kernel, gm, mp, reduction)
    loss, _, _ = torch.ops.fastkd.cc_forward(
        _flat2d(f_s), _flat2d(f_t), kernel, gm, mp, reduction, _wants_grad(f_s), _wants_grad(f_t)
    )
    return loss


# ---- AT and NST: RepDistiller's pooling ----------------------------------------------------------------------
def _pool_pair(
    f_s: torch.Tensor, f_t: torch.Tensor, names: Tuple[str, str]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's Attention / NSTLoss pooling, after the shape checks: if the heights differ, the map with
    the larger height is adaptive-average-pooled (in the compute dtype) to a *square* (h, h) of the smaller
    height (the width is not looked at); then the spatial shapes must agree."""
    if not v.check_spatial_pair(f_s, f_t, names):
        return f_s, f_t
    _, cdtype = _dtypes(f_s, f_t)
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s.to(cdtype), (t_h, t_h))
    else:
        f_t = F.adaptive_avg_pool2d(f_t.to(cdtype), (s_h, s_h))
    v.check_pooled_spatial(f_s, f_t, names)
    return f_s, f_t


def _pooled_layers(g_s: Features, g_t: Features):
    """Validates every layer pair (shapes, pooling) before any loss runs. Returns ``(pairs, is_list)`` with
    ``pairs = [(pooled f_s, pooled f_t, loss dtype), ...]``."""
    list_s, list_t, is_list = v.check_layers(g_s, g_t, 3, "[N, C, *spatial]")
    pairs = []
    for i, (a, b) in enumerate(zip(list_s, list_t)):
        out_dtype, _ = _dtypes(a, b)
        a, b = _pool_pair(a, b, _layer_names(i, is_list))
        pairs.append((a, b, out_dtype))
    return pairs, is_list


def _at_pair(f_s: torch.Tensor, f_t: torch.Tensor, out_dtype: torch.dtype, p: float, mode: str) -> torch.Tensor:
    """One pooled, validated layer pair (equal spatial sizes): 0-dim loss in ``out_dtype``."""
    if not _relation_kernel("at_forward"):
        return reference.at_loss(f_s, f_t, p, mode=mode).to(out_dtype)
    loss, _, _ = torch.ops.fastkd.at_forward(_flat3d(f_s), _flat3d(f_t), p, mode, _wants_grad(f_s), _wants_grad(f_t))
    return loss.to(out_dtype)


def _at_layers(g_s: Features, g_t: Features, p: float, mode: str) -> Tuple[List[torch.Tensor], bool]:
    pp = v.check_positive("p", p)
    v.check_choice("mode", mode, v.AT_MODES)
    pairs, is_list = _pooled_layers(g_s, g_t)
    return [_at_pair(a, b, dt, pp, mode) for a, b, dt in pairs], is_list


def at_loss(
    g_s: Features,
    g_t: Features,
    p: float = 2,
    *,
    mode: str = "code",
    weights: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), fused. Per layer, on maps
    ``[N, C, *spatial]`` flattened to ``[N, C, S]``:

    .. math:: a = \mathrm{normalize}\Big(\frac{1}{C}\sum_c f_c^{\,p}\Big) \ (\text{"code"}), \quad
              L = \frac{1}{N S}\sum_{n,s} (a^s_{ns} - a^t_{ns})^2; \qquad
              a = \mathrm{normalize}\Big(\sum_c f_c^{\,p}\Big) \ (\text{"paper"}), \quad
              L = \frac{1}{N}\sum_n \lVert a^s_n - a^t_n \rVert_2

    (``normalize`` over the spatial positions, eps 1e-12; "paper" uses the L2 norm per sample, not squared).

    Anchors: RepDistiller ``Attention(p=2)`` (per layer; RepDistiller weights it by 1000), mdistiller
    ``at_loss(g_s, g_t, p)`` (sum over layers), torchdistill ``ATLoss(at_pairs, mode='code'|'paper')`` (p = 2,
    weighted pairs; paper mode divides by the batch size).

    Pooling (RepDistiller's rule, kept): if the heights (dim 2) differ, the taller map is
    ``F.adaptive_avg_pool2d``-ed to a *square* ``(h, h)`` of the smaller height; the widths are never
    compared. Different heights need 4-D maps; equal heights with different spatial shapes, or spatial shapes
    that still differ after pooling, are a ValueError. Channel counts may differ.

    Args:
        g_s, g_t: one pair of maps or two equal-length non-empty lists/tuples of layer maps.
        p: finite, > 0 (float allowed; ``f.pow(p)`` semantics: NaN for negative features with a non-integer
            p, as the anchors).
        mode: ``"code"`` (default; RepDistiller/mdistiller/torchdistill 'code') or ``"paper"``.
        weights: for lists, one finite weight >= 0 per layer (default all 1): ``sum_l weights[l] * loss_l``.

    Returns:
        A 0-dim loss. The teacher gets the exact gradient iff it requires grad (the anchors do not detach it).

    Deviation: ``p`` applies in "paper" mode too (torchdistill hard-codes 2; p = 2 reproduces it). N = 0 gives
    0. Numerics: one read of each map for the channel reduction, one more for the gradient; deterministic.
    """
    losses, _ = _at_layers(g_s, g_t, p, mode)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


def _nst_pair(f_s: torch.Tensor, f_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """One pooled, validated layer pair: the squared MMD with the kernel <a, b>^2 through batched Grams."""
    _, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    # Under torch.autocast the bmm would run in float16 / bfloat16: the composition runs with autocast off,
    # in float32 (float64 for float64 input), as every fastkd op does.
    with torch.autocast(f_s.device.type, enabled=False):
        return _nst_terms(f_s, f_t, cdtype).to(out_dtype)


def _nst_terms(f_s: torch.Tensor, f_t: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    s = F.normalize(_flat3d(f_s).to(cdtype), p=2.0, dim=2, eps=_NORMALIZE_EPS)  # [N, C_s, S]
    t = F.normalize(_flat3d(f_t).to(cdtype), p=2.0, dim=2, eps=_NORMALIZE_EPS)  # [N, C_t, S]
    with torch.no_grad():  # RepDistiller detaches K(t, t) only
        k_tt = torch.bmm(t, t.transpose(1, 2)).pow(2).mean()
    k_ss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean()
    k_st = torch.bmm(s, t.transpose(1, 2)).pow(2).mean()
    return k_tt + k_ss - 2.0 * k_st


def _nst_layers(g_s: Features, g_t: Features) -> Tuple[List[torch.Tensor], bool]:
    pairs, is_list = _pooled_layers(g_s, g_t)
    return [_nst_pair(a, b, dt) for a, b, dt in pairs], is_list


def nst_loss(g_s: Features, g_t: Features, *, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    r"""Neuron selectivity transfer (Huang & Wang, 2017): the squared MMD with the polynomial kernel
    ``k(a, b) = <a, b>^2`` between the channels of the two maps. Per layer, with each channel's map
    L2-normalized over the spatial positions (``S [N, C_s, HW]``, ``T [N, C_t, HW]``):

    .. math:: L = \mathrm{mean}\big((T T^\top)^{\circ 2}\big) + \mathrm{mean}\big((S S^\top)^{\circ 2}\big)
              - 2\,\mathrm{mean}\big((S T^\top)^{\circ 2}\big)

    (means over ``N C_t^2``, ``N C_s^2`` and ``N C_s C_t`` entries), with the ``K(t, t)`` term detached.

    Anchors: RepDistiller ``NSTLoss()`` (per layer), mdistiller ``nst_loss`` (sum over layers); same value and
    gradient. Pooling as :func:`at_loss` (RepDistiller's square pooling of the taller map).

    Args:
        g_s, g_t: one pair of maps ``[N, C, *spatial]`` or two equal-length non-empty lists/tuples of them.
        weights: for lists, one finite weight >= 0 per layer (default all 1): ``sum_l weights[l] * loss_l``.

    Returns:
        A 0-dim loss. Kept on purpose (RepDistiller's quirk): a teacher that requires grad gets the gradient of
        the cross term ``-2 mean K(s, t)`` only. N = 0 gives 0.

    Numerics: plain PyTorch (no custom op): batched Gram matrices (``torch.bmm``, ``[N, C, C]``) instead of the
    anchor's ``[N, C, C, HW]`` broadcast; fp32 accumulation (float64 for float64 input).
    """
    losses, _ = _nst_layers(g_s, g_t)
    w = v.check_layer_weights(weights, len(losses))
    return _weighted_sum(losses, w)


# ---- FitNet ------------------------------------------------------------------------------------------------
def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., ICLR 2015) without a regressor:
    ``mean((f_s - f_t)^2)`` (``reduction="mean"``: RepDistiller ``HintLoss()`` = ``nn.MSELoss()``, mdistiller's
    FitNet ``F.mse_loss``) or its sum (``"sum"``: torchdistill's ``MSELoss(reduction='sum')`` configs).

    ``f_s`` and ``f_t`` must have the same shape: to map a student feature onto a differently shaped teacher
    use :class:`fastkd.HintLoss` with shapes (a :class:`fastkd.ConvReg` regressor). The teacher gets the
    gradient iff it requires grad. Computed in float32 (float64 for float64 input) with ``F.mse_loss`` (no
    custom op); N = 0 gives 0.
    """
    v.check_feature_pair(f_s, f_t)
    v.check_same_shape(f_s, f_t)
    v.check_choice("reduction", reduction, reference.HINT_REDUCTIONS)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    return F.mse_loss(f_s.to(cdtype), f_t.to(cdtype), reduction=reduction).to(out_dtype)
