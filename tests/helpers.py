"""Shared test utilities: float64 oracles and the anchors' eager formulations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastkd


def oracle_kd(s, t, temperature, **kw):
    """fastkd.reference.kd_loss in float64 (the oracle)."""
    return fastkd.reference.kd_loss(s.double(), t.double(), temperature, **kw)


def repdistiller_distill_kl(y_s, y_t, T):
    """RepDistiller's DistillKL.forward, verbatim in formula (size_average=False == reduction='sum')."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def value_and_grads(fn, s, t, *args, grad_out=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(t.requires_grad)
    loss = fn(s, t, *args, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    inputs = (s, t) if t.requires_grad else (s,)
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads


def assert_close(actual, expected, rtol, atol, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
