"""The response-based losses of issue 4: fastkd.reverse_kl_loss, jsd_loss, tvd_loss, dkd_loss, topk_kd_loss,
kd_loss's hard-label mix (alpha, beta, return_parts) and num_items_in_batch, and their modules.

Values and gradients against the float64 reference, the anchors' formulations (TRL GKD JSD, mdistiller DKD,
torchdistill KDLoss), gradcheck, opcheck, torch.compile, low precision, determinism, edge cases and bad
input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    eager_response,
    assert_close,
    mdistiller_dkd,
    torchdistill_kd,
    trl_generalized_jsd,
    value_and_grads,
)

import fastkd
from fastkd import reference as R

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def _logits(shape, device, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _labels(lead, vocab, device, seed=0, masked=True):
    """Class indices in [0, vocab) with every third row (from the second on) set to -100 if masked."""
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.randint(0, vocab, tuple(lead), generator=g)
    if masked:
        y.view(-1)[1::3] = -100
    return y.to(device)


def _tie_free_pair(shape, device, dtype=torch.float32, seed=0):
    """Student and teacher logits whose softmaxes are nowhere near equal: teacher = student +- 1 (random sign
    per entry), so p_j / q_j takes two values per row, far from 1. TVD's gradient jumps where p_j == q_j; with
    independent random logits and V = 50k some entries come within float32 rounding of a tie, and float32
    and float64 then legitimately disagree on the sign."""
    s = _logits(shape, device, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 500)
    sign = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device=device, dtype=torch.float64)
    return s.to(dtype), (s + sign).to(dtype)


# --------------------------------------------------------------------------------------------------------
# one calling convention for every loss: f(student, teacher, T, labels=None, **kw)
# --------------------------------------------------------------------------------------------------------
LOSSES = ["kd", "kd_mix", "reverse_kl", "jsd0", "jsd0.3", "jsd1", "tvd", "dkd", "topk", "topk_bucket"]
NEEDS_TARGET = {"kd_mix", "dkd"}  # labels are class targets (always given)
TOPK = {"topk", "topk_bucket"}  # teacher enters as cached top-k values: no teacher gradient


def _topk_k(vocab):
    return max(1, min(5, vocab - 1))


def _topk_teacher(name, t, T):
    """Top-k values/indices from teacher logits, computed in the teacher's dtype (the oracle gets the same
    numbers, upcast)."""
    t = t.detach()
    k = _topk_k(t.shape[-1])
    if name == "topk":
        return t.topk(k, dim=-1)
    return F.log_softmax(t.float() / T, dim=-1).to(t.dtype).topk(k, dim=-1)


def _fn(mod, name, upcast=False):
    def f(s, t, T=1.0, labels=None, **kw):
        if upcast:
            s64, t64 = s.double(), t.double()
        else:
            s64, t64 = s, t
        if name == "kd":
            return mod.kd_loss(s64, t64, T, labels=labels, **kw)
        if name == "kd_mix":
            return mod.kd_loss(s64, t64, T, labels=labels, alpha=0.3, beta=0.8, **kw)
        if name == "reverse_kl":
            return mod.reverse_kl_loss(s64, t64, T, labels=labels, **kw)
        if name.startswith("jsd"):
            return mod.jsd_loss(s64, t64, float(name[3:]), T, labels=labels, **kw)
        if name == "tvd":
            return mod.tvd_loss(s64, t64, T, labels=labels, **kw)
        if name == "dkd":
            return mod.dkd_loss(s64, t64, labels, 1.0, 8.0, T, **kw)
        if name in TOPK:
            vals, idx = _topk_teacher(name, t, T)
            if upcast:
                vals = vals.double()
            extra = dict(values_are="logprobs", tail="bucket") if name == "topk_bucket" else {}
            return mod.topk_kd_loss(s64, vals, idx, T, labels=labels, **extra, **kw)
        raise AssertionError(name)

    return f


def fused(name):
    return _fn(fastkd, name)


def oracle(name):
    """The float64 reference on the same (rounded) inputs."""
    return _fn(R, name, upcast=True)


def _pair(name, shape, device, dtype=torch.float32, seed=0):
    if name == "tvd":
        return _tie_free_pair(shape, device, dtype, seed=seed)
    return _logits(shape, device, dtype, seed=seed + 1), _logits(shape, device, dtype, seed=seed + 2)


def _targets_for(name, shape, device, masked, seed=0):
    if masked or name in NEEDS_TARGET:
        return _labels(shape[:-1], shape[-1], device, seed=seed, masked=masked)
    return None


def _close_loss(actual, expected, what, rtol=2e-5, atol=1e-6):
    assert_close(actual, expected, rtol=rtol, atol=atol, what=what)


def _close_grad(actual, expected, what, rtol=1e-4):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=1e-5 * scale + 1e-12, what=what)


# --------------------------------------------------------------------------------------------------------
# values and gradients against the float64 reference
# --------------------------------------------------------------------------------------------------------
SHAPES = [(1, 2), (3, 7), (17, 1000), (4, 9, 50), (5, 50257)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("name", LOSSES)
def test_matches_float64_oracle(device, name, shape, temperature):
    s, t = _pair(name, shape, device)
    big = math.prod(shape) > 100_000  # the float64 oracle is slow there: the main paths only
    for masked in (True,) if big else (False, True):
        labels = _targets_for(name, shape, device, masked)
        for reduction in ("batchmean", "none") if big else REDUCTIONS:
            what = f"{name} {reduction} masked={masked}"
            go = None if reduction != "none" else torch.rand(shape[:-1], dtype=torch.float64, device=device)
            kw = dict(labels=labels, reduction=reduction, grad_out=go)
            loss, (gs,) = value_and_grads(fused(name), s, t, temperature, **kw)
            ref, (gs_ref,) = value_and_grads(oracle(name), s, t, temperature, **kw)
            assert loss.dtype == torch.float32 and gs.dtype == torch.float32, what
            assert loss.shape == ref.shape == (shape[:-1] if reduction == "none" else ()), what
            _close_loss(loss, ref, what)
            _close_grad(gs, gs_ref, what)
            if labels is not None:
                assert torch.all(gs[labels == -100] == 0), what
    if name in TOPK:
        return
    # mutual / online distillation: the teacher requires grad and its gradient must be exact too
    t_req = t.clone().requires_grad_(True)
    loss, (gs, gt) = value_and_grads(fused(name), s, t_req, temperature, labels=labels)
    ref, (gs_ref, gt_ref) = value_and_grads(oracle(name), s, t_req, temperature, labels=labels)
    _close_loss(loss, ref, f"{name} teacher-grad loss")
    _close_grad(gs, gs_ref, f"{name} student grad (teacher requires grad)")
    _close_grad(gt, gt_ref, f"{name} teacher grad")
    assert gt.dtype == torch.float32


@pytest.mark.parametrize("name", LOSSES)
def test_upstream_gradient_scales(device, name):
    s, t = _pair(name, (6, 40), device, seed=3)
    labels = _targets_for(name, (6, 40), device, masked=True)
    for w in (0.0, 0.37, -2.0):
        sg = s.clone().requires_grad_(True)
        (fused(name)(sg, t, 3.0, labels=labels) * w).backward()
        sr = s.clone().requires_grad_(True)
        (oracle(name)(sr, t, 3.0, labels=labels) * w).backward()
        _close_grad(sg.grad, sr.grad, f"{name} w={w}")


def test_one_large_topk_case(device):
    # k = 64 of a 50k vocabulary: the tail sums run over almost the whole row
    s, t = _logits((4, 50257), device, seed=4), _logits((4, 50257), device, seed=5)
    for values_are, tail in (("logits", "renormalize"), ("logprobs", "bucket")):
        vals, idx = (t if values_are == "logits" else F.log_softmax(t / 2.0, -1)).topk(64, dim=-1)
        kw = dict(values_are=values_are, tail=tail)
        loss, (gs,) = value_and_grads(lambda a, _t: fastkd.topk_kd_loss(a, vals, idx, 2.0, **kw), s, t)
        ref, (gs_ref,) = value_and_grads(
            lambda a, _t: R.topk_kd_loss(a.double(), vals.double(), idx, 2.0, **kw), s, t
        )
        _close_loss(loss, ref, tail)
        _close_grad(gs, gs_ref, tail)


# --------------------------------------------------------------------------------------------------------
# anchors: TRL GKD generalized JSD, mdistiller DKD, torchdistill KDLoss
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
def test_jsd_matches_trl(device, beta, temperature, with_labels):
    B, T_len, V = 3, 5, 40
    s, t = _logits((B, T_len, V), device, seed=6), _logits((B, T_len, V), device, seed=7)
    labels = _labels((B, T_len), V, device) if with_labels else None
    for reduction in ("batchmean", "sum", "mean"):
        ours, (g,) = value_and_grads(
            lambda a, b: fastkd.jsd_loss(a, b, beta, temperature, reduction=reduction, labels=labels), s, t
        )
        theirs, (g_ref,) = value_and_grads(
            lambda a, b: trl_generalized_jsd(a.double(), b.double(), labels, beta, temperature, reduction), s, t
        )
        _close_loss(ours, theirs, f"jsd {reduction}")
        _close_grad(g, g_ref, f"jsd grad {reduction}")
    # "none": fastkd gives one value per row; TRL one per vocabulary entry (masked rows dropped)
    per_row = fastkd.jsd_loss(s, t, beta, temperature, reduction="none", labels=labels)
    assert per_row.shape == (B, T_len)
    theirs = trl_generalized_jsd(s.double(), t.double(), labels, beta, temperature, "none").sum(-1)
    kept = per_row if labels is None else per_row[labels != -100]
    _close_loss(kept.reshape(-1), theirs.reshape(-1), "jsd none")
    # TRL's quirk, kept: [B, T, V] batchmean without labels divides by B, not by B * T
    total = fastkd.jsd_loss(s, t, beta, temperature, reduction="sum", labels=labels)
    divisor = B if labels is None else (labels != -100).sum()
    _close_loss(fastkd.jsd_loss(s, t, beta, temperature, labels=labels), total / divisor, "jsd batchmean divisor")
    # 2-D input: batchmean is per row, as TRL
    s2, t2 = s[0], t[0]
    _close_loss(fastkd.jsd_loss(s2, t2, beta, temperature), trl_generalized_jsd(s2.double(), t2.double(), None,
                beta, temperature), "jsd 2-D")


def test_jsd_one_dimensional_input_is_one_row(device):
    s, t = _logits((30,), device, seed=8), _logits((30,), device, seed=9)
    for beta in (0.0, 0.4, 1.0):
        assert fastkd.jsd_loss(s, t, beta, reduction="none").shape == ()
        _close_loss(fastkd.jsd_loss(s, t, beta), fastkd.jsd_loss(s[None], t[None], beta), "1-D jsd")


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 6.0, 1.0)])
def test_dkd_matches_mdistiller(device, alpha, beta, temperature):
    s, t = _logits((64, 100), device, seed=10), _logits((64, 100), device, seed=11)
    y = _labels((64,), 100, device, masked=False)
    ours, (g,) = value_and_grads(lambda a, b: fastkd.dkd_loss(a, b, y, alpha, beta, temperature), s, t)
    theirs, (g_ref,) = value_and_grads(
        lambda a, b: mdistiller_dkd(a.double(), b.double(), y, alpha, beta, temperature), s, t
    )
    _close_loss(ours, theirs, "dkd")
    _close_grad(g, g_ref, "dkd grad")
    # mdistiller's own float32 run agrees to float32 accuracy
    _close_loss(ours, mdistiller_dkd(s, t, y, alpha, beta, temperature), "dkd vs fp32 mdistiller", rtol=1e-4)
    # DKDLoss's warmup is mdistiller's DKD.forward_train factor min(epoch / warmup, 1)
    crit = fastkd.DKDLoss(alpha=alpha, beta=beta, temperature=temperature, warmup=20)
    _close_loss(crit(s, t, y, epoch=5), 0.25 * theirs, "DKDLoss warmup", rtol=1e-5)


def test_dkd_decomposes_kd(device):
    # KL(p || q) = TCKD + (1 - p_y) * NCKD, per row (Zhao et al., eq. 4)
    s, t = _logits((9, 30), device, seed=12), _logits((9, 30), device, seed=13)
    y = _labels((9,), 30, device, masked=False)
    tckd = fastkd.dkd_loss(s, t, y, 1.0, 0.0, 2.0, reduction="none")
    nckd = fastkd.dkd_loss(s, t, y, 0.0, 1.0, 2.0, reduction="none")
    p_y = F.softmax(t.double() / 2.0, -1).gather(-1, y[:, None]).squeeze(-1)
    kd = fastkd.kd_loss(s, t, 2.0, reduction="none")
    _close_loss(tckd.double() + (1 - p_y) * nckd.double(), kd.double(), "decomposition", rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kd_alpha_matches_torchdistill(device, temperature, reduction):
    s, t = _logits((32, 50), device, seed=14), _logits((32, 50), device, seed=15)
    y = _labels((32,), 50, device, masked=False)
    # branch 1: the bare KL, without T^2 (alpha None or 0, or no targets)
    bare, (g_bare,) = value_and_grads(
        lambda a, b: fastkd.kd_loss(a, b, temperature, reduction=reduction, scale_by_temperature=False), s, t
    )
    for alpha, targets in ((None, y), (0.0, y), (0.5, None)):
        theirs, (g_ref,) = value_and_grads(
            lambda a, b: torchdistill_kd(a.double(), b.double(), targets, temperature, alpha, reduction=reduction),
            s, t,
        )
        _close_loss(bare, theirs, f"branch 1 alpha={alpha}")
        _close_grad(g_bare, g_ref, f"branch 1 grad alpha={alpha}")
    # branch 2: alpha * CE + beta * T^2 * KL, beta = 1 - alpha by default
    for alpha, beta in ((0.1, None), (0.5, None), (0.9, 0.5), (0.5, 2.0), (1.0, None)):
        kw = dict(reduction=reduction, labels=y, alpha=alpha, beta=beta)
        ours, (g,) = value_and_grads(lambda a, b: fastkd.kd_loss(a, b, temperature, **kw), s, t)
        theirs, (g_ref,) = value_and_grads(
            lambda a, b: torchdistill_kd(a.double(), b.double(), y, temperature, alpha, beta, reduction), s, t
        )
        _close_loss(ours, theirs, f"branch 2 alpha={alpha} beta={beta}")
        _close_grad(g, g_ref, f"branch 2 grad alpha={alpha} beta={beta}")
        crit = fastkd.KDLoss(temperature=temperature, alpha=alpha, beta=beta, reduction=reduction)
        _close_loss(crit(s, t, y), theirs, f"KDLoss alpha={alpha} beta={beta}")


# --------------------------------------------------------------------------------------------------------
# top-k teacher
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values_are", ["logits", "logprobs"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_kd(device, values_are, temperature):
    shape = (6, 4, 37)
    s, t = _logits(shape, device, seed=16), _logits(shape, device, seed=17)
    g = torch.Generator().manual_seed(18)
    perm = torch.rand(shape, generator=g).argsort(dim=-1).to(device)  # a random permutation per row
    src = t if values_are == "logits" else F.log_softmax(t / temperature, dim=-1)
    vals = src.gather(-1, perm)
    labels = _labels(shape[:-1], shape[-1], device)
    # with k = V there is no tail: "bucket" adds nothing, whatever residue 1 - sum(exp(values)) rounds to
    tails = ("renormalize", "bucket") if values_are == "logprobs" else ("renormalize",)
    for reduction in REDUCTIONS:
        for lab in (None, labels):
            kd, (gs_kd,) = value_and_grads(
                lambda a, b: fastkd.kd_loss(a, b, temperature, reduction=reduction, labels=lab), s, t
            )
            for tail in tails:
                kw = dict(values_are=values_are, tail=tail, reduction=reduction, labels=lab)
                ours, (gs,) = value_and_grads(
                    lambda a, _t: fastkd.topk_kd_loss(a, vals, perm, temperature, **kw), s, t
                )
                assert torch.isfinite(ours).all()
                _close_loss(ours, kd, f"k=V {tail} {reduction}")
                _close_grad(gs, gs_kd, f"k=V {tail} grad {reduction}")


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize(
    "values_are,tail", [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
)
def test_topk_matches_oracle(device, k, values_are, tail):
    shape = (3, 7, 100)
    s, t = _logits(shape, device, seed=19), _logits(shape, device, seed=20)
    labels = _labels(shape[:-1], shape[-1], device)
    for temperature, index_dtype in ((1.0, torch.int64), (3.0, torch.int32)):
        src = t if values_are == "logits" else F.log_softmax(t / temperature, dim=-1)
        vals, idx = src.topk(k, dim=-1)
        idx = idx.to(index_dtype)
        for reduction in REDUCTIONS:
            for lab in (None, labels):
                what = f"k={k} {values_are}/{tail} T={temperature} {reduction} labels={lab is not None}"
                kw = dict(values_are=values_are, tail=tail, reduction=reduction, labels=lab)
                go = None if reduction != "none" else torch.rand(shape[:-1], dtype=torch.float64, device=device)
                ours, (gs,) = value_and_grads(
                    lambda a, _t: fastkd.topk_kd_loss(a, vals, idx, temperature, **kw), s, t, grad_out=go
                )
                ref, (gs_ref,) = value_and_grads(
                    lambda a, _t: R.topk_kd_loss(a.double(), vals.double(), idx, temperature, **kw), s, t, grad_out=go
                )
                _close_loss(ours, ref, what)
                _close_grad(gs, gs_ref, what)


def test_topk_bucket_is_kd_of_collapsed_distributions(device):
    # bucket: KL between (p_kept..., p_tail) and (q_kept..., q_tail), the tail being one merged class
    s, t = _logits((5, 60), device, seed=21), _logits((5, 60), device, seed=22)
    T = 1.5
    lp = F.log_softmax(t.double() / T, -1)
    vals, idx = lp.topk(7, dim=-1)
    q = F.softmax(s.double() / T, -1)
    kept = torch.zeros_like(q, dtype=torch.bool).scatter(-1, idx, True)
    p_k, q_k = vals.exp(), q.gather(-1, idx)
    p_tail, q_tail = 1 - p_k.sum(-1), (q * ~kept).sum(-1)
    expected = T * T * ((p_k * (p_k.log() - q_k.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log()))
    ours = fastkd.topk_kd_loss(s, vals.float(), idx, T, values_are="logprobs", tail="bucket", reduction="none")
    _close_loss(ours, expected, "bucket", rtol=1e-5, atol=1e-6)


def test_topk_student_masked_vocab_outside_kept_set(device):
    s, t = _logits((4, 80), device, seed=23), _logits((4, 80), device, seed=24)
    vals, idx = F.log_softmax(t, -1).topk(10, dim=-1)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True)
    banned = (torch.rand(4, 80, generator=torch.Generator().manual_seed(25)) < 0.3).to(device) & ~kept
    s = s.masked_fill(banned, -math.inf)
    for tail in ("renormalize", "bucket"):
        f = lambda a, _t: fastkd.topk_kd_loss(a, vals, idx, values_are="logprobs", tail=tail)  # noqa: E731
        g = lambda a, _t: R.topk_kd_loss(a.double(), vals.double(), idx, values_are="logprobs", tail=tail)  # noqa
        loss, (gs,) = value_and_grads(f, s, t)
        ref, (gs_ref,) = value_and_grads(g, s, t)
        assert torch.isfinite(loss) and torch.isfinite(gs).all()
        assert torch.all(gs[banned] == 0)
        _close_loss(loss, ref, tail)
        _close_grad(gs, gs_ref, tail)


# --------------------------------------------------------------------------------------------------------
# TVD ties, reverse KL support, extreme and masked inputs
# --------------------------------------------------------------------------------------------------------
def test_tvd_ties_give_zero_loss_and_zero_gradient(device):
    s = _logits((6, 300), device, seed=26)
    t = s.clone()
    t[3:] = _logits((3, 300), device, seed=27)  # rows 0-2: student == teacher, every entry ties
    t = t.requires_grad_(True)
    go = torch.ones(6, dtype=torch.float64, device=device)
    loss, (gs, gt) = value_and_grads(fastkd.tvd_loss, s, t, 2.0, reduction="none", grad_out=go)
    assert torch.all(loss[:3] == 0)
    assert torch.all(gs[:3] == 0) and torch.all(gt[:3] == 0)
    assert torch.all(loss[3:] > 0)
    loss_b, (gs_b,) = value_and_grads(fastkd.tvd_loss, s[:3], s[:3].clone(), 2.0)
    assert loss_b.item() == 0.0 and torch.all(gs_b == 0)


def test_tvd_matches_eager(device):
    from helpers import eager_tvd

    s, t = _tie_free_pair((7, 90), device, seed=28)
    ours, (g,) = value_and_grads(fastkd.tvd_loss, s, t, 1.7, reduction="none", grad_out=torch.ones(7, device=device))
    theirs, (g_ref,) = value_and_grads(lambda a, b: eager_tvd(a.double(), b.double(), 1.7), s, t,
                                       grad_out=torch.ones(7, device=device))
    _close_loss(ours, theirs, "tvd")
    _close_grad(g, g_ref, "tvd grad")


def test_reverse_kl_support_mismatch(device):
    s, t = _logits((2, 10), device, seed=29), _logits((2, 10), device, seed=30)
    t_masked = t.clone()
    t_masked[:, 3] = -math.inf  # the student puts mass where the teacher has none: +inf, as the math says
    assert fastkd.reverse_kl_loss(s, t_masked).item() == math.inf
    assert R.reverse_kl_loss(s, t_masked).item() == math.inf
    s_masked = s.clone()
    s_masked[:, 3] = -math.inf  # the teacher has mass the student lacks: finite for reverse KL
    _close_loss(fastkd.reverse_kl_loss(s_masked, t), oracle("reverse_kl")(s_masked, t), "rkl")
    assert torch.isfinite(fastkd.reverse_kl_loss(s_masked, t))


@pytest.mark.parametrize("name", [n for n in LOSSES if n not in TOPK])
def test_masked_minus_inf_entries_are_finite(device, name):
    s, t = _logits((6, 100), device, seed=31), _logits((6, 100), device, seed=32)
    mask = (torch.rand(6, 100, generator=torch.Generator().manual_seed(33)) < 0.3).to(device)
    s = s.masked_fill(mask, -math.inf)
    t = t.masked_fill(mask, -math.inf).requires_grad_(True)
    y = t.detach().argmax(-1)  # a class target both sides give mass to
    labels = y if name in NEEDS_TARGET else None
    loss, (gs, gt) = value_and_grads(fused(name), s, t, 2.0, labels=labels)
    ref, (gs_ref, gt_ref) = value_and_grads(oracle(name), s, t, 2.0, labels=labels)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[mask] == 0) and torch.all(gt[mask] == 0)
    _close_loss(loss, ref, name)
    _close_grad(gs, gs_ref, f"{name} student")
    _close_grad(gt, gt_ref, f"{name} teacher")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_masked_vocab_trl_nan_fastkd_finite(device, beta):
    # Banned / padded vocabulary entries (-inf on both sides) are valid input. TRL's formulation computes
    # exp(-inf) * (-inf - -inf) = NaN there; fastkd gives the divergence over the remaining entries.
    s, t = _logits((2, 6, 50), device, seed=34), _logits((2, 6, 50), device, seed=35)
    mask = (torch.rand(2, 6, 50, generator=torch.Generator().manual_seed(36)) < 0.2).to(device)
    s, t = s.masked_fill(mask, -math.inf), t.masked_fill(mask, -math.inf)
    labels = _labels((2, 6), 50, device)
    theirs = trl_generalized_jsd(s, t, labels, beta)
    assert torch.isnan(theirs)
    t = t.requires_grad_(True)
    f = lambda a, b: fastkd.jsd_loss(a, b, beta, labels=labels)  # noqa: E731
    g = lambda a, b: R.jsd_loss(a.double(), b.double(), beta, labels=labels)  # noqa: E731
    ours, (gs, gt) = value_and_grads(f, s, t)
    ref, (gs_ref, gt_ref) = value_and_grads(g, s, t)
    assert torch.isfinite(ours) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _close_loss(ours, ref, "masked jsd")
    _close_grad(gs, gs_ref, "masked jsd student")
    _close_grad(gt, gt_ref, "masked jsd teacher")
    # and it is TRL's value on the vocabulary with the banned entries removed (one row at a time)
    kept_rows = [(i, j) for i in range(2) for j in range(6) if labels[i, j] != -100]
    total = sum(
        trl_generalized_jsd(s[i, j][~mask[i, j]][None].double(), t[i, j][~mask[i, j]][None].detach().double(),
                            None, beta, reduction="sum")
        for i, j in kept_rows
    )
    _close_loss(ours, total / len(kept_rows), "masked jsd vs compacted TRL")


def test_dkd_huge_logit_gap_mdistiller_nonfinite_fastkd_finite(device):
    s, t = _logits((8, 50), device, seed=37), _logits((8, 50), device, seed=38)
    y = _labels((8,), 50, device, masked=False)
    rows = torch.arange(8, device=device)
    s_gap = s.clone()
    s_gap[rows, y] += 1e4  # a confident student: mdistiller's log of its probabilities has log(0) = -inf
    t_gap = t.clone()
    t_gap[rows, y] += 1e4
    for what, (a, b) in {"student gap": (s_gap, t), "both gap": (s_gap, t_gap)}.items():
        theirs = mdistiller_dkd(a, b, y, 1.0, 8.0, 4.0)
        assert not torch.isfinite(theirs), what
        ours, (gs,) = value_and_grads(fastkd.dkd_loss, a, b, y)
        ref, (gs_ref,) = value_and_grads(lambda u, w: R.dkd_loss(u.double(), w.double(), y), a, b)
        assert torch.isfinite(ours) and torch.isfinite(gs).all(), what
        _close_loss(ours, ref, what)
        _close_grad(gs, gs_ref, what)


@pytest.mark.parametrize("name", LOSSES)
def test_extreme_logits(device, name):
    s, t = _logits((16, 500), device, scale=1e4, seed=39), _logits((16, 500), device, scale=1e4, seed=40)
    labels = _targets_for(name, (16, 500), device, masked=False)
    for temperature in (1.0, 4.0):
        loss, (gs,) = value_and_grads(fused(name), s, t, temperature, labels=labels)
        ref, (gs_ref,) = value_and_grads(oracle(name), s, t, temperature, labels=labels)
        assert torch.isfinite(loss) and torch.isfinite(gs).all()
        _close_loss(loss, ref, f"{name} T={temperature}", rtol=1e-5)
        _close_grad(gs, gs_ref, f"{name} T={temperature}")


# --------------------------------------------------------------------------------------------------------
# reductions: num_items_in_batch, all-masked, empty, hard-label parts
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_num_items_in_batch(device, name):
    shape = (4, 6, 30)
    s, t = _pair(name, shape, device, seed=41)
    labels = _targets_for(name, shape, device, masked=True)
    f = fused(name)
    total, (g_total,) = value_and_grads(f, s, t, 2.0, labels=labels, reduction="sum")
    for n in (7, 7.0, torch.tensor(7), torch.tensor(7.0, device=device), torch.tensor(7, dtype=torch.int32)):
        for reduction in ("batchmean", "mean"):
            loss, (g,) = value_and_grads(f, s, t, 2.0, labels=labels, reduction=reduction, num_items_in_batch=n)
            ref, (g_ref,) = value_and_grads(oracle(name), s, t, 2.0, labels=labels, reduction=reduction,
                                            num_items_in_batch=n)
            _close_loss(loss, ref, f"{name} {reduction} n={n!r}")
            _close_grad(g, g_ref, f"{name} {reduction} n={n!r}")
            if reduction == "batchmean" and name != "kd_mix":
                _close_loss(loss, total / 7, f"{name} sum / n")
                _close_grad(g, g_total / 7, f"{name} grad sum / n")
            if reduction == "mean" and name != "kd_mix":
                _close_loss(loss, total / (7 * shape[-1]), f"{name} sum / (n V)")
    # a given count also replaces TRL's batch-size divisor of jsd
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            f(s, t, 2.0, labels=labels, reduction=reduction, num_items_in_batch=7)


def test_num_items_in_batch_bad_values(device):
    s, t = _logits((3, 7), device), _logits((3, 7), device, seed=1)
    for n, exc in ((0, ValueError), (-2, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                   (True, TypeError), ("7", TypeError), (torch.tensor([7.0, 1.0]), ValueError),
                   (torch.tensor(True), TypeError)):
        with pytest.raises(exc, match="num_items_in_batch"):
            fastkd.jsd_loss(s, t, num_items_in_batch=n)
        with pytest.raises(exc, match="num_items_in_batch"):
            fastkd.kd_loss(s, t, num_items_in_batch=n)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(device, name, reduction):
    s, t = _pair(name, (4, 30), device, seed=42)
    labels = torch.full((4,), -100, device=device)
    loss, (gs,) = value_and_grads(fused(name), s, t, 2.0, labels=labels, reduction=reduction)
    assert torch.all(loss == 0), loss
    assert torch.all(gs == 0)
    if reduction in ("batchmean", "mean"):
        loss, (gs,) = value_and_grads(fused(name), s, t, 2.0, labels=labels, reduction=reduction,
                                      num_items_in_batch=5)
        assert torch.all(loss == 0) and torch.all(gs == 0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_rows(device, name, reduction):
    s = torch.empty(0, 17, device=device, requires_grad=True)
    t = torch.empty(0, 17, device=device)
    labels = torch.empty(0, dtype=torch.long, device=device) if name in NEEDS_TARGET else None
    loss = fused(name)(s, t, 2.0, labels=labels, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and loss.item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 17)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_return_parts(device, reduction):
    s, t = _logits((5, 4, 30), device, seed=43), _logits((5, 4, 30), device, seed=44)
    y = _labels((5, 4), 30, device)
    alpha, beta, T = 0.3, 0.6, 2.0
    sg = s.clone().requires_grad_(True)
    parts = fastkd.kd_loss(sg, t, T, reduction=reduction, labels=y, alpha=alpha, beta=beta, return_parts=True)
    assert isinstance(parts, fastkd.LossParts) and isinstance(parts, tuple)
    loss, soft, hard = parts
    assert loss is parts.loss and soft is parts.soft and hard is parts.hard
    assert loss.requires_grad and not soft.requires_grad and not hard.requires_grad
    assert loss.shape == soft.shape == hard.shape
    _close_loss(loss, alpha * hard + beta * soft, "loss == alpha * hard + beta * soft", rtol=1e-6)
    _close_loss(soft, fastkd.kd_loss(s, t, T, reduction=reduction, labels=y), "soft == kd_loss")
    ce = F.cross_entropy(s.double().reshape(-1, 30), y.reshape(-1), reduction="none").reshape(5, 4)
    counted = (y != -100).sum()
    expected_hard = {"none": ce, "sum": ce.sum(), "batchmean": ce.sum() / counted, "mean": ce.sum() / counted}
    _close_loss(hard, expected_hard[reduction], "hard == cross-entropy")
    # the gradient is that of loss; the parts are for logging
    (g,) = torch.autograd.grad(loss.sum(), sg)
    s64 = s.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(
        R.kd_loss(s64, t.double(), T, reduction=reduction, labels=y, alpha=alpha, beta=beta).sum(), s64
    )
    _close_grad(g, g_ref, "grad of parts.loss")
    # alpha == 0: hard is 0 and not computed; labels only mask rows
    parts0 = fastkd.kd_loss(s, t, T, reduction=reduction, labels=y, return_parts=True)
    assert torch.all(parts0.hard == 0)
    _close_loss(parts0.loss, parts0.soft, "alpha 0", rtol=0, atol=0)
    # module
    crit = fastkd.KDLoss(temperature=T, alpha=alpha, beta=beta, reduction=reduction, return_parts=True)
    out = crit(s, t, y)
    assert isinstance(out, fastkd.LossParts)
    _close_loss(out.loss, loss.detach(), "KDLoss parts", rtol=1e-6)


def test_kd_alpha_one_is_cross_entropy(device):
    s, t = _logits((12, 25), device, seed=45), _logits((12, 25), device, seed=46)
    y = _labels((12,), 25, device)
    loss, (g,) = value_and_grads(lambda a, b: fastkd.kd_loss(a, b, 3.0, labels=y, alpha=1.0), s, t)
    ce, (g_ce,) = value_and_grads(lambda a, b: F.cross_entropy(a.double(), y), s, t)
    _close_loss(loss, ce, "alpha=1")
    _close_grad(g, g_ce, "alpha=1 grad")


# --------------------------------------------------------------------------------------------------------
# autograd machinery: gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(device, name, reduction):
    s = _logits((3, 7), device, torch.float64, seed=47).requires_grad_(True)
    t = _logits((3, 7), device, torch.float64, seed=48).requires_grad_(name not in TOPK)
    labels = torch.tensor([1, -100, 2], device=device)
    f = fused(name)
    if name in TOPK:
        assert torch.autograd.gradcheck(lambda a: f(a, t, 1.7, labels=labels, reduction=reduction), (s,),
                                        fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda a, b: f(a, b, 1.7, labels=labels, reduction=reduction), (s, t),
                                        fast_mode=True)


def _response_samples(device):
    s, t = _logits((5, 33), device, seed=49), _logits((5, 33), device, seed=50)
    y = torch.tensor([0, -100, 4, 1, 32], device=device)
    n = torch.tensor(9.0)
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    # (student, teacher, labels, num_items, divergence, params (registry order), T, soft_w, hard_w, ignore_index,
    #  reduction, scale_by_temperature, grad_student, grad_teacher)
    yield (req(s), t, None, None, "kl", [], 4.0, 1.0, 0.0, -100, "batchmean", True, True, False)
    yield (req(s), req(t), y, None, "kl", [], 2.0, 0.7, 0.3, -100, "mean", True, True, True)
    yield (req(s), req(t), y, n, "reverse_kl", [], 2.0, 1.0, 0.0, -100, "batchmean", True, True, True)
    yield (req(s), t, y, None, "jsd", [0.3], 1.5, 1.0, 0.0, -100, "none", False, True, False)
    yield (req(s.double()), req(t.double()), None, n, "jsd", [0.7], 1.0, 1.0, 0.0, -100, "mean", False, True,
           True)
    yield (req(s), req(t.bfloat16()), y, None, "tvd", [], 2.0, 1.0, 0.0, -100, "sum", False, True, True)
    yield (req(s), req(t), y, None, "dkd", [1.0, 8.0], 4.0, 1.0, 0.0, -100, "batchmean", True, True, True)
    yield (s, t, y, n, "dkd", [0.5, 2.0], 1.0, 1.0, 0.0, -100, "none", True, False, False)


def _topk_samples(device):
    s, t = _logits((5, 33), device, seed=51), _logits((5, 33), device, seed=52)
    y = torch.tensor([0, -100, 4, 1, 32], device=device)
    vals, idx = t.topk(6, dim=-1)
    lvals, lidx = F.log_softmax(t / 2.0, dim=-1).topk(6, dim=-1)
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    # (student, values, indices, labels, num_items, T, values_are_logprobs, tail_bucket, ignore_index,
    #  reduction, scale_by_temperature, grad_student)
    yield (req(s), vals, idx, None, None, 2.0, False, False, -100, "batchmean", True, True)
    yield (req(s), lvals, lidx.int(), y, torch.tensor(4.0), 2.0, True, True, -100, "mean", False, True)
    yield (s, lvals, lidx, y, None, 1.0, True, False, -100, "none", True, False)


def test_opcheck_response_forward(device):
    for args in _response_samples(device):
        torch.library.opcheck(torch.ops.fastkd.response_forward, args)


def test_opcheck_topk_kd_forward(device):
    for args in _topk_samples(device):
        torch.library.opcheck(torch.ops.fastkd.topk_kd_forward, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    s, t = _logits((8, 3, 40), device, seed=53), _logits((8, 3, 40), device, seed=54)
    y = _labels((8, 3), 40, device)
    vals, idx = F.log_softmax(t / 2.0, dim=-1).topk(5, dim=-1)

    def step(student, teacher, y, vals, idx):
        jsd = fastkd.jsd_loss(student, teacher, 0.3, 2.0, labels=y)
        dkd = fastkd.dkd_loss(student, teacher, y, 1.0, 8.0, 4.0)
        topk = fastkd.topk_kd_loss(student, vals, idx, 2.0, values_are="logprobs", tail="bucket", labels=y)
        mix = fastkd.kd_loss(student, teacher, 2.0, labels=y, alpha=0.4, num_items_in_batch=11)
        return jsd + 0.5 * dkd + topk + mix

    compiled = torch.compile(step, fullgraph=True)
    sc, se = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss_c = compiled(sc, t, y, vals, idx)
    loss_c.backward()
    loss_e = step(se, t, y, vals, idx)
    loss_e.backward()
    # the same kernels run; only the order in which the four gradients are summed may differ
    assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    assert_close(sc.grad, se.grad, rtol=1e-5, atol=1e-6 * se.grad.abs().max().item())


# --------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reverse_kl", "jsd0.5", "tvd", "dkd", "kd_mix"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_2x_of_eager(device, name, dtype):
    shape = (64, 2000)
    s64, t64 = _pair(name, shape, device, torch.float64, seed=55)
    s, t = s64.to(dtype), t64.to(dtype)
    y = _labels((64,), 2000, device, masked=False)
    if name == "jsd0.5":
        f = lambda a, b, T, labels=None: fastkd.jsd_loss(a, b, 0.5, T)  # noqa: E731
        ref_f = lambda a, b, T, labels=None: R.jsd_loss(a, b, 0.5, T)  # noqa: E731
    else:
        f, ref_f = fused(name), _fn(R, name)
    # The oracle sees the same rounded inputs, in float64: only the computation's error is measured.
    ref, (g_ref,) = value_and_grads(ref_f, s.double(), t.double(), 2.0, labels=y)
    loss, (g,) = value_and_grads(f, s, t, 2.0, labels=y)
    eager, (g_eager,) = value_and_grads(lambda a, b: eager_response(name, a, b, 2.0, y), s, t)
    assert loss.dtype == dtype and g.dtype == dtype
    err = (loss.double() - ref).abs().item()
    err_eager = (eager.double() - ref).abs().item()
    half_ulp = 0.5 * torch.finfo(dtype).eps * abs(ref.item())  # the loss is rounded to dtype once
    assert err <= max(2 * err_eager, half_ulp), (err, err_eager)
    gerr = (g.double() - g_ref).abs().max().item()
    gerr_eager = (g_eager.double() - g_ref).abs().max().item()
    g_half_ulp = 0.5 * torch.finfo(dtype).eps * g_ref.abs().max().item()  # the gradient is rounded once too
    assert gerr <= max(2 * gerr_eager, g_half_ulp), (gerr, gerr_eager)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_mixed_dtypes(device, name, s_dtype, t_dtype):
    s, t = _pair(name, (9, 77), device, seed=56)
    s, t = s.to(s_dtype), t.to(t_dtype)
    labels = _targets_for(name, (9, 77), device, masked=True)
    if name not in TOPK:
        t.requires_grad_(True)
    loss, grads = value_and_grads(fused(name), s, t, 2.0, labels=labels)
    ref, ref_grads = value_and_grads(oracle(name), s, t, 2.0, labels=labels)
    assert loss.dtype == torch.promote_types(s_dtype, t_dtype)
    assert grads[0].dtype == s_dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    rtol = max(tol[s_dtype], tol[t_dtype])
    _close_loss(loss, ref, name, rtol=rtol, atol=rtol * 1e-2)
    for g, g_ref, dt in zip(grads, ref_grads, (s_dtype, t_dtype)):
        assert g.dtype == dt
        assert_close(g, g_ref, rtol=tol[dt] * 10, atol=tol[dt] * g_ref.abs().max().item(), what=name)


def test_float64_mixed_with_float32(device):
    s, t = _logits((5, 40), device, torch.float64, seed=57), _logits((5, 40), device, torch.float32, seed=58)
    y = _labels((5,), 40, device)
    for name in ("jsd0.3", "dkd", "tvd", "topk_bucket"):
        loss = fused(name)(s, t, 2.0, labels=y)
        assert loss.dtype == torch.float64
        _close_loss(loss, oracle(name)(s, t, 2.0, labels=y), name, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# layout, determinism
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_non_contiguous_inputs(device, name):
    base_s, base_t = _pair(name, (8, 64), device, seed=59)
    s = base_s[::2, 5:50]  # row-strided view
    t = base_t.t().contiguous().t()[::2, 5:50]  # column-major view (non-unit vocab stride)
    assert not s.is_contiguous() and t.stride(-1) != 1
    labels = _targets_for(name, s.shape, device, masked=True)
    loss, (gs,) = value_and_grads(fused(name), s, t, 2.0, labels=labels)
    ref, (gs_ref,) = value_and_grads(oracle(name), s, t, 2.0, labels=labels)
    _close_loss(loss, ref, name)
    _close_grad(gs, gs_ref, name)


@pytest.mark.parametrize("name", ["kd_mix", "reverse_kl", "jsd0.3", "tvd", "dkd", "topk", "topk_bucket"])
def test_deterministic_across_runs_and_threads(device, name):
    s, t = _pair(name, (300, 3001), device, seed=60)
    labels = _labels((300,), 3001, device)
    f = fused(name)

    def run():
        loss, (g,) = value_and_grads(f, s, t, 2.0, labels=labels)
        return loss, g

    threads = torch.get_num_threads()
    try:
        results = [run(), run()]
        torch.set_num_threads(1)
        results.append(run())
    finally:
        torch.set_num_threads(threads)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(g, results[0][1])


# --------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------
def test_modules_match_functional(device):
    s, t = _logits((4, 5, 30), device, seed=61), _logits((4, 5, 30), device, seed=62)
    y = _labels((4, 5), 30, device)
    n = torch.tensor(13.0)
    cases = [
        (fastkd.ReverseKLLoss(temperature=2.0, reduction="sum", ignore_index=-100),
         lambda: fastkd.reverse_kl_loss(s, t, 2.0, reduction="sum", labels=y), (s, t, y), {}),
        (fastkd.ReverseKLLoss(temperature=2.0, scale_by_temperature=False),
         lambda: fastkd.reverse_kl_loss(s, t, 2.0, labels=y, scale_by_temperature=False, num_items_in_batch=n),
         (s, t, y), {"num_items_in_batch": n}),
        (fastkd.JSDLoss(beta=0.2, temperature=1.5),
         lambda: fastkd.jsd_loss(s, t, 0.2, 1.5, labels=y), (s, t, y), {}),
        (fastkd.JSDLoss(), lambda: fastkd.jsd_loss(s, t), (s, t), {}),
        (fastkd.JSDLoss(beta=0.7, reduction="mean"),
         lambda: fastkd.jsd_loss(s, t, 0.7, reduction="mean", num_items_in_batch=n), (s, t), {"num_items_in_batch": n}),
        (fastkd.TVDLoss(temperature=3.0, reduction="none"),
         lambda: fastkd.tvd_loss(s, t, 3.0, reduction="none", labels=y), (s, t, y), {}),
        (fastkd.DKDLoss(), lambda: fastkd.dkd_loss(s, t, y), (s, t, y), {}),
        (fastkd.DKDLoss(alpha=0.5, beta=2.0, temperature=1.0, reduction="sum"),
         lambda: fastkd.dkd_loss(s, t, y, 0.5, 2.0, 1.0, reduction="sum"), (s, t, y), {}),
        (fastkd.KDLoss(temperature=2.0, alpha=0.25), lambda: fastkd.kd_loss(s, t, 2.0, labels=y, alpha=0.25),
         (s, t, y), {}),
        (fastkd.KDLoss(temperature=2.0, alpha=0.25, beta=3.0),
         lambda: fastkd.kd_loss(s, t, 2.0, labels=y, alpha=0.25, beta=3.0, num_items_in_batch=n), (s, t, y),
         {"num_items_in_batch": n}),
    ]
    for crit, expected, args, kw in cases:
        _close_loss(crit(*args, **kw), expected(), repr(crit), rtol=1e-6, atol=0)
    vals, idx = F.log_softmax(t / 2.0, -1).topk(4, dim=-1)
    crit = fastkd.TopKKDLoss(temperature=2.0, values_are="logprobs", tail="bucket")
    _close_loss(crit(s, vals, idx, y), fastkd.topk_kd_loss(s, vals, idx, 2.0, values_are="logprobs", tail="bucket",
                                                          labels=y), "TopKKDLoss", rtol=1e-6, atol=0)
    crit = fastkd.TopKKDLoss(reduction="mean", scale_by_temperature=False)
    _close_loss(crit(s, vals, idx, num_items_in_batch=n),
                fastkd.topk_kd_loss(s, vals, idx, reduction="mean", scale_by_temperature=False,
                                    num_items_in_batch=n), "TopKKDLoss mean", rtol=1e-6, atol=0)
    assert fastkd.KDLoss().temperature == 4.0  # the CIFAR KD default, unchanged


def test_dkd_module_warmup(device):
    s, t = _logits((6, 20), device, seed=63), _logits((6, 20), device, seed=64)
    y = _labels((6,), 20, device, masked=False)
    full = fastkd.dkd_loss(s, t, y)
    crit = fastkd.DKDLoss(warmup=20)
    _close_loss(crit(s, t, y), full, "no epoch", rtol=1e-6, atol=0)
    for epoch, factor in ((0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0), (100, 1.0)):
        _close_loss(crit(s, t, y, epoch=epoch), factor * full, f"epoch {epoch}", rtol=1e-6, atol=0)
        _close_loss(crit(s, t, y, epoch), factor * full, f"epoch {epoch} positional", rtol=1e-6, atol=0)
    _close_loss(fastkd.DKDLoss(warmup=0)(s, t, y, epoch=0), full, "warmup 0", rtol=1e-6, atol=0)
    sg = s.clone().requires_grad_(True)
    crit(sg, t, y, epoch=5).backward()
    s2 = s.clone().requires_grad_(True)
    (0.25 * fastkd.dkd_loss(s2, t, y)).backward()
    _close_grad(sg.grad, s2.grad, "warmup grad")


def test_module_constructor_checks():
    with pytest.raises(ValueError, match="beta"):
        fastkd.JSDLoss(beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.TVDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.ReverseKLLoss(reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        fastkd.DKDLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        fastkd.DKDLoss(beta=math.nan)
    with pytest.raises(ValueError, match="alpha"):
        fastkd.KDLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="values_are"):
        fastkd.TopKKDLoss(values_are="probs")
    with pytest.raises(ValueError, match="bucket"):
        fastkd.TopKKDLoss(tail="bucket")  # bucket needs logprobs


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def _raises_each(cases, fn):
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(*args, **kw)


def test_bad_input_jsd(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=1)
    _raises_each([
        ((s, t, 1.5), {}, ValueError, r"beta must be finite and in \[0, 1\], got 1.5"),
        ((s, t, -0.1), {}, ValueError, "beta"),
        ((s, t, math.nan), {}, ValueError, "beta"),
        ((s, t, "half"), {}, TypeError, "beta"),
        ((s, t, torch.tensor(0.5)), {}, TypeError, "beta"),
        ((s, t, 0.5, 0.0), {}, ValueError, "temperature"),
        ((s, t[:, :9]), {}, ValueError, "teacher_logits must have the student's shape"),
        ((s, t), {"reduction": "avg"}, ValueError, "reduction"),
        ((s, t), {"reduction": "none", "num_items_in_batch": 4}, ValueError, "num_items_in_batch"),
        ((s, t), {"labels": torch.zeros(4, device=device)}, TypeError, "labels must be an integer"),
    ], fastkd.jsd_loss)


def test_bad_input_reverse_kl_and_tvd(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=1)
    for fn in (fastkd.reverse_kl_loss, fastkd.tvd_loss):
        _raises_each([
            ((s, t, -1.0), {}, ValueError, "temperature"),
            ((s.long(), t), {}, TypeError, "student_logits must be float32"),
            ((s, t), {"reduction": "sum", "num_items_in_batch": 3}, ValueError, "num_items_in_batch"),
            ((s, t), {"labels": torch.zeros(5, dtype=torch.long, device=device)}, ValueError, "labels must have shape"),
            ((s, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ], fn)


def test_bad_input_kd_mix(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=1)
    y = torch.tensor([1, 2, -100, 3], device=device)
    _raises_each([
        ((s, t), {"alpha": -0.5, "labels": y}, ValueError, r"alpha must be finite and >= 0, got -0.5"),
        ((s, t), {"alpha": math.inf, "labels": y}, ValueError, "alpha"),
        ((s, t), {"alpha": "x", "labels": y}, TypeError, "alpha"),
        ((s, t), {"alpha": True, "labels": y}, TypeError, "alpha"),
        ((s, t), {"alpha": 0.5, "beta": -1.0, "labels": y}, ValueError, "beta"),
        ((s, t), {"alpha": 0.5}, ValueError, "labels"),  # the CE needs targets
        ((s, t), {"alpha": 0.5, "labels": torch.tensor([1, 12, 0, 3], device=device)}, ValueError,
         r"labels[\s\S]*12"),
        ((s, t), {"alpha": 0.5, "labels": torch.tensor([1, -3, 0, 3], device=device)}, ValueError,
         r"labels[\s\S]*-3"),
        ((s, t), {"alpha": 0.5, "labels": y.float()}, TypeError, "labels"),
    ], fastkd.kd_loss)
    # with alpha == 0 the labels only mask rows: any value is fine
    fastkd.kd_loss(s, t, labels=torch.tensor([1, 12, -5, 3], device=device))


def test_bad_input_dkd(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=1)
    y = torch.tensor([1, 2, -100, 3], device=device)
    _raises_each([
        ((s, t, torch.tensor([1, 10, 0, 3], device=device)), {}, ValueError, r"target[\s\S]*10"),
        ((s, t, torch.tensor([1, -7, 0, 3], device=device)), {}, ValueError, r"target[\s\S]*-7"),
        ((s, t, None), {}, ValueError, "target"),
        ((s, t, y.float()), {}, TypeError, "target"),
        ((s, t, y[:3]), {}, ValueError, "target must have shape"),
        ((s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long, device=device)), {}, ValueError,
         "at least 2 classes"),
        ((s, t, y, -1.0), {}, ValueError, "alpha"),
        ((s, t, y, 1.0, -8.0), {}, ValueError, "beta"),
        ((s, t, y, 1.0, math.inf), {}, ValueError, "beta"),
        ((s, t, y, 1.0, 8.0, 0.0), {}, ValueError, "temperature"),
        ((s, t, y), {"reduction": "none", "num_items_in_batch": 2}, ValueError, "num_items_in_batch"),
    ], fastkd.dkd_loss)
    # a custom ignore_index is not a class index
    fastkd.dkd_loss(s, t, torch.tensor([1, 2, 99, 3], device=device), ignore_index=99)


def test_bad_input_topk(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=1)
    vals, idx = t.topk(3, dim=-1)
    dup = idx.clone()
    dup[2, 1] = dup[2, 0]
    oob = idx.clone()
    oob[1, 2] = 10
    neg = idx.clone()
    neg[3, 0] = -1
    labels = torch.tensor([0, 0, -100, 0], device=device)
    _raises_each([
        ((s, vals, oob), {}, ValueError, r"teacher_topk_indices must be in \[0, 10\)"),
        ((s, vals, neg), {}, ValueError, "teacher_topk_indices"),
        ((s, vals, dup), {}, ValueError, "distinct"),
        ((s, vals, idx.float()), {}, TypeError, "teacher_topk_indices"),
        ((s, vals, idx.short()), {}, TypeError, "teacher_topk_indices"),
        ((s, vals.long(), idx), {}, TypeError, "teacher_topk_values"),
        ((s, vals, idx[:, :2]), {}, ValueError, "same shape"),
        ((s, vals[:3], idx[:3]), {}, ValueError, "teacher_topk_values"),
        ((s, vals.reshape(2, 2, 3), idx.reshape(2, 2, 3)), {}, ValueError, "teacher_topk_values"),
        ((s, t.repeat(1, 2)[:, :11], torch.arange(11, device=device).repeat(4, 1)), {}, ValueError,
         r"k[\s\S]*got 11"),
        ((s, vals[:, :0], idx[:, :0]), {}, ValueError, r"k[\s\S]*got 0"),
        ((s, vals.clone().requires_grad_(True), idx), {}, ValueError, "grad"),
        ((s, vals, idx), {"tail": "bucket"}, ValueError, "bucket"),
        ((s, vals, idx), {"values_are": "probs"}, ValueError, "values_are"),
        ((s, vals, idx), {"tail": "drop", "values_are": "logprobs"}, ValueError, "tail"),
        ((s, vals, idx), {"reduction": "none", "num_items_in_batch": 3}, ValueError, "num_items_in_batch"),
        ((s, vals, idx, 0.0), {}, ValueError, "temperature"),
        (("x", vals, idx), {}, TypeError, "student_logits"),
    ], fastkd.topk_kd_loss)
    # ignored rows are not checked (padding rows may hold anything)
    fastkd.topk_kd_loss(s, vals, dup, labels=labels)
