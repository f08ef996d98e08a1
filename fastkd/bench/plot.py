"""A figure of a run (matplotlib, the ``plot`` extra: ``pip install fastkd[plot]``): fastkd's speedup per case
over eager and torch.compile (bars, log scale), and when the run holds them the two scaling curves: fastkd's
RKD time and peak memory over the batch N (rkd_sweep), and the LLM head's peak memory over the tokens, eager
against fastkd fused (fused_linear_sweep). Labelled with the machine, thread count, dtype and date."""

from __future__ import annotations

from typing import List, Tuple

from fastkd.bench.cases import LOSSES
from fastkd.bench.report import Report, Row

INSTALL_HINT = "pip install fastkd[plot]"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, and its ticker module."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker as ticker
    except ImportError as e:
        raise PlotUnavailable(f"--plot needs matplotlib ({INSTALL_HINT}): {e}") from None
    return plt, ticker


def _speedups(report: Report) -> List[Tuple[str, Row]]:
    """(case label, fastkd's row) for every case where fastkd and a baseline were measured (not the sweeps)."""
    out = []
    for row in report.rows:
        spec = LOSSES.get(row.loss)
        if spec is None or spec.sweep or row.impl != spec.fastkd_impl or not row.ok:
            continue
        if row.speedup_vs_eager is not None or row.speedup_vs_compile is not None:
            out.append((f"{row.loss}\n{row.shape}", row))
    return out


def _sweep(report: Report, loss: str, impl: str) -> List[Row]:
    return [r for r in report.rows_of(loss) if r.impl == impl and r.ok]


def _title(report: Report) -> str:
    threads = f"{report.threads} threads" if report.device == "cpu" else report.device
    return (f"fastkd {report.fastkd.get('version', '')} fwd+bwd | {report.device_name} | {threads} | "
            f"{report.dtype}" + (f" (LLM head {report.llm_dtype})" if report.llm_dtype else "")
            + f" | {report.date}" + (" | PARTIAL" if report.partial else ""))


def plot_report(report: Report, path: str) -> List[str]:
    """Writes the figure to ``path`` (the format from its suffix); returns the titles of the panels drawn.
    Raises :class:`PlotUnavailable` without matplotlib, ValueError when the run holds nothing to draw."""
    plt, ticker = _pyplot()
    bars = _speedups(report)
    rkd = _sweep(report, "rkd_sweep", "fastkd")
    head = {impl: _sweep(report, "fused_linear_sweep", impl) for impl in ("eager", "fastkd fused")}
    panels = (["speedup"] if bars else []) + (["rkd"] if len(rkd) > 1 else []) + \
             (["head"] if any(len(v) > 1 for v in head.values()) else [])
    if not panels:
        raise ValueError("the run holds no case with fastkd and a baseline, and no sweep: nothing to plot")
    widths = [2.0 + 1.0 * len(bars) if p == "speedup" else 4.5 for p in panels]  # inches
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.8), gridspec_kw={"width_ratios": widths},
                             squeeze=False)
    titles = []
    for ax, panel in zip(axes[0], panels):
        if panel == "speedup":
            xs = range(len(bars))
            for offset, attr, label in ((-0.2, "speedup_vs_eager", "vs eager"),
                                        (0.2, "speedup_vs_compile", "vs torch.compile")):
                drawn = ax.bar([x + offset for x in xs], [getattr(r, attr) or 0.0 for _, r in bars], width=0.4,
                               label=label)
                ax.bar_label(drawn, fmt="%.1fx", fontsize=6)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks(list(xs))
            ax.set_xticklabels([label for label, _ in bars], fontsize=7)
            ax.set_ylabel("fastkd speedup (x, median times)")
            ax.legend(fontsize=8)
            titles.append("fastkd speedup per case")
        elif panel == "rkd":
            ns = [int(r.shape.split("x")[0]) for r in rkd]
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.loglog(ns, [r.median_ms for r in rkd], "o-", label="time (ms)")
            ax.set_xlabel("batch N (RKD, D = " + rkd[0].shape.split("x", 1)[1].split(":")[0] + ")")
            ax.set_ylabel("fastkd RKD fwd+bwd time (ms)")
            mem = [(n, r.peak_extra_mb) for n, r in zip(ns, rkd) if r.peak_extra_mb]
            if mem:
                twin = ax.twinx()
                twin.loglog(*zip(*mem), "s--", color="tab:orange", label="peak MB")
                twin.set_ylabel("peak extra memory (MB)")
                twin.legend(loc="lower right", fontsize=8)
            for axis in [ax.xaxis, ax.yaxis] + ([twin.yaxis] if mem else []):  # after twin's loglog: x is shared
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks(ns)
            ax.legend(loc="upper left", fontsize=8)
            titles.append("RKD over N (fastkd)")
        else:
            for impl, rows in head.items():
                pts = [(int(r.shape.split("x")[0]), r.peak_extra_mb) for r in rows if r.peak_extra_mb]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=impl)
            shape = next(r.shape for rows in head.values() for r in rows)
            ax.set_xlabel("tokens (H x V = " + shape.split("x", 1)[1] + ")")
            ax.set_ylabel("peak extra memory (MB)")
            ax.legend(fontsize=8)
            titles.append("LLM head peak memory over tokens")
        ax.set_title(titles[-1], fontsize=9)
    fig.suptitle(_title(report), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return titles
