"""Issue 12, "every input gets the exact answer or a clear error": the shared argument checks of
fastkd._validation (one rule, one message naming the user-facing argument; TypeError for a wrong type,
ValueError for a value out of range), torch.compile of every public loss with symbolic hyperparameters, and
"one loss name, one value" across kd_loss, the fused linear head and the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference as R
from helpers import assert_close


def _logits(rows=6, vocab=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=dtype), torch.randn(rows, vocab, generator=g, dtype=dtype),
            torch.randint(0, vocab, (rows,), generator=g))


def _feat(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with dynamic=True and dynamic=False: every public loss, its hyperparameters
# passed as arguments of the compiled function (so that dynamic=True makes them symbolic)
# --------------------------------------------------------------------------------------------------------
def _compile_cases():
    s, t, y = _logits(6, 7, seed=1)
    vals, idx = t.topk(3)
    f_s, f_t = _feat((6, 5), 2), _feat((6, 4), 3)
    m_s, m_t = _feat((3, 2, 4, 4), 4), _feat((3, 5, 4, 4), 5)
    h, w = _feat((6, 5), 6), _feat((7, 5), 7)
    return {
        "kd_loss": (lambda s, t, y, T, a: fastkd.kd_loss(s, t, T, labels=y, alpha=a), (s, t, y, 2.0, 0.3)),
        "kd_loss_num_items": (lambda s, t, T, n: fastkd.kd_loss(s, t, T, num_items_in_batch=n), (s, t, 2.0, 5)),
        "reverse_kl_loss": (lambda s, t, y, T: fastkd.reverse_kl_loss(s, t, T, labels=y), (s, t, y, 1.5)),
        "jsd_loss": (lambda s, t, b, T: fastkd.jsd_loss(s, t, b, T), (s, t, 0.3, 1.5)),
        "tvd_loss": (lambda s, t, T: fastkd.tvd_loss(s, t, T), (s, t, 1.5)),
        "dkd_loss": (lambda s, t, y, a, b, T: fastkd.dkd_loss(s, t, y, a, b, T), (s, t, y, 1.0, 8.0, 4.0)),
        "topk_kd_loss": (lambda s, v, i, T: fastkd.topk_kd_loss(s, v, i, T), (s, vals, idx, 2.0)),
        "rkd_loss": (lambda a, b, wd, wa: fastkd.rkd_loss(a, b, wd, wa), (f_s, f_t, 25.0, 50.0)),
        "rkd_distance_loss": (lambda a, b: fastkd.rkd_distance_loss(a, b), (f_s, f_t)),
        "rkd_angle_loss": (lambda a, b: fastkd.rkd_angle_loss(a, b), (f_s, f_t)),
        "sp_loss": (lambda a, b, w0: fastkd.sp_loss([a, a], [b, b], weights=[w0, 2.0]), (f_s, f_t, 0.5)),
        "pkt_loss": (lambda a, b, e: fastkd.pkt_loss(a, b, e), (f_s, f_t, 1e-7)),
        "cc_loss": (lambda a, b, g, p: fastkd.cc_loss(a, b, "gaussian", g, p), (f_s, f_t, 0.4, 2)),
        "at_loss": (lambda a, b, p: fastkd.at_loss(a, b, p), (m_s, m_t, 2.0)),
        "nst_loss": (lambda a, b: fastkd.nst_loss(a, b), (m_s, m_t)),
        "hint_loss": (lambda a, b: fastkd.hint_loss(a, b), (f_s, f_s.flip(0))),
        "fused_linear_kd_loss": (
            lambda h, w, t, y, T, hw: fastkd.fused_linear_kd_loss(h, w, t, labels=y, temperature=T,
                                                                  hard_label_weight=hw, chunk_size=4),
            (h, w, t, y, 2.0, 0.25)),
        "fused_linear_kd_loss_jsd": (
            lambda h, w, t, b, T: fastkd.fused_linear_kd_loss(h, w, t, loss="jsd", beta=b, temperature=T),
            (h, w, t, 0.4, 1.5)),
    }


_COMPILE_CASES = _compile_cases()


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", sorted(_COMPILE_CASES))
def test_compile_fullgraph(name, dynamic, backend="aot_eager"):
    fn, args = _COMPILE_CASES[name]
    torch._dynamo.reset()

    def run(f):
        inputs = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                  and i == 0 else a for i, a in enumerate(args)]
        loss = f(*inputs)
        (grad,) = torch.autograd.grad(loss, inputs[0])
        return loss.detach(), grad

    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend))
    assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-7, what=f"{name} value")
    assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7, what=f"{name} gradient")


# --------------------------------------------------------------------------------------------------------
# bad input: the exact error type, and a message that names the user-facing argument
# --------------------------------------------------------------------------------------------------------
def _bad_cases():
    s, t, y = _logits(4, 5, seed=3)
    vals, idx = t.topk(2)
    h, w = _feat((4, 3), 8), _feat((5, 3), 9)
    f_s, f_t = _feat((4, 3), 10), _feat((4, 2), 11)
    m_s, m_t = _feat((2, 2, 4, 4), 12), _feat((2, 3, 4, 4), 13)
    from fastkd.distributed import vocab_parallel_fused_linear_kd_loss as vp_head
    from fastkd.distributed import vocab_parallel_kd_loss as vp

    calls = {  # name -> callable(**bad kwarg)
        "kd_loss": lambda **kw: fastkd.kd_loss(s, t, **kw),
        "reference.kd_loss": lambda **kw: R.kd_loss(s, t, **kw),
        "reverse_kl_loss": lambda **kw: fastkd.reverse_kl_loss(s, t, **kw),
        "jsd_loss": lambda **kw: fastkd.jsd_loss(s, t, **kw),
        "tvd_loss": lambda **kw: fastkd.tvd_loss(s, t, **kw),
        "dkd_loss": lambda **kw: fastkd.dkd_loss(s, t, y, **kw),
        "reference.dkd_loss": lambda **kw: R.dkd_loss(s, t, y, **kw),
        "topk_kd_loss": lambda **kw: fastkd.topk_kd_loss(s, vals, idx, **kw),
        "fused_linear_kd_loss": lambda **kw: fastkd.fused_linear_kd_loss(h, w, t, **kw),
        "reference.fused_linear_kd_loss": lambda **kw: R.fused_linear_kd_loss(h, w, t, **kw),
        "vocab_parallel_kd_loss": lambda **kw: vp(s, t, **kw),  # checked before any communication
        "vocab_parallel_fused_linear_kd_loss": lambda **kw: vp_head(h, w, t, **kw),  # likewise
        "KDLoss": lambda **kw: fastkd.KDLoss(**kw),
        "ReverseKLLoss": lambda **kw: fastkd.ReverseKLLoss(**kw),
        "JSDLoss": lambda **kw: fastkd.JSDLoss(**kw),
        "TVDLoss": lambda **kw: fastkd.TVDLoss(**kw),
        "DKDLoss": lambda **kw: fastkd.DKDLoss(**kw),
        "TopKKDLoss": lambda **kw: fastkd.TopKKDLoss(**kw),
        "FusedLinearKDLoss": lambda **kw: fastkd.FusedLinearKDLoss(**kw),
    }
    temperature_takers = list(calls)
    bad = []
    # the response functions take a tensor temperature (0-dim or one per row): a wrong shape is a ValueError
    tensor_takers = {"kd_loss", "reference.kd_loss", "reverse_kl_loss", "jsd_loss", "tvd_loss", "dkd_loss",
                     "reference.dkd_loss", "topk_kd_loss", "fused_linear_kd_loss", "reference.fused_linear_kd_loss",
                     "vocab_parallel_kd_loss", "vocab_parallel_fused_linear_kd_loss"}
    for name in tensor_takers:
        bad.append((name, calls[name], {"temperature": torch.ones(3)}, ValueError, "temperature as a tensor"))
        bad.append((name, calls[name], {"temperature": torch.ones(4, dtype=torch.long)}, TypeError, "temperature"))
    for name in temperature_takers:
        tensor, tensor_exc = (torch.ones(2), ValueError) if name in tensor_takers else (torch.tensor(2.0), TypeError)
        for value, exc in (("2", TypeError), (True, TypeError), (tensor, tensor_exc), (None, TypeError),
                           (5e-324, ValueError), (0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                           (math.nan, ValueError), (2.0**64, ValueError), (1e-20, ValueError)):
            bad.append((name, calls[name], {"temperature": value}, exc, "temperature"))
    flags = {
        "scale_by_temperature": ["kd_loss", "reference.kd_loss", "reverse_kl_loss", "topk_kd_loss",
                                 "fused_linear_kd_loss", "reference.fused_linear_kd_loss", "vocab_parallel_kd_loss",
                                 "vocab_parallel_fused_linear_kd_loss", "KDLoss", "ReverseKLLoss", "TopKKDLoss",
                                 "FusedLinearKDLoss"],
        "return_parts": ["kd_loss", "reference.kd_loss", "fused_linear_kd_loss", "vocab_parallel_fused_linear_kd_loss",
                         "KDLoss", "FusedLinearKDLoss"],
    }
    for flag, names in flags.items():
        for name in names:
            for value in ("no", 0, 1, torch.tensor(True)):
                bad.append((name, calls[name], {flag: value}, TypeError, flag))
    for name in ("kd_loss", "reference.kd_loss", "KDLoss"):
        bad.append((name, calls[name], {"alpha": 1.5}, ValueError, r"alpha must be in \[0, 1\] when beta is None"))
        bad.append((name, calls[name], {"alpha": -0.5}, ValueError, "alpha"))
        bad.append((name, calls[name], {"alpha": 0.5, "beta": -1.0}, ValueError, "beta"))
        bad.append((name, calls[name], {"alpha": "0.5"}, TypeError, "alpha"))
    for name in ("fused_linear_kd_loss", "FusedLinearKDLoss"):
        bad.append((name, calls[name], {"hard_label_weight": 1.5}, ValueError,
                    r"hard_label_weight must be in \[0, 1\] when soft_weight is None"))
        bad.append((name, calls[name], {"soft_weight": -1.0}, ValueError, "soft_weight"))
        bad.append((name, calls[name], {"soft_weight": "1"}, TypeError, "soft_weight"))
        bad.append((name, calls[name], {"chunk_size": 2.0}, TypeError, "chunk_size"))
        bad.append((name, calls[name], {"chunk_size": True}, TypeError, "chunk_size"))
        bad.append((name, calls[name], {"chunk_size": 0}, ValueError, "chunk_size"))
        bad.append((name, calls[name], {"loss": 1}, TypeError, "loss"))
        bad.append((name, calls[name], {"loss": "jsd", "scale_by_temperature": True}, ValueError, "no T\\^2"))
    for name in ("kd_loss", "jsd_loss", "tvd_loss", "reverse_kl_loss", "dkd_loss", "topk_kd_loss",
                 "fused_linear_kd_loss", "reference.kd_loss"):
        for value, exc in ((torch.tensor(0), ValueError), (torch.tensor(-2.0), ValueError),
                           (torch.tensor(math.nan), ValueError), (torch.tensor(math.inf), ValueError),
                           (0, ValueError), (-1.5, ValueError), (math.inf, ValueError), (True, TypeError),
                           ("4", TypeError), (torch.tensor(True), TypeError), (torch.ones(2), ValueError)):
            bad.append((name, calls[name], {"num_items_in_batch": value}, exc, "num_items_in_batch"))
    for name in ("kd_loss", "jsd_loss", "fused_linear_kd_loss", "KDLoss", "JSDLoss", "vocab_parallel_kd_loss"):
        bad.append((name, calls[name], {"reduction": 1}, TypeError, "reduction"))
        bad.append((name, calls[name], {"reduction": "avg"}, ValueError, "reduction"))
        bad.append((name, calls[name], {"ignore_index": True}, TypeError, "ignore_index"))
        bad.append((name, calls[name], {"ignore_index": -100.0}, TypeError, "ignore_index"))
    for name in ("jsd_loss", "JSDLoss"):
        bad.append((name, calls[name], {"beta": 1.5}, ValueError, "beta"))
        bad.append((name, calls[name], {"beta": "0.5"}, TypeError, "beta"))
    for name in ("dkd_loss", "reference.dkd_loss", "DKDLoss"):
        for arg in ("alpha", "beta"):
            bad.append((name, calls[name], {arg: -1.0}, ValueError, arg))
            bad.append((name, calls[name], {arg: False}, TypeError, arg))
    bad.append(("DKDLoss", calls["DKDLoss"], {"warmup": -1}, ValueError, "warmup"))
    bad.append(("DKDLoss", calls["DKDLoss"], {"warmup": "20"}, TypeError, "warmup"))
    for name in ("topk_kd_loss", "TopKKDLoss"):
        bad.append((name, calls[name], {"values_are": 1}, TypeError, "values_are"))
        bad.append((name, calls[name], {"tail": "cut"}, ValueError, "tail"))
    # dkd's out-of-range target names `target`
    bad.append(("dkd_loss target", lambda: fastkd.dkd_loss(s, t, y + 10), {}, ValueError, r"\btarget\b"))
    bad.append(("reference.dkd_loss target", lambda: R.dkd_loss(s, t, y + 10), {}, ValueError, r"\btarget\b"))
    # relation / feature hyperparameters
    rel = [
        (lambda **kw: fastkd.rkd_loss(f_s, f_t, **kw), "distance_weight", [("25", TypeError), (True, TypeError),
                                                                            (-1.0, ValueError)]),
        (lambda **kw: fastkd.RKDLoss(**kw), "angle_weight", [(None, TypeError), (math.nan, ValueError)]),
        (lambda **kw: fastkd.pkt_loss(f_s, f_t, **kw), "eps", [("1e-7", TypeError), (0.0, ValueError)]),
        (lambda **kw: fastkd.PKTLoss(**kw), "eps", [(True, TypeError), (-1.0, ValueError)]),
        (lambda **kw: fastkd.cc_loss(f_s, f_t, **kw), "gamma", [(True, TypeError), (math.inf, ValueError)]),
        (lambda **kw: fastkd.cc_loss(f_s, f_t, **kw), "max_p", [(10**12, ValueError), (171, ValueError),
                                                                (2.0, TypeError), (True, TypeError)]),
        (lambda **kw: R.cc_loss(f_s, f_t, **kw), "max_p", [(10**12, ValueError)]),
        (lambda **kw: fastkd.CCLoss(**kw), "max_p", [(10**12, ValueError)]),
        (lambda **kw: fastkd.cc_loss(f_s, f_t, **kw), "kernel", [(1, TypeError), ("rbf", ValueError)]),
        (lambda **kw: fastkd.at_loss(m_s, m_t, **kw), "p", [("2", TypeError), (0, ValueError)]),
        (lambda **kw: fastkd.ATLoss(**kw), "mode", [(None, TypeError), ("both", ValueError)]),
        (lambda **kw: fastkd.sp_loss([f_s], [f_t], **kw), "weights", [(["1"], TypeError), ([True], TypeError),
                                                                     ([-1.0], ValueError)]),
        (lambda **kw: fastkd.sp_loss(f_s, f_t, **kw), "reduction", [(None, TypeError), ("none", ValueError)]),
        (lambda **kw: fastkd.hint_loss(f_s, f_s, **kw), "reduction", [(2, TypeError), ("batchmean", ValueError)]),
    ]
    for fn, arg, values in rel:
        for value, exc in values:
            bad.append((f"{arg}={value!r}", fn, {arg: value}, exc, r"weights\[0\]" if arg == "weights" and
                        isinstance(value[0], (str, bool)) or arg == "weights" and value == [-1.0] else arg))
    bad.append(("DKDLoss epoch", lambda: fastkd.DKDLoss().warmup_factor("3"), {}, TypeError, "epoch"))
    return bad


_BAD = _bad_cases()


@pytest.mark.parametrize("case", range(len(_BAD)), ids=[f"{c[0]}-{sorted(c[2].items())!r}"[:90] for c in _BAD])
def test_bad_input_names_the_argument(case):
    _, call, kwargs, exc, match = _BAD[case]
    with pytest.raises(exc, match=match) as info:
        call(**kwargs)
    assert type(info.value) is exc  # not a subclass (e.g. a RuntimeError from the op)


def test_cc_huge_max_p_fails_fast():
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"max_p must be in \[1, 170\]"):
        fastkd.cc_loss(_feat((4, 3)), _feat((4, 3), 1), max_p=10**12)
    assert time.perf_counter() - start < 1.0
    # the bound itself is valid and finite
    s, t = _feat((5, 3), 2).double() * 0.3, _feat((5, 3), 3).double() * 0.3
    assert_close(fastkd.cc_loss(s, t, max_p=170), R.cc_loss(s, t, max_p=170), rtol=1e-10, atol=0, what="max_p 170")


# --------------------------------------------------------------------------------------------------------
# valid input that used to be refused, or mis-weighted
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_any_integer_label_dtype(dtype):
    s, t, y = _logits(6, 7, seed=4, dtype=torch.float64)
    y[1] = 3
    yl = y.clone()
    y_d = y.to(dtype)
    ign = 255 if dtype == torch.uint8 else -100
    y_d[2], yl[2] = ign, ign  # one ignored row
    vals, idx = t.topk(3)
    h, w = _feat((6, 4), 5).double(), _feat((7, 4), 6).double()
    pairs = [
        (lambda lab: R.kd_loss(s, t, 2.0, labels=lab, alpha=0.3, ignore_index=ign),) * 1,
        (lambda lab: fastkd.kd_loss(s, t, 2.0, labels=lab, alpha=0.3, ignore_index=ign),),
        (lambda lab: R.dkd_loss(s, t, lab, ignore_index=ign),),
        (lambda lab: fastkd.dkd_loss(s, t, lab, ignore_index=ign),),
        (lambda lab: R.jsd_loss(s, t, labels=lab, ignore_index=ign),),
        (lambda lab: R.topk_kd_loss(s, vals, idx, labels=lab, ignore_index=ign),),
        (lambda lab: R.fused_linear_kd_loss(h, w, t, labels=lab, hard_label_weight=0.4, ignore_index=ign),),
        (lambda lab: fastkd.fused_linear_kd_loss(h, w, t, labels=lab, hard_label_weight=0.4, ignore_index=ign),),
    ]
    for (fn,) in pairs:
        assert_close(fn(y_d), fn(yl), rtol=1e-12, atol=0, what=f"labels {dtype}")


def test_kd_alpha_above_one_with_explicit_beta():
    s, t, y = _logits(5, 6, seed=5, dtype=torch.float64)
    got = fastkd.kd_loss(s, t, 2.0, labels=y, alpha=1.5, beta=0.25)
    ce = F.cross_entropy(s, y)
    kd = R.kd_loss(s, t, 2.0)
    assert_close(got, 1.5 * ce + 0.25 * kd, rtol=1e-12, atol=0, what="alpha 1.5, beta 0.25")


def test_num_items_in_batch_valid_forms_agree():
    s, t, _ = _logits(5, 6, seed=6, dtype=torch.float64)
    ref = R.kd_loss(s, t, 2.0, reduction="sum") / 7
    for n in (7, 7.0, torch.tensor(7), torch.tensor(7.0, dtype=torch.float32)):
        assert_close(fastkd.kd_loss(s, t, 2.0, num_items_in_batch=n), ref, rtol=1e-12, atol=0, what=repr(n))


def test_temperature_range_edges_are_valid():
    s, t, _ = _logits(4, 5, seed=7, dtype=torch.float64)
    for T in (2.0**-63, 2.0**63, 1, 3):
        got = fastkd.kd_loss(s * 1e-20 if T < 1 else s, t * 1e-20 if T < 1 else t, T)
        assert torch.isfinite(got)


# --------------------------------------------------------------------------------------------------------
# one loss name, one value: kd_loss / reverse_kl_loss / jsd_loss, the fused head (dense teacher, identity
# student head) and the reference, with the same arguments and their defaults
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("hard", [0.0, 0.3])
@pytest.mark.parametrize("module", [False, True])
def test_one_loss_name_one_value(loss, hard, module):
    g = torch.Generator().manual_seed(11)
    rows, vocab, T = 6, 8, 2.0
    s = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    t = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[1] = -100
    eye = torch.eye(vocab, dtype=torch.float64)  # logits = s @ I^T = s
    if loss == "kl":
        expected = fastkd.kd_loss(s, t, T, labels=y, alpha=hard)
        ref = R.kd_loss(s, t, T, labels=y, alpha=hard)
    else:
        soft = (fastkd.reverse_kl_loss(s, t, T, labels=y) if loss == "reverse_kl"
                else fastkd.jsd_loss(s, t, 0.5, T, labels=y))
        soft_ref = R.reverse_kl_loss(s, t, T, labels=y) if loss == "reverse_kl" else R.jsd_loss(s, t, 0.5, T, labels=y)
        ce = F.cross_entropy(s, y, ignore_index=-100)
        expected = (1 - hard) * soft + hard * ce
        ref = (1 - hard) * soft_ref + hard * ce
    kw = dict(loss=loss, beta=0.5, temperature=T, hard_label_weight=hard)
    if module:
        fused = fastkd.FusedLinearKDLoss(**kw, chunk_size=4)(s, eye, t, y)
    else:
        fused = fastkd.fused_linear_kd_loss(s, eye, t, labels=y, chunk_size=4, **kw)
    fused_ref = R.fused_linear_kd_loss(s, eye, t, labels=y, **kw)
    for what, value in (("fused", fused), ("fused reference", fused_ref), ("reference", ref)):
        assert_close(value, expected, rtol=1e-12, atol=0, what=f"{loss} {what}")
    # and T^2 is really in it for the KL-type losses (the change of default): 4x the bare KL at T = 2
    if loss != "jsd" and hard == 0.0:
        bare = fastkd.fused_linear_kd_loss(s, eye, t, labels=y, scale_by_temperature=False, **kw)
        assert_close(fused, T * T * bare, rtol=1e-12, atol=0, what="T^2")


def test_fused_module_return_parts_in_constructor():
    s, t, y = _logits(5, 6, seed=8, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    parts = fastkd.FusedLinearKDLoss(temperature=2.0, hard_label_weight=0.4, return_parts=True)(s, eye, t, y)
    ref = fastkd.fused_linear_kd_loss(s, eye, t, labels=y, temperature=2.0, hard_label_weight=0.4,
                                      return_parts=True)
    assert isinstance(parts, fastkd.LossParts)
    for a, b in zip(parts, ref):
        assert_close(a, b, rtol=0, atol=0, what="parts")
    with pytest.raises(TypeError, match="return_parts"):
        fastkd.FusedLinearKDLoss()(s, eye, t, y, return_parts=True)
