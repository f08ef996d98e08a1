"""pytest-benchmark suite: the benchmark command's cases (fwd+bwd), one group per loss and shape.

    pytest benchmarks --benchmark-enable --benchmark-group-by=param:case

The pytest configuration disables benchmarking by default (each case then runs once, as a smoke test).
"""

import pytest
import torch

from fastkd.bench import DEFAULT_SHAPES, EAGER, _inputs, fastkd_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    (loss, tuple(int(x) for x in shape.split("x")))
    for loss, shapes in DEFAULT_SHAPES[DEVICE].items()
    for shape in shapes.split(",")
]
IMPLS = ("eager", "torch.compile", "fastkd")
_COMPILED = {}


def _impl(loss: str, impl: str):
    if impl == "eager":
        return EAGER[loss]
    if impl == "fastkd":
        return fastkd_fn(loss)
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(EAGER[loss], dynamic=False)
    return _COMPILED[loss]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}")
def test_fwd_bwd(benchmark, impl, case):
    loss, (n, v) = case
    s, inp = _inputs(loss, n, v, torch.float32, DEVICE)
    fn = _impl(loss, impl)

    def step():
        fn(s, inp, 4.0).backward()
        s.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["elements"] = n * v
    benchmark(step)
