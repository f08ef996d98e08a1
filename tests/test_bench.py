"""The benchmark command (fastkd.bench) without timing anything that matters: suites and argument parsing, a
tiny real run and its JSON, the spread columns and warnings, --compare, Ctrl-C (partial JSON, exit 130),
--plot and the load-average warning. No assertion on a measured time."""

import json

import pytest

from fastkd.bench import cases as C
from fastkd.bench import cli, plot, report as R, runner, tables
from fastkd.bench.report import Report, Row

TINY = {"kd": "16x128", "topk": "16x128", "rkd_sweep": "8x16,16x16", "sp": "8x4x3x3",
        "fused_linear": "16x8x64", "fused_linear_sweep": "8x8x64,16x8x64"}
TINY_ARGS = ["--device", "cpu", "--no-compile", "--repeats", "2", "--warmup", "0", "--quiet"]


def _cases(argv):
    args = cli.build_parser().parse_args(argv)
    return cli.select_cases(args)


def _report(rows, **kw) -> Report:
    rep = Report(device="cpu", device_name="test CPU", dtype="float32", temperature=4.0, threads=2, torch="x",
                 fastkd={"version": "0"}, date="2026-01-01 00:00:00", cores=2, **kw)
    rep.rows = rows
    return rep


def _row(loss, shape, impl, times, **kw) -> Row:
    return Row.measured(loss, shape, impl, times, **kw)


def test_suites_and_loss_selection():
    quick = _cases([])
    families = {c.loss for c in quick}
    assert {"kd", "jsd", "dkd", "topk", "rkd", "sp", "at", "fused_linear"} <= families
    assert all(c.loss in C.QUICK["cpu"] for c in quick)
    full = _cases(["--suite", "full"])
    assert [c.loss for c in full] == [c.loss for c in full if c.loss in C.FULL_LOSSES]
    assert {c.label for c in full if c.loss == "kd"} == {"2048x32000", "1024x1000", "256x100"}
    assert [c.label for c in full if c.loss == "fused_linear"] == ["4096x1024x32000"]
    # explicit losses override the suite; --shapes applies to all but the LLM head
    picked = _cases(["--suite", "quick", "--loss", "kd,rkd,pkt", "--shapes", "64x128"])
    assert [(c.loss, c.label) for c in picked] == [("kd", "64x128"), ("rkd", "64x128"), ("pkt", "64x128")]
    assert [c.loss for c in _cases(["--loss", "relation"])] == [c.loss for c in _cases(["--suite", "full"])
                                                                if c.loss in C.names("features")]
    llm = _cases(["--loss", "llm", "--llm-shape", "64x8x100", "--llm-tokens", "16,32"])
    assert [(c.loss, c.label) for c in llm] == [("fused_linear", "64x8x100"), ("fused_linear_sweep", "16x8x100"),
                                                ("fused_linear_sweep", "32x8x100"), ("fused_linear_tp", "64x8x100")]
    assert [c.label for c in _cases(["--loss", "rkd", "--shapes", "8x4:8x6"])] == ["8x4:8x6"]


@pytest.mark.parametrize("argv", [["--loss", "nope"], ["--loss", "kd", "--shapes", "12"],
                                  ["--loss", "topk", "--shapes", "4x10"], ["--loss", "at", "--shapes", "4x10"],
                                  ["--loss", "rkd", "--shapes", "4x10:5x10"], ["--repeats", "0"],
                                  ["--loss", "llm", "--llm-tokens", "a,b"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "fastkd-bench: error" in capsys.readouterr().err


def test_tiny_quick_run_tables_and_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(C.QUICK, "cpu", TINY)
    path = tmp_path / "run.json"
    assert cli.main(TINY_ARGS + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "suite: quick" in out and "threads=" in out and "min-max ms" in out and "load average" in out
    # each loss's table, in suite order, with the min-max cell of every measured row
    titles = [C.LOSSES[x].title for x in TINY]
    assert [out.index(t) for t in titles] == sorted(out.index(t) for t in titles)
    assert "failed" not in out
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and data["suite"] == "quick" and data["partial"] is False
    for key in ("device_name", "threads", "cores", "load_avg_start", "date", "command", "floors_ms", "elapsed_s"):
        assert key in data, key
    rows = data["rows"]
    assert {(r["loss"], r["impl"]) for r in rows} >= {("kd", "eager"), ("kd", "fastkd"), ("rkd_sweep", "fastkd"),
                                                      ("fused_linear", "fastkd fused")}
    for r in rows:
        assert r["error"] is None and r["skipped"] is None, r
        assert len(r["times_ms"]) == r["timed_runs"] >= 1
        assert min(r["times_ms"]) == r["min_ms"] <= r["median_ms"] <= r["max_ms"] == max(r["times_ms"])
        if r["timed_runs"] > 1:
            assert f"{r['min_ms']:.2f}-{r['max_ms']:.2f}" in out
    fast = next(r for r in rows if r["loss"] == "kd" and r["impl"] == "fastkd")
    assert fast["speedup_vs_eager"] > 0 and fast["speedup_vs_compile"] is None
    # the JSON reads back into the same tables
    assert cli.main(["--from-json", str(path)]) == 0
    assert C.LOSSES["kd"].title in capsys.readouterr().out


def test_spread_marks_noisy_rows_and_warns_once():
    steady, noisy = _row("kd", "8x8", "eager", [10.0, 10.5, 11.0]), _row("kd", "8x8", "fastkd", [5.0, 5.0, 9.0])
    assert steady.spread == pytest.approx(1.0 / 10.5) and not steady.noisy
    assert noisy.spread == pytest.approx(0.8) and noisy.noisy
    assert _row("kd", "8x8", "x", [3.0]).spread is None
    rep = _report([steady, noisy])
    table = tables.loss_table(rep, "kd")
    assert "5.00-9.00!" in table and "10.00-11.00 " in table
    text = tables.format_report(rep)
    assert text.count("spread (max - min) / median above") == 1 and "1 row(s)" in text


def test_load_warning(monkeypatch):
    monkeypatch.setattr(R, "usable_cores", lambda: 2)
    monkeypatch.setattr(R.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    quiet = R.new_report("cpu", C.DTYPES["float32"], 4.0, "quick", [])
    assert not quiet.overloaded and not any("load average" in w for w in R.warnings(quiet))
    assert "WARNING" not in "\n".join(tables.header(quiet))
    monkeypatch.setattr(R.os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    quiet.note_load()  # the load rose during the run
    assert quiet.overloaded and quiet.load_avg_max == 3.5
    busy = R.new_report("cpu", C.DTYPES["float32"], 4.0, "quick", [])
    assert busy.overloaded
    assert "WARNING: 1-minute load average 3.50" in "\n".join(tables.header(busy))


def test_keyboard_interrupt_keeps_what_was_measured(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(C.QUICK, "cpu", {"kd": "16x128", "topk": "16x128"})
    calls = []
    real = runner.time_with_peak

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # kd: eager, fastkd; topk: eager -> Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(runner, "time_with_peak", interrupted)
    path = tmp_path / "partial.json"
    assert cli.main(TINY_ARGS + ["--json", str(path)]) == cli.EXIT_INTERRUPTED
    out = capsys.readouterr()
    assert "interrupted" in out.err and C.LOSSES["kd"].title in out.out and "PARTIAL" in out.out
    data = json.loads(path.read_text())
    assert data["partial"] is True
    assert [(r["loss"], r["impl"]) for r in data["rows"]] == [("kd", "eager"), ("kd", "fastkd")]


def test_compare_two_runs(tmp_path, capsys):
    old = _report([_row("kd", "8x8", "eager", [10.0, 10.2]), _row("kd", "8x8", "fastkd", [2.0, 2.1]),
                   _row("sp", "8x8", "fastkd", [1.0, 1.1])])
    new = _report([_row("kd", "8x8", "eager", [10.1, 10.3]), _row("kd", "8x8", "fastkd", [4.0, 4.2]),
                   _row("at", "8x2x2x2", "fastkd", [1.0, 1.1])])
    for rep in (old, new):
        runner._relate({r.impl: r for r in rep.rows if r.loss == "kd"}, "logits")
    R.save_json(old, tmp_path / "old.json")
    R.save_json(new, tmp_path / "new.json")
    assert cli.main(["--from-json", str(tmp_path / "new.json"), "--compare", str(tmp_path / "old.json")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[:3] == ["kd", "8x8", "fastkd"])
    assert "2.00" in line and "slower" in line and f"{10.1 / 2.05:.2f}->{10.2 / 4.1:.2f}x" in line
    eager_line = next(x for x in out.splitlines() if x.split()[:3] == ["kd", "8x8", "eager"])
    assert eager_line.split()[6] == "~"
    assert "only in this run: at 8x2x2x2 fastkd" in out and "sp 8x8 fastkd" in out
    assert "2 rows matched: 1 slower, 0 faster" in out


def test_schema_1_json_loads():
    data = {"device": "cpu", "device_name": "x", "dtype": "float32", "temperature": 4.0, "threads": 2, "torch": "x",
            "rows": [{"loss": "kd", "shape": "8x8", "impl": "fastkd", "median_ms": 2.0, "min_ms": 1.5, "gbps": 1.0,
                      "floor_ratio": 1.0}]}
    rep = R.from_dict(data)
    assert rep.schema_version == 1 and rep.rows[0].spread is None and not rep.overloaded


def _plot_report() -> Report:
    rows = [_row("kd", "8x8", "eager", [10.0]), _row("kd", "8x8", "torch.compile", [4.0]),
            _row("kd", "8x8", "fastkd", [2.0])]
    runner._relate({r.impl: r for r in rows}, "logits")
    rows += [_row("rkd_sweep", f"{n}x16", "fastkd", [n / 8], peak_extra_mb=n / 4) for n in (8, 16, 32)]
    rows += [_row("fused_linear_sweep", f"{t}x8x64", impl, [1.0], peak_extra_mb=t * k, tokens_per_s=t * 1e3)
             for t in (8, 16) for impl, k in (("eager", 1.0), ("fastkd fused", 0.1))]
    return _report(rows, llm_dtype="float32")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    R.save_json(_plot_report(), tmp_path / "run.json")
    assert cli.main(["--from-json", str(tmp_path / "run.json"), "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.plot_report(_plot_report(), str(tmp_path / "again.png")) == [
        "fastkd speedup per case", "RKD over N (fastkd)", "LLM head peak memory over tokens"]


def test_plot_without_matplotlib(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    with pytest.raises(SystemExit):
        cli.main(["--plot", "x.png"])
    assert "pip install fastkd[plot]" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(plot.PlotUnavailable, match=r"pip install fastkd\[plot\]"):
        plot.plot_report(_plot_report(), "x.png")


def test_progress_estimates_what_is_left(capsys):
    progress = runner.Progress(["floor", "run", "compile", "run"], quiet=False)
    for msg in ("a", "b", "c", "d"):
        progress.step(msg)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[1/4 | 0:00 elapsed] a")
    assert "left] d" in lines[-1] and lines[-1].startswith("[4/4")


# --------------------------------------------------------------------------------------------------------
# the vocabulary-parallel LLM head: 2 spawned gloo processes (fastkd.bench.tp)
# --------------------------------------------------------------------------------------------------------
def test_vocab_parallel_head_implementations_and_slices():
    from fastkd.bench import tp

    impls = C.implementations("fused_linear_tp", "cpu")
    assert list(impls) == ["fastkd fused", "fastkd tp2"]
    assert isinstance(impls["fastkd tp2"], tp.SpawnedHead) and impls["fastkd tp2"].world == 2
    assert isinstance(C.implementations("fused_linear_tp", "cuda")["fastkd tp2"], str)  # a skipped row on a GPU
    assert [tp._bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [tp._bounds(32000, 2, r) for r in range(2)] == [(0, 16000), (16000, 32000)]
    assert [c.label for c in _cases(["--loss", "fused_linear_tp", "--llm-shape", "16x8x64"])] == ["16x8x64"]


def test_vocab_parallel_head_tiny_run(tmp_path, capsys):
    path = tmp_path / "tp.json"
    assert cli.main(TINY_ARGS + ["--loss", "fused_linear_tp", "--llm-shape", "16x8x64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vocabulary-parallel" in out and "failed" not in out
    assert "fastkd tp2: time / fastkd fused's" in out and "x the single-process weight gradient" in out
    rows = {r["impl"]: r for r in json.loads(path.read_text())["rows"] if r["loss"] == "fused_linear_tp"}
    assert set(rows) == {"fastkd fused", "fastkd tp2"}
    for row in rows.values():
        assert row["error"] is None and row["skipped"] is None
        assert row["timed_runs"] == 2 and len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["peak_extra_mb"] is not None and row["tokens_per_s"] > 0
