"""fastkd.fused_linear_kd_loss / FusedLinearKDLoss: the chunked linear head + response kernel.

Checked against the unfused composition (full logits by F.linear, then the fastkd loss) run in float64 as
the oracle, and against the same composition in the input dtype: values and the gradients of hidden, weight
and bias, for dense / TeacherHead / TopKTeacher teachers, every loss, masks, every reduction, chunk sizes
that do and do not divide the rows, a smaller teacher vocabulary, float32 / bfloat16 / float64; gradcheck,
opcheck, torch.compile(fullgraph=True) and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import TeacherHead, TopKTeacher
from helpers import assert_close

LOSSES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.2)]


def _problem(device, rows=13, width=24, vocab=37, teacher_vocab=None, teacher_width=20, dtype=torch.float32,
             seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = vocab if teacher_vocab is None else teacher_vocab
    shape = (rows,) if lead is None else lead
    h = torch.randn(*shape, width, generator=g)
    w = torch.randn(vocab, width, generator=g) / math.sqrt(width) * 3
    b = torch.randn(vocab, generator=g) * 0.5
    th = torch.randn(*shape, teacher_width, generator=g)
    tw = torch.randn(teacher_vocab, teacher_width, generator=g) / math.sqrt(teacher_width) * 3
    tb = torch.randn(teacher_vocab, generator=g) * 0.5
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::4] = -100
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(h), to(w), to(b), to(th), to(tw), to(tb), labels.to(device)


def _teacher(kind, th, tw, tb, k=6, T=1.0):
    if kind == "head":
        return TeacherHead(th, tw, tb)
    logits = F.linear(th, tw, tb)
    if kind == "dense":
        return logits
    vals, idx = logits.topk(k, dim=-1)
    return TopKTeacher(vals, idx)


def _as(teacher, dtype):
    if isinstance(teacher, torch.Tensor):
        return teacher.to(dtype)
    if isinstance(teacher, TeacherHead):
        return TeacherHead(*(None if x is None else x.to(dtype) for x in teacher))
    return TopKTeacher(teacher.values.to(dtype), teacher.indices, teacher.values_are, teacher.tail)


def _run(fn, h, w, b, teacher, grad_out=None, **kw):
    """Value and the gradients (hidden, weight, bias) of fn(h, w, teacher, student_bias=b, **kw)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    loss = fn(h, w, teacher, student_bias=b, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    inputs = [h, w] + ([] if b is None else [b])
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads


def _oracle(h, w, b, teacher, grad_out=None, **kw):
    return _run(fastkd.reference.fused_linear_kd_loss, h.double(), w.double(), None if b is None else b.double(),
                _as(teacher, torch.float64), grad_out, **kw)


def _check(actual, expected, rtol, what):
    (la, ga), (le, ge) = actual, expected
    assert_close(la, le, rtol=rtol, atol=rtol * max(1.0, le.abs().max().item()) * 1e-2, what=f"{what} loss")
    for name, a, e in zip(("hidden", "weight", "bias"), ga, ge):
        scale = max(e.abs().max().item(), 1e-30)
        assert_close(a, e, rtol=rtol, atol=rtol * scale, what=f"{what} grad {name}")


# --------------------------------------------------------------------------------------------------------
# values and gradients against the float64 composition
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "head"])
@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("chunk_size", [1, 4, 13, None])
def test_matches_composition(device, kind, loss, beta, chunk_size):
    h, w, b, th, tw, tb, labels = _problem(device, seed=1)
    teacher = _teacher(kind, th, tw, tb)
    kw = dict(loss=loss, beta=beta, temperature=1.7, labels=labels, chunk_size=chunk_size)
    _check(_run(fastkd.fused_linear_kd_loss, h, w, b, teacher, **kw), _oracle(h, w, b, teacher, **kw), 2e-5,
           f"{kind} {loss} {beta} chunk={chunk_size}")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("kind", ["dense", "head", "topk"])
def test_reductions_and_upstream_gradients(device, reduction, kind):
    h, w, b, th, tw, tb, labels = _problem(device, rows=11, seed=2)
    teacher = _teacher(kind, th, tw, tb)
    go = torch.randn(11, generator=torch.Generator().manual_seed(3)).to(device) if reduction == "none" else \
        torch.tensor(0.37, device=device)
    kw = dict(temperature=2.0, labels=labels, reduction=reduction, chunk_size=4, scale_by_temperature=True)
    _check(_run(fastkd.fused_linear_kd_loss, h, w, b, teacher, go, **kw), _oracle(h, w, b, teacher, go, **kw),
           2e-5, f"{kind} {reduction}")


@pytest.mark.parametrize("kind,loss,beta", [("dense", "kl", 0.5), ("dense", "jsd", 0.4), ("head", "kl", 0.5),
                                            ("head", "jsd", 0.4), ("topk", "kl", 0.5)])
def test_hard_label_cross_entropy(device, kind, loss, beta):
    h, w, b, th, tw, tb, labels = _problem(device, seed=4)
    teacher = _teacher(kind, th, tw, tb)
    kw = dict(loss=loss, beta=beta, temperature=3.0, labels=labels, hard_label_weight=0.6, soft_weight=0.4,
              chunk_size=5, num_items_in_batch=20)
    _check(_run(fastkd.fused_linear_kd_loss, h, w, b, teacher, **kw), _oracle(h, w, b, teacher, **kw), 2e-5,
           f"{kind} {loss} CE")
    parts = fastkd.fused_linear_kd_loss(h, w, teacher, student_bias=b, return_parts=True, **kw)
    ref = fastkd.reference.fused_linear_kd_loss(h.double(), w.double(), _as(teacher, torch.float64),
                                                student_bias=b.double(), return_parts=True, **kw)
    for a, e, name in zip(parts, ref, ("loss", "soft", "hard")):
        assert_close(a, e, rtol=2e-5, atol=0, what=name)
    assert parts.hard.item() > 0 and not parts.soft.requires_grad and not parts.hard.requires_grad
    assert_close(parts.loss, 0.4 * parts.soft + 0.6 * parts.hard, rtol=1e-6, atol=0, what="parts add up")


@pytest.mark.parametrize("kind", ["dense", "head", "topk"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_soft_weight_scales_value_and_gradient(device, kind, reduction):
    h, w, b, th, tw, tb, labels = _problem(device, seed=21)
    teacher = _teacher(kind, th, tw, tb)
    go = torch.linspace(-1, 2, 13, device=device) if reduction == "none" else None
    for hard in (0.0, 0.7):
        kw = dict(temperature=1.5, labels=labels, soft_weight=0.3, hard_label_weight=hard, reduction=reduction,
                  chunk_size=4)
        _check(_run(fastkd.fused_linear_kd_loss, h, w, b, teacher, go, **kw), _oracle(h, w, b, teacher, go, **kw),
               2e-5, f"{kind} soft_weight hard={hard}")


@pytest.mark.parametrize("values_are,tail", [("logits", "renormalize"), ("logprobs", "bucket"),
                                             ("logprobs", "renormalize")])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_topk_teacher(device, values_are, tail, chunk_size):
    h, w, b, th, tw, tb, labels = _problem(device, seed=5)
    logits_t = F.linear(th, tw, tb)
    T = 2.0
    src = F.log_softmax(logits_t / T, dim=-1) if values_are == "logprobs" else logits_t
    vals, idx = src.topk(7, dim=-1)
    teacher = TopKTeacher(vals, idx.int(), values_are, tail)
    kw = dict(temperature=T, labels=labels, chunk_size=chunk_size)
    _check(_run(fastkd.fused_linear_kd_loss, h, w, b, teacher, **kw), _oracle(h, w, b, teacher, **kw), 2e-5,
           f"topk {values_are} {tail}")


@pytest.mark.parametrize("kind", ["dense", "head"])
@pytest.mark.parametrize("loss,beta", [("kl", 0.5), ("jsd", 0.5), ("jsd", 0.0)])
def test_smaller_teacher_vocabulary(device, kind, loss, beta):
    """Extra student columns: the teacher gives them probability 0 (padded with -inf in the composition)."""
    h, w, b, th, tw, tb, labels = _problem(device, vocab=41, teacher_vocab=33, seed=6)
    teacher = _teacher(kind, th, tw, tb)
    kw = dict(loss=loss, beta=beta, temperature=1.3, labels=labels, chunk_size=6)
    fused = _run(fastkd.fused_linear_kd_loss, h, w, b, teacher, **kw)
    _check(fused, _oracle(h, w, b, teacher, **kw), 2e-5, f"{kind} {loss} padded")
    assert torch.isfinite(fused[0]).all() and fused[0].item() > 0
    # the composition users would write by hand
    t_logits = F.linear(th, tw, tb)
    padded = torch.cat([t_logits, torch.full((13, 8), -math.inf, device=device)], dim=-1)
    manual = (fastkd.kd_loss(F.linear(h, w, b), padded, 1.3, labels=labels)  # T^2, the fused default
              if loss == "kl" else fastkd.jsd_loss(F.linear(h, w, b), padded, beta, 1.3, labels=labels))
    assert_close(fused[0], manual, rtol=1e-5, atol=0, what="hand composition")


def test_leading_dimensions_and_module(device):
    h, w, b, th, tw, tb, labels = _problem(device, lead=(3, 5), seed=7)
    teacher = TeacherHead(th, tw, tb)
    crit = fastkd.FusedLinearKDLoss(loss="jsd", beta=0.3, temperature=1.5, reduction="none", chunk_size=4)
    out = crit(h, w, teacher, labels, student_bias=b)
    assert out.shape == (3, 5)
    ref = fastkd.reference.fused_linear_kd_loss(h.double(), w.double(), _as(teacher, torch.float64), student_bias=
                                                b.double(), loss="jsd", beta=0.3, temperature=1.5, labels=labels,
                                                reduction="none")
    assert_close(out, ref, rtol=2e-5, atol=1e-7, what="[B, T] none")
    assert (out[labels == -100] == 0).all()
    assert "jsd" in repr(crit)


def test_all_rows_masked_and_empty(device):
    h, w, b, th, tw, tb, labels = _problem(device, rows=6, seed=8)
    masked = torch.full_like(labels, -100)
    loss, (gh, gw, gb) = _run(fastkd.fused_linear_kd_loss, h, w, b, TeacherHead(th, tw, tb), labels=masked,
                              hard_label_weight=0.5)
    assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all() and (gb == 0).all()
    loss, (gh, gw) = _run(fastkd.fused_linear_kd_loss, h[:0], w, None, F.linear(th, tw, tb)[:0])
    assert loss.item() == 0.0 and gh.shape == (0, 24) and (gw == 0).all()


def test_extreme_logits(device):
    """Logit gaps of thousands: the kernels stay exact (float64 input against the oracle) and finite in
    float32 (where the GEMM's own rounding, ~1e-7 of logits in the thousands, moves every softmax term by a
    relative ~1e-3, so float32 is not compared against float64 here)."""
    h, w, b, th, tw, tb, labels = _problem(device, dtype=torch.float64, seed=9)
    w, tw = w * 300, tw * 300
    for loss, beta in LOSSES:
        kw = dict(loss=loss, beta=beta, labels=labels, chunk_size=5, hard_label_weight=0.5)
        fused = _run(fastkd.fused_linear_kd_loss, h, w, b, TeacherHead(th, tw, tb), **kw)
        _check(fused, _oracle(h, w, b, TeacherHead(th, tw, tb), **kw), 1e-9, f"extreme {loss} {beta}")
        f32 = _run(fastkd.fused_linear_kd_loss, h.float(), w.float(), b.float(),
                   TeacherHead(th.float(), tw.float(), tb.float()), **kw)
        assert torch.isfinite(f32[0]) and all(torch.isfinite(g).all() for g in f32[1])


# --------------------------------------------------------------------------------------------------------
# the same composition in the input dtype (what users run today): float32, bfloat16
# --------------------------------------------------------------------------------------------------------
def _composition(h, w, teacher, *, student_bias=None, labels=None, temperature=1.0, loss="kl", beta=0.5):
    """matmul + the matching fastkd loss (the unfused path), in the inputs' dtype."""
    logits = F.linear(h, w, student_bias)
    t = teacher if isinstance(teacher, torch.Tensor) else F.linear(*teacher)
    if loss == "kl":
        return fastkd.kd_loss(logits, t.detach(), temperature, labels=labels)  # T^2: the fused default
    return fastkd.jsd_loss(logits, t.detach(), beta, temperature, labels=labels)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("loss", ["kl", "jsd"])
@pytest.mark.parametrize("kind", ["dense", "head"])
def test_equals_unfused_composition_in_dtype(device, dtype, rtol, loss, kind):
    h, w, b, th, tw, tb, labels = _problem(device, rows=40, width=64, vocab=300, teacher_width=48, dtype=dtype,
                                           seed=10)
    teacher = TeacherHead(th, tw, tb) if kind == "head" else F.linear(th, tw, tb)
    kw = dict(labels=labels, temperature=2.0, loss=loss, beta=0.5)
    fused = _run(fastkd.fused_linear_kd_loss, h, w, b, teacher, chunk_size=16, **kw)
    eager = _run(_composition, h, w, b, teacher, **kw)
    # the loss in float32 (the fused head's logits are float32 whatever the input dtype), gradients in dtype
    assert fused[0].dtype == torch.float32 and all(g.dtype == dtype for g in fused[1])
    _check(fused, eager, rtol, f"{dtype} {loss} {kind}")


def test_mixed_teacher_dtype(device):
    """An fp32 student against a bf16 teacher head (or bf16 dense logits): loss in fp32. The head's logits
    are computed in float32 from its bf16 operands (not rounded to bf16); dense bf16 logits are used as given."""
    h, w, b, th, tw, tb, labels = _problem(device, seed=11)
    head = TeacherHead(th.bfloat16(), tw.bfloat16(), tb.bfloat16())
    exact = F.linear(*(x.double() for x in head))  # the head's logits from its bf16 operands, unrounded
    dense = F.linear(*head)                        # bf16 logits as a bf16 model would return them
    for teacher, expected in ((head, exact), (dense, dense)):
        fused = _run(fastkd.fused_linear_kd_loss, h, w, b, teacher, labels=labels, chunk_size=5)
        assert fused[0].dtype == torch.float32 and fused[1][0].dtype == torch.float32
        _check(fused, _oracle(h, w, b, expected, labels=labels), 2e-5, "bf16 teacher")


# --------------------------------------------------------------------------------------------------------
# autograd machinery: gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "head", "topk"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(device, kind, reduction):
    h, w, b, th, tw, tb, labels = _problem(device, rows=5, width=4, vocab=7, teacher_width=3, dtype=torch.float64,
                                           seed=12)
    teacher = _teacher(kind, th, tw, tb, k=3)
    loss = "kl" if kind == "topk" else "jsd"
    hard = 0.0 if kind == "topk" else 0.3

    def f(h_, w_, b_):
        return fastkd.fused_linear_kd_loss(h_, w_, teacher, student_bias=b_, loss=loss, beta=0.4, temperature=1.3,
                                           labels=labels, hard_label_weight=hard, reduction=reduction, chunk_size=2)

    args = (h.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def _op_samples(device):
    h, w, b, th, tw, tb, labels = _problem(device, rows=7, width=6, vocab=11, teacher_vocab=9, teacher_width=5,
                                           seed=13)
    dense = F.linear(th, tw, tb)
    vals, idx = F.linear(h, w, b).detach().topk(3, dim=-1)
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    n = torch.tensor(5.0)
    # (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, topk_values,
    #  topk_indices, labels, num_items, grad_rows, divergence, params, T, soft_w, hard_w, ignore_index, reduction,
    #  scale_by_temperature, values_are_logprobs, tail_bucket, chunk_size, student_logit_scale, student_softcap,
    #  teacher_logit_scale, teacher_softcap, grad_hidden, grad_weight, grad_bias)
    none = (1.0, 0.0, 1.0, 0.0)  # no head transforms
    yield (req(h), req(w), req(b), dense, None, None, None, None, None, labels, None, None, "kl", [], 2.0, 1.0,
           0.5, -100, "batchmean", True, False, False, 3, *none, True, True, True)
    yield (req(h), req(w), None, None, th, tw, tb, None, None, labels, n, None, "jsd", [0.3], 1.0, 1.0, 0.0, -100,
           "mean", False, False, False, 4, *none, True, True, False)
    yield (req(h), w, b, None, None, None, None, vals, idx, None, None, None, "kl", [], 1.5, 1.0, 0.0, -100,
           "sum", True, False, False, 2, 0.5, 3.0, 1.0, 0.0, True, False, False)
    yield (h, req(w), req(b), None, th, tw, tb, None, None, labels, None, None, "reverse_kl", [], 1.0, 1.0, 0.0,
           -100, "none", False, False, False, 5, 1.0, 2.0, 0.7, 4.0, False, False, False)


def test_opcheck_fused_linear_kd_forward(device):
    for args in _op_samples(device):
        args = list(args)
        if args[18] != "none":
            torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward, tuple(args))
        else:
            # "none" computes its gradients in backward, with grad_rows
            args[27:30] = [False, False, False]
            torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward, tuple(args))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    h, w, b, th, tw, tb, labels = _problem(device, lead=(2, 6), seed=14)

    def step(h_, w_, b_, th_, tw_, y):
        jsd = fastkd.fused_linear_kd_loss(h_, w_, TeacherHead(th_, tw_), student_bias=b_, loss="jsd", beta=0.3,
                                          labels=y, hard_label_weight=0.2, chunk_size=5)
        kl = fastkd.fused_linear_kd_loss(h_, w_, F.linear(th_, tw_), temperature=2.0, chunk_size=4)
        return jsd + 0.5 * kl

    compiled = torch.compile(step, fullgraph=True)
    args_c = [x.clone().requires_grad_(True) for x in (h, w, b)]
    args_e = [x.clone().requires_grad_(True) for x in (h, w, b)]
    loss_c = compiled(*args_c, th, tw, labels)
    loss_c.backward()
    loss_e = step(*args_e, th, tw, labels)
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=0, what="compiled loss")
    for a, e in zip(args_c, args_e):
        assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6 * e.grad.abs().max().item(), what="compiled grad")


def test_teacher_gets_no_gradient(device):
    h, w, b, th, tw, tb, labels = _problem(device, seed=15)
    th, tw = th.requires_grad_(True), tw.requires_grad_(True)
    dense = F.linear(th, tw)
    hs = h.requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(hs, w, TeacherHead(th, tw)) + fastkd.fused_linear_kd_loss(hs, w, dense)
    loss.backward()
    assert th.grad is None and tw.grad is None and hs.grad is not None


def test_backward_twice_with_retain_graph(device):
    h, w, b, th, tw, tb, labels = _problem(device, seed=16)
    hs = h.clone().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(hs, w, F.linear(th, tw), chunk_size=3)
    (g1,) = torch.autograd.grad(loss, hs, retain_graph=True)
    (g2,) = torch.autograd.grad(2.0 * loss, hs)
    assert_close(g2, 2.0 * g1, rtol=1e-6, atol=0, what="second backward")


def test_no_grad_computes_no_gradients(device):
    h, w, b, th, tw, tb, labels = _problem(device, seed=17)
    with torch.no_grad():
        out = fastkd.fused_linear_kd_loss(h.requires_grad_(True), w, F.linear(th, tw))
    assert not out.requires_grad
    ref = fastkd.reference.fused_linear_kd_loss(h.double(), w.double(), F.linear(th, tw).double())
    assert_close(out, ref, rtol=2e-5, atol=0, what="no_grad value")


def test_chunk_size_does_not_change_the_result(device):
    h, w, b, th, tw, tb, labels = _problem(device, rows=29, seed=18)
    teacher = TeacherHead(th, tw, tb)
    base = _run(fastkd.fused_linear_kd_loss, h, w, b, teacher, labels=labels, chunk_size=29)
    for chunk in (1, 2, 7, 100):
        other = _run(fastkd.fused_linear_kd_loss, h, w, b, teacher, labels=labels, chunk_size=chunk)
        _check(other, base, 1e-5, f"chunk {chunk}")
    assert fastkd.fused_linear.default_chunk_size(4096, 32000) == 520
    assert fastkd.fused_linear.default_chunk_size(10, 32000) == 10
    assert fastkd.fused_linear.default_chunk_size(8192, 128256) == 128
    assert fastkd.fused_linear.default_chunk_size(8192, 128256, "cuda") == 520


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------
def test_bad_input(device):
    h, w, b, th, tw, tb, labels = _problem(device, seed=19)
    dense = F.linear(th, tw, tb)
    f = fastkd.fused_linear_kd_loss
    cases = [
        (TypeError, "teacher must be", lambda: f(h, w, "teacher")),
        (ValueError, "loss must be one of", lambda: f(h, w, dense, loss="dkd")),  # every divergence but dkd
        (ValueError, "temperature", lambda: f(h, w, dense, temperature=0.0)),
        (ValueError, "beta", lambda: f(h, w, dense, loss="jsd", beta=1.5)),
        (ValueError, "chunk_size", lambda: f(h, w, dense, chunk_size=0)),
        (ValueError, "reduction", lambda: f(h, w, dense, reduction="avg")),
        (ValueError, "student_weight must have shape", lambda: f(h, w[:, :5], dense)),
        (TypeError, "student_weight must have student_hidden's dtype", lambda: f(h, w.double(), dense)),
        (ValueError, "student_bias must have shape", lambda: f(h, w, dense, student_bias=b[:3])),
        (ValueError, "teacher logits must have shape", lambda: f(h, w, dense[:5])),
        (ValueError, "the teacher's vocabulary", lambda: f(h, w[:20], dense)),
        (ValueError, "reverse KL is infinite", lambda: f(h, w, dense[:, :30], loss="reverse_kl")),
        (ValueError, "reverse KL is infinite", lambda: f(h, w, dense[:, :30], loss="jsd", beta=1.0)),
        (ValueError, "labels is required", lambda: f(h, w, dense, hard_label_weight=0.5)),
        (ValueError, "labels must have shape", lambda: f(h, w, dense, labels=labels[:3])),
        (ValueError, "class targets", lambda: f(h, w, dense, labels=labels + 100, hard_label_weight=0.5)),
        (ValueError, "hard_label_weight must be", lambda: f(h, w, dense, hard_label_weight=-1.0)),
        (ValueError, "teacher.hidden must have the leading", lambda: f(h, w, TeacherHead(th[:4], tw, tb))),
        (ValueError, "teacher.weight must have shape", lambda: f(h, w, TeacherHead(th, tw[:, :3], tb))),
        (ValueError, "supports loss='kl' only", lambda: f(h, w, TopKTeacher(*dense.topk(3)), loss="jsd")),
        (ValueError, "distinct", lambda: f(h, w, TopKTeacher(dense[:, :2], torch.zeros_like(labels).unsqueeze(-1)
                                                             .expand(-1, 2).contiguous()))),
        (ValueError, "num_items_in_batch", lambda: f(h, w, dense, reduction="sum", num_items_in_batch=4)),
        (ValueError, "no T\\^2 factor", lambda: f(h, w, dense, loss="jsd", scale_by_temperature=True)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_op_rejects_bad_arguments_by_name(device):
    h, w, b, th, tw, tb, labels = _problem(device, seed=20)
    dense = F.linear(th, tw, tb)
    op = torch.ops.fastkd.fused_linear_kd_forward
    base = [h, w, b, dense, None, None, None, None, None, labels, None, None, "kl", [], 1.0, 1.0, 0.0, -100,
            "batchmean", False, False, False, 4, 1.0, 0.0, 1.0, 0.0, False, False, False]
    for index, value, match in [(3, None, "exactly one of"), (12, "dkd", "does not run 'dkd'"),
                                (22, 0, "chunk_size"), (1, w[:, :3], "student_weight"),
                                (11, torch.ones(13, device=device), "grad_rows"),
                                (23, 0.0, "student_logit_scale"), (24, -1.0, "student_softcap"),
                                (25, math.nan, "teacher_logit_scale"), (26, math.inf, "teacher_softcap")]:
        args = list(base)
        args[index] = value
        with pytest.raises(RuntimeError, match=match):
            op(*args)
