"""Shared test utilities: float64 oracles and the anchors' eager formulations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd


def oracle_kd(s, t, temperature, **kw):
    """fastkd.reference.kd_loss in float64 (the oracle)."""
    return fastkd.reference.kd_loss(s.double(), t.double(), temperature, **kw)


def repdistiller_distill_kl(y_s, y_t, T):
    """RepDistiller's DistillKL.forward, verbatim in formula (size_average=False == reduction='sum')."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def value_and_grads(fn, s, t, *args, grad_out=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(t.requires_grad)
    loss = fn(s, t, *args, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    inputs = (s, t) if t.requires_grad else (s,)
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads


def assert_close(actual, expected, rtol, atol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------
# The anchors' eager formulations (written from their documented behaviour, see /work/shared/LOSSES.md).
# They are run as given: in whatever dtype the inputs have, with the anchors' numerical weaknesses.
# --------------------------------------------------------------------------------------------------------
def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    """TRL GKDTrainer.generalized_jsd_loss: per-element generalized JSD of softmax(logits / T).

    beta == 0: KL(teacher || student); beta == 1: KL(student || teacher); otherwise the mixture
    m = beta * p_teacher + (1 - beta) * p_student, built in log space with a logsumexp over the stacked
    [student + log(1 - beta), teacher + log(beta)], and beta * KL(teacher || m) + (1 - beta) * KL(student || m).
    labels == -100 entries are dropped (boolean indexing). batchmean: sum / unmasked count with labels, else
    sum / jsd.size(0) (the batch dim B, not B*T, for [B, T, V]); mean: jsd.mean() over the remaining elements;
    none: the per-element tensor."""
    s_lp = F.log_softmax(student_logits / temperature, dim=-1)
    t_lp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype)
        mix_lp = torch.logsumexp(torch.stack([s_lp + torch.log(1 - b), t_lp + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mix_lp, t_lp, reduction="none", log_target=True)
        kl_student = F.kl_div(mix_lp, s_lp, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss: TCKD from the concatenated [p_target, sum of the others] probabilities and the
    log of that (fragile: log 0), NCKD from softmax / log_softmax of logits / T - 1000 * one_hot(target);
    both kl_div sums * T^2 / batch size."""
    gt = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1, 1), 1).bool()
    other = ~gt
    q = F.softmax(logits_student / temperature, dim=1)
    p = F.softmax(logits_teacher / temperature, dim=1)

    def two_bins(x):
        return torch.cat([(x * gt).sum(1, keepdim=True), (x * other).sum(1, keepdim=True)], dim=1)

    q2, p2 = two_bins(q), two_bins(p)
    tckd = F.kl_div(torch.log(q2), p2, reduction="sum") * temperature**2 / target.shape[0]
    p_nt = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
    log_q_nt = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_nt, p_nt, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def torchdistill_kd(student_logits, teacher_logits, targets, temperature, alpha, beta=None, reduction="batchmean"):
    """torchdistill's KDLoss (an nn.KLDivLoss over [B, C] logits, classes on dim 1).

    Branch 1 (alpha None or 0, or no targets): the bare KLDivLoss(reduction) of log_softmax(s / T) and
    softmax(t / T), *without* T^2. Branch 2: alpha * CrossEntropyLoss(reduction='mean' for 'batchmean', else
    the same reduction) + beta * T^2 * KL, beta defaulting to 1 - alpha. (torchdistill computes the default
    beta in its constructor, so alpha=None with beta=None fails there; here beta is only needed in branch 2.)"""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction=reduction,
    )
    if alpha is None or alpha == 0 or targets is None:
        return soft
    beta = 1 - alpha if beta is None else beta
    hard = F.cross_entropy(student_logits, targets, reduction="mean" if reduction == "batchmean" else reduction)
    return alpha * hard + beta * (temperature**2) * soft


def eager_tvd(student_logits, teacher_logits, temperature=1.0):
    """Per-row total variation distance as the eager composition users write (Liger's TVD math, from
    logits): 0.5 * sum_j |softmax(t / T)_j - softmax(s / T)_j|."""
    p = F.softmax(teacher_logits / temperature, dim=-1)
    q = F.softmax(student_logits / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum(-1)
