"""The ``fastkd-bench`` command: arguments to cases, the run with each table printed as soon as its loss is
measured, Ctrl-C handling (the tables and, with --json, the JSON of what was measured, marked partial; exit
status 130), --compare and --plot. ``fastkd-bench --help`` prints the package docstring."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional

import torch

from fastkd.bench import cases as C
from fastkd.bench.compare import format_compare
from fastkd.bench.plot import INSTALL_HINT, PlotUnavailable, plot_report
from fastkd.bench.report import Report, load_json, new_report, save_json, to_json, usable_cores
from fastkd.bench.runner import MEM_FRACTION, Options, run_cases
from fastkd.bench.tables import footer, format_report, header, loss_table

# (repeats, warmup) unless given (a compiled row's compiling call counts as one warmup)
TIMING = {"quick": (3, 1), "full": (5, 2), None: (5, 2)}
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastkd-bench", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suite", choices=C.SUITES, default="quick",
                   help="quick (default): one representative case per family, ~2 min on a 2-core CPU; full: every "
                        "default loss on its default shapes (--loss overrides the suite)")
    p.add_argument("--loss", type=str, default=None,
                   help=f"comma-separated losses, from {', '.join(C.LOSSES)}, or the groups "
                        f"{', '.join(C.LOSS_GROUPS)}; "
                        "shapes: --shapes, else each loss's full-suite shapes")
    p.add_argument("--shapes", type=str, default=None,
                   help="comma-separated shapes for every selected loss but the LLM-head ones: ROWSxVOCAB for the "
                        "logit losses; NxD[xHxW...] features for the relation losses, STUDENT:TEACHER when the "
                        "widths differ (rkd_sweep: the N x D points of the sweep)")
    p.add_argument("--llm-shape", type=str, default=None, metavar="TOKENSxHIDDENxVOCAB",
                   help="fused_linear's shape; fused_linear_sweep takes its HIDDENxVOCAB")
    p.add_argument("--llm-tokens", type=str, default=None, metavar="N,N,...", help="fused_linear_sweep's token counts")
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default=None,
                   help=f"default: float32; the LLM-head losses: {C.LLM_DTYPES['cpu']} on cpu, "
                        f"{C.LLM_DTYPES['cuda']} on cuda")
    p.add_argument("--temperature", type=float, default=4.0,
                   help=f"softmax temperature (the LLM-head losses: T = {C.LLM_TEMPERATURE:g}, as TRL and "
                        "Liger-Kernel)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per row (median and min-max reported; default: quick 3, else 5; LLM "
                        "head: at most 2 after a call over 1 s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: quick 1, else 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--slow-compile", action="store_true",
                   help="also compile the baselines whose compilation takes minutes (CC's per-row loop)")
    p.add_argument("--slow-s", type=float, default=5.0,
                   help="relation losses: a call slower than this (seconds) is timed once, without warmup")
    p.add_argument("--mem-fraction", type=float, default=MEM_FRACTION,
                   help="skip the eager / compiled RKD and the unfused LLM-head steps when their estimated memory "
                        "exceeds this fraction of the RAM (GPU memory), or 90%% of what is free")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': only the JSON, on stdout)")
    p.add_argument("--compare", metavar="OLD.json", help="ratios of this run's medians to an earlier run's")
    p.add_argument("--plot", metavar="FILE.png", help="draw the speedups and the scaling curves (needs matplotlib)")
    p.add_argument("--from-json", metavar="RUN.json",
                   help="measure nothing: take the run from this JSON (for --plot, --compare, the tables)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _sweep_shapes(loss: str, text: str, args: argparse.Namespace) -> str:
    """The LLM-head shapes after --llm-shape (fused_linear's shape, the sweep's HIDDENxVOCAB) and --llm-tokens."""
    if loss in ("fused_linear", "fused_linear_tp"):
        return args.llm_shape or text
    if not (args.llm_shape or args.llm_tokens):
        return text
    default = C.parse_cases(loss, text)
    h, v = C.parse_cases(loss, args.llm_shape)[0].shape[1:] if args.llm_shape else default[0].shape[1:]
    if args.llm_tokens:
        try:
            tokens = [int(x) for x in args.llm_tokens.split(",")]
        except ValueError:
            raise ValueError(f"--llm-tokens {args.llm_tokens!r} is not a list of token counts") from None
    else:
        tokens = [c.shape[0] for c in default]
    return ",".join(f"{t}x{h}x{v}" for t in tokens)


def select_cases(args: argparse.Namespace) -> List[C.Case]:
    """The cases the arguments ask for (ValueError: what is wrong): --loss (with --shapes, else each loss's
    full-suite shapes), else the suite's."""
    if args.loss is not None:
        names: List[str] = []
        for x in (x.strip() for x in args.loss.split(",")):
            names += list(C.LOSS_GROUPS.get(x, (x,) if x else ()))
        names = list(dict.fromkeys(names))
        unknown = [x for x in names if x not in C.LOSSES]
        if unknown or not names:
            raise ValueError(f"--loss: unknown {unknown}; choose from {', '.join(C.LOSSES)} or "
                             f"{', '.join(C.LOSS_GROUPS)}")
        shapes = {n: C.LOSSES[n].shapes[args.device] for n in names}
        if args.shapes:
            shapes.update({n: args.shapes for n in names if C.LOSSES[n].kind != "llm"})
    else:
        shapes = C.suite_shapes(args.suite, args.device)
    out: List[C.Case] = []
    for loss, text in shapes.items():
        if C.LOSSES[loss].kind == "llm":
            text = _sweep_shapes(loss, text, args)
        out += C.parse_cases(loss, text)
    return out


def _options(args: argparse.Namespace, suite: Optional[str]) -> Options:
    repeats, warmup = TIMING[suite]
    return Options(device=args.device, dtype=C.DTYPES[args.dtype or "float32"],
                   llm_dtype=C.DTYPES[args.dtype or C.LLM_DTYPES[args.device]], temperature=args.temperature,
                   repeats=repeats if args.repeats is None else args.repeats,
                   warmup=warmup if args.warmup is None else args.warmup, compile_baseline=not args.no_compile,
                   slow_compile=args.slow_compile, slow_ms=args.slow_s * 1e3, mem_fraction=args.mem_fraction,
                   quiet=args.quiet)


def _fewer_compile_workers() -> None:
    """On 2 usable cores or fewer, inductor's pool of compile worker processes costs more than it saves
    (measured: the quick suite's eight baselines compiled in 77 s on a cold cache, against 88 s with the
    pool): compile in the process itself, unless TORCHINDUCTOR_COMPILE_THREADS says otherwise."""
    if usable_cores() <= 2 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available() and not args.from_json:
        p.error("--device cuda but no GPU is visible")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if not 0 < args.mem_fraction <= 1 or not args.slow_s > 0:
        p.error("--mem-fraction must be in (0, 1] and --slow-s > 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the run
            p.error(f"--plot needs matplotlib: {INSTALL_HINT}")


def _finish(report: Report, args: argparse.Namespace, out) -> None:
    """The JSON, the comparison and the figure of a finished (or interrupted) run."""
    if args.json == "-":
        print(to_json(report))
    elif args.json:
        save_json(report, args.json)
    if args.compare:
        print(format_compare(report, load_json(args.compare), args.compare), file=out)
    if args.plot:
        try:
            plot_report(report, args.plot)
            print(f"plot: {args.plot}", file=out)
        except (PlotUnavailable, ValueError) as e:
            print(f"plot: not written ({e})", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    out = sys.stderr if args.json == "-" else sys.stdout  # with --json -, stdout holds the JSON alone
    if args.from_json:
        report = load_json(args.from_json)
        if args.json != "-":
            print(format_report(report))
        _finish(report, args, out)
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.no_compile:
        _fewer_compile_workers()
    try:
        cases = select_cases(args)
    except ValueError as e:
        p.error(str(e))
    suite = None if args.loss is not None else args.suite
    report = new_report(args.device, C.DTYPES[args.dtype or "float32"], args.temperature, suite,
                        ["fastkd-bench"] + list(sys.argv[1:] if argv is None else argv))
    tables = args.json != "-"
    if tables:
        print("\n".join(header(report)), flush=True)
    printed = set()

    def on_loss_done(loss: str) -> None:
        printed.add(loss)
        if tables:
            print(loss_table(report, loss), flush=True)

    status = 0
    try:
        run_cases(report, cases, _options(args, suite), on_loss_done)
    except KeyboardInterrupt:
        report.partial = True
        status = EXIT_INTERRUPTED
        print("\ninterrupted: the tables and JSON hold what was measured so far", file=sys.stderr)
        if tables:
            for loss in dict.fromkeys(r.loss for r in report.rows if r.loss not in printed):
                print(loss_table(report, loss))
    if tables:
        print("\n".join(footer(report)), flush=True)
    _finish(report, args, out)
    return status
