"""fastkd.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss (imported from
the installed trl and called directly), for every reduction and num_items_in_batch, values and gradients; the
per-entry "none" tensor; the -inf-safe differences; fastkd.jsd_loss's num_items_in_batch convention."""

from __future__ import annotations

import math

import pytest
import torch

import fastkd

trl_gkd = pytest.importorskip("trl.experimental.gkd")
from fastkd.integrations import trl as fk_trl  # noqa: E402

TRL = trl_gkd.GKDTrainer.generalized_jsd_loss


def _logits(shape, seed, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.3] = -100
    y.view(-1)[0] = 3  # at least one kept row
    return y


def _value_and_grads(fn, s, t, **kw):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = fn(s, t, **kw)
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    gs, gt = torch.autograd.grad((out * w).sum(), (s, t))
    return out.detach(), gs, gt


CASES = [
    dict(reduction="batchmean"),
    dict(reduction="sum"),
    dict(reduction="mean"),
    dict(reduction="none"),
    dict(reduction="batchmean", labels=True),
    dict(reduction="sum", labels=True),
    dict(reduction="mean", labels=True),
    dict(reduction="none", labels=True),
    dict(reduction="batchmean", num_items=7),
    dict(reduction="mean", num_items=7),
    dict(reduction="sum", num_items=torch.tensor(5)),
    dict(reduction="none", num_items=torch.tensor(11.0), labels=True),
]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_equals_trl_float64(case, beta):
    shape = (2, 5, 19)
    s, t = _logits(shape, 1), _logits(shape, 2)
    kw = dict(beta=beta, temperature=1.7, reduction=case["reduction"])
    if case.get("labels"):
        kw["labels"] = _labels(shape[:-1], shape[-1], 3)
    if "num_items" in case:
        kw["num_items_in_batch"] = case["num_items"]
    ours = _value_and_grads(fk_trl.generalized_jsd_loss, s, t, **kw)
    theirs = _value_and_grads(TRL, s, t, **kw)
    assert ours[0].shape == theirs[0].shape
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_equals_trl_float32_and_2d():
    s, t = _logits((9, 64), 4, torch.float32), _logits((9, 64), 5, torch.float32)
    y = _labels((9,), 64, 6)
    for red in ("batchmean", "sum", "mean", "none"):
        for labels in (None, y):
            a = fk_trl.generalized_jsd_loss(s, t, labels, 0.5, 2.0, red)
            b = TRL(s.double(), t.double(), labels, 0.5, 2.0, red)
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)
            assert a.dtype == torch.float32


def test_signature_is_trls():
    import inspect

    ours = inspect.signature(fk_trl.generalized_jsd_loss).parameters
    theirs = inspect.signature(TRL).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_none_is_per_entry_and_fused_sums_agree():
    s, t = _logits((3, 4, 23), 10), _logits((3, 4, 23), 11)
    y = _labels((3, 4), 23, 12)
    entries = fk_trl.generalized_jsd_loss(s, t, y, 0.3, 1.5, "none")
    kept = int((y != -100).sum())
    assert entries.shape == (kept, 23)
    # the fused kernels' row values are these entries summed over V
    rows = fastkd.jsd_loss(s, t, 0.3, 1.5, reduction="none", labels=y)[y != -100]
    torch.testing.assert_close(entries.sum(-1), rows, rtol=1e-10, atol=1e-12)


def test_minus_inf_entries_are_zero_not_nan():
    s, t = _logits((2, 3, 13), 13), _logits((2, 3, 13), 14)
    s[..., 5:8] = -math.inf
    t[..., 5:8] = -math.inf
    s[1, 2] = -math.inf  # a fully masked row
    t[1, 2] = -math.inf
    for beta in (0.0, 0.5, 1.0):
        assert torch.isnan(TRL(s, t, beta=beta, reduction="sum"))  # TRL: 0 * (-inf)
        entries = fk_trl.generalized_jsd_loss(s, t, beta=beta, reduction="none")
        assert torch.isfinite(entries).all()
        assert (entries[..., 5:8] == 0).all() and (entries[1, 2] == 0).all()
        total = fk_trl.generalized_jsd_loss(s, t, beta=beta, reduction="sum")
        torch.testing.assert_close(total, entries.sum(), rtol=1e-10, atol=1e-12)
        sg = s.clone().requires_grad_(True)
        fk_trl.generalized_jsd_loss(sg, t, beta=beta, reduction="none").sum().backward()
        assert torch.isfinite(sg.grad).all()


def test_no_kept_rows_and_bad_input():
    s, t = _logits((2, 3, 5), 15), _logits((2, 3, 5), 16)
    y = torch.full((2, 3), -100)
    assert fk_trl.generalized_jsd_loss(s, t, y, reduction="batchmean").item() == 0.0  # TRL: 0 as well
    assert TRL(s, t, y, reduction="batchmean").item() == 0.0
    assert fk_trl.generalized_jsd_loss(s, t, y, reduction="mean").item() == 0.0  # TRL: NaN (empty mean)
    assert fk_trl.generalized_jsd_loss(s, t, y, reduction="none").shape == (0, 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fk_trl.generalized_jsd_loss(s, t, reduction="batch_mean")
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and > 0"):
        fk_trl.generalized_jsd_loss(s, t, num_items_in_batch=torch.tensor(0.0))
    with pytest.raises(ValueError, match="beta"):
        fk_trl.generalized_jsd_loss(s, t, beta=1.5)


def test_jsd_loss_num_items_convention():
    """fastkd.jsd_loss keeps the library convention: num_items replaces the counted rows of batchmean / mean."""
    s, t = _logits((4, 6, 17), 17), _logits((4, 6, 17), 18)
    y = _labels((4, 6), 17, 19)
    total = fastkd.jsd_loss(s, t, 0.4, reduction="sum", labels=y)
    torch.testing.assert_close(fastkd.jsd_loss(s, t, 0.4, labels=y, num_items_in_batch=9), total / 9)
    torch.testing.assert_close(fastkd.jsd_loss(s, t, 0.4, labels=y, reduction="mean", num_items_in_batch=9),
                               total / (9 * 17))
    torch.testing.assert_close(fastkd.jsd_loss(s, t, 0.4, labels=y, num_items_in_batch=9),
                               TRL(s, t, y, 0.4, num_items_in_batch=9), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cannot be used with reduction='sum'"):
        fastkd.jsd_loss(s, t, 0.4, reduction="sum", num_items_in_batch=9)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    s, t = _logits((2, 4, 31), 20, torch.float32), _logits((2, 4, 31), 21, torch.float32)
    y = _labels((2, 4), 31, 22)

    def step(a, b, y):
        return fk_trl.generalized_jsd_loss(a, b, y, 0.3, 1.0, "batchmean", 5) + \
            fk_trl.generalized_jsd_loss(a, b, y, 0.3, 1.0, "sum")

    sc = s.clone().requires_grad_(True)
    se = s.clone().requires_grad_(True)
    lc = torch.compile(step, fullgraph=True)(sc, t, y)
    lc.backward()
    le = step(se, t, y)
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(sc.grad, se.grad, rtol=1e-5, atol=1e-7)
