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


# --------------------------------------------------------------------------------------------------------
# Relation- and feature-based anchors (issue 5), re-written from RepDistiller (distiller_zoo/RKD.py, SP.py,
# PKT.py, AT.py, NST.py, FitNet.py, models/util.py ConvReg), mdistiller (distillers/RKD.py rkd_loss) and
# torchdistill (losses/mid_level.py RKDLoss, SPKDLoss, PKTLoss, CCKDLoss, ATLoss). Same arithmetic as the
# originals, including their numerically weak steps (Gram-identity pdist, N x N x D differences, the Python
# loop over rows in CCKD), so they are run in float64 to serve as value/gradient anchors.
# --------------------------------------------------------------------------------------------------------
def eager_response(name, s, t, T, y=None, k=None):
    """The eager composition users run today for a response loss ("batchmean"), in whatever dtype it is given:
    the anchors' formulas (RepDistiller-style reverse KL, TRL's JSD, eager TVD, mdistiller's DKD, torchdistill's
    CE + KD mix with alpha 0.3 / beta 0.8, a gathered top-k KD over the teacher's ``k`` largest logits)."""
    if name == "reverse_kl":
        return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), reduction="batchmean",
                        log_target=True) * T * T
    if name == "jsd0.5":
        return trl_generalized_jsd(s, t, None, 0.5, T)
    if name == "tvd":
        return 0.5 * (F.softmax(t / T, -1) - F.softmax(s / T, -1)).abs().sum(-1).mean()
    if name == "dkd":
        return mdistiller_dkd(s, t, y, 1.0, 8.0, T)
    if name == "kd_mix":
        return 0.3 * F.cross_entropy(s, y) + 0.8 * T * T * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
                                                                      reduction="batchmean")
    if name == "topk_logits":
        vals, idx = t.topk(k, dim=-1)
        p = F.softmax(vals / T, -1)
        log_q = F.log_softmax(s / T, -1).gather(-1, idx)
        return (p * (p.log() - log_q)).sum() / s.shape[0] * T * T
    raise AssertionError(name)


def anchor_pdist(e, squared=False, eps=1e-12):
    """RepDistiller / mdistiller / torchdistill pdist: |e_i|^2 + |e_j|^2 - 2 <e_i, e_j>, clamped below at eps,
    square-rooted unless squared, then the diagonal overwritten with 0 (on a copy)."""
    sq_norms = (e * e).sum(dim=1)
    d2 = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (e @ e.t())).clamp(min=eps)
    d = d2 if squared else d2.sqrt()
    d = d.clone()
    idx = torch.arange(e.shape[0], device=e.device)
    d[idx, idx] = 0
    return d


def _anchor_rkd_distance(student, teacher, squared=False, eps=1e-12):
    with torch.no_grad():
        t_d = anchor_pdist(teacher, squared, eps)
        t_d = t_d / t_d[t_d > 0].mean()
    d = anchor_pdist(student, squared, eps)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def _anchor_rkd_angle(student, teacher):
    # difference[a, b] = x_b - x_a: an N x N x D tensor, normalized along D, then a batched Gram (N^3)
    with torch.no_grad():
        t_e = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(t_e, t_e.transpose(1, 2)).reshape(-1)
    s_e = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(s_e, s_e.transpose(1, 2)).reshape(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def repdistiller_rkd(f_s, f_t, w_d=25, w_a=50):
    """RepDistiller RKDLoss(w_d, w_a).forward: features viewed as [N, -1]; distance term from pdist with each
    side divided by the mean of its positive entries; angle term from N x N x D normalized differences;
    SmoothL1 (mean) each; teacher under no_grad."""
    student = f_s.reshape(f_s.shape[0], -1)
    teacher = f_t.reshape(f_t.shape[0], -1)
    return w_d * _anchor_rkd_distance(student, teacher) + w_a * _anchor_rkd_angle(student, teacher)


def mdistiller_rkd(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    """mdistiller rkd_loss: RepDistiller's RKD with the pdist ``squared`` / ``eps`` exposed."""
    stu = f_s.reshape(f_s.shape[0], -1)
    tea = f_t.reshape(f_t.shape[0], -1)
    return distance_weight * _anchor_rkd_distance(stu, tea, squared, eps) + angle_weight * _anchor_rkd_angle(stu, tea)


def torchdistill_rkd(f_s, f_t, dist_factor, angle_factor, reduction="mean"):
    """torchdistill RKDLoss: flatten(1); a term whose factor is None or 0 is skipped (contributes 0);
    SmoothL1Loss(reduction) for both terms."""
    student, teacher = f_s.flatten(1), f_t.flatten(1)
    total = 0
    if dist_factor:
        with torch.no_grad():
            t_d = anchor_pdist(teacher)
            t_d = t_d / t_d[t_d > 0].mean()
        d = anchor_pdist(student)
        d = d / d[d > 0].mean()
        total = total + dist_factor * F.smooth_l1_loss(d, t_d, reduction=reduction)
    if angle_factor:
        with torch.no_grad():
            t_e = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
            t_angle = torch.bmm(t_e, t_e.transpose(1, 2)).reshape(-1)
        s_e = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
        s_angle = torch.bmm(s_e, s_e.transpose(1, 2)).reshape(-1)
        total = total + angle_factor * F.smooth_l1_loss(s_angle, t_angle, reduction=reduction)
    return total


def _anchor_similarity(f_s, f_t):
    bsz = f_s.shape[0]
    a, b = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    g_s = F.normalize(a @ a.t())
    g_t = F.normalize(b @ b.t())
    diff = g_t - g_s
    return (diff * diff).reshape(-1, 1).sum(0) / (bsz * bsz)  # shape (1,), RepDistiller's quirk


def repdistiller_similarity(g_s, g_t):
    """RepDistiller Similarity.forward: one loss of shape (1,) per layer pair (a list)."""
    return [_anchor_similarity(a, b) for a, b in zip(g_s, g_t)]


def mdistiller_sp(g_s, g_t):
    """mdistiller sp_loss: the sum of RepDistiller's per-layer similarity losses (shape (1,))."""
    return sum(_anchor_similarity(a, b) for a, b in zip(g_s, g_t))


def torchdistill_spkd(f_s, f_t, reduction="batchmean"):
    """torchdistill SPKDLoss's structure with RepDistiller's L2 row normalization (``F.normalize(G, dim=1)``):
    squared Frobenius norm of the difference; / N^2 for 'batchmean', else as is. torchdistill itself
    L1-normalizes the rows: see :func:`torchdistill_spkd_verbatim`."""
    def gram(z):
        z = torch.flatten(z, 1)
        return F.normalize(z @ z.t(), dim=1)

    loss = (torch.norm(gram(f_t) - gram(f_s)) ** 2).sum()
    n = f_t.shape[0]
    return loss / (n * n) if reduction == "batchmean" else loss


def torchdistill_spkd_verbatim(f_s, f_t, reduction="batchmean"):
    """torchdistill 1.1.5 ``SPKDLoss`` (losses/mid_level.py), verbatim in formula: ``normalize(torch.matmul(z,
    torch.t(z)), 1)`` (p = 1, dim = 1: L1 rows), ``torch.norm(g_t - g_s) ** 2``, summed, / N^2 for
    'batchmean', else as is."""
    def matmul_and_normalize(z):
        z = torch.flatten(z, 1)
        return F.normalize(torch.matmul(z, torch.t(z)), 1)

    batch_size = f_t.shape[0]
    spkd_loss = (torch.norm(matmul_and_normalize(f_t) - matmul_and_normalize(f_s)) ** 2).sum()
    return spkd_loss / (batch_size ** 2) if reduction == "batchmean" else spkd_loss


def repdistiller_pkt(f_s, f_t, eps=1e-7):
    """RepDistiller PKT / torchdistill PKTLoss cosine_similarity_loss on [N, D] features: x / (||x|| + eps)
    (sqrt of the sum of squares: NaN gradient for a zero row), NaN entries zeroed, (cos + 1) / 2, row
    normalized, mean of P_t * log((P_t + eps) / (P_s + eps)) over N^2."""
    def probs(x):
        x = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
        x = torch.where(x != x, torch.zeros_like(x), x)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = probs(f_s), probs(f_t)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def torchdistill_cckd(f_s, f_t, kernel="gaussian", gamma=0.4, max_p=2, reduction="batchmean"):
    """torchdistill CCKDLoss: bilinear x x^T, or the Gaussian RBF's Taylor expansion built one row at a time in
    a Python loop, exp(-2 gamma) * (1 + sum_p (2 gamma)^p / p! * (x_i . x)^p); torch.dist (the Frobenius norm,
    not squared) between the matrices, / N^2 for 'batchmean'."""
    import math

    def cc(x):
        if kernel == "bilinear":
            return x @ x.t()
        rows = []
        for x_i in x:
            right = x_i @ x.t()
            row = 1
            for p in range(1, max_p + 1):
                row = row + ((2 * gamma) ** p) / math.factorial(p) * right**p
            rows.append(row * math.exp(-2 * gamma))
        return torch.stack(rows)

    loss = torch.dist(cc(f_s), cc(f_t), 2)
    n = f_t.shape[0]
    return loss / (n**2) if reduction == "batchmean" else loss


def _anchor_pool_square(f_s, f_t):
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def repdistiller_attention(g_s, g_t, p=2):
    """RepDistiller Attention(p).forward: per layer, the taller map pooled to a square of the shorter height,
    a = normalize(mean_c f^p) flattened, loss mean((a_s - a_t)^2) (0-dim); a list over layers."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))

    out = []
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = _anchor_pool_square(f_s, f_t)
        out.append((at(f_s) - at(f_t)).pow(2).mean())
    return out


def torchdistill_at(pairs, mode="code"):
    """torchdistill ATLoss over ``pairs`` = [(student_map, teacher_map, weight), ...] (no pooling).
    'code': sum_w w * mean((a_s - a_t)^2), a from the channel mean of f^2; 'paper': sum_w w * sum_n
    ||a_s - a_t||_2 with a from the channel sum of f^2, divided by the batch size."""
    total, batch = 0, None
    for f_s, f_t, w in pairs:
        if mode == "paper":
            a_s = F.normalize(f_s.pow(2).sum(1).flatten(1))
            a_t = F.normalize(f_t.pow(2).sum(1).flatten(1))
            total = total + w * torch.norm(a_s - a_t, dim=1).sum()
        else:
            a_s = F.normalize(f_s.pow(2).mean(1).flatten(1))
            a_t = F.normalize(f_t.pow(2).mean(1).flatten(1))
            total = total + w * (a_s - a_t).pow(2).mean()
        if batch is None:
            batch = len(f_s)
    return total / batch if mode == "paper" else total


def repdistiller_nst(g_s, g_t):
    """RepDistiller NSTLoss.forward: per layer, pooled as Attention, channel-wise normalized [N, C, HW] maps,
    poly kernel through the [N, C, C, HW] broadcast, mean K(t,t) (detached) + mean K(s,s) - 2 mean K(s,t);
    a list over layers."""
    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    out = []
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = _anchor_pool_square(f_s, f_t)
        s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        out.append(poly(t, t).mean().detach() + poly(s, s).mean() - 2 * poly(s, t).mean())
    return out


class RepDistillerConvReg(torch.nn.Module):
    """RepDistiller models/util.py ConvReg(s_shape, t_shape, use_relu=True): a stride-2 3x3 conv when the
    student is twice as tall, a stride-2 4x4 transposed conv when half as tall, else (s_H >= t_H) a conv with
    kernel (1 + s_H - t_H, 1 + s_W - t_W); then BatchNorm2d(t_C) and, if use_relu, ReLU. (RepDistiller raises
    ``NotImplemented(...)``, itself a TypeError, for the remaining case.)"""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        from torch import nn

        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise TypeError(f"student size {s_h}, teacher size {t_h}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


def repdistiller_hint(f_s, f_t):
    """RepDistiller HintLoss: nn.MSELoss() (mean)."""
    return F.mse_loss(f_s, f_t)
