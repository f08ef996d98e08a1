"""pytest-benchmark suite for the relation- and feature-based losses (fwd+bwd, teacher without gradient):
fastkd against the anchors' eager code (fastkd.bench.anchors: the RepDistiller / torchdistill formulations), at modest
sizes so that the whole file runs in a couple of minutes on a 2-core CPU (the eager RKD needs N x N x D and
N^3 tensors; `fastkd-bench --loss rkd` measures N = 512, D = 2048).

    pytest benchmarks/test_bench_relation.py --benchmark-enable --benchmark-group-by=param:case

The pytest configuration disables benchmarking by default (each case then runs once, as a smoke test).
test_same_loss checks that both sides of each comparison compute the same loss.
"""

import pytest
import torch

from fastkd.bench import LOSSES, feature_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    ("rkd", (128, 512)),
    ("rkd", (256, 512)),
    ("sp", (64, 256, 8, 8)),
    ("sp", (32, 2048, 7, 7)),
    ("pkt", (256, 512)),
    ("pkt", (256, 2048)),
    ("cc", (128, 128)),
    ("at", (64, 256, 8, 8)),
    ("at", (32, 2048, 7, 7)),
]
IMPLS = ("eager", "fastkd")


def _case_id(case):
    return f"{case[0]}-{'x'.join(map(str, case[1]))}"


def _impl(loss: str, impl: str):
    return LOSSES[loss].eager if impl == "eager" else LOSSES[loss].fastkd


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fwd_bwd(benchmark, impl, case):
    loss, shape = case
    s, inp = feature_inputs(shape, shape, torch.float32, DEVICE)
    fn = _impl(loss, impl)

    def step():
        fn(s, inp, 0.0).backward()
        s.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["shape"] = list(shape)
    benchmark(step)


@pytest.mark.parametrize("case", [c for c in CASES if c[1][0] <= 128], ids=_case_id)
def test_same_loss(case):
    """The eager baseline and fastkd compute the same value and student gradient (fp32 tolerances; the
    eager RKD's Gram-identity distances lose a few digits)."""
    loss, shape = case
    s, inp = feature_inputs(shape, shape, torch.float32, DEVICE)
    out = {}
    for impl in IMPLS:
        value = _impl(loss, impl)(s, inp, 0.0).reshape(())
        (grad,) = torch.autograd.grad(value, s)
        out[impl] = (value.detach(), grad)
    (v_e, g_e), (v_f, g_f) = out["eager"], out["fastkd"]
    torch.testing.assert_close(v_f, v_e, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_f, g_e, rtol=1e-3, atol=1e-3 * g_e.abs().max().item())
