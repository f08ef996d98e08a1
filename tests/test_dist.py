"""DIST (fastkd.dist_loss, fastkd.DISTLoss, torch.ops.fastkd.dist_forward): values and gradients against the
float64 reference (fastkd.reference.dist_loss) and torchdistill's own DISTLoss, the eps convention of the installed
torch's F.cosine_similarity, low precision, degenerate batches, gradcheck, opcheck, torch.compile, determinism
across thread counts and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fastkd
from fastkd import reference as R

torchdistill_mid = pytest.importorskip("torchdistill.losses.mid_level")


def _torchdistill(s, t, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """torchdistill's DISTLoss, through its own io-dict call convention."""
    loss = torchdistill_mid.DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau, eps=eps)
    return loss({".": {"output": s}}, {".": {"output": t}})


def _grads(fn, s, t, teacher_grad=True):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t)
    gs, gt = torch.autograd.grad(loss, (s, t) if teacher_grad else (s,)) + ((None,) if not teacher_grad else ())
    return loss.detach(), gs, gt


def _logits(shape, device="cpu", dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# (300, 37): 16 row blocks of 18-19 rows, each in groups of 8, 8 and 2-3 rows (the CPU kernel's column-sum
# groups), 37 columns: whole vectors and a tail
SHAPES = [(1, 1), (1, 7), (2, 5), (3, 17), (8, 10), (13, 33), (64, 100), (33, 1000), (7, 4099), (300, 37)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [dict(), dict(beta=2.0, gamma=0.5, tau=4.0), dict(beta=0.0, gamma=1.0, tau=0.5),
                                    dict(beta=1.0, gamma=0.0, tau=2.0, eps=1e-3)])
def test_float64_matches_torchdistill_and_reference(device, shape, params):
    s, t = _logits(shape, device, torch.float64, 1), _logits(shape, device, torch.float64, 2)
    loss, gs, gt = _grads(lambda a, b: fastkd.dist_loss(a, b, **params), s, t)
    ref, ref_gs, ref_gt = _grads(lambda a, b: _torchdistill(a, b, **params), s, t)
    own, own_gs, own_gt = _grads(lambda a, b: R.dist_loss(a, b, **params), s, t)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(own, ref, rtol=1e-13, atol=1e-13)
    # atol: 1e-10 of the largest entry, floored at 1e-15 (beta = 0 with N = 2 has a gradient that is 0 in exact
    # arithmetic: every column correlation is +-1; both sides then return rounding noise)
    atol = max(ref_gs.abs().max().item(), ref_gt.abs().max().item()) * 1e-10 + 1e-15
    torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=atol)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-9, atol=atol)
    torch.testing.assert_close(own_gs, ref_gs, rtol=1e-9, atol=atol)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 200), cols=st.integers(1, 70), scale=st.floats(0.01, 30.0), tau=st.floats(0.25, 8.0),
       beta=st.floats(0.0, 3.0), gamma=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_property_float64_matches_torchdistill(rows, cols, scale, tau, beta, gamma, seed):
    """Any batch and class count (row blocks and groups of every size, column tails), logit scale, temperature
    and weights: the float64 kernel's value and gradients are torchdistill's to rounding."""
    s, t = _logits((rows, cols), dtype=torch.float64, seed=seed, scale=scale), _logits((rows, cols), dtype=torch.float64,
                                                                                    seed=seed + 1, scale=scale)
    params = dict(beta=beta, gamma=gamma, tau=tau)
    loss, gs, gt = _grads(lambda a, b: fastkd.dist_loss(a, b, **params), s, t)
    ref, ref_gs, ref_gt = _grads(lambda a, b: _torchdistill(a, b, **params), s, t)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    atol = max(ref_gs.abs().max().item(), ref_gt.abs().max().item()) * 1e-10 + 1e-15
    torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=atol)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("shape", [(8, 10), (64, 100), (33, 1000), (16, 32000), (300, 1000)])
def test_float32_against_float64(device, shape):
    s, t = _logits(shape, device, torch.float32, 3), _logits(shape, device, torch.float32, 4)
    loss, gs, gt = _grads(lambda a, b: fastkd.dist_loss(a, b, tau=2.0), s, t)
    ref, ref_gs, ref_gt = _grads(lambda a, b: _torchdistill(a, b, tau=2.0), s.double(), t.double())
    eager, eager_gs, _ = _grads(lambda a, b: _torchdistill(a, b, tau=2.0), s, t)
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32 and gt.dtype == torch.float32
    # at most ~2x the eager float32 composition's error, with a floor of a few ulp of the value
    err = (loss.double() - ref).abs().item()
    eager_err = (eager.double() - ref).abs().item()
    assert err <= 2 * eager_err + 8 * 2**-24 * ref.abs().item(), (err, eager_err)
    g_err = (gs.double() - ref_gs).abs().max().item()
    eager_g_err = (eager_gs.double() - ref_gs).abs().max().item()
    assert g_err <= 2 * eager_g_err + 8 * 2**-24 * ref_gs.abs().max().item(), (g_err, eager_g_err)
    torch.testing.assert_close(gt.double(), ref_gt, rtol=1e-4, atol=1e-6 * ref_gt.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    s, t = _logits((12, 300), device, dtype, 5, scale=2.0), _logits((12, 300), device, dtype, 6, scale=2.0)
    loss, gs, gt = _grads(lambda a, b: fastkd.dist_loss(a, b, tau=1.5), s, t)
    ref, ref_gs, ref_gt = _grads(lambda a, b: _torchdistill(a, b, tau=1.5), s.double(), t.double())
    assert loss.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    # computed in float32 from the rounded inputs: the error is the output rounding
    torch.testing.assert_close(loss.double(), ref, rtol=2 * 2**-7, atol=0)
    tol = 2 ** -(7 if dtype == torch.bfloat16 else 10)
    torch.testing.assert_close(gs.double(), ref_gs, rtol=2 * tol, atol=2 * tol * ref_gs.abs().max().item())


def test_mixed_dtypes_promote():
    s, t = _logits((6, 50), seed=7), _logits((6, 50), seed=8, dtype=torch.bfloat16)
    loss, gs, gt = _grads(fastkd.dist_loss, s, t)
    ref, ref_gs, _ = _grads(R.dist_loss, s.double(), t.double())
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32 and gt.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(gs.double(), ref_gs, rtol=1e-4, atol=1e-6 * ref_gs.abs().max().item())


def test_eps_as_installed_torch_applies_it():
    # F.cosine_similarity clamps each norm at eps on its own (and differentiates the norm as ||x||): with a large
    # eps every clamp is active somewhere; the kernel must follow torch, not the (x . y) / max(|x| |y|, eps) form
    s, t = _logits((9, 12), seed=9, dtype=torch.float64, scale=0.05), _logits((9, 12), seed=10, dtype=torch.float64)
    for eps in (1e-8, 1e-3, 0.05, 1.0):
        loss, gs, gt = _grads(lambda a, b: fastkd.dist_loss(a, b, eps=eps), s, t)
        ref, ref_gs, ref_gt = _grads(lambda a, b: _torchdistill(a, b, eps=eps), s, t)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(gt, ref_gt, rtol=1e-9, atol=1e-13)
    # the product form would differ here: check the test can tell them apart
    y_s, y_t = s.softmax(1), t.softmax(1)
    a, b = y_s - y_s.mean(1, keepdim=True), y_t - y_t.mean(1, keepdim=True)
    prod_form = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(0.05)
    assert not torch.allclose(prod_form, F.cosine_similarity(a, b, eps=0.05))


def test_degenerate_batches():
    # N = 1: every column is one sample, centered to 0: intra = 1 exactly, as in torch
    s, t = _logits((1, 9), seed=11, dtype=torch.float64), _logits((1, 9), seed=12, dtype=torch.float64)
    loss = fastkd.dist_loss(s, t, beta=0.0)
    assert loss.item() == 1.0
    # a uniform row (equal logits): its centered softmax is 0, its correlation 0
    s = _logits((4, 6), seed=13, dtype=torch.float64)
    s[2] = 0.5
    t = _logits((4, 6), seed=14, dtype=torch.float64)
    loss, gs, gt = _grads(fastkd.dist_loss, s, t)
    ref, ref_gs, ref_gt = _grads(_torchdistill, s, t)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-8, atol=1e-12)
    # an empty batch gives 0 with zero gradients (the eager composition: NaN)
    e = torch.zeros(0, 5, requires_grad=True)
    loss = fastkd.dist_loss(e, torch.zeros(0, 5))
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 5)


def test_extreme_values():
    s, t = _logits((8, 64), seed=15) * 1000, _logits((8, 64), seed=16) * 1000
    s[1, 3] = -math.inf
    t[5, :10] = -math.inf
    loss, gs, gt = _grads(fastkd.dist_loss, s, t)
    ref, ref_gs, ref_gt = _grads(_torchdistill, s.double(), t.double())
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    # (entries below float32's normal range are flushed in float32: the 1e-30 floor)
    torch.testing.assert_close(gs.double(), ref_gs, rtol=1e-4, atol=1e-5 * ref_gs.abs().max().item() + 1e-30)
    # NaN and fully -inf rows propagate NaN, as torch's softmax does
    bad = s.clone()
    bad[0, 0] = math.nan
    assert torch.isnan(fastkd.dist_loss(bad, t))
    bad = s.clone()
    bad[2] = -math.inf
    assert torch.isnan(fastkd.dist_loss(bad, t))


def test_teacher_without_grad_and_upstream_scale():
    s, t = _logits((10, 40), seed=17, dtype=torch.float64), _logits((10, 40), seed=18, dtype=torch.float64)
    loss, gs, _ = _grads(lambda a, b: -2.5 * fastkd.dist_loss(a, b, tau=3.0), s, t, teacher_grad=False)
    ref, ref_gs, _ = _grads(lambda a, b: -2.5 * _torchdistill(a, b, tau=3.0), s, t, teacher_grad=False)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=1e-14)
    # retain_graph: the saved gradient is not modified in place
    x = s.clone().requires_grad_(True)
    out = fastkd.dist_loss(x, t)
    g1, = torch.autograd.grad(3.0 * out, x, retain_graph=True)
    g2, = torch.autograd.grad(out, x)
    torch.testing.assert_close(g1, 3.0 * g2, rtol=1e-14, atol=0)


def test_module_and_noncontiguous_input():
    m = fastkd.DISTLoss(beta=2.0, gamma=3.0, tau=4.0)
    assert "tau=4.0" in repr(m)
    base = _logits((20, 30), seed=19, dtype=torch.float64)
    s = base.t()[:, :17]  # strided, not unit column stride
    t = _logits((30, 17), seed=20, dtype=torch.float64)
    torch.testing.assert_close(m(s, t), _torchdistill(s, t, 2.0, 3.0, 4.0), rtol=1e-12, atol=1e-12)


def test_gradcheck():
    s = _logits((5, 7), seed=21, dtype=torch.float64, scale=1.0).requires_grad_(True)
    t = _logits((5, 7), seed=22, dtype=torch.float64, scale=1.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fastkd.dist_loss(a, b, 1.3, 0.7, 1.7), (s, t))


def test_opcheck():
    s, t = _logits((6, 11), seed=23), _logits((6, 11), seed=24)
    for gs, gt in ((False, False), (True, False), (True, True)):
        torch.library.opcheck(torch.ops.fastkd.dist_forward.default,
                              (s.requires_grad_(gs), t.requires_grad_(gt), 1.0, 2.0, 3.0, 1e-8, gs, gt))
        s, t = s.detach(), t.detach()


def test_op_returns_loss_and_gradients():
    s, t = _logits((6, 11), seed=25, dtype=torch.float64), _logits((6, 11), seed=26, dtype=torch.float64)
    loss, gs, gt = torch.ops.fastkd.dist_forward(s, t, 1.0, 2.0, 3.0, 1e-8, True, True)
    ref, ref_gs, ref_gt = _grads(lambda a, b: R.dist_loss(a, b, 1.0, 2.0, 3.0), s, t)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-9, atol=1e-14)
    _, e1, e2 = torch.ops.fastkd.dist_forward(s, t, 1.0, 2.0, 3.0, 1e-8, False, False)
    assert e1.shape == (0,) and e2.shape == (0,)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    s, t = _logits((16, 50), seed=27), _logits((16, 50), seed=28)

    def step(a, b):
        return fastkd.dist_loss(a, b, 1.0, 2.0, 4.0) * 0.5

    compiled = torch.compile(step, fullgraph=True)
    xc, xe = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    lc = compiled(xc, t)
    lc.backward()
    le = step(xe, t)
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(70, 333), (300, 1000)])
def test_deterministic_across_thread_counts(shape):
    s, t = _logits(shape, seed=29), _logits(shape, seed=30)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_grads(fastkd.dist_loss, s, t))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert torch.equal(x, y)


def test_bad_input():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="student_logits must be 2-D"):
        fastkd.dist_loss(s[None], t[None])
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        fastkd.dist_loss(s, t[:, :4])
    with pytest.raises(TypeError, match="student_logits must be float32, float16, bfloat16 or float64"):
        fastkd.dist_loss(s.long(), t)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        fastkd.dist_loss(s, t, beta=-1.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        fastkd.dist_loss(s, t, gamma=math.inf)
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        fastkd.dist_loss(s, t, tau=0.0)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        fastkd.dist_loss(s, t, eps=-1e-8)
    with pytest.raises(TypeError, match="beta must be a real number"):
        fastkd.DISTLoss(beta="1")
    with pytest.raises(ValueError, match="student_logits: the vocabulary"):
        fastkd.dist_loss(torch.zeros(3, 0), torch.zeros(3, 0))
    # the op checks its own arguments (a direct call), naming them
    with pytest.raises(RuntimeError, match="argument 'tau'"):
        torch.ops.fastkd.dist_forward(s, t, 1.0, 1.0, -1.0, 1e-8, False, False)
    with pytest.raises(RuntimeError, match="argument 'teacher_logits'"):
        torch.ops.fastkd.dist_forward(s, t[:3], 1.0, 1.0, 1.0, 1e-8, False, False)
