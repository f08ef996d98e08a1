"""Smoke test: every compiled fastkd op family once per device, value and gradients against the plain-PyTorch
reference in float64 on the CPU. Cheap (a few seconds on the CPU), so it runs in every test run; on a GPU
machine it is the first check after the build (``pytest -m smoke``, benchmarks/gpu_check.sh).

Cases: the response op with every registered divergence and each of its test parameter sets (two vocabulary
sizes: the CUDA kernel's two block sizes; labels with ignored rows; student and teacher gradients), the hard-label
CE, the top-k op in each flavour, the vocabulary-range shard ops with every divergence they run, the fused linear
head with each teacher kind (every divergence with a logits teacher), per-row temperatures with their gradient
(the response op, the top-k op and the fused head), and every relation / feature loss (RKD, SP, PKT, CC, AT, NST,
FitNet hint). Inputs are float32 on the device under test.

``test_smoke_touches_every_op`` proves the cases reach every kernel: it runs them all under
tests/op_coverage.py's recorder (a TorchDispatchMode that sees every torch.ops.fastkd call) and compares what
ran with what is registered (the dispatcher's fastkd namespace, the compiled divergence registry, the teacher
kinds, the relation functions): a new op, divergence or relation loss without a smoke case fails it.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import fastkd
from fastkd import divergences, reference
from fastkd import relation_functional
from op_coverage import OpRecorder, missing

pytestmark = pytest.mark.smoke

SHAPES = [(3, 37), (2, 2100)]  # vocab <= 2048 and above: the CUDA response kernel's two block sizes
T = 2.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    """float32 kernel against the float64 reference: |a - e| <= atol * max(1, max |e|) + rtol * |e| entry by
    entry, infinities equal (torch.testing.assert_close's rule, without its first-call import of seconds)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu().double(), expected.detach().double()
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite], e[~finite]), f"{what}: non-finite entries differ"
    a, e = a[finite], e[finite]
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err = (a - e).abs()
    bad = ~(err <= atol * scale + rtol * e.abs())  # NaN in a counts as bad
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {e.numel()} entries off, max |error| {err.max().item():.3g} "
                           f"(max |expected| {scale:.3g}, rtol {rtol}, atol {atol})")


_COVERAGE_ONLY = False  # test_smoke_touches_every_op: run the fused side only


def compare(fast: Callable, ref: Callable, inputs: Dict[str, torch.Tensor], grads: Tuple[str, ...], device: str,
            what: str, dtype: torch.dtype = torch.float32, **tol) -> None:
    """fast(**inputs on device, float inputs in dtype) against ref(**inputs in float64 on the CPU): the loss
    and the gradients of sum(w * loss) with respect to the inputs named in grads."""

    def run(fn, dev, dt):
        xs = {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}
        for k in grads:
            xs[k].requires_grad_(True)
        loss = fn(**xs)
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        gs = torch.autograd.grad((loss * w).sum(), [xs[k] for k in grads]) if grads else ()
        return loss, gs

    loss, gs = run(fast, device, dtype)
    if _COVERAGE_ONLY:
        return
    loss_ref, gs_ref = run(ref, "cpu", torch.float64)
    assert loss.device.type == torch.device(device).type, f"{what}: loss on {loss.device}, not {device}"
    _close(loss, loss_ref, f"{what} value", **tol)
    for name, g, g_ref in zip(grads, gs, gs_ref):
        _close(g, g_ref, f"{what} d/d{name}", **tol)


# --------------------------------------------------------------------------------------------------------
# the cases: (id, fn(device))
# --------------------------------------------------------------------------------------------------------
CASES: List[Tuple[str, Callable[[str], None]]] = []


def case(name: str):
    def register(fn):
        CASES.append((name, fn))
        return fn

    return register


def _logit_pair(shape, seed):
    return dict(s=_randn(*shape, seed=seed, scale=2.0), t=_randn(*shape, seed=seed + 1, scale=2.0))


def _labels(rows: int, vocab: int, seed: int) -> torch.Tensor:
    y = torch.randint(0, vocab, (rows,), generator=_gen(seed))
    y[-1] = -1  # an ignored row
    return y


def _response_case(name: str, params: Dict[str, float]):
    def run(device):
        for i, shape in enumerate(SHAPES):
            inputs = _logit_pair(shape, 10 * i)
            inputs["labels"] = _labels(shape[0], shape[1], 10 * i + 2)
            kw = dict(reduction="none" if i else "batchmean", ignore_index=-1, **params)
            compare(lambda s, t, labels: fastkd.divergence_loss(s, t, name, T, labels=labels, **kw),
                    lambda s, t, labels: reference.divergence_loss(s, t, name, T, labels=labels, **kw),
                    inputs, ("s", "t"), device, f"{name}{params} {shape}")

    return run


for _name, _spec in divergences.REGISTRY.items():
    for _k, _params in enumerate(_spec.test_params):
        case(f"response-{_name}-{_k}")(_response_case(_name, dict(_params)))


@case("dist")
def _dist(device):
    inputs = _logit_pair((6, 37), 34)
    compare(lambda s, t: fastkd.dist_loss(s, t, beta=1.0, gamma=2.0, tau=2.0),
            lambda s, t: reference.dist_loss(s, t, beta=1.0, gamma=2.0, tau=2.0), inputs, ("s", "t"), device, "dist")


@case("response-row-options")
def _row_options(device):
    inputs = _logit_pair((5, 37), 36)
    inputs["T"] = torch.rand(5, generator=_gen(38), dtype=torch.float64) + 0.5
    inputs["w"] = torch.rand(5, generator=_gen(39), dtype=torch.float64)
    compare(lambda s, t, T, w: fastkd.kd_loss(s, t, T, token_weights=w, standardize=True),
            lambda s, t, T, w: reference.kd_loss(s, t, T, token_weights=w, standardize=True), inputs,
            ("s", "t", "T"), device, "row options")


@case("response-hard-label")
def _hard_label(device):
    inputs = _logit_pair((4, 37), 30)
    inputs["labels"] = _labels(4, 37, 32)
    compare(lambda s, t, labels: fastkd.kd_loss(s, t, T, labels=labels, ignore_index=-1, alpha=0.3),
            lambda s, t, labels: reference.kd_loss(s, t, T, labels=labels, ignore_index=-1, alpha=0.3),
            inputs, ("s",), device, "kd alpha=0.3")


@case("cosine")
def _cosine(device):
    for i, shape in enumerate(SHAPES):
        inputs = _logit_pair(shape, 35 + 10 * i)
        inputs["labels"] = _labels(shape[0], shape[1], 37 + 10 * i)
        kw = dict(reduction="none" if i else "batchmean", ignore_index=-1, alpha=0.3)
        compare(lambda s, t, labels: fastkd.cosine_loss(s, t, 0.7, labels=labels, **kw),
                lambda s, t, labels: reference.cosine_loss(s, t, 0.7, labels=labels, **kw),
                inputs, ("s", "t"), device, f"cosine {shape}")


def _topk_case(values_are: str, tail: str):
    def run(device):
        for i, (shape, k) in enumerate([((3, 37), 5), ((2, 2100), 2100)]):
            inputs = _logit_pair(shape, 40 + i)
            t = inputs.pop("t")
            src = t if values_are == "logits" else torch.log_softmax(t / T, -1)
            inputs["values"], inputs["indices"] = src.topk(k, dim=-1)
            kw = dict(values_are=values_are, tail=tail, reduction="none" if i else "batchmean")
            compare(lambda s, values, indices: fastkd.topk_kd_loss(s, values, indices, T, **kw),
                    lambda s, values, indices: reference.topk_kd_loss(s, values, indices, T, **kw),
                    inputs, ("s",), device, f"topk {values_are}/{tail} k={k}")

    return run


for _values_are, _tail in [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]:
    case(f"topk-{_values_are}-{_tail}")(_topk_case(_values_are, _tail))


@case("topk-row-temperature")
def _topk_row_temperature(device):
    """Per-row temperatures with their gradient, each top-k flavour."""
    for i, (values_are, tail) in enumerate([("logits", "renormalize"), ("logprobs", "renormalize"),
                                            ("logprobs", "bucket")]):
        inputs = _logit_pair((4, 37), 45 + i)
        t = inputs.pop("t")
        src = t if values_are == "logits" else torch.log_softmax(t / T, -1)
        inputs["values"], inputs["indices"] = src.topk(6, dim=-1)
        inputs["rt"] = torch.rand(4, generator=_gen(48 + i), dtype=torch.float64) + 0.5
        kw = dict(values_are=values_are, tail=tail, reduction="none" if i else "batchmean")
        compare(lambda s, values, indices, rt: fastkd.topk_kd_loss(s, values, indices, rt, **kw),
                lambda s, values, indices, rt: reference.topk_kd_loss(s, values, indices, rt, **kw),
                inputs, ("s", "rt"), device, f"topk {values_are}/{tail} per-row T")


def _shard_case(name: str):
    """The shard ops on two vocabulary ranges of one process (float32 on the device): the range sums give the
    dense divergence per row and the range gradients the dense student gradient (as fastkd.distributed uses
    them), against the float64 reference; also with one temperature per row, whose row dots (dots=True) give the
    reference's temperature gradient."""

    def run(device):
        from fastkd.distributed import _temperature_dots

        spec = divergences.get(name)
        params = dict(spec.test_params[0])
        values = [params.get(p.name, p.default) for p in spec.params]
        s64, t64 = _randn(4, 37, seed=50, scale=2.0), _randn(4, 37, seed=51, scale=2.0)
        s, t = s64.to(device, torch.float32), t64.to(device, torch.float32)
        coef = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
        rt64 = torch.rand(4, generator=_gen(52), dtype=torch.float64) + 0.5
        for temperature, rt in ((T, None), (1.0, rt64.to(device))):
            Tc = T if rt is None else rt.float().unsqueeze(-1)  # the divisor of the statistics
            shift = torch.stack([s.amax(-1), t.amax(-1)])
            log_z = torch.stack([((x - m[:, None]) / Tc).exp().sum(-1).log() for x, m in ((s, shift[0]),
                                                                                          (t, shift[1]))])
            stats = torch.stack([shift[0], shift[1], log_z[0], log_z[1]], dim=1).contiguous()
            ranges = [(slice(None), slice(0, 16)), (slice(None), slice(16, None))]
            sums = sum(torch.ops.fastkd.response_shard_terms(s[r].contiguous(), t[r].contiguous(), stats, name,
                                                             values, temperature, rt, rt is not None) for r in ranges)
            row_coef = (coef.to(device, torch.float32) / (T if rt is None else rt.float()))
            grad = torch.cat([torch.ops.fastkd.response_shard_grad(s[r].contiguous(), t[r].contiguous(), stats,
                                                                   row_coef, sums[:, 1].contiguous(), name, values,
                                                                   temperature, rt)
                              for r in ranges], dim=-1)
            a = s64.clone().requires_grad_(True)
            T_ref = T if rt is None else rt64.clone().requires_grad_(True)
            dense = reference.divergence_loss(a, t64, name, T_ref, reduction="none", scale_by_temperature=False,
                                              **params)
            g_ref = torch.autograd.grad((dense * coef).sum(), [a] + ([] if rt is None else [T_ref]))
            assert sums.device.type == torch.device(device).type
            what = f"{name} shard" + ("" if rt is None else " per-row T")
            _close(sums[:, 0], dense, f"{what} sums")
            _close(grad, g_ref[0], f"{what} gradient")
            if rt is not None:
                d_s, d_t = _temperature_dots(sums[:, 1:].t().double().cpu())
                _close(-coef * (d_s + d_t) / rt64, g_ref[1], f"{what} temperature gradient")

    return run


for _name in fastkd.distributed.LOSSES:
    case(f"shard-{_name}")(_shard_case(_name))


def _head_inputs(kind: str, flavour: str = "", pad: bool = True) -> Dict[str, torch.Tensor]:
    """Student head h [2, 5, 24], w [301, 24], b [301], labels y; the teacher: a head th [2, 5, 20], tw [Vt, 20]
    ("head"), its logits tl ("logits"), with Vt = 290 (padded to the student's 301) unless pad is False, or a
    top-k teacher tv, ti of the student's own logits, shifted ("topk", flavour "logits/..." or "logprobs/...")."""
    x = dict(h=_randn(2, 5, 24, seed=60), w=_randn(301, 24, seed=61, scale=0.2), b=_randn(301, seed=62),
             y=_labels(10, 301, 63).reshape(2, 5))
    th, tw = _randn(2, 5, 20, seed=64), _randn(290 if pad else 301, 20, seed=65, scale=0.2)
    if kind == "head":
        x.update(th=th, tw=tw)
    elif kind == "logits":
        x.update(tl=th @ tw.t())
    else:
        z = x["h"] @ x["w"].t() + x["b"] + _randn(2, 5, 301, seed=66)
        src = z if flavour.startswith("logits") else torch.log_softmax(z / T, -1)
        x["tv"], x["ti"] = src.topk(7, dim=-1)
    return x


def _teacher(kind: str, flavour: str, x: Dict[str, torch.Tensor]):
    if kind == "head":
        return fastkd.TeacherHead(x["th"], x["tw"])
    if kind == "logits":
        return x["tl"]
    values_are, tail = flavour.split("/")
    return fastkd.TopKTeacher(x["tv"], x["ti"], values_are=values_are, tail=tail)


def _fused_case(kind: str, name: str, params: Dict[str, float]):
    """The fused head against the reference's composition (logits, then the loss): value and the gradients
    of hidden, weight and bias; reduction "batchmean" with labels and the hard-label CE, and "none" (whose
    backward recomputes the chunks). name: the divergence, or the top-k flavour for kind "topk"."""

    def run(device):
        spec = divergences.get("kl" if kind == "topk" else name)
        pad = kind != "logits" or spec.infinite_on_padding is None or not spec.infinite_on_padding(**params)
        inputs = _head_inputs(kind, name, pad)
        div = {} if kind == "topk" else dict(loss=name, **params)
        for red, hard in [("batchmean", 0.3), ("none", 0.0)]:

            def loss_fn(lib):
                def fn(h, w, b, y, **teacher):
                    return lib.fused_linear_kd_loss(h, w, _teacher(kind, name, teacher), student_bias=b,
                                                    temperature=T, labels=y if hard else None, ignore_index=-1,
                                                    hard_label_weight=hard, reduction=red, chunk_size=4, **div)

                return fn

            compare(loss_fn(fastkd), loss_fn(reference), inputs, ("h", "w", "b"), device,
                    f"fused head {kind} {name}{params} {red}")

    return run


for _name in fastkd.distributed.LOSSES:
    case(f"fused-logits-{_name}")(_fused_case("logits", _name, dict(divergences.get(_name).test_params[0])))
for _name in ("kl", "jsd"):
    case(f"fused-head-{_name}")(_fused_case("head", _name, {}))
for _flavour in ("logits/renormalize", "logprobs/renormalize", "logprobs/bucket"):
    case(f"fused-topk-{_flavour.replace('/', '-')}")(_fused_case("topk", _flavour, {}))


@case("fused-row-temperature")
def _fused_row_temperature(device):
    """The fused head with per-token temperatures and their gradient, each teacher kind (the teacher's vocabulary
    the student's: the reference's -inf padding has no finite temperature gradient under autograd)."""
    for kind, flavour in [("logits", "kl"), ("head", "kl"), ("topk", "logits/renormalize"),
                          ("topk", "logprobs/bucket")]:
        inputs = _head_inputs(kind, flavour, pad=False)
        inputs["rt"] = torch.rand(2, 5, generator=_gen(68), dtype=torch.float64) + 0.5
        for red in ("batchmean", "none"):

            def loss_fn(lib):
                def fn(h, w, b, y, rt, **teacher):
                    return lib.fused_linear_kd_loss(h, w, _teacher(kind, flavour, teacher), student_bias=b,
                                                    temperature=rt, labels=y, ignore_index=-1, hard_label_weight=0.3,
                                                    reduction=red, chunk_size=4)

                return fn

            compare(loss_fn(fastkd), loss_fn(reference), inputs, ("h", "w", "b", "rt"), device,
                    f"fused head {kind} {flavour} per-row T {red}")


def _relation_case(fn_name: str, shapes, grads=("s", "t"), **kw):
    def run(device):
        inputs = dict(s=_randn(*shapes[0], seed=80), t=_randn(*shapes[1], seed=81))
        compare(lambda s, t: getattr(fastkd, fn_name)(s, t, **kw),
                lambda s, t: getattr(reference, fn_name)(s, t, **kw), inputs, grads, device, f"{fn_name}{kw}",
                rtol=1e-3, atol=1e-4)

    return run


FEATURES = [(7, 33), (7, 16)]  # N = 7, student and teacher widths differ
MAPS = [(4, 3, 8, 8), (4, 5, 4, 4)]  # AT / NST: channels and spatial sizes differ (pooled)
RELATION_CASES = [
    ("rkd", "rkd_loss", FEATURES, ("s",), {}),  # the teacher gets no gradient
    ("rkd-distance", "rkd_distance_loss", FEATURES, ("s",), {}),
    ("rkd-angle", "rkd_angle_loss", FEATURES, ("s",), {}),
    ("sp", "sp_loss", FEATURES, ("s", "t"), {}),
    ("pkt", "pkt_loss", FEATURES, ("s", "t"), {}),
    ("cc-gaussian", "cc_loss", FEATURES, ("s", "t"), {}),
    ("cc-bilinear", "cc_loss", FEATURES, ("s", "t"), dict(kernel="bilinear", reduction="sum")),
    ("at-code", "at_loss", MAPS, ("s", "t"), {}),
    ("at-paper-p3", "at_loss", MAPS, ("s", "t"), dict(p=3.0, mode="paper")),
    ("nst", "nst_loss", [(4, 3, 8, 8), (4, 5, 8, 8)], ("s", "t"), {}),
    ("hint", "hint_loss", [(4, 3, 4, 4), (4, 3, 4, 4)], ("s", "t"), {}),
]
for _id, _fn, _shapes, _grads, _kw in RELATION_CASES:
    case(_id)(_relation_case(_fn, _shapes, _grads, **_kw))


@case("rkd-duplicates")
def _rkd_duplicates(device):
    """Exact duplicate rows: RKD's flagged-pair path (zero-length differences)."""
    x = _randn(9, 17, seed=90)
    x[4:] = x[0]
    compare(fastkd.rkd_loss, reference.rkd_loss, dict(f_s=x, f_t=2 * x + 0.1 * _randn(9, 17, seed=91)),
            ("f_s",), device, "rkd duplicates", rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """The inputs are tiny: one CPU thread (OpenMP regions of 2 threads on a loaded 2-core machine cost ~8 ms
    each, 10x the whole case); the CPU kernels' threading is tested elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fn", [fn for _, fn in CASES], ids=[name for name, _ in CASES])
def test_smoke(fn, device):
    fn(device)


def test_smoke_touches_every_op(monkeypatch):
    """Every registered fastkd op and variant runs in some case (on the CPU here: the Python paths are the
    same on every device), and every relation / feature loss function is called. The cases run their fused
    side only (test_smoke compares it with the reference)."""
    if not fastkd.build_info()["compiled"]:
        pytest.skip("fastkd's kernels are not loaded (FASTKD_ALLOW_REFERENCE=1): no op runs")
    called = set()
    for fn_name in relation_functional.__all__:
        original = getattr(fastkd, fn_name)

        def wrapper(*args, _name=fn_name, _fn=original, **kwargs):
            called.add(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(fastkd, fn_name, wrapper)
    monkeypatch.setattr(sys.modules[__name__], "_COVERAGE_ONLY", True)
    with OpRecorder() as rec:
        for _, fn in CASES:
            fn("cpu")
    assert not missing(rec.keys), f"fastkd ops / variants without a smoke case: {sorted(missing(rec.keys))}"
    assert called == set(relation_functional.__all__), (
        f"relation / feature losses without a smoke case: {sorted(set(relation_functional.__all__) - called)}")


def test_required_keys_come_from_the_registries():
    """The coverage rule itself: it lists every op the dispatcher knows in the fastkd namespace and every
    compiled divergence (so it cannot pass vacuously)."""
    if not fastkd.build_info()["compiled"]:
        pytest.skip("fastkd's kernels are not loaded (FASTKD_ALLOW_REFERENCE=1)")
    from op_coverage import registered_ops, required

    ops = registered_ops()
    assert {"response_forward", "topk_kd_forward", "fused_linear_kd_forward", "response_shard_terms",
            "response_shard_grad", "rkd_forward", "at_forward"} <= ops
    keys = required()
    assert {op for op, *_ in keys} == ops
    assert {k[1] for k in keys if k[0] == "response_forward"} == {d["name"] for d in fastkd._C.divergences()}
