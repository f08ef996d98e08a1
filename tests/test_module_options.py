"""The per-row options through the nn.Module losses: ``standardize`` in the constructor (where the function
offers it), ``token_weights`` in ``forward``; each module equals its function called with the same arguments
(bit for bit), the options change the value (nothing silently dropped), and bad flags fail when the module is
built."""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.divergences import REGISTRY

ROWS, VOCAB = (3, 4), 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ROWS + (VOCAB,), generator=g, dtype=torch.float64) * 3.0
    t = torch.randn(ROWS + (VOCAB,), generator=g, dtype=torch.float64) * 3.0
    labels = torch.randint(0, VOCAB, ROWS, generator=g)
    labels[0, 1] = -100
    weights = torch.rand(ROWS, generator=g, dtype=torch.float64) * 2.0
    return s, t, labels, weights


def _generated():
    for spec in REGISTRY.values():
        if spec.generated:
            params = {p.name: p.default for p in spec.params if p.default is not None}
            params.update(spec.test_params[0] if spec.test_params else {})
            yield pytest.param(spec, params, id=spec.module)


# (module factory taking standardize, the function taking the same arguments); the forward is (s, t, labels)
STANDARDIZING = {
    "KDLoss": (lambda std: fastkd.KDLoss(2.0, alpha=0.2, standardize=std),
               lambda s, t, y, **k: fastkd.kd_loss(s, t, 2.0, alpha=0.2, labels=y, **k)),
    "ReverseKLLoss": (lambda std: fastkd.ReverseKLLoss(1.5, standardize=std),
                      lambda s, t, y, **k: fastkd.reverse_kl_loss(s, t, 1.5, labels=y, **k)),
    "JSDLoss": (lambda std: fastkd.JSDLoss(0.3, 1.5, standardize=std),
                lambda s, t, y, **k: fastkd.jsd_loss(s, t, 0.3, 1.5, labels=y, **k)),
    "TVDLoss": (lambda std: fastkd.TVDLoss(1.5, standardize=std),
                lambda s, t, y, **k: fastkd.tvd_loss(s, t, 1.5, labels=y, **k)),
    "DKDLoss": (lambda std: fastkd.DKDLoss(1.0, 4.0, 2.0, warmup=0, standardize=std),
                lambda s, t, y, **k: fastkd.dkd_loss(s, t, y, 1.0, 4.0, 2.0, **k)),
    "DivergenceLoss": (lambda std: fastkd.DivergenceLoss("skew_kl", 2.0, skew=0.2, standardize=std),
                       lambda s, t, y, **k: fastkd.divergence_loss(s, t, "skew_kl", 2.0, skew=0.2, labels=y, **k)),
}


def _vg(fn, s, t, *args, **kw):
    a = s.clone().requires_grad_(True)
    out = fn(a, t, *args, **kw)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), a.grad


def _same(x, y):
    for a, b in zip(x, y):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _differs(x, y):
    assert not torch.allclose(x[0], y[0]), "the option did not change the value"


@pytest.mark.parametrize("name", list(STANDARDIZING))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_hand_written_modules(name, reduction):
    make, fn = STANDARDIZING[name]
    s, t, y, w = _inputs(1)
    module = make(True)
    module.reduction = reduction
    got = _vg(lambda a, b: module(a, b, y, token_weights=w), s, t)
    want = _vg(lambda a, b: fn(a, b, y, reduction=reduction, token_weights=w, standardize=True), s, t)
    _same(got, want)
    plain = make(False)
    plain.reduction = reduction
    _differs(got, _vg(lambda a, b: plain(a, b, y), s, t))
    assert "standardize=True" in repr(module) and "standardize=False" in repr(plain)


@pytest.mark.parametrize("spec,params", list(_generated()))
def test_generated_modules(spec, params):
    s, t, y, w = _inputs(2)
    module = getattr(fastkd, spec.module)(**params, temperature=1.5, standardize=True)
    got = _vg(lambda a, b: module(a, b, y, token_weights=w), s, t)
    want = _vg(lambda a, b: fastkd.divergence_loss(a, b, spec.name, 1.5, labels=y, token_weights=w, standardize=True,
                                                   **params), s, t)
    _same(got, want)
    _differs(got, _vg(lambda a, b: getattr(fastkd, spec.module)(**params, temperature=1.5)(a, b, y), s, t))
    assert "standardize=True" in repr(module)


def test_topk_cosine_and_fused_head_modules():
    s, t, y, w = _inputs(3)
    vals, idx = t.topk(4, dim=-1)
    topk = fastkd.TopKKDLoss(2.0)
    got = _vg(lambda a, b: topk(a, vals, idx, y, token_weights=w), s, t)
    _same(got, _vg(lambda a, b: fastkd.topk_kd_loss(a, vals, idx, 2.0, labels=y, token_weights=w), s, t))
    _differs(got, _vg(lambda a, b: topk(a, vals, idx, y), s, t))

    cos = fastkd.CosineLoss(beta=0.7, alpha=0.2)
    got = _vg(lambda a, b: cos(a, b, y, token_weights=w), s, t)
    _same(got, _vg(lambda a, b: fastkd.cosine_loss(a, b, 0.7, alpha=0.2, labels=y, token_weights=w), s, t))
    _differs(got, _vg(lambda a, b: cos(a, b, y), s, t))

    g = torch.Generator().manual_seed(4)
    h = torch.randn(ROWS + (6,), generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, 6, generator=g, dtype=torch.float64)
    head = fastkd.FusedLinearKDLoss(loss="kl", temperature=2.0, hard_label_weight=0.3, chunk_size=5, standardize=True)
    got = _vg(lambda a, b: head(a, weight, b, y, token_weights=w), h, t)
    want = _vg(lambda a, b: fastkd.fused_linear_kd_loss(a, weight, b, loss="kl", temperature=2.0, hard_label_weight=0.3,
                                                        chunk_size=5, labels=y, token_weights=w, standardize=True),
               h, t)
    _same(got, want)
    _differs(got, _vg(lambda a, b: fastkd.FusedLinearKDLoss(loss="kl", temperature=2.0, hard_label_weight=0.3,
                                                            chunk_size=5)(a, weight, b, y), h, t))


def test_bad_module_arguments():
    for make in (lambda: fastkd.KDLoss(standardize="yes"), lambda: fastkd.JSDLoss(standardize=1),
                 lambda: fastkd.DivergenceLoss("kl", standardize=None), lambda: fastkd.SkewKLLoss(standardize="no"),
                 lambda: fastkd.FusedLinearKDLoss(standardize=0)):
        with pytest.raises(TypeError, match="standardize must be a bool"):
            make()
    # the generated modules check their arguments when built, as the hand-written ones
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        fastkd.SkewKLLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastkd.SkewKLLoss(reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastkd.SkewKLLoss(ignore_index=1.5)
    s, t, y, _ = _inputs(5)
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        fastkd.KDLoss()(s, t, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="standardize needs at least 2 classes"):
        fastkd.KDLoss(standardize=True)(s[..., :1], t[..., :1])


def _response_modules():
    """Every response loss module, built with its defaults (required arguments given)."""
    mods = [fastkd.KDLoss(), fastkd.ReverseKLLoss(), fastkd.JSDLoss(), fastkd.TVDLoss(), fastkd.DKDLoss(),
            fastkd.TopKKDLoss(), fastkd.DivergenceLoss("skew_kl", skew=0.2), fastkd.CosineLoss(),
            fastkd.FusedLinearKDLoss()]
    for param in _generated():
        spec, params = param.values
        mods.append(getattr(fastkd, spec.module)(**params))
    return mods


@pytest.mark.parametrize("module", _response_modules(), ids=lambda m: type(m).__name__)
def test_repr_shows_every_constructor_argument(module):
    """A module's repr names each of its constructor's arguments (those without a None default), so two modules
    that compute differently never print alike."""
    import inspect

    text = repr(module)
    for p in inspect.signature(type(module).__init__).parameters.values():
        if p.name == "self" or p.kind is p.VAR_KEYWORD or p.default is None:
            continue
        if p.name == "divergence":  # DivergenceLoss: the name itself, first
            assert repr(module.divergence) in text
            continue
        assert f"{p.name}=" in text, f"{type(module).__name__}: {p.name} missing from {text}"
