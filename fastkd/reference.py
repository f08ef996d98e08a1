"""Plain-PyTorch implementations of fastkd's losses.

They are the test oracle (run in float64) and what fastkd runs, with a warning, where the compiled kernels
are missing. Same signatures, same argument checks and the same conventions as the fused versions:
masked rows (label == ignore_index) do not count, all-masked input gives 0, and vocabulary entries where
a distribution has zero probability (e.g. -inf logits on both sides) contribute exactly 0, with a finite
gradient. Half-precision input is computed in float32 (float64 input in float64) and the result is returned
in the promoted input dtype.

They are written for exactness and differentiability (``torch.autograd.gradcheck`` in float64), not speed:
every ``0 * log 0`` is a ``torch.where`` on the probability being > 0 whose *both* branches are finite, so
autograd never multiplies a zero by a NaN; DKD is computed from log-sum-exps, never from logs of
probabilities.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fastkd import _codegen
from fastkd import _validation as v
from fastkd import relation_reference as _relation
from fastkd._precision import _dtypes
from fastkd.outputs import LossParts
from fastkd.relation_reference import *  # noqa: F401,F403  (the relation and feature family, re-exported)

# fastkd.relation_reference's helpers that other modules and the tests import from here
HINT_REDUCTIONS = _relation.HINT_REDUCTIONS
_NORMALIZE_EPS = _relation._NORMALIZE_EPS
_cc_matrix = _relation._cc_matrix
_pkt_probs = _relation._pkt_probs
_sp_single = _relation._sp_single
_zero_loss = _relation._zero_loss

__all__ = [
    "kd_loss",
    "fused_linear_kd_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "tvd_loss",
    "dkd_loss",
    "topk_kd_loss",
    "reduce_rows",
    "head_transform",
] + _relation.__all__

NumItems = Union[None, int, float, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------
def reduce_rows(
    per_row: torch.Tensor,
    reduction: str,
    counted: torch.Tensor | int,
    vocab: int,
    num_items: NumItems = None,
) -> torch.Tensor:
    """Applies a fastkd reduction to per-row losses (masked rows already 0).

    "batchmean" divides the sum by ``counted`` (at least 1), "mean" by ``counted * vocab``; a given
    ``num_items`` (``num_items_in_batch``, already validated) replaces ``counted``.
    """
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items is not None:
        denom = torch.as_tensor(num_items, device=per_row.device).to(per_row.dtype)
    else:
        denom = torch.as_tensor(counted, device=per_row.device).clamp_min(1).to(per_row.dtype)
    if reduction == "mean":
        denom = denom * vocab
    return total / denom


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log r)``, exactly 0 where ``p == 0`` (whatever log_r is), with finite
    gradients there: both branches of the final where are finite. Where p > 0 and r == 0 it is +inf; where p
    is NaN it is NaN (a NaN is never dropped, as in the kernels' ``fk_select_nonzero``)."""
    pos = p != 0
    zero = _zero(p)
    diff = torch.where(pos, log_p, zero) - torch.where(pos, log_r, zero)
    return torch.where(pos, p * diff, zero)


def _safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """logsumexp that returns -inf for an all -inf slice with a zero (not NaN) gradient."""
    empty = (x == -math.inf).all(dim=dim, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, _zero(x), x), dim=dim)
    return torch.where(empty.squeeze(dim), torch.full((), -math.inf, dtype=x.dtype, device=x.device), lse)


def _safe_logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)), -inf where both are -inf, with zero (not NaN) gradients there."""
    both = (a == -math.inf) & (b == -math.inf)
    zero = _zero(a)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full((), -math.inf, dtype=a.dtype, device=a.device), out)


def _keep_rows(
    labels: Optional[torch.Tensor], ignore_index: int, per_row_shape: torch.Size, device: torch.device
) -> Tuple[Optional[torch.Tensor], torch.Tensor | int]:
    """(mask of counted rows or None, number of counted rows)."""
    if labels is None:
        return None, math.prod(per_row_shape)
    keep = labels != ignore_index
    return keep, keep.sum()


def _mask(per_row: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return per_row if keep is None else torch.where(keep, per_row, _zero(per_row))


def _fully_masked(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """(student, teacher, empty): rows that are -inf in every entry of both sides are *fully masked*: they
    contribute exactly 0 with a zero gradient (the kernels' ``kd_row_empty``). Their logits are replaced by
    zeros so that no NaN is formed on the way (the gradient through the ``where`` is 0 there); ``empty`` is
    the per-row mask, applied to the row losses with :func:`_drop_masked`."""
    empty = (student_logits == -math.inf).all(-1) & (teacher_logits == -math.inf).all(-1)
    zero = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
    s = torch.where(empty.unsqueeze(-1), zero, student_logits)
    t = torch.where(empty.unsqueeze(-1), zero.to(teacher_logits.dtype), teacher_logits)
    return s, t, empty


def _drop_masked(rows: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, _zero(rows), rows)


def _check_pair(student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch):
    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = _temperature(temperature, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    num = v.check_num_items(num_items_in_batch, reduction)
    return t, num


def _temperature(temperature, student_logits):
    """A float, or a tensor temperature (0-dim or one per row) with its entries checked."""
    t = v.check_temperature_or_tensor(temperature, student_logits)
    if isinstance(t, torch.Tensor):
        v.check_row_temperature_values(t)
    return t


def _per_entry(t):
    """A temperature (float or tensor of the leading shape) broadcastable against [..., V] logits."""
    return t.unsqueeze(-1) if isinstance(t, torch.Tensor) and t.dim() > 0 else t


def standardized(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (torchdistill ``LogitStdKDLoss.standardize``): ``(z - mean) / (eps + std)`` over the
    last dimension, unbiased std."""
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


def counted_weights(token_weights: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    ignore_index: int) -> Optional[torch.Tensor]:
    """The token weights with an ignored row's (``labels == ignore_index``) set to 0: an ignored row is dropped
    whatever it holds, its weight included (a NaN weight there would otherwise make ``0 * NaN`` in the value or,
    through the mask's backward, in the gradients)."""
    if token_weights is None or labels is None:
        return token_weights
    return torch.where(labels == ignore_index, torch.zeros((), dtype=token_weights.dtype,
                                                           device=token_weights.device), token_weights)


def _weighted(rows: torch.Tensor, token_weights: Optional[torch.Tensor], labels: Optional[torch.Tensor],
              ignore_index: int) -> torch.Tensor:
    """Each row's loss times its weight (:func:`counted_weights`)."""
    w = counted_weights(token_weights, labels, ignore_index)
    return rows if w is None else rows * w.to(rows.dtype)


def _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize: bool = False):
    s, te = student_logits.to(cdtype), teacher_logits.to(cdtype)
    if standardize:
        s, te = standardized(s), standardized(te)
    log_q = F.log_softmax(s / _per_entry(t), dim=-1)
    log_p = F.log_softmax(te / _per_entry(t), dim=-1)
    return log_q, log_p


# --------------------------------------------------------------------------------------------------------
# Hinton KD (+ hard-label mix)
# --------------------------------------------------------------------------------------------------------
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
    """Hinton KD in plain PyTorch: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over the last dim, mixed
    with the cross-entropy of the student against ``labels`` as ``alpha * CE + (1 - alpha or beta) * KD``.
    See :func:`fastkd.kd_loss` for the arguments."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    a, w = v.check_mix_weights(alpha, beta)
    v.check_flags(scale_by_temperature=scale_by_temperature, return_parts=return_parts)
    if a != 0.0:
        if labels is None:
            raise ValueError(
                "labels are required when alpha != 0: they are the cross-entropy targets of the hard-label term"
            )
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels")
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize)
    soft_rows = _drop_masked(_plogp_ratio(log_p.exp(), log_p, log_q).sum(-1), empty)
    if scale_by_temperature:
        soft_rows = soft_rows * (t * t)
    soft_rows = _weighted(soft_rows, token_weights, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, soft_rows.shape, soft_rows.device)
    soft_rows = _mask(soft_rows, keep)
    soft = reduce_rows(soft_rows, reduction, counted, vocab, num)
    if a != 0.0:
        s = student_logits.to(cdtype)
        y = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)).long()
        s_y = s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        hard_rows = _mask(_weighted(_drop_masked(torch.logsumexp(s, dim=-1) - s_y, empty), token_weights, labels,
                                    ignore_index), keep)
        # CE is per row, never per vocabulary entry: "mean" divides it by the counted rows, as "batchmean".
        hard = reduce_rows(hard_rows, "batchmean" if reduction == "mean" else reduction, counted, vocab, num)
        loss = a * hard + w * soft
    else:
        hard = torch.zeros_like(soft)
        loss = soft if w == 1.0 else w * soft
    loss = loss.to(out_dtype)
    if return_parts:
        return LossParts(loss, soft.detach().to(out_dtype), hard.detach().to(out_dtype))
    return loss


# --------------------------------------------------------------------------------------------------------
# reverse KL, generalized JSD, TVD
# --------------------------------------------------------------------------------------------------------
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
    """Reverse KL in plain PyTorch: ``T^2 * KL(softmax(s/T) || softmax(t/T))`` per row. +inf where the student
    has mass the teacher lacks. See :func:`fastkd.reverse_kl_loss`."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    v.check_flags(scale_by_temperature=scale_by_temperature)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize)
    rows = _drop_masked(_plogp_ratio(log_q.exp(), log_q, log_p).sum(-1), empty)
    if scale_by_temperature:
        rows = rows * (t * t)
    rows = _weighted(rows, token_weights, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, rows.shape, rows.device)
    return reduce_rows(_mask(rows, keep), reduction, counted, student_logits.shape[-1], num).to(out_dtype)


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
    """Generalized JSD in plain PyTorch, with TRL GKD's ``generalized_jsd_loss`` semantics:
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, ``m = beta * p + (1 - beta) * q``; ``beta = 0`` is
    ``KL(p || q)`` and ``beta = 1`` is ``KL(q || p)``. No T^2 factor. "batchmean" without labels and without
    ``num_items_in_batch`` divides by ``student_logits.shape[0]`` (TRL's quirk: B, not B*T, for [B, T, V]).
    See :func:`fastkd.jsd_loss`."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    b = v.check_beta_unit(beta)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    shape = student_logits.shape
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize)
    p, q = log_p.exp(), log_q.exp()
    if b == 0.0:
        elems = _plogp_ratio(p, log_p, log_q)
    elif b == 1.0:
        elems = _plogp_ratio(q, log_q, log_p)
    else:
        log_m = _safe_logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        elems = b * _plogp_ratio(p, log_p, log_m) + (1.0 - b) * _plogp_ratio(q, log_q, log_m)
    rows = _weighted(_drop_masked(elems.sum(-1), empty), token_weights, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, rows.shape, rows.device)
    if reduction == "batchmean" and keep is None and len(shape) >= 2:
        counted = shape[0]  # TRL: jsd.sum() / jsd.size(0); "mean" is jsd.mean() over all rows
    return reduce_rows(_mask(rows, keep), reduction, counted, student_logits.shape[-1], num).to(out_dtype)


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
    """Total variation distance in plain PyTorch: ``0.5 * sum_j |p_j - q_j|`` per row (no T^2); the
    gradient at ties is 0 (``torch.abs``). See :func:`fastkd.tvd_loss`."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize)
    q, p = log_q.exp(), log_p.exp()
    rows = _weighted(_drop_masked(0.5 * (p - q).abs().sum(-1), empty), token_weights, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, rows.shape, rows.device)
    return reduce_rows(_mask(rows, keep), reduction, counted, student_logits.shape[-1], num).to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# DKD
# --------------------------------------------------------------------------------------------------------
def _dkd_logs(z: torch.Tensor, y: torch.Tensor, is_target: torch.Tensor):
    """For logits z (already / T) and targets y: (log P(y), log P(not y), log of the softmax over the
    non-target classes, -inf at the target), all from log-sum-exps."""
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    z_nt = torch.where(is_target, torch.full((), -math.inf, dtype=z.dtype, device=z.device), z)
    lse_nt = _safe_logsumexp(z_nt, dim=-1)
    log_y = z_y - lse
    log_nt = lse_nt - lse
    # softmax over the non-target classes; if they all have -inf logits, every entry is -inf (mass 0)
    finite_nt = torch.where(torch.isfinite(lse_nt), lse_nt, _zero(lse_nt))
    log_hat = z_nt - finite_nt.unsqueeze(-1)
    return log_y, log_nt, log_hat


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
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
) -> torch.Tensor:
    """Decoupled KD (mdistiller ``dkd_loss`` semantics) in plain PyTorch, computed exactly from log-sum-exps:
    per row ``T^2 * (alpha * TCKD + beta * NCKD)``, TCKD the KL of the binary (target, rest) distributions,
    NCKD the KL of the softmaxes over the non-target classes. With ``standardize`` both sides' logits are first
    standardized (:func:`standardized`, torchdistill's ``LogitStdKDLoss``); a tensor temperature is differentiated
    by autograd. See :func:`fastkd.dkd_loss`."""
    v.check_logits(student_logits, teacher_logits)
    v.check_num_classes(student_logits, 2, "dkd_loss (it splits the target class from the others)")
    t = _temperature(temperature, student_logits)
    v.check_standardize(standardize, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    v.check_target(target, student_logits, ignore_index, required=True, name="target")
    a = v.check_nonneg_weight("alpha", alpha)
    b = v.check_nonneg_weight("beta", beta)
    num = v.check_num_items(num_items_in_batch, reduction)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    zs, zt = student_logits.to(cdtype), teacher_logits.to(cdtype)
    if standardize:
        zs, zt = standardized(zs), standardized(zt)
    zs, zt = zs / _per_entry(t), zt / _per_entry(t)
    is_target = torch.zeros(zs.shape, dtype=torch.bool, device=zs.device).scatter(-1, y.unsqueeze(-1), True)
    lq_y, lq_nt, lq_hat = _dkd_logs(zs, y, is_target)
    lp_y, lp_nt, lp_hat = _dkd_logs(zt, y, is_target)
    tckd = _plogp_ratio(lp_y.exp(), lp_y, lq_y) + _plogp_ratio(lp_nt.exp(), lp_nt, lq_nt)
    nckd = _plogp_ratio(lp_hat.exp(), lp_hat, lq_hat).sum(-1)
    rows = _weighted(_drop_masked((t * t) * (a * tckd + b * nckd), empty), token_weights, target, ignore_index)
    rows = torch.where(keep, rows, _zero(rows))
    return reduce_rows(rows, reduction, keep.sum(), student_logits.shape[-1], num).to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# any registered divergence, from its spec's formula (fastkd/divergences.py)
# --------------------------------------------------------------------------------------------------------
def _divergence(spec, where: str, student_logits, teacher_logits, params, temperature, *, reduction="batchmean",
                labels=None, ignore_index=-100, scale_by_temperature=None, num_items_in_batch=None,
                token_weights=None, standardize=False):
    values = spec.resolve(params, where)
    spec.check_ranges(values)
    scale = v.resolve_scale_by_temperature(scale_by_temperature, spec.name)
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    named = dict(zip(spec.param_names, values))
    if spec.family == "decoupled":  # DKD: the labels are the class targets
        w = token_weights
        if not scale:  # the T^2 of mdistiller's formula undone, per row (the row weights carry it)
            w = (1.0 if w is None else w) / (torch.as_tensor(t, dtype=torch.float64) * t).expand(
                student_logits.shape[:-1])
        return dkd_loss(student_logits, teacher_logits, labels, **named, temperature=t, reduction=reduction,
                        ignore_index=ignore_index, num_items_in_batch=num, token_weights=w, standardize=standardize)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype, standardize)
    rows = _drop_masked(spec.formula(log_p.exp(), log_q.exp(), log_p, log_q, **named).sum(-1), empty)
    if scale:
        rows = rows * (t * t)
    rows = _weighted(rows, token_weights, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, rows.shape, rows.device)
    return reduce_rows(_mask(rows, keep), reduction, counted, student_logits.shape[-1], num).to(out_dtype)


divergence_loss = _codegen.make_divergence_loss(
    _divergence, __name__, """Any registered divergence in plain PyTorch, from its spec's per-entry formula (the oracle
    of :func:`fastkd.divergence_loss`, twice differentiable). Arguments as there.""")
__all__ += ["divergence_loss"] + _codegen.generate_functions(globals(), _divergence, __name__, "plain PyTorch")


# --------------------------------------------------------------------------------------------------------
# top-k teacher KD
# --------------------------------------------------------------------------------------------------------
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
    """KD against a sparse (top-k) teacher in plain PyTorch. The teacher distribution over the kept entries is
    ``softmax(values / T)`` (``values_are="logits"``) or the given log-probabilities (``"logprobs"``, no /T),
    renormalized over the kept entries (``tail="renormalize"``) or completed by one tail bucket matched
    against the student's mass outside the kept set (``tail="bucket"``; with ``k == V`` there is no tail
    and no tail term, whatever rounding residue ``1 - sum(exp(values))`` has: the values are renormalized). The student is
    ``softmax(student / T)`` over the full vocabulary; ``T`` a float or a tensor (0-dim or one per row, differentiable).
    See :func:`fastkd.topk_kd_loss`."""
    v.check_topk(student_logits, teacher_topk_values, teacher_topk_indices, values_are, tail)
    v.check_labels(labels, student_logits)
    t = _temperature(temperature, student_logits)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    num = v.check_num_items(num_items_in_batch, reduction)
    v.check_flags(scale_by_temperature=scale_by_temperature)
    vocab, k = student_logits.shape[-1], teacher_topk_values.shape[-1]
    v.check_topk_indices_range(teacher_topk_indices, vocab, labels, ignore_index)
    out_dtype, cdtype = _dtypes(student_logits, teacher_topk_values)
    keep, counted = _keep_rows(labels, ignore_index, student_logits.shape[:-1], student_logits.device)
    idx = teacher_topk_indices.long()
    if keep is not None:  # ignored rows may hold any indices: use 0..k-1 there (valid and distinct)
        fill = torch.arange(k, device=idx.device).expand_as(idx)
        idx = torch.where(keep.unsqueeze(-1), idx, fill)
    student_logits, vals, empty = _fully_masked(student_logits, teacher_topk_values.to(cdtype))
    log_q = F.log_softmax(student_logits.to(cdtype) / _per_entry(t), dim=-1)
    log_q_k = log_q.gather(-1, idx)
    if values_are == "logits":
        log_p = F.log_softmax(vals / _per_entry(t), dim=-1)
    elif tail == "renormalize":
        log_p = vals - torch.logsumexp(vals, dim=-1, keepdim=True)
    else:
        # Used as given, with the missing mass p_tail = 1 - sum exp(values) = -expm1(LSE(values)) as one extra
        # bucket, exactly as the kernels decide it (kd_math.h, topk_teacher): with k == V there is no tail, and
        # values that sum to 1 or more (rounding in a cached teacher) have none; then they are renormalized.
        lse = torch.logsumexp(vals, dim=-1, keepdim=True)
        p_tail = -torch.expm1(lse)
        has_tail = (lse < 0) & (k < vocab)  # False for NaN: the NaN renormalized values propagate
        log_p = vals - torch.where(has_tail, torch.zeros((), dtype=cdtype, device=vals.device), lse)
        p_tail = torch.where(has_tail, p_tail, torch.zeros((), dtype=cdtype, device=vals.device)).squeeze(-1)
    p = log_p.exp()
    rows = _plogp_ratio(p, log_p, log_q_k).sum(-1)
    if tail == "bucket" and k < vocab:  # with k == V the kept set is the vocabulary: there is no tail
        log_p_tail = torch.where(p_tail > 0, p_tail, torch.ones((), dtype=cdtype, device=vals.device)).log()
        q_kept = log_q_k.exp().sum(-1)
        kept = torch.zeros(log_q.shape, dtype=torch.bool, device=log_q.device).scatter(-1, idx, True)
        outside = torch.where(kept, torch.full((), -math.inf, dtype=cdtype, device=log_q.device), log_q)
        log_q_tail = torch.where(
            q_kept < 0.5, torch.log1p(-q_kept.clamp(max=0.5)), _safe_logsumexp(outside, dim=-1)
        )
        rows = rows + _plogp_ratio(p_tail, log_p_tail, log_q_tail)
    rows = _drop_masked(rows, empty)
    if scale_by_temperature:
        rows = rows * (t * t)
    rows = _weighted(rows, v.check_token_weights(token_weights, student_logits), labels, ignore_index)
    return reduce_rows(_mask(rows, keep), reduction, counted, vocab, num).to(out_dtype)


def head_transform(z: torch.Tensor, scale: float = 1.0, softcap: float = 0.0) -> torch.Tensor:
    """A head's final logit transform ``softcap(scale * z)``, ``softcap(x) = cap * tanh(x / cap)`` (Cohere's
    ``logit_scale``, then Gemma-2's ``final_logit_softcapping``, as Hugging Face computes them); scale 1 and
    cap 0 leave ``z`` unchanged."""
    if scale != 1.0:
        z = z * scale
    if softcap != 0.0:
        z = torch.tanh(z / softcap) * softcap
    return z


# --------------------------------------------------------------------------------------------------------
# The fused linear head's twin: the unfused composition (full logits, then the loss)
# --------------------------------------------------------------------------------------------------------
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher,
    *,
    student_bias: Optional[torch.Tensor] = None,
    loss: str = "kl",
    beta: Optional[float] = None,
    temperature: v.Temperature = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    soft_weight: Optional[float] = None,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
    scale_by_temperature: Optional[bool] = None,
    num_items_in_batch: NumItems = None,
    return_parts: bool = False,
    student_softcap: Optional[float] = None,
    student_logit_scale: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    teacher_logit_scale: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    standardize: bool = False,
    **params: float,
) -> Union[torch.Tensor, LossParts]:
    """The composition :func:`fastkd.fused_linear_kd_loss` fuses, in plain PyTorch: the full logits
    ``F.linear(student_hidden, student_weight, student_bias)`` (and the teacher's, for a ``TeacherHead``; a
    smaller teacher vocabulary padded with -inf), then :func:`divergence_loss` (``loss`` and its parameters)
    or :func:`topk_kd_loss` on the rows, plus ``hard_label_weight`` times the cross-entropy.
    The teacher is detached. ``chunk_size`` is accepted and ignored (nothing is chunked here). Defaults as
    :func:`fastkd.fused_linear_kd_loss`: ``soft_weight=None`` is ``1 - hard_label_weight`` and
    ``scale_by_temperature=None`` the divergence's own (``T^2`` for "kl" / "reverse_kl", none for "jsd").
    The head transforms are :func:`head_transform` on each side's logits (before the teacher's padding). The
    logits here are in the input dtype (bf16 input: bf16 logits, the eager composition's rounding)."""
    kind, teacher_vocab, t, values, hard, soft, num, scale = v.check_fused_linear(
        student_hidden, student_weight, teacher, student_bias, loss, beta, temperature, labels, ignore_index,
        hard_label_weight, soft_weight, reduction, chunk_size, num_items_in_batch, scale_by_temperature,
        return_parts, params)
    s_scale, s_cap, t_scale, t_cap = v.check_head_transforms(student_logit_scale, student_softcap,
                                                             teacher_logit_scale, teacher_softcap, kind)
    scale_by_temperature = scale
    w = v.check_token_weights(token_weights, student_hidden)
    w = None if w is None else w.reshape(-1)
    v.check_bool("standardize", standardize)
    if standardize and kind == "topk":
        raise ValueError("standardize: a top-k teacher has no full row to standardize")
    lead = student_hidden.shape[:-1]
    logits = head_transform(F.linear(student_hidden, student_weight, student_bias), s_scale, s_cap)
    logits = logits.reshape(-1, student_weight.shape[0])
    vocab = logits.shape[-1]
    rows_labels = None if labels is None else labels.reshape(-1)
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        t = t.reshape(-1)  # one temperature per row of the [rows, V] logits
    common = dict(reduction=reduction, labels=rows_labels, ignore_index=ignore_index, num_items_in_batch=num)
    if kind == "topk":
        k = teacher.values.shape[-1]
        topk_common = dict(common, reduction="none") if w is not None else common
        soft_loss = topk_kd_loss(logits, teacher.values.reshape(-1, k), teacher.indices.reshape(-1, k), t,
                                 values_are=teacher.values_are, tail=teacher.tail,
                                 scale_by_temperature=scale_by_temperature, **topk_common)
        if w is not None:  # weighted rows (an ignored row's weight 0: counted_weights), then the reduction
            counted = rows_labels.ne(ignore_index).sum() if rows_labels is not None else soft_loss.numel()
            soft_loss = reduce_rows(_weighted(soft_loss, w, rows_labels, ignore_index), reduction, counted,
                                    vocab, num)
    else:
        if kind == "head":
            t_logits = F.linear(teacher.hidden, teacher.weight, teacher.bias)
        else:
            t_logits = teacher
        t_logits = head_transform(t_logits.detach(), t_scale, t_cap).reshape(-1, teacher_vocab)
        if teacher_vocab < vocab:
            pad = torch.full((t_logits.shape[0], vocab - teacher_vocab), -math.inf, dtype=t_logits.dtype,
                             device=t_logits.device)
            t_logits = torch.cat([t_logits, pad], dim=-1)
        from fastkd import divergences

        named = dict(zip(divergences.get(loss).param_names, values))
        soft_loss = divergence_loss(logits, t_logits, loss, t, scale_by_temperature=scale_by_temperature, **common,
                                    token_weights=w, standardize=standardize, **named)
    if hard != 0.0:
        # the cross-entropy alone: alpha=1, beta=0 (the KD term against the student itself is 0 anyway)
        hard_loss = kd_loss(logits, logits.detach(), 1.0, alpha=1.0, beta=0.0, token_weights=w, **common)
    else:
        hard_loss = torch.zeros_like(soft_loss)
    out = soft * soft_loss + hard * hard_loss if hard != 0.0 else (soft_loss if soft == 1.0 else soft * soft_loss)
    if reduction == "none":
        out, soft_loss, hard_loss = out.reshape(lead), soft_loss.reshape(lead), hard_loss.reshape(lead)
    if return_parts:
        return LossParts(out, soft_loss.detach(), hard_loss.detach())
    return out


# --------------------------------------------------------------------------------------------------------
# DIST (Huang et al., NeurIPS 2022; torchdistill DISTLoss)
# --------------------------------------------------------------------------------------------------------
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""DIST in plain PyTorch, torchdistill's ``DISTLoss.forward`` written out (the oracle of
    :func:`fastkd.dist_loss`, and what runs where the kernels are missing): ``y = softmax(z / tau)`` per row,
    ``pearson(u, v) = F.cosine_similarity(u - mean(u), v - mean(v), eps=eps)``,
    ``tau^2 * (beta * (1 - mean_rows pearson(y_s, y_t)) + gamma * (1 - mean_columns pearson(y_s^T, y_t^T)))``.
    Same checks as :func:`fastkd.dist_loss`; ``N = 0`` gives 0."""
    from fastkd.dist import _check_dist_args

    beta, gamma, tau, eps = _check_dist_args(student_logits, teacher_logits, beta, gamma, tau, eps)
    out_dtype, compute = _dtypes(student_logits, teacher_logits)
    if student_logits.shape[0] == 0:
        return _zero_loss(student_logits, teacher_logits, dtype=out_dtype)
    y_s = (student_logits.to(compute) / tau).softmax(dim=1)
    y_t = (teacher_logits.to(compute) / tau).softmax(dim=1)

    def inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pearson = F.cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps=eps)
        return 1 - pearson.mean()

    loss = tau**2 * (beta * inter(y_s, y_t) + gamma * inter(y_s.transpose(0, 1), y_t.transpose(0, 1)))
    return loss.to(out_dtype)


__all__ += ["dist_loss"]


# --------------------------------------------------------------------------------------------------------
# Cosine distillation (Liger's LigerFusedLinearCosineSimilarityLoss; fused twin: fastkd.cosine_loss)
# --------------------------------------------------------------------------------------------------------
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
    """Cosine distillation in plain PyTorch: per row ``beta * (1 - cos(s, t)) + alpha * CE(s, y)`` with
    ``cos = <s, t> / (max(||s||, eps) max(||t||, eps))`` on the raw logits. Entries that are -inf on both sides are
    left out of the vectors; a row that is -inf everywhere on both sides contributes 0. "batchmean" and "mean" both
    divide by the counted rows (the cosine is one value per row). See :func:`fastkd.cosine_loss`."""
    from fastkd.cosine import _check_cosine  # the fused function's checks (imported here: it imports this module)

    b, a, e, num, w = _check_cosine(student_logits, teacher_logits, beta, labels, reduction, ignore_index, alpha,
                                    eps, num_items_in_batch, return_parts, token_weights)
    if a != 0.0:  # no op to check the targets' range here
        v.check_target(labels, student_logits, ignore_index, required=True, name="labels")
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    s, t = student_logits.to(cdtype), teacher_logits.to(cdtype)
    both = (s == -math.inf) & (t == -math.inf)
    empty = both.all(-1)
    zero = _zero(s)
    s0, t0 = torch.where(both, zero, s), torch.where(both, zero, t)
    norms = torch.linalg.vector_norm(s0, dim=-1).clamp_min(e) * torch.linalg.vector_norm(t0, dim=-1).clamp_min(e)
    soft_rows = _weighted(_drop_masked(1.0 - (s0 * t0).sum(-1) / norms, empty), w, labels, ignore_index)
    keep, counted = _keep_rows(labels, ignore_index, soft_rows.shape, soft_rows.device)
    soft = reduce_rows(_mask(soft_rows, keep), reduction, counted, 1, num)
    if a != 0.0:
        y = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).long()
        s_safe = torch.where(empty.unsqueeze(-1), zero, s)
        ce_rows = _weighted(_drop_masked(torch.logsumexp(s_safe, -1) - s_safe.gather(-1, y.unsqueeze(-1)).squeeze(-1),
                                         empty), w, labels, ignore_index)
        hard = reduce_rows(_mask(ce_rows, keep), reduction, counted, 1, num)
    else:
        hard = torch.zeros_like(soft)
    loss = b * soft + a * hard
    if return_parts:
        return LossParts(loss.to(out_dtype), soft.detach().to(out_dtype), hard.detach().to(out_dtype))
    return loss.to(out_dtype)
