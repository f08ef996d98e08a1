"""A regression check: a run against an earlier run's JSON.

Rows are matched by (loss, shape, impl). For each matched pair: the ratio new median / old median (above 1:
slower) and the change of fastkd's speedups over eager and torch.compile. A change counts ("slower" /
"faster") only where the two runs' min-max ranges do not overlap; otherwise it is within the noise ("~").
Rows only in one of the runs are listed.
"""

from __future__ import annotations

from typing import List, Tuple

from fastkd.bench.report import Report, Row

Key = Tuple[str, str, str]


def _key(row: Row) -> Key:
    return row.loss, row.shape, row.impl


def _range(row: Row) -> Tuple[float, float]:
    return (min(row.times_ms), max(row.times_ms)) if row.times_ms else (row.min_ms, row.max_ms or row.median_ms)


def verdict(new: Row, old: Row) -> str:
    """"slower" / "faster" where the min-max ranges are disjoint, else "~"."""
    (new_lo, new_hi), (old_lo, old_hi) = _range(new), _range(old)
    if new_lo > old_hi:
        return "slower"
    if new_hi < old_lo:
        return "faster"
    return "~"


def _change(new: Row, old: Row, baseline: str) -> str:
    """A row's speedup over ``baseline`` in both runs, "old->new" (blank for the baseline itself)."""
    attr = "speedup_vs_eager" if baseline == "eager" else "speedup_vs_compile"
    was, now = getattr(old, attr), getattr(new, attr)
    if new.impl == baseline or was is None or now is None:
        return ""
    return f"{was:.2f}->{now:.2f}x"


def compare(new: Report, old: Report) -> Tuple[List[Tuple[Row, Row]], List[Row], List[Row]]:
    """(matched (new, old) row pairs measured in both runs, rows only in new, rows only in old)."""
    old_rows = {_key(r): r for r in old.rows if r.ok}
    new_rows = {_key(r): r for r in new.rows if r.ok}
    matched = [(r, old_rows[k]) for k, r in new_rows.items() if k in old_rows]
    return (matched, [r for k, r in new_rows.items() if k not in old_rows],
            [r for k, r in old_rows.items() if k not in new_rows])


def format_compare(new: Report, old: Report, old_name: str) -> str:
    """The comparison as a table, with the two runs' conditions and the unmatched rows."""
    matched, only_new, only_old = compare(new, old)
    lines = ["", f"== compared with {old_name}: {old.device_name}, threads={old.threads}, {old.date or 'no date'}"
             + (" (PARTIAL)" if old.partial else ""),
             f"{'loss':>18} {'shape':>18} {'impl':>14} {'old ms':>10} {'new ms':>10} {'new/old':>8} {'':>6} "
             f"{'vs eager':>14} {'vs compile':>14}"]
    for new_row, old_row in matched:
        lines.append(f"{new_row.loss:>18} {new_row.shape:>18} {new_row.impl:>14} {old_row.median_ms:10.2f} "
                     f"{new_row.median_ms:10.2f} {new_row.median_ms / old_row.median_ms:8.2f} "
                     f"{verdict(new_row, old_row):>6} "
                     f"{_change(new_row, old_row, 'eager'):>14} {_change(new_row, old_row, 'torch.compile'):>14}")
    slower = sum(verdict(n, o) == "slower" for n, o in matched)
    faster = sum(verdict(n, o) == "faster" for n, o in matched)
    lines.append(f"{len(matched)} rows matched: {slower} slower, {faster} faster beyond the two runs' min-max "
                 "ranges ('~': within them); 'vs eager' / 'vs compile': that row's speedup, old->new.")
    for label, rows in (("only in this run", only_new), (f"only in {old_name}", only_old)):
        if rows:
            lines.append(f"{label}: " + ", ".join(f"{r.loss} {r.shape} {r.impl}" for r in rows))
    return "\n".join(lines)
