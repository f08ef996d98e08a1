"""Functional interface of fastkd's losses. Argument order is always (student, teacher[, target]).

Response-based losses (:func:`kd_loss`, :func:`reverse_kl_loss`, :func:`jsd_loss`, :func:`tvd_loss`,
:func:`dkd_loss`, :func:`topk_kd_loss`): every function flattens the leading dimensions of ``[..., V]`` logits
into rows and runs one fused operator (``torch.ops.fastkd.response_forward`` or
``torch.ops.fastkd.topk_kd_forward``) that computes the loss and its gradients in one read of the logits.
:func:`divergence_loss` runs any divergence of the registry (:mod:`fastkd.divergences`) by name; the
registry's divergences without a hand-written function get a generated one here (:func:`skew_kl_loss`,
:func:`skew_reverse_kl_loss`, :func:`symmetric_kl_loss`, :func:`ab_divergence_loss`, ...).
The relation- and feature-based losses (:func:`rkd_loss`, :func:`sp_loss`, :func:`pkt_loss`, :func:`cc_loss`,
:func:`at_loss`, :func:`nst_loss`, :func:`hint_loss`) are defined and documented in
:mod:`fastkd.relation_functional` and re-exported here.

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
* DTensor inputs on a 1-D mesh: ``Shard(-1)`` logits run vocabulary-parallel, row shards locally with the
  global count, replicated ones locally (:mod:`fastkd._dtensor`).
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch

from fastkd import _ops_loader, reference
from fastkd import _codegen
from fastkd import _dtensor
from fastkd import _validation as v
from fastkd import relation_functional as _relation
from fastkd.outputs import LossParts
from fastkd.relation_functional import *  # noqa: F401,F403  (the relation and feature family, re-exported)

# fastkd.relation_functional's names that other modules import from here
Features = _relation.Features
_at_layers = _relation._at_layers
_nst_layers = _relation._nst_layers
_sp_layers = _relation._sp_layers

__all__ = [
    "kd_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "tvd_loss",
    "dkd_loss",
    "topk_kd_loss",
] + _relation.__all__

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


def _row_temperature(temperature, rows_like: torch.Tensor):
    """A checked temperature as the ops take it: ``(None, T)`` for a float, ``(row_temperature, 1.0)`` for a tensor
    (0-dim or of ``rows_like``'s leading shape), expanded to one value per row ``[rows]`` (differentiable)."""
    if not isinstance(temperature, torch.Tensor):
        return None, temperature
    return temperature.expand(rows_like.shape[:-1]).reshape(-1), 1.0


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
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
    eps: float = 1e-7,
):
    """Runs fastkd::response_forward on [..., V] logits; returns (loss, soft, hard) shaped for reduction.
    ``params``: the divergence's parameters in registry order (fastkd/divergences.py). ``temperature``: a float,
    or a checked tensor (0-dim or one per row), passed to the op as one temperature per row."""
    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    row_temperature, temperature = _row_temperature(temperature, student_logits)
    loss, soft, hard, _, _, _ = torch.ops.fastkd.response_forward(
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
        row_temperature,
        None if token_weights is None else token_weights.reshape(-1),
        standardize,
        eps,
        grad_on and row_temperature is not None and row_temperature.requires_grad,
    )
    if reduction == "none":
        lead = student_logits.shape[:-1]
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return loss, soft, hard


def _row_options(student_logits, token_weights, standardize) -> dict:
    """The per-row options every response loss takes, checked: ``token_weights`` and ``standardize`` (keywords
    of the op through :func:`_response` and of the reference functions)."""
    v.check_standardize(standardize, student_logits)
    return {"token_weights": v.check_token_weights(token_weights, student_logits), "standardize": standardize}


def _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index, num_items):
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = v.check_temperature_or_tensor(temperature, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    n = v.check_num_items(num_items, reduction)
    return t, n


@_dtensor.accepts_dtensor
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
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
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
        token_weights: optional weights ``[...]`` (the logits' leading shape), one per row: each counted
            row's loss (both terms) is multiplied by its weight; the divisor of ``"batchmean"``/``"mean"`` stays
            the count of counted rows (or ``num_items_in_batch``). The weights get no gradient.
        standardize: logit standardization ("Logit Standardization in KD", CVPR 2024): each row of student and
            teacher logits becomes ``(z - mean(z)) / (1e-7 + std(z))`` (unbiased std, as torchdistill's
            ``LogitStdKDLoss``) before the temperature, with the exact gradient through mean and std, computed in
            the kernel's own sweeps (no standardized copy). The cross-entropy part uses the raw logits. A
            constant row (std 0) gets no gradient term through its std (torch's autograd of ``std`` gives NaN
            there). Needs ``V >= 2``.

    ``temperature`` may also be a tensor (every response loss accepts it): 0-dim (one temperature, e.g.
    learnable: CTKD's, behind a gradient-reversal layer the caller owns) or of the logits' leading shape
    (instance-wise temperatures). When it requires grad its exact gradient, ``T^2`` factor included, comes
    from per-row sums of the same fused pass: :math:`\partial L / \partial T = f'(T)\,D - f(T)/T \sum_j (s_j
    \partial D / \partial s_j + t_j \partial D / \partial t_j)` with the scaled logits and ``f = T^2`` or 1.
    Every entry must be in ``[2**-63, 2**63]``.

    Example (importance-weighted on-policy distillation with a learnable temperature)::

        log_t = torch.zeros((), requires_grad=True)          # T = exp(log_t) > 0
        w = (labels != -100).float() * importance             # [B, T]
        loss = fastkd.kd_loss(s, t, log_t.exp(), labels=labels, token_weights=w)

    torchdistill's ``KDLoss`` returns the bare KL when ``alpha`` is 0/None or no targets are given
    (``kd_loss(s, t, T, scale_by_temperature=False)``) and ``alpha * CE + beta * T^2 * KL`` otherwise
    (``kd_loss(s, t, T, labels=targets, alpha=alpha, beta=beta)`` when no target equals ``ignore_index``:
    torchdistill keeps such rows in its KL, fastkd drops them from both terms; ``fastkd.integrations.torchdistill``
    is the exact drop-in).

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
    rows = _row_options(student_logits, token_weights, standardize)
    if a != 0.0:
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels", check_range=False)
    if not _use_kernels():
        return reference.kd_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                 ignore_index=ignore_index, scale_by_temperature=scale_by_temperature, alpha=a,
                                 beta=beta, num_items_in_batch=n, return_parts=return_parts, **rows)
    loss, soft, hard = _response(student_logits, teacher_logits, labels, n, "kl", t, soft_weight=b, hard_weight=a,
                                 ignore_index=ignore_index, reduction=reduction,
                                 scale_by_temperature=scale_by_temperature, **rows)
    return LossParts(loss, soft, hard) if return_parts else loss


@_dtensor.accepts_dtensor
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
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
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
    rows = _row_options(student_logits, token_weights, standardize)
    if not _use_kernels():
        return reference.reverse_kl_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                         ignore_index=ignore_index, scale_by_temperature=scale_by_temperature,
                                         num_items_in_batch=n, **rows)
    return _response(student_logits, teacher_logits, labels, n, "reverse_kl", t, ignore_index=ignore_index,
                     reduction=reduction, scale_by_temperature=scale_by_temperature, **rows)[0]


@_dtensor.accepts_dtensor
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
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence, fused, with the formula, ``beta`` convention and ``"batchmean"``
    of TRL's GKD ``generalized_jsd_loss`` (its ``num_items_in_batch`` and ``"none"`` follow fastkd's
    conventions, below; :func:`fastkd.integrations.trl.generalized_jsd_loss` is the exact drop-in):

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
        labels, ignore_index: as :func:`fastkd.kd_loss`.
        num_items_in_batch: as every fastkd loss: replaces the counted rows as the divisor of ``"batchmean"``
            (then equal to TRL's ``sum / num_items_in_batch``) and of ``"mean"`` (``sum / (num_items * V)``),
            an error with ``"sum"`` / ``"none"``. TRL divides the sum by it whatever the reduction: use
            ``reduction="batchmean"`` here, or the drop-in.

    Entries that underflow or are -inf on both sides contribute exactly 0 (TRL's formulation gives NaN
    for -inf entries).
    """
    b = v.check_beta_unit(beta)
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    rows = _row_options(student_logits, token_weights, standardize)
    if not _use_kernels():
        return reference.jsd_loss(student_logits, teacher_logits, b, t, reduction=reduction, labels=labels,
                                  ignore_index=ignore_index, num_items_in_batch=n, **rows)
    if reduction == "batchmean" and labels is None and n is None and student_logits.dim() >= 3 \
            and student_logits.shape[0] > 0:
        n = student_logits.shape[0]  # TRL: jsd.sum() / jsd.size(0) (empty input: 0, as every loss)
    # beta 0 and 1 (forward and reverse KL, TRL's convention) are run by those kernels: the op resolves them
    return _response(student_logits, teacher_logits, labels, n, "jsd", t, params=(b,), ignore_index=ignore_index,
                     reduction=reduction, **rows)[0]


@_dtensor.accepts_dtensor
def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    num_items_in_batch: NumItems = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
) -> torch.Tensor:
    r"""Total variation distance, fused: :math:`\tfrac12 \sum_j |p_j - q_j|` per row, with
    ``p = softmax(t/T)``, ``q = softmax(s/T)`` and no ``T^2`` factor. The gradient takes the subgradient
    ``sign(0) = 0`` where ``p_j == q_j`` (as ``torch.abs``). Arguments as :func:`fastkd.kd_loss`.
    """
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    rows = _row_options(student_logits, token_weights, standardize)
    if not _use_kernels():
        return reference.tvd_loss(student_logits, teacher_logits, t, reduction=reduction, labels=labels,
                                  ignore_index=ignore_index, num_items_in_batch=n, **rows)
    return _response(student_logits, teacher_logits, labels, n, "tvd", t, ignore_index=ignore_index,
                     reduction=reduction, **rows)[0]


@_dtensor.accepts_dtensor
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: v.Temperature = 4.0,
    *,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    num_items_in_batch: NumItems = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
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
        temperature: ``T > 0``: a Python number, or a tensor, 0-dim or one per row ``[...]``, as
            :func:`fastkd.kd_loss`. When it requires grad (CTKD learns DKD's temperature too) its exact gradient,
            ``T^2`` factor included, comes from per-row sums of the same fused pass (the NCKD's KL sums over the
            non-target classes and the target's terms: ``csrc/include/fastkd/row_options.h`` ``dkd_row_dots``).
        reduction: ``"batchmean"`` (mdistiller: sum / batch size), ``"sum"``, ``"mean"``, ``"none"``.
        token_weights: per-row weights ``[...]``, as :func:`fastkd.kd_loss`.
        standardize: logit standardization (LSKD, CVPR 2024, which applies it to DKD as well): each row of both
            sides becomes ``(z - mean(z)) / (1e-7 + std(z))`` (unbiased std, over all ``V`` classes, target
            included) before the temperature, then mdistiller's DKD on those logits, with the same target class;
            the exact gradient through mean and std is computed in the kernel's own sweeps, as
            :func:`fastkd.kd_loss`'s.

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
    rows = _row_options(student_logits, token_weights, standardize)
    if not _use_kernels():
        return reference.dkd_loss(student_logits, teacher_logits, target, a, b, t, reduction=reduction,
                                  ignore_index=ignore_index, num_items_in_batch=n, **rows)
    return _response(student_logits, teacher_logits, target, n, "dkd", t, params=(a, b),
                     ignore_index=ignore_index, reduction=reduction, scale_by_temperature=True, **rows)[0]


@_dtensor.accepts_dtensor
def _divergence(spec, where: str, student_logits, teacher_logits, params, temperature, *, reduction="batchmean",
                labels=None, ignore_index=-100, scale_by_temperature=None, num_items_in_batch=None,
                token_weights=None, standardize=False):
    """The response op for any registered divergence. Python checks what the op cannot see (tensor and Python
    types); the op checks the parameters' ranges (ValueError naming the parameter)."""
    values = spec.resolve(params, where)
    scale = v.resolve_scale_by_temperature(scale_by_temperature, spec.name)  # None: the divergence's default
    t, n = _check_common(student_logits, teacher_logits, labels, temperature, reduction, ignore_index,
                         num_items_in_batch)
    if spec.family == "decoupled":
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels", check_range=False)
    rows = _row_options(student_logits, token_weights, standardize)
    if not _use_kernels():
        return reference.divergence_loss(student_logits, teacher_logits, spec.name, t, reduction=reduction,
                                         labels=labels, ignore_index=ignore_index, scale_by_temperature=scale,
                                         num_items_in_batch=n, **rows, **dict(zip(spec.param_names, values)))
    return _response(student_logits, teacher_logits, labels, n, spec.name, t, params=values,
                     ignore_index=ignore_index, reduction=reduction, scale_by_temperature=scale, **rows)[0]


_DIVERGENCE_LOSS_DOC = r"""Any registered response divergence by name, fused (one read of the logits for the loss and its
    gradients): ``divergence_loss(s, t, "skew_kl", 2.0, skew=0.2)``. The divergences, their parameters and
    defaults are listed in :data:`fastkd.divergences.REGISTRY` (and the README's table).

    Args:
        student_logits, teacher_logits: raw logits ``[..., V]``, as :func:`fastkd.kd_loss`.
        divergence: its name, e.g. ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``, ``"dkd"``.
        temperature: softmax temperature ``T > 0``: a number or a tensor (0-dim or one per row, learnable), as
            :func:`fastkd.kd_loss`, for every divergence (``"dkd"`` included).
        token_weights, standardize: as :func:`fastkd.kd_loss`, for every divergence (``"dkd"``: its class targets
            are the same on the standardized logits).
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
divergence_loss = _codegen.make_divergence_loss(_divergence, __name__, _DIVERGENCE_LOSS_DOC)
__all__ += ["divergence_loss"] + _codegen.generate_functions(globals(), _divergence, __name__, "fused")


@_dtensor.accepts_dtensor
def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: v.Temperature = 1.0,
    *,
    values_are: str = "logits",
    tail: str = "renormalize",
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items_in_batch: NumItems = None,
    token_weights: Optional[torch.Tensor] = None,
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
        temperature: ``T > 0``, a Python number or a tensor, 0-dim or one per row ``[...]``, as
            :func:`fastkd.kd_loss` (it divides the student's logits and, for ``values_are="logits"``, the kept
            values). When it requires grad its exact gradient (``T^2`` factor included) comes from per-row sums of
            the same fused pass; log-probability values do not depend on it.
        token_weights: per-row weights ``[...]``, as :func:`fastkd.kd_loss` (in the kernel).
        Other arguments as :func:`fastkd.kd_loss`.
    """
    t = v.check_temperature_or_tensor(temperature, student_logits)
    weights = v.check_token_weights(token_weights, student_logits)
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
                                      num_items_in_batch=n, token_weights=weights)
    vocab, k = student_logits.shape[-1], teacher_topk_values.shape[-1]
    grad_on = torch.is_grad_enabled()
    row_temperature, t = _row_temperature(t, student_logits)
    loss, _, _ = torch.ops.fastkd.topk_kd_forward(
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
        grad_on and student_logits.requires_grad,
        None if weights is None else weights.reshape(-1),
        row_temperature,
        grad_on and row_temperature is not None and row_temperature.requires_grad,
    )
    if reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    return loss


# DIST (fastkd/dist.py)
from fastkd.dist import dist_loss  # noqa: E402

__all__ = __all__ + ["dist_loss"]

# Cosine distillation (issue 14): defined in fastkd/cosine.py, re-exported here.
from fastkd.cosine import cosine_loss  # noqa: E402

__all__ += ["cosine_loss"]
