"""The examples in examples/ run, with their smallest settings, and print sane numbers: the distilled
students beat chance on digits, and the fused LLM loss equals the eager one (each script also exits non-zero
by itself when that fails)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
from types import ModuleType

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the examples set the thread count of this process
    yield
    torch.set_num_threads(threads)


def test_vision_kd(capsys, keep_threads):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")
    vision_kd = _load("vision_kd")
    results = vision_kd.main(["--loss", "all", "--epochs", "4", "--teacher-epochs", "4"])
    out = capsys.readouterr().out
    assert set(results) == {"teacher", "student, no KD", "student + kd", "student + dkd", "student + rkd",
                            "student + at"}
    for name, acc in results.items():
        assert 0.2 < acc <= 1.0, (name, acc)  # chance is 0.1
        assert re.search(rf"^{re.escape(name)}\s+{acc:.4f}\s", out, re.M), (name, out)
    for method in ("kd", "dkd", "rkd", "at"):  # the time inside the loss is printed and is part of the total
        total, in_loss = map(float, re.search(rf"^student \+ {method}\s+\S+\s+(\S+)\s+(\S+)", out, re.M).groups())
        assert 0 < in_loss < total, (method, out)


def test_llm_distill(capsys, keep_threads):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    llm_distill = _load("llm_distill")
    results = llm_distill.main(["--steps", "2", "--vocab", "512", "--batch-size", "2", "--seq-len", "17",
                                "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert len(results["losses"]) == 2 and all(0 < x < 10 for x in results["losses"]), out
    assert results["fused"] == pytest.approx(results["eager"], rel=1e-5), out
    assert results["grad_err"] < 1e-4, out
    assert len(re.findall(r"^step \d+: loss \S+ +\S+ ms  peak \+ *\S+ MB$", out, re.M)) == 2, out
    assert re.search(r"^fused vs eager: loss rel\. diff", out, re.M), out
