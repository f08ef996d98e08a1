"""Every registered response divergence (fastkd/divergences.py and csrc/include/fastkd/divergences.h), from
its spec: the compiled registry agrees with the specs; values and both gradients against the float64 formula
and the anchor's formulation; gradcheck, opcheck, torch.compile; the generated function, module and reference;
the fused linear head equal to the dense loss; bad parameters; the README's table. A divergence added to the
registry is tested here with no further edit (its ``test_params``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import fastkd
from fastkd import divergences
from fastkd.divergences import REGISTRY

DENSE = [s for s in REGISTRY.values() if s.family != "decoupled"]
CASES = [pytest.param(s.name, dict(p), id=f"{s.name}-" + ("-".join(f"{k}{x:g}" for k, x in p.items()) or "default"))
         for s in DENSE for p in s.test_params]
FUSED = [c for c in CASES if REGISTRY[c.values[0]].fused_head]


def _logits(shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _inputs(seed=0, shape=(3, 4, 23)):
    s, t = _logits(shape, seed), _logits(shape, seed + 1)
    # masked vocabulary entries on both sides, one fully masked row, ignored rows
    s[..., 5] = t[..., 5] = -math.inf
    s[0, 1] = t[0, 1] = -math.inf
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(seed + 2))
    labels[1, 2] = labels[2, 0] = -100
    return s, t, labels


def _value_grads(fn, s, t, grad_out=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    gs, gt = torch.autograd.grad(loss, (s, t), go)
    return loss.detach(), gs, gt


def test_compiled_registry_matches_the_specs():
    from fastkd import _C

    compiled = _C.divergences()
    assert [d["name"] for d in compiled] == list(REGISTRY), "the C++ list and the Python specs differ in order"
    for d in compiled:
        spec = REGISTRY[d["name"]]
        assert d["family"] == spec.family, d["name"]
        got = [(n, lo, hi, lo_open, hi_open) for n, _, lo, hi, lo_open, hi_open in d["params"]]
        want = [(p.name, p.lo, p.hi, p.lo_open, p.hi_open) for p in spec.params]
        assert got == want, d["name"]
        for (name, default, *_), p in zip(d["params"], spec.params):
            assert p.default is None or default == p.default, (d["name"], name)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_value_and_gradients_match_float64_formula(name, params, reduction):
    s, t, labels = _inputs(seed=len(name))
    g = torch.rand(s.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    go = g if reduction == "none" else torch.tensor(0.8, dtype=torch.float64)
    kw = dict(labels=labels, reduction=reduction, **params)
    got = _value_grads(lambda a, b, **k: fastkd.divergence_loss(a, b, name, 1.7, **k), s, t, go, **kw)
    ref = _value_grads(lambda a, b, **k: fastkd.reference.divergence_loss(a, b, name, 1.7, **k), s, t, go, **kw)
    for x, y, what in zip(got, ref, ("value", "student grad", "teacher grad")):
        assert_close(x, y, 1e-10, 1e-12, f"{name} {params} {reduction} {what}")
        assert torch.isfinite(x).all(), what
    # float32 against the float64 formula
    got32 = _value_grads(lambda a, b, **k: fastkd.divergence_loss(a, b, name, 1.7, **k), s.float(), t.float(), go,
                         **kw)
    for x, y, what in zip(got32, ref, ("value", "student grad", "teacher grad")):
        assert x.dtype == torch.float32
        assert_close(x, y, 2e-5, 2e-6, f"{name} {params} {reduction} float32 {what}")


@pytest.mark.parametrize("name,params", CASES)
def test_named_function_module_and_reference_agree(name, params):
    spec = REGISTRY[name]
    s, t, labels = _inputs(seed=7)
    fn, ref_fn, module = getattr(fastkd, spec.function), getattr(fastkd.reference, spec.function), \
        getattr(fastkd, spec.module)
    assert getattr(fastkd.functional, spec.function) is fn
    full = {p.name: params.get(p.name, p.default) for p in spec.params}
    generic = fastkd.divergence_loss(s, t, name, 2.0, labels=labels, **params)
    if spec.generated:  # the generated names take the parameters by name and position
        assert_close(fn(s, t, **full, temperature=2.0, labels=labels), generic, 0, 0, "function")
        assert_close(fn(s, t, *full.values(), 2.0, labels=labels), generic, 0, 0, "positional")
        assert_close(ref_fn(s, t, **full, temperature=2.0, labels=labels), generic, 1e-12, 1e-14, "reference")
        assert_close(module(*full.values(), temperature=2.0)(s, t, labels), generic, 0, 0, "module")
    assert_close(fastkd.DivergenceLoss(name, 2.0, **params)(s, t, labels), generic, 0, 0, "DivergenceLoss")


@pytest.mark.parametrize("name,params", CASES)
def test_anchor_formulation(name, params):
    spec = REGISTRY[name]
    if spec.anchor_formula is None:
        where = "its formula is the anchor's definition" if spec.generated else "see test_response.py"
        pytest.skip(f"{name}: {where}")
    s, t = _logits((6, 19), 11), _logits((6, 19), 12)  # finite: the anchors' formulations have no -inf handling
    full = {p.name: params.get(p.name, p.default) for p in spec.params}
    for T in (1.0, 2.5):
        want = spec.anchor_formula(s, t, T, **full)
        got = fastkd.divergence_loss(s, t, name, T, reduction="none", scale_by_temperature=False, **params)
        assert_close(got, want, 1e-10, 1e-12, f"{name} against {spec.anchor} at T={T}")


SAME = [pytest.param(s.name, dict(p), other, dict(q), id=f"{s.name}-{'-'.join(f'{k}{x:g}' for k, x in p.items())}"
                     f"-is-{other}") for s in DENSE for p, other, q in s.same_as]


@pytest.mark.parametrize("name,params,other,other_params", SAME)
def test_limit_cases_are_exact(name, params, other, other_params):
    """A divergence at a limit of its parameters equals the other divergence: value and both gradients."""
    s, t, labels = _inputs(seed=13)
    scale = REGISTRY[name].temperature_squared and REGISTRY[other].temperature_squared
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        a = _value_grads(lambda x, y: fastkd.divergence_loss(x, y, name, 2.0, labels=labels, scale_by_temperature=scale,
                                                             **params), s.to(dtype), t.to(dtype))
        b = _value_grads(lambda x, y: fastkd.divergence_loss(x, y, other, 2.0, labels=labels,
                                                             scale_by_temperature=scale, **other_params),
                         s.to(dtype), t.to(dtype))
        for x, y, what in zip(a, b, ("value", "student grad", "teacher grad")):
            assert_close(x, y, tol, tol * 1e-2, f"{name} {params} == {other} {what} ({dtype})")


@pytest.mark.parametrize("name,params", CASES)
def test_gradcheck(name, params):
    s = _logits((3, 7), 1).requires_grad_(True)
    t = _logits((3, 7), 2).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: fastkd.divergence_loss(a, b, name, 1.3, reduction="sum", **params), (s, t))


@pytest.mark.parametrize("name,params", CASES)
def test_opcheck(name, params):
    spec = REGISTRY[name]
    values = [params.get(p.name, p.default) for p in spec.params]
    s, t = _logits((5, 17), 3, dtype=torch.float32), _logits((5, 17), 4, dtype=torch.float32)
    labels = torch.tensor([1, -100, 3, 0, 16])
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    for args in [(req(s), t, labels, None, name, values, 2.0, 1.0, 0.0, -100, "batchmean", spec.temperature_squared,
                  True, False),
                 (req(s), req(t), labels, torch.tensor(4.0), name, values, 1.0, 0.5, 0.5, -100, "mean", False, True,
                  True) if spec.family != "decoupled" else None,
                 (s, t, labels, None, name, values, 1.5, 1.0, 0.0, -100, "none", False, False, False)]:
        if args is not None:
            torch.library.opcheck(torch.ops.fastkd.response_forward, args)


@pytest.mark.parametrize("name,params", CASES)
def test_torch_compile_fullgraph(name, params):
    s, t = _logits((5, 17), 3, dtype=torch.float32), _logits((5, 17), 4, dtype=torch.float32)
    labels = torch.tensor([1, -100, 3, 0, 16])
    req = lambda x: x.clone().requires_grad_(True)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: fastkd.divergence_loss(a, b, name, 2.0, labels=labels, **params),
                             fullgraph=True)
    a, b = req(s), req(t)
    out = compiled(a, b)
    out.backward()
    a2, b2 = req(s), req(t)
    eager = fastkd.divergence_loss(a2, b2, name, 2.0, labels=labels, **params)
    eager.backward()
    assert_close(out, eager, 0, 0, "compiled value")
    assert_close(a.grad, a2.grad, 0, 0, "compiled student grad")
    assert_close(b.grad, b2.grad, 0, 0, "compiled teacher grad")


@pytest.mark.parametrize("name,params", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_linear_head_equals_dense(name, params, reduction):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(21, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(21, 6, generator=g,
                                                                               dtype=torch.float64)
    labels = torch.randint(0, 21, (2, 5), generator=g)
    labels[0, 1] = -100
    go = torch.rand(2, 5, generator=g, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = dict(loss=name, temperature=1.5, labels=labels, reduction=reduction, hard_label_weight=0.25, **params)
    fused = fastkd.fused_linear_kd_loss(h, w, fastkd.TeacherHead(th, tw), student_bias=b, chunk_size=3, **kw)
    gf = torch.autograd.grad(fused, (h, w, b), go if go is not None else torch.ones_like(fused))
    logits, t_logits = F.linear(h, w, b), F.linear(th, tw)
    spec = REGISTRY[name]
    dense = 0.75 * fastkd.divergence_loss(logits, t_logits, name, 1.5, labels=labels, reduction=reduction,
                                          scale_by_temperature=spec.temperature_squared, **params) + \
        0.25 * fastkd.kd_loss(logits, logits.detach(), 1.0, labels=labels, reduction=reduction, alpha=1.0, beta=0.0)
    gd = torch.autograd.grad(dense, (h, w, b), go if go is not None else torch.ones_like(dense))
    assert_close(fused, dense, 1e-10, 1e-12, f"{name} fused value")
    for x, y, what in zip(gf, gd, ("hidden", "weight", "bias")):
        assert_close(x, y, 1e-9, 1e-11, f"{name} fused {what} grad")


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if s.params], ids=lambda s: s.name)
def test_bad_parameters_are_clear_errors(spec):
    s, t, labels = _inputs(seed=3)
    first = spec.params[0]
    good = {p.name: (p.default if p.default is not None else 0.5) for p in spec.params}
    outside = first.hi + 1.0 if math.isfinite(first.hi) else first.lo - 1.0
    kw = dict(labels=labels)
    for value, exc, match in [(outside, ValueError, first.name), (math.nan, ValueError, first.name),
                              (math.inf, ValueError, first.name), ("0.5", TypeError, first.name),
                              (True, TypeError, first.name)]:
        bad = dict(good, **{first.name: value})
        with pytest.raises(exc, match=first.name):
            fastkd.divergence_loss(s, t, spec.name, **bad, **kw)
        with pytest.raises(exc, match=first.name):
            fastkd.reference.divergence_loss(s, t, spec.name, **bad, **kw)
        with pytest.raises(exc, match=first.name):
            fastkd.DivergenceLoss(spec.name, **bad)
    with pytest.raises(TypeError, match="unexpected"):
        fastkd.divergence_loss(s, t, spec.name, not_a_parameter=1.0, **kw)
    # the op's own rule (one message): out of range at the op level is a ValueError naming the parameter
    values = [good[p.name] for p in spec.params]
    values[0] = outside
    with pytest.raises(ValueError, match=f"argument '{first.name}'"):
        torch.ops.fastkd.response_forward(s, t, labels.reshape(-1) if False else None, None, spec.name, values, 1.0,
                                          1.0, 0.0, -100, "batchmean", False, False, False)
    with pytest.raises(ValueError, match="takes"):
        torch.ops.fastkd.response_forward(s, t, None, None, spec.name, values + [1.0], 1.0, 1.0, 0.0, -100,
                                          "batchmean", False, False, False)


def test_unknown_divergence():
    s, t, _ = _inputs()
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.divergence_loss(s, t, "not_a_divergence")
    with pytest.raises(ValueError, match="argument 'divergence'"):
        torch.ops.fastkd.response_forward(s.reshape(-1, 23), t.reshape(-1, 23), None, None, "nope", [], 1.0, 1.0,
                                          0.0, -100, "batchmean", False, False, False)


def test_readme_holds_the_registry_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert divergences.readme_table() in readme, (
        "README.md's table of divergences is out of date; paste fastkd.divergences.readme_table()")


@pytest.mark.parametrize("name,params", FUSED)
def test_shard_phases_compose_to_the_dense_loss(name, params):
    """The vocabulary-range ops of the tensor-parallel path, on two ranges of one process: the sums of their
    terms give the dense divergence, and their gradients the dense student gradient (float64)."""
    spec = REGISTRY[name]
    values = [params.get(p.name, p.default) for p in spec.params]
    s, t = _logits((5, 17), 21), _logits((5, 17), 22)
    s[1, 3] = t[1, 3] = -math.inf
    T = 1.7
    shift = torch.stack([s.amax(-1), t.amax(-1)])
    log_z = torch.stack([((x - m[:, None]) / T).exp().sum(-1).log() for x, m in ((s, shift[0]), (t, shift[1]))])
    stats = torch.stack([shift[0], shift[1], log_z[0], log_z[1]], dim=1).contiguous()
    cut = 9
    ranges = [(slice(None), slice(0, cut)), (slice(None), slice(cut, None))]
    sums = sum(torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name, values, T)
               for r in ranges)
    dense = fastkd.divergence_loss(s, t, name, T, reduction="none", scale_by_temperature=False, **params)
    assert_close(sums[:, 0], dense, 1e-12, 1e-14, f"{name} shard sums")
    coef = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    grad = torch.cat([torch.ops.fastkd.response_shard_grad(s[r].contiguous(), t[r].contiguous(), stats, coef / T,
                                                           sums[:, 1].contiguous(), name, values, T)
                      for r in ranges], dim=-1)
    a = s.clone().requires_grad_(True)
    fastkd.divergence_loss(a, t, name, T, reduction="none", scale_by_temperature=False, **params).backward(coef)
    assert_close(grad, a.grad, 1e-10, 1e-12, f"{name} shard gradient")
    sample = (s[:, :cut].contiguous(), t[:, :cut].contiguous(), stats, name, values, T)
    torch.library.opcheck(torch.ops.fastkd.response_shard_terms, sample)
    torch.library.opcheck(torch.ops.fastkd.response_shard_grad,
                          sample[:3] + (coef, sums[:, 1].contiguous()) + sample[3:])
    with pytest.raises(ValueError, match="argument 'divergence'"):
        torch.ops.fastkd.response_shard_terms(s, t, stats, "nope", [], T)
    with pytest.raises(RuntimeError, match="'dkd' does not run here"):
        torch.ops.fastkd.response_shard_terms(s, t, stats, "dkd", [1.0, 8.0], T)


@pytest.mark.parametrize("name,params", FUSED)
def test_shard_phases_with_row_temperatures(name, params):
    """The same with one temperature per row: the sums, the gradient, and the row dots' range sums (dots=True),
    which give the dense temperature gradient: d D_i / d T_i = -(D_s + D_t) / T_i (float64)."""
    spec = REGISTRY[name]
    values = [params.get(p.name, p.default) for p in spec.params]
    s, t = _logits((5, 17), 23), _logits((5, 17), 24)
    s[1, 3] = t[1, 3] = -math.inf
    T = 0.5 + torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2.0
    shift = torch.stack([s.amax(-1), t.amax(-1)])
    log_z = torch.stack([((x - m[:, None]) / T[:, None]).exp().sum(-1).log() for x, m in ((s, shift[0]),
                                                                                          (t, shift[1]))])
    stats = torch.stack([shift[0], shift[1], log_z[0], log_z[1]], dim=1).contiguous()
    ranges = [(slice(None), slice(0, 9)), (slice(None), slice(9, None))]
    sums = sum(torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name, values, 1.0,
                                                     T, True) for r in ranges)
    assert sums.shape == (5, 7)
    plain = sum(torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name, values, 1.0,
                                                      T) for r in ranges)
    assert_close(sums[:, :2], plain, 1e-13, 1e-15, f"{name} sums with and without dots")
    coef = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.5
    a, T_ = s.clone().requires_grad_(True), T.clone().requires_grad_(True)
    dense = fastkd.divergence_loss(a, t, name, T_, reduction="none", scale_by_temperature=False, **params)
    dense.backward(coef)
    assert_close(sums[:, 0], dense.detach(), 1e-12, 1e-14, f"{name} shard sums")
    from fastkd.distributed import _temperature_dots

    d_s, d_t = _temperature_dots(sums[:, 1:].t())
    assert_close(-coef * (d_s + d_t) / T, T_.grad, 1e-10, 1e-12, f"{name} temperature gradient")
    grad = torch.cat([torch.ops.fastkd.response_shard_grad(s[r].contiguous(), t[r].contiguous(), stats, coef / T,
                                                           sums[:, 1].contiguous(), name, values, 1.0, T)
                      for r in ranges], dim=-1)
    assert_close(grad, a.grad, 1e-10, 1e-12, f"{name} shard gradient")
    sample = (s[:, :9].contiguous(), t[:, :9].contiguous(), stats, name, values, 1.0, T, True)
    torch.library.opcheck(torch.ops.fastkd.response_shard_terms, sample)
    torch.library.opcheck(torch.ops.fastkd.response_shard_grad,
                          sample[:3] + (coef, sums[:, 1].contiguous()) + sample[3:7])
    with pytest.raises(ValueError, match="argument 'temperature': every entry must be a finite value"):
        torch.ops.fastkd.response_shard_terms(s, t, stats, name, values, 1.0, torch.zeros(5))
    with pytest.raises(RuntimeError, match=r"argument 'temperature': expected shape \[5\]"):
        torch.ops.fastkd.response_shard_grad(s, t, stats, coef, coef, name, values, 1.0, torch.ones(4))


# --------------------------------------------------------------------------------------------------------
# fuzzing every registered divergence (profiles of tests/test_fuzz.py: FASTKD_FUZZ_PROFILE=long for 1000 cases)
# --------------------------------------------------------------------------------------------------------
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fuzz import assert_within, fuzz  # noqa: E402


@st.composite
def _registry_cases(draw):
    name, params = draw(st.sampled_from([(c.values[0], c.values[1]) for c in CASES]))
    return dict(name=name, params=params, rows=draw(st.integers(1, 6)), vocab=draw(st.integers(1, 200)),
                scale=draw(st.sampled_from([0.01, 1.0, 5.0, 30.0])), T=draw(st.sampled_from([0.5, 1.0, 2.5])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                mask=draw(st.sampled_from(["none", "columns", "row", "labels"])),
                reduction=draw(st.sampled_from(["batchmean", "sum", "mean", "none"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _entry_magnitudes(name, params, s64, t64, T):
    """Per row: sum_j |phi_j| and sum_j |psi_q(j)| of the float64 formula (the size of what the kernel sums)."""
    from fastkd.distributed import _entry_terms

    spec = REGISTRY[name]
    named = {p.name: params.get(p.name, p.default) for p in spec.params}
    log_q, log_p = torch.log_softmax(s64 / T, -1), torch.log_softmax(t64 / T, -1)
    phi, psi_q = _entry_terms(spec, named, log_p, log_q)
    return phi.abs().nan_to_num(0.0, 0.0, 0.0).sum(-1), psi_q.abs().nan_to_num(0.0, 0.0, 0.0).sum(-1)


@fuzz(60)
@given(_registry_cases())
def test_fuzz_every_registered_divergence(c):
    """Kernel (float32 / float64) against the float64 formula on the same rounded inputs, with tolerances
    derived as in test_fuzz.py's response losses: each log-probability carries an absolute error delta =
    eps (6 max|z| / T + 2 sqrt(V) + 8); a per-entry term moves by delta (L + 2) m times its size (L = 2 max|z| / T
    + log V + 1, m = 1 + |alpha| + |beta| for the exponents of the alpha-beta divergence); the sums are bounded
    by the sums of the terms' magnitudes."""
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["rows"], c["vocab"])
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * c["scale"]).to(c["dtype"])
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * c["scale"]).to(c["dtype"])
    labels = None
    if c["mask"] == "columns" and c["vocab"] > 1:
        cols = torch.rand(c["vocab"], generator=g) < 0.3
        cols[0] = False
        s[:, cols] = t[:, cols] = -math.inf
    elif c["mask"] == "row":
        s[0] = t[0] = -math.inf
    elif c["mask"] == "labels":
        labels = torch.randint(0, c["vocab"], (c["rows"],), generator=g)
        labels[0] = -100
    name, params, T, red = c["name"], c["params"], c["T"], c["reduction"]
    kw = dict(labels=labels, reduction=red, scale_by_temperature=False, **params)
    go = torch.rand(c["rows"], generator=g, dtype=torch.float64) + 0.5 if red == "none" else torch.tensor(0.7)
    got = _value_grads(lambda a, b: fastkd.divergence_loss(a, b, name, T, **kw), s, t, go)
    ref = _value_grads(lambda a, b: fastkd.reference.divergence_loss(a, b, name, T, **kw), s.double(), t.double(), go)
    finite = torch.isfinite(s.double()) & torch.isfinite(t.double())
    zmax = max(s.double()[finite].abs().max().item(), t.double()[finite].abs().max().item()) if finite.any() else 0.0
    eps = torch.finfo(torch.float32 if c["dtype"] == torch.float32 else torch.float64).eps
    V = c["vocab"]
    delta = eps * (6.0 * zmax / T + 2.0 * math.sqrt(V) + 8.0)
    L = 2.0 * zmax / T + math.log(V) + 1.0
    m = 1.0 + sum(abs(x) for x in params.values()) if name == "ab" else 1.0
    counted = c["rows"] if labels is None else int((labels != -100).sum())
    w = {"sum": 1.0, "none": 1.0, "batchmean": 1.0 / max(counted, 1), "mean": 1.0 / (max(counted, 1) * V)}[red]
    w = w * (1.5 if red == "none" else 0.7)
    phi_mag, psi_mag = _entry_magnitudes(name, params, s.double(), t.double(), T)
    k = 4.0 * delta * (L + 2.0) * m
    value_tol = k * w * ((phi_mag + 1.0) if red == "none" else (phi_mag + 1.0).sum())
    what = f"{name} {params} {c}"
    if ref[0].abs().max() > torch.finfo(c["dtype"]).max:  # the exact value overflows the dtype
        # (alpha-beta divergence with a negative exponent on tiny probabilities): +inf, never NaN or finite; its
        # gradient, a difference of overflowing terms, is not checked (documented)
        assert torch.equal(got[0][ref[0].abs() > torch.finfo(c["dtype"]).max].isposinf(),
                           torch.ones_like(got[0][ref[0].abs() > torch.finfo(c["dtype"]).max], dtype=torch.bool)), what
        return
    assert_within(got[0], ref[0], value_tol, eps, c["dtype"], what + " value")
    grad_tol = (k * w / T * (psi_mag + 2.0)).unsqueeze(-1).expand(shape)
    assert_within(got[1], ref[1], grad_tol, eps, c["dtype"], what + " student grad")
    assert_within(got[2], ref[2], grad_tol, eps, c["dtype"], what + " teacher grad")
