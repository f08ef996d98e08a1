"""pytest-benchmark suite for LLM distillation through the student's lm_head (fwd+bwd from the hidden states and
the weight against dense teacher logits): the eager TRL / DistillKit composition, fastkd.kd_loss on the full
logits and fastkd.fused_linear_kd_loss, at tiny sizes (`fastkd-bench --loss llm` measures 4096 x 1024 x 32000 on
the CPU, 8192 x 4096 x 128256 bf16 on a GPU), and a smoke run of the benchmark command's LLM-head tables.

    pytest benchmarks/test_bench_fused_linear.py --benchmark-enable --benchmark-group-by=param:case

The pytest configuration disables benchmarking by default (each case then runs once, as a smoke test).
test_same_loss checks that the implementations compute the same loss and gradients.
"""

import json

import pytest
import torch

from fastkd.bench import (
    LLM_TEMPERATURE,
    eager_fused_linear,
    fastkd_fused_linear,
    fastkd_unfused_linear,
    llm_inputs,
    main,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(256, 64, 1000), (512, 128, 4000)]  # tokens x hidden x vocab
IMPLS = {"eager": eager_fused_linear, "fastkd unfused": fastkd_unfused_linear, "fastkd fused": fastkd_fused_linear}


def _case_id(case):
    return "x".join(map(str, case))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fwd_bwd(benchmark, impl, case):
    hidden, weight, inp = llm_inputs(*case, torch.float32, DEVICE, teacher_head=False)
    fn = IMPLS[impl]

    def step():
        fn(hidden, weight, inp, LLM_TEMPERATURE).backward()
        hidden.grad = weight.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["tokens"] = case[0]
    benchmark(step)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_same_loss(case):
    """Every implementation gives the eager value and the eager gradients of the hidden states and the weight."""
    hidden, weight, inp = llm_inputs(*case, torch.float32, DEVICE, teacher_head=False)
    out = {}
    for name, fn in IMPLS.items():
        value = fn(hidden, weight, inp, LLM_TEMPERATURE)
        out[name] = (value.detach(), *torch.autograd.grad(value, (hidden, weight)))
    for name in ("fastkd unfused", "fastkd fused"):
        for got, want in zip(out[name], out["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bench_command(capsys, tmp_path):
    """`fastkd-bench --loss llm` on tiny shapes: both tables, every implementation measured, the JSON rows."""
    path = tmp_path / "llm.json"
    assert main(["--device", DEVICE, "--loss", "llm", "--llm-shape", "256x64x1000", "--llm-tokens", "128,256",
                 "--no-compile", "--repeats", "1", "--warmup", "1", "--quiet", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    for text in ("LLM head: hidden states + lm_head", "LLM head over the tokens", "fastkd unfused", "fastkd fused",
                 "GEMM floor", "target", "256x64x1000", "128x64x1000"):
        assert text in table, text
    assert "failed" not in table
    rows = json.loads(path.read_text())["rows"]
    fused = [r for r in rows if r["impl"] == "fastkd fused"]
    assert [(r["loss"], r["shape"]) for r in fused] == [
        ("fused_linear", "256x64x1000"), ("fused_linear_sweep", "128x64x1000"), ("fused_linear_sweep", "256x64x1000")]
    assert all(r["median_ms"] > 0 and r["tokens_per_s"] > 0 for r in fused)
    assert fused[-1]["peak_vs_prev"] is None or fused[-1]["peak_vs_prev"] > 0


def test_memory_guard(capsys):
    """The unfused baselines are skipped where their estimated memory exceeds the budget; fastkd fused runs."""
    assert main(["--device", DEVICE, "--loss", "fused_linear", "--llm-shape", "128x32x500", "--no-compile",
                 "--repeats", "1", "--warmup", "1", "--quiet", "--mem-fraction", "1e-9"]) == 0
    table = capsys.readouterr().out
    assert "eager  skipped (needs ~" in table and "fastkd unfused  skipped (needs ~" in table
    assert "fastkd fused" in table and "failed" not in table
