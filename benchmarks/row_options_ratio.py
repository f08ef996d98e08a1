"""The per-row options' cost over plain fused KD, interleaved in one process (each repeat runs plain KD,
standardize=True and a learnable 0-dim temperature back to back), so that a shared, loaded machine shifts all
three alike and the ratios of the medians stay meaningful. fwd+bwd, float32, T=4, the student's gradient only.

    python benchmarks/row_options_ratio.py
"""

from __future__ import annotations

import statistics
import time

import torch

import fastkd


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    torch.manual_seed(0)
    for rows, vocab in [(2048, 32000), (1024, 1000)]:
        s, t = torch.randn(rows, vocab), torch.randn(rows, vocab)

        def kd(**kw):
            a = s.clone().requires_grad_(True)
            return lambda: fastkd.kd_loss(a, t, 4.0, **kw).backward()

        def learnable_t():
            a, temp = s.clone().requires_grad_(True), torch.tensor(4.0, requires_grad=True)
            return lambda: fastkd.kd_loss(a, t, temp).backward()

        runs = {"kd": [], "standardize": [], "learnable T": []}
        for _ in range(9 if vocab > 5000 else 60):
            runs["kd"].append(_time(kd()))
            runs["standardize"].append(_time(kd(standardize=True)))
            runs["learnable T"].append(_time(learnable_t()))
        med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
        print(f"{rows}x{vocab}: plain KD {med['kd']:.2f} ms | " + " | ".join(
            f"{k} {med[k]:.2f} ms ({med[k] / med['kd']:.2f}x)" for k in ("standardize", "learnable T")))


if __name__ == "__main__":
    main()
