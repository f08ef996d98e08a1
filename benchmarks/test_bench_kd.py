"""pytest-benchmark suite: the benchmark command's KD cases (fwd+bwd), one group per shape.

    pytest benchmarks --benchmark-enable --benchmark-group-by=param:shape

The pytest configuration disables benchmarking by default (each case then runs once, as a smoke test).
"""

import pytest
import torch

from fastkd.bench import eager_kd, fastkd_kd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 100), (1024, 1000), (2048, 32000)] + ([(16384, 131072)] if DEVICE == "cuda" else [])
IMPLS = {"eager": eager_kd, "torch.compile": torch.compile(eager_kd, dynamic=False), "fastkd": fastkd_kd}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kd_fwd_bwd(benchmark, impl, shape):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = (torch.randn(shape, device=DEVICE, generator=g) * 3).requires_grad_(True)
    t = torch.randn(shape, device=DEVICE, generator=g) * 3
    fn = IMPLS[impl]

    def step():
        fn(s, t, 4.0).backward()
        s.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["elements"] = shape[0] * shape[1]
    benchmark(step)
