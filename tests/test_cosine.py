"""fastkd.cosine_loss / CosineLoss (the fused op fastkd::cosine_forward) against float64 references: Liger-Kernel's
LigerFusedLinearCosineSimilarityFunction.distillation_loss_fn and _compute_loss normalization re-written here
(liger_kernel is not installed), fastkd.reference.cosine_loss; gradcheck, opcheck, torch.compile, special values,
low precision, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd


def _logits(shape, seed, dtype=torch.float32, scale=2.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _labels(shape, vocab, seed, frac=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, shape, generator=g)
    y[torch.rand(shape, generator=g) < frac] = -100
    return y.to(device)


def liger_cosine(s, t, labels, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
                 temperature=1.0):
    """Liger's chunked cosine distillation on logits (its soft loss sums every row; both parts divided by the
    count of labels != ignore_index clamped to 1), as in liger_kernel/chunked_loss."""
    hard = F.cross_entropy(s, labels, reduction="sum", ignore_index=ignore_index)
    s_t, t_t = s / temperature, t / temperature
    cos = F.cosine_similarity(F.normalize(s_t, p=2, dim=-1), F.normalize(t_t, p=2, dim=-1), dim=-1)
    soft = (beta * (1 - cos)).sum()
    n = (labels != ignore_index).sum().clamp_min(1)
    return weight_hard_loss * hard / n + weight_soft_loss * soft / n


def _vg(fn, s, t, *args, weights=None, **kw):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = fn(s, t, *args, **kw)
    w = torch.ones_like(out) if weights is None else weights.to(out.dtype)
    gs, gt = torch.autograd.grad((out * w).sum(), (s, t))
    return out.detach(), gs, gt


def test_equals_liger_no_ignored_rows(device):
    s, t = _logits((6, 41), 1, torch.float64, device=device), _logits((6, 41), 2, torch.float64, device=device)
    y = torch.randint(0, 41, (6,), generator=torch.Generator().manual_seed(3)).to(device)
    ours = _vg(fastkd.cosine_loss, s, t, 0.5 * 0.7, labels=y, alpha=0.4)
    theirs = _vg(liger_cosine, s, t, y, weight_hard_loss=0.4, weight_soft_loss=0.5, beta=0.7, temperature=2.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_equals_liger_with_ignored_rows(device):
    """The documented mapping when labels hold ignore_index (Liger sums the cosine over every row)."""
    s, t = _logits((3, 4, 29), 4, torch.float64, device=device), _logits((3, 4, 29), 5, torch.float64, device=device)
    y = _labels((3, 4), 29, 6, device=device)
    n = max(int((y != -100).sum()), 1)

    def ours_fn(a, b):
        return fastkd.cosine_loss(a, b, 0.5 * 0.5, num_items_in_batch=n) + \
            0.5 * fastkd.cosine_loss(a, b, 0.0, alpha=1.0, labels=y)

    ours = _vg(ours_fn, s, t)
    theirs = _vg(lambda a, b: liger_cosine(a.reshape(-1, 29), b.reshape(-1, 29), y.reshape(-1)), s, t)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, reduction, alpha, dtype):
    shape = (2, 7, 67)  # odd vocabulary: vector body and tail
    s, t = _logits(shape, 7, dtype, device=device), _logits(shape, 8, dtype, device=device)
    y = _labels(shape[:-1], shape[-1], 9, device=device)
    w = None if reduction != "none" else _logits(shape[:-1], 10, torch.float64, device=device)
    kw = dict(reduction=reduction, labels=y, alpha=alpha)
    ours = _vg(fastkd.cosine_loss, s, t, 0.8, weights=w, **kw)
    ref = _vg(fastkd.reference.cosine_loss, s.double(), t.double(), 0.8, weights=w, **kw)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-7)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, **tol)


def test_plain_cosine_similarity_and_parts():
    s, t = _logits((5, 33), 11, torch.float64), _logits((5, 33), 12, torch.float64)
    y = torch.tensor([0, -100, 4, 1, 32])
    expected = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    torch.testing.assert_close(fastkd.cosine_loss(s, t), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(fastkd.CosineLoss(beta=2.0)(s, t), 2 * expected, rtol=1e-13, atol=0)
    parts = fastkd.cosine_loss(s, t, 0.3, labels=y, alpha=0.2, return_parts=True)
    keep = y != -100
    soft = (1 - F.cosine_similarity(s, t, dim=-1))[keep].mean()
    hard = F.cross_entropy(s, y, ignore_index=-100)
    torch.testing.assert_close(parts.soft, soft, rtol=1e-13, atol=0)
    torch.testing.assert_close(parts.hard, hard, rtol=1e-13, atol=0)
    torch.testing.assert_close(parts.loss, 0.3 * soft + 0.2 * hard, rtol=1e-13, atol=0)
    # mean == batchmean (one value per row), num_items replaces the counted rows
    torch.testing.assert_close(fastkd.cosine_loss(s, t, reduction="mean", labels=y),
                               fastkd.cosine_loss(s, t, labels=y), rtol=0, atol=0)
    torch.testing.assert_close(fastkd.cosine_loss(s, t, labels=y, num_items_in_batch=10),
                               fastkd.cosine_loss(s, t, labels=y, reduction="sum") / 10, rtol=1e-14, atol=0)


def test_teacher_dtype_mix_and_low_precision():
    s32, t32 = _logits((16, 300), 13), _logits((16, 300), 14)
    for sd, td in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]:
        s, t = s32.to(sd), t32.to(td)
        w = torch.linspace(0.5, 1.5, 16)
        ours = _vg(fastkd.cosine_loss, s, t, 1.0, reduction="none", weights=w)
        eager = _vg(lambda a, b: 1 - F.cosine_similarity(a, b, dim=-1), s, t, weights=w)
        refv = _vg(fastkd.reference.cosine_loss, s.double(), t.double(), 1.0, reduction="none",
                   weights=w.double())
        assert ours[1].dtype == sd and ours[2].dtype == td
        for a, e, r in zip(ours, eager, refv):  # >= eager's own error in that dtype (x2)
            err = (a.double() - r).abs().max().item()
            err_eager = (e.double() - r).abs().max().item()
            assert err <= 2 * err_eager + 1e-6 * r.abs().max().item(), (sd, td, err, err_eager)


def test_float16_loss_scale_keeps_small_gradients():
    s, t = _logits((64, 4000), 15, torch.float16), _logits((64, 4000), 16, torch.float16)
    sg = s.clone().requires_grad_(True)
    (fastkd.cosine_loss(sg, t) * 4096.0).backward()  # GradScaler-like (2^16 overflows fp16 itself)
    sr = s.double().requires_grad_(True)
    (fastkd.reference.cosine_loss(sr, t.double()) * 4096.0).backward()
    torch.testing.assert_close(sg.grad.double(), sr.grad, rtol=2e-3, atol=1e-3 * sr.grad.abs().max().item())
    assert (sg.grad != 0).float().mean() > 0.99


def test_special_values():
    s, t = _logits((4, 50), 17, torch.float64), _logits((4, 50), 18, torch.float64)
    s[:, 10:20] = -math.inf  # masked entries on both sides: left out of the vectors
    t[:, 10:20] = -math.inf
    s[3] = -math.inf  # a fully masked row: contributes 0, counts in the divisor
    t[3] = -math.inf
    y = torch.tensor([1, 2, 3, 4])
    out = _vg(fastkd.cosine_loss, s, t, 0.7, labels=y, alpha=0.3, reduction="sum")
    keep = torch.ones(50, dtype=torch.bool)
    keep[10:20] = False
    sk, tk = s[:3][:, keep], t[:3][:, keep]
    expected = 0.7 * (1 - F.cosine_similarity(sk, tk, dim=-1)).sum() + 0.3 * F.cross_entropy(s[:3], y[:3],
                                                                                             reduction="sum")
    torch.testing.assert_close(out[0], expected, rtol=1e-13, atol=0)
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()
    assert (out[1][:, 10:20] == 0).all() and (out[1][3] == 0).all() and (out[2][3] == 0).all()
    ref = _vg(fastkd.reference.cosine_loss, s, t, 0.7, labels=y, alpha=0.3, reduction="sum")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a zero row: cos = 0 (norm clamped at eps), loss beta
    z = torch.zeros(2, 9, dtype=torch.float64)
    torch.testing.assert_close(fastkd.cosine_loss(z, _logits((2, 9), 19, torch.float64), 0.5), torch.tensor(0.5,
                               dtype=torch.float64))
    # NaN, +inf, -inf on one side only: NaN
    for bad in (math.nan, math.inf):
        b = s.clone()
        b[0, 0] = bad
        assert torch.isnan(fastkd.cosine_loss(b, t))
    b = t.clone()
    b[1, 0] = -math.inf
    assert torch.isnan(fastkd.cosine_loss(s, b))
    # ignored rows: NaN there does not matter; all ignored: 0, zero gradient
    b = s.clone()
    b[0, 0] = math.nan
    y2 = torch.tensor([-100, 1, 2, 3])
    assert torch.isfinite(fastkd.cosine_loss(b, t, labels=y2))
    allign = _vg(fastkd.cosine_loss, s, t, labels=torch.full((4,), -100), alpha=0.5)
    assert allign[0].item() == 0.0 and (allign[1] == 0).all() and (allign[2] == 0).all()
    # empty input
    e = torch.zeros(0, 7)
    assert fastkd.cosine_loss(e, e).item() == 0.0
    assert fastkd.cosine_loss(e, e, reduction="none").shape == (0,)


def test_large_logits_finite():
    s, t = _logits((3, 1000), 20, scale=1e15), _logits((3, 1000), 21, scale=1e15)
    ours = fastkd.cosine_loss(s, t)
    ref = fastkd.reference.cosine_loss(s.double(), t.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


def test_gradcheck(device):
    s = _logits((3, 7), 22, torch.float64, device=device).requires_grad_(True)
    t = _logits((3, 7), 23, torch.float64, device=device).requires_grad_(True)
    y = torch.tensor([1, -100, 2], device=device)
    for red in ("batchmean", "none"):
        assert torch.autograd.gradcheck(lambda a, b: fastkd.cosine_loss(a, b, 0.7, labels=y, alpha=0.4,
                                                                        reduction=red), (s, t), fast_mode=True)


def test_opcheck(device):
    s, t = _logits((5, 33), 24, device=device), _logits((5, 33), 25, device=device)
    y = torch.tensor([0, -100, 4, 1, 32], device=device)
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    samples = [
        (req(s), t, None, None, 1.0, 0.0, 1e-8, -100, "batchmean", True, False),
        (req(s), req(t), y, None, 0.5, 0.3, 1e-8, -100, "mean", True, True),
        (req(s.double()), req(t.double()), y, torch.tensor(9.0), 0.5, 0.0, 1e-6, -100, "batchmean", True, True),
        (req(s), req(t.bfloat16()), y, None, 1.0, 1.0, 1e-8, -100, "none", True, True),
        (req(s.half()), t.half(), y, None, 1.0, 0.5, 1e-8, -100, "sum", True, False),
        (s, t, y, None, 1.0, 0.2, 1e-8, -100, "none", False, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastkd.cosine_forward, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    s, t = _logits((4, 3, 40), 26), _logits((4, 3, 40), 27)
    y = _labels((4, 3), 40, 28)

    def step(a, b, y):
        return fastkd.cosine_loss(a, b, 0.5, labels=y, alpha=0.3) + \
            fastkd.cosine_loss(a, b, reduction="none").sum() * 0.1

    sc, se = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc = torch.compile(step, fullgraph=True)(sc, t, y)
    lc.backward()
    le = step(se, t, y)
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(sc.grad, se.grad, rtol=1e-5, atol=1e-7)


def test_determinism_across_threads():
    s, t = _logits((257, 1031), 29), _logits((257, 1031), 30)
    y = _labels((257,), 1031, 31)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _vg(fastkd.cosine_loss, s, t, labels=y, alpha=0.5)
        torch.set_num_threads(max(n, 2))
        b = _vg(fastkd.cosine_loss, s, t, labels=y, alpha=0.5)
    finally:
        torch.set_num_threads(n)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_double_backward_raises():
    s = _logits((3, 5), 32, torch.float64).requires_grad_(True)
    t = _logits((3, 5), 33, torch.float64)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(fastkd.cosine_loss(s, t), s, create_graph=True)


def test_bad_input():
    s, t = _logits((3, 5), 34), _logits((3, 5), 35)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="beta"):
        fastkd.cosine_loss(s, t, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        fastkd.cosine_loss(s, t, alpha=math.nan, labels=y)
    with pytest.raises(ValueError, match="eps"):
        fastkd.cosine_loss(s, t, eps=0.0)
    with pytest.raises(ValueError, match="labels is required"):
        fastkd.cosine_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match=r"argument 'labels': class targets must be in \[0, 5\)"):
        fastkd.cosine_loss(s, t, alpha=0.5, labels=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="reduction"):
        fastkd.cosine_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        fastkd.cosine_loss(s, t, reduction="sum", num_items_in_batch=3)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        fastkd.cosine_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="eps"):
        fastkd.CosineLoss(eps=-1.0)
    # the op's own checks name the arguments
    with pytest.raises(ValueError, match="argument 'eps'"):
        torch.ops.fastkd.cosine_forward(s, t, None, None, 1.0, 0.0, 0.0, -100, "sum", False, False)
    with pytest.raises(RuntimeError, match="argument 'teacher_logits'"):
        torch.ops.fastkd.cosine_forward(s, t[:2], None, None, 1.0, 0.0, 1e-8, -100, "sum", False, False)


# --------------------------------------------------------------------------------------------------------
# the fused linear head: fused_linear_kd_loss(..., loss="cosine")
# --------------------------------------------------------------------------------------------------------
def _head_inputs(seed, dtype=torch.float64, rows=(2, 9), hidden=16, vocab=37, t_hidden=12):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    y = torch.randint(0, vocab, rows, generator=g)
    y.view(-1)[:3] = -100
    return r(*rows, hidden), r(vocab, hidden), r(vocab), r(*rows, t_hidden), r(vocab, t_hidden), y


def _head_vg(fn, h, w, b, teacher, weights=None, **kw):
    hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b))
    out = fn(hh, ww, teacher, student_bias=bb, **kw)
    wts = torch.ones_like(out) if weights is None else weights.to(out.dtype)
    return (out.detach(),) + torch.autograd.grad((out * wts).sum(), (hh, ww, bb))


@pytest.mark.parametrize("teacher_kind", ["head", "dense"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_fused_head_equals_cosine_loss_on_logits(teacher_kind, reduction):
    h, w, b, th, tw, y = _head_inputs(40)
    teacher = fastkd.TeacherHead(th, tw) if teacher_kind == "head" else th @ tw.T
    weights = torch.linspace(0.5, 1.5, 18, dtype=torch.float64).reshape(2, 9) if reduction == "none" else None
    kw = dict(labels=y, hard_label_weight=0.3, soft_weight=0.6, beta=0.7, reduction=reduction, student_softcap=5.0)
    fused = _head_vg(fastkd.fused_linear_kd_loss, h, w, b, teacher, weights, loss="cosine", chunk_size=4, **kw)

    def composed(hh, ww, teacher, student_bias):
        logits = 5.0 * torch.tanh(F.linear(hh, ww, student_bias) / 5.0)
        t_logits = th @ tw.T
        return fastkd.reference.cosine_loss(logits, t_logits, 0.6 * 0.7, reduction=reduction, labels=y, alpha=0.3)

    ref = _head_vg(composed, h, w, b, teacher, weights)
    for a, r in zip(fused, ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-13)


def test_fused_head_equals_liger_and_float32():
    h, w, b, th, tw, _ = _head_inputs(41, torch.float32, rows=(64,), hidden=32, vocab=300, t_hidden=24)
    y = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(42))  # no ignored label
    fused = _head_vg(fastkd.fused_linear_kd_loss, h, w, b, fastkd.TeacherHead(th, tw), loss="cosine", beta=0.5,
                     labels=y, hard_label_weight=0.5, soft_weight=0.5, chunk_size=16)
    liger = _head_vg(lambda hh, ww, t, student_bias: liger_cosine(F.linear(hh, ww, student_bias), th @ tw.T, y),
                     h.double(), w.double(), b.double(), None)
    assert fused[0].dtype == torch.float32
    for a, r in zip(fused, liger):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-6 * r.abs().max().item())


def test_fused_head_chunk_independent_and_bad_input():
    h, w, b, th, tw, y = _head_inputs(43)
    teacher = fastkd.TeacherHead(th, tw)
    outs = [_head_vg(fastkd.fused_linear_kd_loss, h, w, b, teacher, loss="cosine", labels=y, chunk_size=c)
            for c in (1, 5, 100)]
    for o in outs[1:]:
        for a, r in zip(o, outs[0]):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-14)
    vals, idx = (th @ tw.T).topk(5, dim=-1)
    with pytest.raises(ValueError, match="needs dense teacher logits or a fastkd.TeacherHead"):
        fastkd.fused_linear_kd_loss(h, w, fastkd.TopKTeacher(vals, idx), loss="cosine")
    with pytest.raises(ValueError, match="teacher vocabulary of 30"):
        fastkd.fused_linear_kd_loss(h, w, (th @ tw.T)[..., :30], loss="cosine")
    with pytest.raises(ValueError, match="no T\\^2 factor"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", scale_by_temperature=True)
    with pytest.raises(TypeError, match="eps only"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", skew=0.1)
    with pytest.raises(ValueError, match="eps"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", eps=0.0)
    with pytest.raises(ValueError, match="argument 'eps'"):
        torch.ops.fastkd.fused_linear_kd_forward(
            h.reshape(-1, 16), w, None, (th @ tw.T).reshape(-1, 37), None, None, None, None, None, None, None, None,
            "cosine", [-1.0], 1.0, 1.0, 0.0, -100, "sum", False, False, False, 8, 1.0, 0.0, 1.0, 0.0, False, False,
            False)


def test_fused_head_opcheck_and_compile():
    h, w, b, th, tw, y = _head_inputs(44, torch.float32)
    hr, wr = h.reshape(-1, 16).clone().requires_grad_(True), w.clone().requires_grad_(True)
    args = (hr, wr, None, None, th.reshape(-1, 12), tw, None, None, None, y.reshape(-1), None, None, "cosine", [1e-8],
            1.0, 0.7, 0.3, -100, "batchmean", False, False, False, 4, 1.0, 0.0, 1.0, 0.0, True, True, False)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward, args)
    _compiled_head_matches_eager(h, w, lambda hh, ww: fastkd.fused_linear_kd_loss(
        hh, ww, fastkd.TeacherHead(th, tw), loss="cosine", labels=y, hard_label_weight=0.2, chunk_size=4))


def _compiled_head_matches_eager(h, w, step):
    """step(hidden, weight) -> loss under torch.compile(fullgraph=True): the eager value and hidden gradient."""
    torch._dynamo.reset()
    hc, he = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    lc = torch.compile(step, fullgraph=True)(hc, w)
    lc.backward()
    le = step(he, w)
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(hc.grad, he.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("num_items", [None, 11])
def test_token_weights(reduction, num_items):
    """Each counted row's loss (cosine and CE) times its weight; the divisor stays the counted rows (or
    num_items_in_batch); the weights get no gradient. Against the float64 reference and the rows written out."""
    if num_items is not None and reduction in ("sum", "none"):
        pytest.skip("num_items_in_batch is for batchmean / mean")
    shape = (3, 5, 41)
    s, t = _logits(shape, 21, torch.float64), _logits(shape, 22, torch.float64)
    y = _labels(shape[:-1], shape[-1], 23)
    w = torch.rand(shape[:-1], dtype=torch.float64).requires_grad_(True)
    kw = dict(reduction=reduction, labels=y, alpha=0.3, token_weights=w, num_items_in_batch=num_items)
    up = None if reduction != "none" else _logits(shape[:-1], 24, torch.float64)
    ours = _vg(fastkd.cosine_loss, s, t, 0.8, weights=up, **kw)
    ref = _vg(fastkd.reference.cosine_loss, s, t, 0.8, weights=up, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    rows = fastkd.cosine_loss(s, t, 0.8, reduction="none", labels=y, alpha=0.3)
    weighted = rows * w.detach()
    counted = num_items if num_items is not None else int((y != -100).sum())
    want = {"none": weighted, "sum": weighted.sum()}.get(reduction, weighted.sum() / counted)
    torch.testing.assert_close(ours[0], want, rtol=1e-12, atol=1e-14)
    parts = fastkd.cosine_loss(s, t, 0.8, return_parts=True, **kw)
    torch.testing.assert_close(parts.loss, 0.8 * parts.soft + 0.3 * parts.hard, rtol=1e-12, atol=1e-14)
    assert not parts.soft.requires_grad and not parts.hard.requires_grad
    out = fastkd.cosine_loss(s.clone().requires_grad_(True), t, 0.8, **kw)
    out.sum().backward()
    assert w.grad is None  # the weights are detached


def test_token_weights_compile_and_bad_input():
    s, t = _logits((6, 33), 31), _logits((6, 33), 32)
    w = torch.rand(6)
    fn = torch.compile(lambda a, b, c: fastkd.cosine_loss(a, b, token_weights=c), fullgraph=True)
    torch.testing.assert_close(fn(s, t, w), fastkd.reference.cosine_loss(s, t, token_weights=w))
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        fastkd.cosine_loss(s, t, token_weights=torch.ones(5))
    with pytest.raises(TypeError, match="token_weights must be a floating-point tensor"):
        fastkd.cosine_loss(s, t, token_weights=torch.ones(6, dtype=torch.long))


@pytest.mark.parametrize("teacher_kind", ["head", "dense"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("num_items", [None, 7])
def test_fused_head_token_weights(teacher_kind, reduction, num_items):
    """loss="cosine" in the fused head with token_weights: equal to cosine_loss on the full logits with the same
    weights (value, hidden / weight / bias gradients), and to the fused op's rows weighted by hand."""
    if num_items is not None and reduction in ("sum", "none"):
        pytest.skip("num_items_in_batch is for batchmean / mean")
    h, w, b, th, tw, y = _head_inputs(45)
    teacher = fastkd.TeacherHead(th, tw) if teacher_kind == "head" else th @ tw.T
    tok = torch.rand((2, 9), dtype=torch.float64, generator=torch.Generator().manual_seed(46)) * 2.0
    tok.view(-1)[5] = 0.0  # a counted row of weight 0: still counted by the divisor
    up = torch.linspace(0.5, 1.5, 18, dtype=torch.float64).reshape(2, 9) if reduction == "none" else None
    kw = dict(labels=y, hard_label_weight=0.3, soft_weight=0.6, beta=0.7, reduction=reduction, student_softcap=5.0,
              num_items_in_batch=num_items)
    fused = _head_vg(fastkd.fused_linear_kd_loss, h, w, b, teacher, up, loss="cosine", chunk_size=4,
                     token_weights=tok, **kw)

    def composed(hh, ww, teacher, student_bias):
        logits = 5.0 * torch.tanh(F.linear(hh, ww, student_bias) / 5.0)
        return fastkd.reference.cosine_loss(logits, th @ tw.T, 0.6 * 0.7, reduction=reduction, labels=y, alpha=0.3,
                                            num_items_in_batch=num_items, token_weights=tok)

    ref = _head_vg(composed, h, w, b, teacher, up)
    for a, r in zip(fused, ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-13)
    rows = fastkd.fused_linear_kd_loss(h, w, teacher, student_bias=b, loss="cosine", chunk_size=4,
                                       **dict(kw, reduction="none", num_items_in_batch=None))
    weighted = rows * tok
    counted = num_items if num_items is not None else int((y != -100).sum())
    want = {"none": weighted, "sum": weighted.sum(), "mean": weighted.sum() / counted}.get(
        reduction, weighted.sum() / counted)
    torch.testing.assert_close(fused[0], want, rtol=1e-12, atol=1e-14)
    unfused = fastkd.cosine.fused_linear_cosine_loss(h, w, teacher, student_bias=b, token_weights=tok, fused=False,
                                                     **{k: x for k, x in kw.items()})
    torch.testing.assert_close(unfused, fused[0], rtol=1e-12, atol=1e-14)


def test_fused_head_token_weights_compile_and_bad_input():
    h, w, b, th, tw, y = _head_inputs(47, torch.float32)
    tok = torch.rand((2, 9), generator=torch.Generator().manual_seed(48))
    teacher = fastkd.TeacherHead(th, tw)
    _compiled_head_matches_eager(h, w, lambda hh, ww: fastkd.fused_linear_kd_loss(
        hh, ww, teacher, loss="cosine", labels=y, hard_label_weight=0.2, chunk_size=4, token_weights=tok))
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", token_weights=torch.ones(2, 8))
    with pytest.raises(TypeError, match="token_weights must be a floating-point tensor"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", token_weights=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="standardize: 'cosine' compares the raw logits"):
        fastkd.fused_linear_kd_loss(h, w, teacher, loss="cosine", standardize=True)
