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

from fastkd import _validation as v
from fastkd.outputs import LossParts

__all__ = [
    "kd_loss",
    "fused_linear_kd_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "tvd_loss",
    "dkd_loss",
    "topk_kd_loss",
    "reduce_rows",
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


def _dtypes(*tensors: torch.Tensor) -> Tuple[torch.dtype, torch.dtype]:
    """(output dtype = promoted input dtype, compute dtype = float64 for float64 else float32)."""
    out = tensors[0].dtype
    for x in tensors[1:]:
        out = torch.promote_types(out, x.dtype)
    return out, (torch.float64 if out == torch.float64 else torch.float32)


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
    t = v.check_temperature(temperature)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    num = v.check_num_items(num_items_in_batch, reduction)
    return t, num


def _log_softmaxes(student_logits, teacher_logits, t, cdtype):
    log_q = F.log_softmax(student_logits.to(cdtype) / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(cdtype) / t, dim=-1)
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
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype)
    soft_rows = _drop_masked(_plogp_ratio(log_p.exp(), log_p, log_q).sum(-1), empty)
    if scale_by_temperature:
        soft_rows = soft_rows * (t * t)
    keep, counted = _keep_rows(labels, ignore_index, soft_rows.shape, soft_rows.device)
    soft_rows = _mask(soft_rows, keep)
    soft = reduce_rows(soft_rows, reduction, counted, vocab, num)
    if a != 0.0:
        s = student_logits.to(cdtype)
        y = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)).long()
        s_y = s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        hard_rows = _mask(_drop_masked(torch.logsumexp(s, dim=-1) - s_y, empty), keep)
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
) -> torch.Tensor:
    """Reverse KL in plain PyTorch: ``T^2 * KL(softmax(s/T) || softmax(t/T))`` per row. +inf where the student
    has mass the teacher lacks. See :func:`fastkd.reverse_kl_loss`."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    v.check_flags(scale_by_temperature=scale_by_temperature)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype)
    rows = _drop_masked(_plogp_ratio(log_q.exp(), log_q, log_p).sum(-1), empty)
    if scale_by_temperature:
        rows = rows * (t * t)
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
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype)
    p, q = log_p.exp(), log_q.exp()
    if b == 0.0:
        elems = _plogp_ratio(p, log_p, log_q)
    elif b == 1.0:
        elems = _plogp_ratio(q, log_q, log_p)
    else:
        log_m = _safe_logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        elems = b * _plogp_ratio(p, log_p, log_m) + (1.0 - b) * _plogp_ratio(q, log_q, log_m)
    rows = _drop_masked(elems.sum(-1), empty)
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
) -> torch.Tensor:
    """Total variation distance in plain PyTorch: ``0.5 * sum_j |p_j - q_j|`` per row (no T^2); the
    gradient at ties is 0 (``torch.abs``). See :func:`fastkd.tvd_loss`."""
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    q = F.softmax(student_logits.to(cdtype) / t, dim=-1)
    p = F.softmax(teacher_logits.to(cdtype) / t, dim=-1)
    rows = _drop_masked(0.5 * (p - q).abs().sum(-1), empty)
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
) -> torch.Tensor:
    """Decoupled KD (mdistiller ``dkd_loss`` semantics) in plain PyTorch, computed exactly from log-sum-exps:
    per row ``T^2 * (alpha * TCKD + beta * NCKD)``, TCKD the KL of the binary (target, rest) distributions,
    NCKD the KL of the softmaxes over the non-target classes. See :func:`fastkd.dkd_loss`."""
    v.check_logits(student_logits, teacher_logits)
    v.check_num_classes(student_logits, 2, "dkd_loss (it splits the target class from the others)")
    t = v.check_temperature(temperature)
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
    zs = student_logits.to(cdtype) / t
    zt = teacher_logits.to(cdtype) / t
    is_target = torch.zeros(zs.shape, dtype=torch.bool, device=zs.device).scatter(-1, y.unsqueeze(-1), True)
    lq_y, lq_nt, lq_hat = _dkd_logs(zs, y, is_target)
    lp_y, lp_nt, lp_hat = _dkd_logs(zt, y, is_target)
    tckd = _plogp_ratio(lp_y.exp(), lp_y, lq_y) + _plogp_ratio(lp_nt.exp(), lp_nt, lq_nt)
    nckd = _plogp_ratio(lp_hat.exp(), lp_hat, lq_hat).sum(-1)
    rows = _drop_masked((t * t) * (a * tckd + b * nckd), empty)
    rows = torch.where(keep, rows, _zero(rows))
    return reduce_rows(rows, reduction, keep.sum(), student_logits.shape[-1], num).to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# any registered divergence, from its spec's formula (fastkd/divergences.py)
# --------------------------------------------------------------------------------------------------------
def _divergence(spec, where: str, student_logits, teacher_logits, params, temperature, *, reduction="batchmean",
                labels=None, ignore_index=-100, scale_by_temperature=None, num_items_in_batch=None):
    values = spec.resolve(params, where)
    spec.check_ranges(values)
    scale = v.resolve_scale_by_temperature(scale_by_temperature, spec.name)
    t, num = _check_pair(
        student_logits, teacher_logits, temperature, reduction, labels, ignore_index, num_items_in_batch
    )
    named = dict(zip(spec.param_names, values))
    if spec.family == "decoupled":  # DKD: the labels are the class targets
        out = dkd_loss(student_logits, teacher_logits, labels, **named, temperature=t, reduction=reduction,
                       ignore_index=ignore_index, num_items_in_batch=num)
        return out if scale else out / (t * t)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    student_logits, teacher_logits, empty = _fully_masked(student_logits, teacher_logits)
    log_q, log_p = _log_softmaxes(student_logits, teacher_logits, t, cdtype)
    rows = _drop_masked(spec.formula(log_p.exp(), log_q.exp(), log_p, log_q, **named).sum(-1), empty)
    if scale:
        rows = rows * (t * t)
    keep, counted = _keep_rows(labels, ignore_index, rows.shape, rows.device)
    return reduce_rows(_mask(rows, keep), reduction, counted, student_logits.shape[-1], num).to(out_dtype)


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
    """Any registered divergence in plain PyTorch, from its spec's per-entry formula (the oracle of
    :func:`fastkd.divergence_loss`, twice differentiable). Arguments as there."""
    from fastkd import divergences

    return _divergence(divergences.get(divergence), "divergence_loss", student_logits, teacher_logits, params,
                       temperature, reduction=reduction, labels=labels, ignore_index=ignore_index,
                       scale_by_temperature=scale_by_temperature, num_items_in_batch=num_items_in_batch)


def _generate_functions():
    from fastkd import _codegen, divergences

    made = []
    for spec in divergences.REGISTRY.values():
        if spec.generated:
            globals()[spec.function] = _codegen.make_function(spec, _divergence, __name__, "plain PyTorch")
            made.append(spec.function)
    return made


__all__ += ["divergence_loss"] + _generate_functions()


# --------------------------------------------------------------------------------------------------------
# top-k teacher KD
# --------------------------------------------------------------------------------------------------------
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
    """KD against a sparse (top-k) teacher in plain PyTorch. The teacher distribution over the kept entries is
    ``softmax(values / T)`` (``values_are="logits"``) or the given log-probabilities (``"logprobs"``, no /T),
    renormalized over the kept entries (``tail="renormalize"``) or completed by one tail bucket matched
    against the student's mass outside the kept set (``tail="bucket"``; with ``k == V`` there is no tail
    and no tail term, whatever rounding residue ``1 - sum(exp(values))`` has: the values are renormalized). The student is
    ``softmax(student / T)`` over the full vocabulary. See :func:`fastkd.topk_kd_loss`."""
    v.check_topk(student_logits, teacher_topk_values, teacher_topk_indices, values_are, tail)
    v.check_labels(labels, student_logits)
    t = v.check_temperature(temperature)
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
    log_q = F.log_softmax(student_logits.to(cdtype) / t, dim=-1)
    log_q_k = log_q.gather(-1, idx)
    if values_are == "logits":
        log_p = F.log_softmax(vals / t, dim=-1)
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
    return reduce_rows(_mask(rows, keep), reduction, counted, vocab, num).to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# Relation-based losses (RKD distance and angle, SP, PKT, CC) and feature-based losses (AT, NST, FitNet).
#
# Features are [N, ...]: one sample per leading index, flattened per sample to [N, D]; student and teacher
# widths may differ. Computed in float32 (float64 for float64 input, the oracle); the result has the
# promoted input dtype. These follow the anchors' formulas term by term (see the docstrings of
# fastkd.functional), but with exact pairwise differences where the anchors cancel: RKD distances come from
# torch.cdist without the Gram shortcut (exactly 0 for duplicated rows, whatever the common offset).
# --------------------------------------------------------------------------------------------------------
_RKD_DIST_EPS = 1e-12  # RepDistiller pdist: squared distances clamped at eps before the square root
_NORMALIZE_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)
_CHUNK_ELEMS = 1 << 22  # elements per intermediate tensor of the chunked loops below


def _flat(x: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """[N, ...] -> [N, D] in the compute dtype (reshape, not view: N may be 0 and x may be strided)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).to(cdtype)


def _zero_loss(*xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact 0 that is still connected to the inputs' graph (their gradient is then all zeros)."""
    out = torch.zeros((), dtype=dtype, device=xs[0].device)
    for x in xs:
        if x.requires_grad:
            out = out + (x.sum() * 0).to(dtype)
    return out


def _rkd_pdist(x: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``pdist(e, squared=False, eps=1e-12)``: sqrt(max(||x_i - x_j||^2, eps)) off the diagonal,
    0 on it. The squared distances are computed from the differences (torch.cdist without the mm path),
    never as |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>: exact for duplicated rows and large common offsets."""
    n = x.shape[0]
    sq = torch.cdist(x, x, p=2.0, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    d = sq.clamp_min(_RKD_DIST_EPS).sqrt()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.zeros((), dtype=x.dtype, device=x.device), d)


def _rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unweighted RKD distance term on [N, D] compute-dtype features (teacher without gradient).

    Every off-diagonal distance is >= sqrt(1e-12) > 0, so the anchors' ``d[d > 0].mean()`` is the mean over
    the N (N - 1) off-diagonal entries. N < 2 has no pair: 0 (the anchors give NaN, a mean over nothing)."""
    n = s.shape[0]
    if n < 2:
        return _zero_loss(s, dtype=s.dtype)
    pairs = n * (n - 1)
    with torch.no_grad():
        t_d = _rkd_pdist(t)
        t_d = t_d / (t_d.sum() / pairs)
    d = _rkd_pdist(s)
    d = d / (d.sum() / pairs)
    return F.smooth_l1_loss(d, t_d, reduction="mean", beta=1.0)


def _rkd_angle_chunk(s: torch.Tensor, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum over apexes i in [start, stop) and all j, k of SmoothL1(<e_ij, e_ik>_s - <e_ij, e_ik>_t),
    e_ij = normalize(x_j - x_i) (F.normalize, eps 1e-12: the zero vector for j == i and duplicated rows)."""
    with torch.no_grad():
        e_t = F.normalize(t[None, :, :] - t[start:stop, None, :], p=2.0, dim=2, eps=_NORMALIZE_EPS)
        a_t = torch.bmm(e_t, e_t.transpose(1, 2))
    e_s = F.normalize(s[None, :, :] - s[start:stop, None, :], p=2.0, dim=2, eps=_NORMALIZE_EPS)
    a_s = torch.bmm(e_s, e_s.transpose(1, 2))
    return F.smooth_l1_loss(a_s, a_t, reduction="sum", beta=1.0)


def _rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unweighted RKD angle term: the mean over all N^3 triplets (i, j, k) of SmoothL1(a_s - a_t),
    a_ijk = <e_ij, e_ik>. Looped over chunks of apexes i so that no N x N x D or N^3 tensor exists at once;
    with a gradient to compute, each chunk is checkpointed (recomputed in backward) once the problem is
    large, so autograd does not keep the chunks' N x N x D differences either."""
    n = s.shape[0]
    if n == 0:
        return _zero_loss(s, dtype=s.dtype)
    width = max(s.shape[1], t.shape[1], n)
    step = max(1, min(n, _CHUNK_ELEMS // (n * width)))
    checkpoint = s.requires_grad and torch.is_grad_enabled() and n * n * width > _CHUNK_ELEMS
    total = _zero_loss(s, dtype=s.dtype)
    for start in range(0, n, step):
        stop = min(n, start + step)
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as _ckpt

            part = _ckpt(_rkd_angle_chunk, s, t, start, stop, use_reentrant=False)
        else:
            part = _rkd_angle_chunk(s, t, start, stop)
        total = total + part
    return total / (n * n * n)


def _rkd_inputs(f_s: torch.Tensor, f_t: torch.Tensor):
    v.check_feature_pair(f_s, f_t)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    return _flat(f_s, cdtype), _flat(f_t, cdtype).detach(), out_dtype


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational KD (Park et al. 2019) in plain PyTorch, RepDistiller ``RKDLoss(w_d, w_a)`` / mdistiller
    ``rkd_loss`` / torchdistill ``RKDLoss(dist_factor, angle_factor, reduction='mean')`` semantics:
    ``distance_weight * L_dist + angle_weight * L_angle``. The teacher never receives a gradient (the anchors
    compute it under no_grad). A term whose weight is 0 is not computed and contributes exactly 0
    (torchdistill skips it too). See :func:`fastkd.rkd_loss`."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    wd = v.check_nonneg_weight("distance_weight", distance_weight)
    wa = v.check_nonneg_weight("angle_weight", angle_weight)
    loss = _zero_loss(s, dtype=s.dtype)
    if wd != 0.0:
        loss = loss + wd * _rkd_distance(s, t)
    if wa != 0.0:
        loss = loss + wa * _rkd_angle(s, t)
    return loss.to(out_dtype)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The unweighted RKD distance term: SmoothL1 (beta 1, mean over the N^2 entries, diagonal included) of
    the pairwise distance matrices, each divided by the mean of its positive (off-diagonal) entries."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    return _rkd_distance(s, t).to(out_dtype)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The unweighted RKD angle term: SmoothL1 (beta 1, mean over the N^3 triplets) of
    ``a_ijk = <normalize(x_j - x_i), normalize(x_k - x_i)>`` (0 where j == i or k == i)."""
    s, t, out_dtype = _rkd_inputs(f_s, f_t)
    return _rkd_angle(s, t).to(out_dtype)


def _layers_sum(g_s, g_t, weights, single, min_dim=2, what="[N, ...]"):
    """Applies ``single(f_s, f_t, names)`` to one pair or to every layer pair and returns the weighted sum
    (``names``: the argument names for error messages, e.g. ``("g_s[1]", "g_t[1]")``)."""
    list_s, list_t, is_list = v.check_layers(g_s, g_t, min_dim, what)
    w = v.check_layer_weights(weights, len(list_s))
    total = None
    for i, (wi, a, b) in enumerate(zip(w, list_s, list_t)):
        names = (f"g_s[{i}]", f"g_t[{i}]") if is_list else ("g_s", "g_t")
        term = single(a, b, names)
        term = term if wi == 1.0 else wi * term
        total = term if total is None else total + term
    return total


def _sp_single(f_s: torch.Tensor, f_t: torch.Tensor, reduction: str, names=("g_s", "g_t"),
               p: float = 2.0) -> torch.Tensor:
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    s, t = _flat(f_s, cdtype), _flat(f_t, cdtype)
    g_s = F.normalize(s @ s.t(), p=p, dim=1, eps=_NORMALIZE_EPS)
    g_t = F.normalize(t @ t.t(), p=p, dim=1, eps=_NORMALIZE_EPS)
    diff = g_t - g_s
    loss = (diff * diff).sum()
    if reduction == "batchmean":
        loss = loss / (n * n)
    return loss.to(out_dtype)


def sp_loss(g_s, g_t, *, reduction: str = "batchmean", weights=None, normalize: str = "l2") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019) in plain PyTorch: ``G = normalize(F F^T)`` row-wise
    (F.normalize, eps 1e-12) for each side, ``||G_t - G_s||_F^2``, divided by N^2 for "batchmean"
    (RepDistiller ``Similarity``, torchdistill ``SPKDLoss(reduction='batchmean')``), not for "sum".
    ``g_s``, ``g_t``: one feature pair or lists of layer pairs (weighted sum, mdistiller ``sp_loss``).
    Not translation invariant: features are used as given. ``normalize="l1"`` normalizes the rows of ``G`` by
    their L1 norm instead (torchdistill's ``SPKDLoss``). See :func:`fastkd.sp_loss`."""
    v.check_relation_reduction(reduction)
    p = v.SP_NORMALIZE[v.check_choice("normalize", normalize, tuple(v.SP_NORMALIZE))]
    return _layers_sum(g_s, g_t, weights, lambda a, b, names: _sp_single(a, b, reduction, names, p))


def _pkt_probs(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalized ``(cos + 1) / 2`` similarities of PKT: x / (||x|| + eps) (NaN entries set to 0, as the
    anchors do after the division), S = (x x^T + 1) / 2, P = S / row sums."""
    norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True)  # gradient 0 (not NaN) at a zero row
    x = x / (norm + eps)
    x = torch.where(torch.isnan(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018) in plain PyTorch, RepDistiller ``PKT`` /
    torchdistill ``PKTLoss`` semantics: ``mean_ij P_t * log((P_t + eps) / (P_s + eps))`` over the N^2 entries.
    Features are flattened per sample (the anchors need [N, D]). A zero student row gets the finite gradient
    of x / (||x|| + eps) (the anchors' sqrt gives NaN there). See :func:`fastkd.pkt_loss`."""
    v.check_feature_pair(f_s, f_t)
    e = v.check_positive("eps", eps)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    p_s = _pkt_probs(_flat(f_s, cdtype), e)
    p_t = _pkt_probs(_flat(f_t, cdtype), e)
    return torch.mean(p_t * torch.log((p_t + e) / (p_s + e))).to(out_dtype)


def _cc_matrix(x: torch.Tensor, kernel: str, gamma: float, max_p: int) -> torch.Tensor:
    """torchdistill CCKDLoss's correlation matrix: ``x x^T`` (bilinear) or the order-``max_p`` Taylor expansion
    of the Gaussian RBF, ``exp(-2 gamma) * sum_{p=0..P} (2 gamma)^p / p! * (x x^T)^p`` (gaussian)."""
    g = x @ x.t()
    if kernel == "bilinear":
        return g
    out = torch.ones_like(g)
    for p in range(1, max_p + 1):
        out = out + ((2.0 * gamma) ** p / math.factorial(p)) * g.pow(p)
    return out * math.exp(-2.0 * gamma)


def cc_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    max_p: int = 2,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Correlation congruence (Peng et al. 2019) in plain PyTorch, torchdistill ``CCKDLoss`` semantics:
    ``||C_s - C_t||_F`` (the Frobenius norm itself, not its square), divided by N^2 for "batchmean", not for
    "sum". The gradient at C_s == C_t is 0 (torch.dist's). ``gamma`` and ``max_p`` are only used by the
    gaussian kernel (but are validated either way). See :func:`fastkd.cc_loss`."""
    v.check_feature_pair(f_s, f_t)
    v.check_choice("kernel", kernel, v.CC_KERNELS)
    gm = v.check_positive("gamma", gamma)
    mp = v.check_max_p(max_p)
    v.check_relation_reduction(reduction)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    c_s = _cc_matrix(_flat(f_s, cdtype), kernel, gm, mp)
    c_t = _cc_matrix(_flat(f_t, cdtype), kernel, gm, mp)
    loss = torch.linalg.vector_norm(c_s - c_t)  # torch.dist(c_s, c_t, 2): subgradient 0 at 0
    if reduction == "batchmean":
        loss = loss / (n * n)
    return loss.to(out_dtype)


def _pool_like_repdistiller(f_s: torch.Tensor, f_t: torch.Tensor, pool: bool, names=("g_s", "g_t")):
    """RepDistiller's Attention / NSTLoss pooling: if the heights differ, the map with the larger height is
    adaptive-average-pooled to a square (h, h) of the smaller height (the width is not looked at)."""
    if not pool:
        return f_s, f_t
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    else:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    v.check_pooled_spatial(f_s, f_t, names)
    return f_s, f_t


def _attention_map(f: torch.Tensor, p: float, mode: str) -> torch.Tensor:
    """``normalize(mean_c f^p)`` flattened over the spatial positions ("code"; torchdistill's "paper" sums
    over the channels, which only matters below the normalize eps)."""
    a = f.pow(p)
    a = a.sum(1) if mode == "paper" else a.mean(1)
    return F.normalize(a.reshape(f.shape[0], -1), p=2.0, dim=1, eps=_NORMALIZE_EPS)


def _at_single(f_s: torch.Tensor, f_t: torch.Tensor, p: float, mode: str, names=("g_s", "g_t")) -> torch.Tensor:
    pool = v.check_spatial_pair(f_s, f_t, names)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    f_s, f_t = _pool_like_repdistiller(f_s.to(cdtype), f_t.to(cdtype), pool, names)
    diff = _attention_map(f_s, p, mode) - _attention_map(f_t, p, mode)
    if mode == "paper":
        loss = torch.linalg.vector_norm(diff, ord=2, dim=1).sum() / n
    else:
        loss = diff.pow(2).mean()
    return loss.to(out_dtype)


def at_loss(g_s, g_t, p: float = 2, *, mode: str = "code", weights=None) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) in plain PyTorch. ``mode="code"``: RepDistiller
    ``Attention(p)`` / torchdistill ``ATLoss(mode='code')``, ``mean((a_s - a_t)^2)`` over N x HW with
    ``a = normalize(mean_c f^p)``; ``mode="paper"``: torchdistill ``ATLoss(mode='paper')``,
    ``sum_n ||a_s - a_t||_2 / N`` with the channel sum. Maps of different heights are pooled as RepDistiller
    does. ``g_s``, ``g_t``: one pair of [N, C, *spatial] maps or lists of layer pairs (weighted sum,
    mdistiller ``at_loss``). See :func:`fastkd.at_loss`."""
    pp = v.check_positive("p", p)
    v.check_choice("mode", mode, v.AT_MODES)
    return _layers_sum(g_s, g_t, weights, lambda a, b, names: _at_single(a, b, pp, mode, names), 3,
                       "[N, C, *spatial]")


def _nst_single(f_s: torch.Tensor, f_t: torch.Tensor, names=("g_s", "g_t")) -> torch.Tensor:
    pool = v.check_spatial_pair(f_s, f_t, names)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    n = f_s.shape[0]
    if n == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    f_s, f_t = _pool_like_repdistiller(f_s.to(cdtype), f_t.to(cdtype), pool, names)
    s = F.normalize(f_s.reshape(n, f_s.shape[1], -1), p=2.0, dim=2, eps=_NORMALIZE_EPS)
    t = F.normalize(f_t.reshape(n, f_t.shape[1], -1), p=2.0, dim=2, eps=_NORMALIZE_EPS)
    # poly_kernel(a, b) = (<a_c, b_c'>)^2 over channel pairs: a batched Gram, never [N, C, C, HW]
    k_tt = torch.bmm(t, t.transpose(1, 2)).pow(2).mean().detach()
    k_ss = torch.bmm(s, s.transpose(1, 2)).pow(2).mean()
    k_st = torch.bmm(s, t.transpose(1, 2)).pow(2).mean()
    return (k_tt + k_ss - 2.0 * k_st).to(out_dtype)


def nst_loss(g_s, g_t, *, weights=None) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017) in plain PyTorch, RepDistiller ``NSTLoss`` semantics:
    the squared MMD with the polynomial kernel k(a, b) = <a, b>^2 between the channel-wise L2-normalized
    maps: ``mean K(t, t) (detached) + mean K(s, s) - 2 mean K(s, t)``. The teacher receives a gradient (from the
    cross term only) if it requires grad. See :func:`fastkd.nst_loss`."""
    return _layers_sum(g_s, g_t, weights, _nst_single, 3, "[N, C, *spatial]")


HINT_REDUCTIONS = ("mean", "sum")


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """FitNets hint loss without a regressor: ``mean((f_s - f_t)^2)`` (RepDistiller ``HintLoss``, an
    ``nn.MSELoss()``) or its sum (``reduction="sum"``, torchdistill's ``MSELoss(reduction='sum')`` configs);
    the shapes must match. See :class:`fastkd.HintLoss` for the regressor."""
    v.check_feature_pair(f_s, f_t)
    v.check_same_shape(f_s, f_t)
    v.check_choice("reduction", reduction, HINT_REDUCTIONS)
    out_dtype, cdtype = _dtypes(f_s, f_t)
    if f_s.shape[0] == 0:
        return _zero_loss(f_s, f_t, dtype=out_dtype)
    return F.mse_loss(f_s.to(cdtype), f_t.to(cdtype), reduction=reduction).to(out_dtype)


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
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    soft_weight: Optional[float] = None,
    reduction: str = "batchmean",
    chunk_size: Optional[int] = None,
    scale_by_temperature: Optional[bool] = None,
    num_items_in_batch: NumItems = None,
    return_parts: bool = False,
    **params: float,
) -> Union[torch.Tensor, LossParts]:
    """The composition :func:`fastkd.fused_linear_kd_loss` fuses, in plain PyTorch: the full logits
    ``F.linear(student_hidden, student_weight, student_bias)`` (and the teacher's, for a ``TeacherHead``; a
    smaller teacher vocabulary padded with -inf), then :func:`divergence_loss` (``loss`` and its parameters)
    or :func:`topk_kd_loss` on the rows, plus ``hard_label_weight`` times the cross-entropy.
    The teacher is detached. ``chunk_size`` is accepted and ignored (nothing is chunked here). Defaults as
    :func:`fastkd.fused_linear_kd_loss`: ``soft_weight=None`` is ``1 - hard_label_weight`` and
    ``scale_by_temperature=None`` the divergence's own (``T^2`` for "kl" / "reverse_kl", none for "jsd")."""
    kind, teacher_vocab, t, values, hard, soft, num, scale = v.check_fused_linear(
        student_hidden, student_weight, teacher, student_bias, loss, beta, temperature, labels, ignore_index,
        hard_label_weight, soft_weight, reduction, chunk_size, num_items_in_batch, scale_by_temperature,
        return_parts, params)
    scale_by_temperature = scale
    lead = student_hidden.shape[:-1]
    logits = F.linear(student_hidden, student_weight, student_bias).reshape(-1, student_weight.shape[0])
    vocab = logits.shape[-1]
    rows_labels = None if labels is None else labels.reshape(-1)
    common = dict(reduction=reduction, labels=rows_labels, ignore_index=ignore_index, num_items_in_batch=num)
    if kind == "topk":
        k = teacher.values.shape[-1]
        soft_loss = topk_kd_loss(logits, teacher.values.reshape(-1, k), teacher.indices.reshape(-1, k), t,
                                 values_are=teacher.values_are, tail=teacher.tail,
                                 scale_by_temperature=scale_by_temperature, **common)
    else:
        if kind == "head":
            t_logits = F.linear(teacher.hidden, teacher.weight, teacher.bias)
        else:
            t_logits = teacher
        t_logits = t_logits.detach().reshape(-1, teacher_vocab)
        if teacher_vocab < vocab:
            pad = torch.full((t_logits.shape[0], vocab - teacher_vocab), -math.inf, dtype=t_logits.dtype,
                             device=t_logits.device)
            t_logits = torch.cat([t_logits, pad], dim=-1)
        from fastkd import divergences

        named = dict(zip(divergences.get(loss).param_names, values))
        soft_loss = divergence_loss(logits, t_logits, loss, t, scale_by_temperature=scale_by_temperature, **common,
                                    **named)
    if hard != 0.0:
        # the cross-entropy alone: alpha=1, beta=0 (the KD term against the student itself is 0 anyway)
        hard_loss = kd_loss(logits, logits.detach(), 1.0, alpha=1.0, beta=0.0, **common)
    else:
        hard_loss = torch.zeros_like(soft_loss)
    out = soft * soft_loss + hard * hard_loss if hard != 0.0 else (soft_loss if soft == 1.0 else soft * soft_loss)
    if reduction == "none":
        out, soft_loss, hard_loss = out.reshape(lead), soft_loss.reshape(lead), hard_loss.reshape(lead)
    if return_parts:
        return LossParts(out, soft_loss.detach(), hard_loss.detach())
    return out
