"""The anchors' eager formulations: each loss written as the framework users run it today writes it, with its
memory-hungry and numerically weak steps (the Gram-identity pdist, the N x N x D differences of the RKD angle,
the Python loop over rows in torchdistill's CC, softmax-then-log in mdistiller's DKD). They run in whatever
dtype they are given.

One copy serves two purposes: the benchmark's eager and torch.compile baselines (:mod:`fastkd.bench.cases`
adapts them to its calling convention) and the test suite's value / gradient anchors (``tests/helpers.py``
imports them). Sources: RepDistiller (distiller_zoo/KD.py, RKD.py, SP.py, PKT.py, AT.py), TRL
(GKDTrainer.generalized_jsd_loss), mdistiller (distillers/DKD.py dkd_loss), torchdistill
(losses/mid_level.py CCKDLoss), Liger-Kernel (TVD) and the TRL / DistillKit distillation through the lm_head.
Where a source uses ``.view`` on the features, ``.reshape`` is used so that strided inputs work too.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # TRL / Hugging Face: labels equal to it are not counted


# ---------------------------------------------------------------------------------------------------------
# response losses over logits [N, V]
# ---------------------------------------------------------------------------------------------------------
def repdistiller_distill_kl(y_s: torch.Tensor, y_t: torch.Tensor, T: float) -> torch.Tensor:
    """RepDistiller DistillKL.forward (Hinton KD): KL(softmax(y_t / T) || softmax(y_s / T)) summed
    (``size_average=False``), times T^2, over the batch size."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def trl_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                        reduction: str = "batchmean") -> torch.Tensor:
    """TRL GKDTrainer.generalized_jsd_loss: per-element generalized JSD of softmax(logits / T).

    beta == 0: KL(teacher || student); beta == 1: KL(student || teacher); otherwise the mixture
    m = beta * p_teacher + (1 - beta) * p_student, built in log space with a logsumexp over the stacked
    [student + log(1 - beta), teacher + log(beta)], and beta * KL(teacher || m) + (1 - beta) * KL(student || m).
    labels == -100 entries are dropped (boolean indexing). batchmean: sum / unmasked count with labels, else
    sum / jsd.size(0) (the batch dim B, not B*T, for [B, T, V]); mean: jsd.mean() over the remaining elements;
    sum: the sum; none: the per-element tensor."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    if labels is not None:
        mask = labels != IGNORE_INDEX
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def liger_tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row total variation distance as Liger-Kernel's TVD computes it, from logits:
    0.5 * sum_j |softmax(t / T)_j - softmax(s / T)_j|."""
    p = F.softmax(teacher_logits / temperature, dim=-1)
    q = F.softmax(student_logits / temperature, dim=-1)
    return 0.5 * (p - q).abs().sum(-1)


def mdistiller_dkd(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
                   alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """mdistiller dkd_loss: TCKD from the concatenated [p_target, sum of the others] probabilities and the log
    of that (fragile: log 0), NCKD from softmax / log_softmax of logits / T - 1000 * one_hot(target); both
    kl_div sums * T^2 / batch size."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1, 1), 1).bool()
    other_mask = ~gt_mask
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd_loss = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 \
        / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def gathered_topk_kd(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The usual offline-teacher code for a cached top-k teacher (``values`` are its k largest logits at
    ``indices``): the student's full log-softmax gathered at the kept entries, the teacher renormalized over
    them, KL summed over the batch size, times T^2."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, indices)
    log_p = F.log_softmax(values / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() / student_logits.shape[0] * (temperature * temperature)


def trl_head_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """What TRL / DistillKit-style LLM distillation runs through the student's lm_head: the full logits
    h W^T, the forward KL(teacher || student) of the log-softmaxes per token, summed over the vocabulary,
    masked by the labels and divided by the counted tokens. Peak extra memory ~ 6 [tokens, V] tensors."""
    logits = hidden @ weight.t()
    per_token = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature,
                                                                                    dim=-1),
                         reduction="none", log_target=True).sum(-1)
    mask = labels != IGNORE_INDEX
    return (per_token * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------------
# relation- and feature-based losses over features [N, ...]
# ---------------------------------------------------------------------------------------------------------
def repdistiller_pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """RepDistiller RKDLoss.pdist (also mdistiller's, torchdistill's): the Gram identity
    |e_i|^2 + |e_j|^2 - 2 e e^T, clamped below at eps, square-rooted unless squared, the diagonal set to 0 on
    a clone."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance_term(student: torch.Tensor, teacher: torch.Tensor, squared: bool = False, eps: float = 1e-12,
                      reduction: str = "mean") -> torch.Tensor:
    """RKD's distance term on [N, D] features: each side's pdist over the mean of its positive entries,
    SmoothL1; the teacher under no_grad."""
    with torch.no_grad():
        t_d = repdistiller_pdist(teacher, squared, eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = repdistiller_pdist(student, squared, eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    return F.smooth_l1_loss(d, t_d, reduction=reduction)


def rkd_angle_term(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """RKD's angle term on [N, D] features: the N x N x D differences (x_b - x_a at [a, b]) normalized along D,
    their N x N x N batched Gram, SmoothL1; the teacher under no_grad. Peak memory ~ 6 N^2 D entries."""
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).reshape(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).reshape(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction=reduction)


def repdistiller_rkd(f_s: torch.Tensor, f_t: torch.Tensor, w_d: float = 25, w_a: float = 50) -> torch.Tensor:
    """RepDistiller RKDLoss(w_d, w_a).forward: features as [N, -1]; w_d * distance term + w_a * angle term."""
    student = f_s.reshape(f_s.shape[0], -1)
    teacher = f_t.reshape(f_t.shape[0], -1)
    return w_d * rkd_distance_term(student, teacher) + w_a * rkd_angle_term(student, teacher)


def repdistiller_similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller Similarity.similarity_loss (one layer): row-normalized Gram matrices, squared Frobenius
    distance / N^2, of shape (1,) as RepDistiller returns it."""
    bsz = f_s.shape[0]
    f_s = f_s.reshape(bsz, -1)
    f_t = f_t.reshape(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).reshape(-1, 1).sum(0) / (bsz * bsz)


def repdistiller_pkt(output_net: torch.Tensor, target_net: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller PKT.cosine_similarity_loss (torchdistill PKTLoss) on [N, D] features: x / (||x|| + eps)
    (sqrt of the sum of squares: NaN gradient for a zero row), NaN entries zeroed, (cos + 1) / 2, row
    normalized, mean of P_t log((P_t + eps) / (P_s + eps)) over N^2."""
    output_net_norm = torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def torchdistill_cc_matrix(linear_outputs: torch.Tensor, kernel: str = "gaussian", gamma: float = 0.4,
                           max_p: int = 2) -> torch.Tensor:
    """torchdistill CCKDLoss's correlation matrix: the bilinear pool x x^T, or the Gaussian RBF's Taylor
    expansion built one row at a time in a Python loop, exp(-2 gamma) (1 + sum_p (2 gamma)^p / p! (x_i . x)^p)."""
    if kernel == "bilinear":
        return torch.matmul(linear_outputs, torch.t(linear_outputs))
    row_list = []
    for linear_output in linear_outputs:
        row = 1
        right_term = torch.matmul(linear_output, torch.t(linear_outputs))
        for p in range(1, max_p + 1):
            left_term = ((2 * gamma) ** p) / math.factorial(p)
            row = row + left_term * (right_term**p)
        row_list.append(row * math.exp(-2 * gamma))
    return torch.stack(row_list)


def torchdistill_cckd(f_s: torch.Tensor, f_t: torch.Tensor, kernel: str = "gaussian", gamma: float = 0.4,
                      max_p: int = 2, reduction: str = "batchmean") -> torch.Tensor:
    """torchdistill CCKDLoss on [N, D] linear-layer outputs: torch.dist (the Frobenius norm, not squared)
    between the correlation matrices, / N^2 for 'batchmean'."""
    kd_loss = torch.dist(torchdistill_cc_matrix(f_s, kernel, gamma, max_p),
                         torchdistill_cc_matrix(f_t, kernel, gamma, max_p), 2)
    batch_size = f_t.shape[0]
    return kd_loss / (batch_size**2) if reduction == "batchmean" else kd_loss


def repdistiller_pool_to_shorter(f_s: torch.Tensor, f_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller Attention / NSTLoss: the taller of two [N, C, H, W] maps average-pooled to a square of the
    shorter height."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return f_s, f_t


def repdistiller_at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """RepDistiller Attention(p).at_loss (one layer): both maps pooled to the shorter height, a =
    normalize(mean_c f^p) flattened, mean((a_s - a_t)^2)."""
    f_s, f_t = repdistiller_pool_to_shorter(f_s, f_t)

    def at(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))

    return (at(f_s) - at(f_t)).pow(2).mean()
