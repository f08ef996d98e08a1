"""Per-row options of every response loss: temperature as a tensor (0-dim or one per row, with its exact
gradient), token_weights and logit standardization (fused, csrc/include/fastkd/row_options.h).

Oracles: fastkd.reference (plain PyTorch autograd, float64) and the anchors' own formulations written out here
(torchdistill's LogitStdKDLoss called directly; CTKD's learnable temperature as autograd sees it)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastkd
from fastkd import reference as R
from fastkd.divergences import REGISTRY

# every registered divergence with its first test parameters (the list lives in fastkd/divergences.py)
CASES = [(name, dict(spec.test_params[0]) if spec.test_params else {}) for name, spec in REGISTRY.items()]


def _logits(shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _call(impl, name, s, t, T, params, **kw):
    labels = kw.pop("labels", None)
    if name == "dkd" and labels is None:
        labels = torch.arange(s.shape[:-1].numel()).reshape(s.shape[:-1]) % s.shape[-1]
    return impl.divergence_loss(s, t, name, T, labels=labels, **params, **kw)


def _grads(fn, s, t, T, teacher_grad=True):
    """The loss and its gradients; without the teacher's (teacher_grad=False) the kernels take their
    student-only path, which parks the exponentials in the gradient row."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    T = T.detach().clone().requires_grad_(True) if isinstance(T, torch.Tensor) else T
    loss = fn(s, t, T)
    inputs = (s,) + ((t,) if teacher_grad else ()) + ((T,) if isinstance(T, torch.Tensor) else ())
    # reduction "none": a fixed non-uniform upstream gradient per row
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape) if loss.dim() else torch.ones_like(loss)
    return (loss.detach(),) + torch.autograd.grad(loss, inputs, go)


def _assert_all_close(got, want, rtol, atol, what):
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{k}]: {m}")


@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("temperature", ["scalar", "row"])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum", "mean"])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "student-only"])
def test_values_and_every_gradient_match_float64_autograd(name, params, temperature, standardize, reduction,
                                                          teacher_grad):
    """Value and the gradients of student, teacher (or the student alone) and temperature (0-dim and per row),
    weighted rows with an ignored one, against plain-PyTorch autograd in float64. The labels (DKD's class
    targets) include the first and the last class (a vector tail)."""
    s, t = _logits((3, 4, 19), 1), _logits((3, 4, 19), 2)
    T = torch.tensor(1.7, dtype=torch.float64) if temperature == "scalar" else 0.5 + torch.rand(3, 4, dtype=torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64)
    labels = torch.arange(12).reshape(3, 4) * 7 % 19  # 0, 7, 14, 2, ..., 18, 6, 13, 1
    labels[1, 2] = -100
    kw = dict(token_weights=w, standardize=standardize, labels=labels, reduction=reduction)
    got = _grads(lambda a, b, c: _call(fastkd, name, a, b, c, params, **dict(kw)), s, t, T, teacher_grad)
    want = _grads(lambda a, b, c: _call(R, name, a, b, c, params, **dict(kw)), s, t, T, teacher_grad)
    _assert_all_close(got, want, 1e-10, 1e-12, f"{name} T={temperature} std={standardize} {reduction}")


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher-grad", "student-only"])
def test_dkd_row_options(standardize, teacher_grad):
    """dkd_loss / DKDLoss: per-row learnable temperatures, token weights and standardization, value and every
    gradient against float64 autograd of the reference (targets at the first and last class, an ignored row)."""
    s, t = _logits((6, 11), 3), _logits((6, 11), 4)
    y = torch.tensor([0, 3, 10, -100, 5, 1])
    T = 1.0 + torch.rand(6, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    kw = dict(token_weights=w, standardize=standardize)
    got = _grads(lambda a, b, c: fastkd.dkd_loss(a, b, y, 1.0, 8.0, c, **kw), s, t, T, teacher_grad)
    want = _grads(lambda a, b, c: R.dkd_loss(a, b, y, 1.0, 8.0, c, **kw), s, t, T, teacher_grad)
    _assert_all_close(got, want, 1e-10, 1e-12, f"dkd std={standardize}")
    # the module, with mdistiller's warmup and a 0-dim learnable temperature through the functional form
    crit = fastkd.DKDLoss(alpha=0.5, beta=6.0, temperature=2.5, warmup=20, standardize=standardize)
    got = _grads(lambda a, b, c: crit(a, b, y, epoch=5), s, t, 1.0, teacher_grad)
    want = _grads(lambda a, b, c: R.dkd_loss(a, b, y, 0.125, 1.5, 2.5, standardize=standardize), s, t, 1.0,
                  teacher_grad)
    _assert_all_close(got, want, 1e-10, 1e-12, f"DKDLoss std={standardize}")
    assert ("standardize=True" in repr(crit)) == standardize
    T0 = torch.tensor(3.0, dtype=torch.float64)
    got = _grads(lambda a, b, c: fastkd.dkd_loss(a, b, y, 2.0, 1.0, c, standardize=standardize,
                                                 reduction="none"), s, t, T0, teacher_grad)
    want = _grads(lambda a, b, c: R.dkd_loss(a, b, y, 2.0, 1.0, c, standardize=standardize, reduction="none"),
                  s, t, T0, teacher_grad)
    _assert_all_close(got, want, 1e-10, 1e-12, f"dkd 0-dim T std={standardize}")


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 6.0, 1.0)])
def test_dkd_standardized_matches_mdistiller(alpha, beta, temperature):
    """LSKD on DKD: mdistiller's dkd_loss (as written, -1000 masking) on torchdistill-standardized logits, with a
    float64 temperature tensor: value and the student's gradient (float64 autograd through the eager composition),
    and mdistiller's own float32 run to float32 accuracy. (mdistiller's composition has no finite gradient for the
    teacher or a learnable temperature: its kl_div differentiates log 0 at the target's -1000 entry; those
    gradients are checked against the reference above and by gradcheck.)"""
    from fastkd.bench.anchors import mdistiller_dkd

    s, t = _logits((64, 100), 50), _logits((64, 100), 51)
    y = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(52))
    T = torch.tensor(temperature, dtype=torch.float64)
    got = _grads(lambda a, b, c: fastkd.dkd_loss(a, b, y, alpha, beta, c, standardize=True), s, t, T, False)
    want = _grads(lambda a, b, c: mdistiller_dkd(R.standardized(a), R.standardized(b), y, alpha, beta, c), s, t, T,
                  False)
    _assert_all_close(got[:2], want[:2], 1e-9, 1e-12, "dkd vs mdistiller on standardized logits")
    s32, t32 = s.float(), t.float()
    ours = fastkd.dkd_loss(s32, t32, y, alpha, beta, temperature, standardize=True)
    theirs = mdistiller_dkd(R.standardized(s32), R.standardized(t32), y, alpha, beta, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_dkd_masked_entries_and_nan():
    """DKD: -inf at the same non-target entries of both sides contributes nothing to the value, the gradients and
    the temperature's; a NaN logit makes its row's loss and temperature gradient NaN."""
    s, t = _logits((4, 9), 53), _logits((4, 9), 54)
    s[:, 3] = t[:, 3] = -math.inf
    y = torch.tensor([0, 8, 4, 2])
    T = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    got = _grads(lambda a, b, c: fastkd.dkd_loss(a, b, y, 1.0, 8.0, c), s, t, T)
    keep = [0, 1, 2, 4, 5, 6, 7, 8]
    want = _grads(lambda a, b, c: R.dkd_loss(a, b, y - (y > 3).long(), 1.0, 8.0, c), s[:, keep], t[:, keep], T)
    _assert_all_close([got[0], got[1][:, keep], got[2][:, keep], got[3]], want, 1e-12, 1e-14, "dkd masked")
    assert torch.all(got[1][:, 3] == 0) and torch.all(got[2][:, 3] == 0)
    s[2, 5] = math.nan
    bad = _grads(lambda a, b, c: fastkd.dkd_loss(a, b, y, 1.0, 8.0, c, reduction="none"), s, t, T)
    assert torch.isnan(bad[0][2]) and torch.isnan(bad[3][2]) and torch.isfinite(bad[0][[0, 1, 3]]).all()
    assert torch.isfinite(bad[3][[0, 1, 3]]).all()


def test_ctkd_learnable_temperature_is_autograd_exact():
    """CTKD (AAAI 2023): a temperature learned through a gradient-reversal layer the user owns. fastkd's gradient
    of the temperature parameter equals autograd's through the eager composition, T^2 factor included."""

    class Reverse(torch.autograd.Function):  # the user's gradient-reversal layer
        @staticmethod
        def forward(ctx, x, lam):
            ctx.lam = lam
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -ctx.lam * g, None

    s, t = _logits((8, 33), 5), _logits((8, 33), 6)
    raw = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def temperature():
        return 1.0 + 19.0 * torch.sigmoid(Reverse.apply(raw, 0.7))  # CTKD's T in [1, 21]

    fastkd.kd_loss(s, t, temperature()).backward()
    g_fast, raw.grad = raw.grad.clone(), None
    T = temperature()
    lq, lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    (T * T * (lp.exp() * (lp - lq)).sum(-1).mean()).backward()
    torch.testing.assert_close(g_fast, raw.grad, rtol=1e-10, atol=1e-15)


def test_logit_std_kd_loss_anchor():
    """torchdistill's LogitStdKDLoss, called as it is: the bare branch (KLDivLoss of the standardized softmaxes,
    no T^2) and the mixed branch (alpha * CE on the raw logits + beta * T^2 * KL), value and student gradient."""
    from torchdistill.losses.mid_level import LogitStdKDLoss

    s, t = _logits((16, 100), 7, dtype=torch.float32), _logits((16, 100), 8, dtype=torch.float32)
    y = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(9))
    # (torchdistill's constructor computes 1 - alpha when beta is None: alpha None needs a beta, unused then)
    for alpha, beta, T in [(None, 1.0, 2.0), (0.5, 9.0, 2.0), (0.1, None, 4.0)]:
        anchor = LogitStdKDLoss(".", "output", ".", "output", temperature=T, alpha=alpha, beta=beta)
        s1 = s.clone().requires_grad_(True)
        ref = anchor({".": {"output": s1}}, {".": {"output": t}}, y if alpha else None)
        (g_ref,) = torch.autograd.grad(ref, s1)
        s2 = s.clone().requires_grad_(True)
        if alpha is None:
            got = fastkd.kd_loss(s2, t, T, standardize=True, scale_by_temperature=False)
        else:
            got = fastkd.kd_loss(s2, t, T, standardize=True, labels=y, alpha=alpha, beta=anchor.beta)
        (g_got,) = torch.autograd.grad(got, s2)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_is_close_to_float64(dtype):
    """float32 / bf16 inputs compute in float32: value and gradients within float32 accuracy of float64 on the
    same (rounded) logits; bf16 results are rounded to bf16 once (their floor: 2**-8 relative)."""
    tol = 2e-4 if dtype == torch.float32 else 2.0**-7
    s64, t64 = _logits((32, 257), 10), _logits((32, 257), 11)
    s, t = s64.to(dtype), t64.to(dtype)
    T = 0.5 + torch.rand(32, dtype=torch.float64)
    w = torch.rand(32, dtype=torch.float64)
    y = torch.arange(32) * 13 % 257
    for standardize, teacher_grad, dkd in itertools.product((False, True), (True, False), (False, True)):
        if dkd:
            fn = lambda a, b, c: fastkd.dkd_loss(a, b, y, 1.0, 8.0, c, token_weights=w.to(a.dtype),  # noqa: E731
                                                 standardize=standardize)
        else:
            fn = lambda a, b, c: fastkd.kd_loss(a, b, c, token_weights=w.to(a.dtype), standardize=standardize)  # noqa: E731
        got = _grads(fn, s, t, T.float(), teacher_grad)
        want = _grads(fn, s.double(), t.double(), T, teacher_grad)
        _assert_all_close(got[:1], want[:1], tol, 1e-6, f"{dtype} std={standardize} dkd={dkd} value")
        for k in range(1, len(got) - 1):  # student (and teacher) gradients, relative to their largest entry
            torch.testing.assert_close(got[k].double(), want[k], rtol=0, atol=tol * want[k].abs().max().item())
        torch.testing.assert_close(got[-1].double(), want[-1], rtol=10 * tol, atol=1e-6)


def test_token_weights_keep_the_divisor_and_get_no_gradient():
    s, t = _logits((5, 13), 12), _logits((5, 13), 13)
    y = torch.tensor([1, -100, 2, 3, 4])
    w = torch.tensor([0.5, 7.0, 2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    rows = fastkd.kd_loss(s, t, 2.0, labels=y, reduction="none")
    weighted = fastkd.kd_loss(s, t, 2.0, labels=y, token_weights=w)
    torch.testing.assert_close(weighted, (rows * w.detach()).sum() / 4, rtol=1e-13, atol=0)  # 4 counted rows
    n = fastkd.kd_loss(s, t, 2.0, labels=y, token_weights=w, num_items_in_batch=10)
    torch.testing.assert_close(n, (rows * w.detach()).sum() / 10, rtol=1e-13, atol=0)
    assert not weighted.requires_grad  # neither logits nor weights are differentiated here


def test_torch_compile_fullgraph_and_opcheck():
    s, t = _logits((6, 31), 14, dtype=torch.float32), _logits((6, 31), 15, dtype=torch.float32)
    w = torch.rand(6)

    y = torch.tensor([0, 30, 5, -100, 7, 2])

    def loss(a, b, T):
        return (fastkd.kd_loss(a, b, T, token_weights=w, standardize=True) + fastkd.jsd_loss(a, b, 0.3, T)
                + fastkd.dkd_loss(a, b, y, 1.0, 8.0, T, token_weights=w, standardize=True))

    T0 = torch.tensor(1.5)
    eager = _grads(loss, s, t, T0)
    compiled = _grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), s, t, T0)
    _assert_all_close(compiled, eager, 1e-6, 1e-7, "compiled")
    rt = (0.5 + torch.rand(6)).requires_grad_(True)
    for args in [
        (s.clone().requires_grad_(True), t, None, None, "kl", [], 1.0, 1.0, 0.0, -100, "batchmean", True, True, False,
         rt, w, True, 1e-7, True),
        (s, t.clone().requires_grad_(True), torch.tensor([0, 1, -100, 3, 4, 5]), None, "jsd", [0.4], 1.0, 1.0, 0.2,
         -100, "none", False, False, True, rt, None, False, 1e-7, True),
        (s.clone().requires_grad_(True), t.clone().requires_grad_(True), y, None, "dkd", [1.0, 8.0], 1.0, 1.0, 0.0,
         -100, "batchmean", True, True, True, rt, w, True, 1e-7, True),
        (s.clone().requires_grad_(True), t, y, None, "dkd", [0.5, 2.0], 1.0, 1.0, 0.0, -100, "none", True, True,
         False, rt, None, True, 1e-7, True),
    ]:
        torch.library.opcheck(torch.ops.fastkd.response_forward, args)


def test_gradcheck_with_the_temperature():
    s, t = _logits((3, 7), 16), _logits((3, 7), 17)
    w = torch.rand(3, dtype=torch.float64)
    y = torch.tensor([0, 6, 3])
    for standardize in (False, True):
        for name in ("kl", "jsd", "tvd", "dkd"):
            def fn(a, b, T, name=name, standardize=standardize):
                labels = y if name == "dkd" else None
                return fastkd.divergence_loss(a, b, name, T, token_weights=w, standardize=standardize, labels=labels)

            args = (s.clone().requires_grad_(True), t.clone().requires_grad_(True),
                    (1.0 + torch.rand(3, dtype=torch.float64)).requires_grad_(True))
            # tvd's subgradient at ties is not smooth; these random rows have none within gradcheck's eps
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


def test_masked_entries_and_nan_with_row_options():
    """-inf at the same entries of both sides contributes nothing to the value and the temperature gradient;
    a NaN logit makes the loss and the temperature gradient NaN."""
    s, t = _logits((4, 9), 18), _logits((4, 9), 19)
    s[:, 3] = t[:, 3] = -math.inf
    T = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    got = _grads(lambda a, b, c: fastkd.kd_loss(a, b, c), s, t, T)
    keep = [0, 1, 2, 4, 5, 6, 7, 8]
    want = _grads(lambda a, b, c: R.kd_loss(a, b, c), s[:, keep], t[:, keep], T)
    _assert_all_close([got[0], got[3]], [want[0], want[3]], 1e-12, 1e-14, "masked")
    assert torch.all(got[1][:, 3] == 0) and torch.all(got[2][:, 3] == 0)
    s[2, 5] = math.nan
    bad = _grads(lambda a, b, c: fastkd.kd_loss(a, b, c, reduction="none"), s, t, T)
    assert torch.isnan(bad[0][2]) and torch.isnan(bad[3][2]) and torch.isfinite(bad[0][[0, 1, 3]]).all()


def test_bad_row_options():
    s, t = _logits((4, 6), 20), _logits((4, 6), 21)
    with pytest.raises(ValueError, match="0-dim or have the logits' leading shape"):
        fastkd.kd_loss(s, t, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point tensor"):
        fastkd.kd_loss(s, t, torch.ones(4, dtype=torch.long))
    for bad in (0.0, -1.0, math.inf, math.nan):
        T = torch.tensor([1.0, bad, 2.0, 3.0], dtype=torch.float64)
        with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
            fastkd.kd_loss(s, t, T)
        with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
            R.kd_loss(s, t, T)
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        fastkd.kd_loss(s, t, token_weights=torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="token_weights must be a floating-point tensor"):
        fastkd.kd_loss(s, t, token_weights=torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="token_weights must be a tensor"):
        fastkd.kd_loss(s, t, token_weights=[1.0] * 4)
    with pytest.raises(TypeError, match="standardize must be a bool"):
        fastkd.kd_loss(s, t, standardize=1)
    with pytest.raises(ValueError, match="standardize needs at least 2 classes"):
        fastkd.kd_loss(s[:, :1], t[:, :1], standardize=True)
    with pytest.raises(ValueError, match="token_weights must be on"):
        fastkd.kd_loss(s, t, token_weights=torch.ones(4, dtype=torch.float64, device="meta"))
    y = torch.tensor([0, 1, 2, 3])
    for mod in (fastkd, R):  # DKD's row options: the same rules and messages
        with pytest.raises(TypeError, match="standardize must be a bool"):
            mod.dkd_loss(s, t, y, standardize=1)
        with pytest.raises(ValueError, match="0-dim or have the logits' leading shape"):
            mod.dkd_loss(s, t, y, temperature=torch.ones(3, dtype=torch.float64, requires_grad=True))
        with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
            mod.dkd_loss(s, t, y, temperature=torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64,
                                                           requires_grad=True))
    with pytest.raises(TypeError, match="standardize must be a bool"):
        fastkd.DKDLoss(standardize="yes")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(2, 40), scale=st.floats(0.1, 30.0),
       name=st.sampled_from([c[0] for c in CASES]), standardize=st.booleans(), per_row=st.booleans(),
       teacher_grad=st.booleans(), seed=st.integers(0, 2**16))
def test_property_row_options_match_the_reference(rows, vocab, scale, name, standardize, per_row, teacher_grad,
                                                  seed):
    """Any shape, logit scale, divergence and option mix: value and every gradient equal plain-PyTorch
    autograd in float64."""
    s, t = _logits((rows, vocab), seed, scale), _logits((rows, vocab), seed + 1, scale)
    g = torch.Generator().manual_seed(seed + 2)
    T = (0.3 + 3 * torch.rand(rows if per_row else (), generator=g, dtype=torch.float64))
    w = torch.rand(rows, generator=g, dtype=torch.float64)
    params = dict(CASES)[name]
    kw = dict(token_weights=w, standardize=standardize)
    got = _grads(lambda a, b, c: _call(fastkd, name, a, b, c, params, **dict(kw)), s, t, T, teacher_grad)
    want = _grads(lambda a, b, c: _call(R, name, a, b, c, params, **dict(kw)), s, t, T, teacher_grad)
    _assert_all_close(got, want, 1e-8, 1e-11, name)


# ---- the fused linear head ---------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_kind", ["dense", "head", "topk"])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum"])
@pytest.mark.parametrize("standardize", [False, True])
def test_fused_head_token_weights_and_standardize_equal_the_dense_path(teacher_kind, reduction, standardize):
    """fused_linear_kd_loss with token_weights / standardize == kd_loss on the head's logits with the same
    options (values, hidden / weight / bias gradients), chunked, with the cross-entropy and an ignored row."""
    if standardize and teacher_kind == "topk":
        pytest.skip("a top-k teacher has no full row to standardize (a clear error, below)")
    g = torch.Generator().manual_seed(30)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    W = torch.randn(23, 8, generator=g, dtype=torch.float64)
    b = torch.randn(23, generator=g, dtype=torch.float64)
    th, tW = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(23, 6, generator=g, dtype=torch.float64)
    t_logits = th @ tW.T
    y = torch.randint(0, 23, (2, 5), generator=g)
    y[0, 3] = -100
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    if teacher_kind == "dense":
        teacher = t_logits
    elif teacher_kind == "head":
        teacher = fastkd.TeacherHead(th, tW)
    else:
        vals, idx = t_logits.topk(23)  # every entry kept: the dense KL
        teacher = fastkd.TopKTeacher(vals, idx)

    def fused(h_, W_, b_):
        return fastkd.fused_linear_kd_loss(h_, W_, teacher, student_bias=b_, temperature=2.0, labels=y,
                                           hard_label_weight=0.3, reduction=reduction, chunk_size=3,
                                           token_weights=w, standardize=standardize)

    def dense(h_, W_, b_):
        return fastkd.kd_loss(h_ @ W_.T + b_, t_logits, 2.0, labels=y, alpha=0.3, reduction=reduction,
                              token_weights=w, standardize=standardize)

    args = [x.clone().requires_grad_(True) for x in (h, W, b)]
    got = fused(*args)
    go = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).reshape(got.shape)
    g_got = torch.autograd.grad(got, args, go)
    args = [x.clone().requires_grad_(True) for x in (h, W, b)]
    want = dense(*args)
    g_want = torch.autograd.grad(want, args, go)
    _assert_all_close((got,) + g_got, (want,) + g_want, 1e-10, 1e-12, f"fused {teacher_kind} {reduction}")
    ref = R.fused_linear_kd_loss(h, W, teacher, student_bias=b, temperature=2.0, labels=y, hard_label_weight=0.3,
                                 reduction=reduction, token_weights=w, standardize=standardize)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_fused_head_row_option_errors():
    g = torch.Generator().manual_seed(31)
    h, W = torch.randn(4, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randn(4, 11, generator=g)
    vals, idx = t.topk(3)
    with pytest.raises(ValueError, match="a top-k teacher has no full row to standardize"):
        fastkd.fused_linear_kd_loss(h, W, fastkd.TopKTeacher(vals, idx), standardize=True)
    with pytest.raises(ValueError, match="standardization needs teacher and student rows of one vocabulary"):
        fastkd.fused_linear_kd_loss(h, W, t[:, :9], standardize=True)
    with pytest.raises(ValueError, match=r"standardize needs at least 2 classes \(an unbiased std\), got V=1"):
        fastkd.fused_linear_kd_loss(h, W[:1], t[:, :1], standardize=True)
    with pytest.raises(TypeError, match="standardize must be a bool"):
        fastkd.fused_linear_kd_loss(h, W, t, loss="cosine", standardize=0)
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        fastkd.fused_linear_kd_loss(h, W, t, token_weights=torch.ones(5))
    with pytest.raises(ValueError, match="temperature as a tensor must be 0-dim or have the logits' leading shape"):
        fastkd.fused_linear_kd_loss(h, W, t, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="temperature must be a Python number"):  # the cosine has no temperature
        fastkd.fused_linear_kd_loss(h, W, t, loss="cosine", temperature=torch.tensor(2.0))


@pytest.mark.parametrize("values_are,tail", [("logits", "renormalize"), ("logprobs", "bucket")])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
def test_topk_token_weights(values_are, tail, reduction):
    """topk_kd_loss weights its rows in the kernel: == the reference's weighted rows, value and gradient."""
    s, t = _logits((3, 4, 29), 40), _logits((3, 4, 29), 41)
    vals, idx = t.topk(7)
    if values_are == "logprobs":
        vals = torch.log_softmax(t / 2.0, -1).gather(-1, idx)
    y = torch.zeros(3, 4, dtype=torch.long)
    y[2, 1] = -100
    w = torch.rand(3, 4, dtype=torch.float64)
    kw = dict(values_are=values_are, tail=tail, reduction=reduction, labels=y, token_weights=w)

    def value_and_grad(impl):
        a = s.clone().requires_grad_(True)
        loss = impl.topk_kd_loss(a, vals, idx, 2.0, **kw)
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        return loss.detach(), torch.autograd.grad(loss, a, go)[0]

    got, want = value_and_grad(fastkd), value_and_grad(R)
    _assert_all_close(got, want, 1e-10, 1e-12, f"topk {values_are} {reduction}")
    rows = fastkd.topk_kd_loss(s, vals, idx, 2.0, values_are=values_are, tail=tail, reduction="none", labels=y)
    if reduction == "none":
        torch.testing.assert_close(got[0], rows * w, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------------
# every entry point: no rows, and a NaN weight in an ignored row
# --------------------------------------------------------------------------------------------------------
VOCAB = 9  # of the entry-point tests below


def _entry_points():
    """name -> call(student_logits [..., V], teacher_logits [..., V], labels, temperature, **options): every
    response entry point on logits, and the fused head (hidden = the logits, an identity head)."""
    eye = torch.eye(VOCAB, dtype=torch.float64)

    def topk(s, t, y, T, **k):
        vals, idx = t.topk(4, dim=-1)
        return fastkd.topk_kd_loss(s, vals, idx, T, labels=y, **k)

    def head(kind):
        def call(s, t, y, T, **k):
            teacher = {"dense": t, "head": fastkd.TeacherHead(t, eye),
                       "topk": fastkd.TopKTeacher(*t.topk(4, dim=-1))}[kind]
            return fastkd.fused_linear_kd_loss(s, eye, teacher, temperature=T, labels=y, chunk_size=3, **k)
        return call

    return {
        "kd": lambda s, t, y, T, **k: fastkd.kd_loss(s, t, T, labels=y, **k),
        "reverse_kl": lambda s, t, y, T, **k: fastkd.reverse_kl_loss(s, t, T, labels=y, **k),
        "jsd": lambda s, t, y, T, **k: fastkd.jsd_loss(s, t, 0.3, T, labels=y, **k),
        "tvd": lambda s, t, y, T, **k: fastkd.tvd_loss(s, t, T, labels=y, **k),
        "skew_kl": lambda s, t, y, T, **k: fastkd.divergence_loss(s, t, "skew_kl", T, skew=0.2, labels=y, **k),
        "dkd": lambda s, t, y, T, **k: fastkd.dkd_loss(s, t, y, 1.0, 4.0, T, **k),
        "topk": topk,
        "fused-dense": head("dense"),
        "fused-head": head("head"),
        "fused-topk": head("topk"),
    }


@pytest.mark.parametrize("name", list(_entry_points()))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("per_row", [False, True], ids=["T-scalar", "T-row"])
def test_no_rows_with_a_learnable_temperature(name, reduction, per_row):
    """Empty input with a temperature that requires grad: loss 0 (or empty), and a zero (or empty) temperature
    gradient, at every entry point (the op's saved temperature gradient of no rows is real, not 'not computed')."""
    call = _entry_points()[name]
    s = torch.randn(0, VOCAB, dtype=torch.float64, requires_grad=True)
    t = torch.randn(0, VOCAB, dtype=torch.float64)
    y = torch.zeros(0, dtype=torch.long)
    T = (torch.full((0,), 2.0, dtype=torch.float64) if per_row else torch.tensor(2.0, dtype=torch.float64))
    T.requires_grad_(True)
    out = call(s, t, y, T, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    assert (out == 0).all()
    out.sum().backward()
    assert T.grad is not None and T.grad.shape == T.shape and (T.grad == 0).all()


def _weighted_entry_points():
    """_entry_points, the plain-PyTorch references and the cosine losses (no temperature: T unused)."""
    R = fastkd.reference
    eye = torch.eye(VOCAB, dtype=torch.float64)

    def ref_head(kind):
        def call(s, t, y, T, **k):
            teacher = t if kind == "dense" else fastkd.TopKTeacher(*t.topk(4, dim=-1))
            return R.fused_linear_kd_loss(s, eye, teacher, temperature=T, labels=y, hard_label_weight=0.2, **k)
        return call

    return {
        **_entry_points(),
        "reference.kd": lambda s, t, y, T, **k: R.kd_loss(s, t, T, labels=y, alpha=0.2, **k),
        "reference.jsd": lambda s, t, y, T, **k: R.jsd_loss(s, t, 0.3, T, labels=y, **k),
        "reference.dkd": lambda s, t, y, T, **k: R.dkd_loss(s, t, y, 1.0, 4.0, T, **k),
        "reference.topk": lambda s, t, y, T, **k: R.topk_kd_loss(s, *t.topk(4, dim=-1), T, labels=y, **k),
        "reference.skew_kl": lambda s, t, y, T, **k: R.divergence_loss(s, t, "skew_kl", T, skew=0.2, labels=y, **k),
        "reference.fused-dense": ref_head("dense"),
        "reference.fused-topk": ref_head("topk"),
        "cosine": lambda s, t, y, T, **k: fastkd.cosine_loss(s, t, 0.7, labels=y, alpha=0.2, **k),
        "reference.cosine": lambda s, t, y, T, **k: R.cosine_loss(s, t, 0.7, labels=y, alpha=0.2, **k),
        "CosineLoss": lambda s, t, y, T, reduction, **k: fastkd.CosineLoss(alpha=0.2, reduction=reduction)(
            s, t, y, **k),
        "fused-cosine": lambda s, t, y, T, **k: fastkd.fused_linear_kd_loss(s, eye, t, loss="cosine", labels=y,
                                                                          hard_label_weight=0.2, **k),
        "fused-cosine-unfused": lambda s, t, y, T, **k: fastkd.cosine.fused_linear_cosine_loss(
            s, eye, t, labels=y, hard_label_weight=0.2, fused=False, **k),
    }


@pytest.mark.parametrize("name", list(_weighted_entry_points()))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_nan_token_weight_in_an_ignored_row_is_dropped(name, reduction):
    """An ignored row is dropped whatever it holds, its weight included: a NaN weight there changes nothing (value,
    student gradient, temperature gradient), at every entry point and in the plain-PyTorch references."""
    call = _weighted_entry_points()[name]
    g = torch.Generator().manual_seed(90)
    s = torch.randn(5, VOCAB, generator=g, dtype=torch.float64) * 2.0
    t = torch.randn(5, VOCAB, generator=g, dtype=torch.float64) * 2.0
    y = torch.randint(0, VOCAB, (5,), generator=g)
    y[2] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    outs = []
    for weight in (w, torch.where(y == -100, torch.full((), torch.nan, dtype=torch.float64), w)):
        a = s.clone().requires_grad_(True)
        T = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        out = call(a, t, y, T, reduction=reduction, token_weights=weight)
        out.sum().backward()
        outs.append((out.detach(), a.grad, T.grad))
    for x, z in zip(*outs):
        if x is None:  # no temperature (cosine)
            assert z is None
            continue
        assert torch.isfinite(z).all()
        torch.testing.assert_close(z, x, rtol=0, atol=0)
