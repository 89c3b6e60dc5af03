"""Benchmark 2: analysis of a long history, on disk, each job in a fresh process.

``HistoryStore.trend`` and ``.cdc_vs_common`` (aggregation pushed down to DuckDB) against a
hand-written DuckDB query over the same Parquet files, which must give the same numbers;
``analysis.trend(store.load())`` in pandas beside them; and a one-day ``load`` of a year of
5-minute runs, which must read that day's file only.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import synthetic
from benchmarks.harness import WORK, Row, mib, median, ratio_text, run_child, seconds_text

NAME = "2 analysis"
EXTRA_MEMORY = 150 * 2**20


def run(instances: int = 1000, runs: int = 5000, year_instances: int = 4, year_days: int = 365,
        repeats: int = 3, with_pandas: bool = True, work: Path = WORK) -> list[Row]:
    rows: list[Row] = []
    big = synthetic.history(work / f"history-{instances}i-{runs}r", instances, runs)
    n_rows = instances * 2 * runs
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="roma-bench-") as scratch:
        for ours_job, ref_job, label, check in (("store-trend", "duckdb-trend", "trend(freq='1D')", _same_trend),
                                                ("store-cdc", "duckdb-cdc", "cdc_vs_common(freq='1D')", _same_cdc)):
            ours, ref = [], []
            for i in range(repeats):    # interleaved, so a burst of load hits both alike
                ours.append(run_child(ours_job, str(big), f"{scratch}/{ours_job}-{i}.pkl"))
                ref.append(run_child(ref_job, str(big), f"{scratch}/{ref_job}-{i}.pkl"))
            ours_s = median(r.output["seconds"] for r in ours)
            ref_s = median(r.output["seconds"] for r in ref)
            seconds[ours_job] = ours_s
            ours_peak = median(r.peak_rss for r in ours)
            ref_peak = median(r.peak_rss for r in ref)
            rows.append(Row(NAME, f"HistoryStore.{label}, {n_rows:,} rows (fresh process, median of {repeats})",
                            seconds_text(ours_s), f"hand-written DuckDB query: {seconds_text(ref_s)}",
                            ratio_text(ours_s / ref_s), "<= 1.50x DuckDB", ours_s / ref_s <= 1.5))
            rows.append(Row(NAME, f"peak memory of HistoryStore.{label}", mib(ours_peak),
                            f"DuckDB query process: {mib(ref_peak)}", f"+{mib(ours_peak - ref_peak)}",
                            "<= DuckDB + 150 MiB", ours_peak <= ref_peak + EXTRA_MEMORY))
            problem = check(pd.read_pickle(f"{scratch}/{ours_job}-0.pkl"), pd.read_pickle(f"{scratch}/{ref_job}-0.pkl"))
            rows.append(Row(NAME, f"{label}: same numbers as the DuckDB query",
                            problem or "identical", "", "", "same numbers", problem is None, check=True))
        if with_pandas:
            result = run_child("pandas-trend", str(big), f"{scratch}/pandas-trend.pkl")
            store_trend = pd.read_pickle(f"{scratch}/store-trend-0.pkl")
            problem = _same_trend(pd.read_pickle(f"{scratch}/pandas-trend.pkl"), store_trend)
            rows.append(Row(NAME, "analysis.trend(store.load()) in pandas, for comparison",
                            f"{seconds_text(result.output['seconds'])} (load {seconds_text(result.output['load_s'])}), "
                            f"peak {mib(result.peak_rss)}",
                            f"HistoryStore.trend: {seconds_text(seconds['store-trend'])}",
                            ratio_text(result.output["seconds"] / seconds["store-trend"]) + " the time",
                            "same numbers as HistoryStore.trend (info: time)",
                            problem is None and result.output["rows"] == n_rows, check=True))

    rows += _one_day_rows(work, year_instances, year_days)
    return rows


def _one_day_rows(work: Path, instances: int, days: int) -> list[Row]:
    runs = days * 288
    year = synthetic.history(work / f"history-year-{instances}i-{days}d", instances, runs)
    files = synthetic.day_files(year)
    day = synthetic.START + pd.Timedelta(days=days // 2)
    day_text = f"{day:%Y-%m-%d}"
    result = run_child("one-day", str(year), day_text).output
    day_file = year / "stats" / f"date={day_text}" / f"bench-{day:%Y%m%d}.parquet"
    total_bytes = sum(f.stat().st_size for f in files)
    day_bytes = day_file.stat().st_size
    expected_rows = 288 * instances * 2
    only_that_day = (result["files"] == [str(day_file)] and result["days_in_result"] == [day_text]
                     and result["rows"] == expected_rows)
    return [Row(NAME, f"one-day load of a year of 5-minute runs ({instances} instances, {len(files)} day files, "
                      f"{runs * instances * 2:,} rows)",
                f"{len(result['files'])} file, {result['bytes_read'] / 1024:,.0f} KiB read, "
                f"{result['rows']:,} rows in {seconds_text(result['seconds'])}",
                f"that day's file: {day_bytes / 1024:,.0f} KiB; whole history: {total_bytes / 2**20:,.1f} MiB "
                f"in {len(files)} files",
                f"{result['bytes_read'] / total_bytes:.2%} of the history read",
                "reads only that day's file", only_that_day and result["bytes_read"] <= 2 * day_bytes + 65536,
                check=True)]


# ------------------------------------------------------------------------------- cross-checks

def _normalise(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    frame["bucket"] = pd.to_datetime(frame["bucket"], utc=True).dt.as_unit("us")
    for key in keys[1:]:
        frame[key] = frame[key].astype(str)
    for column in frame.columns:
        if column not in keys:
            frame[column] = frame[column].astype("float64")
    return frame.sort_values(keys).reset_index(drop=True)


def _compare(ours: pd.DataFrame, reference: pd.DataFrame, keys: list[str], columns: list[str]) -> str | None:
    missing = [c for c in keys + columns if c not in ours or c not in reference]
    if missing:
        return f"columns missing: {missing}"
    a = _normalise(ours[keys + columns], keys)
    b = _normalise(reference[keys + columns], keys)
    if len(a) != len(b) or not a[keys].equals(b[keys]):
        return f"different buckets/groups ({len(a)} vs {len(b)} rows)"
    for column in columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if not np.allclose(x, y, rtol=1e-12, atol=0, equal_nan=True):
            worst = int(np.nanargmax(np.abs(x - y)))
            return f"{column} differs, e.g. row {worst}: {x[worst]} vs {y[worst]}"
    return None


def _same_trend(ours: pd.DataFrame, reference: pd.DataFrame) -> str | None:
    return _compare(ours, reference, ["bucket", "task_type"],
                    ["running", "abnormal", "terminated", "completed", "total", "abnormal_ratio"])


def _same_cdc(ours: pd.DataFrame, reference: pd.DataFrame) -> str | None:
    return _compare(ours, reference, ["bucket"],
                    ["common_total", "cdc_total", "common_abnormal", "cdc_abnormal", "common_abnormal_ratio",
                     "cdc_abnormal_ratio", "abnormal_ratio_gap", "cdc_share"])
