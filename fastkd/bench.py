"""fastkd-bench: forward+backward throughput of fastkd's losses against eager PyTorch, torch.compile and
(on a GPU, when installed) Liger-Kernel, side by side in one run, with the memory-bandwidth floor.

    fastkd-bench                       # KD on the default shapes, on CUDA if present else the CPU
    fastkd-bench --shapes 4096x50257 --dtype bfloat16 --json out.json

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

DEFAULT_SHAPES = {"cpu": "2048x32000,1024x1000,256x100", "cuda": "16384x131072,4096x32000,1024x1000,256x100"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# the competing implementations of one training step's loss (fwd + bwd)
# ---------------------------------------------------------------------------------------------------------
def eager_kd(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """What RepDistiller / mdistiller / most training loops run today."""
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * (T * T)


def fastkd_kd(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    return fastkd.kd_loss(s, t, T)


def _liger_kd() -> Optional[Callable]:
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:
        return None
    loss = LigerKLDIVLoss(reduction="batchmean")

    def liger_kd(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
        # Liger's KL takes log-probabilities and probabilities: the softmaxes stay eager.
        return loss(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)) * (T * T)

    return liger_kd


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
    rows: List[Row] = field(default_factory=list)


def _floor_ms(n: int, v: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    x = torch.randn(n, v, device=device).to(dtype)
    if device == "cuda":
        buf = torch.empty_like(x)
        ms = statistics.median(_time_ms(lambda: buf.copy_(x), device, repeats, 2))
        copy_bw = 2 * x.numel() * x.element_size() / (ms * 1e-3)  # read + write
        return 3 * x.numel() * x.element_size() / copy_bw * 1e3
    y = torch.randn(n, v, device=device).to(dtype)
    clone_ms = statistics.median(_time_ms(lambda: x.clone(), device, repeats, 1))
    sum_ms = statistics.median(_time_ms(lambda: y.sum(), device, repeats, 1))
    return clone_ms + sum_ms


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(
    shapes: List[tuple],
    device: str,
    dtype: torch.dtype,
    temperature: float,
    repeats: int,
    warmup: int,
    compile_baseline: bool = True,
    quiet: bool = False,
) -> Report:
    report = Report(
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        dtype=str(dtype).replace("torch.", ""),
        temperature=temperature,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        fastkd=fastkd.build_info(),
    )
    impls: Dict[str, Callable] = {"eager": eager_kd}
    if compile_baseline:
        impls["torch.compile"] = torch.compile(eager_kd, dynamic=False)
    if device == "cuda":
        liger = _liger_kd()
        if liger is not None:
            impls["liger"] = liger
    impls["fastkd"] = fastkd_kd

    steps = len(shapes) * (len(impls) + 1)
    step = 0
    for n, v in shapes:
        key = f"{n}x{v}"
        step += 1
        _progress(f"[{step}/{steps}] {key}: memory floor", quiet)
        floor = _floor_ms(n, v, dtype, device, max(3, repeats // 2))
        report.floors_ms[key] = floor
        nbytes = 3 * n * v * torch.tensor([], dtype=dtype).element_size()
        g = torch.Generator(device=device).manual_seed(0)
        s = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype).requires_grad_(True)
        t = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
        results: Dict[str, Row] = {}
        for name, fn in impls.items():
            step += 1
            _progress(f"[{step}/{steps}] {key}: {name}", quiet)

            def one_step(fn=fn):
                fn(s, t, temperature).backward()
                s.grad = None

            try:
                times = _time_ms(one_step, device, repeats, warmup)
                peak = _peak_extra_bytes(one_step, device)
            except Exception as e:  # e.g. out of memory for the eager baseline at LLM sizes
                results[name] = Row(key, name, float("nan"), float("nan"), float("nan"), float("nan"),
                                    error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                s.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            results[name] = Row(
                key, name, med, min(times), nbytes / (med * 1e-3) / 1e9, med / floor,
                peak_extra_mb=None if peak is None else peak / 2**20,
            )
        for row in results.values():
            for base, attr in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
                if base in results and row.error is None and results[base].error is None:
                    setattr(row, attr, results[base].median_ms / row.median_ms)
            report.rows.append(row)
        del s, t
        gc.collect()
    return report


def format_table(report: Report) -> str:
    fk = report.fastkd
    lines = [
        f"fastkd {fk['version']} | KD (Hinton) fwd+bwd | {report.device}: {report.device_name} | {report.dtype} | "
        f"T={report.temperature} | threads={report.threads} | torch {report.torch} | "
        f"kernels: {'compiled, cpu ' + str(fk['cpu_isa']) if fk['compiled'] else 'NOT compiled (reference)'}"
        + (", cuda" if fk.get("cuda") else ""),
        "",
        f"{'shape':>14} {'impl':>14} {'median ms':>10} {'GB/s':>8} {'x floor':>8} {'fastkd x':>9} {'peak MB':>9}",
    ]
    for row in report.rows:
        if row.error:
            lines.append(f"{row.shape:>14} {row.impl:>14}  failed: {row.error}")
            continue
        fast = next(r for r in report.rows if r.shape == row.shape and r.impl == "fastkd")
        speed = "" if row.impl == "fastkd" or fast.error else f"{row.median_ms / fast.median_ms:8.2f}x"
        peak = "n/a" if row.peak_extra_mb is None else f"{row.peak_extra_mb:9.1f}"
        lines.append(
            f"{row.shape:>14} {row.impl:>14} {row.median_ms:10.2f} {row.gbps:8.1f} {row.floor_ratio:8.2f} "
            f"{speed:>9} {peak:>9}"
        )
    lines.append("")
    lines.append("floor (ms): " + ", ".join(f"{k}: {v:.2f}" for k, v in report.floors_ms.items()))
    lines.append("'fastkd x' = how many times faster fastkd is than that row; 'x floor' = time / memory floor.")
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
    p.add_argument("--shapes", type=str, default=None, help="comma-separated ROWSxVOCAB (default depends on device)")
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
    try:
        shapes = _parse_shapes(args.shapes or DEFAULT_SHAPES[args.device])
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")

    report = run(shapes, args.device, DTYPES[args.dtype], args.temperature, args.repeats, args.warmup,
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
