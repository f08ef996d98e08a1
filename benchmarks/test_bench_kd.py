"""pytest-benchmark suite: the benchmark command's cases (fwd+bwd), one group per loss and shape.

    pytest benchmarks --benchmark-enable --benchmark-group-by=param:case

The pytest configuration disables benchmarking by default (each case then runs once, as a smoke test).
"""

import pytest
import torch

from fastkd.bench import LOSSES, logit_inputs, parse_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(loss, case.shape) for loss, spec in LOSSES.items() if spec.kind == "logits"
         for case in parse_cases(loss, spec.shapes[DEVICE])]
IMPLS = ("eager", "torch.compile", "fastkd")
_COMPILED = {}


def _impl(loss: str, impl: str):
    if impl == "eager":
        return LOSSES[loss].eager
    if impl == "fastkd":
        return LOSSES[loss].fastkd
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(LOSSES[loss].eager, dynamic=False)
    return _COMPILED[loss]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def test_fwd_bwd(benchmark, impl, case):
    loss, (n, v) = case
    s, inp = logit_inputs(loss, n, v, torch.float32, DEVICE)
    fn = _impl(loss, impl)

    def step():
        fn(s, inp, 4.0).backward()
        s.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["elements"] = n * v
    benchmark(step)
