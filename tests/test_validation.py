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
from fastkd import TeacherHead
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
