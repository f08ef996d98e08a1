"""The relation- and feature-based losses of issue 5: fastkd.rkd_loss / rkd_distance_loss / rkd_angle_loss,
sp_loss, pkt_loss, cc_loss, at_loss, nst_loss and their modules (RKDLoss, SPLoss + Similarity, PKTLoss + PKT,
CCLoss, ATLoss + Attention, NSTLoss, HintLoss + ConvReg).

Values and gradients against the float64 reference (fastkd.reference) and the anchors' eager formulations
(RepDistiller, mdistiller, torchdistill; tests/helpers.py), the numerical traps of the Gram-matrix
formulation (common offsets, duplicated and nearly duplicated rows), tiny batches, low precision, gradcheck,
opcheck, torch.compile, determinism and bad input. The specification is spec5.md (see the issue)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    RepDistillerConvReg,
    assert_close,
    mdistiller_rkd,
    mdistiller_sp,
    repdistiller_attention,
    repdistiller_hint,
    repdistiller_nst,
    repdistiller_pkt,
    repdistiller_rkd,
    repdistiller_similarity,
    torchdistill_at,
    torchdistill_cckd,
    torchdistill_rkd,
    torchdistill_spkd,
)

import fastkd
from fastkd import reference as R


# --------------------------------------------------------------------------------------------------------
# inputs, runners, tolerances
# --------------------------------------------------------------------------------------------------------
def _feat(shape, device, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(device=device, dtype=dtype)


def _run(fn, s, t, teacher_grad=False, grad_out=None):
    """(loss, grad_student, grad_teacher or None) of fn(s, t) on fresh leaves (lists of tensors allowed)."""
    def leaf(x, req):
        if isinstance(x, (list, tuple)):
            return [leaf(y, req) for y in x]
        return x.detach().clone().requires_grad_(req)

    s, t = leaf(s, True), leaf(t, teacher_grad)
    loss = fn(s, t)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    flat_s = s if isinstance(s, list) else [s]
    flat_t = (t if isinstance(t, list) else [t]) if teacher_grad else []
    grads = torch.autograd.grad(loss, flat_s + flat_t, go, allow_unused=True)
    gs = list(grads[: len(flat_s)])
    gt = list(grads[len(flat_s):]) if teacher_grad else None
    if not isinstance(s, list):
        gs = gs[0]
        gt = None if gt is None else gt[0]
    return loss.detach(), gs, gt


def _close_loss(actual, expected, what, rtol=2e-5, atol=1e-9):
    assert_close(actual, expected, rtol=rtol, atol=atol, what=what)


def _close_grad(actual, expected, what, rtol=1e-4, rel_atol=1e-5, min_scale=0.0):
    """|actual - expected| <= rtol |expected| + rel_atol * max(max|expected|, min_scale). ``min_scale`` is the
    gradient scale to measure rounding against where the exact gradient is 0 (degenerate inputs)."""
    if isinstance(expected, (list, tuple)):
        for i, (a, e) in enumerate(zip(actual, expected)):
            _close_grad(a, e, f"{what}[{i}]", rtol, rel_atol, min_scale)
        return
    assert actual is not None, f"{what}: no gradient"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, min_scale)
    assert_close(actual, expected, rtol=rtol, atol=rel_atol * scale + 1e-30, what=what)


def _tols(dtype):
    """(loss rtol, grad rtol, grad atol relative to max|g|) for fused-vs-oracle comparisons."""
    if dtype == torch.float64:
        return 1e-9, 1e-7, 1e-9
    return 2e-5, 1e-4, 1e-5


def _up(x):
    return [y.double() for y in x] if isinstance(x, (list, tuple)) else x.double()


# one calling convention: name -> (fused fn, reference fn, teacher gets a gradient, feature maps)
def _callables(name):
    table = {
        "rkd": (lambda s, t: fastkd.rkd_loss(s, t), lambda s, t: R.rkd_loss(s, t), False, False),
        "rkd_w": (lambda s, t: fastkd.rkd_loss(s, t, 0.5, 2.0), lambda s, t: R.rkd_loss(s, t, 0.5, 2.0), False,
                  False),
        "rkd_dist": (fastkd.rkd_distance_loss, R.rkd_distance_loss, False, False),
        "rkd_angle": (fastkd.rkd_angle_loss, R.rkd_angle_loss, False, False),
        "sp": (lambda s, t: fastkd.sp_loss(s, t), lambda s, t: R.sp_loss(s, t), True, False),
        "sp_sum": (lambda s, t: fastkd.sp_loss(s, t, reduction="sum"), lambda s, t: R.sp_loss(s, t, reduction="sum"),
                   True, False),
        "pkt": (lambda s, t: fastkd.pkt_loss(s, t), lambda s, t: R.pkt_loss(s, t), True, False),
        "cc": (lambda s, t: fastkd.cc_loss(s, t), lambda s, t: R.cc_loss(s, t), True, False),
        "cc_bilinear_sum": (lambda s, t: fastkd.cc_loss(s, t, "bilinear", reduction="sum"),
                            lambda s, t: R.cc_loss(s, t, "bilinear", reduction="sum"), True, False),
        "at": (lambda s, t: fastkd.at_loss(s, t), lambda s, t: R.at_loss(s, t), True, True),
        "at_paper_p3": (lambda s, t: fastkd.at_loss(s, t, 3, mode="paper"),
                        lambda s, t: R.at_loss(s, t, 3, mode="paper"), True, True),
        "nst": (lambda s, t: fastkd.nst_loss(s, t), lambda s, t: R.nst_loss(s, t), False, True),
    }
    return table[name]


RELATION = ["rkd", "rkd_w", "rkd_dist", "rkd_angle", "sp", "sp_sum", "pkt", "cc", "cc_bilinear_sum"]
FEATURE = ["at", "at_paper_p3", "nst"]


def _pair_for(name, n, device, dtype=torch.float32, seed=0):
    """Student/teacher inputs of the loss's kind: [n, 24] / [n, 40] features, or [n, 6, 8, 8] / [n, 10, 8, 8]
    maps (non-negative for AT with p = 3 to keep pow real and smooth)."""
    _, _, _, maps = _callables(name)
    if maps:
        s, t = _feat((n, 6, 8, 8), device, dtype, seed), _feat((n, 10, 8, 8), device, dtype, seed + 1)
        return (s.abs(), t.abs()) if "p3" in name else (s, t)
    return _feat((n, 24), device, dtype, seed), _feat((n, 40), device, dtype, seed + 1)


def _assert_rkd_n2(loss, gs, dtype, what):
    """N = 2: both distances normalize to 1 and every angle is 0 or 1 on both sides, so RKD is identically 0;
    an implementation may only show rounding noise (e.g. G_01 and G_10 rounded differently)."""
    tiny = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item()) <= tiny, (what, loss)
    assert gs.abs().max().item() <= tiny, (what, gs.abs().max())


# --------------------------------------------------------------------------------------------------------
# values and gradients against the float64 reference
# --------------------------------------------------------------------------------------------------------
RKD_SHAPES = [(2, 5, 3), (3, 1, 1), (7, 16, 9), (33, 64, 128), (64, 256, 96), (96, 48, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", RKD_SHAPES, ids=lambda s: "N{}_Ds{}_Dt{}".format(*s))
@pytest.mark.parametrize("name", ["rkd", "rkd_w", "rkd_dist", "rkd_angle"])
def test_rkd_matches_float64_oracle(device, name, shape, dtype):
    n, ds, dt = shape
    s, t = _feat((n, ds), device, dtype, seed=1), _feat((n, dt), device, dtype, seed=2, scale=3.0)
    fused, ref, _, _ = _callables(name)
    lrt, grt, gat = _tols(dtype)
    loss, gs, _ = _run(fused, s, t)
    ref_loss, ref_gs, _ = _run(ref, s.double(), t.double())
    assert loss.dtype == dtype and loss.shape == () and gs.dtype == dtype
    if n == 2:
        _assert_rkd_n2(loss, gs, dtype, f"{name} {shape}")
        return
    _close_loss(loss, ref_loss, f"{name} {shape}", rtol=lrt)
    # with D = 1 every angle is 0 or +-1 and the angle term's exact gradient is 0: measure the rounding
    # against the scale of the whole RKD gradient
    _, full_gs, _ = _run(R.rkd_loss, s.double(), t.double())
    scale = max(ref_gs.abs().max().item(), full_gs.abs().max().item())
    assert_close(gs, ref_gs, rtol=grt, atol=gat * scale, what=f"{name} {shape}")


@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.3, 7.0)])
def test_rkd_weights_combine_the_terms(device, weights):
    s, t = _feat((20, 30), device, seed=3), _feat((20, 11), device, seed=4)
    wd, wa = weights
    loss, gs, _ = _run(lambda a, b: fastkd.rkd_loss(a, b, wd, wa), s, t)
    dist, gd, _ = _run(fastkd.rkd_distance_loss, s, t)
    ang, ga, _ = _run(fastkd.rkd_angle_loss, s, t)
    _close_loss(loss, wd * dist.double() + wa * ang.double(), f"weights {weights}", rtol=1e-5)
    _close_grad(gs, wd * gd.double() + wa * ga.double(), f"weights {weights}")
    if weights == (0.0, 0.0):
        assert loss.item() == 0.0 and torch.all(gs == 0)


def test_rkd_features_of_any_shape_are_flattened(device):
    s, t = _feat((9, 3, 4, 4), device, seed=5), _feat((9, 5, 2, 2, 2), device, seed=6)
    loss, gs, _ = _run(fastkd.rkd_loss, s, t)
    ref, ref_gs, _ = _run(R.rkd_loss, s.double().flatten(1), t.double().flatten(1))
    assert gs.shape == s.shape
    _close_loss(loss, ref, "4-D rkd")
    _close_grad(gs, ref_gs.reshape(s.shape), "4-D rkd")


def test_rkd_teacher_never_gets_a_gradient(device):
    s = _feat((10, 8), device, seed=7).requires_grad_(True)
    t = _feat((10, 8), device, seed=8).requires_grad_(True)
    for fn in (fastkd.rkd_loss, fastkd.rkd_distance_loss, fastkd.rkd_angle_loss):
        s.grad = None
        fn(s, t).backward()
        assert s.grad is not None and t.grad is None
    crit = fastkd.RKDLoss()
    crit(s, t).backward()
    assert t.grad is None


@pytest.mark.parametrize("name", ["sp", "sp_sum", "pkt", "cc", "cc_bilinear_sum", "at", "at_paper_p3", "nst"])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_float64_oracle(device, name, n, dtype):
    fused, ref, teacher_grad, _ = _callables(name)
    s, t = _pair_for(name, n, device, dtype, seed=9)
    lrt, grt, gat = _tols(dtype)
    loss, gs, gt = _run(fused, s, t, teacher_grad=True)
    ref_loss, ref_gs, ref_gt = _run(ref, _up(s), _up(t), teacher_grad=True)
    assert loss.dtype == dtype and loss.shape == ()
    # PKT's loss is a sum of N^2 log-ratio terms that cancel: fp32 leaves ~1e-8 absolute (the eager anchor too)
    _close_loss(loss, ref_loss, name, rtol=lrt, atol=1e-7 if name == "pkt" and dtype != torch.float64 else 1e-9)
    # N = 1: SP's normalized 1x1 Gram matrices are both 1 and PKT's P is 1: the loss and its gradient are 0
    floor = 1e-3 if n == 1 and name in ("sp", "sp_sum", "pkt") else 0.0
    _close_grad(gs, ref_gs, f"{name} student", rtol=grt, rel_atol=gat, min_scale=floor)
    if teacher_grad:
        _close_grad(gt, ref_gt, f"{name} teacher", rtol=grt, rel_atol=gat, min_scale=floor)
    elif name == "nst":  # the cross term's gradient only, as RepDistiller (K(t, t) is detached)
        _close_grad(gt, ref_gt, f"{name} teacher (cross term)", rtol=grt, rel_atol=gat)


@pytest.mark.parametrize("name", ["sp", "pkt", "cc", "at", "nst"])
def test_teacher_without_grad_gets_none(device, name):
    fused, _, _, _ = _callables(name)
    s, t = _pair_for(name, 6, device, seed=10)
    s.requires_grad_(True)
    fused(s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
@pytest.mark.parametrize("max_p", [1, 2, 4])
@pytest.mark.parametrize("gamma", [0.4, 0.05])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cc_parameters(device, kernel, max_p, gamma, reduction):
    s, t = _feat((16, 12), device, seed=11, scale=0.4), _feat((16, 20), device, seed=12, scale=0.3)
    kw = dict(kernel=kernel, gamma=gamma, max_p=max_p, reduction=reduction)
    loss, gs, gt = _run(lambda a, b: fastkd.cc_loss(a, b, **kw), s, t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: R.cc_loss(a, b, **kw), s.double(), t.double(), teacher_grad=True)
    _close_loss(loss, ref, f"cc {kw}")
    _close_grad(gs, ref_gs, f"cc {kw}")
    _close_grad(gt, ref_gt, f"cc teacher {kw}")


@pytest.mark.parametrize("p", [1, 2, 3, 2.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((4, 8, 8, 8), (4, 16, 8, 8)), ((4, 8, 16, 16), (4, 16, 8, 8)), ((3, 4, 4, 4), (3, 6, 8, 8)),
     ((3, 5, 7, 5), (3, 2, 7, 5)), ((2, 4, 8, 4), (2, 4, 4, 4)), ((5, 3, 12), (5, 9, 12))],
    ids=["same", "pool_student", "pool_teacher", "odd", "non_square_pooled_to_square", "3d"],
)
def test_at_shapes_p_and_modes(device, p, mode, s_shape, t_shape):
    s, t = _feat(s_shape, device, seed=13), _feat(t_shape, device, seed=14)
    if p == 2.5:  # non-integer powers are only real for non-negative maps (post-ReLU)
        s, t = s.abs(), t.abs()
    loss, gs, gt = _run(lambda a, b: fastkd.at_loss(a, b, p, mode=mode), s, t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: R.at_loss(a, b, p, mode=mode), s.double(), t.double(), teacher_grad=True)
    what = f"at p={p} {mode} {s_shape}->{t_shape}"
    _close_loss(loss, ref, what)
    _close_grad(gs, ref_gs, what)
    _close_grad(gt, ref_gt, what + " teacher")


@pytest.mark.parametrize(
    "s_shape,t_shape", [((4, 8, 8, 8), (4, 16, 8, 8)), ((4, 8, 16, 16), (4, 16, 8, 8)), ((3, 4, 4, 4), (3, 6, 8, 8))]
)
def test_nst_shapes(device, s_shape, t_shape):
    s, t = _feat(s_shape, device, seed=15), _feat(t_shape, device, seed=16)
    loss, gs, gt = _run(fastkd.nst_loss, s, t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(R.nst_loss, s.double(), t.double(), teacher_grad=True)
    _close_loss(loss, ref, "nst")
    _close_grad(gs, ref_gs, "nst")
    _close_grad(gt, ref_gt, "nst teacher (cross term)")


def test_layer_lists_and_weights(device):
    g_s = [_feat((4, 8, 8, 8), device, seed=17), _feat((4, 16, 4, 4), device, seed=18)]
    g_t = [_feat((4, 16, 8, 8), device, seed=19), _feat((4, 32, 2, 2), device, seed=20)]
    for fused, ref, kw in (
        (fastkd.at_loss, R.at_loss, {}),
        (fastkd.at_loss, R.at_loss, {"mode": "paper", "weights": [0.5, 2.0]}),
        (fastkd.nst_loss, R.nst_loss, {"weights": (1.0, 0.25)}),
        (fastkd.sp_loss, R.sp_loss, {"weights": [3.0, 0.0]}),
        (fastkd.sp_loss, R.sp_loss, {"reduction": "sum"}),
    ):
        loss, gs, _ = _run(lambda a, b: fused(a, b, **kw), g_s, g_t)
        ref, ref_gs, _ = _run(lambda a, b: ref(a, b, **kw), _up(g_s), _up(g_t))
        assert loss.shape == ()
        _close_loss(loss, ref, f"{fused.__name__} {kw}")
        _close_grad(gs, ref_gs, f"{fused.__name__} {kw}")
        # a list is the (weighted) sum of its layers
        w = kw.get("weights", [1.0, 1.0])
        extra = {k: val for k, val in kw.items() if k != "weights"}
        per_layer = sum(wi * fused(a, b, **extra).double() for wi, a, b in zip(w, g_s, g_t))
        _close_loss(loss, per_layer, f"{fused.__name__} sum of layers", rtol=1e-5)
    # tuples work like lists
    _close_loss(fastkd.at_loss(tuple(g_s), tuple(g_t)), fastkd.at_loss(g_s, g_t), "tuple", rtol=0)


# --------------------------------------------------------------------------------------------------------
# anchors: RepDistiller, mdistiller, torchdistill (run in float64)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 5, 5), (16, 64, 32), (64, 128, 256)], ids=lambda s: "N{}_Ds{}_Dt{}".format(*s))
def test_rkd_matches_anchors(device, shape):
    n, ds, dt = shape
    s, t = _feat((n, ds), device, seed=21), _feat((n, dt), device, seed=22)
    cases = [
        ("RepDistiller RKDLoss()", lambda a, b: fastkd.rkd_loss(a, b), lambda a, b: repdistiller_rkd(a, b)),
        ("RepDistiller RKDLoss(5, 10)", lambda a, b: fastkd.RKDLoss(5.0, 10.0)(a, b),
         lambda a, b: repdistiller_rkd(a, b, 5, 10)),
        ("mdistiller rkd_loss", lambda a, b: fastkd.rkd_loss(a, b, 25.0, 50.0), lambda a, b: mdistiller_rkd(a, b)),
        ("torchdistill dist only", lambda a, b: fastkd.rkd_loss(a, b, 1.0, 0.0),
         lambda a, b: torchdistill_rkd(a, b, 1.0, 0)),
        ("torchdistill angle only", lambda a, b: fastkd.rkd_loss(a, b, 0.0, 2.0),
         lambda a, b: torchdistill_rkd(a, b, None, 2.0)),
        ("torchdistill both", lambda a, b: fastkd.rkd_loss(a, b, 1.0, 2.0),
         lambda a, b: torchdistill_rkd(a, b, 1.0, 2.0)),
    ]
    for what, ours, theirs in cases:
        loss, gs, _ = _run(ours, s, t)
        ref, ref_gs, _ = _run(theirs, s.double(), t.double())
        if n == 2:
            assert abs(ref.item()) <= 1e-12 and ref_gs.abs().max() <= 1e-12, what
            _assert_rkd_n2(loss, gs, torch.float32, what)
            _assert_rkd_n2(*_run(ours, s.double(), t.double())[:2], torch.float64, what + " fp64")
            continue
        _close_loss(loss, ref, what)
        _close_grad(gs, ref_gs, what)
        # the fused float64 path agrees with the anchor to float64 accuracy
        loss64, gs64, _ = _run(ours, s.double(), t.double())
        _close_loss(loss64, ref, what + " fp64", rtol=1e-9)
        _close_grad(gs64, ref_gs, what + " fp64", rtol=1e-7, rel_atol=1e-9)


def test_sp_matches_anchors(device):
    g_s = [_feat((8, 4, 4, 4), device, seed=23), _feat((8, 32), device, seed=24)]
    g_t = [_feat((8, 6, 2, 2), device, seed=25), _feat((8, 16), device, seed=26)]
    # RepDistiller Similarity: a list with one loss of shape (1,) per layer
    ours = fastkd.Similarity()(g_s, g_t)
    theirs = repdistiller_similarity(_up(g_s), _up(g_t))
    assert isinstance(ours, list) and len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.shape == (1,)
        _close_loss(a, b, "Similarity")
    loss, gs, gt = _run(lambda a, b: sum(fastkd.Similarity()(a, b)), g_s, g_t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: sum(repdistiller_similarity(a, b)), _up(g_s), _up(g_t),
                               teacher_grad=True)
    _close_loss(loss, ref, "sum(Similarity)")
    _close_grad(gs, ref_gs, "Similarity")
    _close_grad(gt, ref_gt, "Similarity teacher")
    # mdistiller sp_loss: the sum over layers
    _close_loss(fastkd.sp_loss(g_s, g_t), mdistiller_sp(_up(g_s), _up(g_t)).squeeze(), "mdistiller sp_loss")
    # torchdistill SPKDLoss, both reductions
    for reduction in ("batchmean", "sum"):
        loss, gs, gt = _run(lambda a, b: fastkd.sp_loss(a, b, reduction=reduction), g_s[0], g_t[0], True)
        ref, ref_gs, ref_gt = _run(lambda a, b: torchdistill_spkd(a, b, reduction), g_s[0].double(),
                                   g_t[0].double(), True)
        _close_loss(loss, ref, f"SPKDLoss {reduction}")
        _close_grad(gs, ref_gs, f"SPKDLoss {reduction}")
        _close_grad(gt, ref_gt, f"SPKDLoss teacher {reduction}")


@pytest.mark.parametrize("eps", [1e-7, 1e-4])
def test_pkt_matches_anchors(device, eps):
    s, t = _feat((32, 64), device, seed=27), _feat((32, 128), device, seed=28)
    loss, gs, gt = _run(lambda a, b: fastkd.pkt_loss(a, b, eps), s, t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: repdistiller_pkt(a, b, eps), s.double(), t.double(), teacher_grad=True)
    _close_loss(loss, ref, "PKT")
    _close_grad(gs, ref_gs, "PKT")
    _close_grad(gt, ref_gt, "PKT teacher")
    _close_loss(fastkd.PKTLoss(eps=eps)(s, t), ref, "PKTLoss")
    if eps == 1e-7:
        _close_loss(fastkd.PKT()(s, t), ref, "RepDistiller PKT()")


def test_pkt_zero_row_has_a_finite_gradient(device):
    # the anchors' sqrt(sum(x^2)) gives NaN for a zero student row; fastkd the finite one-sided value
    s, t = _feat((6, 10), device, seed=29), _feat((6, 7), device, seed=30)
    s[2] = 0
    loss, gs, _ = _run(fastkd.pkt_loss, s, t)
    ref, ref_gs, _ = _run(R.pkt_loss, s.double(), t.double())
    assert torch.isfinite(gs).all()
    _close_loss(loss, ref, "pkt zero row")
    _close_grad(gs, ref_gs, "pkt zero row")
    _, anchor_gs, _ = _run(repdistiller_pkt, s.double(), t.double())
    assert torch.isnan(anchor_gs[2]).all()  # the quirk is real


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
@pytest.mark.parametrize("max_p", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cc_matches_torchdistill(device, kernel, max_p, reduction):
    s, t = _feat((24, 16), device, seed=31, scale=0.3), _feat((24, 32), device, seed=32, scale=0.2)
    kw = dict(kernel=kernel, gamma=0.4, max_p=max_p, reduction=reduction)
    loss, gs, gt = _run(lambda a, b: fastkd.cc_loss(a, b, **kw), s, t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: torchdistill_cckd(a, b, kernel, 0.4, max_p, reduction), s.double(),
                               t.double(), teacher_grad=True)
    _close_loss(loss, ref, f"CCKD {kw}")
    _close_grad(gs, ref_gs, f"CCKD {kw}")
    _close_grad(gt, ref_gt, f"CCKD teacher {kw}")
    _close_loss(fastkd.CCLoss(**kw)(s, t), ref, "CCLoss")


def test_cc_identical_inputs_give_zero_and_zero_gradient(device):
    s = _feat((9, 13), device, seed=33)
    for kernel in ("gaussian", "bilinear"):
        loss, gs, gt = _run(lambda a, b: fastkd.cc_loss(a, b, kernel), s, s.clone(), teacher_grad=True)
        assert loss.item() == 0.0
        assert torch.all(gs == 0) and torch.all(gt == 0)


@pytest.mark.parametrize("p", [2, 3])
def test_at_matches_anchors(device, p):
    g_s = [_feat((4, 8, 16, 16), device, seed=34), _feat((4, 16, 8, 8), device, seed=35),
           _feat((4, 32, 4, 4), device, seed=36)]
    g_t = [_feat((4, 16, 16, 16), device, seed=37), _feat((4, 32, 4, 4), device, seed=38),
           _feat((4, 64, 8, 8), device, seed=39)]
    # RepDistiller Attention(p): a list of per-layer 0-dim losses, pooling the taller map
    ours = fastkd.Attention(p)(g_s, g_t)
    theirs = repdistiller_attention(_up(g_s), _up(g_t), p)
    assert isinstance(ours, list) and len(ours) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == ()
        _close_loss(a, b, f"Attention({p})")
    loss, gs, gt = _run(lambda a, b: sum(fastkd.ATLoss(p)(a, b)), g_s, g_t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: sum(repdistiller_attention(a, b, p)), _up(g_s), _up(g_t), True)
    _close_loss(loss, ref, "sum(Attention)")
    _close_grad(gs, ref_gs, "Attention")
    _close_grad(gt, ref_gt, "Attention teacher")
    # mdistiller at_loss: the sum over layers
    _close_loss(fastkd.at_loss(g_s, g_t, p), ref, "mdistiller at_loss")
    if p != 2:
        return
    # torchdistill ATLoss: equal spatial sizes only (it does not pool), weighted pairs, both modes
    pairs_s, pairs_t, w = [g_s[0], g_s[1]], [g_t[0], _feat((4, 32, 8, 8), device, seed=40)], [1.0, 0.5]
    for mode in ("code", "paper"):
        loss, gs, gt = _run(lambda a, b: fastkd.at_loss(a, b, mode=mode, weights=w), pairs_s, pairs_t, True)
        ref, ref_gs, ref_gt = _run(
            lambda a, b: torchdistill_at([(a[0], b[0], w[0]), (a[1], b[1], w[1])], mode), _up(pairs_s),
            _up(pairs_t), True,
        )
        _close_loss(loss, ref, f"torchdistill ATLoss {mode}")
        _close_grad(gs, ref_gs, f"torchdistill ATLoss {mode}")
        _close_grad(gt, ref_gt, f"torchdistill ATLoss {mode} teacher")


def test_nst_matches_repdistiller(device):
    g_s = [_feat((4, 8, 8, 8), device, seed=41), _feat((4, 16, 8, 8), device, seed=42)]
    g_t = [_feat((4, 16, 8, 8), device, seed=43), _feat((4, 24, 4, 4), device, seed=44)]
    ours = fastkd.NSTLoss()(g_s, g_t)
    theirs = repdistiller_nst(_up(g_s), _up(g_t))
    assert isinstance(ours, list) and len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.shape == ()
        _close_loss(a, b, "NSTLoss")
    loss, gs, gt = _run(lambda a, b: sum(fastkd.NSTLoss()(a, b)), g_s, g_t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: sum(repdistiller_nst(a, b)), _up(g_s), _up(g_t), teacher_grad=True)
    _close_loss(loss, ref, "sum(NSTLoss)")
    _close_grad(gs, ref_gs, "NSTLoss")
    _close_grad(gt, ref_gt, "NSTLoss teacher (cross term only, as RepDistiller)")
    # a tensor pair gives a 0-dim tensor
    single = fastkd.NSTLoss()(g_s[0], g_t[0])
    assert isinstance(single, torch.Tensor) and single.shape == ()
    _close_loss(single, theirs[0], "NSTLoss tensor pair")


# --------------------------------------------------------------------------------------------------------
# FitNet hints: HintLoss + ConvReg
# --------------------------------------------------------------------------------------------------------
CONVREG_CASES = [
    ((2, 16, 32, 32), (2, 32, 16, 16), torch.nn.Conv2d, (3, 3), (2, 2)),  # student twice as tall
    ((2, 16, 8, 8), (2, 32, 16, 16), torch.nn.ConvTranspose2d, (4, 4), (2, 2)),  # half as tall
    ((2, 16, 8, 8), (2, 32, 6, 6), torch.nn.Conv2d, (3, 3), (1, 1)),  # s_H >= t_H: kernel 1 + s - t
    ((2, 16, 8, 8), (2, 16, 8, 8), torch.nn.Conv2d, (1, 1), (1, 1)),  # equal shapes: 1x1
    ((2, 16, 8, 6), (2, 8, 4, 3), torch.nn.Conv2d, (3, 3), (2, 2)),  # 2x taller wins over s_H >= t_H
]


@pytest.mark.parametrize("s_shape,t_shape,conv_type,kernel,stride", CONVREG_CASES)
@pytest.mark.parametrize("use_relu", [True, False])
def test_convreg_is_repdistillers(device, s_shape, t_shape, conv_type, kernel, stride, use_relu):
    ours = fastkd.ConvReg(s_shape, t_shape, use_relu=use_relu).to(device)
    theirs = RepDistillerConvReg(s_shape, t_shape, use_relu=use_relu).to(device)
    assert type(ours.conv) is conv_type and tuple(ours.conv.kernel_size) == kernel
    assert tuple(ours.conv.stride) == stride
    assert isinstance(ours.bn, torch.nn.BatchNorm2d) and ours.bn.num_features == t_shape[1]
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes
    x = _feat(s_shape, device, seed=45)
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        out = ours(x)
        assert out.shape == t_shape
        assert_close(out, theirs(x), rtol=1e-6, atol=1e-6, what=f"ConvReg train={train}")


def test_convreg_impossible_shapes():
    with pytest.raises(ValueError, match="teacher"):
        fastkd.ConvReg((2, 16, 4, 4), (2, 32, 16, 16))  # 4x shorter: RepDistiller has no regressor


def test_hint_loss(device):
    f_s, f_t = _feat((4, 16, 8, 8), device, seed=46), _feat((4, 16, 8, 8), device, seed=47)
    # no shapes: RepDistiller HintLoss(), an nn.MSELoss()
    crit = fastkd.HintLoss()
    assert crit.regressor is None and len(list(crit.parameters())) == 0
    loss, gs, gt = _run(crit, f_s, f_t, teacher_grad=True)
    ref, ref_gs, ref_gt = _run(repdistiller_hint, f_s.double(), f_t.double(), teacher_grad=True)
    _close_loss(loss, ref, "HintLoss()")
    _close_grad(gs, ref_gs, "HintLoss()")
    _close_grad(gt, ref_gt, "HintLoss() teacher")
    _close_loss(fastkd.HintLoss(reduction="sum")(f_s, f_t), ref * f_s.numel(), "HintLoss sum", rtol=1e-5)
    # equal shapes: "auto" builds no regressor, "always" builds RepDistiller's ConvReg (as its FitNet does)
    assert fastkd.HintLoss(f_s.shape, f_t.shape).regressor is None
    crit = fastkd.HintLoss(f_s.shape, f_t.shape, regressor="always").to(device)
    assert isinstance(crit.regressor, fastkd.ConvReg)
    # different shapes: a ConvReg whose parameters belong to the loss (the optimizer must see them)
    f_s2 = _feat((4, 8, 16, 16), device, seed=48)
    crit = fastkd.HintLoss(f_s2.shape, f_t.shape, use_relu=False).to(device)
    params = list(crit.parameters())
    assert isinstance(crit.regressor, fastkd.ConvReg) and len(params) > 0
    anchor = RepDistillerConvReg(f_s2.shape, f_t.shape, use_relu=False).to(device)
    anchor.load_state_dict(crit.regressor.state_dict())
    expected = F.mse_loss(anchor(f_s2), f_t)
    out = crit(f_s2, f_t)
    assert_close(out, expected, rtol=1e-5, atol=1e-7, what="HintLoss with regressor")
    out.backward()
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="shape"):
        fastkd.HintLoss(f_s2.shape, f_t.shape, regressor="none")(f_s2, f_t)
    with pytest.raises(ValueError, match="regressor"):
        fastkd.HintLoss(f_s2.shape, f_t.shape, regressor="sometimes")


# --------------------------------------------------------------------------------------------------------
# the numerical traps of the Gram-matrix formulation (RKD)
# --------------------------------------------------------------------------------------------------------
def _rkd_check(s, t, what, grad_rtol=1e-4, grad_atol=1e-5, weights=(25.0, 50.0)):
    loss, gs, _ = _run(lambda a, b: fastkd.rkd_loss(a, b, *weights), s, t)
    ref, ref_gs, _ = _run(lambda a, b: R.rkd_loss(a, b, *weights), s.double(), t.double())
    assert torch.isfinite(loss) and torch.isfinite(gs).all(), what
    _close_loss(loss, ref, what)
    _close_grad(gs, ref_gs, what, rtol=grad_rtol, rel_atol=grad_atol)
    return loss, gs, ref, ref_gs


def _eager_fp32_rel_error(s, t, ref):
    return ((repdistiller_rkd(s.float(), t.float()).double() - ref).abs() / ref.abs()).item()


@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_rkd_common_offset(device, offset):
    # features sharing an offset 100x (and 10^4x) their spread: the Gram identity |x_i|^2 + |x_j|^2 - 2<x_i, x_j>
    # cancels catastrophically unless the features are centered first (distances and angles are translation
    # invariant)
    s = _feat((64, 256), device, seed=49, offset=offset)
    t = _feat((64, 512), device, seed=50, offset=-offset)
    _, _, ref, _ = _rkd_check(s, t, f"offset {offset}")
    assert _eager_fp32_rel_error(s, t, ref) > 1e-5  # the data does defeat the uncentered fp32 formulation


def test_rkd_relu_features_with_offset(device):
    # post-ReLU features (many exact zeros) plus a large per-dimension positive offset
    s = torch.relu(_feat((48, 300), device, seed=51)) + 50.0 * torch.rand(300, generator=torch.Generator()
                                                                          .manual_seed(52)).to(device)
    t = torch.relu(_feat((48, 200), device, seed=53)) + 100.0
    _rkd_check(s, t, "relu + offset")


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_rkd_duplicated_rows(device, offset):
    # the same sample twice (or three times) in a batch: zero distances on both sides, the zero vector in the
    # angle term (e_ij = 0), distances clamped to sqrt(1e-12) and counted in the positive mean
    s = _feat((40, 64), device, seed=54, offset=offset)
    t = _feat((40, 96), device, seed=55, offset=offset)
    for i, j in ((5, 3), (10, 3), (20, 7), (39, 0)):
        s[i], t[i] = s[j], t[j]
    _rkd_check(s, t, f"duplicates offset {offset}")
    _rkd_check(s, t, f"duplicates offset {offset} distance only", weights=(1.0, 0.0))
    _rkd_check(s, t, f"duplicates offset {offset} angle only", weights=(0.0, 1.0))


def test_rkd_all_rows_identical(device):
    for n in (2, 5):
        s = _feat((1, 16), device, seed=56).expand(n, 16).clone()
        t = _feat((1, 8), device, seed=57).expand(n, 8).clone() + 3.0
        loss, gs, _ = _run(fastkd.rkd_loss, s, t)
        assert loss.item() == 0.0 and torch.all(gs == 0), n


def test_rkd_student_only_duplicates(device):
    # rows equal in the student but not in the teacher: the anchors' gradient through the clamped normalize
    # is e_ik / 1e-12 (about 1e12 / N^3); fastkd reproduces it. Each row is compared relative to its own size
    # so that the ordinary rows are checked too.
    s = _feat((24, 32), device, seed=58)
    t = _feat((24, 48), device, seed=59)
    s[7] = s[2]
    loss, gs, _ = _run(fastkd.rkd_loss, s, t)
    ref, ref_gs, _ = _run(R.rkd_loss, s.double(), t.double())
    _close_loss(loss, ref, "student-only duplicates")
    err = (gs.double() - ref_gs).norm(dim=1)
    size = ref_gs.norm(dim=1)
    assert size[[2, 7]].min() > 1e6 * size[[0, 1, 3]].max()  # the 1e12-scale rows
    assert torch.all(err <= 1e-4 * size + 1e-30), (err / size).max()


def test_rkd_near_duplicates(device):
    # two rows closer than ~1e-3 of the feature norm: resolvable by the direct formulation in fp32; the fp32
    # Gram identity loses most of the pair's digits (see spec5.md, "RKD numerics")
    g = torch.Generator().manual_seed(60)
    s = _feat((64, 256), device, seed=61)
    t = _feat((64, 512), device, seed=62)
    for x, (i, j) in ((s, (5, 3)), (t, (9, 4))):
        c = x - x.mean(0)
        u = torch.randn(x.shape[1], generator=g, dtype=torch.float64).to(device)
        x[i] = x[j] + (6e-4 * c[j].norm() * u / u.norm()).to(x.dtype)
    # measured (spec5.md): float64 Gram 3.3e-4 of max|g|, fp32 Gram 6.8e-3, eager RepDistiller fp32 1.2e-3
    _rkd_check(s, t, "near duplicates", grad_rtol=1e-3, grad_atol=1e-3)


def test_rkd_small_batches_and_widths(device):
    # N = 1: no pair (the anchors give NaN for the distance term); N = 2; D = 1
    for n, d in ((1, 7), (2, 5), (2, 1), (5, 1), (3, 2)):
        s, t = _feat((n, d), device, seed=63), _feat((n, d + 2), device, seed=64)
        if n == 2:
            _assert_rkd_n2(*_run(fastkd.rkd_loss, s, t)[:2], torch.float32, f"N=2 D={d}")
            continue
        loss, gs, ref, ref_gs = _rkd_check(s, t, f"N={n} D={d}")
        if n == 1:
            assert loss.item() == 0.0 and torch.all(gs == 0)


@pytest.mark.parametrize("name", ["rkd", "rkd_dist", "rkd_angle", "sp", "pkt", "cc", "at", "nst"])
def test_empty_batch(device, name):
    fused, _, _, maps = _callables(name)
    shape_s, shape_t = ((0, 4, 3, 3), (0, 2, 3, 3)) if maps else ((0, 5), (0, 3))
    s = torch.empty(shape_s, device=device, requires_grad=True)
    t = torch.empty(shape_t, device=device)
    loss = fused(s, t)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and s.grad.shape == s.shape


# --------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------
LOW_PRECISION = ["rkd", "sp", "pkt", "cc", "at"]


@pytest.mark.parametrize("name", LOW_PRECISION)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, name, dtype):
    # fp32 accumulation: the result is the float64 answer on the same (rounded) inputs, rounded once to dtype
    fused, ref, teacher_grad, _ = _callables(name)
    s, t = _pair_for(name, 48, device, dtype, seed=65)
    loss, gs, gt = _run(fused, s, t, teacher_grad=teacher_grad)
    ref_loss, ref_gs, ref_gt = _run(ref, s.double(), t.double(), teacher_grad=teacher_grad)
    assert loss.dtype == dtype and gs.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert abs(loss.double().item() - ref_loss.item()) <= eps * abs(ref_loss.item()) + 1e-12, (loss, ref_loss)
    for g, g_ref, what in ((gs, ref_gs, "student"), (gt, ref_gt, "teacher")):
        if g_ref is None:
            continue
        assert g.dtype == dtype
        bound = eps * g_ref.abs() + 1e-5 * g_ref.abs().max() + 2.0 ** -24
        assert torch.all((g.double() - g_ref).abs() <= bound), f"{name} {what} {dtype}"


@pytest.mark.parametrize("name", ["rkd", "sp", "pkt", "cc", "at"])
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float32)])
def test_mixed_dtypes(device, name, s_dtype, t_dtype):
    fused, ref, teacher_grad, _ = _callables(name)
    s, t = _pair_for(name, 12, device, seed=66)
    s, t = s.to(s_dtype), t.to(t_dtype)
    loss, gs, gt = _run(fused, s, t, teacher_grad=teacher_grad)
    ref_loss, ref_gs, ref_gt = _run(ref, s.double(), t.double(), teacher_grad=teacher_grad)
    assert loss.dtype == torch.promote_types(s_dtype, t_dtype)
    assert gs.dtype == s_dtype
    tol = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1e-2}
    rtol = max(tol[s_dtype], tol[t_dtype])
    _close_loss(loss, ref_loss, name, rtol=rtol)
    _close_grad(gs, ref_gs, name, rtol=10 * tol[s_dtype], rel_atol=tol[s_dtype])
    if teacher_grad:
        assert gt.dtype == t_dtype
        _close_grad(gt, ref_gt, name + " teacher", rtol=10 * tol[t_dtype], rel_atol=tol[t_dtype])


# --------------------------------------------------------------------------------------------------------
# autograd machinery: upstream gradients, gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RELATION + FEATURE)
def test_upstream_gradient_scales_and_retain_graph(device, name):
    fused, ref, teacher_grad, _ = _callables(name)
    s, t = _pair_for(name, 9, device, seed=67)
    for w in (0.0, 0.37, -2.0):
        _, gs, _ = _run(lambda a, b: w * fused(a, b), s, t)
        _, ref_gs, _ = _run(lambda a, b: w * ref(a, b), s.double(), t.double())
        _close_grad(gs, ref_gs, f"{name} w={w}")
    # backward twice through a retained graph: the saved gradient must not be modified in place
    sg = s.clone().requires_grad_(True)
    loss = fused(sg, t)
    loss.backward(retain_graph=True)
    first = sg.grad.clone()
    (0.5 * loss).backward()
    assert_close(sg.grad, 1.5 * first, rtol=1e-6, atol=0, what=f"{name} retain_graph")


@pytest.mark.parametrize("name", RELATION + FEATURE)
def test_gradcheck_float64(device, name):
    fused, _, teacher_grad, maps = _callables(name)
    if maps:
        s, t = _feat((3, 4, 3, 3), device, torch.float64, seed=68), _feat((3, 2, 3, 3), device, torch.float64,
                                                                          seed=69)
        if "p3" in name:
            s, t = s.abs() + 0.1, t.abs() + 0.1
    else:
        s, t = _feat((5, 4), device, torch.float64, seed=68), _feat((5, 3), device, torch.float64, seed=69)
    s.requires_grad_(True)
    t.requires_grad_(teacher_grad)
    if teacher_grad:
        assert torch.autograd.gradcheck(fused, (s, t), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda a: fused(a, t), (s,), fast_mode=True)


def _op_samples(device):
    s, t = _feat((6, 10), device, seed=70), _feat((6, 7), device, seed=71)
    m_s, m_t = _feat((3, 4, 5), device, seed=72), _feat((3, 6, 5), device, seed=73)
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    ops = torch.ops.fastkd
    # rkd_forward(student, teacher, distance_weight, angle_weight, grad_student)
    yield ops.rkd_forward, (req(s), t, 25.0, 50.0, True)
    yield ops.rkd_forward, (s, t, 1.0, 0.0, False)
    yield ops.rkd_forward, (req(s.double()), t.double(), 0.0, 1.0, True)
    yield ops.rkd_forward, (req(s), t.bfloat16(), 25.0, 50.0, True)
    # sp_forward(student, teacher, reduction, grad_student, grad_teacher)
    yield ops.sp_forward, (req(s), req(t), "batchmean", True, True)
    yield ops.sp_forward, (req(s.double()), t.double(), "sum", True, False)
    # pkt_forward(student, teacher, eps, grad_student, grad_teacher)
    yield ops.pkt_forward, (req(s), req(t), 1e-7, True, True)
    yield ops.pkt_forward, (s.half(), t, 1e-4, False, False)
    # cc_forward(student, teacher, kernel, gamma, max_p, reduction, grad_student, grad_teacher)
    yield ops.cc_forward, (req(s), req(t), "gaussian", 0.4, 2, "batchmean", True, True)
    yield ops.cc_forward, (req(s), t, "bilinear", 0.4, 2, "sum", True, False)
    # at_forward(student [N, C, S], teacher [N, C', S], p, mode, grad_student, grad_teacher)
    yield ops.at_forward, (req(m_s), req(m_t), 2.0, "code", True, True)
    yield ops.at_forward, (req(m_s.double()), m_t.double(), 3.0, "paper", True, False)


def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_ops_return_loss_and_gradients(device):
    # the fused forward computes the gradient of the loss it returns
    s, t = _feat((6, 10), device, seed=74), _feat((6, 7), device, seed=75)
    loss, dist, ang, g = torch.ops.fastkd.rkd_forward(s, t, 2.0, 3.0, True)
    _close_loss(loss, 2.0 * dist.double() + 3.0 * ang.double(), "rkd_forward parts", rtol=1e-6)
    _, ref_gs, _ = _run(lambda a, b: R.rkd_loss(a, b, 2.0, 3.0), s.double(), t.double())
    _close_grad(g, ref_gs, "rkd_forward grad")
    _, _, _, empty = torch.ops.fastkd.rkd_forward(s, t, 2.0, 3.0, False)
    assert empty.shape == (0,)
    loss, gs, gt = torch.ops.fastkd.sp_forward(s, t, "batchmean", True, True)
    _, ref_gs, ref_gt = _run(R.sp_loss, s.double(), t.double(), teacher_grad=True)
    _close_grad(gs, ref_gs, "sp_forward grad")
    _close_grad(gt, ref_gt, "sp_forward teacher grad")


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    s, t = _feat((16, 32), device, seed=76), _feat((16, 24), device, seed=77)
    m_s, m_t = _feat((16, 4, 8, 8), device, seed=78), _feat((16, 6, 4, 4), device, seed=79)

    def step(s, t, m_s, m_t):
        return (
            fastkd.rkd_loss(s, t)
            + fastkd.rkd_distance_loss(s, t)
            + 3000.0 * fastkd.sp_loss(s, t)
            + 30000.0 * fastkd.pkt_loss(s, t)
            + fastkd.cc_loss(s, t, "bilinear")
            + 1000.0 * fastkd.at_loss(m_s, m_t)  # spatial sizes differ: pooled
            + fastkd.at_loss([m_s], [m_t], mode="paper", weights=[0.5])
            + 50.0 * fastkd.nst_loss(m_s, m_t)
        )

    compiled = torch.compile(step, fullgraph=True)
    leaves_c = [x.clone().requires_grad_(True) for x in (s, m_s)]
    leaves_e = [x.clone().requires_grad_(True) for x in (s, m_s)]
    loss_c = compiled(leaves_c[0], t, leaves_c[1], m_t)
    loss_c.backward()
    loss_e = step(leaves_e[0], t, leaves_e[1], m_t)
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    for c, e in zip(leaves_c, leaves_e):
        assert_close(c.grad, e.grad, rtol=1e-5, atol=1e-6 * e.grad.abs().max().item())


# --------------------------------------------------------------------------------------------------------
# layout, determinism, size
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rkd", "sp", "pkt", "cc"])
def test_non_contiguous_inputs(device, name):
    fused, ref, teacher_grad, _ = _callables(name)
    base_s, base_t = _feat((20, 50), device, seed=80), _feat((45, 20), device, seed=81)
    s = base_s[::2, 5:45]  # row-strided view [10, 40]
    t = base_t.t()[::2, ::3]  # transposed and strided [10, 15]
    assert not s.is_contiguous() and not t.is_contiguous()
    loss, gs, gt = _run(fused, s, t, teacher_grad=teacher_grad)
    ref_loss, ref_gs, ref_gt = _run(ref, s.double(), t.double(), teacher_grad=teacher_grad)
    _close_loss(loss, ref_loss, name)
    _close_grad(gs, ref_gs, name)
    if teacher_grad:
        _close_grad(gt, ref_gt, name + " teacher")


def test_non_contiguous_feature_maps(device):
    s = _feat((6, 8, 8, 8), device, seed=82).to(memory_format=torch.channels_last)
    t = _feat((6, 8, 16, 8), device, seed=83)[:, :, ::2, :]
    for fused, ref in ((fastkd.at_loss, R.at_loss), (fastkd.nst_loss, R.nst_loss)):
        loss, gs, _ = _run(fused, s, t)
        ref_loss, ref_gs, _ = _run(ref, s.double(), t.double())
        _close_loss(loss, ref_loss, fused.__name__)
        _close_grad(gs, ref_gs, fused.__name__)


@pytest.mark.parametrize("name", ["rkd", "sp", "pkt", "cc", "at"])
def test_deterministic_across_runs_and_threads(device, name):
    fused, _, teacher_grad, maps = _callables(name)
    if maps:
        s, t = _feat((64, 64, 8, 8), device, seed=84), _feat((64, 128, 8, 8), device, seed=85)
    else:
        n = 96 if name == "rkd" else 256
        s, t = _feat((n, 300), device, seed=84), _feat((n, 200), device, seed=85)

    def run():
        loss, gs, gt = _run(fused, s, t, teacher_grad=teacher_grad)
        return [loss, gs] + ([gt] if teacher_grad else [])

    threads = torch.get_num_threads()
    try:
        results = [run(), run()]
        torch.set_num_threads(1)
        results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_rkd_large_batch_runs(device):
    # N = 512, D = 2048 (the benchmark size): fwd + bwd completes, finite, distance term exact
    s, t = _feat((512, 2048), device, seed=86), _feat((512, 1024), device, seed=87)
    loss, gs, _ = _run(fastkd.rkd_loss, s, t)
    assert torch.isfinite(loss) and torch.isfinite(gs).all()
    dist, gd, _ = _run(fastkd.rkd_distance_loss, s, t)
    ref, ref_gd, _ = _run(R.rkd_distance_loss, s.double(), t.double())
    _close_loss(dist, ref, "N=512 distance")
    _close_grad(gd, ref_gd, "N=512 distance")


# --------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------
def test_modules_match_functional(device):
    s, t = _feat((10, 12), device, seed=88), _feat((10, 9), device, seed=89)
    m_s, m_t = _feat((10, 4, 4, 4), device, seed=90), _feat((10, 6, 8, 8), device, seed=91)
    cases = [
        (fastkd.RKDLoss(), (s, t), fastkd.rkd_loss(s, t, 25.0, 50.0)),
        (fastkd.RKDLoss(1.0, 2.0), (s, t), fastkd.rkd_loss(s, t, 1.0, 2.0)),
        (fastkd.RKDLoss(distance_weight=0.0, angle_weight=3.0), (s, t), 3.0 * fastkd.rkd_angle_loss(s, t)),
        (fastkd.SPLoss(), (s, t), fastkd.sp_loss(s, t)),
        (fastkd.SPLoss(reduction="sum"), (s, t), fastkd.sp_loss(s, t, reduction="sum")),
        (fastkd.PKTLoss(), (s, t), fastkd.pkt_loss(s, t)),
        (fastkd.PKTLoss(eps=1e-5), (s, t), fastkd.pkt_loss(s, t, 1e-5)),
        (fastkd.CCLoss(), (s, t), fastkd.cc_loss(s, t)),
        (fastkd.CCLoss("bilinear", reduction="sum"), (s, t), fastkd.cc_loss(s, t, "bilinear", reduction="sum")),
        (fastkd.ATLoss(), (m_s, m_t), fastkd.at_loss(m_s, m_t)),
        (fastkd.ATLoss(3, mode="paper"), (m_s, m_t), fastkd.at_loss(m_s, m_t, 3, mode="paper")),
        (fastkd.NSTLoss(), (m_s, m_t), fastkd.nst_loss(m_s, m_t)),
    ]
    for crit, args, expected in cases:
        out = crit(*args)
        assert isinstance(out, torch.Tensor) and out.shape == ()
        _close_loss(out, expected, repr(crit), rtol=1e-6)
    # lists in, lists out (RepDistiller's convention); the functional sums
    for crit, fn in ((fastkd.SPLoss(), fastkd.sp_loss), (fastkd.ATLoss(), fastkd.at_loss),
                     (fastkd.NSTLoss(), fastkd.nst_loss)):
        out = crit([m_s, m_s], [m_t, m_t])
        assert isinstance(out, list) and len(out) == 2 and all(o.shape == () for o in out)
        _close_loss(out[0] + out[1], fn([m_s, m_s], [m_t, m_t]), f"{type(crit).__name__} list", rtol=1e-6)
    # aliases
    assert fastkd.PKT is fastkd.PKTLoss and fastkd.Attention is fastkd.ATLoss
    assert isinstance(fastkd.Similarity(), fastkd.SPLoss)
    assert fastkd.RKDLoss().distance_weight == 25.0 and fastkd.RKDLoss().angle_weight == 50.0


def test_module_constructor_checks():
    with pytest.raises(ValueError, match="distance_weight"):
        fastkd.RKDLoss(distance_weight=-1.0)
    with pytest.raises(ValueError, match="angle_weight"):
        fastkd.RKDLoss(angle_weight=math.nan)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.SPLoss(reduction="mean")
    with pytest.raises(ValueError, match="eps"):
        fastkd.PKTLoss(eps=0.0)
    with pytest.raises(ValueError, match="kernel"):
        fastkd.CCLoss(kernel="rbf")
    with pytest.raises(ValueError, match="gamma"):
        fastkd.CCLoss(gamma=-0.4)
    with pytest.raises(TypeError, match="max_p"):
        fastkd.CCLoss(max_p=2.0)
    with pytest.raises(ValueError, match="p must"):
        fastkd.ATLoss(p=0)
    with pytest.raises(ValueError, match="mode"):
        fastkd.ATLoss(mode="both")


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def _raises_each(cases, fn):
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(*args, **kw)


def _common_feature_cases(device, s, t):
    return [
        ((s, t[:-1]), {}, ValueError, r"f_t must have the student's batch size 8"),
        ((s[0], t[0]), {}, ValueError, r"f_s must have at least 2 dimensions"),
        ((s, t[:, 0]), {}, ValueError, r"f_t must have at least 2 dimensions"),
        ((s.long(), t), {}, TypeError, r"f_s must be float32"),
        ((s, t.int()), {}, TypeError, r"f_t must be float32"),
        ((s, t.bool()), {}, TypeError, r"f_t must be float32"),
        ((s[:, :0], t), {}, ValueError, r"f_s[\s\S]*must not be empty"),
        (("x", t), {}, TypeError, r"f_s must be a torch.Tensor"),
    ]


def test_bad_input_rkd(device):
    s, t = _feat((8, 5), device), _feat((8, 3), device, seed=1)
    cases = _common_feature_cases(device, s, t) + [
        ((s, t, -1.0), {}, ValueError, r"distance_weight must be finite and >= 0, got -1.0"),
        ((s, t, math.inf), {}, ValueError, "distance_weight"),
        ((s, t, 25.0, math.nan), {}, ValueError, "angle_weight"),
        ((s, t, 25.0, "50"), {}, TypeError, "angle_weight"),
        ((s, t, torch.tensor(25.0)), {}, TypeError, "distance_weight"),
    ]
    _raises_each(cases, fastkd.rkd_loss)
    _raises_each(_common_feature_cases(device, s, t), fastkd.rkd_distance_loss)
    _raises_each(_common_feature_cases(device, s, t), fastkd.rkd_angle_loss)


def test_bad_input_sp_pkt_cc(device):
    s, t = _feat((8, 5), device), _feat((8, 3), device, seed=1)
    _raises_each([
        ((s, t), {"eps": 0.0}, ValueError, r"eps must be finite and > 0"),
        ((s, t), {"eps": math.nan}, ValueError, "eps"),
        ((s, t), {"eps": -1e-7}, ValueError, "eps"),
    ] + _common_feature_cases(device, s, t), fastkd.pkt_loss)
    _raises_each([
        ((s, t), {"kernel": "rbf"}, ValueError, r"kernel must be one of \('gaussian', 'bilinear'\)"),
        ((s, t), {"gamma": 0.0}, ValueError, "gamma"),
        ((s, t), {"gamma": math.inf}, ValueError, "gamma"),
        ((s, t), {"max_p": 0}, ValueError, r"max_p must be in \[1, 170\]"),
        ((s, t), {"max_p": True}, TypeError, "max_p"),
        ((s, t), {"max_p": 2.5}, TypeError, "max_p"),
        ((s, t), {"reduction": "mean"}, ValueError, "reduction"),
    ] + _common_feature_cases(device, s, t), fastkd.cc_loss)
    _raises_each([
        ((s, t), {"reduction": "none"}, ValueError, r"reduction must be one of \('batchmean', 'sum'\)"),
        ((s, t[:-1]), {}, ValueError, r"g_t must have the student's batch size 8"),
        ((s[0], t[0]), {}, ValueError, r"g_s must have at least 2 dimensions"),
        ((s.long(), t), {}, TypeError, r"g_s must be float32"),
        (([s, s], [t]), {}, ValueError, r"same number of layers, got 2 and 1"),
        (([], []), {}, ValueError, "at least one layer"),
        (([s], t), {}, TypeError, "both be tensors or both be lists"),
        (([s, s], [t, t[:-1]]), {}, ValueError, r"g_t\[1\] must have the student's batch size"),
        (([s, s], [t, t]), {"weights": [1.0]}, ValueError, r"weights must have one entry per layer \(2\)"),
        (([s, s], [t, t]), {"weights": [1.0, -1.0]}, ValueError, r"weights\[1\] must be finite and >= 0"),
        (([s, s], [t, t]), {"weights": [1.0, math.nan]}, ValueError, r"weights\[1\]"),
        ((s, t), {"weights": 2.0}, TypeError, "weights"),
        (("x", t), {}, TypeError, "g_s must be a tensor or a list"),
    ], fastkd.sp_loss)


def test_bad_input_at_nst(device):
    m_s, m_t = _feat((4, 3, 8, 8), device), _feat((4, 5, 8, 8), device, seed=1)
    shape_cases = [
        ((m_s, m_t[:3]), {}, ValueError, r"g_t must have the student's batch size 4"),
        ((m_s.flatten(1), m_t.flatten(1)), {}, ValueError, r"g_s must have at least 3 dimensions"),
        ((m_s, m_t[:, :, :, :4]), {}, ValueError, r"same height but different spatial shapes"),
        ((m_s[:, :, :, 0], m_t[:, :, :4, 0]), {}, ValueError, r"different spatial sizes[\s\S]*4-D"),
        ((m_s[:, :, :, :2], m_t[:, :, :4, :]), {}, ValueError, r"spatial shapes still differ"),
        ((m_s.long(), m_t), {}, TypeError, "g_s must be float32"),
        (([m_s], [m_t, m_t]), {}, ValueError, "same number of layers"),
    ]
    _raises_each(shape_cases + [
        ((m_s, m_t, 0.0), {}, ValueError, r"p must be finite and > 0"),
        ((m_s, m_t, -2), {}, ValueError, "p must"),
        ((m_s, m_t, math.nan), {}, ValueError, "p must"),
        ((m_s, m_t, "2"), {}, TypeError, "p must"),
        ((m_s, m_t), {"mode": "both"}, ValueError, r"mode must be one of \('code', 'paper'\)"),
    ], fastkd.at_loss)
    _raises_each(shape_cases, fastkd.nst_loss)


def test_bad_input_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    s, t = _feat((4, 5), "cpu"), _feat((4, 5), "cuda")
    for fn in (fastkd.rkd_loss, fastkd.pkt_loss, fastkd.cc_loss):
        with pytest.raises(ValueError, match="f_t must be on the student's device"):
            fn(s, t)
    with pytest.raises(ValueError, match="g_t must be on the student's device"):
        fastkd.sp_loss(s, t)


# --------------------------------------------------------------------------------------------------------
# torchdistill's SPKDLoss (L1 rows) and the linear FitNet regressor for flat features
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_sp_l1_matches_torchdistill_float64(device, reduction):
    from helpers import torchdistill_spkd_verbatim

    s, t = _feat((9, 3, 2), device, seed=120).double(), _feat((9, 5), device, seed=121).double()
    # torchdistill does not detach the teacher: it gets the exact gradient too
    fast, fast_gs, fast_gt = _run(lambda a, b: fastkd.sp_loss(a, b, reduction=reduction, normalize="l1"), s, t,
                                  teacher_grad=True)
    ref, ref_gs, ref_gt = _run(lambda a, b: torchdistill_spkd_verbatim(a, b, reduction), s, t, teacher_grad=True)
    assert_close(fast, ref, rtol=1e-12, atol=0, what="SP l1 value")
    assert_close(fast_gs, ref_gs, rtol=1e-12, atol=1e-15, what="SP l1 student gradient")
    assert_close(fast_gt, ref_gt, rtol=1e-12, atol=1e-15, what="SP l1 teacher gradient")
    # the two anchors differ: L2 rows (RepDistiller, the default) give another value
    l2 = fastkd.sp_loss(s, t, reduction=reduction)
    assert (l2 - fast).abs() > 1e-3 * fast.abs()
    # the drop-in module: tensors, or torchdistill's io dicts and module paths; its reductions
    crit = fastkd.SPKDLoss(reduction=reduction)
    assert_close(crit(s, t), ref, rtol=1e-12, atol=0, what="SPKDLoss")
    by_path = fastkd.SPKDLoss("layer4", "layer4", reduction)
    assert_close(by_path({"layer4": {"output": s}}, {"layer4": {"output": t}}), ref, rtol=1e-12, atol=0,
                 what="SPKDLoss io dicts")
    if reduction == "sum":
        for other in ("mean", "none"):  # torchdistill divides only for 'batchmean'
            assert_close(fastkd.SPKDLoss(reduction=other)(s, t), ref, rtol=1e-12, atol=0, what=other)
    assert_close(fastkd.SPLoss(reduction, normalize="l1")(s, t), ref, rtol=1e-12, atol=0, what="SPLoss l1")
    assert_close(R.sp_loss(s, t, reduction=reduction, normalize="l1"), ref, rtol=1e-12, atol=0, what="reference")


def test_sp_l1_float32_and_bad_input(device):
    from helpers import torchdistill_spkd_verbatim

    s, t = _feat((12, 7), device, seed=122), _feat((12, 4), device, seed=123)
    fast = fastkd.sp_loss([s, s], [t, t], weights=[1.0, 0.5], normalize="l1")
    ref = 1.5 * torchdistill_spkd_verbatim(s.double(), t.double())
    assert_close(fast, ref, rtol=1e-5, atol=0, what="SP l1 float32")
    with pytest.raises(ValueError, match=r"normalize must be one of \('l2', 'l1'\)"):
        fastkd.sp_loss(s, t, normalize="torchdistill")
    with pytest.raises(TypeError, match="normalize must be a str"):
        fastkd.SPLoss(normalize=1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastkd.SPKDLoss(reduction="avg")
    with pytest.raises(ValueError, match="given together"):
        fastkd.SPKDLoss("layer4")
    with pytest.raises(TypeError, match="student_output_path must be a str"):
        fastkd.SPKDLoss(3, "layer4")


@pytest.mark.parametrize("shapes", [(16, 256), ((128, 16), (128, 256)), ((4, 6, 16), (4, 6, 24))])
def test_hint_loss_linear_regressor_matches_eager(device, shapes):
    s_shape, t_shape = shapes
    crit = fastkd.HintLoss(s_shape, t_shape).to(device).double()
    assert isinstance(crit.regressor, fastkd.LinearReg) and not crit.regressor.use_relu
    s_dim = s_shape if isinstance(s_shape, int) else s_shape[-1]
    t_dim = t_shape if isinstance(t_shape, int) else t_shape[-1]
    lead = (10,) if isinstance(s_shape, int) or len(s_shape) == 2 else tuple(s_shape[:-1])
    f_s = _feat(lead + (s_dim,), device, seed=130).double().requires_grad_(True)
    f_t = _feat(lead + (t_dim,), device, seed=131).double()
    eager = torch.nn.Linear(s_dim, t_dim).to(device).double()
    eager.load_state_dict(crit.regressor.linear.state_dict())
    loss = crit(f_s, f_t)
    loss.backward()
    f_s2 = f_s.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.mse_loss(eager(f_s2), f_t)
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, atol=0, what="hint value")
    assert_close(f_s.grad, f_s2.grad, rtol=1e-12, atol=1e-16, what="hint input gradient")
    assert_close(crit.regressor.linear.weight.grad, eager.weight.grad, rtol=1e-12, atol=1e-16, what="weight grad")
    assert_close(crit.regressor.linear.bias.grad, eager.bias.grad, rtol=1e-12, atol=1e-16, what="bias grad")
    # use_relu=True ends with a ReLU; equal widths: no regressor unless "always"
    relu = fastkd.HintLoss(16, 8, use_relu=True)
    assert relu.regressor.use_relu
    x = torch.randn(5, 16, dtype=relu.regressor.linear.weight.dtype)
    assert torch.equal(relu.regressor(x), torch.relu(relu.regressor.linear(x)))
    assert fastkd.HintLoss(16, 16).regressor is None
    assert isinstance(fastkd.HintLoss(16, 16, regressor="always").regressor, fastkd.LinearReg)


def test_hint_loss_shape_checks():
    cases = [
        (lambda: fastkd.HintLoss(16, (2, 8, 4, 4)), ValueError, "both be feature maps"),
        (lambda: fastkd.HintLoss((4, 6, 16), (4, 5, 24)), ValueError, "only in the last"),
        (lambda: fastkd.HintLoss(0, 8), ValueError, "student_shape must be >= 1"),
        (lambda: fastkd.HintLoss(16.0, 8), TypeError, "student_shape must be a shape"),
        (lambda: fastkd.HintLoss(True, 8), TypeError, "student_shape must be a shape"),
        (lambda: fastkd.HintLoss((2, 16.5), (2, 8)), TypeError, "student_shape must be a shape of ints"),
        (lambda: fastkd.HintLoss((2,), (2, 8)), ValueError, "student_shape must be an int width"),
        (lambda: fastkd.HintLoss(16, 8, use_relu="no"), TypeError, "use_relu must be a bool"),
        (lambda: fastkd.ConvReg((2, 3, 8, 8), (2, 4, 4, 4), use_relu=1), TypeError, "use_relu must be a bool"),
        (lambda: fastkd.ConvReg("abcd", (2, 4, 4, 4)), TypeError, "s_shape must be a shape"),
        (lambda: fastkd.LinearReg(16, 0), ValueError, "t_dim must be >= 1"),
        (lambda: fastkd.LinearReg(16, 8, bias="yes"), TypeError, "bias must be a bool"),
        (lambda: fastkd.HintLoss(16, None), ValueError, "given together"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
