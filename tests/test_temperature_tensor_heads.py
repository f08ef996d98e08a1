"""A tensor temperature (0-dim or one per row, with its exact gradient, T^2 factor included) in the two entry points
beyond the dense response losses: the top-k teacher (fastkd.topk_kd_loss, op fastkd::topk_kd_forward) and the fused
linear head (fastkd.fused_linear_kd_loss, op fastkd::fused_linear_kd_forward) for every teacher kind.

Oracles: fastkd.reference in float64 (plain PyTorch autograd through the temperature) and the dense path (the
response losses on the same logits, whose tensor temperature tests/test_row_options.py checks)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastkd
from fastkd import reference as R

TOPK_MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
TOPK_IDS = [f"{a}-{b}" for a, b in TOPK_MODES]


def _randn(shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _temperature(kind, lead, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        return torch.tensor(1.7, dtype=torch.float64)
    return 0.5 + 2.0 * torch.rand(lead, generator=g, dtype=torch.float64)


def _teacher_topk(t, k, values_are, T=2.0):
    vals, idx = t.topk(k)
    if values_are == "logprobs":
        vals = torch.log_softmax(t / T, -1).gather(-1, idx)
    return vals, idx


def _upstream(loss):
    """A fixed non-uniform upstream gradient per row for reduction "none", 1 otherwise."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)


def _value_and_grads(fn, *inputs):
    """fn's value and the gradients of every input (cloned, requiring grad)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*xs)
    return (loss.detach(),) + torch.autograd.grad(loss, xs, _upstream(loss))


def _assert_all_close(got, want, rtol, atol, what):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{k}]: {m}")


# ---- topk_kd_loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values_are,tail", TOPK_MODES, ids=TOPK_IDS)
@pytest.mark.parametrize("temperature", ["scalar", "row"])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum", "mean"])
@pytest.mark.parametrize("scale", [True, False])
def test_topk_value_and_gradients_match_float64_autograd(values_are, tail, temperature, reduction, scale):
    """Value, student gradient and temperature gradient (0-dim and per row), with token weights and an ignored row,
    against plain-PyTorch autograd of reference.topk_kd_loss in float64."""
    s, t = _randn((3, 4, 29), 1), _randn((3, 4, 29), 2)
    vals, idx = _teacher_topk(t, 7, values_are)
    T = _temperature(temperature, (3, 4), 3)
    y = torch.zeros(3, 4, dtype=torch.long)
    y[2, 1] = -100
    w = torch.rand(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(values_are=values_are, tail=tail, reduction=reduction, labels=y, token_weights=w,
              scale_by_temperature=scale)
    got = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, vals, idx, c, **kw), s, T)
    want = _value_and_grads(lambda a, c: R.topk_kd_loss(a, vals, idx, c, **kw), s, T)
    _assert_all_close(got, want, 1e-10, 1e-12, f"topk {values_are}/{tail} T={temperature} {reduction}")
    assert got[2].shape == T.shape
    if temperature == "row":
        assert torch.all(got[2][2, 1] == 0)  # the ignored row's temperature has no effect


@pytest.mark.parametrize("temperature", ["scalar", "row"])
def test_topk_with_every_entry_kept_equals_the_dense_path(temperature):
    """k = V (logits): exactly fastkd.kd_loss with the same tensor temperature: value, student and temperature
    gradients."""
    s, t = _randn((5, 17), 5), _randn((5, 17), 6)
    vals, idx = t.topk(17)
    T = _temperature(temperature, (5,), 7)
    got = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, vals, idx, c, reduction="none"), s, T)
    want = _value_and_grads(lambda a, c: fastkd.kd_loss(a, t, c, reduction="none"), s, T)
    _assert_all_close(got, want, 1e-12, 1e-14, "topk k=V vs kd_loss")


def test_topk_ctkd_gradient_reversal():
    """CTKD's learnable temperature behind the user's gradient-reversal layer, with a top-k teacher: the parameter's
    gradient equals autograd's through the eager composition, T^2 included."""

    class Reverse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return -g

    s, t = _randn((6, 40), 8), _randn((6, 40), 9)
    vals, idx = t.topk(8)
    raw = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    temperature = lambda: 1.0 + 19.0 * torch.sigmoid(Reverse.apply(raw))  # noqa: E731
    fastkd.topk_kd_loss(s, vals, idx, temperature()).backward()
    g_fast, raw.grad = raw.grad.clone(), None
    T = temperature()
    lq = torch.log_softmax(s / T, -1).gather(-1, idx)
    lp = torch.log_softmax(vals / T, -1)
    (T * T * (lp.exp() * (lp - lq)).sum(-1).mean()).backward()
    torch.testing.assert_close(g_fast, raw.grad, rtol=1e-10, atol=1e-15)


def test_topk_masked_entries_and_nan():
    """Student entries that are -inf outside the kept set contribute nothing (tail bucket too); a NaN logit makes its
    row's loss and temperature gradient NaN, the other rows stay finite. (The reference's autograd gives NaN for the
    temperature at a -inf logit, 0 * inf: its oracle is a logit of -1e4, whose mass is exactly 0 in float64.)"""
    s, t = _randn((4, 12), 10), _randn((4, 12), 11)
    vals, idx = _teacher_topk(t, 4, "logprobs")
    kept = torch.zeros(4, 12, dtype=torch.bool).scatter(-1, idx, True)
    free = (~kept).float().argmax(-1)  # an entry outside each row's kept set
    s_far = s.clone()
    s[torch.arange(4), free] = -math.inf
    s_far[torch.arange(4), free] = -1e4
    T = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    for tail in ("renormalize", "bucket"):
        kw = dict(values_are="logprobs", tail=tail, reduction="none")
        got = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, vals, idx, c, **kw), s, T)
        want = _value_and_grads(lambda a, c: R.topk_kd_loss(a, vals, idx, c, **kw), s_far, T)
        _assert_all_close(got, want, 1e-12, 1e-14, f"masked {tail}")
        assert torch.all(got[1][torch.arange(4), free] == 0)
    s[2, 5] = math.nan
    for values_are, tail in TOPK_MODES:
        v_, i_ = _teacher_topk(t, 4, values_are)
        bad = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, v_, i_, c, values_are=values_are, tail=tail,
                                                                 reduction="none"), s, T)
        assert torch.isnan(bad[0][2]) and torch.isnan(bad[2][2]), (values_are, tail)
        assert torch.isfinite(bad[0][[0, 1, 3]]).all() and torch.isfinite(bad[2][[0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_reduced_precision_is_close_to_float64(dtype):
    """float32 / bf16 / fp16 students compute in float32: value and temperature gradient within float32 accuracy of
    float64 on the same (rounded) logits (the value is rounded to the input dtype once)."""
    value_tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    s64, t64 = _randn((16, 300), 12).to(dtype).double(), _randn((16, 300), 13)
    vals, idx = t64.topk(20)
    T = 0.5 + torch.rand(16, dtype=torch.float64)
    fn = lambda a, c: fastkd.topk_kd_loss(a, vals.float(), idx, c)  # noqa: E731
    got = _value_and_grads(fn, s64.to(dtype), T.float())
    want = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, vals, idx, c), s64, T)
    torch.testing.assert_close(got[0].double(), want[0], rtol=value_tol, atol=1e-6)
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-6 * want[2].abs().max().item())


def test_topk_float16_loss_scale_scales_the_temperature_gradient():
    """float16 under a loss scale (the student's gradient is recomputed in backward): the temperature's gradient is
    the saved one times the upstream."""
    s, t = _randn((8, 50), 14, dtype=torch.float16), _randn((8, 50), 15)
    vals, idx = t.topk(5)
    T = (1.0 + torch.rand(8, dtype=torch.float64)).requires_grad_(True)
    (g1,) = torch.autograd.grad(fastkd.topk_kd_loss(s.requires_grad_(True), vals, idx, T), T)
    (g2,) = torch.autograd.grad(1024.0 * fastkd.topk_kd_loss(s, vals, idx, T), T)
    torch.testing.assert_close(g2, 1024.0 * g1, rtol=1e-14, atol=0)


def test_topk_gradcheck_with_the_temperature():
    s, t = _randn((3, 9), 16), _randn((3, 9), 17)
    w = torch.rand(3, dtype=torch.float64)
    for values_are, tail in TOPK_MODES:
        vals, idx = _teacher_topk(t, 4, values_are)

        def fn(a, T, values_are=values_are, tail=tail, vals=vals, idx=idx):
            return fastkd.topk_kd_loss(a, vals, idx, T, values_are=values_are, tail=tail, token_weights=w)

        for T0 in (torch.tensor(1.3, dtype=torch.float64), 1.0 + torch.rand(3, dtype=torch.float64)):
            assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(True), T0.clone().requires_grad_(True)),
                                            eps=1e-6, atol=1e-8)


def test_topk_opcheck_with_row_temperatures():
    s, t = _randn((6, 20), 18, dtype=torch.float32), _randn((6, 20), 19, dtype=torch.float32)
    vals, idx = t.topk(5)
    lvals = torch.log_softmax(t, -1).gather(-1, idx)
    y = torch.tensor([0, 1, -100, 3, 4, 5])
    rt = (0.5 + torch.rand(6)).requires_grad_(True)
    # (student, values, indices, labels, num_items, T, values_are_logprobs, tail_bucket, ignore_index, reduction,
    #  scale_by_temperature, grad_student, row_weight, row_temperature, grad_temperature)
    for args in [
        (s.clone().requires_grad_(True), vals, idx, None, None, 1.0, False, False, -100, "batchmean", True, True,
         None, rt, True),
        (s, lvals, idx.int(), y, torch.tensor(4.0), 1.0, True, True, -100, "none", True, False, torch.rand(6),
         rt.double(), True),
        (s.clone().requires_grad_(True), vals, idx, y, None, 1.0, False, False, -100, "mean", False, True, None,
         rt.detach(), False),
    ]:
        torch.library.opcheck(torch.ops.fastkd.topk_kd_forward, args)


# ---- fused_linear_kd_loss ----------------------------------------------------------------------------------------
def _head_case(seed=30, lead=(2, 5), H=8, V=23):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    th = torch.randn(*lead, 6, generator=g, dtype=torch.float64)
    tW = torch.randn(V, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[3 % y.numel()] = -100
    w = torch.rand(lead, generator=g, dtype=torch.float64)
    return h, W, b, th, tW, y, w


def _teacher(kind, th, tW):
    t_logits = th @ tW.T
    if kind == "dense":
        return t_logits
    if kind == "head":
        return fastkd.TeacherHead(th, tW)
    if kind == "topk":
        return fastkd.TopKTeacher(*t_logits.topk(7))
    lp = torch.log_softmax(t_logits / 2.0, -1)
    return fastkd.TopKTeacher(*lp.topk(7), values_are="logprobs", tail="bucket")


HEAD_KINDS = ["dense", "head", "topk", "topk_logprobs_bucket"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("temperature", ["scalar", "row"])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum", "mean"])
@pytest.mark.parametrize("standardize", [False, True])
def test_fused_head_value_and_gradients_match_float64_autograd(kind, temperature, reduction, standardize):
    """Value and the gradients of hidden, weight, bias and the temperature (0-dim and per token), chunked, with
    the cross-entropy, token weights and an ignored token, against the float64 reference composition."""
    if standardize and kind.startswith("topk"):
        pytest.skip("a top-k teacher has no full row to standardize")
    h, W, b, th, tW, y, w = _head_case()
    teacher = _teacher(kind, th, tW)
    T = _temperature(temperature, (2, 5), 31)
    kw = dict(labels=y, hard_label_weight=0.3, reduction=reduction, token_weights=w, standardize=standardize)

    def run(impl, **extra):
        return _value_and_grads(lambda h_, W_, b_, T_: impl.fused_linear_kd_loss(
            h_, W_, teacher, student_bias=b_, temperature=T_, **kw, **extra), h, W, b, T)

    got = run(fastkd, chunk_size=3)
    _assert_all_close(got, run(R), 1e-10, 1e-12, f"fused {kind} T={temperature} {reduction} std={standardize}")
    assert got[4].shape == T.shape


@pytest.mark.parametrize("kind", ["dense", "head", "topk"])
@pytest.mark.parametrize("temperature", ["scalar", "row"])
def test_fused_head_equals_the_dense_path(kind, temperature):
    """fused_linear_kd_loss == the fastkd loss on the head's logits with the same tensor temperature (kd_loss for a
    dense or head teacher, 0.7 topk_kd_loss + 0.3 CE for a top-k one): value, head and temperature gradients."""
    h, W, b, th, tW, y, w = _head_case(seed=32)
    teacher = _teacher(kind, th, tW)
    t_logits = th @ tW.T
    T = _temperature(temperature, (2, 5), 33)

    def fused(h_, W_, b_, T_):
        return fastkd.fused_linear_kd_loss(h_, W_, teacher, student_bias=b_, temperature=T_, labels=y,
                                           hard_label_weight=0.3, chunk_size=4, token_weights=w)

    def dense(h_, W_, b_, T_):
        z = h_ @ W_.T + b_
        if kind != "topk":
            return fastkd.kd_loss(z, t_logits, T_, labels=y, alpha=0.3, token_weights=w)
        soft = fastkd.topk_kd_loss(z, teacher.values, teacher.indices, T_, labels=y, token_weights=w)
        hard = fastkd.kd_loss(z, z.detach(), 1.0, labels=y, alpha=1.0, beta=0.0, token_weights=w)
        return 0.7 * soft + 0.3 * hard

    _assert_all_close(_value_and_grads(fused, h, W, b, T), _value_and_grads(dense, h, W, b, T), 1e-11, 1e-13,
                      f"fused {kind} vs dense path")


def test_fused_head_temperature_gradient_does_not_depend_on_the_chunk_size():
    h, W, b, th, tW, y, w = _head_case(seed=34, lead=(3, 7))
    T = _temperature("row", (3, 7), 35)
    for kind in HEAD_KINDS:
        teacher = _teacher(kind, th, tW)
        results = [_value_and_grads(lambda h_, T_: fastkd.fused_linear_kd_loss(
            h_, W, teacher, temperature=T_, labels=y, token_weights=w, chunk_size=c), h, T) for c in (1, 4, 21, None)]
        for r in results[1:]:
            _assert_all_close(r, results[0], 1e-13, 1e-15, f"{kind} chunks")


def test_fused_head_smaller_teacher_vocabulary_and_head_transforms():
    """A teacher of a smaller vocabulary (its extra entries have probability 0) and transformed logits: value and
    gradients as the composition's, written out with a padding of -1e4 (probability exactly 0 in float64; the
    reference's -inf padding gives autograd's 0 * inf = NaN for the temperature there)."""
    h, W, b, th, tW, y, w = _head_case(seed=36)
    tW = tW[:19]
    T = _temperature("row", (2, 5), 37)
    kw = dict(labels=y, token_weights=w, reduction="none")

    def composition(h_, T_):
        z = R.head_transform(h_ @ W.T, 1.0, 5.0)
        tz = R.head_transform(th @ tW.T, 0.7, 0.0)
        return R.kd_loss(z, torch.cat([tz, torch.full((2, 5, 4), -1e4, dtype=tz.dtype)], -1), T_, **kw)

    want = _value_and_grads(composition, h, T)
    for teacher in (th @ tW.T, fastkd.TeacherHead(th, tW)):
        got = _value_and_grads(lambda h_, T_: fastkd.fused_linear_kd_loss(
            h_, W, teacher, temperature=T_, chunk_size=3, student_softcap=5.0, teacher_logit_scale=0.7, **kw), h, T)
        _assert_all_close(got, want, 1e-10, 1e-12, "padded teacher")


def test_fused_head_temperature_alone_requires_grad():
    """Only the temperature requires grad (the head is frozen): its gradient, for a scalar and a per-row reduction."""
    h, W, b, th, tW, y, w = _head_case(seed=38)
    for reduction in ("batchmean", "none"):
        for kind in HEAD_KINDS:
            teacher = _teacher(kind, th, tW)
            T = _temperature("row", (2, 5), 39)
            got = _value_and_grads(lambda T_: fastkd.fused_linear_kd_loss(h, W, teacher, temperature=T_, labels=y,
                                                                          reduction=reduction), T)
            want = _value_and_grads(lambda T_: R.fused_linear_kd_loss(h, W, teacher, temperature=T_, labels=y,
                                                                      reduction=reduction), T)
            _assert_all_close(got, want, 1e-10, 1e-12, f"{kind} {reduction}")


def test_fused_head_reduced_precision_and_loss_scale():
    """bf16 / fp16 heads (float32 logits): the temperature gradient within float32 accuracy of float64 on the same
    rounded inputs; under a loss scale (fp16: the head's gradients recomputed in backward) it is scaled exactly."""
    h, W, b, th, tW, y, w = _head_case(seed=40, lead=(4, 6), H=16, V=64)
    T = _temperature("row", (4, 6), 41)
    for dtype in (torch.bfloat16, torch.float16):
        hd, Wd = h.to(dtype), W.to(dtype)
        for teacher in ((th @ tW.T).float(), fastkd.TopKTeacher(*(th @ tW.T).float().topk(9))):
            fn = lambda h_, T_, t_=teacher: fastkd.fused_linear_kd_loss(h_, Wd if h_.dtype == dtype else  # noqa
                                                                        Wd.double(), t_, temperature=T_, labels=y)
            got = _value_and_grads(fn, hd, T.float())
            want = _value_and_grads(fn, hd.double(), T)
            torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-6 * want[2].abs().max().item())
            Tg = T.float().requires_grad_(True)
            h_ = hd.clone().requires_grad_(True)
            (g1,) = torch.autograd.grad(fastkd.fused_linear_kd_loss(h_, Wd, teacher, temperature=Tg, labels=y), Tg)
            (g2,) = torch.autograd.grad(512.0 * fastkd.fused_linear_kd_loss(h_, Wd, teacher, temperature=Tg,
                                                                            labels=y), Tg)
            torch.testing.assert_close(g2, 512.0 * g1, rtol=1e-6, atol=0)


def test_fused_head_gradcheck_with_the_temperature():
    h, W, b, th, tW, y, w = _head_case(seed=42, lead=(3,), H=4, V=9)
    for kind in HEAD_KINDS:
        teacher = _teacher(kind, th, tW)
        for reduction in ("batchmean", "none"):
            def fn(h_, W_, T_, teacher=teacher, reduction=reduction):
                return fastkd.fused_linear_kd_loss(h_, W_, teacher, temperature=T_, labels=y, hard_label_weight=0.2,
                                                   reduction=reduction, chunk_size=2, token_weights=w)

            args = (h.clone().requires_grad_(True), W.clone().requires_grad_(True),
                    (1.0 + torch.rand(3, dtype=torch.float64)).requires_grad_(True))
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8), (kind, reduction)


def test_fused_head_opcheck_with_row_temperatures():
    g = torch.Generator().manual_seed(43)
    h, W = torch.randn(6, 8, generator=g), torch.randn(13, 8, generator=g)
    t = torch.randn(6, 13, generator=g)
    vals, idx = t.topk(4)
    y = torch.tensor([0, 1, -100, 3, 4, 5])
    rt = (0.5 + torch.rand(6, generator=g)).requires_grad_(True)
    head = [1.0, 0.0, 1.0, 0.0]

    def args(teacher_logits, values, indices, grad_rows, divergence, params, reduction, grads, row_temperature,
             grad_temperature, row_weight=None, standardize=False):
        return (h.clone().requires_grad_(grads[0]), W.clone().requires_grad_(grads[1]), None, teacher_logits, None,
                None, None, values, indices, y, None, grad_rows, divergence, params, 1.0, 0.8, 0.2, -100, reduction,
                divergence == "kl", False, False, 4, *head, *grads, False, row_weight, standardize, 1e-7,
                row_temperature, grad_temperature)

    for a in [
        args(t, None, None, None, "kl", [], "batchmean", (True, True), rt, True, torch.rand(6), True),
        args(t, None, None, None, "jsd", [0.3], "none", (True, False), rt.double(), True),
        args(t, None, None, torch.rand(6), "kl", [], "none", (True, True), rt.detach(), False),
        args(None, vals, idx, None, "kl", [], "sum", (False, True), rt, True),
    ]:
        torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward, a)


# ---- torch.compile --------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_with_the_temperature_gradient():
    torch._dynamo.reset()
    s, t = _randn((6, 31), 44, dtype=torch.float32), _randn((6, 31), 45, dtype=torch.float32)
    vals, idx = t.topk(6)
    h, W, b, th, tW, y, w = _head_case(seed=46)
    h, W, t_logits = h.float(), W.float(), (th @ tW.T).float()

    def loss(a, T, h_, W_, T_rows):
        top = fastkd.topk_kd_loss(a, vals, idx, T) + fastkd.topk_kd_loss(a, vals, idx, T_rows[:6].reshape(6),
                                                                         reduction="none").sum()
        head = fastkd.fused_linear_kd_loss(h_, W_, t_logits, temperature=T_rows.reshape(2, 5), labels=y,
                                           hard_label_weight=0.1, chunk_size=3)
        head_top = fastkd.fused_linear_kd_loss(h_, W_, fastkd.TopKTeacher(*t_logits.topk(5)), temperature=T,
                                               reduction="none").sum()
        return top + head + head_top

    inputs = (s, torch.tensor(1.5), h, W, 0.5 + torch.rand(10))
    eager = _value_and_grads(loss, *inputs)
    compiled = _value_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"), *inputs)
    _assert_all_close(compiled, eager, 1e-6, 1e-7, "compiled")
    assert all(torch.count_nonzero(g) > 0 for g in eager[1:])


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_tensor_temperatures():
    """The messages of the dense losses' rules, for both entry points (and their references)."""
    s, t = _randn((4, 10), 47), _randn((4, 10), 48)
    vals, idx = t.topk(3)
    h, W = _randn((4, 5), 49), _randn((10, 5), 50)
    calls = {
        "topk_kd_loss": lambda T: fastkd.topk_kd_loss(s, vals, idx, T),
        "reference.topk_kd_loss": lambda T: R.topk_kd_loss(s, vals, idx, T),
        "fused dense": lambda T: fastkd.fused_linear_kd_loss(h, W, t, temperature=T),
        "fused topk": lambda T: fastkd.fused_linear_kd_loss(h, W, fastkd.TopKTeacher(vals, idx), temperature=T),
        "reference.fused_linear_kd_loss": lambda T: R.fused_linear_kd_loss(h, W, t, temperature=T),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="temperature as a tensor must be 0-dim or have the logits' leading shape"):
            call(torch.ones(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="temperature as a tensor must be 0-dim"):
            call(torch.ones(4, 1, dtype=torch.float64))
        with pytest.raises(TypeError, match="temperature must be a float or a floating-point tensor"):
            call(torch.ones(4, dtype=torch.long))
        with pytest.raises(ValueError, match="temperature must be on the logits' device"):
            call(torch.ones(4, device="meta"))
        for bad in (0.0, -1.0, math.inf, math.nan, 1e-30):
            T = torch.tensor([1.0, bad, 2.0, 3.0], dtype=torch.float64)
            with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
                call(T)
            with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
                call(torch.tensor(bad, dtype=torch.float64))
    # an ignored row's temperature is checked too (one rule for every entry, as the dense losses)
    with pytest.raises(ValueError, match="every entry must be a finite value"):
        fastkd.topk_kd_loss(s, vals, idx, torch.tensor([1.0, 0.0, 1.0, 1.0]), labels=torch.tensor([0, -100, 0, 0]))
    # the ops: a temperature gradient needs the per-row temperatures; the cosine head has no temperature
    with pytest.raises(RuntimeError, match="argument 'temperature': its gradient needs the temperature as a tensor"):
        torch.ops.fastkd.topk_kd_forward(s, vals, idx, None, None, 1.0, False, False, -100, "batchmean", True, False,
                                         None, None, True)
    base = (h, W, None, t, None, None, None, None, None, None, None, None)
    tail = (1.0, 1.0, 0.0, -100, "batchmean", False, False, False, 4, 1.0, 0.0, 1.0, 0.0, False, False, False, None,
            False, 1e-7)
    with pytest.raises(RuntimeError, match="argument 'temperature': its gradient needs the temperature as a tensor"):
        torch.ops.fastkd.fused_linear_kd_forward(*base, "kl", [], *tail, None, True)
    with pytest.raises(RuntimeError, match="argument 'temperature': 'cosine' has no temperature"):
        torch.ops.fastkd.fused_linear_kd_forward(*base, "cosine", [1e-8], *tail, torch.ones(4), False)
    with pytest.raises(RuntimeError, match=r"argument 'temperature': expected shape \[4\]"):
        torch.ops.fastkd.fused_linear_kd_forward(*base, "kl", [], *tail, torch.ones(3), False)
    with pytest.raises(TypeError, match="temperature must be a Python number"):
        fastkd.fused_linear_kd_loss(h, W, t, loss="cosine", temperature=torch.tensor(2.0))


# ---- property tests -------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(2, 50), k_frac=st.floats(0.0, 1.0), scale=st.floats(0.1, 30.0),
       mode=st.sampled_from(TOPK_MODES), per_row=st.booleans(), squared=st.booleans(), seed=st.integers(0, 2**16))
def test_property_topk_matches_the_reference(rows, vocab, k_frac, scale, mode, per_row, squared, seed):
    """Any shape, k, logit scale (far tails included), teacher mode and temperature kind: value, student and
    temperature gradients equal float64 autograd of the reference."""
    k = max(1, min(vocab, round(k_frac * vocab)))
    s, t = _randn((rows, vocab), seed, scale), _randn((rows, vocab), seed + 1, scale)
    values_are, tail = mode
    vals, idx = _teacher_topk(t, k, values_are)
    g = torch.Generator().manual_seed(seed + 2)
    T = 0.3 + 3.0 * torch.rand(rows if per_row else (), generator=g, dtype=torch.float64)
    kw = dict(values_are=values_are, tail=tail, scale_by_temperature=squared, reduction="none")
    got = _value_and_grads(lambda a, c: fastkd.topk_kd_loss(a, vals, idx, c, **kw), s, T)
    want = _value_and_grads(lambda a, c: R.topk_kd_loss(a, vals, idx, c, **kw), s, T)
    _assert_all_close(got, want, 1e-8, 1e-11, f"topk k={k} {mode}")


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 7), vocab=st.integers(2, 30), chunk=st.integers(1, 8), kind=st.sampled_from(HEAD_KINDS),
       per_row=st.booleans(), reduction=st.sampled_from(["batchmean", "none", "sum"]), seed=st.integers(0, 2**16))
def test_property_fused_head_matches_the_reference(rows, vocab, chunk, kind, per_row, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(rows, 5, generator=g, dtype=torch.float64), torch.randn(vocab, 5, generator=g,
                                                                                dtype=torch.float64)
    th, tW = torch.randn(rows, 4, generator=g, dtype=torch.float64), torch.randn(vocab, 4, generator=g,
                                                                                  dtype=torch.float64)
    if kind.startswith("topk"):
        k = max(1, vocab // 3)
        t_logits = th @ tW.T
        teacher = (fastkd.TopKTeacher(*t_logits.topk(k)) if kind == "topk" else
                   fastkd.TopKTeacher(*torch.log_softmax(t_logits, -1).topk(k), values_are="logprobs", tail="bucket"))
    else:
        teacher = _teacher(kind, th, tW)
    T = 0.3 + 3.0 * torch.rand(rows if per_row else (), generator=g, dtype=torch.float64)
    kw = dict(reduction=reduction)
    got = _value_and_grads(lambda h_, T_: fastkd.fused_linear_kd_loss(h_, W, teacher, temperature=T_, chunk_size=chunk,
                                                                      **kw), h, T)
    want = _value_and_grads(lambda h_, T_: R.fused_linear_kd_loss(h_, W, teacher, temperature=T_, **kw), h, T)
    _assert_all_close(got, want, 1e-8, 1e-11, f"fused {kind}")
