"""fastkd.integrations.torchdistill: each registered loss, built by torchdistill's own factory from a config, equals
torchdistill's class built from the same config under its original key (value and gradients), and a torchdistill
YAML config switches to fastkd by changing only the key."""

from __future__ import annotations

import copy
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchdistill")

from torchdistill.common.main_util import import_dependencies  # noqa: E402
from torchdistill.common.yaml_util import load_yaml_file  # noqa: E402
from torchdistill.losses import mid_level as td_mid  # noqa: E402
from torchdistill.losses.registry import (  # noqa: E402
    MIDDLE_LEVEL_LOSS_DICT,
    get_high_level_loss,
    get_mid_level_loss,
)

import fastkd  # noqa: E402
import fastkd.integrations.torchdistill as ftd  # noqa: E402

# torchdistill's KLDivLoss(reduction="mean") warns that "mean" divides by the support size too: that is the point
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")

README = Path(__file__).resolve().parents[1] / "README.md"
DTYPES = [torch.float32, torch.float64]
# (rtol, atol) of fastkd vs torchdistill run in the same dtype: float64 is exact to rounding; float32 allows the
# rounding of two different float32 formulations (fastkd accumulates in float32 or float64, torchdistill in the
# input dtype)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def _build(key, kwargs):
    return get_mid_level_loss({"key": key, "kwargs": copy.deepcopy(kwargs)})


def _nest(leaves):
    out = {}
    for (path, io), x in leaves.items():
        out.setdefault(path, {})[io] = x
    return out


def _value_and_grads(loss_module, s_spec, t_spec, targets, teacher_grad):
    s_leaves = {k: x.detach().clone().requires_grad_(True) for k, x in s_spec.items()}
    t_leaves = {k: x.detach().clone().requires_grad_(teacher_grad) for k, x in t_spec.items()}
    loss = loss_module(_nest(s_leaves), _nest(t_leaves), targets)
    inputs = list(s_leaves.values()) + (list(t_leaves.values()) if teacher_grad else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return loss.detach(), grads


def assert_matches(orig_key, kwargs, s_spec, t_spec, targets=None, *, teacher_grad=False, dtype=torch.float64,
                   fast_kwargs=None, device="cpu"):
    """fastkd's loss (key ``fastkd.<orig_key>``, ``fast_kwargs`` or the same kwargs) == torchdistill's
    ``orig_key`` built from ``kwargs``, in value and in the gradients of every student (and, with
    ``teacher_grad``, teacher) tensor."""
    s_spec = {k: x.to(device, dtype) for k, x in s_spec.items()}
    t_spec = {k: x.to(device, dtype) for k, x in t_spec.items()}
    targets = targets.to(device) if isinstance(targets, torch.Tensor) else targets
    fast = _build("fastkd." + orig_key, kwargs if fast_kwargs is None else fast_kwargs)
    orig = _build(orig_key, kwargs)
    assert isinstance(fast, ftd.LOSSES["fastkd." + orig_key])
    assert type(orig) is getattr(td_mid, orig_key)
    v_fast, g_fast = _value_and_grads(fast, s_spec, t_spec, targets, teacher_grad)
    v_orig, g_orig = _value_and_grads(orig, s_spec, t_spec, targets, teacher_grad)
    rtol, atol = TOL[dtype]
    assert v_fast.dtype == v_orig.dtype
    assert v_fast.shape == v_orig.shape or (v_fast.numel() == 1 and v_orig.numel() == 1)
    torch.testing.assert_close(v_fast.reshape(v_orig.shape), v_orig, rtol=rtol, atol=atol)
    assert torch.isfinite(v_orig).all()
    for i, (a, b) in enumerate(zip(g_fast, g_orig)):
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, scale), msg=lambda m: f"gradient {i}: {m}")
    return v_fast


# ---- KDLoss ----------------------------------------------------------------------------------------------
KD_IO = dict(student_module_path=".", student_module_io="output", teacher_module_path=".", teacher_module_io="output")


def _logits(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return {(".", "output"): scale * torch.randn(*shape, generator=g, dtype=torch.float64)}


def _targets(n_or_shape, classes, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (n_or_shape,) if isinstance(n_or_shape, int) else n_or_shape
    return torch.randint(0, classes, shape, generator=g)


KD_CONFIGS = [
    dict(temperature=4.0, alpha=0.5),                                  # mixed, beta = 1 - alpha
    dict(temperature=2.0, alpha=0.3, beta=0.9, reduction="sum"),       # mixed, both weights
    dict(temperature=3.0, alpha=0.1, beta=9.0, reduction="mean"),      # mixed, KLDivLoss 'mean'
    dict(temperature=1.0, alpha=0.0),                                  # soft only (no T^2)
    dict(temperature=4.0, alpha=None, beta=1.0),                       # soft only
    dict(temperature=0.5, alpha=0.0, reduction="sum"),
    dict(temperature=2.0, alpha=1.5),                                  # beta = -0.5: outside the fused kernel's range
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (17, 100)])
@pytest.mark.parametrize("config", KD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kd_loss(config, shape, dtype, device):
    kwargs = dict(KD_IO, **config)
    s, t = _logits(shape, 1), _logits(shape, 2)
    y = _targets(shape[0], shape[1], 3)
    assert_matches("KDLoss", kwargs, s, t, y, dtype=dtype, teacher_grad=True, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_loss_without_targets_is_the_soft_branch(dtype):
    kwargs = dict(KD_IO, temperature=4.0, alpha=0.5)
    value = assert_matches("KDLoss", kwargs, _logits((6, 9), 4), _logits((6, 9), 5), None, dtype=dtype)
    soft_only = _build("fastkd.KDLoss", dict(KD_IO, temperature=4.0, alpha=0.0))
    s, t = _logits((6, 9), 4)[(".", "output")], _logits((6, 9), 5)[(".", "output")]
    expected = soft_only(_nest({(".", "output"): s.to(dtype)}), _nest({(".", "output"): t.to(dtype)}), None)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_kd_loss_mixed_branch_runs_fused(monkeypatch):
    """[N, C] logits with int64 targets, none ignored: one fused kd_loss call, no nn.CrossEntropyLoss."""
    def no_composition(*args, **kwargs):
        raise AssertionError("the mixed branch fell back to the composition")

    monkeypatch.setattr(ftd.KDLoss, "_compose", no_composition)
    kwargs = dict(KD_IO, temperature=4.0, alpha=0.5)
    assert_matches("KDLoss", kwargs, _logits((8, 10), 6), _logits((8, 10), 7), _targets(8, 10, 8))
    kwargs = dict(KD_IO, temperature=4.0, alpha=0.5, ignore_index=-1)
    assert_matches("KDLoss", kwargs, _logits((8, 10), 6), _logits((8, 10), 7), _targets(8, 10, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ce_kwargs", [
    dict(label_smoothing=0.1),
    dict(ignore_index=3),     # some targets are 3: they drop out of the CE but their rows stay in the KL
], ids=["label_smoothing", "ignored_targets"])
def test_kd_loss_cross_entropy_kwargs(ce_kwargs, dtype, device):
    y = _targets(12, 5, 9)
    y[::3] = 3
    kwargs = dict(KD_IO, temperature=2.0, alpha=0.4, **ce_kwargs)
    value = assert_matches("KDLoss", kwargs, _logits((12, 5), 10), _logits((12, 5), 11), y, dtype=dtype, device=device)
    # not vacuous: the fused mix (rows with an ignored target dropped from the KL too) is another number
    s, t = _logits((12, 5), 10)[(".", "output")].to(dtype), _logits((12, 5), 11)[(".", "output")].to(dtype)
    fused = fastkd.kd_loss(s, t, 2.0, labels=y, alpha=0.4, ignore_index=ce_kwargs.get("ignore_index", -100))
    assert (fused - value.cpu()).abs() > 1e-3


@pytest.mark.parametrize("config", [
    dict(temperature=2.0, alpha=0.0),
    dict(temperature=2.0, alpha=0.0, reduction="mean"),
    dict(temperature=3.0, alpha=0.5),
    dict(temperature=3.0, alpha=0.5, reduction="sum"),
], ids=["soft-batchmean", "soft-mean", "mixed-batchmean", "mixed-sum"])
def test_kd_loss_segmentation_shaped_logits(config, device):
    """[N, C, H, W] logits: torchdistill's softmax over dim 1, KLDivLoss's batchmean over N."""
    kwargs = dict(KD_IO, **config)
    y = _targets((2, 3, 5), 6, 12)
    assert_matches("KDLoss", kwargs, _logits((2, 6, 3, 5), 13), _logits((2, 6, 3, 5), 14), y, device=device)


def test_kd_loss_alpha_and_beta_none():
    """torchdistill fails on 1 - None; fastkd's class is the soft-only loss then."""
    with pytest.raises(TypeError):
        _build("KDLoss", dict(KD_IO, temperature=2.0))
    kwargs = dict(KD_IO, temperature=2.0, alpha=None, beta=1.0)
    assert_matches("KDLoss", kwargs, _logits((4, 6), 15), _logits((4, 6), 16), _targets(4, 6, 17),
                   fast_kwargs=dict(KD_IO, temperature=2.0))


# ---- LogitStdKDLoss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [
    dict(temperature=2.0, alpha=0.5, beta=9.0),   # torchdistill's documented config
    dict(temperature=1.0, alpha=0.0),
    dict(temperature=3.0, eps=1e-3, alpha=0.2, reduction="sum"),
], ids=["mixed", "soft", "mixed-sum-eps"])
@pytest.mark.parametrize("shape", [(2, 3), (9, 50)])
def test_logit_std_kd_loss(config, shape, dtype, device):
    kwargs = dict(KD_IO, **config)
    assert_matches("LogitStdKDLoss", kwargs, _logits(shape, 20), _logits(shape, 21), _targets(shape[0], shape[1], 22),
                   dtype=dtype, teacher_grad=True, device=device)


def test_logit_std_kd_loss_three_dim_logits():
    """[N, C, L]: torchdistill standardizes over the last dim and softmaxes over dim 1; so does fastkd's class."""
    for config in (dict(temperature=2.0, alpha=0.0), dict(temperature=2.0, alpha=0.5, beta=2.0)):
        assert_matches("LogitStdKDLoss", dict(KD_IO, **config), _logits((3, 5, 4), 23), _logits((3, 5, 4), 24),
                       _targets((3, 4), 5, 25))


# ---- DISTLoss ----------------------------------------------------------------------------------------------
DIST_CONFIGS = [
    dict(),                                             # torchdistill's defaults: beta = gamma = tau = 1, eps = 1e-8
    dict(beta=1.0, gamma=1.0, tau=4.0),
    dict(beta=2.0, gamma=0.5, tau=0.5, eps=1e-3),
    dict(beta=0.0, gamma=2.0, tau=2.0),                 # the intra-class (column) term alone
    dict(beta=1.5, gamma=0.0, tau=1.0, unused_option=3),  # the inter-class term alone; torchdistill ignores kwargs
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (17, 100)])
@pytest.mark.parametrize("config", DIST_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_dist_loss(config, shape, dtype, device):
    kwargs = dict(KD_IO, **config)
    assert_matches("DISTLoss", kwargs, _logits(shape, 90), _logits(shape, 91), dtype=dtype, teacher_grad=True,
                   device=device)


def test_dist_loss_io_keys_and_frozen_teacher(device):
    """Another module path and io on each side; a teacher without grad gets none (torchdistill: the same)."""
    kwargs = dict(student_module_path="fc", student_module_io="input", teacher_module_path="head",
                  teacher_module_io="output", tau=2.0)
    s = {("fc", "input"): _logits((6, 12), 92)[(".", "output")]}
    t = {("head", "output"): _logits((6, 12), 93)[(".", "output")]}
    assert_matches("DISTLoss", kwargs, s, t, device=device)
    value = _build("fastkd.DISTLoss", kwargs)(_nest(s), _nest(t))
    expected = fastkd.dist_loss(s[("fc", "input")], t[("head", "output")], tau=2.0)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)


# ---- relation losses -------------------------------------------------------------------------------------
def _features(path, shape, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return {(path, "output"): torch.randn(*shape, generator=g, dtype=torch.float64) + offset}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factors", [(1.0, 2.0), (25.0, 50.0), (0.0, 2.0), (1.0, 0)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shapes", [((2, 3), (2, 5)), ((7, 5), (7, 11)), ((6, 3, 2, 2), (6, 4, 3))], ids=str)
def test_rkd_loss(shapes, reduction, factors, dtype, device):
    kwargs = dict(student_output_path="layer4", teacher_output_path="fc", dist_factor=factors[0],
                  angle_factor=factors[1], reduction=reduction)
    # the teacher gets no gradient in either (torchdistill computes its side under no_grad)
    assert_matches("RKDLoss", kwargs, _features("layer4", shapes[0], 30), _features("fc", shapes[1], 31), dtype=dtype,
                   device=device)


def test_rkd_loss_factor_none_is_zero():
    """torchdistill fails on ``None * 0``; fastkd's class takes None as 0."""
    kwargs = dict(student_output_path="a", teacher_output_path="a", dist_factor=None, angle_factor=2.0,
                  reduction="mean")
    with pytest.raises(TypeError):
        _value_and_grads(_build("RKDLoss", kwargs), _features("a", (5, 4), 32), _features("a", (5, 4), 33), None,
                         False)
    assert_matches("RKDLoss", dict(kwargs, dist_factor=0.0), _features("a", (5, 4), 32), _features("a", (5, 4), 33),
                   fast_kwargs=kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("shapes", [((1, 4), (1, 6)), ((5, 8), (5, 3)), ((6, 3, 2, 2), (6, 7))], ids=str)
def test_spkd_loss(shapes, reduction, dtype, device):
    kwargs = dict(student_output_path="layer4", teacher_output_path="layer4", reduction=reduction)
    assert_matches("SPKDLoss", kwargs, _features("layer4", shapes[0], 40), _features("layer4", shapes[1], 41),
                   dtype=dtype, teacher_grad=True, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((9, 16), (9, 7))], ids=str)
def test_pkt_loss(shapes, eps, dtype, device):
    kwargs = dict(student_module_path="fc", student_module_io="input", teacher_module_path="fc",
                  teacher_module_io="input")
    if eps is not None:
        kwargs["eps"] = eps
    g = torch.Generator().manual_seed(50)
    s = {("fc", "input"): torch.randn(*shapes[0], generator=g, dtype=torch.float64)}
    t = {("fc", "input"): torch.randn(*shapes[1], generator=g, dtype=torch.float64)}
    assert_matches("PKTLoss", kwargs, s, t, dtype=dtype, teacher_grad=True, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_config", [
    {"type": "gaussian", "gamma": 0.4, "max_p": 2},
    {"type": "gaussian", "gamma": 0.1, "max_p": 5},
    {"type": "bilinear"},
], ids=["gaussian-0.4-2", "gaussian-0.1-5", "bilinear"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("shapes", [((1, 3), (1, 3)), ((6, 8), (6, 5))], ids=str)
def test_cckd_loss(shapes, reduction, kernel_config, dtype, device):
    kwargs = dict(student_linear_path="linear", teacher_linear_path="linear", kernel_config=kernel_config,
                  reduction=reduction)
    # unit-scale rows, as Linear4CCKD's outputs: the Taylor terms stay O(1)
    s = {k: 0.4 * x for k, x in _features("linear", shapes[0], 60).items()}
    t = {k: 0.4 * x for k, x in _features("linear", shapes[1], 61).items()}
    assert_matches("CCKDLoss", kwargs, s, t, dtype=dtype, teacher_grad=True, device=device)


# ---- ATLoss ----------------------------------------------------------------------------------------------
def _at_pairs(weights):
    names = [("layer2", "layer3"), ("layer3", "layer4"), ("block", "block")]
    return {f"pair{i}": {"student": {"path": s, "io": "output"}, "teacher": {"path": t, "io": "output"}, "weight": w}
            for i, ((s, t), w) in enumerate(zip(names, weights))}


def _at_maps(n):
    g = torch.Generator().manual_seed(70)
    s = {("layer2", "output"): torch.randn(n, 3, 5, 6, generator=g, dtype=torch.float64),
         ("layer3", "output"): torch.randn(n, 4, 4, 6, generator=g, dtype=torch.float64),    # 24 positions
         ("block", "output"): torch.randn(n, 2, 7, generator=g, dtype=torch.float64)}        # a 3-D map
    t = {("layer3", "output"): torch.randn(n, 8, 5, 6, generator=g, dtype=torch.float64),
         ("layer4", "output"): torch.randn(n, 5, 6, 4, generator=g, dtype=torch.float64),    # 24 positions too
         ("block", "output"): torch.randn(n, 3, 7, generator=g, dtype=torch.float64)}
    return s, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("weights", [(1,), (1, 0.5, 2.0), (1.0, -0.5, 0)], ids=str)
@pytest.mark.parametrize("n", [1, 4])
def test_at_loss(n, weights, mode, dtype, device):
    s, t = _at_maps(n)
    assert_matches("ATLoss", dict(at_pairs=_at_pairs(weights), mode=mode), s, t, dtype=dtype, teacher_grad=True,
                   device=device)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_loss_pairs_of_different_batch_sizes(mode):
    """'paper' divides the weighted sum by the first pair's batch size (fastkd's at_loss: each pair by its own)."""
    g = torch.Generator().manual_seed(71)
    s = {("layer2", "output"): torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64),
         ("layer3", "output"): torch.randn(2, 4, 4, 6, generator=g, dtype=torch.float64)}
    t = {("layer3", "output"): torch.randn(4, 8, 5, 6, generator=g, dtype=torch.float64),
         ("layer4", "output"): torch.randn(2, 5, 6, 4, generator=g, dtype=torch.float64)}
    assert_matches("ATLoss", dict(at_pairs=_at_pairs((1.0, 3.0)), mode=mode), s, t, teacher_grad=True)


def test_at_loss_default_mode():
    s, t = _at_maps(3)
    assert_matches("ATLoss", dict(at_pairs=_at_pairs((1, 1))), s, t)


# ---- configs: WeightedSumLoss and a YAML file switch by their keys ------------------------------------------
YAML_CONFIG = """
dependencies:
  - name: 'fastkd.integrations.torchdistill'
criterion:
  key: 'WeightedSumLoss'
  kwargs:
    sub_terms:
      kd:
        criterion:
          key: 'KDLoss'
          kwargs:
            student_module_path: 'fc'
            student_module_io: 'output'
            teacher_module_path: 'fc'
            teacher_module_io: 'output'
            temperature: 4.0
            alpha: 0.5
            reduction: 'batchmean'
        weight: 1.0
      at:
        criterion:
          key: 'ATLoss'
          kwargs:
            at_pairs:
              pair1:
                teacher: {io: 'output', path: 'layer3'}
                student: {io: 'output', path: 'layer3'}
                weight: 1
            mode: 'code'
        weight: 250.0
      rkd:
        criterion:
          key: 'RKDLoss'
          kwargs:
            teacher_output_path: 'layer4'
            student_output_path: 'layer4'
            dist_factor: 1.0
            angle_factor: 2.0
            reduction: 'mean'
        weight: 1.0
      dist:
        criterion:
          key: 'DISTLoss'
          kwargs:
            student_module_path: 'fc'
            student_module_io: 'output'
            teacher_module_path: 'fc'
            teacher_module_io: 'output'
            beta: 1.0
            gamma: 2.0
            tau: 4.0
        weight: 0.5
"""


def test_yaml_config_switches_by_key(tmp_path):
    original = tmp_path / "original.yaml"
    original.write_text(YAML_CONFIG)
    switched = tmp_path / "fastkd.yaml"
    text = YAML_CONFIG
    for key in ("KDLoss", "ATLoss", "RKDLoss", "DISTLoss"):
        text = text.replace(f"key: '{key}'", f"key: 'fastkd.{key}'")
    switched.write_text(text)
    g = torch.Generator().manual_seed(80)
    s = {"fc": {"output": torch.randn(6, 10, generator=g, dtype=torch.float64)},
         "layer3": {"output": torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)},
         "layer4": {"output": torch.randn(6, 12, generator=g, dtype=torch.float64)}}
    t = {"fc": {"output": torch.randn(6, 10, generator=g, dtype=torch.float64)},
         "layer3": {"output": torch.randn(6, 7, 5, 5, generator=g, dtype=torch.float64)},
         "layer4": {"output": torch.randn(6, 9, generator=g, dtype=torch.float64)}}
    y = _targets(6, 10, 81)
    results = []
    for path in (original, switched):
        config = load_yaml_file(str(path), custom_mode=False)
        import_dependencies(config["dependencies"])
        criterion = get_high_level_loss(config["criterion"])
        leaves = {(p, io): x.clone().requires_grad_(True) for p, d in s.items() for io, x in d.items()}
        loss = criterion({"student": _nest(leaves), "teacher": t}, {}, y)
        results.append((loss.detach(), torch.autograd.grad(loss, list(leaves.values()))))
    kinds = [type(c) for c, _ in criterion.term_dict.values()]
    assert kinds == [ftd.KDLoss, ftd.ATLoss, ftd.RKDLoss, ftd.DISTLoss]
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- registry, errors, docs --------------------------------------------------------------------------------
def test_registered_keys():
    assert set(ftd.LOSSES) == {"fastkd.KDLoss", "fastkd.LogitStdKDLoss", "fastkd.DISTLoss", "fastkd.RKDLoss",
                               "fastkd.SPKDLoss", "fastkd.PKTLoss", "fastkd.CCKDLoss", "fastkd.ATLoss"}
    for key, cls in ftd.LOSSES.items():
        assert MIDDLE_LEVEL_LOSS_DICT[key] is cls
        original = key.split(".", 1)[1]
        assert MIDDLE_LEVEL_LOSS_DICT[original] is getattr(td_mid, original)  # torchdistill's own keys untouched


def test_register_is_idempotent_and_refuses_foreign_keys(monkeypatch):
    before = dict(MIDDLE_LEVEL_LOSS_DICT)
    assert ftd.register() is ftd.LOSSES
    assert ftd.register() is ftd.LOSSES
    assert dict(MIDDLE_LEVEL_LOSS_DICT) == before

    class Foreign(nn.Module):
        pass

    monkeypatch.setitem(MIDDLE_LEVEL_LOSS_DICT, "fastkd.PKTLoss", Foreign)
    with pytest.raises(RuntimeError, match="fastkd.PKTLoss"):
        ftd.register()
    assert MIDDLE_LEVEL_LOSS_DICT["fastkd.PKTLoss"] is Foreign


def test_reload_replaces_its_own_entries():
    module = importlib.reload(ftd)
    try:
        for key, cls in module.LOSSES.items():
            assert MIDDLE_LEVEL_LOSS_DICT[key] is cls
    finally:
        globals()["ftd"] = module


def test_import_error_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "torchdistill" or m.startswith("torchdistill.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchdistill", None)
    monkeypatch.delitem(sys.modules, "fastkd.integrations.torchdistill")
    with pytest.raises(ImportError, match=r"fastkd\[integrations\]"):
        importlib.import_module("fastkd.integrations.torchdistill")
    monkeypatch.setitem(sys.modules, "fastkd.integrations.torchdistill", ftd)


@pytest.mark.parametrize("key, kwargs, error, match", [
    ("fastkd.KDLoss", dict(KD_IO, temperature=2.0, alpha=0.5, reduction="none"), ValueError, "reduction='none'"),
    ("fastkd.KDLoss", dict(KD_IO, temperature=0.0, alpha=0.5), ValueError, "temperature"),
    ("fastkd.KDLoss", dict(KD_IO, temperature=2.0, alpha=0.5, no_such_option=1), TypeError, "no_such_option"),
    ("fastkd.DISTLoss", dict(KD_IO, beta=-1.0), ValueError, "beta"),
    ("fastkd.DISTLoss", dict(KD_IO, gamma=math.nan), ValueError, "gamma"),
    ("fastkd.DISTLoss", dict(KD_IO, tau=0.0), ValueError, "tau"),
    ("fastkd.DISTLoss", dict(KD_IO, eps=-1e-8), ValueError, "eps"),
    ("fastkd.DISTLoss", dict(KD_IO, beta="1"), TypeError, "beta"),
    ("fastkd.RKDLoss", dict(student_output_path="a", teacher_output_path="a", dist_factor=1.0, angle_factor=2.0,
                            reduction="none"), ValueError, "reduction='none'"),
    ("fastkd.RKDLoss", dict(student_output_path="a", teacher_output_path="a", dist_factor=-1.0, angle_factor=2.0,
                            reduction="mean"), ValueError, "dist_factor"),
    ("fastkd.CCKDLoss", dict(student_linear_path="a", teacher_linear_path="a", kernel_config={"gamma": 0.4},
                             reduction="batchmean"), ValueError, "'type'"),
    ("fastkd.CCKDLoss", dict(student_linear_path="a", teacher_linear_path="a", kernel_config={"type": "rbf"},
                             reduction="batchmean"), ValueError, "kernel_config\\['type'\\]"),
    ("fastkd.CCKDLoss", dict(student_linear_path="a", teacher_linear_path="a",
                             kernel_config={"type": "gaussian", "gamma": 0.4}, reduction="batchmean"), ValueError,
     "max_p"),
    ("fastkd.CCKDLoss", dict(student_linear_path="a", teacher_linear_path="a",
                             kernel_config={"type": "gaussian", "gamma": 0.4, "max_p": 0}, reduction="batchmean"),
     ValueError, "max_p"),
    ("fastkd.PKTLoss", dict(student_module_path="a", student_module_io="output", teacher_module_path="a",
                            teacher_module_io="output", eps=0.0), ValueError, "eps"),
    ("fastkd.ATLoss", dict(at_pairs={}), ValueError, "at_pairs"),
    ("fastkd.ATLoss", dict(at_pairs={"p": {"student": {"path": "a"}, "teacher": {"path": "a", "io": "output"}}}),
     ValueError, "at_pairs\\['p'\\]"),
    ("fastkd.ATLoss", dict(at_pairs=_at_pairs((1,)), mode="both"), ValueError, "mode"),
])
def test_bad_configs(key, kwargs, error, match):
    with pytest.raises(error, match=match):
        _build(key, kwargs)


def test_bad_inputs():
    kd = _build("fastkd.KDLoss", dict(KD_IO, temperature=2.0, alpha=0.5))
    x = torch.randn(3, 4)
    with pytest.raises(KeyError, match="no module path '.'"):
        kd({"fc": {"output": x}}, {"fc": {"output": x}}, None)
    with pytest.raises(KeyError, match="has no 'output'"):
        kd({".": {"input": x}}, {".": {"output": x}}, None)
    with pytest.raises(ValueError, match="dim 1"):
        kd({".": {"output": x[0]}}, {".": {"output": x[0]}}, None)
    dist = _build("fastkd.DISTLoss", KD_IO)
    with pytest.raises(KeyError, match="teacher_io_dict has no module path '.'"):
        dist({".": {"output": x}}, {"fc": {"output": x}})
    with pytest.raises(ValueError, match="student_logits must be 2-D"):  # torchdistill computes another relation
        y = torch.randn(3, 4, 2, 2)
        dist({".": {"output": y}}, {".": {"output": y}})
    at = _build("fastkd.ATLoss", dict(at_pairs=_at_pairs((1,))))
    with pytest.raises(ValueError, match="spatial positions"):
        at({"layer2": {"output": torch.randn(2, 3, 4, 4)}}, {"layer3": {"output": torch.randn(2, 3, 5, 5)}})


def test_readme_has_the_table():
    text = README.read_text()
    assert ftd.readme_table() in text, (
        "README.md's torchdistill table is out of date; paste the output of "
        "`python -c 'import fastkd.integrations.torchdistill as m; print(m.readme_table())'`")
