"""fastkd.kd_loss / KDLoss / DistillKL: values and gradients against a float64 oracle, anchors' formulas,
gradcheck, opcheck, torch.compile, determinism, dtypes, odd shapes, extreme values and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import assert_close, oracle_kd, repdistiller_distill_kl, value_and_grads

import fastkd
from fastkd import _ops_loader

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def _logits(shape, device, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (3, 7), (5, 33), (64, 100), (17, 1000), (4, 9, 50), (2, 3, 5, 16), (41, 50257), (2, 262144)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_float64_oracle(device, shape, temperature):
    s, t = _logits(shape, device, seed=1), _logits(shape, device, seed=2)
    for reduction in REDUCTIONS:
        go = None if reduction != "none" else torch.rand(shape[:-1], dtype=torch.float64, device=device)
        loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, temperature, reduction=reduction, grad_out=go)
        ref, (gs_ref,) = value_and_grads(oracle_kd, s, t, temperature, reduction=reduction, grad_out=go)
        assert loss.dtype == torch.float32 and gs.dtype == torch.float32
        assert loss.shape == ref.shape
        assert_close(loss, ref, rtol=2e-5, atol=1e-6, what=f"loss {reduction}")
        scale = gs_ref.abs().max().item()
        assert_close(gs, gs_ref, rtol=1e-4, atol=1e-5 * scale + 1e-12, what=f"grad {reduction}")


@pytest.mark.parametrize("scale_by_temperature", [True, False])
def test_teacher_gradient(device, scale_by_temperature):
    # Mutual / online distillation: the teacher requires grad, and its gradient must be exact too.
    s, t = _logits((13, 301), device, seed=3), _logits((13, 301), device, seed=4).requires_grad_(True)
    kw = dict(reduction="batchmean", scale_by_temperature=scale_by_temperature)
    loss, (gs, gt) = value_and_grads(fastkd.kd_loss, s, t, 2.5, **kw)
    ref, (gs_ref, gt_ref) = value_and_grads(oracle_kd, s, t, 2.5, **kw)
    assert_close(loss, ref, rtol=2e-5, atol=1e-6, what="loss")
    assert_close(gs, gs_ref, rtol=1e-4, atol=1e-7, what="student grad")
    assert_close(gt, gt_ref, rtol=1e-4, atol=1e-7, what="teacher grad")


def test_teacher_without_grad_gets_none(device):
    s = _logits((4, 10), device).requires_grad_(True)
    t = _logits((4, 10), device, seed=5)
    fastkd.kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_upstream_gradient_scales(device):
    # loss * w and per-row upstream gradients go through the in-place scaling op.
    s, t = _logits((6, 40), device), _logits((6, 40), device, seed=7)
    for w in (0.0, 0.37, -2.0):
        sg = s.clone().requires_grad_(True)
        (fastkd.kd_loss(sg, t, 3.0) * w).backward()
        sr = s.double().requires_grad_(True)
        (oracle_kd(sr, t, 3.0) * w).backward()
        assert_close(sg.grad, sr.grad, rtol=1e-4, atol=1e-7, what=f"w={w}")


def test_labels_mask_rows(device):
    s, t = _logits((3, 8, 50), device), _logits((3, 8, 50), device, seed=8)
    labels = torch.randint(0, 50, (3, 8), device=device)
    labels[0, :5] = -100
    labels[2, 7] = -100
    for reduction in REDUCTIONS:
        loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, 2.0, reduction=reduction, labels=labels)
        ref, (gs_ref,) = value_and_grads(oracle_kd, s, t, 2.0, reduction=reduction, labels=labels)
        assert_close(loss, ref, rtol=2e-5, atol=1e-6, what=reduction)
        assert_close(gs, gs_ref, rtol=1e-4, atol=1e-7, what=reduction)
        masked = labels == -100
        assert torch.all(gs[masked] == 0)
    # batchmean divides by the number of counted rows
    per_row = fastkd.kd_loss(s, t, 2.0, reduction="none", labels=labels)
    expected = per_row.sum() / (labels != -100).sum()
    assert_close(fastkd.kd_loss(s, t, 2.0, labels=labels), expected, rtol=1e-6, atol=0, what="batchmean")


def test_custom_ignore_index_and_int32_labels(device):
    s, t = _logits((10, 20), device), _logits((10, 20), device, seed=9)
    labels = torch.arange(10, device=device, dtype=torch.int32)
    loss = fastkd.kd_loss(s, t, 1.0, labels=labels, ignore_index=3)
    ref = oracle_kd(s, t, 1.0, labels=labels.long(), ignore_index=3)
    assert_close(loss, ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(device, reduction):
    s, t = _logits((4, 30), device), _logits((4, 30), device, seed=10)
    labels = torch.full((4,), -100, device=device)
    loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, 2.0, reduction=reduction, labels=labels)
    assert torch.all(loss == 0)
    assert torch.all(gs == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_rows(device, reduction):
    s = torch.empty(0, 17, device=device, requires_grad=True)
    t = torch.empty(0, 17, device=device)
    loss = fastkd.kd_loss(s, t, 2.0, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and loss.item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 17)
    s3 = torch.empty(2, 0, 5, device=device)
    assert fastkd.kd_loss(s3, s3.clone(), reduction="none").shape == (2, 0)


def test_one_dimensional_input_is_one_row(device):
    s, t = _logits((30,), device), _logits((30,), device, seed=11)
    assert fastkd.kd_loss(s, t, reduction="none").shape == ()
    assert_close(fastkd.kd_loss(s, t), oracle_kd(s, t, 1.0), rtol=2e-5, atol=1e-7)


def test_non_contiguous_inputs(device):
    base_s, base_t = _logits((8, 64), device), _logits((64, 8), device, seed=12)
    s = base_s[::2, 5:50]  # row-strided view
    t = base_t.t()[::2, 5:50]  # column-major view (non-unit vocab stride)
    assert not s.is_contiguous() and t.stride(-1) != 1
    loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, 2.0)
    ref, (gs_ref,) = value_and_grads(oracle_kd, s, t, 2.0)
    assert_close(loss, ref, rtol=2e-5, atol=1e-7)
    assert_close(gs, gs_ref, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------------
# extreme values
# --------------------------------------------------------------------------------------------------------
def test_extreme_logits(device):
    s = _logits((16, 500), device, scale=1e4, seed=13)
    t = _logits((16, 500), device, scale=1e4, seed=14)
    for temperature in (1.0, 4.0):
        loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, temperature)
        ref, (gs_ref,) = value_and_grads(oracle_kd, s, t, temperature)
        assert torch.isfinite(loss) and torch.isfinite(gs).all()
        assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        assert_close(gs, gs_ref, rtol=1e-4, atol=1e-6)


def test_shifted_logits_give_zero_loss(device):
    # Softmax is shift-invariant: a student equal to the teacher plus a huge constant has KL 0 exactly.
    t = _logits((8, 300), device, seed=15)
    s = t + 5000.0
    loss = fastkd.kd_loss(s, t, 2.0)
    assert abs(loss.item()) < 1e-6


def test_masked_minus_inf_entries_are_finite(device):
    s, t = _logits((6, 100), device, seed=16), _logits((6, 100), device, seed=17)
    mask = torch.rand(6, 100, generator=torch.Generator().manual_seed(0)) < 0.3
    mask = mask.to(device)
    s = s.masked_fill(mask, -math.inf)
    t = t.masked_fill(mask, -math.inf)
    loss, (gs,) = value_and_grads(fastkd.kd_loss, s, t, 2.0)
    ref, (gs_ref,) = value_and_grads(oracle_kd, s, t, 2.0)
    assert torch.isfinite(loss) and torch.isfinite(gs).all()
    assert torch.all(gs[mask] == 0)
    assert_close(loss, ref, rtol=2e-5, atol=1e-7)
    assert_close(gs, gs_ref, rtol=1e-4, atol=1e-7)


def test_teacher_only_minus_inf_is_finite_student_only_is_inf(device):
    s, t = _logits((2, 10), device), _logits((2, 10), device, seed=18)
    t_masked = t.clone()
    t_masked[:, 3] = -math.inf  # teacher gives no mass: fine
    assert torch.isfinite(fastkd.kd_loss(s, t_masked))
    assert_close(fastkd.kd_loss(s, t_masked), oracle_kd(s, t_masked, 1.0), rtol=2e-5, atol=1e-7)
    s_masked = s.clone()
    s_masked[:, 3] = -math.inf  # student gives no mass where the teacher has some: KL is +inf
    assert fastkd.kd_loss(s_masked, t).item() == math.inf
    assert oracle_kd(s_masked, t, 1.0).item() == math.inf


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_propagate(device, bad):
    s, t = _logits((3, 20), device), _logits((3, 20), device, seed=19)
    s[1, 4] = bad
    per_row = fastkd.kd_loss(s, t, reduction="none")
    assert torch.isnan(per_row[1])
    assert torch.isfinite(per_row[0]) and torch.isfinite(per_row[2])
    assert torch.isnan(fastkd.kd_loss(s, t))
    t2 = t.clone()
    t2[2, 0] = math.nan
    assert torch.isnan(fastkd.kd_loss(_logits((3, 20), device), t2, reduction="none")[2])


# --------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_2x_of_eager(device, dtype):
    s64, t64 = _logits((64, 2000), device, torch.float64, seed=20), _logits((64, 2000), device, torch.float64, seed=21)
    s, t = s64.to(dtype), t64.to(dtype)
    # The oracle sees the same rounded inputs: only the computation's error is measured.
    ref, (g_ref,) = value_and_grads(oracle_kd, s, t, 2.0)
    loss, (g,) = value_and_grads(fastkd.kd_loss, s, t, 2.0)
    eager, (g_eager,) = value_and_grads(repdistiller_distill_kl, s, t, 2.0)  # eager, in the input dtype
    assert loss.dtype == dtype and g.dtype == dtype
    err = (loss.double() - ref).abs().item()
    err_eager = (eager.double() - ref).abs().item()
    # the loss is rounded to `dtype` once; half an ulp of it is the least any implementation can do
    half_ulp = 0.5 * torch.finfo(dtype).eps * abs(ref.item())
    assert err <= max(2 * err_eager, half_ulp), (err, err_eager)
    gerr = (g.double() - g_ref).abs().max().item()
    gerr_eager = (g_eager.double() - g_ref).abs().max().item()
    assert gerr <= 2 * gerr_eager, (gerr, gerr_eager)


@pytest.mark.parametrize(
    "s_dtype,t_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
     (torch.float64, torch.float32), (torch.float32, torch.float64)],
)
def test_mixed_dtypes(device, s_dtype, t_dtype):
    s, t = _logits((9, 77), device, s_dtype, seed=22), _logits((9, 77), device, t_dtype, seed=23)
    t.requires_grad_(True)
    loss, (gs, gt) = value_and_grads(fastkd.kd_loss, s, t, 2.0)
    ref, (gs_ref, gt_ref) = value_and_grads(oracle_kd, s, t, 2.0)
    assert loss.dtype == torch.promote_types(s_dtype, t_dtype)
    assert gs.dtype == s_dtype and gt.dtype == t_dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    rtol = max(tol[s_dtype], tol[t_dtype], tol[loss.dtype])
    assert_close(loss, ref, rtol=rtol, atol=rtol * 1e-2)
    assert_close(gs, gs_ref, rtol=tol[s_dtype] * 10, atol=tol[s_dtype] * gs_ref.abs().max().item())
    assert_close(gt, gt_ref, rtol=tol[t_dtype] * 10, atol=tol[t_dtype] * gt_ref.abs().max().item())


# --------------------------------------------------------------------------------------------------------
# autograd machinery: gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, reduction):
    s = _logits((3, 7), device, torch.float64, seed=24).requires_grad_(True)
    t = _logits((3, 7), device, torch.float64, seed=25).requires_grad_(True)
    labels = torch.tensor([1, -100, 2], device=device)
    f = lambda a, b: fastkd.kd_loss(a, b, 1.7, reduction=reduction, labels=labels)  # noqa: E731
    assert torch.autograd.gradcheck(f, (s, t))
    g = lambda a, b: fastkd.kd_loss(a, b, 0.6, reduction=reduction, scale_by_temperature=False)  # noqa: E731
    assert torch.autograd.gradcheck(g, (s, t))


def _opcheck_samples(device):
    s = _logits((5, 33), device, seed=26)
    t = _logits((5, 33), device, seed=27)
    labels = torch.tensor([0, -100, 4, 1, 2], device=device)
    for args in [
        (s.clone().requires_grad_(True), t, None, 4.0, -100, "batchmean", True, True, False),
        (s.clone().requires_grad_(True), t.clone().requires_grad_(True), labels, 2.0, -100, "none", False, True, True),
        (s, t, labels, 1.0, -100, "mean", True, False, False),
        (s.double().requires_grad_(True), t.bfloat16(), None, 3.0, -100, "sum", True, True, False),
    ]:
        yield _kd_op_args(*args)


def _kd_op_args(s, t, labels, temperature, ignore_index, reduction, scale, grad_s, grad_t):
    """Arguments of torch.ops.fastkd.response_forward for plain Hinton KD."""
    return (s, t, labels, None, "kl", [], temperature, 1.0, 0.0, ignore_index, reduction, scale, grad_s, grad_t)


def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.fastkd.response_forward, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    s, t = _logits((8, 3, 40), device, seed=28), _logits((8, 3, 40), device, seed=29)
    labels = torch.randint(0, 40, (8, 3), device=device)
    labels[0] = -100

    def step(student, teacher, labels):
        return fastkd.kd_loss(student, teacher, 2.0, labels=labels) * 0.5

    compiled = torch.compile(step, fullgraph=True)
    sc = s.clone().requires_grad_(True)
    se = s.clone().requires_grad_(True)
    loss_c = compiled(sc, t, labels)
    loss_c.backward()
    loss_e = step(se, t, labels)
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    assert_close(sc.grad, se.grad, rtol=1e-6, atol=1e-9)
    m = torch.compile(fastkd.KDLoss(temperature=3.0, reduction="none"), fullgraph=True)
    assert_close(m(s, t), fastkd.kd_loss(s, t, 3.0, reduction="none"), rtol=1e-6, atol=0)


def test_backward_through_retained_graph(device):
    # The saved gradient is never modified, so repeated backward passes (weighted or not) stay exact.
    s = _logits((4, 12), device).requires_grad_(True)
    t = _logits((4, 12), device, seed=30)
    loss = fastkd.kd_loss(s, t, 2.0)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (g1_again,) = torch.autograd.grad(loss, s)
    assert_close(g3, 3 * g1, rtol=1e-6, atol=0)
    assert torch.equal(g1_again, g1)
    ref = oracle_kd(s, t, 2.0)
    assert_close(g1, torch.autograd.grad(ref, s)[0], rtol=1e-4, atol=1e-8)


def test_no_grad_mode_computes_no_gradient(device):
    s = _logits((4, 12), device).requires_grad_(True)
    with torch.no_grad():
        loss = fastkd.kd_loss(s, _logits((4, 12), device, seed=31))
    assert not loss.requires_grad


# --------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------
def test_deterministic_across_runs_and_threads(device):
    s, t = _logits((300, 3001), device, seed=32), _logits((300, 3001), device, seed=33)
    labels = torch.randint(-1, 5, (300,), device=device)

    def run():
        loss, (g,) = value_and_grads(fastkd.kd_loss, s, t, 2.0, labels=labels, ignore_index=-1)
        return loss, g

    threads = torch.get_num_threads()
    try:
        results = [run(), run()]
        torch.set_num_threads(1)
        results.append(run())
        torch.set_num_threads(max(2, threads))
        results.append(run())
    finally:
        torch.set_num_threads(threads)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(g, results[0][1])


# --------------------------------------------------------------------------------------------------------
# modules and anchors
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_distill_kl_matches_repdistiller(device, T):
    y_s, y_t = _logits((64, 100), device, seed=34), _logits((64, 100), device, seed=35)
    ours, (g,) = value_and_grads(fastkd.DistillKL(T), y_s, y_t)
    theirs, (g_ref,) = value_and_grads(repdistiller_distill_kl, y_s, y_t, T)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert_close(g, g_ref, rtol=1e-4, atol=1e-8)


def test_kdloss_module(device):
    crit = fastkd.KDLoss(temperature=2.0, reduction="sum", ignore_index=7)
    assert "temperature=2.0" in repr(crit) and "'sum'" in repr(crit)
    s, t = _logits((4, 5, 30), device), _logits((4, 5, 30), device, seed=36)
    labels = torch.randint(0, 10, (4, 5), device=device)
    assert_close(crit(s, t, labels), oracle_kd(s, t, 2.0, reduction="sum", labels=labels, ignore_index=7),
                 rtol=2e-5, atol=1e-6)
    assert fastkd.KDLoss().temperature == 4.0
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.KDLoss(reduction="avg")


def test_reference_fallback_warns_and_matches(device, monkeypatch):
    from fastkd import _ops_loader, functional

    s, t = _logits((5, 20), device), _logits((5, 20), device, seed=37)
    expected = fastkd.kd_loss(s, t, 2.0)
    monkeypatch.setattr(_ops_loader, "LOADED", False)
    monkeypatch.setattr(functional, "_warned", False)
    with pytest.warns(RuntimeWarning, match="reference"):
        got = fastkd.kd_loss(s, t, 2.0)
    assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_build_info():
    info = fastkd.build_info()
    assert info["compiled"] and info["load_error"] is None
    # the best library compiled that ATen's capability allows (a build for this machine may hold one)
    assert info["cpu_isa"] == [isa for isa in _ops_loader._runnable_isas() if isa in info["cpu_isas_compiled"]][0]
    assert info["num_threads"] >= 1
    assert isinstance(info["cuda"], bool)
    if torch.cuda.is_available():
        assert info["cuda"], "a GPU is present but fastkd was built without CUDA kernels"


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def test_bad_input_messages(device):
    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=38)
    cases = [
        ((s, t[:, :9]), {}, ValueError, "teacher_logits must have the student's shape"),
        ((s, t[:3]), {}, ValueError, "teacher_logits must have the student's shape"),
        ((s, t.reshape(2, 2, 10)), {}, ValueError, "shape"),
        ((s, t.to("meta")), {}, ValueError, "device"),
        ((s.long(), t), {}, TypeError, "student_logits must be float32"),
        ((s, t.to(torch.complex64)), {}, TypeError, "teacher_logits must be float32"),
        ((s, t.int()), {}, TypeError, "teacher_logits"),
        ((torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "0-dim"),
        ((s[:, :0], t[:, :0]), {}, ValueError, "vocabulary"),
        ((s, t, 0.0), {}, ValueError, "temperature"),
        ((s, t, -1.0), {}, ValueError, "temperature"),
        ((s, t, math.nan), {}, ValueError, "temperature"),
        ((s, t, math.inf), {}, ValueError, "temperature"),
        ((s, t, "hot"), {}, TypeError, "temperature"),
        ((s, t, torch.tensor([2.0, 3.0], device=device)), {}, ValueError, "leading shape"),  # a tensor T: 0-dim or per row
        ((s, t, torch.tensor(2, device=device)), {}, TypeError, "floating-point tensor"),
        ((s, t), {"reduction": "avg"}, ValueError, "reduction"),
        ((s, t), {"labels": torch.zeros(5, dtype=torch.long, device=device)}, ValueError, "labels must have shape"),
        ((s, t), {"labels": torch.zeros(4, 1, dtype=torch.long, device=device)}, ValueError, "labels must have"),
        ((s, t), {"labels": torch.zeros(4, device=device)}, TypeError, "labels must be an integer"),
        ((s, t), {"labels": torch.zeros(4, dtype=torch.bool, device=device)}, TypeError, "labels must be an integer"),
        ((s, t), {"labels": torch.zeros(4, dtype=torch.long, device="meta")}, ValueError, "labels must be on"),
        ((s, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        (("x", t), {}, TypeError, "student_logits must be a torch.Tensor"),
    ]
    s_before, t_before = s.clone(), t.clone()
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastkd.kd_loss(*args, **kw)
    assert torch.equal(s, s_before) and torch.equal(t, t_before)  # nothing corrupted


def test_raw_op_checks_name_the_argument(device):
    def op(*args):
        return torch.ops.fastkd.response_forward(*_kd_op_args(*args))

    s, t = _logits((4, 10), device), _logits((4, 10), device, seed=39)
    with pytest.raises(RuntimeError, match="argument 'student_logits'"):
        op(s.reshape(-1), t.reshape(-1), None, 1.0, -100, "batchmean", True, False, False)
    with pytest.raises(RuntimeError, match="argument 'teacher_logits'"):
        op(s, t[:, :5], None, 1.0, -100, "batchmean", True, False, False)
    with pytest.raises(RuntimeError, match="argument 'temperature'"):
        op(s, t, None, 0.0, -100, "batchmean", True, False, False)
    with pytest.raises(RuntimeError, match="argument 'reduction'"):
        op(s, t, None, 1.0, -100, "avg", True, False, False)
    with pytest.raises(RuntimeError, match="argument 'labels'"):
        op(s, t, torch.zeros(3, dtype=torch.long, device=device), 1.0, -100, "batchmean", True, False, False)
    with pytest.raises(RuntimeError, match="argument 'student_logits'"):
        op(s.int(), t, None, 1.0, -100, "batchmean", True, False, False)


def test_warning_free_happy_path(device):
    s, t = _logits((4, 10), device).requires_grad_(True), _logits((4, 10), device, seed=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastkd.kd_loss(s, t, 2.0).backward()
