"""The benchmark harness at smoke size, so it cannot rot.

These tests never assert a timing (the machine is shared and noisy; timings belong to
``python -m benchmarks``).  They check that each benchmark runs, returns well-formed rows, and
that the correctness cross-checks inside it hold: the same numbers as a hand-written DuckDB
query, every snapshot and every failure kept, a one-day load reading one file.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_analysis, bench_dashboard, bench_memory, bench_tasks, synthetic  # noqa: E402
from benchmarks.harness import Row, table  # noqa: E402

SMOKE_ARGS = Namespace(no_sdk=False, no_pandas=False)


def assert_well_formed(rows: list[Row], benchmark: str, at_least: int) -> None:
    assert len(rows) >= at_least
    for row in rows:
        assert isinstance(row, Row)
        assert row.benchmark == benchmark
        assert row.name and row.figure
        assert row.passed in (True, False, None)
        if row.passed is not None:
            assert row.bar, f"a row with a verdict needs its bar: {row}"
    failed_checks = [row for row in rows if row.check and row.passed is not True]
    assert not failed_checks, failed_checks
    # One Markdown table row per result row, plus the header and the rule.
    assert len(table(rows).splitlines()) == len(rows) + 2


def test_collect_smoke():
    rows = cli.run("collect", dict(cli.SMOKE), SMOKE_ARGS)
    assert_well_formed(rows, "1 collect", 4)
    names = " / ".join(row.name for row in rows)
    assert "official SDK count_tasks" in names and "RomaAsyncClient" in names and "no latency" in names
    assert all(row.passed is not None for row in rows)       # every collect row has a bar


def test_tasks_smoke_counts_one_request_per_abnormal_instance():
    rows = bench_tasks.run(instances=10, latency_ms=5.0, workers=4, share=0.3, repeats=1)
    assert_well_formed(rows, "6 abnormal tasks", 3)
    # 3 of 10 instances have abnormal tasks: 3 extra requests, on top of 10 statistics requests.
    assert rows[0].figure.startswith("3 task-list requests") and "3 instances with abnormal tasks" in rows[0].reference


def test_analysis_smoke_gives_the_same_numbers_as_duckdb(tmp_path):
    rows = bench_analysis.run(instances=6, runs=400, year_instances=1, year_days=4, repeats=1, work=tmp_path)
    assert_well_formed(rows, "2 analysis", 8)
    checks = [row for row in rows if row.check]
    # trend and cdc_vs_common against DuckDB, pandas against the store, the one-day load
    assert len(checks) == 4 and all(row.passed for row in checks)
    assert any("reads only that day's file" == row.bar for row in checks)


def test_memory_and_soak_smoke_keep_every_snapshot():
    rows = bench_memory.run_memory(runs=10, instances=3)
    assert_well_formed(rows, "4 memory", 2)
    soak = bench_memory.run_soak(runs=15, instances=4, fault_rate=0.4)
    assert_well_formed(soak, "5 soak", 3)
    # With 60 instance-runs at a 40% fault rate, some failed and some were collected.
    collected, failed = soak[0].figure.split(" collected + ")
    assert int(collected.replace(",", "")) > 0 and int(failed.split()[0].replace(",", "")) > 0


def test_dashboard_without_a_dashboard_skips(tmp_path, capsys):
    app = tmp_path / "app.py"
    app.write_text('import streamlit as st\nst.title("placeholder")\n')
    rows = bench_dashboard.run(instances=2, runs=10, reruns=2, work=tmp_path, app=app)
    assert rows[0].passed is None and bench_dashboard.NO_DASHBOARD in rows[0].figure
    assert bench_dashboard.NO_DASHBOARD in capsys.readouterr().out


def test_dashboard_times_first_run_and_filter_reruns(tmp_path):
    # A minimal stand-in with the real dashboard's contract: ROMA_HISTORY and a sidebar filter.
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import os
        import streamlit as st
        from roma_analytics import HistoryStore
        store = HistoryStore(os.environ["ROMA_HISTORY"])
        stats = store.load()
        types = st.sidebar.multiselect("Task type", ["common", "cdc"], default=["common", "cdc"])
        shown = stats[stats["task_type"].isin(types)]
        st.metric("rows", len(shown))
    """))
    rows = bench_dashboard.run(instances=2, runs=10, reruns=3, work=tmp_path, app=app)
    assert_well_formed(rows, "3 dashboard", 2)
    assert "first run" in rows[0].name and rows[0].passed is None
    assert "Task type" in rows[1].name and rows[1].passed in (True, False)
    assert len(rows[1].reference.split(",")) == 3     # every re-run timed


def test_cross_checks_can_fail(tmp_path):
    history = synthetic.history(tmp_path / "h", instances=3, runs=30)
    from roma_analytics import HistoryStore

    ours = HistoryStore(history).trend(freq="1D")
    assert bench_analysis._same_trend(ours, ours.copy()) is None
    changed = ours.copy()
    changed.loc[0, "abnormal"] += 1
    assert "abnormal differs" in bench_analysis._same_trend(ours, changed)
    assert "different buckets" in bench_analysis._same_trend(ours, ours.iloc[1:])


def test_synthetic_history_has_the_asked_shape(tmp_path):
    history = synthetic.history(tmp_path / "h", instances=3, runs=300)     # 300 x 5 min spans 2 days
    stats = pd.read_parquet(history / "stats")
    assert len(stats) == 3 * 2 * 300
    assert len(synthetic.day_files(history)) == 2
    assert (stats["total"] == stats[["running", "abnormal", "terminated", "completed"]].sum(axis=1)).all()
    assert stats.groupby("run_id")["collected_at"].nunique().eq(1).all()
    # One row per run, instance and task type: nothing duplicated.
    assert not stats.duplicated(["run_id", "instance_id", "task_type"]).any()


def test_command_line_runs_one_benchmark_and_writes_results(tmp_path, monkeypatch):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "memory", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| benchmark | measure |" in done.stdout and "4 memory" in done.stdout

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nnotes before\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nplan after\n")
    monkeypatch.setattr(cli, "RESULTS", results)
    cli.write_results("| the | table |", {"CPU": "test cpu"}, "0.1 0.1 0.1", 1.0, Namespace())
    text = results.read_text()
    assert "notes before" in text and "plan after" in text and "old" not in text
    assert "| the | table |" in text and "test cpu" in text


def test_command_line_rejects_an_unknown_benchmark():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "nonsense"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.parametrize("sizes", [cli.SMOKE, cli.FULL])
def test_size_tables_cover_every_option(sizes):
    assert set(sizes) == set(cli.FULL)


def test_dashboard_smoke_on_the_real_app(tmp_path):
    rows = bench_dashboard.run(instances=3, runs=20, reruns=2, work=tmp_path)
    assert_well_formed(rows, "3 dashboard", 1)
    assert not any(row.figure.startswith("exception") for row in rows), rows


def test_s3_smoke_gives_the_same_trend_on_the_object_store():
    from benchmarks import bench_s3

    rows = bench_s3.run(instances=4, runs=20, appends=2, repeats=1)
    assert_well_formed(rows, "7 object store", 3)
    assert rows[-1].figure == "identical"


def test_scale_smoke_runs_every_reader_on_a_compacted_history(tmp_path):
    from benchmarks import bench_scale

    rows = bench_scale.run(sizes=(4000,), reruns=1, work=tmp_path, first_runs=2)
    assert_well_formed(rows, "8 scale", 6)
    # the history was compacted once (marked), and every command wrote its file
    history = tmp_path / "scale-4000"
    assert (history / ".compacted").exists()
    assert (tmp_path / "scale.prom").read_text().startswith("# HELP")
    assert (tmp_path / "scale-365.html").stat().st_size > 0
