"""fastkd-bench: forward+backward throughput of fastkd's losses against eager PyTorch (each loss written as
its anchor framework writes it), torch.compile of that code and (on a GPU, when installed) Liger-Kernel,
side by side in one run, with the memory-bandwidth floor and peak memory.

    fastkd-bench                       # every loss on its default shapes, on CUDA if present else the CPU
    fastkd-bench --loss jsd,kd --shapes 4096x50257 --dtype bfloat16 --json out.json

Columns: median time per fwd+bwd; speedup of fastkd over each baseline; effective bandwidth
(student + teacher read once, gradient written once: 3 * N * V * itemsize bytes); ratio to the floor; peak
extra memory while the step runs (inputs excluded).

The floor is the least memory work a fused fwd+bwd must do, measured in the same run. CPU: cloning one
N x V tensor (a read plus a first touch of fresh pages, as the new gradient must be) plus summing another.
GPU: 3 * N * V * itemsize over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import fastkd

# Default (rows x vocab) per loss and device.
DEFAULT_SHAPES = {
    "cpu": {
        "kd": "2048x32000,1024x1000,256x100",
        "reverse_kl": "2048x32000",
        "jsd": "2048x32000",
        "tvd": "1024x32000",
        "dkd": "1024x1000,256x100",
        "topk": "4096x50257",
    },
    "cuda": {
        "kd": "16384x131072,4096x32000,1024x1000,256x100",
        "reverse_kl": "4096x128256",
        "jsd": "4096x128256",
        "tvd": "4096x128256",
        "dkd": "1024x1000,256x100",
        "topk": "8192x128256",
    },
}
LOSSES = ("kd", "reverse_kl", "jsd", "tvd", "dkd", "topk")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# the competing implementations of one training step's loss (fwd + bwd)
# ---------------------------------------------------------------------------------------------------------
# Each loss has: an eager baseline written as its anchor framework writes it (also compiled with
# torch.compile), fastkd's fused version, and on a GPU Liger-Kernel's where one exists. Every function takes
# (student, teacher_inputs, T) where teacher_inputs is a tuple (teacher logits, target, top-k values, ...).
def eager_kd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """What RepDistiller / mdistiller / most training loops run today."""
    t = inp[0]
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * (T * T)


def eager_reverse_kl(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """TRL's generalized JSD with beta = 1 (reverse KL), times T^2."""
    t = inp[0]
    lq, lp = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    return F.kl_div(lp, lq, reduction="none", log_target=True).sum() / s.shape[0] * (T * T)


def eager_jsd(s: torch.Tensor, inp: tuple, T: float, beta: float = 0.5) -> torch.Tensor:
    """TRL GKDTrainer.generalized_jsd_loss (beta = 0.5, no labels)."""
    t = inp[0]
    lq, lp = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    b = torch.tensor(beta, dtype=lq.dtype, device=lq.device)
    lm = torch.logsumexp(torch.stack([lq + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(lm, lp, reduction="none", log_target=True) + (1 - b) * F.kl_div(
        lm, lq, reduction="none", log_target=True
    )
    return jsd.sum() / jsd.size(0)


def eager_tvd(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    t = inp[0]
    return 0.5 * (F.softmax(t / T, dim=-1) - F.softmax(s / T, dim=-1)).abs().sum() / s.shape[0]


def eager_dkd(s: torch.Tensor, inp: tuple, T: float, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """mdistiller's dkd_loss: target masks, probabilities, -1000 masking for the non-target part."""
    t, target = inp[0], inp[1]
    gt = torch.zeros_like(s).scatter_(1, target.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)

    def cat(p):
        return torch.cat([(p * gt).sum(1, keepdims=True), (p * other).sum(1, keepdims=True)], dim=1)

    ps2, pt2 = cat(ps), cat(pt)
    tckd = F.kl_div(torch.log(ps2), pt2, reduction="sum") * T**2 / target.shape[0]
    pt_nt = F.softmax(t / T - 1000.0 * gt, dim=1)
    lps_nt = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(lps_nt, pt_nt, reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def eager_topk(s: torch.Tensor, inp: tuple, T: float) -> torch.Tensor:
    """The usual offline-teacher code: full log-softmax of the student, gather at the kept entries."""
    values, indices = inp[2], inp[3]
    lq = F.log_softmax(s / T, dim=-1).gather(-1, indices)
    lp = F.log_softmax(values / T, dim=-1)
    return (lp.exp() * (lp - lq)).sum() / s.shape[0] * (T * T)


def fastkd_fn(name: str) -> Callable:
    def kd(s, inp, T):
        return fastkd.kd_loss(s, inp[0], T)

    def reverse_kl(s, inp, T):
        return fastkd.reverse_kl_loss(s, inp[0], T)

    def jsd(s, inp, T):
        return fastkd.jsd_loss(s, inp[0], 0.5, T)

    def tvd(s, inp, T):
        return fastkd.tvd_loss(s, inp[0], T)

    def dkd(s, inp, T):
        return fastkd.dkd_loss(s, inp[0], inp[1], 1.0, 8.0, T)

    def topk(s, inp, T):
        return fastkd.topk_kd_loss(s, inp[2], inp[3], T)

    return locals()[name]


def _liger(name: str) -> Optional[Callable]:
    """Liger-Kernel's version of a loss (GPU only), through torch log-softmaxes where Liger expects
    log-probabilities or probabilities."""
    try:
        import liger_kernel.transformers as lk
    except Exception:
        return None
    if name == "kd" and hasattr(lk, "LigerKLDIVLoss"):
        loss = lk.LigerKLDIVLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1)) * (T * T)
    if name == "jsd" and hasattr(lk, "LigerJSD"):
        loss = lk.LigerJSD(beta=0.5)
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.log_softmax(inp[0] / T, dim=-1))
    if name == "tvd" and hasattr(lk, "LigerTVDLoss"):
        loss = lk.LigerTVDLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1))
    return None


EAGER = {
    "kd": eager_kd,
    "reverse_kl": eager_reverse_kl,
    "jsd": eager_jsd,
    "tvd": eager_tvd,
    "dkd": eager_dkd,
    "topk": eager_topk,
}
LOSS_TITLES = {
    "kd": "Hinton KD (RepDistiller DistillKL)",
    "reverse_kl": "reverse KL (TRL, beta=1)",
    "jsd": "generalized JSD beta=0.5 (TRL GKD)",
    "tvd": "total variation",
    "dkd": "DKD alpha=1 beta=8 (mdistiller)",
    "topk": "top-k teacher KD, k=64 (gathered log-softmax)",
}
TOPK_K = 64


# ---------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_rss_reset() -> Optional[int]:
    """Resets the process's peak RSS (Linux) and returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_field("VmRSS")
    except OSError:
        return None


def _rss_field(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _time_ms(fn: Callable[[], None], device: str, repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_extra_bytes(fn: Callable[[], None], device: str) -> Optional[int]:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _peak_rss_reset()
    if base is None:
        return None
    fn()
    peak = _rss_field("VmHWM")
    return None if peak is None else max(0, peak - base)


@dataclass
class Row:
    loss: str
    shape: str
    impl: str
    median_ms: float
    min_ms: float
    gbps: float
    floor_ratio: float
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compile: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    error: Optional[str] = None


@dataclass
class Report:
    device: str
    device_name: str
    dtype: str
    temperature: float
    threads: int
    torch: str
    fastkd: Dict = field(default_factory=dict)
    floors_ms: Dict[str, float] = field(default_factory=dict)
    teacher_bytes: Dict[str, Dict[str, int]] = field(default_factory=dict)
    rows: List[Row] = field(default_factory=list)


def _floor_ms(n: int, v: int, dtype: torch.dtype, device: str, repeats: int, reads_teacher: bool = True) -> float:
    """The memory floor of a fused fwd+bwd: read the student (and the dense teacher) once, write the
    gradient once into fresh memory."""
    x = torch.randn(n, v, device=device).to(dtype)
    if device == "cuda":
        buf = torch.empty_like(x)
        ms = statistics.median(_time_ms(lambda: buf.copy_(x), device, repeats, 2))
        copy_bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)  # read + write
        return (3 if reads_teacher else 2) * x.numel() * x.element_size() / copy_bw * 1e3
    clone_ms = statistics.median(_time_ms(lambda: x.clone(), device, repeats, 1))
    if not reads_teacher:
        return clone_ms
    y = torch.randn(n, v, device=device).to(dtype)
    sum_ms = statistics.median(_time_ms(lambda: y.sum(), device, repeats, 1))
    return clone_ms + sum_ms


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _inputs(loss: str, n: int, v: int, dtype: torch.dtype, device: str):
    """Student logits (requiring grad) and the teacher side: (teacher logits, target, top-k values, indices)."""
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
    if loss == "topk":
        t = torch.randn(n, v, device=device, generator=g) * 3
        values, indices = t.topk(TOPK_K, dim=-1)
        del t
        return s, (None, None, values.to(dtype), indices)
    t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=device, generator=g)
    return s, (t, target, None, None)


def run(
    cases: List[tuple],
    device: str,
    dtype: torch.dtype,
    temperature: float,
    repeats: int,
    warmup: int,
    compile_baseline: bool = True,
    quiet: bool = False,
) -> Report:
    """Times every implementation of each (loss, rows, vocab) case, side by side."""
    report = Report(
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        dtype=str(dtype).replace("torch.", ""),
        temperature=temperature,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        fastkd=fastkd.build_info(),
    )
    plans = []
    for loss, n, v in cases:
        impls: Dict[str, Callable] = {"eager": EAGER[loss]}
        if compile_baseline:
            impls["torch.compile"] = torch.compile(EAGER[loss], dynamic=False)
        if device == "cuda":
            liger = _liger(loss)
            if liger is not None:
                impls["liger"] = liger
        impls["fastkd"] = fastkd_fn(loss)
        plans.append((loss, n, v, impls))
    steps = sum(len(p[3]) + 1 for p in plans)
    step = 0
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for loss, n, v, impls in plans:
        key = f"{loss} {n}x{v}"
        step += 1
        _progress(f"[{step}/{steps}] {key}: memory floor", quiet)
        dense = loss != "topk"
        floor = _floor_ms(n, v, dtype, device, max(3, repeats // 2), reads_teacher=dense)
        report.floors_ms[key] = floor
        nbytes = (3 if dense else 2) * n * v * itemsize
        s, inp = _inputs(loss, n, v, dtype, device)
        if not dense:
            report.teacher_bytes[key] = {
                "dense_logits": n * v * itemsize,
                "topk_values_and_indices": inp[2].numel() * inp[2].element_size() + inp[3].numel() * 8,
            }
        results: Dict[str, Row] = {}
        for name, fn in impls.items():
            step += 1
            _progress(f"[{step}/{steps}] {key}: {name}", quiet)

            def one_step(fn=fn):
                fn(s, inp, temperature).backward()
                s.grad = None

            try:
                times = _time_ms(one_step, device, repeats, warmup)
                peak = _peak_extra_bytes(one_step, device)
            except Exception as e:  # e.g. out of memory for the eager baseline at LLM sizes
                results[name] = Row(loss, f"{n}x{v}", name, float("nan"), float("nan"), float("nan"), float("nan"),
                                    error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                s.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            results[name] = Row(
                loss, f"{n}x{v}", name, med, min(times), nbytes / (med * 1e-3) / 1e9, med / floor,
                peak_extra_mb=None if peak is None else peak / 2**20,
            )
        for row in results.values():
            for base, attr in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
                if base in results and row.error is None and results[base].error is None:
                    setattr(row, attr, results[base].median_ms / row.median_ms)
            report.rows.append(row)
        del s, inp
        gc.collect()
    return report


def format_table(report: Report) -> str:
    fk = report.fastkd
    lines = [
        f"fastkd {fk['version']} | fwd+bwd | {report.device}: {report.device_name} | {report.dtype} | "
        f"T={report.temperature} | threads={report.threads} | torch {report.torch} | "
        f"kernels: {'compiled, cpu ' + str(fk['cpu_isa']) if fk['compiled'] else 'NOT compiled (reference)'}"
        + (", cuda" if fk.get("cuda") else ""),
    ]
    for loss in dict.fromkeys(r.loss for r in report.rows):
        lines += ["", f"== {LOSS_TITLES[loss]}",
                  f"{'shape':>14} {'impl':>14} {'median ms':>10} {'GB/s':>8} {'x floor':>8} {'fastkd x':>9} {'peak MB':>9}"]
        for row in (r for r in report.rows if r.loss == loss):
            if row.error:
                lines.append(f"{row.shape:>14} {row.impl:>14}  failed: {row.error}")
                continue
            fast = next(r for r in report.rows if r.loss == loss and r.shape == row.shape and r.impl == "fastkd")
            speed = "" if row.impl == "fastkd" or fast.error else f"{row.median_ms / fast.median_ms:8.2f}x"
            peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
            lines.append(
                f"{row.shape:>14} {row.impl:>14} {row.median_ms:10.2f} {row.gbps:8.1f} {row.floor_ratio:8.2f} "
                f"{speed:>9} {peak:>9}"
            )
    lines.append("")
    lines.append("floor (ms): " + ", ".join(f"{k}: {v:.2f}" for k, v in report.floors_ms.items()))
    for key, b in report.teacher_bytes.items():
        lines.append(
            f"teacher input, {key}: dense logits {b['dense_logits'] / 2**20:.1f} MB vs top-{TOPK_K} values+indices "
            f"{b['topk_values_and_indices'] / 2**20:.2f} MB ({b['dense_logits'] / b['topk_values_and_indices']:.0f}x smaller)"
        )
    lines.append("'fastkd x' = how many times faster fastkd is than that row; 'x floor' = time / memory floor "
                 "(dense: clone one N x V tensor + read another; top-k: clone the student).")
    return "\n".join(lines)


def _parse_shapes(text: str) -> List[tuple]:
    shapes = []
    for part in text.split(","):
        try:
            n, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not ROWSxVOCAB") from None
        if n <= 0 or v <= 0:
            raise argparse.ArgumentTypeError(f"shape {part!r} must be positive")
        shapes.append((n, v))
    return shapes


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastkd-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss", type=str, default=",".join(LOSSES),
                   help=f"comma-separated losses to run (default: all of {', '.join(LOSSES)})")
    p.add_argument("--shapes", type=str, default=None,
                   help="comma-separated ROWSxVOCAB for every selected loss (default: per loss and device)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    losses = [x.strip() for x in args.loss.split(",") if x.strip()]
    unknown = [x for x in losses if x not in LOSSES]
    if unknown or not losses:
        p.error(f"--loss: unknown {unknown}; choose from {', '.join(LOSSES)}")
    cases = []
    try:
        for loss in losses:
            for n, v in _parse_shapes(args.shapes or DEFAULT_SHAPES[args.device][loss]):
                if loss == "topk" and v < TOPK_K:
                    raise argparse.ArgumentTypeError(f"topk needs a vocabulary of at least {TOPK_K}, got {v}")
                cases.append((loss, n, v))
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")

    report = run(cases, args.device, DTYPES[args.dtype], args.temperature, args.repeats, args.warmup,
                 compile_baseline=not args.no_compile, quiet=args.quiet)
    if args.json != "-":
        print(format_table(report))
    if args.json:
        payload = json.dumps(asdict(report), indent=2, default=str)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
