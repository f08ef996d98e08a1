"""fastkd-bench: forward+backward throughput of fastkd's losses against eager PyTorch (each loss written as
its anchor framework writes it), torch.compile of that code and (on a GPU, when installed) Liger-Kernel,
side by side in one run, with the memory-bandwidth floor and peak memory.

    fastkd-bench                       # every loss on its default shapes, on CUDA if present else the CPU
    fastkd-bench --loss jsd,kd --shapes 4096x50257 --dtype bfloat16 --json out.json
    fastkd-bench --loss relation       # rkd,rkd_sweep,sp,pkt,cc,at (--loss response: the logit losses)
    fastkd-bench --loss sp,at --shapes 128x256x8x8,64x2048x7x7
    fastkd-bench --loss rkd --shapes 512x2048,256x512:256x2048    # STUDENT:TEACHER shapes may differ
    fastkd-bench --loss llm            # fused_linear,fused_linear_sweep: distillation through the lm_head
    fastkd-bench --loss llm --llm-shape 2048x1024x32000 --llm-tokens 256,512,1024

Columns: median time per fwd+bwd; speedup of fastkd over each baseline; effective bandwidth
(student + teacher read once, gradient written once: 3 * N * V * itemsize bytes); ratio to the floor; peak
extra memory while the step runs (inputs excluded).

The floor is the least memory work a fused fwd+bwd must do, measured in the same run. CPU: cloning one
N x V tensor (a read plus a first touch of fresh pages, as the new gradient must be) plus summing another.
GPU: 3 * N * V * itemsize over the measured device-to-device copy bandwidth.

Relation / feature losses (RKD, SP, PKT, CC, AT; shapes are feature shapes [N, ...], flattened per sample,
the teacher without gradient as in training): the baselines are the RepDistiller / torchdistill code. Their
floor is the GEMM work any implementation does (RKD, SP, PKT, CC: the student and teacher Gram matrices and
the gradient GEMM, timed with torch.mm) or the memory floor (AT: clone the student map, read the teacher
map). A call slower than --slow-s is timed once without warmup (the eager RKD: ~30 s per call at N=512 on
a 2-core CPU); an eager or compiled RKD whose estimated memory (N^2 x D and N^3 tensors) exceeds
--mem-fraction of the RAM (GPU memory) is skipped. rkd_sweep runs fastkd's RKD alone over N (time ~ N^3,
memory ~ N^2) with the ratio to the previous N.

LLM distillation through the student's linear head (fused_linear; --llm-shape TOKENSxHIDDENxVOCAB, default
4096x1024x32000 fp32 on the CPU, 8192x4096x128256 bf16 on a GPU; T = 1, forward KL, 1 token in 10 ignored):
one step is the fwd+bwd from the hidden states and the lm_head weight (both requiring grad) against dense
teacher logits [tokens, V], to the gradients of both. Eager (logits = h W^T, then the TRL / DistillKit KL),
its torch.compile, fastkd.kd_loss on the full logits ('fastkd unfused') and fastkd.fused_linear_kd_loss
('fastkd fused'); on a GPU also the teacher given as hidden states + lm_head, the form Liger-Kernel takes:
Liger-Kernel's fused linear JSD with beta = 0 (forward KL; Triton, and its chunked torch.compile loss) when
installed, and fastkd with a fastkd.TeacherHead ('fastkd head'). Peak MB excludes the inputs (hidden states,
weights, teacher logits) and includes the gradients; the floor is the three GEMMs alone (logits, hidden-state
gradient, weight gradient). fused_linear_sweep runs eager and fastkd fused over the token counts of
--llm-tokens at the same HIDDEN x VOCAB: eager memory grows with the tokens, fastkd's stays at the weight
gradient plus one chunk. The first call of each is a warmup and the peak-memory window; when it takes more
than 1 s, 2 timed calls follow (the sweep: none, that call is timed), else --repeats. Baselines whose
estimated memory (~6 [tokens, V] tensors for eager / torch.compile, 2 for fastkd unfused) exceeds the
--mem-fraction budget are skipped.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

import fastkd

# Default (rows x vocab) per loss and device.
DEFAULT_SHAPES = {
    "cpu": {
        "kd": "2048x32000,1024x1000,256x100",
        "reverse_kl": "2048x32000",
        "jsd": "2048x32000",
        "tvd": "1024x32000",
        "dkd": "1024x1000,256x100",
        "topk": "4096x50257",
    },
    "cuda": {
        "kd": "16384x131072,4096x32000,1024x1000,256x100",
        "reverse_kl": "4096x128256",
        "jsd": "4096x128256",
        "tvd": "4096x128256",
        "dkd": "1024x1000,256x100",
        "topk": "8192x128256",
    },
}
LOSSES = ("kd", "reverse_kl", "jsd", "tvd", "dkd", "topk")
# Every other divergence of the registry (fastkd/divergences.py), at its first test parameters, against the
# eager composition of its spec's formula (fastkd.reference) in the input dtype.
REGISTRY_LOSSES = tuple(s.name for s in fastkd.divergences.REGISTRY.values() if s.generated)
for _name in REGISTRY_LOSSES:
    DEFAULT_SHAPES["cpu"][_name] = DEFAULT_SHAPES["cpu"]["jsd"]
    DEFAULT_SHAPES["cuda"][_name] = DEFAULT_SHAPES["cuda"]["jsd"]

# Relation- and feature-based losses: feature shapes [N, ...] ("STUDENT:TEACHER" when they differ).
RELATION_SHAPES = {
    "cpu": {
        "rkd": "512x2048",
        "rkd_sweep": "256x2048,512x2048,1024x2048,2048x2048",
        "sp": "128x256x8x8,64x2048x7x7",
        "pkt": "256x512,256x2048",
        "cc": "256x128",
        "at": "128x256x8x8,64x2048x7x7",
    },
    "cuda": {
        "rkd": "512x2048,1024x2048",
        "rkd_sweep": "256x2048,512x2048,1024x2048,2048x2048,4096x2048",
        "sp": "128x256x8x8,64x2048x7x7",
        "pkt": "256x512,256x2048",
        "cc": "256x128",
        "at": "128x256x8x8,64x2048x7x7",
    },
}
RELATION_LOSSES = ("rkd", "rkd_sweep", "sp", "pkt", "cc", "at")

# LLM distillation through the student's lm_head (fastkd.fused_linear_kd_loss): TOKENSxHIDDENxVOCAB of the main
# case, and the token counts of the sweep (at the same HIDDEN x VOCAB).
LLM_SHAPES = {"cpu": "4096x1024x32000", "cuda": "8192x4096x128256"}
LLM_SWEEP_TOKENS = {"cpu": "512,1024,2048,4096", "cuda": "1024,2048,4096,8192"}
LLM_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}  # unless --dtype
LLM_LOSSES = ("fused_linear", "fused_linear_sweep")
LLM_TEMPERATURE = 1.0  # TRL / DistillKit / Liger-Kernel: T = 1, no T^2 factor
LLM_IGNORE_EVERY = 10  # every 10th token's label is IGNORE_INDEX (prompt and padding tokens)
IGNORE_INDEX = -100
LLM_SLOW_MS = 1000.0  # a first call slower than this is followed by LLM_SLOW_REPEATS timed calls at most
LLM_SLOW_REPEATS = {"fused_linear": 2, "fused_linear_sweep": 0}  # 0: the first call is the one timed run
# Estimated peak extra memory of the unfused baselines in [tokens, V] tensors of the input dtype (measured on the
# CPU, fp32, V = 32000: eager 6.0 at 1024 and 2048 tokens); fastkd fused needs no guard.
LLM_TOKENS_X_V = {"eager": 6, "torch.compile": 6, "fastkd unfused": 2}
ALL_LOSSES = LOSSES + REGISTRY_LOSSES + RELATION_LOSSES + LLM_LOSSES
LOSS_GROUPS = {"response": LOSSES + REGISTRY_LOSSES, "relation": RELATION_LOSSES, "llm": LLM_LOSSES,
               "all": ALL_LOSSES}
DEFAULT_LOSSES = LOSSES + RELATION_LOSSES + LLM_LOSSES  # the registry's others: --loss NAME or --loss response
# torch.compile baselines left out unless --slow-compile: compiling them takes minutes.
SLOW_COMPILE = {
    "cc": "compiling the per-row Python loop unrolls N iterations: 7 min at N=256 on a 2-core CPU; "
          "--slow-compile",
}
MEM_FRACTION = 0.6  # eager / compiled RKD and the unfused LLM-head baselines only where their estimated memory
                    # fits this fraction of RAM / GPU memory
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# the competing implementations of one training step's loss (fwd + bwd)
# ---------------------------------------------------------------------------------------------------------
# Each loss has: an eager baseline written as its anchor framework writes it (also compiled with
# torch.compile), fastkd's fused version, and on a GPU Liger-Kernel's where one exists. Every function takes
# (student, teacher_inputs, T) where teacher_inputs is a tuple (teacher logits, target, top-k values, ...).
def eager_kd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """What RepDistiller / mdistiller / most training loops run today."""
    t = inp[0]
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * (T * T)


def eager_reverse_kl(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """TRL's generalized JSD with beta = 1 (reverse KL), times T^2."""
    t = inp[0]
    lq, lp = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    return F.kl_div(lp, lq, reduction="none", log_target=True).sum() / s.shape[0] * (T * T)


def eager_jsd(s: torch.Tensor, inp: tuple, T: float, beta: float = 0.5) -> torch.Tensor:
    """TRL GKDTrainer.generalized_jsd_loss (beta = 0.5, no labels)."""
    t = inp[0]
    lq, lp = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    b = torch.tensor(beta, dtype=lq.dtype, device=lq.device)
    lm = torch.logsumexp(torch.stack([lq + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(lm, lp, reduction="none", log_target=True) + (1 - b) * F.kl_div(
        lm, lq, reduction="none", log_target=True
    )
    return jsd.sum() / jsd.size(0)


def eager_tvd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    t = inp[0]
    return 0.5 * (F.softmax(t / T, dim=-1) - F.softmax(s / T, dim=-1)).abs().sum() / s.shape[0]


def eager_dkd(s: torch.Tensor, inp: tuple, T: float, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """mdistiller's dkd_loss: target masks, probabilities, -1000 masking for the non-target part."""
    t, target = inp[0], inp[1]
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)

    def cat(p):
        return torch.cat([(p * gt).sum(1, keepdims=True), (p * other).sum(1, keepdims=True)], dim=1)

    ps2, pt2 = cat(ps), cat(pt)
    tckd = F.kl_div(torch.log(ps2), pt2, reduction="sum") * T**2 / target.shape[0]
    pt_nt = F.softmax(t / T - 1000.0 * gt, dim=1)
    lps_nt = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(lps_nt, pt_nt, reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def eager_topk(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The usual offline-teacher code: full log-softmax of the student, gather at the kept entries."""
    values, indices = inp[2], inp[3]
    lq = F.log_softmax(s / T, dim=-1).gather(-1, indices)
    lp = F.log_softmax(values / T, dim=-1)
    return (lp.exp() * (lp - lq)).sum() / s.shape[0] * (T * T)


# Relation / feature losses: (student features, (teacher features,), unused T), written as RepDistiller
# (RKD, SP, PKT, AT) and torchdistill (CC) write them, including their memory-hungry steps.
def _repdistiller_pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """RepDistiller RKDLoss.pdist: the Gram identity |e_i|^2 + |e_j|^2 - 2 e e^T, clamped, square-rooted, the
    diagonal set to 0 on a clone."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def eager_rkd(s: torch.Tensor, inp: tuple, T: float, w_d: float = 25.0, w_a: float = 50.0) -> torch.Tensor:
    """RepDistiller RKDLoss(w_d=25, w_a=50).forward: distance term from pdist / mean of the positive entries,
    angle term from the N x N x D normalized differences and their N x N x N batched Gram; teacher under
    no_grad. Peak memory ~ 6 N^2 D floats (N = 512, D = 2048: 12.9 GB)."""
    student = s.view(s.shape[0], -1)
    teacher = inp[0].view(inp[0].shape[0], -1)
    with torch.no_grad():
        t_d = _repdistiller_pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = _repdistiller_pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def eager_sp(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """RepDistiller Similarity.similarity_loss (one layer): row-normalized Gram matrices, squared Frobenius
    distance / N^2 (shape (1,), as RepDistiller returns it)."""
    f_s, f_t = s, inp[0]
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)


def eager_pkt(s: torch.Tensor, inp: tuple, T: float, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller PKT.cosine_similarity_loss (torchdistill PKTLoss): cosine similarities mapped to [0, 1],
    row-normalized to probabilities, mean of P_t log((P_t + eps) / (P_s + eps))."""
    output_net, target_net = s.flatten(1), inp[0].flatten(1)  # the anchors take pooled [N, D] features
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


CC_GAMMA, CC_MAX_P = 0.4, 2


def _torchdistill_cc_gaussian(x: torch.Tensor, gamma: float = CC_GAMMA, max_p: int = CC_MAX_P) -> torch.Tensor:
    """torchdistill CCKDLoss.compute_cc_mat_by_gaussian_rbf: the Taylor expansion of the Gaussian RBF, one
    row at a time in a Python loop."""
    rows = []
    for x_i in x:
        right_term = torch.matmul(x_i, torch.t(x))
        row = 1
        for p in range(1, max_p + 1):
            row = row + ((2 * gamma) ** p) / math.factorial(p) * (right_term**p)
        rows.append(row)
    return torch.stack(rows) * math.exp(-2 * gamma)


def eager_cc(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """torchdistill CCKDLoss (kernel gaussian, gamma 0.4, max_p 2, batchmean): torch.dist between the
    correlation matrices / N^2."""
    s, t = s.flatten(1), inp[0].flatten(1)  # torchdistill feeds [N, D] linear-layer outputs
    loss = torch.dist(_torchdistill_cc_gaussian(s), _torchdistill_cc_gaussian(t), 2)
    return loss / (t.shape[0] ** 2)


def eager_at(s: torch.Tensor, inp: tuple, T: float, p: int = 2) -> torch.Tensor:
    """RepDistiller Attention(p=2).at_loss (one layer): the taller map pooled to the shorter height,
    normalize(mean_c f^p), mean squared difference."""
    f_s, f_t = s, inp[0]
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    return (at(f_s) - at(f_t)).pow(2).mean()


def fastkd_fn(name: str) -> Callable:
    def kd(s, inp, T):
        return fastkd.kd_loss(s, inp[0], T)

    def reverse_kl(s, inp, T):
        return fastkd.reverse_kl_loss(s, inp[0], T)

    def jsd(s, inp, T):
        return fastkd.jsd_loss(s, inp[0], 0.5, T)

    def tvd(s, inp, T):
        return fastkd.tvd_loss(s, inp[0], T)

    def dkd(s, inp, T):
        return fastkd.dkd_loss(s, inp[0], inp[1], 1.0, 8.0, T)

    def topk(s, inp, T):
        return fastkd.topk_kd_loss(s, inp[2], inp[3], T)

    def rkd(s, inp, T):
        return fastkd.rkd_loss(s, inp[0], 25.0, 50.0)

    rkd_sweep = rkd

    def sp(s, inp, T):
        return fastkd.sp_loss(s, inp[0])

    def pkt(s, inp, T):
        return fastkd.pkt_loss(s, inp[0])

    def cc(s, inp, T):
        return fastkd.cc_loss(s, inp[0], "gaussian", CC_GAMMA, CC_MAX_P)

    def at(s, inp, T):
        return fastkd.at_loss(s, inp[0], 2)

    if name in REGISTRY_LOSSES:
        return _registry_fn(fastkd.divergence_loss, name)
    return locals()[name]


def _registry_fn(loss_fn: Callable, name: str) -> Callable:
    params = dict(fastkd.divergences.get(name).test_params[0])

    def fn(s, inp, T):
        return loss_fn(s, inp[0], name, T, **params)

    return fn


def _liger(name: str) -> Optional[Callable]:
    """Liger-Kernel's version of a loss (GPU only), through torch log-softmaxes where Liger expects
    log-probabilities or probabilities."""
    try:
        import liger_kernel.transformers as lk
    except Exception:
        return None
    if name == "kd" and hasattr(lk, "LigerKLDIVLoss"):
        loss = lk.LigerKLDIVLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1)) * (T * T)
    if name == "jsd" and hasattr(lk, "LigerJSD"):
        loss = lk.LigerJSD(beta=0.5)
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.log_softmax(inp[0] / T, dim=-1))
    if name == "tvd" and hasattr(lk, "LigerTVDLoss"):
        loss = lk.LigerTVDLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1))
    return None


# LLM distillation through the student's lm_head: (hidden [tokens, H], weight [V, H], teacher_inputs, T) where
# teacher_inputs is (teacher logits [tokens, V], labels [tokens], teacher hidden states, teacher lm_head weight);
# the teacher's hidden states and weight are given only where a teacher-head implementation runs (GPU).
def eager_fused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """What TRL / DistillKit-style training code runs: the student's full logits h W^T, the forward KL(teacher ||
    student) of the log-softmaxes per token, summed over the vocabulary, masked by the labels and divided by
    the counted tokens. Peak extra memory ~ 6 [tokens, V] tensors."""
    t, labels = inp[0], inp[1]
    logits = h @ w.t()
    per_token = F.kl_div(F.log_softmax(logits / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="none",
                         log_target=True).sum(-1)
    mask = labels != IGNORE_INDEX
    return (per_token * mask).sum() / mask.sum()


def fastkd_unfused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The full logits, then fastkd's fused KD kernel on them (the [tokens, V] logits and their gradient)."""
    return fastkd.kd_loss(h @ w.t(), inp[0], T, labels=inp[1], ignore_index=IGNORE_INDEX, scale_by_temperature=False)


def fastkd_fused_linear(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """fastkd.fused_linear_kd_loss at its default chunk size: never more than one chunk of the logits."""
    return fastkd.fused_linear_kd_loss(h, w, inp[0], temperature=T, labels=inp[1], ignore_index=IGNORE_INDEX,
                                       scale_by_temperature=False)  # the bare KL, as the eager rows


def fastkd_fused_linear_head(h: torch.Tensor, w: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The teacher as hidden states + lm_head (its logits computed chunk by chunk too), as Liger-Kernel takes it."""
    return fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(inp[2], inp[3]), temperature=T, labels=inp[1],
                                       ignore_index=IGNORE_INDEX, scale_by_temperature=False)


def _error_text(e: BaseException) -> str:
    """An exception as one short line for a "failed" row."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _liger_fused_linear(T: float) -> Dict[str, Union[Callable, str]]:
    """Liger-Kernel's fused linear distillation (GPU only), each mapped to a step function or, where it cannot be
    set up, to the reason: the Triton ``LigerFusedLinearJSD`` ("liger") and the chunked torch.compile
    ``LigerFusedLinearJSDLoss`` ("liger chunked"), both with beta = 0, which is forward KL(teacher || student)
    there. Both take the teacher as hidden states + lm_head, not as logits, so they compare with "fastkd head".
    Their handling of ignored tokens differs between versions: the rows compare time and memory only."""
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return {"liger": "liger-kernel not installed"}
    out: Dict[str, Union[Callable, str]] = {}
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE_INDEX, temperature=T)
        out["liger"] = lambda h, w, inp, T: jsd(h, w, inp[2], inp[3], inp[1])
    except Exception as e:
        out["liger"] = _error_text(e)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                          ignore_index=IGNORE_INDEX, temperature=T)
        # the bias arguments are required positionals in some versions and absent in others
        bias = {k: None for k in ("student_bias", "teacher_bias") if k in inspect.signature(chunked.forward).parameters}
        out["liger chunked"] = lambda h, w, inp, T: chunked(h, w, inp[2], inp[3], inp[1], **bias)
    except Exception as e:
        out["liger chunked"] = _error_text(e)
    return out


EAGER = {
    "kd": eager_kd,
    "reverse_kl": eager_reverse_kl,
    "jsd": eager_jsd,
    "tvd": eager_tvd,
    "dkd": eager_dkd,
    "topk": eager_topk,
    "rkd": eager_rkd,
    "rkd_sweep": eager_rkd,
    "sp": eager_sp,
    "pkt": eager_pkt,
    "cc": eager_cc,
    "at": eager_at,
}
LOSS_TITLES = {
    "kd": "Hinton KD (RepDistiller DistillKL)",
    "reverse_kl": "reverse KL (TRL, beta=1)",
    "jsd": "generalized JSD beta=0.5 (TRL GKD)",
    "tvd": "total variation",
    "dkd": "DKD alpha=1 beta=8 (mdistiller)",
    "topk": "top-k teacher KD, k=64 (gathered log-softmax)",
    "rkd": "RKD distance 25 + angle 50 (RepDistiller RKDLoss), teacher without grad",
    "rkd_sweep": "RKD, fastkd alone, over the batch N (time ~ N^3, memory ~ N^2)",
    "sp": "similarity-preserving SP (RepDistiller Similarity)",
    "pkt": "PKT (RepDistiller PKT / torchdistill PKTLoss)",
    "cc": "CC gaussian gamma=0.4 max_p=2 (torchdistill CCKDLoss, per-row loop)",
    "at": "attention transfer p=2 (RepDistiller Attention)",
    "fused_linear": "LLM head: hidden states + lm_head -> forward KL vs dense teacher logits (TRL / DistillKit)",
    "fused_linear_sweep": "LLM head over the tokens, H x V fixed (memory: eager ~ tokens x V, fastkd ~ H x V)",
}
for _name in REGISTRY_LOSSES:
    _spec = fastkd.divergences.get(_name)
    EAGER[_name] = _registry_fn(fastkd.reference.divergence_loss, _name)
    LOSS_TITLES[_name] = f"{_spec.doc} {dict(_spec.test_params[0])} (eager: its formula, fastkd.reference)"
TOPK_K = 64


# ---------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_rss_reset() -> Optional[int]:
    """Resets the process's peak RSS (Linux) and returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_field("VmRSS")
    except OSError:
        return None


def _rss_field(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _time_ms(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _malloc_trim() -> None:
    """Hands the C heap's free pages back to the OS (glibc), so that the next call's resident-set growth
    counts every page it touches, not only those beyond what earlier calls left in the heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_begin(device: str, trim: bool = False) -> Optional[int]:
    """Starts a peak-memory window: the baseline (allocated CUDA bytes, or the RSS after resetting its
    high-water mark), None where it cannot be measured."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return base
    if trim:
        _malloc_trim()
    return _peak_rss_reset()


def _peak_end(device: str, base: Optional[int]) -> Optional[int]:
    """Peak extra bytes since :func:`_peak_begin`."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if base is None:
        return None
    peak = _rss_field("VmHWM")
    return None if peak is None else max(0, peak - base)


def _peak_extra_bytes(fn: Callable[[], None], device: str, trim: bool = False) -> Optional[int]:
    base = _peak_begin(device, trim)
    if base is None:
        return None
    fn()
    return _peak_end(device, base)


def _time_adaptive(fn: Callable[[], None], device: str, repeats: int, warmup: int, slow_ms: float,
                   compiled: bool, trim: bool = False):
    """Times fn like :func:`_time_ms`, but a first call slower than ``slow_ms`` is the only (warmup-free)
    timed run, and its peak memory is taken in that same call. Returns (times, peak bytes or None when
    not taken). For a compiled function the first call (the compilation) is never timed."""
    pre = 1 if compiled and warmup > 0 else 0
    for _ in range(pre):
        fn()
    _sync(device)
    base = _peak_begin(device, trim)
    first = _time_ms(fn, device, 1, 0)[0]
    if first > slow_ms:
        return [first], _peak_end(device, base)
    return _time_ms(fn, device, repeats, max(0, warmup - pre - 1)), None


@dataclass
class Row:
    loss: str
    shape: str
    impl: str
    median_ms: float
    min_ms: float
    gbps: float
    floor_ratio: float
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    error: Optional[str] = None
    skipped: Optional[str] = None  # e.g. "needs ~51 GB": the eager RKD beyond the memory budget
    timed_runs: Optional[int] = None
    time_vs_prev: Optional[float] = None  # rkd_sweep: ratio to the previous N (and the N^3 it should follow)
    peak_vs_prev: Optional[float] = None  # fused_linear_sweep: the same impl at the previous token count
    tokens_per_s: Optional[float] = None  # fused_linear*
    peak_vs_eager: Optional[float] = None  # fused_linear*: peak extra memory / the eager step's


@dataclass
class Report:
    device: str
    device_name: str
    dtype: str
    temperature: float
    threads: int
    torch: str
    fastkd: Dict = field(default_factory=dict)
    floors_ms: Dict[str, float] = field(default_factory=dict)
    teacher_bytes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)
    memory_budget_gb: Optional[float] = None  # eager / compiled RKD, unfused LLM-head steps above it are skipped
    llm_dtype: Optional[str] = None  # fused_linear*: their own default dtype (bfloat16 on a GPU)


def _floor_ms(n: int, v: int, dtype: torch.dtype, device: str, repeats: int, reads_teacher: bool = True) -> float:
    """The memory floor of a fused fwd+bwd: read the student (and the dense teacher) once, write the
    gradient once into fresh memory."""
    x = torch.randn(n, v, device=device).to(dtype)
    if device == "cuda":
        buf = torch.empty_like(x)
        ms = statistics.median(_time_ms(lambda: buf.copy_(x), device, repeats, 2))
        copy_bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)  # read + write
        return (3 if reads_teacher else 2) * x.numel() * x.element_size() / copy_bw * 1e3
    clone_ms = statistics.median(_time_ms(lambda: x.clone(), device, repeats, 1))
    if not reads_teacher:
        return clone_ms
    y = torch.randn(n, v, device=device).to(dtype)
    sum_ms = statistics.median(_time_ms(lambda: y.sum(), device, repeats, 1))
    return clone_ms + sum_ms


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _inputs(loss: str, n: int, v: int, dtype: torch.dtype, device: str):
    """Student logits (requiring grad) and the teacher side: (teacher logits, target, top-k values, indices)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
    if loss == "topk":
        t = torch.randn(n, v, device=device, generator=g) * 3
        values, indices = t.topk(TOPK_K, dim=-1)
        del t
        return s, (None, None, values.to(dtype), indices)
    t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=device, generator=g)
    return s, (t, target, None, None)


def _shape_str(s_shape: tuple, t_shape: tuple) -> str:
    s = "x".join(map(str, s_shape))
    return s if t_shape == s_shape else s + ":" + "x".join(map(str, t_shape))


def _feature_inputs(s_shape: tuple, t_shape: tuple, dtype: torch.dtype, device: str):
    """Student features (requiring grad) and the teacher side (teacher features, no grad: the teacher is
    frozen in training)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(s_shape, device=device, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(t_shape, device=device, generator=g).to(dtype)
    return s, (t,)


def _relation_floor_ms(loss: str, s_shape: tuple, t_shape: tuple, dtype: torch.dtype, device: str,
                       repeats: int) -> float:
    """RKD, SP, PKT, CC: the GEMMs a fused fwd+bwd cannot avoid (student and teacher Gram matrices, the
    gradient GEMM), timed with torch.mm. AT: the memory floor (clone the student map, read the teacher map;
    on a GPU: those bytes over the device-to-device copy bandwidth)."""
    n = s_shape[0]
    x = torch.randn(n, math.prod(s_shape[1:]), device=device).to(dtype)
    y = torch.randn(n, math.prod(t_shape[1:]), device=device).to(dtype)
    if loss == "at":
        if device == "cuda":
            buf = torch.empty_like(x)
            ms = statistics.median(_time_ms(lambda: buf.copy_(x), device, repeats, 2))
            copy_bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)
            return (2 * x.numel() + y.numel()) * x.element_size() / copy_bw * 1e3
        return statistics.median(_time_ms(lambda: x.clone(), device, repeats, 1)) + statistics.median(
            _time_ms(lambda: y.sum(), device, repeats, 1))
    g = torch.mm(x, x.t())

    def gemms():
        torch.mm(x, x.t())
        torch.mm(y, y.t())
        torch.mm(g, x)

    return statistics.median(_time_ms(gemms, device, repeats, 1))


def eager_rkd_bytes(n: int, d_s: int, d_t: int, itemsize: int) -> int:
    """Estimated peak extra memory of the eager RepDistiller RKD fwd+bwd: the teacher's N x N x D differences
    and normalized differences (alive to the end of forward), the student's plus their two gradients, and
    the N^3 angle tensors. Measured on the CPU (fp32, D = 2048): N = 128: 0.83 GB, 256: 3.23 GB, 512:
    12.9 GB, against 0.87 / 3.49 / 14.0 GB estimated; torch.compile of it peaks at about half of that."""
    return itemsize * (n * n * (2 * d_t + 4 * d_s) + 2 * n**3)


def _memory_budget_bytes(device: str, fraction: float) -> Optional[int]:
    """``fraction`` of the machine's RAM (of the GPU's memory), and at most 90% of what is free right now."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # memory cached by the allocator from earlier cases is free for this one
        free, total = torch.cuda.mem_get_info()
        return int(min(fraction * total, 0.9 * free))
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, val = line.split(":", 1)
                info[key] = int(val.split()[0]) * 1024
        return int(min(fraction * info["MemTotal"], 0.9 * info.get("MemAvailable", info["MemTotal"])))
    except (OSError, KeyError, ValueError):
        return None


def _size_str(nbytes: float) -> str:
    if nbytes >= 10e9:
        return f"{nbytes / 1e9:.0f} GB"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 0.1e9 else f"{nbytes / 1e6:.0f} MB"


def _error_row(loss: str, shape: str, name: str, **kw) -> Row:
    nan = float("nan")
    return Row(loss, shape, name, nan, nan, nan, nan, **kw)


def _run_relation_case(report: Report, loss: str, s_shape: tuple, t_shape: tuple, impls: Dict[str, Callable],
                       dtype: torch.dtype, device: str, repeats: int, warmup: int, slow_ms: float,
                       mem_fraction: float, progress: Callable[[str], None]) -> List[Row]:
    shape = _shape_str(s_shape, t_shape)
    key = f"{loss} {shape}"
    floor = None
    if loss != "rkd_sweep":
        progress(f"{key}: floor")
        floor = _relation_floor_ms(loss, s_shape, t_shape, dtype, device, max(3, repeats // 2))
        report.floors_ms[key] = floor
    itemsize = torch.tensor([], dtype=dtype).element_size()
    need = None
    if loss in ("rkd", "rkd_sweep"):
        need = eager_rkd_bytes(s_shape[0], math.prod(s_shape[1:]), math.prod(t_shape[1:]), itemsize)
    s, inp = _feature_inputs(s_shape, t_shape, dtype, device)
    results: Dict[str, Row] = {}
    for name, fn in impls.items():
        if fn is None:
            progress(f"{key}: {name} skipped ({SLOW_COMPILE[loss]})")
            results[name] = _error_row(loss, shape, name, skipped=SLOW_COMPILE[loss])
            continue
        if name != "fastkd" and need is not None:
            budget = _memory_budget_bytes(device, mem_fraction)
            if budget is not None and need > budget:
                progress(f"{key}: {name} skipped (needs ~{_size_str(need)}, budget {_size_str(budget)})")
                results[name] = _error_row(loss, shape, name, skipped=f"needs ~{_size_str(need)}")
                continue
        progress(f"{key}: {name}")

        def one_step(fn=fn):
            fn(s, inp, 0.0).backward()
            s.grad = None

        try:
            times, peak = _time_adaptive(one_step, device, repeats, warmup, slow_ms,
                                         compiled=name == "torch.compile", trim=True)
            if peak is None:
                peak = _peak_extra_bytes(one_step, device, trim=True)
        except Exception as e:
            results[name] = _error_row(loss, shape, name, error=_error_text(e))
            s.grad = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        med = statistics.median(times)
        results[name] = Row(loss, shape, name, med, min(times), float("nan"),
                            float("nan") if floor is None else med / floor,
                            peak_extra_mb=None if peak is None else peak / 2**20, timed_runs=len(times))
    for row in results.values():
        for base, attr in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
            if base in results and row.error is None and row.skipped is None and results[base].error is None \
                    and results[base].skipped is None:
                setattr(row, attr, results[base].median_ms / row.median_ms)
    del s, inp
    gc.collect()
    return list(results.values())


def _time_llm(fn: Callable[[], None], device: str, repeats: int, warmup: int, slow_repeats: int,
              compiled: bool) -> tuple:
    """Times one LLM-head step and takes its peak extra memory. A compiled function's first call (the
    compilation), and on a GPU one call for cuBLAS workspaces and Triton autotuning, come first; the next call
    is a warmup and the peak-memory window; when it took longer than LLM_SLOW_MS, at most ``slow_repeats``
    timed calls follow (on the CPU each step takes seconds; with 0 that call is the one timed run), else
    ``warmup - 1`` more warmups and ``repeats`` timed calls. Returns (times in ms, peak extra bytes or None)."""
    for _ in range(1 if compiled or device == "cuda" else 0):
        fn()
    base = _peak_begin(device, trim=True)
    first = _time_ms(fn, device, 1, 0)[0]
    peak = _peak_end(device, base)
    if first > LLM_SLOW_MS:
        return (_time_ms(fn, device, min(repeats, slow_repeats), 0) if slow_repeats else [first]), peak
    return _time_ms(fn, device, repeats, max(0, warmup - 1)), peak


def _llm_floor_ms(n: int, h: int, v: int, dtype: torch.dtype, device: str, repeats: int, warmup: int) -> float:
    """The GEMMs every fwd+bwd through the lm_head does, timed alone: the logits h W^T, the hidden states'
    gradient dlogits W and the weight's gradient dlogits^T h."""
    x = torch.randn(n, h, device=device).to(dtype)
    w = torch.randn(v, h, device=device).to(dtype)
    g = torch.randn(n, v, device=device).to(dtype)

    def gemms():
        torch.mm(x, w.t())
        torch.mm(g, w)
        torch.mm(g.t(), x)

    times, _ = _time_llm(gemms, device, repeats, warmup, LLM_SLOW_REPEATS["fused_linear"], compiled=False)
    return statistics.median(times)


def _llm_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, teacher_head: bool):
    """The student's hidden states and lm_head weight (both requiring grad; logits of standard deviation ~2)
    and the teacher side: (teacher logits [n, v], labels with every LLM_IGNORE_EVERY-th token ignored, and with
    ``teacher_head`` the teacher's hidden states and lm_head weight, else None, None)."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=g) * (2 / math.sqrt(h))).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::LLM_IGNORE_EVERY] = IGNORE_INDEX
    t_hidden = t_weight = None
    if teacher_head:
        t_hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
        t_weight = (torch.randn(v, h, device=device, generator=g) * (3 / math.sqrt(h))).to(dtype)
    return hidden, weight, (teacher, labels, t_hidden, t_weight)


def _llm_impls(loss: str, device: str, compile_baseline: bool) -> Dict[str, Union[Callable, str]]:
    """The implementations of an LLM-head case, in table order; a string is the reason its row is skipped."""
    impls: Dict[str, Union[Callable, str]] = {"eager": eager_fused_linear}
    if loss == "fused_linear":
        if compile_baseline:
            impls["torch.compile"] = torch.compile(eager_fused_linear, dynamic=False)
        impls["fastkd unfused"] = fastkd_unfused_linear
    impls["fastkd fused"] = fastkd_fused_linear
    if loss == "fused_linear" and device == "cuda":
        impls.update(_liger_fused_linear(LLM_TEMPERATURE))
        impls["fastkd head"] = fastkd_fused_linear_head
    return impls


def _run_llm_case(report: Report, loss: str, shape: tuple, dtype: torch.dtype, device: str,
                  impls: Dict[str, Union[Callable, str]], repeats: int, warmup: int, mem_fraction: float,
                  progress: Callable[[str], None]) -> List[Row]:
    """One LLM-head shape: the GEMM floor (fused_linear), then each implementation's fwd+bwd time and peak
    extra memory on the same inputs; unfused baselines whose estimate exceeds the memory budget are skipped."""
    n, h, v = shape
    shape_s = "x".join(map(str, shape))
    key = f"{loss} {shape_s}"
    floor = None
    if loss == "fused_linear":
        progress(f"{key}: GEMM floor")
        floor = _llm_floor_ms(n, h, v, dtype, device, repeats, warmup)
        report.floors_ms[key] = floor
    itemsize = torch.tensor([], dtype=dtype).element_size()
    hidden, weight, inp = _llm_inputs(n, h, v, dtype, device, teacher_head="fastkd head" in impls)
    results: Dict[str, Row] = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            progress(f"{key}: {name} skipped ({fn})")
            results[name] = _error_row(loss, shape_s, name, skipped=fn)
            continue
        if name in LLM_TOKENS_X_V:
            need = itemsize * (LLM_TOKENS_X_V[name] * n * v + v * h + n * h)
            budget = _memory_budget_bytes(device, mem_fraction)
            if budget is not None and need > budget:
                progress(f"{key}: {name} skipped (needs ~{_size_str(need)}, budget {_size_str(budget)})")
                results[name] = _error_row(loss, shape_s, name, skipped=f"needs ~{_size_str(need)}")
                continue
        progress(f"{key}: {name}")

        def one_step(fn=fn):
            fn(hidden, weight, inp, LLM_TEMPERATURE).backward()
            hidden.grad = weight.grad = None

        try:
            times, peak = _time_llm(one_step, device, repeats, warmup, LLM_SLOW_REPEATS[loss],
                                    compiled=name in ("torch.compile", "liger chunked"))
        except Exception as e:  # e.g. out of memory, or a Liger-Kernel version with another API
            results[name] = _error_row(loss, shape_s, name, error=_error_text(e))
            hidden.grad = weight.grad = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        med = statistics.median(times)
        results[name] = Row(loss, shape_s, name, med, min(times), float("nan"),
                            float("nan") if floor is None else med / floor,
                            peak_extra_mb=None if peak is None else peak / 2**20, timed_runs=len(times),
                            tokens_per_s=n / (med * 1e-3))
    ok = {name: r for name, r in results.items() if r.error is None and r.skipped is None}
    for row in ok.values():
        for base, attr in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
            if base in ok:
                setattr(row, attr, ok[base].median_ms / row.median_ms)
        if "eager" in ok and row.peak_extra_mb is not None and ok["eager"].peak_extra_mb:
            row.peak_vs_eager = row.peak_extra_mb / ok["eager"].peak_extra_mb
    del hidden, weight, inp
    gc.collect()
    return list(results.values())


def run(
    cases: List[tuple],
    device: str,
    dtype: torch.dtype,
    temperature: float,
    repeats: int,
    warmup: int,
    compile_baseline: bool = True,
    quiet: bool = False,
    slow_ms: float = 5000.0,
    mem_fraction: float = MEM_FRACTION,
    slow_compile: bool = False,
) -> Report:
    """Times every implementation of each case side by side: (loss, rows, vocab) for the logit losses,
    (loss, student shape, teacher shape) for the relation / feature losses, (loss, (tokens, hidden, vocab),
    dtype) for the LLM-head losses (their own dtype: bfloat16 by default on a GPU)."""
    report = Report(
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        dtype=str(dtype).replace("torch.", ""),
        temperature=temperature,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        fastkd=fastkd.build_info(),
    )
    plans = []
    for loss, n, v in cases:
        if loss in LLM_LOSSES:
            plans.append((loss, n, v, _llm_impls(loss, device, compile_baseline)))
            report.llm_dtype = str(v).replace("torch.", "")
            continue
        impls: Dict[str, Callable] = {}
        if loss != "rkd_sweep":
            impls["eager"] = EAGER[loss]
            if compile_baseline and loss in SLOW_COMPILE and not slow_compile:
                impls["torch.compile"] = None  # a "skipped" row
            elif compile_baseline:
                impls["torch.compile"] = torch.compile(EAGER[loss], dynamic=False)
        if device == "cuda" and loss in LOSSES:
            liger = _liger(loss)
            if liger is not None:
                impls["liger"] = liger
        impls["fastkd"] = fastkd_fn(loss)
        plans.append((loss, n, v, impls))
    if any(p[0] in ("rkd", "rkd_sweep") + LLM_LOSSES for p in plans):
        budget = _memory_budget_bytes(device, mem_fraction)
        report.memory_budget_gb = None if budget is None else budget / 1e9
    steps = sum(len(p[3]) + (p[0] not in ("rkd_sweep", "fused_linear_sweep")) for p in plans)
    step = 0
    itemsize = torch.tensor([], dtype=dtype).element_size()
    prev_sweep: Optional[Row] = None
    prev_llm: Dict[str, Row] = {}  # fused_linear_sweep: each impl's row at the previous token count

    def progress(msg: str) -> None:
        nonlocal step
        step += 1
        _progress(f"[{step}/{steps}] {msg}", quiet)

    for loss, n, v, impls in plans:
        if loss in LLM_LOSSES:
            for row in _run_llm_case(report, loss, n, v, device, impls, repeats, warmup, mem_fraction, progress):
                prev = prev_llm.get(row.impl) if loss == "fused_linear_sweep" else None
                if prev is not None and row.error is None and row.skipped is None:
                    row.time_vs_prev = row.median_ms / prev.median_ms
                    if row.peak_extra_mb and prev.peak_extra_mb:
                        row.peak_vs_prev = row.peak_extra_mb / prev.peak_extra_mb
                if loss == "fused_linear_sweep":
                    prev_llm[row.impl] = row if row.error is None and row.skipped is None else None
                report.rows.append(row)
            continue
        if loss in RELATION_LOSSES:
            rows = _run_relation_case(report, loss, n, v, impls, dtype, device, repeats, warmup, slow_ms,
                                      mem_fraction, progress)
            for row in rows:
                if loss == "rkd_sweep" and row.impl == "fastkd":
                    if prev_sweep is not None and row.error is None and prev_sweep.error is None:
                        row.time_vs_prev = row.median_ms / prev_sweep.median_ms
                        if row.peak_extra_mb and prev_sweep.peak_extra_mb:
                            row.peak_vs_prev = row.peak_extra_mb / prev_sweep.peak_extra_mb
                    prev_sweep = row
                report.rows.append(row)
            continue
        key = f"{loss} {n}x{v}"
        progress(f"{key}: memory floor")
        dense = loss != "topk"
        floor = _floor_ms(n, v, dtype, device, max(3, repeats // 2), reads_teacher=dense)
        report.floors_ms[key] = floor
        nbytes = (3 if dense else 2) * n * v * itemsize
        s, inp = _inputs(loss, n, v, dtype, device)
        if not dense:
            report.teacher_bytes[key] = {
                "dense_logits": n * v * itemsize,
                "topk_values_and_indices": inp[2].numel() * inp[2].element_size() + inp[3].numel() * 8,
            }
        results: Dict[str, Row] = {}
        for name, fn in impls.items():
            progress(f"{key}: {name}")

            def one_step(fn=fn):
                fn(s, inp, temperature).backward()
                s.grad = None

            try:
                times = _time_ms(one_step, device, repeats, warmup)
                peak = _peak_extra_bytes(one_step, device)
            except Exception as e:  # e.g. out of memory for the eager baseline at LLM sizes
                results[name] = Row(loss, f"{n}x{v}", name, float("nan"), float("nan"), float("nan"), float("nan"),
                                    error=_error_text(e))
                s.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            results[name] = Row(
                loss, f"{n}x{v}", name, med, min(times), nbytes / (med * 1e-3) / 1e9, med / floor,
                peak_extra_mb=None if peak is None else peak / 2**20,
            )
        for row in results.values():
            for base, attr in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
                if base in results and row.error is None and results[base].error is None:
                    setattr(row, attr, results[base].median_ms / row.median_ms)
            report.rows.append(row)
        del s, inp
        gc.collect()
    return report


def format_table(report: Report) -> str:
    fk = report.fastkd
    lines = [
        f"fastkd {fk['version']} | fwd+bwd | {report.device}: {report.device_name} | {report.dtype} | "
        f"T={report.temperature} | threads={report.threads} | torch {report.torch} | "
        f"kernels: {'compiled, cpu ' + str(fk['cpu_isa']) if fk['compiled'] else 'NOT compiled (reference)'}"
        + (", cuda" if fk.get("cuda") else ""),
    ]
    for loss in dict.fromkeys(r.loss for r in report.rows):
        if loss in RELATION_LOSSES:
            lines += _relation_table(report, loss)
            continue
        if loss in LLM_LOSSES:
            lines += _llm_table(report, loss)
            continue
        lines += ["", f"== {LOSS_TITLES[loss]}",
                  f"{'shape':>14} {'impl':>14} {'median ms':>10} {'GB/s':>8} {'x floor':>8} {'fastkd x':>9} {'peak MB':>9}"]
        for row in (r for r in report.rows if r.loss == loss):
            if row.error:
                lines.append(f"{row.shape:>14} {row.impl:>14}  failed: {row.error}")
                continue
            fast = next(r for r in report.rows if r.loss == loss and r.shape == row.shape and r.impl == "fastkd")
            speed = "" if row.impl == "fastkd" or fast.error else f"{row.median_ms / fast.median_ms:8.2f}x"
            peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
            lines.append(
                f"{row.shape:>14} {row.impl:>14} {row.median_ms:10.2f} {row.gbps:8.1f} {row.floor_ratio:8.2f} "
                f"{speed:>9} {peak:>9}"
            )
    lines.append("")
    if report.floors_ms:
        lines.append("floor (ms): " + ", ".join(f"{k}: {v:.2f}" for k, v in report.floors_ms.items()))
    for key, b in report.teacher_bytes.items():
        lines.append(
            f"teacher input, {key}: dense logits {b['dense_logits'] / 2**20:.1f} MB vs top-{TOPK_K} values+indices "
            f"{b['topk_values_and_indices'] / 2**20:.2f} MB ({b['dense_logits'] / b['topk_values_and_indices']:.0f}x smaller)"
        )
    losses = {r.loss for r in report.rows}
    if losses & set(LOSSES):
        lines.append("'fastkd x' = how many times faster fastkd is than that row; 'x floor' = time / memory floor "
                     "(dense: clone one N x V tensor + read another; top-k: clone the student).")
    if losses & set(RELATION_LOSSES):
        lines.append("relation losses: shapes are [N, ...] features (STUDENT:TEACHER when they differ), teacher "
                     "without grad; 'x floor' = time / (GEMM floor: student + teacher Gram and the gradient GEMM, "
                     "torch.mm; AT: clone the student map + read the teacher map); 'runs' = timed calls (1: a "
                     f"call slower than the --slow-s limit, timed once without warmup); CPU peak MB: resident-set "
                     "growth after returning the heap's free pages.")
    if losses & set(LLM_LOSSES):
        lines.append("LLM head: tokens x hidden x vocab; a step = fwd+bwd to the gradients of the hidden states and "
                     "the lm_head weight; peak MB = beyond the inputs (hidden states, weights, teacher logits), "
                     "gradients included; 'vs eager' = eager time / this time; 'x floor' = time / the three GEMMs "
                     "alone; 'runs' = timed calls after a warmup (1 in a slow sweep: its first call); head "
                     "rows (GPU) take the teacher as hidden states + lm_head, as Liger-Kernel does.")
    if report.memory_budget_gb is not None and any(r.skipped and r.skipped.startswith("needs ~")
                                                   for r in report.rows):
        lines.append(f"skipped: eager / torch.compile RKD and unfused LLM-head steps whose estimated memory exceeds "
                     f"the budget "
                     f"({_size_str(report.memory_budget_gb * 1e9)}: --mem-fraction of the "
                     f"{'GPU memory' if report.device == 'cuda' else 'RAM'}, at most 90% of what is free).")
    return "\n".join(lines)


def _llm_table(report: Report, loss: str) -> List[str]:
    rows = [r for r in report.rows if r.loss == loss]
    lines = ["", f"== {LOSS_TITLES[loss]} | {report.llm_dtype}, T={LLM_TEMPERATURE:g}, "
                 f"1 token in {LLM_IGNORE_EVERY} ignored"]
    sweep = loss == "fused_linear_sweep"
    if sweep:
        lines.append(f"{'tokens x H x V':>18} {'impl':>14} {'median ms':>10} {'runs':>4} {'tokens/s':>9} {'x prev':>7} "
                     f"{'peak MB':>9} {'x prev':>7} {'(tokens)':>8}")
    else:
        lines.append(f"{'tokens x H x V':>18} {'impl':>14} {'median ms':>10} {'runs':>4} {'tokens/s':>9} "
                     f"{'x floor':>8} {'vs eager':>9} {'peak MB':>9} {'/ eager':>8}")
    prev_tokens: Dict[str, int] = {}  # sweep: each impl's previous token count
    for row in rows:
        if row.skipped:
            lines.append(f"{row.shape:>18} {row.impl:>14}  skipped ({row.skipped})")
            continue
        if row.error:
            lines.append(f"{row.shape:>18} {row.impl:>14}  failed: {row.error}")
            continue
        peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
        head = f"{row.shape:>18} {row.impl:>14} {row.median_ms:10.2f} {row.timed_runs or 0:>4} {row.tokens_per_s:9.0f}"
        if sweep:
            tokens = int(row.shape.split("x")[0])
            tr = "" if row.time_vs_prev is None else f"{row.time_vs_prev:6.2f}x"
            mr = "" if row.peak_vs_prev is None else f"{row.peak_vs_prev:6.2f}x"
            nr = f"{tokens / prev_tokens[row.impl]:6.1f}x" if row.impl in prev_tokens else ""
            prev_tokens[row.impl] = tokens
            lines.append(f"{head} {tr:>7} {peak:>9} {mr:>7} {nr:>8}")
            continue
        speed = "" if row.impl == "eager" or row.speedup_vs_eager is None else f"{row.speedup_vs_eager:8.2f}x"
        rel = "" if row.impl == "eager" or row.peak_vs_eager is None else f"{row.peak_vs_eager:8.3f}"
        lines.append(f"{head} {row.floor_ratio:8.2f} {speed:>9} {peak:>9} {rel:>8}")
    if not sweep:
        for key, ms in report.floors_ms.items():
            if key.startswith(loss + " "):
                lines.append(f"{key.split()[1]:>18} {'GEMM floor':>14} {ms:10.2f}  "
                             "(h W^T, dlogits W, dlogits^T h alone)")
        lines += _llm_targets(report, rows)
    return lines


def _llm_targets(report: Report, rows: List[Row]) -> List[str]:
    """The issue's acceptance figures for fastkd fused at each shape. CPU: peak extra memory at most 1/8 of
    the eager step's, time at most eager's. GPU: peak extra memory beyond the weight gradient (V x H in the
    weight's dtype) below 2.0 GB, and the teacher-head time at most Liger-Kernel's."""
    ok = {(r.shape, r.impl): r for r in rows if r.error is None and r.skipped is None}
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        fused, eager = ok.get((shape, "fastkd fused")), ok.get((shape, "eager"))
        if fused is None or fused.peak_extra_mb is None:
            continue
        if report.device == "cuda":
            _, h, v = (int(x) for x in shape.split("x"))
            itemsize = torch.tensor([], dtype=DTYPES[report.llm_dtype]).element_size()
            beyond = fused.peak_extra_mb * 2**20 - v * h * itemsize
            text = (f"peak {_size_str(fused.peak_extra_mb * 2**20)}, beyond the weight gradient "
                    f"{_size_str(max(0, beyond))} (< 2.0 GB: {beyond < 2e9})")
            head, liger = ok.get((shape, "fastkd head")), ok.get((shape, "liger"))
            if head is not None and liger is not None:
                text += (f"; fastkd head time / liger's {head.median_ms / liger.median_ms:.2f} "
                         f"(<= 1: {head.median_ms <= liger.median_ms})")
        elif eager is not None and fused.peak_vs_eager is not None:
            text = (f"peak / eager's {fused.peak_vs_eager:.3f} (<= 1/8: {fused.peak_vs_eager <= 0.125}); time / "
                    f"eager's {fused.median_ms / eager.median_ms:.2f} (<= 1: {fused.median_ms <= eager.median_ms})")
        else:
            continue
        lines.append(f"{shape:>18} {'target':>14}  fastkd fused: {text}")
    return lines


def _relation_table(report: Report, loss: str) -> List[str]:
    rows = [r for r in report.rows if r.loss == loss]
    lines = ["", f"== {LOSS_TITLES[loss]}"]
    if loss == "rkd_sweep":
        lines.append(f"{'N x D':>22} {'median ms':>10} {'runs':>4} {'x prev':>7} {'(N^3)':>7} {'peak MB':>9} "
                     f"{'x prev':>7} {'(N^2)':>7}")
        prev = None
        for row in rows:
            if row.error:
                lines.append(f"{row.shape:>22}  failed: {row.error}")
                continue
            n = int(row.shape.split("x")[0])
            r3 = r2 = tr = mr = ""
            if prev is not None:
                r3, r2 = f"{(n / prev) ** 3:6.1f}x", f"{(n / prev) ** 2:6.1f}x"
            if row.time_vs_prev is not None:
                tr = f"{row.time_vs_prev:6.2f}x"
            if row.peak_vs_prev is not None:
                mr = f"{row.peak_vs_prev:6.2f}x"
            peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
            lines.append(f"{row.shape:>22} {row.median_ms:10.2f} {row.timed_runs or 0:>4} {tr:>7} {r3:>7} "
                         f"{peak:>9} {mr:>7} {r2:>7}")
            prev = n
        return lines
    lines.append(f"{'shape':>22} {'impl':>14} {'median ms':>10} {'runs':>4} {'x floor':>8} {'fastkd x':>9} "
                 f"{'peak MB':>9}")
    for row in rows:
        if row.skipped:
            lines.append(f"{row.shape:>22} {row.impl:>14}  skipped ({row.skipped})")
            continue
        if row.error:
            lines.append(f"{row.shape:>22} {row.impl:>14}  failed: {row.error}")
            continue
        fast = next((r for r in rows if r.shape == row.shape and r.impl == "fastkd"), None)
        ok = fast is not None and fast.error is None and fast.skipped is None
        speed = "" if row.impl == "fastkd" or not ok else f"{row.median_ms / fast.median_ms:8.2f}x"
        peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
        lines.append(f"{row.shape:>22} {row.impl:>14} {row.median_ms:10.2f} {row.timed_runs or 0:>4} "
                     f"{row.floor_ratio:8.2f} {speed:>9} {peak:>9}")
    return lines


def _parse_shapes(text: str) -> List[tuple]:
    shapes = []
    for part in text.split(","):
        try:
            n, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not ROWSxVOCAB") from None
        if n <= 0 or v <= 0:
            raise argparse.ArgumentTypeError(f"shape {part!r} must be positive")
        shapes.append((n, v))
    return shapes


def _parse_feature_shapes(text: str, min_dim: int = 2) -> List[tuple]:
    """'N x D...' feature shapes, or 'STUDENT:TEACHER' pairs (same batch N): [(student, teacher), ...]."""
    out = []
    for part in text.split(","):
        pair = []
        for side in part.split(":"):
            try:
                dims = tuple(int(x) for x in side.lower().split("x"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"shape {part!r} is not NxD[xHxW...][:NxD...]") from None
            if len(dims) < min_dim or any(d <= 0 for d in dims):
                raise argparse.ArgumentTypeError(
                    f"shape {part!r}: each side needs at least {min_dim} positive dimensions")
            pair.append(dims)
        if len(pair) > 2:
            raise argparse.ArgumentTypeError(f"shape {part!r}: at most one ':' (STUDENT:TEACHER)")
        s_shape, t_shape = pair[0], pair[-1]
        if s_shape[0] != t_shape[0]:
            raise argparse.ArgumentTypeError(f"shape {part!r}: student and teacher batch sizes differ")
        out.append((s_shape, t_shape))
    return out


def _parse_llm_shape(text: str) -> tuple:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--llm-shape {text!r} is not TOKENSxHIDDENxVOCAB") from None
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--llm-shape {text!r}: three positive sizes TOKENSxHIDDENxVOCAB")
    return shape


def _parse_tokens(text: str) -> List[int]:
    try:
        tokens = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--llm-tokens {text!r} is not a list of token counts") from None
    if any(t <= 0 for t in tokens):
        raise argparse.ArgumentTypeError(f"--llm-tokens {text!r}: token counts must be positive")
    return tokens


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastkd-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss", type=str, default=",".join(DEFAULT_LOSSES),
                   help=f"comma-separated losses to run, from {', '.join(ALL_LOSSES)}, or the groups "
                        f"{', '.join(LOSS_GROUPS)} (default: {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--shapes", type=str, default=None,
                   help="comma-separated shapes for every selected loss but the LLM-head ones (default: per loss\n"
                        "and device): ROWSxVOCAB for the logit losses; feature shapes NxD[xHxW...] for the relation\n"
                        "losses, STUDENT:TEACHER when the widths differ (rkd_sweep: the N x D points of the sweep)")
    p.add_argument("--llm-shape", type=str, default=None, metavar="TOKENSxHIDDENxVOCAB",
                   help=f"fused_linear's shape; fused_linear_sweep takes its HIDDENxVOCAB (default: "
                        f"{LLM_SHAPES['cpu']} on cpu,\n{LLM_SHAPES['cuda']} on cuda)")
    p.add_argument("--llm-tokens", type=str, default=None, metavar="N,N,...",
                   help=f"fused_linear_sweep's token counts (default: {LLM_SWEEP_TOKENS['cpu']} on cpu, "
                        f"{LLM_SWEEP_TOKENS['cuda']} on cuda)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help=f"default: float32; the LLM-head losses: {LLM_DTYPES['cpu']} on cpu, "
                        f"{LLM_DTYPES['cuda']} on cuda")
    p.add_argument("--temperature", type=float, default=4.0,
                   help=f"softmax temperature (the LLM-head losses: T = {LLM_TEMPERATURE:g}, as TRL and Liger-Kernel)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions per case (median reported; LLM head: at most 2 after a call over 1 s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--slow-compile", action="store_true",
                   help="also compile the baselines whose compilation takes minutes (CC's per-row loop)")
    p.add_argument("--slow-s", type=float, default=5.0,
                   help="relation losses: a call slower than this (seconds) is timed once, without warmup")
    p.add_argument("--mem-fraction", type=float, default=MEM_FRACTION,
                   help="skip the eager / compiled RKD and the unfused LLM-head steps when their estimated\n"
                        "memory exceeds this fraction of the RAM (GPU memory), or 90%% of what is free")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    losses = []
    for x in (x.strip() for x in args.loss.split(",")):
        losses += list(LOSS_GROUPS.get(x, (x,) if x else ()))
    losses = list(dict.fromkeys(losses))
    unknown = [x for x in losses if x not in ALL_LOSSES]
    if unknown or not losses:
        p.error(f"--loss: unknown {unknown}; choose from {', '.join(ALL_LOSSES)} or {', '.join(LOSS_GROUPS)}")
    cases = []
    try:
        for loss in losses:
            if loss in LLM_LOSSES:
                n, h, v = _parse_llm_shape(args.llm_shape or LLM_SHAPES[args.device])
                tokens = [n] if loss == "fused_linear" else _parse_tokens(
                    args.llm_tokens or LLM_SWEEP_TOKENS[args.device])
                cases += [(loss, (t, h, v), DTYPES[args.dtype or LLM_DTYPES[args.device]]) for t in tokens]
                continue
            if loss in RELATION_LOSSES:
                text = args.shapes or RELATION_SHAPES[args.device][loss]
                for s_shape, t_shape in _parse_feature_shapes(text, 3 if loss == "at" else 2):
                    cases.append((loss, s_shape, t_shape))
                continue
            for n, v in _parse_shapes(args.shapes or DEFAULT_SHAPES[args.device][loss]):
                if loss == "topk" and v < TOPK_K:
                    raise argparse.ArgumentTypeError(f"topk needs a vocabulary of at least {TOPK_K}, got {v}")
                cases.append((loss, n, v))
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if not 0 < args.mem_fraction <= 1 or not args.slow_s > 0:
        p.error("--mem-fraction must be in (0, 1] and --slow-s > 0")

    report = run(cases, args.device, DTYPES[args.dtype or "float32"], args.temperature, args.repeats, args.warmup,
                 compile_baseline=not args.no_compile, quiet=args.quiet, slow_ms=args.slow_s * 1e3,
                 mem_fraction=args.mem_fraction, slow_compile=args.slow_compile)
    if args.json != "-":
        print(format_table(report))
    if args.json:
        payload = json.dumps(asdict(report), indent=2, default=str)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
