"""Benchmark 8: every reader costs what it shows, from 1 M rows to a year of history.

For each size, a synthetic history of 100 instances x 2 task types, one run every 5 minutes,
ending now (``--history-rows 21000000`` is a year), compacted once by ``roma-analytics compact``
(which builds the rollups; timed and reported).  Each measurement runs in a fresh process
(:mod:`benchmarks._child`), so no job's memory or warm caches count in another's:

* the dashboard's first run on the history (Streamlit AppTest, ``ROMA_HISTORY``), in a process
  that has done what ``roma-analytics dashboard`` does before it serves (``serve.preload``), its
  peak RSS, and re-runs after choosing another project in the sidebar;
* the reference: hand-written DuckDB answering the page's questions straight from the raw Parquet
  files (the last two snapshots of every series, and the trend per task type at the page's
  resolution), its imports before the clock;
* first runs and reference alternate, three of each by default, and their medians are compared;
* ``roma-analytics export --format openmetrics`` (the whole process, as cron runs it);
* ``roma-analytics report`` over the last 7 and the last 365 days (whole processes).

Bars (issue "Every reader costs what it shows"): dashboard first run within 2x the reference,
peak RSS under 1.5 GB, re-run under 0.5 s; OpenMetrics under 2 s and 1 GiB; the 365-day report
within 3x of the 7-day one.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks import synthetic
from benchmarks.harness import REPO, WORK, Row, mib, ratio_text, run_child, seconds_text

NAME = "8 scale"
INSTANCES = 100
EVERY = pd.Timedelta(minutes=5)
GIB = 1024 ** 3


def history(rows: int, work: Path = WORK) -> tuple[Path, float]:
    """A compacted synthetic history of about ``rows`` stats rows ending now, and the seconds
    ``roma-analytics compact`` took to build its rollups (0 when reused)."""
    runs = max(1, rows // (2 * INSTANCES))
    # Ending now, as a collector that runs every 5 minutes leaves it: today's runs are raw, every
    # earlier day compacted and rolled up.  (A history ending now is rebuilt on the next run.)
    end = pd.Timestamp.now(tz="UTC").floor("5min") + EVERY
    start = end - runs * EVERY
    path = work / f"scale-{rows}"
    marker = path / ".compacted"
    built = synthetic.history(path, INSTANCES, runs, start=start)
    if marker.exists() and marker.read_text() == start.isoformat():
        return built, 0.0
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "roma_analytics", "compact", "--history", str(path), "--quiet"],
                   check=True, cwd=REPO)
    seconds = time.perf_counter() - started
    marker.write_text(start.isoformat())
    return built, seconds


def run(sizes=(1_000_000, 21_000_000), reruns: int = 5, work: Path = WORK, first_runs: int = 3) -> list[Row]:
    rows: list[Row] = []
    growth = {}
    for size in sizes:
        path, compact_seconds = history(size, work)
        label = f"{size / 1e6:g} M rows"
        if compact_seconds:
            rows.append(Row(NAME, f"{label}: `compact` builds the rollups (once)", seconds_text(compact_seconds),
                            "", "", "reported", None))
        page = run_child("dashboard", str(path), str(reruns))
        freq = page.output["caption"].split("resolution ")[-1].split()[0].strip(" ,.") or "1D"
        if freq not in ("15min", "1h", "6h", "1D"):
            freq = "1D"
        # First runs alternate with the reference, each in a fresh process, and the medians are
        # compared: one pair on a shared machine can differ by a factor of two either way.
        references = [run_child("duckdb-page", str(path), freq)]
        firsts = [page.output["seconds"]]
        for _ in range(first_runs - 1):
            firsts.append(run_child("dashboard", str(path), "0").output["seconds"])
            references.append(run_child("duckdb-page", str(path), freq))
        reference = references[0]
        first = statistics.median(firsts)
        reference_times = [r.output["seconds"] for r in references]
        base = statistics.median(reference_times)
        rerun = statistics.median(page.output["reruns"])
        rss = page.output["first_rss"]
        growth[size] = (first, rss)
        rows += [
            Row(NAME, f"{label}: dashboard first run (AppTest, resolution {freq}; median of {len(firsts)})",
                seconds_text(first),
                f"hand-written DuckDB, same questions: {seconds_text(base)} (runs: "
                f"{', '.join(f'{t:.2f}' for t in firsts)} s vs "
                f"{', '.join(f'{t:.2f}' for t in reference_times)} s)",
                ratio_text(first / base),
                "<= 2x", first <= 2 * base),
            Row(NAME, f"{label}: dashboard peak RSS after the first run", mib(rss),
                f"DuckDB: {mib(reference.output['peak_rss'])}", "", "< 1.5 GB", rss < 1.5e9),
            Row(NAME, f"{label}: re-run after choosing another project (median of {reruns})", seconds_text(rerun),
                f"runs: {', '.join(f'{t:.2f}' for t in page.output['reruns'])} s", "", "< 0.5 s", rerun < 0.5),
        ]
        metrics = run_child("command", str(path), "export", "--format", "openmetrics", "--history", str(path),
                            "--out", str(work / "scale.prom"), "--quiet")
        rows.append(Row(NAME, f"{label}: `export --format openmetrics` (whole process)", seconds_text(metrics.wall),
                        f"peak RSS {mib(metrics.peak_rss)}; CPU {seconds_text(metrics.cpu)}", "",
                        "< 2 s and < 1 GiB",
                        metrics.wall < 2 and metrics.peak_rss < GIB))
        reports = {}
        for days in (7, 365):
            since = (pd.Timestamp.now(tz="UTC").floor("D") - pd.Timedelta(days=days)).strftime("%Y-%m-%d")
            reports[days] = run_child("command", str(path), "report", "--history", str(path), "--since", since,
                                      "--out", str(work / f"scale-{days}.html"), "--quiet")
        week, year = reports[7], reports[365]
        rows.append(Row(NAME, f"{label}: `report` over 365 days (whole process)", seconds_text(year.wall),
                        f"over 7 days: {seconds_text(week.wall)}; CPU {seconds_text(year.cpu)} / "
                        f"{seconds_text(week.cpu)}; peak RSS {mib(year.peak_rss)} / {mib(week.peak_rss)}",
                        ratio_text(year.wall / week.wall), "<= 3x the 7-day report", year.wall <= 3 * week.wall))
    if len(growth) > 1:
        small, large = min(growth), max(growth)
        rows.append(Row(NAME, f"dashboard growth from {small / 1e6:g} M to {large / 1e6:g} M rows",
                        f"time x{growth[large][0] / growth[small][0]:.2f}, memory x{growth[large][1] / growth[small][1]:.2f}",
                        f"history x{large / small:.0f}", "", "near flat", None))
    return rows
