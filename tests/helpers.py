"""Shared test utilities: float64 oracles and the anchors' eager formulations (fastkd.bench.anchors, shared
with the benchmark, and the anchors only the tests use)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd
from fastkd.bench import anchors
from fastkd.bench.anchors import (
    gathered_topk_kd,
    mdistiller_dkd,
    repdistiller_at_loss,
    repdistiller_pool_to_shorter,
    repdistiller_similarity_loss,
    rkd_angle_term,
    rkd_distance_term,
    trl_generalized_jsd,
)

# the anchors the tests import from here, as fastkd.bench.anchors writes them
repdistiller_distill_kl = anchors.repdistiller_distill_kl
repdistiller_rkd = anchors.repdistiller_rkd
repdistiller_pkt = anchors.repdistiller_pkt
torchdistill_cckd = anchors.torchdistill_cckd
eager_tvd = anchors.liger_tvd  # per row, from logits


def oracle_kd(s, t, temperature, **kw):
    """fastkd.reference.kd_loss in float64 (the oracle)."""
    return fastkd.reference.kd_loss(s.double(), t.double(), temperature, **kw)


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
# The anchors' eager formulations: fastkd.bench.anchors holds them (one copy for the benchmark's baselines and
# these tests); below, the anchors only the tests use, built on the same pieces, and thin adapters. They are
# run as given: in whatever dtype the inputs have, with the anchors' numerical weaknesses.
# --------------------------------------------------------------------------------------------------------
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


def eager_response(name, s, t, T, y=None, k=None):
    """The eager composition users run today for a response loss ("batchmean"), in whatever dtype it is given:
    the anchors' formulas (TRL's reverse KL and JSD, Liger's TVD, mdistiller's DKD, torchdistill's CE + KD mix
    with alpha 0.3 / beta 0.8, a gathered top-k KD over the teacher's ``k`` largest logits)."""
    if name == "reverse_kl":
        return trl_generalized_jsd(s, t, None, 1.0, T) * T * T
    if name == "jsd0.5":
        return trl_generalized_jsd(s, t, None, 0.5, T)
    if name == "tvd":
        return eager_tvd(s, t, T).mean()
    if name == "dkd":
        return mdistiller_dkd(s, t, y, 1.0, 8.0, T)
    if name == "kd_mix":
        return torchdistill_kd(s, t, y, T, alpha=0.3, beta=0.8)
    if name == "topk_logits":
        vals, idx = t.topk(k, dim=-1)
        return gathered_topk_kd(s, vals, idx, T)
    raise AssertionError(name)


# --------------------------------------------------------------------------------------------------------
# Relation- and feature-based anchors (issue 5) from RepDistiller (distiller_zoo/RKD.py, SP.py, PKT.py, AT.py,
# NST.py, FitNet.py, models/util.py ConvReg), mdistiller (distillers/RKD.py rkd_loss) and torchdistill
# (losses/mid_level.py RKDLoss, SPKDLoss, PKTLoss, CCKDLoss, ATLoss). Same arithmetic as the originals,
# including their numerically weak steps (Gram-identity pdist, N x N x D differences, the Python loop over rows
# in CCKD), so they are run in float64 to serve as value/gradient anchors.
# --------------------------------------------------------------------------------------------------------
def mdistiller_rkd(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    """mdistiller rkd_loss: RepDistiller's RKD with the pdist ``squared`` / ``eps`` exposed."""
    stu = f_s.reshape(f_s.shape[0], -1)
    tea = f_t.reshape(f_t.shape[0], -1)
    return distance_weight * rkd_distance_term(stu, tea, squared, eps) + angle_weight * rkd_angle_term(stu, tea)


def torchdistill_rkd(f_s, f_t, dist_factor, angle_factor, reduction="mean"):
    """torchdistill RKDLoss: flatten(1); a term whose factor is None or 0 is skipped (contributes 0);
    SmoothL1Loss(reduction) for both terms."""
    student, teacher = f_s.flatten(1), f_t.flatten(1)
    total = 0
    if dist_factor:
        total = total + dist_factor * rkd_distance_term(student, teacher, reduction=reduction)
    if angle_factor:
        total = total + angle_factor * rkd_angle_term(student, teacher, reduction=reduction)
    return total


def repdistiller_similarity(g_s, g_t):
    """RepDistiller Similarity.forward: one loss of shape (1,) per layer pair (a list)."""
    return [repdistiller_similarity_loss(a, b) for a, b in zip(g_s, g_t)]


def mdistiller_sp(g_s, g_t):
    """mdistiller sp_loss: the sum of RepDistiller's per-layer similarity losses (shape (1,))."""
    return sum(repdistiller_similarity_loss(a, b) for a, b in zip(g_s, g_t))


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


def repdistiller_attention(g_s, g_t, p=2):
    """RepDistiller Attention(p).forward: per layer pair, at_loss (0-dim); a list over layers."""
    return [repdistiller_at_loss(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t)]


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
        f_s, f_t = repdistiller_pool_to_shorter(f_s, f_t)
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


def eager_head_transform(z, scale=None, cap=None):
    """A head's logit transform written out with torch.tanh, independent of fastkd's: ``scale * z`` (None:
    none), then ``cap * tanh(z / cap)`` (None: none); the oracle of the fused heads' softcap / logit scale."""
    if scale is not None:
        z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z
