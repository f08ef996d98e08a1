"""The vocabulary-parallel LLM head (:func:`fastkd.distributed.vocab_parallel_fused_linear_kd_loss`) measured in
``world`` spawned gloo processes on the CPU, each holding ``1 / world`` of the lm_head (and of the dense teacher
logits): the benchmark's ``fused_linear_tp`` case.

Every rank builds the case's inputs (:func:`fastkd.bench.cases.llm_inputs`, the single-process rows' numbers),
keeps its vocabulary slice and times the same fwd+bwd step as the single-process "fastkd fused" row. A first,
untimed call sets up what a fresh process allocates once (gloo's connections, the thread pools, the BLAS
buffers); the second is the peak-memory window (each rank's resident-set growth) and a warmup; the ranks then agree (one
all-reduce MAX of that call's time) on the timed calls that follow, so that they run the same number of
collectives. Each rank uses ``threads // world`` threads (at least 1). The row's time is the slowest rank's
median, its peak the largest rank's.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TP_WORLD = 2


@dataclass(frozen=True)
class SpawnedHead:
    """The vocabulary-parallel head as a benchmark implementation: measured by :func:`measure` in ``world``
    processes, not as a step of this process."""

    world: int = TP_WORLD

    @property
    def name(self) -> str:
        return f"fastkd tp{self.world}"


def _bounds(vocab: int, world: int, rank: int):
    """Rank ``rank``'s contiguous slice of the vocabulary, the first ``vocab % world`` ranks one row larger."""
    base, extra = divmod(vocab, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def _worker(rank: int, world: int, init_file: str, out_dir: str, shape, dtype_name: str, repeats: int, warmup: int,
            slow_ms: float, slow_repeats: int, threads: int) -> None:
    from fastkd.bench.cases import DTYPES, IGNORE_INDEX, LLM_TEMPERATURE, llm_inputs
    from fastkd.bench.timing import peak_begin, peak_end, time_ms
    from fastkd.distributed import vocab_parallel_fused_linear_kd_loss

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    try:
        n, h, v = shape
        lo, hi = _bounds(v, world, rank)
        hidden, weight, inp = llm_inputs(n, h, v, DTYPES[dtype_name], "cpu", False)
        shard = weight.detach()[lo:hi].clone().requires_grad_(True)
        teacher = inp[0][:, lo:hi].clone()
        labels = inp[1]
        del weight, inp

        def step() -> None:
            try:
                vocab_parallel_fused_linear_kd_loss(hidden, shard, teacher, temperature=LLM_TEMPERATURE, labels=labels,
                                                    ignore_index=IGNORE_INDEX, scale_by_temperature=False).backward()
            finally:
                hidden.grad = shard.grad = None

        step()  # a fresh process: gloo's connections, the thread pools and the BLAS buffers, outside the window
        base = peak_begin("cpu", trim=True)
        first = time_ms(step, "cpu", 1, 0)[0]
        peak = peak_end("cpu", base)
        slowest = torch.tensor([first], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # every rank takes the same branch
        if slowest.item() > slow_ms:
            times = time_ms(step, "cpu", min(repeats, slow_repeats), 0) if slow_repeats else [first]
        else:
            times = time_ms(step, "cpu", repeats, max(0, warmup - 1))
        acc_bytes = 8 if shard.dtype == torch.float64 else 4  # the float32 (float64) weight-gradient accumulator
        torch.save({"times": times, "peak": peak, "weight_grad_bytes": shard.numel() * acc_bytes},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(impl: SpawnedHead, shape, dtype_name: str, repeats: int, warmup: int, slow_ms: float,
            slow_repeats: int) -> Dict[str, object]:
    """Runs the case in ``impl.world`` gloo processes: ``{"times": the slowest rank's samples (ms), "peaks":
    each rank's peak extra bytes (None where it cannot be measured), "weight_grad_bytes": the size of each
    rank's weight-gradient accumulator}``."""
    world = impl.world
    threads = max(1, torch.get_num_threads() // world)
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-tp-") as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, tuple(shape), dtype_name, repeats, warmup,
                                slow_ms, slow_repeats, threads), nprocs=world, join=True)
        ranks: List[dict] = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    slowest = max(ranks, key=lambda r: statistics.median(r["times"]))
    return {"times": slowest["times"], "peaks": [r["peak"] for r in ranks],
            "weight_grad_bytes": [r["weight_grad_bytes"] for r in ranks]}
