"""The per-row options' cost over plain fused KD, interleaved in one process (each repeat runs plain KD,
standardize=True, a learnable 0-dim temperature and DIST back to back), so that a shared, loaded machine shifts
them all alike; each ratio is the median over the repeats of its time over plain KD's in the same repeat.
fwd+bwd, float32, T=4 (DIST: tau=1), the student's gradient only.

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

        def dist():
            a = s.clone().requires_grad_(True)
            return lambda: fastkd.dist_loss(a, t).backward()

        runs = {"kd": [], "standardize": [], "learnable T": [], "DIST": []}
        for make in (kd, lambda: kd(standardize=True), learnable_t, dist):  # warm up: allocator, page faults
            make()()
        for _ in range(15 if vocab > 5000 else 60):
            runs["kd"].append(_time(kd()))
            runs["standardize"].append(_time(kd(standardize=True)))
            runs["learnable T"].append(_time(learnable_t()))
            runs["DIST"].append(_time(dist()))
        med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
        # the median of each repeat's own ratio (its runs back to back): robust to the machine's drift
        ratio = {k: statistics.median(x / y for x, y in zip(v, runs["kd"])) for k, v in runs.items()}
        print(f"{rows}x{vocab}: plain KD {med['kd']:.2f} ms | " + " | ".join(
            f"{k} {med[k]:.2f} ms ({ratio[k]:.2f}x)" for k in ("standardize", "learnable T", "DIST")))


if __name__ == "__main__":
    main()
