"""Property-based fuzzing (hypothesis) of every public fastkd loss against an independent float64 oracle.

What is checked, for random shapes / dtypes / layouts / magnitudes / temperatures / masks / reductions:
the value of the kernel path and both gradients (student; teacher where it requires grad) against
``fastkd.reference`` run in float64 on float64 copies of the *same rounded inputs* (so only the
computation's error is measured, never the input rounding), plus, for well-conditioned inputs, the anchors'
own direct formulas of tests/helpers.py (RepDistiller DistillKL, TRL generalized JSD, torchdistill RKD / SP /
PKT / CCKD, RepDistiller AT / NST). Output dtypes are checked too (loss: promoted input dtype, each
gradient: its input's dtype).

Tolerances are derived, never tuned (see ``_response_tols`` / ``_relation_tols`` for the derivations):
response losses from a first-order error analysis of a float32 (float64 for float64 input) log-softmax
(``eps_c * (3 max|z|/T + sqrt(V) + 4)`` per side on every log-probability) propagated through each
divergence's value and gradient formula, plus one rounding to the output dtype; relation losses from the
float64 oracle's measured sensitivity to a relative input perturbation of size ``eps_c * (sqrt(n) + 4)``
(backward-error argument), floored by the loss's natural magnitude times the same factor.

Profiles (hypothesis settings, derandomized, ``deadline=None``, no example database):

* default, "quick": runs inside the normal ``python -m pytest tests`` (a few examples per test; about a
  minute on the 2-core development machine);
* ``FASTKD_FUZZ_PROFILE=long``: 1000 examples per test, randomized (a new seed each run; the failing example
  is printed with its reproduction blob);
* ``FASTKD_FUZZ_EXAMPLES=<n>``: n examples per test (with either profile), e.g.
  ``FASTKD_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py``.

Inputs with whole rows of ``-inf`` on both sides (the "fully masked row" rule, R1) are fuzzed in their own
test (``test_fuzz_response_whole_minus_inf_rows``), so that a failure there does not hide other findings;
its oracle substitutes an all-zero row on both sides (a row whose student equals its teacher: value 0,
gradient 0, and still counted by "batchmean"), which is what the rule says such a row is.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import (  # noqa: E402
    repdistiller_distill_kl,
    repdistiller_pkt,
    repdistiller_rkd,
    torchdistill_cckd,
    torchdistill_spkd,
    trl_generalized_jsd,
)

import fastkd  # noqa: E402
from fastkd import reference as R  # noqa: E402

# --------------------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------------------
_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("fastkd-fuzz-quick", derandomize=True, max_examples=30, **_COMMON)
settings.register_profile("fastkd-fuzz-long", derandomize=False, max_examples=1000, **_COMMON)
_PROFILE = "fastkd-fuzz-" + os.environ.get("FASTKD_FUZZ_PROFILE", "quick")
_EXAMPLES = os.environ.get("FASTKD_FUZZ_EXAMPLES")


def fuzz(quick_examples: int):
    """The settings of one fuzz test: ``quick_examples`` in the quick profile, 1000 in "long",
    FASTKD_FUZZ_EXAMPLES if set."""
    base = settings.get_profile(_PROFILE)
    n = int(_EXAMPLES) if _EXAMPLES else (quick_examples if _PROFILE.endswith("quick") else base.max_examples)
    return settings(base, max_examples=n)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
INF = math.inf


def _eps(dtype):
    return torch.finfo(dtype).eps


def _compute_dtype(*dtypes):
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out, (torch.float64 if out == torch.float64 else torch.float32)


def _subnormal_half(dtype):
    """Half the spacing of the subnormals of ``dtype``: the absolute rounding error of a tiny value."""
    fi = torch.finfo(dtype)
    return 0.5 * fi.smallest_normal * fi.eps


def assert_within(actual, expected64, atol, rtol, out_dtype, what):
    """|actual - expected| <= atol + rtol |expected| entrywise (atol may be a tensor), where ``expected64`` is
    the float64 oracle. Where the exact value overflows ``out_dtype`` (rounds to +-inf) the result must be
    that infinity, or finite and within tolerance if the exact value is within tolerance of the overflow
    threshold. NaN is never accepted unless the oracle is NaN."""
    a = actual.detach().double()
    e = expected64.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    atol = torch.as_tensor(atol, dtype=torch.float64).expand_as(e) if not torch.is_tensor(atol) else atol.double()
    nan_e = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan_e), f"{what}: NaN pattern differs (actual {a}, expected {e})"
    e_r = e.to(out_dtype).double()
    inf_e = torch.isinf(e_r)
    if inf_e.any():
        big = torch.finfo(out_dtype).max
        ok_inf = (a == e_r) | (torch.isfinite(a) & ((a - e).abs() <= atol + rtol * e.abs()) & (e.abs() <= big * (1 + rtol) + atol))
        bad = inf_e & ~ok_inf
        assert not bad.any(), f"{what}: overflow entries differ: actual {a[bad][:5]}, expected {e[bad][:5]}"
    fin = ~nan_e & ~inf_e
    # an infinite exact value (e.g. reverse KL with a support mismatch) must be reproduced exactly
    exact_inf = fin & torch.isinf(e)
    assert torch.equal(a[exact_inf], e[exact_inf]), f"{what}: infinite entries differ"
    fin = fin & torch.isfinite(e)
    err = (a - e).abs()
    lim = atol + rtol * e.abs()
    bad = fin & ~(err <= lim)
    if bad.any():
        i = torch.nonzero(bad)[0].tolist()
        idx = tuple(i)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} entries out of tolerance; first at {idx}: actual "
            f"{a[idx].item():.9g}, expected {e[idx].item():.9g}, |err| {err[idx].item():.3g} > "
            f"{lim[idx].item():.3g}; max |err| {err[fin].max().item():.3g}"
        )


# --------------------------------------------------------------------------------------------------------
# input construction: layouts over a leaf "base" tensor
# --------------------------------------------------------------------------------------------------------
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]


def _base_shape(layout, shape):
    lead, v = shape[:-1], shape[-1]
    if layout == "transposed":
        return tuple(reversed(shape))
    if layout == "strided":
        return (*lead, 2 * v + 1)
    if layout == "expanded":
        return (*(1 for _ in lead), v)
    return tuple(shape)


def _view(layout, base, shape):
    """The logical ``shape`` view of ``base`` (a leaf): transposed (all dims reversed), strided (every other
    entry of the last dim, offset 1), expanded (stride-0 leading dims) or the base itself."""
    if layout == "transposed":
        return base.permute(*reversed(range(base.dim())))
    if layout == "strided":
        return base[..., 1::2]
    if layout == "expanded":
        return base.expand(*shape)
    return base


def _rows_per_base_entry(layout, shape):
    return math.prod(shape[:-1]) if layout == "expanded" else 1


# --------------------------------------------------------------------------------------------------------
# response losses: one calling convention
# --------------------------------------------------------------------------------------------------------
RESPONSE = ["kd", "kd_noscale", "kd_mix", "reverse_kl", "jsd", "tvd", "dkd", "topk_logits", "topk_logprobs",
            "topk_bucket"]
TOPK = {"topk_logits", "topk_logprobs", "topk_bucket"}
NEEDS_TARGET = {"kd_mix", "dkd"}
KD_MIX = (0.3, 0.8)  # alpha, beta of the hard-label mix
DKD_AB = (1.0, 8.0)


def _topk_teacher(name, t, temperature, k):
    """Cached top-k teacher from dense teacher logits (computed by the test in float64 from the rounded teacher
    values, then rounded to the teacher's dtype: kernel and oracle get the same numbers)."""
    t64 = t.detach().double()
    if name == "topk_logits":
        vals, idx = t64.topk(k, dim=-1)
    else:
        vals, idx = F.log_softmax(t64 / temperature, dim=-1).topk(k, dim=-1)
    return vals.to(t.dtype), idx


def _call_response(mod, name, s, t, T, labels, reduction, num_items, beta, topk=None):
    kw = dict(reduction=reduction, num_items_in_batch=num_items)
    if name == "kd":
        return mod.kd_loss(s, t, T, labels=labels, **kw)
    if name == "kd_noscale":
        return mod.kd_loss(s, t, T, labels=labels, scale_by_temperature=False, **kw)
    if name == "kd_mix":
        return mod.kd_loss(s, t, T, labels=labels, alpha=KD_MIX[0], beta=KD_MIX[1], **kw)
    if name == "reverse_kl":
        return mod.reverse_kl_loss(s, t, T, labels=labels, **kw)
    if name == "jsd":
        return mod.jsd_loss(s, t, beta, T, labels=labels, **kw)
    if name == "tvd":
        return mod.tvd_loss(s, t, T, labels=labels, **kw)
    if name == "dkd":
        return mod.dkd_loss(s, t, labels, DKD_AB[0], DKD_AB[1], T, **kw)
    vals, idx = topk
    extra = dict(values_are="logits") if name == "topk_logits" else dict(values_are="logprobs")
    if name == "topk_bucket":
        extra["tail"] = "bucket"
    return mod.topk_kd_loss(s, vals, idx, T, labels=labels, **extra, **kw)


def _row_weight(name, shape, labels, reduction, num_items):
    """(w, sum_w): the largest weight of one row's loss in the reduced loss, and the sum of the weights of
    all rows (the documented divisors: "batchmean" = counted rows or num_items_in_batch, TRL's B for JSD on
    [B, T, V] without labels; "mean" additionally / V; "none" with an upstream gradient <= 1)."""
    rows = math.prod(shape[:-1])
    counted = rows if labels is None else int((labels != -100).sum())
    if reduction in ("none", "sum"):
        return 1.0, float(max(counted, 1) if reduction == "sum" else 1.0)
    if num_items is not None:
        div = float(num_items)
    elif name == "jsd" and labels is None:
        div = float(shape[0])
    else:
        div = float(max(counted, 1))
    if reduction == "mean":
        div *= shape[-1]
    return 1.0 / div, counted / div


def _response_tols(name, shape, T, zmax, s_dtype, t_dtype, labels, reduction, num_items, k=None, log_p_tail=None,
                   scaled=None):
    """Derived tolerances (loss_atol, loss_rtol, student_grad_atol, teacher_grad_atol) of the kernel vs the
    float64 oracle.

    Every log-probability log_softmax(z / T) computed in the compute dtype (eps_c) carries an absolute error
    of at most 3 max|z| / T * eps_c (the division, the max subtraction, the final subtraction of the
    log-sum-exp, each rounding a number of magnitude <= 2 max|z| / T) plus sqrt(V) eps_c (the relative error
    of the V-term sum of exponentials: the probabilistic bound of a vectorized/blocked summation) plus 4 ulps
    (exp, log, the rest). Both sides: delta = eps_c (6 max|z|/T + 2 sqrt(V) + 8); each probability then has
    relative error delta. With L = 2 max|z| / T + log V + 1 (a bound on |log p_j - log q_j| on finite
    entries):

    * per-row value error (before the T^2 factor): KL-type divergences sum_j p (log p - log q): delta * (1 + L);
      TVD: 2 delta;
    * per-entry gradient error (before the factor T^2 / T, or 1 / T): forward KL (q - p): 2 delta; TVD: 2 delta
      (rows with near-ties excluded by the caller); reverse KL / JSD / DKD and every teacher gradient
      p (log-ratio - its mean): delta (L + 2);
    * the hard-label cross-entropy of kd_mix (at T = 1): the same with T = 1, weight alpha;
    * top-k "bucket": the teacher's tail mass 1 - sum exp(values) has absolute error (sqrt(k) + 4) eps_c,
      which moves p_tail log(p_tail / q_tail) by at most that times (|log(tail error)| + |log p_tail| + L + 1);
    then multiplied by the row weights of the reduction (``_row_weight``) and, for the value, one rounding
    to the output dtype (rtol eps_out + half a subnormal spacing).
    """
    out_dtype, cdtype = _compute_dtype(s_dtype, t_dtype)
    ec = _eps(cdtype)
    vocab = shape[-1]

    def delta(temp):
        return ec * (6.0 * zmax / temp + 2.0 * math.sqrt(vocab) + 8.0)

    L = 2.0 * zmax / T + math.log(max(vocab, 1)) + 1.0
    d = delta(T)
    w, sum_w = _row_weight(name, shape, labels, reduction, num_items)
    if scaled is None:
        scaled = name in ("kd", "kd_mix", "reverse_kl", "dkd") or name in TOPK
    weight = {"kd_mix": KD_MIX[1], "dkd": DKD_AB[0] + DKD_AB[1]}.get(name, 1.0)
    f_val = weight * (T * T if scaled else 1.0)
    f_grad = weight * (T if scaled else 1.0 / T)
    row_val = 2.0 * d if name == "tvd" else d * (1.0 + L)
    s_coef = 2.0 if name in ("kd", "kd_noscale", "kd_mix", "tvd") or name in TOPK else L + 2.0
    t_coef = 2.0 if name in ("reverse_kl", "tvd") else L + 2.0
    if name == "topk_bucket" and log_p_tail is not None:
        tail_err = ec * (math.sqrt(k) + 4.0)
        row_val += tail_err * (abs(math.log(tail_err)) + abs(log_p_tail) + L + 1.0)
        s_coef += tail_err / max(d, 1e-300)
    loss_atol = f_val * row_val * sum_w
    gs_atol = f_grad * s_coef * d * w
    gt_atol = f_grad * t_coef * d * w
    if name == "kd_mix":
        d1 = delta(1.0)
        L1 = 2.0 * zmax + math.log(max(vocab, 1)) + 1.0
        w_ce = w * (vocab if reduction == "mean" else 1.0)
        sum_ce = sum_w * (vocab if reduction == "mean" else 1.0)
        loss_atol += KD_MIX[0] * d1 * (1.0 + L1) * sum_ce
        gs_atol += KD_MIX[0] * 2.0 * d1 * w_ce
    loss_atol += _subnormal_half(out_dtype)
    return loss_atol, _eps(out_dtype), gs_atol, gt_atol


def _labels_for(name, lead, vocab, mode, gen, finite_cols=None):
    """None, or class indices in [0, V) with some / all rows set to -100. For the hard-label mix the target
    of every counted row is an entry that is finite on the student side."""
    if mode == "none" and name not in NEEDS_TARGET:
        return None
    y = torch.randint(0, vocab, tuple(lead), generator=gen)
    if mode == "some":
        drop = torch.rand(tuple(lead), generator=gen) < 0.4
        y[drop] = -100
    elif mode == "all":
        y.fill_(-100)
    return y


@st.composite
def response_cases(draw, whole_inf_rows=False):
    name = draw(st.sampled_from(RESPONSE if not whole_inf_rows else
                                ["kd", "kd_noscale", "reverse_kl", "jsd", "tvd", "topk_logits", "topk_logprobs",
                                 "topk_bucket"]))
    beta = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0)) if name == "jsd" else 0.5
    # typical sizes first (hypothesis favours the front of the list), then the edge cases
    vocab = draw(st.sampled_from([33, 7, 257, 16, 100, 1000, 2, 3, 5, 1, 1 << 17]))
    if name == "dkd":
        vocab = max(vocab, 2)
    big = vocab > 5000
    lead_kind = draw(st.sampled_from(["one_row", "rows", "btv"]))
    if lead_kind == "one_row":
        lead = (1,)
    elif lead_kind == "rows":
        lead = (draw(st.integers(2, 2 if big else 24)),)
    else:
        lead = (draw(st.integers(1, 2 if big else 4)), draw(st.integers(1, 1 if big else 5)))
    if whole_inf_rows:
        lead = (max(lead[0], 2),) + lead[1:]
    shape = (*lead, vocab)
    s_dtype = draw(st.sampled_from(DTYPES))
    t_dtype = s_dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):  # well-conditioned regime (tight tolerances), else the full ranges
        T = 10.0 ** draw(st.floats(-0.5, 1.0))
        mag = 10.0 ** draw(st.floats(-0.5, 1.0))
    else:
        T = 10.0 ** draw(st.floats(-3.0, 2.0))  # 1e-3 .. 100, log-uniform
        mag = 10.0 ** draw(st.floats(-2.0, 4.0))  # |z| up to 6e4 (clamped randn * 1e4)
    structure = draw(st.sampled_from(["random", "teacher_is_student", "near_student", "dup_rows", "offset"]))
    s_layout = draw(st.sampled_from(LAYOUTS if not whole_inf_rows else LAYOUTS[:3]))
    t_layout = draw(st.sampled_from(LAYOUTS if not whole_inf_rows else LAYOUTS[:3]))
    inf_entries = name not in NEEDS_TARGET and vocab >= 2 and draw(st.booleans())
    label_mode = draw(st.sampled_from(["none", "some", "all"]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    num_items = None
    if reduction in ("batchmean", "mean") and draw(st.booleans()):
        num_items = draw(st.integers(1, 64))
    teacher_grad = name not in TOPK and draw(st.booleans())
    k = draw(st.integers(1, min(vocab, 64))) if name in TOPK else None
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(name=name, beta=beta, shape=shape, s_dtype=s_dtype, t_dtype=t_dtype, T=T, mag=mag,
                structure=structure, s_layout=s_layout, t_layout=t_layout, inf_entries=inf_entries,
                label_mode=label_mode, reduction=reduction, num_items=num_items, teacher_grad=teacher_grad, k=k,
                seed=seed, whole_inf_rows=whole_inf_rows)


def _build_response(c):
    """(s_base, t_base, labels, inf_rows mask or None): float64 logical values rounded to the dtypes, with the
    structure and the -inf pattern applied, laid out in their bases (not yet leaves)."""
    gen = torch.Generator().manual_seed(c["seed"])
    shape, lead, vocab = c["shape"], c["shape"][:-1], c["shape"][-1]
    s = (torch.randn(shape, generator=gen, dtype=torch.float64).clamp(-6, 6) * c["mag"])
    if c["structure"] == "teacher_is_student":
        t = s.clone()
    elif c["structure"] == "near_student":
        t = s + 1e-3 * c["mag"] * torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).clamp(-6, 6) * c["mag"]
    if c["structure"] == "dup_rows" and math.prod(lead) >= 2:
        s.view(-1, vocab)[-1] = s.view(-1, vocab)[0]
        t.view(-1, vocab)[-1] = t.view(-1, vocab)[0]
    if c["structure"] == "offset":  # softmax-invariant common offset per row
        off = c["mag"] * 3 * torch.randn((*lead, 1), generator=gen, dtype=torch.float64)
        s, t = s + off, t + off.flip(0)
    # fp16 range: |z| <= 6e4 (the clamp above keeps randn * 1e4 there; offsets may exceed: clamp again)
    lim = 6.0e4
    s, t = s.clamp(-lim, lim), t.clamp(-lim, lim)
    expanded = "expanded" in (c["s_layout"], c["t_layout"])
    if expanded:  # the rows of an expanded side are all equal: make both sides row-constant
        s = s.reshape(-1, vocab)[:1].expand(shape).clone()
        t = t.reshape(-1, vocab)[:1].expand(shape).clone()
    if c["inf_entries"]:
        m = torch.rand((1 if expanded else math.prod(lead), vocab), generator=gen) < 0.3
        m[:, torch.randint(0, vocab, (1,), generator=gen)] = False  # every row keeps a finite entry
        m = m.expand(math.prod(lead), vocab).reshape(shape)
        s = s.masked_fill(m, -INF)
        t = t.masked_fill(m, -INF)
    inf_rows = None
    if c["whole_inf_rows"]:
        rows = math.prod(lead)
        inf_rows = torch.rand(rows, generator=gen) < 0.4
        inf_rows[torch.randint(0, rows, (1,), generator=gen)] = True  # at least one fully masked row
        inf_rows = inf_rows.reshape(lead)
        s = s.masked_fill(inf_rows.unsqueeze(-1), -INF)
        t = t.masked_fill(inf_rows.unsqueeze(-1), -INF)
    s = s.to(c["s_dtype"])
    t = t.to(c["t_dtype"])
    labels = _labels_for(c["name"], lead, vocab, c["label_mode"], gen)
    if labels is not None and c["name"] in NEEDS_TARGET and expanded:
        labels = labels.reshape(-1)[:1].expand(lead).clone() if c["label_mode"] != "some" else labels

    def based(x, layout):
        b = torch.empty(_base_shape(layout, shape), dtype=x.dtype)
        b.fill_(float("nan"))  # entries outside the view must never be read
        if layout == "expanded":
            b.copy_(x.reshape(-1, vocab)[:1].reshape(b.shape))
        else:
            _view(layout, b, shape).copy_(x)
        return b

    return based(s, c["s_layout"]), based(t, c["t_layout"]), labels, inf_rows


def _run_response(mod, c, s_base, t_base, labels, grad_out, upcast, topk=None, substitute_rows=None):
    """(loss, student base grad, teacher base grad or None). ``upcast``: float64 copies (the oracle);
    ``substitute_rows``: replace those logical rows by 0 on both sides (the R1 oracle); ``topk``: the cached
    teacher (values in the teacher's dtype, indices), the same numbers for the kernel and the oracle."""
    shape = c["shape"]
    sb = s_base.detach().clone()
    tb = t_base.detach().clone()
    if upcast:
        sb, tb = sb.double(), tb.double()
    sb.requires_grad_(True)
    tb.requires_grad_(c["teacher_grad"])
    s = _view(c["s_layout"], sb, shape)
    t = _view(c["t_layout"], tb, shape)
    if substitute_rows is not None:
        m = substitute_rows.unsqueeze(-1)
        s = torch.where(m, torch.zeros((), dtype=s.dtype), s)
        t = torch.where(m, torch.zeros((), dtype=t.dtype), t)
    if topk is not None and upcast:
        topk = (topk[0].double(), topk[1])
    loss = _call_response(mod, c["name"], s, t, c["T"], labels, c["reduction"], c["num_items"], c["beta"], topk)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    inputs = [sb] + ([tb] if c["teacher_grad"] else [])
    grads = torch.autograd.grad(loss, inputs, go, allow_unused=True)
    gs = grads[0] if grads[0] is not None else torch.zeros_like(sb)
    gt = None
    if c["teacher_grad"]:
        gt = grads[1] if grads[1] is not None else torch.zeros_like(tb)
    return loss.detach(), gs, gt


def _tie_rows(c, s, t):
    """TVD: logical rows where some entry has p_j == q_j up to the computation's error (the subgradient jumps
    there, and float32 and float64 may legitimately pick different signs). Returns a bool mask [lead]."""
    T = c["T"]
    p = F.softmax(t.double() / T, dim=-1)
    q = F.softmax(s.double() / T, dim=-1)
    finite = torch.cat([s[torch.isfinite(s)].double().abs().flatten(), t[torch.isfinite(t)].double().abs().flatten(),
                        torch.zeros(1, dtype=torch.float64)])
    _, cdtype = _compute_dtype(c["s_dtype"], c["t_dtype"])
    d = _eps(cdtype) * (6.0 * finite.max().item() / T + 2.0 * math.sqrt(c["shape"][-1]) + 8.0)
    big = torch.maximum(p, q)
    near = ((p - q).abs() <= 4.0 * d * big) & (big > 0)
    return near.any(-1)


def _zmax(*xs):
    vals = [x[torch.isfinite(x)].double().abs().max().item() for x in xs if torch.isfinite(x).any()]
    return max(vals) if vals else 0.0


def _check_response_case(c):
    name, shape = c["name"], c["shape"]
    s_base, t_base, labels, inf_rows = _build_response(c)
    s_log = _view(c["s_layout"], s_base, shape)
    t_log = _view(c["t_layout"], t_base, shape)
    lead = shape[:-1]
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    grad_out = torch.rand(lead, generator=gen, dtype=torch.float64) if c["reduction"] == "none" else None
    what = (f"{name} beta={c['beta']} shape={shape} {c['s_dtype']}/{c['t_dtype']} T={c['T']:.4g} "
            f"mag={c['mag']:.3g} {c['structure']} {c['s_layout']}/{c['t_layout']} inf={c['inf_entries']} "
            f"labels={c['label_mode']} {c['reduction']} n={c['num_items']} tgrad={c['teacher_grad']} k={c['k']}")

    topk = None
    if name in TOPK:
        vals, idx = _topk_teacher(name, t_log, c["T"], c["k"])
        if inf_rows is not None:  # R1 for top-k: the teacher's top-k values of a fully masked row are all -inf
            vals = vals.masked_fill(inf_rows.unsqueeze(-1), -INF)
        topk = (vals, idx)
    loss, gs, gt = _run_response(fastkd, c, s_base, t_base, labels, grad_out, upcast=False, topk=topk)
    out_dtype, _ = _compute_dtype(c["s_dtype"], c["t_dtype"])
    assert loss.dtype == out_dtype, f"{what}: loss dtype {loss.dtype}"
    assert loss.shape == (lead if c["reduction"] == "none" else ()), f"{what}: loss shape {loss.shape}"
    assert gs.dtype == c["s_dtype"] and gs.shape == s_base.shape, f"{what}: student grad {gs.dtype} {gs.shape}"
    if gt is not None:
        assert gt.dtype == c["t_dtype"] and gt.shape == t_base.shape, f"{what}: teacher grad {gt.dtype}"

    if inf_rows is None:
        ref, gs_ref, gt_ref = _run_response(R, c, s_base, t_base, labels, grad_out, upcast=True, topk=topk)
    elif name in TOPK:
        # R1 oracle for top-k: the float64 reference per row ("none") on the rows with a substitute (zeros),
        # those rows' contributions multiplied by 0 (detached weights), reduced with the documented divisors.
        sb = s_base.detach().double().requires_grad_(True)
        s = torch.where(inf_rows.unsqueeze(-1), torch.zeros((), dtype=torch.float64), _view(c["s_layout"], sb, shape))
        m = inf_rows.unsqueeze(-1)
        vals = torch.where(m, torch.zeros((), dtype=torch.float64), topk[0].double())
        if name != "topk_logits":  # a valid log-distribution substitute: uniform over the k kept entries
            vals = torch.where(m, torch.full((), -math.log(c["k"]), dtype=torch.float64), vals)
        rows = _call_response(R, name, s, None, c["T"], labels, "none", None, c["beta"], (vals, topk[1]))
        rows = torch.where(inf_rows, torch.zeros((), dtype=torch.float64), rows)
        counted = math.prod(lead) if labels is None else (labels != -100).sum()
        ref = R.reduce_rows(rows, c["reduction"], counted, shape[-1], c["num_items"])
        go = torch.ones_like(ref) if grad_out is None else grad_out
        (gs_ref,) = torch.autograd.grad(ref, [sb], go)
        gt_ref = None
        ref = ref.detach()
    else:
        ref, gs_ref, gt_ref = _run_response(R, c, s_base, t_base, labels, grad_out, upcast=True,
                                            substitute_rows=inf_rows)

    log_p_tail = None
    if name == "topk_bucket":
        kept = topk[0].double().exp().sum(-1)
        tail = (1.0 - kept).clamp_min(0.0)
        finite_tail = tail[tail > 0]
        log_p_tail = math.log(finite_tail.min().item()) if finite_tail.numel() else 0.0
    loss_atol, loss_rtol, gs_atol, gt_atol = _response_tols(
        name, shape, c["T"], _zmax(s_log, t_log), c["s_dtype"], c["t_dtype"], labels, c["reduction"],
        c["num_items"], c["k"], log_p_tail)
    assert_within(loss, ref, loss_atol, loss_rtol, out_dtype, f"{what}: loss")

    reps = _rows_per_base_entry(c["s_layout"], shape)
    skip_rows = None
    if name == "tvd":
        skip_rows = _tie_rows(c, s_log, t_log)
    if inf_rows is not None:  # R1: the fully masked rows have an exactly zero gradient
        g_log = _view(c["s_layout"], gs, shape)
        assert torch.all(g_log[inf_rows] == 0), f"{what}: fully -inf rows have a nonzero/NaN student gradient"
    if skip_rows is None or not skip_rows.any():
        assert_within(gs, gs_ref, gs_atol * reps + _subnormal_half(c["s_dtype"]) * reps, _eps(c["s_dtype"]),
                      c["s_dtype"], f"{what}: student grad")
    elif c["s_layout"] != "expanded":
        keep = ~skip_rows
        g_a = _view(c["s_layout"], gs, shape)[keep]
        g_e = _view(c["s_layout"], gs_ref, shape)[keep]
        assert_within(g_a, g_e, gs_atol + _subnormal_half(c["s_dtype"]), _eps(c["s_dtype"]), c["s_dtype"],
                      f"{what}: student grad (tie-free rows)")
    if gt is not None and gt_ref is not None:
        reps_t = _rows_per_base_entry(c["t_layout"], shape)
        if skip_rows is None or not skip_rows.any():
            assert_within(gt, gt_ref, gt_atol * reps_t + _subnormal_half(c["t_dtype"]) * reps_t,
                          _eps(c["t_dtype"]), c["t_dtype"], f"{what}: teacher grad")
        if inf_rows is not None:
            gt_log = _view(c["t_layout"], gt, shape)
            assert torch.all(gt_log[inf_rows] == 0), f"{what}: fully -inf rows have a nonzero teacher gradient"

    # the anchors' own formulas on well-conditioned inputs (float64, no masks, finite): an independent check
    # of the oracle itself
    if (inf_rows is None and not c["inf_entries"] and labels is None and c["reduction"] == "batchmean"
            and c["num_items"] is None and len(lead) == 1 and c["mag"] / c["T"] < 50):
        s64, t64 = s_log.double(), t_log.double()
        if name == "kd":
            anchor = repdistiller_distill_kl(s64, t64, c["T"])
        elif name == "jsd":
            anchor = trl_generalized_jsd(s64, t64, None, c["beta"], c["T"])
        else:
            anchor = None
        if anchor is not None:
            torch.testing.assert_close(ref, anchor, rtol=1e-10, atol=1e-12, msg=f"{what}: oracle vs anchor")


def _moderate(name, **kw):
    c = dict(name=name, beta=0.3, shape=(6, 33), s_dtype=torch.float32, t_dtype=torch.float32, T=2.0, mag=3.0,
             structure="random", s_layout="contiguous", t_layout="contiguous", inf_entries=False,
             label_mode="some", reduction="batchmean", num_items=None, teacher_grad=name not in TOPK, k=5, seed=1,
             whole_inf_rows=False)
    c.update(kw)
    return c


def _with_examples(cases):
    def deco(f):
        for c in cases:
            f = hypothesis.example(c)(f)
        return f
    return deco


_EXPLICIT = [_moderate(n) for n in RESPONSE] + [
    _moderate("jsd", beta=0.0), _moderate("jsd", beta=1.0, reduction="none"),
    _moderate("kd", shape=(2, 3, 1000), s_dtype=torch.float16, t_dtype=torch.bfloat16, reduction="mean"),
    _moderate("tvd", s_layout="transposed", t_layout="strided", reduction="sum"),
    _moderate("reverse_kl", s_layout="expanded", inf_entries=True, label_mode="none"),
    _moderate("topk_bucket", shape=(2, 1 << 17), k=64, s_dtype=torch.bfloat16, t_dtype=torch.float32),
]


@fuzz(120)
@_with_examples(_EXPLICIT)
@given(response_cases())
def test_fuzz_response_losses(case):
    """Every response loss (kd with/without T^2 and with the hard-label mix, reverse KL, generalized JSD for
    any beta incl. 0 and 1, TVD, DKD, top-k with logits / logprobs / bucket tail) on random shapes, dtypes
    (incl. mixed), layouts (transposed, strided, stride-0 expanded), temperatures 1e-3..100, |z| up to 1e4,
    shared -inf entries, duplicated rows, teacher == student, masks, reductions and num_items_in_batch:
    value and gradients vs the float64 reference within the derived tolerances of ``_response_tols``."""
    _check_response_case(case)


@fuzz(40)
@given(response_cases(whole_inf_rows=True))
def test_fuzz_response_whole_minus_inf_rows(case):
    """R1 (fuzzed): rows that are -inf in every entry on both sides (for top-k: student row all -inf, teacher
    top-k values all -inf) contribute exactly 0 with an exactly zero gradient and stay counted by
    "batchmean"; the other rows match the float64 reference. Reproducer: ``s, t = randn(2, 5), randn(2, 5);
    s[1] = t[1] = -inf; kd_loss(s, t)`` is NaN today."""
    _check_response_case(case)


# --------------------------------------------------------------------------------------------------------
# fused linear head
# --------------------------------------------------------------------------------------------------------
@st.composite
def fused_linear_cases(draw):
    kind = draw(st.sampled_from(["dense", "head", "topk_logits", "topk_bucket"]))
    loss = "kl" if kind.startswith("topk") else draw(st.sampled_from(["kl", "reverse_kl", "jsd"]))
    beta = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0)) if loss == "jsd" else 0.5
    vocab = draw(st.sampled_from([1, 2, 7, 33, 128]))
    hidden = draw(st.sampled_from([1, 3, 8, 16]))
    lead = draw(st.sampled_from([(1,), (5,), (2, 3), (13,)]))
    dtype = draw(st.sampled_from(DTYPES))
    t_dtype = dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    t_vocab = vocab
    # a smaller (padded) teacher vocabulary; reverse KL and JSD with beta = 1 are infinite there and refused
    # with a ValueError (tests/test_fused_linear.py tests the refusal)
    if kind == "dense" and loss != "reverse_kl" and not (loss == "jsd" and beta == 1.0) and vocab > 2 \
            and draw(st.booleans()):
        t_vocab = vocab - draw(st.integers(1, 2))
    return dict(kind=kind, loss=loss, beta=beta, vocab=vocab, t_vocab=t_vocab, hidden=hidden, lead=lead,
                dtype=dtype, t_dtype=t_dtype, T=10.0 ** draw(st.floats(-1.0, 1.5)),
                hard=draw(st.sampled_from([0.0, 0.5])), bias=draw(st.booleans()),
                label_mode=draw(st.sampled_from(["none", "some", "all"])),
                reduction=draw(st.sampled_from(REDUCTIONS)), chunk=draw(st.sampled_from([None, 1, 2, 3, 7])),
                k=draw(st.integers(1, min(vocab, 16))), seed=draw(st.integers(0, 2**31 - 1)))


def _fl_call(mod, c, h, w, b, teacher, labels):
    return mod.fused_linear_kd_loss(h, w, teacher, student_bias=b, loss=c["loss"], beta=c["beta"],
                                    temperature=c["T"], labels=labels, hard_label_weight=c["hard"],
                                    reduction=c["reduction"], chunk_size=c["chunk"])


@fuzz(40)
@given(fused_linear_cases())
def test_fuzz_fused_linear_kd_loss(c):
    """fused_linear_kd_loss (dense / TeacherHead / TopKTeacher teachers, kl / reverse_kl / jsd, hard-label CE,
    bias, padded teacher vocabulary, chunk sizes forcing several chunks, every reduction, all dtypes) vs
    fastkd.reference.fused_linear_kd_loss in float64. Tolerances: the logits' GEMM error eps_c (sqrt(H) + 2)
    (|h| |W|^T + |b|) is added to the log-probability error of ``_response_tols``; the gradients of h / W / b
    are those logit-gradient errors pushed through |W|, |h|, the row sum, plus the GEMMs' own
    eps_c (sqrt(reduction length) + 2) relative error."""
    gen = torch.Generator().manual_seed(c["seed"])
    lead, H, V, dtype = c["lead"], c["hidden"], c["vocab"], c["dtype"]
    rows = math.prod(lead)
    h = torch.randn((*lead, H), generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn((V, H), generator=gen, dtype=torch.float64) * 2).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype) if c["bias"] else None
    labels = _labels_for("kd_mix" if c["hard"] else "kd", lead, V, c["label_mode"], gen)
    if c["kind"] == "head":
        th = torch.randn((*lead, H), generator=gen, dtype=torch.float64).to(c["t_dtype"])
        tw = (torch.randn((V, H), generator=gen, dtype=torch.float64) * 2).to(c["t_dtype"])
        teacher = fastkd.TeacherHead(th, tw)
        teacher64 = fastkd.TeacherHead(th.double(), tw.double())
        t_logits = th.double() @ tw.double().t()
    else:
        t_logits = (torch.randn((*lead, c["t_vocab"]), generator=gen, dtype=torch.float64) * 3).to(c["t_dtype"])
        if c["kind"] == "dense":
            teacher, teacher64 = t_logits, t_logits.double()
        else:
            if c["kind"] == "topk_logits":
                vals, idx = t_logits.double().topk(c["k"], dim=-1)
                va, tail = "logits", "renormalize"
            else:
                vals, idx = F.log_softmax(t_logits.double() / c["T"], -1).topk(c["k"], dim=-1)
                va, tail = "logprobs", "bucket"
            teacher = fastkd.TopKTeacher(vals.to(c["t_dtype"]), idx, va, tail)
            teacher64 = fastkd.TopKTeacher(vals.to(c["t_dtype"]).double(), idx, va, tail)
        t_logits = t_logits.double()
    grad_out = torch.rand(lead, generator=gen, dtype=torch.float64) if c["reduction"] == "none" else None

    def run(mod, hh, ww, bb, tt):
        hh, ww = hh.detach().clone().requires_grad_(True), ww.detach().clone().requires_grad_(True)
        bb = None if bb is None else bb.detach().clone().requires_grad_(True)
        out = _fl_call(mod, c, hh, ww, bb, tt, labels)
        go = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
        ins = [hh, ww] + ([bb] if bb is not None else [])
        return out.detach(), torch.autograd.grad(out, ins, go)

    what = str({k: v for k, v in c.items()})
    loss, grads = run(fastkd, h, w, b, teacher)
    ref, grads_ref = run(R, h.double(), w.double(), None if b is None else b.double(), teacher64)
    out_dtype = loss.dtype
    # the fused head's loss is float32 whatever the input dtype (float64 with a float64 side)
    wide = torch.float64 in (dtype, c["t_dtype"])
    assert out_dtype == (torch.float64 if wide else torch.float32), f"{what}: loss dtype {loss.dtype}"
    _, cdtype = _compute_dtype(dtype, c["t_dtype"])
    ec = _eps(cdtype)
    s_logits = h.double() @ w.double().t() + (0 if b is None else b.double())
    zmax = _zmax(s_logits, t_logits)
    T, L = c["T"], 2.0 * _zmax(s_logits, t_logits) / c["T"] + math.log(max(V, 1)) + 1.0
    # GEMM error of one logit (fp32 accumulation of H products): eps_c (sqrt(H) + 2) (|h| |W|^T + |b|)
    absz = h.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    dz = ec * (math.sqrt(H) + 2.0) * absz.max().item()
    # the chunk's logits buffer is float32 (float64) whatever the head's dtype: one rounding in that dtype
    dz += 0.5 * ec * _zmax(s_logits)
    if c["kind"] == "head":
        th_abs = teacher.hidden.double().abs() @ teacher.weight.double().abs().t()
        dz += ec * (math.sqrt(H) + 2.0) * th_abs.max().item() + 0.5 * ec * _zmax(t_logits)
    name = {"kl": "kd_noscale", "reverse_kl": "reverse_kl", "jsd": "jsd"}[c["loss"]]
    if c["kind"].startswith("topk"):
        name = c["kind"]
    # scale_by_temperature is off by default in the fused head (TRL / Liger): factors 1 and 1 / T
    loss_atol, loss_rtol, g_atol, _ = _response_tols(
        name, (*lead, V), T, zmax, dtype, c["t_dtype"], labels, c["reduction"], None, c["k"],
        -60.0 if name == "topk_bucket" else None, scaled=False)
    w_row, sum_w = _row_weight("kd", (*lead, V), labels, c["reduction"], None)
    # the logits' GEMM error enters every log-probability as 2 dz / T (the logit and the normalizer)
    loss_atol += (2.0 * dz / T) * (1.0 + L) * sum_w
    g_atol += (2.0 * dz / T) * (L + 2.0) * w_row / T
    ce_w = V if c["reduction"] == "mean" else 1.0  # the CE is divided by the counted rows for "mean" too
    if c["hard"]:  # hard CE at T = 1: its own log-softmax error d1 and the GEMM error 2 dz
        z1 = _zmax(s_logits)
        d1 = ec * (6.0 * z1 + 2.0 * math.sqrt(V) + 8.0) + 2.0 * dz
        loss_atol += c["hard"] * d1 * (2.0 * z1 + math.log(max(V, 1)) + 2.0) * sum_w * ce_w
        g_atol += c["hard"] * 2.0 * d1 * w_row * ce_w
    assert_within(loss, ref, loss_atol, loss_rtol, loss.dtype, f"{what}: loss")
    # |dL/dz| <= (L + 2) / T * w per entry (+ 2 hard * w): the scale the GEMMs round against
    g_scale = ((L + 2.0) / T + 2.0 * c["hard"] * ce_w) * w_row
    wabs, habs = w.double().abs(), h.double().abs().reshape(rows, H)
    g_atol += 0.5 * _eps(dtype) * g_scale  # the logits' gradient is written over that buffer (head's dtype)
    gh_atol = (g_atol + ec * (math.sqrt(V) + 2.0) * g_scale) * wabs.sum(0).max().item()
    gw_atol = (g_atol + ec * (math.sqrt(rows) + 2.0) * g_scale) * habs.sum(0).max().item()
    gb_atol = (g_atol + ec * (math.sqrt(rows) + 2.0) * g_scale) * rows
    assert_within(grads[0], grads_ref[0], gh_atol + _subnormal_half(dtype), _eps(dtype), dtype, f"{what}: grad h")
    assert_within(grads[1], grads_ref[1], gw_atol + _subnormal_half(dtype), _eps(dtype), dtype, f"{what}: grad W")
    if b is not None:
        assert_within(grads[2], grads_ref[2], gb_atol + _subnormal_half(dtype), _eps(dtype), dtype,
                      f"{what}: grad b")
    for g, x in zip(grads, (h, w, b)):
        assert g.dtype == x.dtype, f"{what}: gradient dtype {g.dtype} != {x.dtype}"


# --------------------------------------------------------------------------------------------------------
# relation- and feature-based losses
# --------------------------------------------------------------------------------------------------------
RELATION = ["rkd", "rkd_w", "rkd_distance", "rkd_angle", "sp", "sp_sum", "pkt", "cc", "cc_bilinear", "at",
            "at_paper", "nst", "hint", "hint_sum"]
MAPS = {"at", "at_paper", "nst"}
NO_TEACHER_GRAD = {"rkd", "rkd_w", "rkd_distance", "rkd_angle"}


def _relation_fn(mod, c):
    name = c["name"]
    if name == "rkd":
        return lambda s, t: mod.rkd_loss(s, t)
    if name == "rkd_w":
        return lambda s, t: mod.rkd_loss(s, t, c["w_d"], c["w_a"])
    if name == "rkd_distance":
        return mod.rkd_distance_loss
    if name == "rkd_angle":
        return mod.rkd_angle_loss
    if name == "sp":
        return lambda s, t: mod.sp_loss(s, t)
    if name == "sp_sum":
        return lambda s, t: mod.sp_loss(s, t, reduction="sum")
    if name == "pkt":
        return lambda s, t: mod.pkt_loss(s, t, c["eps"])
    if name == "cc":
        return lambda s, t: mod.cc_loss(s, t, "gaussian", c["gamma"], c["max_p"], c["cc_red"])
    if name == "cc_bilinear":
        return lambda s, t: mod.cc_loss(s, t, "bilinear", reduction=c["cc_red"])
    if name == "at":
        return lambda s, t: mod.at_loss(s, t, c["p"])
    if name == "at_paper":
        return lambda s, t: mod.at_loss(s, t, c["p"], mode="paper")
    if name == "nst":
        return lambda s, t: mod.nst_loss(s, t)
    if name == "hint":
        return lambda s, t: mod.hint_loss(s, t)
    if name == "hint_sum":
        return lambda s, t: mod.hint_loss(s, t, reduction="sum")
    raise AssertionError(name)


@st.composite
def relation_cases(draw):
    name = draw(st.sampled_from(RELATION))
    n = draw(st.sampled_from([8, 5, 17, 3, 2, 1]))
    if name in MAPS:
        c_s, c_t = draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from([1, 3, 4]))
        h = draw(st.sampled_from([1, 2, 4]))
        s_shape, t_shape = (n, c_s, h, h), (n, c_t, h, h)
        if h == 2 and draw(st.booleans()):
            s_shape = (n, c_s, 4, 4)  # RepDistiller's square pooling of the taller map
    elif name.startswith("hint"):
        d = draw(st.sampled_from([1, 4, 17]))
        s_shape = t_shape = (n, d)
    else:
        s_shape = (n, draw(st.sampled_from([1, 2, 5, 16, 33])))
        t_shape = (n, draw(st.sampled_from([1, 2, 5, 16, 33])))
    s_dtype = draw(st.sampled_from(DTYPES))
    t_dtype = s_dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    return dict(
        name=name, s_shape=s_shape, t_shape=t_shape, s_dtype=s_dtype, t_dtype=t_dtype,
        mag=10.0 ** draw(st.floats(-1.0, 1.5)),
        structure=draw(st.sampled_from(["random", "offset", "dup_rows", "near_dup", "teacher_is_student", "relu"])),
        offset=draw(st.sampled_from([10.0, 100.0])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        teacher_grad=name not in NO_TEACHER_GRAD and draw(st.booleans()),
        w_d=draw(st.sampled_from([0.0, 0.5, 25.0])), w_a=draw(st.sampled_from([0.0, 2.0, 50.0])),
        eps=draw(st.sampled_from([1e-7, 1e-4])), gamma=draw(st.sampled_from([0.4, 0.05])),
        max_p=draw(st.integers(1, 4)), cc_red=draw(st.sampled_from(["batchmean", "sum"])),
        p=draw(st.sampled_from([1, 2, 3, 2.5])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _relation_inputs(c):
    """Float64 features (s, t) with the structure applied, and ``src`` (for every row, the row whose values it
    copies: duplicates share their perturbation in the sensitivity estimate)."""
    gen = torch.Generator().manual_seed(c["seed"])
    s = torch.randn(c["s_shape"], generator=gen, dtype=torch.float64) * c["mag"]
    t = torch.randn(c["t_shape"], generator=gen, dtype=torch.float64) * c["mag"]
    n = s.shape[0]
    src = torch.arange(n)
    if c["structure"] == "teacher_is_student" and c["s_shape"] == c["t_shape"]:
        t = s.clone()
    elif c["structure"] == "offset":
        s, t = s + c["offset"] * c["mag"], t - c["offset"] * c["mag"]
    elif c["structure"] == "dup_rows" and n >= 2:
        s[-1], t[-1] = s[0], t[0]
        src[-1] = 0
    elif c["structure"] == "near_dup" and n >= 2:
        s[-1] = s[0] + 1e-3 * c["mag"] * torch.randn(s[0].shape, generator=gen, dtype=torch.float64)
        t[-1] = t[0] + 1e-3 * c["mag"] * torch.randn(t[0].shape, generator=gen, dtype=torch.float64)
    elif c["structure"] == "relu":
        s, t = s.clamp_min(0) + c["offset"] * 0.01 * c["mag"], t.clamp_min(0)
    if c["name"].startswith("at") and c["p"] == 2.5:  # a non-integer power of negatives is NaN (documented)
        s, t = s.abs(), t.abs()
    return s, t, src


def _lay(layout, x):
    """A non-contiguous copy of ``x`` with the same values: transposed storage or every other entry."""
    if layout == "transposed":
        return x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    if layout == "strided":
        big = torch.empty((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def _relation_run(fn, s, t, teacher_grad, layout):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(_lay(layout, s), _lay(layout, t))
    ins = [s] + ([t] if teacher_grad else [])
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, ins)]
    return loss.detach(), grads


def _natural_scale(c, s, t):
    """A bound on the magnitude the loss's terms round against (see ``_relation_tols``)."""
    name, n = c["name"], s.shape[0]
    if name.startswith("rkd"):
        def dist_ratio(x):
            d = torch.cdist(x.reshape(n, -1), x.reshape(n, -1))
            pos = d[d > 0]
            return (pos.max() / pos.mean()).item() if pos.numel() else 1.0
        wd, wa = {"rkd": (25.0, 50.0), "rkd_w": (c["w_d"], c["w_a"]), "rkd_distance": (1.0, 0.0),
                  "rkd_angle": (0.0, 1.0)}[name]
        return wd * (dist_ratio(s) + dist_ratio(t)) + 2.0 * wa
    if name.startswith("sp"):
        return 4.0 * (n * n if name == "sp_sum" else 1.0)
    if name == "pkt":
        ps, pt = R._pkt_probs(s.reshape(n, -1), c["eps"]), R._pkt_probs(t.reshape(n, -1), c["eps"])
        lr = torch.log((pt + c["eps"]) / (ps + c["eps"])).abs().max().item()
        # S = (cos + 1) / 2 carries an absolute rounding error ~eta, so P_s one of ~2 eta / N, which moves
        # P_t log(P_t + e) / (P_s + e) by P_t / (P_s + e) times that: huge where P_s ~ 0 (antipodal rows)
        amp = (pt * (2.0 / max(n, 1)) / (ps + c["eps"])).mean().item()
        return (lr + 2.0) / max(n, 1) + amp + c["eps"] * 10
    if name.startswith("cc"):
        kernel = "bilinear" if name == "cc_bilinear" else "gaussian"
        cs = R._cc_matrix(s.reshape(n, -1), kernel, c["gamma"], c["max_p"])
        ct = R._cc_matrix(t.reshape(n, -1), kernel, c["gamma"], c["max_p"])
        div = n * n if c["cc_red"] == "batchmean" else 1.0
        return (cs.norm() + ct.norm()).item() * (1 if kernel == "bilinear" else c["max_p"]) / div
    if name in MAPS:
        return 6.0
    diff = (s - t).abs()
    m = 2.0 * (diff * (s.abs() + t.abs()))
    return (m.sum() if name == "hint_sum" else m.mean()).item()


def _relation_tols(c, s, t, src, loss_ref, grads_ref):
    """Derived tolerances for a relation loss on float64 copies ``s``, ``t`` of the rounded inputs.

    Backward-error argument: a stable float32 (float64 for float64 input) evaluation equals the exact loss at
    inputs perturbed by a relative eta = eps_c (sqrt(n) + 4), n the longest reduction (D, N or C*HW), the
    sqrt being the probabilistic bound of an n-term dot product / sum. The oracle's change under two such
    random perturbations (duplicated rows perturbed alike, so the duplicate structure, which the kernels treat
    exactly, is kept) measures the conditioning; the tolerance is 4x that, plus a floor of eta times the
    loss's natural magnitude (``_natural_scale``: where the first-order sensitivity vanishes, e.g. PKT at
    P_s = P_t, rounding of intermediates still gives first-order errors), plus one rounding to the output
    dtype. Gradients alike, with a floor of 4 eta (max|g| + scale / (rms|x| N)): where the exact gradient
    vanishes (1-D RKD angles) rounding still moves it by about eta times the loss scale per unit row change."""
    _, cdtype = _compute_dtype(c["s_dtype"], c["t_dtype"])
    n_red = max(math.prod(s.shape[1:]), math.prod(t.shape[1:]), s.shape[0], 1)
    eta = _eps(cdtype) * (math.sqrt(n_red) + 4.0)
    fn = _relation_fn(R, c)
    gen = torch.Generator().manual_seed(c["seed"] + 7)
    sens_l, sens_g = 0.0, [torch.zeros_like(g) for g in grads_ref]
    for _ in range(2):
        rs = (torch.rand(s.shape, generator=gen, dtype=torch.float64) * 2 - 1)[src]
        rt = (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1)[src]
        lp, gp = _relation_run(fn, s * (1 + eta * rs), t * (1 + eta * rt), c["teacher_grad"], "contiguous")
        if torch.isfinite(lp):
            sens_l = max(sens_l, (lp - loss_ref).abs().item())
        sens_g = [torch.maximum(a, torch.nan_to_num((g - r).abs(), nan=0.0, posinf=0.0)) for a, g, r in
                  zip(sens_g, gp, grads_ref)]
    scale = _natural_scale(c, s, t)
    loss_atol = 4.0 * sens_l + eta * scale
    g_atol = []
    for sg, r, x in zip(sens_g, grads_ref, (s, t)):
        # where the exact gradient vanishes (e.g. RKD angles of 1-D features) the rounding still moves it by
        # about eta times the loss scale per unit change of one row: scale / (rms|x| N)
        rms = x.pow(2).mean().sqrt().item() if x.numel() else 1.0
        g_nat = scale / (max(rms, 1e-30) * max(x.shape[0], 1))
        if c["name"] == "rkd" and x.shape[0] > 1:
            # RKD is translation invariant: its unit of row change is the spread (rms of the centered rows),
            # while the rounding perturbs each entry relative to its raw size (offset included), so the same
            # argument gives scale * rms_raw / (rms_centered^2 N) (a common offset 10x the spread: 100x)
            rms_c = (x - x.mean(0, keepdim=True)).pow(2).mean().sqrt().item()
            g_nat = max(g_nat, scale * rms / (max(rms_c, 1e-30) ** 2 * x.shape[0]))
        g_atol.append(4.0 * sg.max().item() + 4.0 * eta * (r.abs().max().item() + g_nat) if r.numel() else 0.0)
    return loss_atol, g_atol


@fuzz(120)
@given(relation_cases())
def test_fuzz_relation_and_feature_losses(c):
    """RKD (both terms, weights incl. 0), SP (batchmean / sum), PKT, CC (gaussian of order 1..4 / bilinear),
    AT (p in {1, 2, 3, 2.5}, code / paper, pooled heights), NST, hint: random N (1..17), widths, all dtypes and
    mixed pairs, non-contiguous inputs, common offsets, post-ReLU features, duplicated and nearly duplicated
    rows, teacher == student, teacher requiring grad: value and gradients vs the float64 reference within
    the derived tolerances of ``_relation_tols``."""
    s64, t64, src = _relation_inputs(c)
    s, t = s64.to(c["s_dtype"]), t64.to(c["t_dtype"])
    s64, t64 = s.double(), t.double()  # the oracle sees the rounded inputs
    what = str(c)
    loss, grads = _relation_run(_relation_fn(fastkd, c), s, t, c["teacher_grad"], c["layout"])
    ref, grads_ref = _relation_run(_relation_fn(R, c), s64, t64, c["teacher_grad"], "contiguous")
    out_dtype, _ = _compute_dtype(c["s_dtype"], c["t_dtype"])
    assert loss.dtype == out_dtype and loss.shape == (), f"{what}: loss {loss.dtype} {loss.shape}"
    assert grads[0].dtype == c["s_dtype"], f"{what}: student grad dtype {grads[0].dtype}"
    loss_atol, g_atol = _relation_tols(c, s64, t64, src, ref, grads_ref)
    assert_within(loss, ref, loss_atol + _subnormal_half(out_dtype), _eps(out_dtype), out_dtype, f"{what}: loss")
    for i, (g, gr, ga) in enumerate(zip(grads, grads_ref, g_atol)):
        dt = c["s_dtype"] if i == 0 else c["t_dtype"]
        assert_within(g, gr, ga + _subnormal_half(dt), _eps(dt), dt, f"{what}: grad[{i}]")

    # the anchors' direct formulas (float64, well-conditioned: random structure, N >= 2): the oracle itself
    if c["structure"] == "random" and s.shape[0] >= 2 and c["s_dtype"] == c["t_dtype"] == torch.float64:
        anchor = None
        if c["name"] == "rkd":
            anchor = repdistiller_rkd(s64, t64)
        elif c["name"] == "sp":
            anchor = torchdistill_spkd(s64, t64)
        elif c["name"] == "pkt" and s64.dim() == 2:
            anchor = repdistiller_pkt(s64, t64, c["eps"])
        elif c["name"] == "cc" and s64.shape[1] == t64.shape[1]:
            anchor = torchdistill_cckd(s64, t64, "gaussian", c["gamma"], c["max_p"], c["cc_red"])
        if anchor is not None:
            torch.testing.assert_close(ref, anchor.reshape(()), rtol=1e-9, atol=1e-12, msg=f"{what}: oracle vs anchor")
