"""One measured job in a fresh process: ``python -m benchmarks._child JOB HISTORY [OUT]``.

Each job imports what it needs (pandas and duckdb on both sides), times only its computation,
saves its result to OUT (a pickle, for the parent's cross-check) and prints one JSON line with
the seconds and its peak RSS (``VmHWM``).  A fresh process per job, so no job's memory or warm
caches count in another's.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# The hand-written reference: what a DuckDB user would type, straight from the Parquet files.
# Last snapshot per series and day = arg_max over (collected_at, run_id); pooled ratios.
DUCKDB_LAST = """
    SELECT date_trunc('day', collected_at) AS bucket, region, project_id, instance_id, task_type,
           arg_max(struct_pack(running, abnormal, terminated, completed, total),
                   struct_pack(collected_at, run_id)) AS s
    FROM read_parquet('{glob}', hive_partitioning = true)
    GROUP BY ALL
"""
DUCKDB_TREND = """
    SELECT bucket, task_type, sum(s.running) AS running, sum(s.abnormal) AS abnormal,
           sum(s.terminated) AS terminated, sum(s.completed) AS completed, sum(s.total) AS total,
           sum(s.abnormal) / nullif(sum(s.total), 0) AS abnormal_ratio
    FROM ({last}) GROUP BY ALL ORDER BY ALL
"""
DUCKDB_CDC = """
    SELECT bucket,
           sum(s.total) FILTER (task_type = 'common') AS common_total,
           sum(s.total) FILTER (task_type = 'cdc') AS cdc_total,
           sum(s.abnormal) FILTER (task_type = 'common') AS common_abnormal,
           sum(s.abnormal) FILTER (task_type = 'cdc') AS cdc_abnormal
    FROM ({last}) GROUP BY ALL ORDER BY ALL
"""


def _duckdb(history: str, template: str):
    import duckdb
    import pandas  # noqa: F401 - the result is a DataFrame, as ours is

    glob = (Path(history) / "stats" / "*" / "*.parquet").as_posix()
    started = time.perf_counter()
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    frame = connection.execute(template.format(last=DUCKDB_LAST.format(glob=glob))).df()
    if "common_total" in frame:
        # the derived columns, as a user would add them in pandas
        frame["common_abnormal_ratio"] = frame["common_abnormal"] / frame["common_total"]
        frame["cdc_abnormal_ratio"] = frame["cdc_abnormal"] / frame["cdc_total"]
        frame["abnormal_ratio_gap"] = frame["cdc_abnormal_ratio"] - frame["common_abnormal_ratio"]
        frame["cdc_share"] = frame["cdc_total"] / (frame["cdc_total"] + frame["common_total"])
    return frame, time.perf_counter() - started


def _ours(history: str, method: str):
    import duckdb  # noqa: F401 - imported before the clock, as the reference does
    import pandas  # noqa: F401

    from roma_analytics import HistoryStore, sqlagg  # noqa: F401

    started = time.perf_counter()
    frame = getattr(HistoryStore(history), method)(freq="1D")
    return frame, time.perf_counter() - started


def _pandas_trend(history: str):
    from roma_analytics import HistoryStore
    from roma_analytics.analysis import trend

    started = time.perf_counter()
    stats = HistoryStore(history).load()
    loaded = time.perf_counter()
    frame = trend(stats, freq="1D")
    return frame, time.perf_counter() - started, {"load_s": loaded - started, "rows": len(stats)}


def _one_day(history: str, day: str) -> dict:
    """Load one day of a long history; count what was read (``rchar`` of /proc/self/io)."""
    import pandas as pd

    from roma_analytics import HistoryStore

    store = HistoryStore(history)
    since = pd.Timestamp(day, tz="UTC")
    until = since + pd.Timedelta(days=1)
    files = store.files(since=since, until=until)
    before = _rchar()
    started = time.perf_counter()
    frame = store.load(since=since, until=until)
    seconds = time.perf_counter() - started
    read = _rchar() - before
    return {"seconds": seconds, "rows": len(frame), "files": [str(f) for f in files], "bytes_read": read,
            "days_in_result": sorted(frame["collected_at"].dt.strftime("%Y-%m-%d").unique().tolist())}


# The Overview page's questions, hand-written against the raw Parquet files: the last two
# snapshots of every series (KPIs, breakdown, ranking, changes), the values the filters offer,
# and the trend per task type at the page's resolution (the charts' points).
DUCKDB_LAST_TWO = """
    SELECT region, project_id, instance_id, task_type,
           max_by(struct_pack(collected_at, run_id, instance_name, running, abnormal, terminated,
                              completed, total), struct_pack(collected_at, run_id), 2) AS last_two
    FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL
"""
DUCKDB_BUCKET_LAST = """
    SELECT time_bucket(INTERVAL '{freq}', collected_at) AS bucket, region, project_id, instance_id, task_type,
           arg_max(struct_pack(running, abnormal, terminated, completed, total),
                   struct_pack(collected_at, run_id)) AS s
    FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL
"""


def _duckdb_page(history: str, freq: str) -> dict:
    import duckdb
    import pandas  # noqa: F401 - the results are DataFrames, as ours are

    glob = (Path(history) / "stats" / "*" / "*.parquet").as_posix()
    interval = {"15min": "15 minutes", "1h": "1 hour", "6h": "6 hours", "1D": "1 day"}[freq]
    started = time.perf_counter()
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")
    latest = connection.execute(DUCKDB_LAST_TWO.format(glob=glob)).df()
    trend = connection.execute(DUCKDB_TREND.replace("{last}", DUCKDB_BUCKET_LAST.format(
        glob=glob, freq=interval))).df()
    return {"seconds": time.perf_counter() - started, "series": len(latest), "buckets": len(trend)}


def _dashboard(history: str, reruns: int) -> dict:
    """The app's first run on ``history`` (AppTest, as bench_dashboard), then ``reruns`` re-runs,
    each after choosing another project in the sidebar."""
    import os

    os.environ["ROMA_HISTORY"] = history
    from streamlit.testing.v1 import AppTest

    from roma_analytics.streamlit_app import APP_PATH, serve

    # Before the clock, what a started server has already done (the reference imports duckdb
    # and pandas before its own clock too): `roma-analytics dashboard` imports the page's
    # libraries before it serves (serve.preload), and Streamlit scans the installed packages for
    # components once, when the server starts.  AppTest would scan again in every new AppTest's
    # first run (about 0.4 s), so the measured app reuses the warm-up's scan.
    serve.preload()
    from streamlit import config

    from roma_analytics.cli import DASHBOARD_STREAMLIT_SETTINGS

    # The dashboard command's setting that AppTest would otherwise not have (the page is compiled
    # without Streamlit's "magic" rewriting).
    config.set_option("runner.magicEnabled", DASHBOARD_STREAMLIT_SETTINGS["runner.magicEnabled"] == "true")
    warm = AppTest.from_string("import streamlit as st\nst.write('warm-up')")
    warm.run()
    at = AppTest.from_file(str(APP_PATH), default_timeout=900)
    if getattr(warm, "_bidi_component_manager", None) is not None:
        at._bidi_component_manager = warm._bidi_component_manager
    started = time.perf_counter()
    at.run()
    first = time.perf_counter() - started
    if at.exception:
        raise SystemExit(f"the dashboard failed: {at.exception[0].message}")
    freq = next((c.value for c in at.caption if "resolution" in str(c.value)), "")
    first_rss = _peak_rss()
    projects = next(w for w in at.sidebar.multiselect if w.label == "Project")
    options = list(projects.options)
    times = []
    for i in range(reruns):
        projects = next(w for w in at.sidebar.multiselect if w.label == "Project")
        projects.set_value([options[i % len(options)]] if i % 2 == 0 or len(options) < 2 else options[:2])
        started = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - started)
        if at.exception:
            raise SystemExit(f"the dashboard failed on a re-run: {at.exception[0].message}")
    metrics = {m.label: m.value for m in at.metric}
    return {"seconds": first, "reruns": times, "first_rss": first_rss, "caption": str(freq)[:200],
            "metrics": metrics}


def _command(args: list[str]) -> dict:
    """One ``roma-analytics`` command in this fresh process, imports included (what cron pays)."""
    from roma_analytics.cli import main as cli

    started = time.perf_counter()
    code = cli(args)
    return {"seconds": time.perf_counter() - started, "exit": code}


def _peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` belongs to the memory map made by ``exec``,
    whereas ``ru_maxrss`` keeps the parent's high-water mark from before the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def main(argv: list[str]) -> int:
    job, history, *rest = argv
    extra: dict = {}
    if job == "duckdb-page":
        print(json.dumps({**_duckdb_page(history, rest[0]), "peak_rss": _peak_rss()}))
        return 0
    if job == "dashboard":
        print(json.dumps({**_dashboard(history, int(rest[0])), "peak_rss": _peak_rss()}))
        return 0
    if job == "command":
        print(json.dumps({**_command(rest), "peak_rss": _peak_rss()}))
        return 0
    if job == "one-day":
        print(json.dumps({**_one_day(history, rest[0]), "peak_rss": _peak_rss()}))
        return 0
    if job == "store-trend":
        frame, seconds = _ours(history, "trend")
    elif job == "store-cdc":
        frame, seconds = _ours(history, "cdc_vs_common")
    elif job == "duckdb-trend":
        frame, seconds = _duckdb(history, DUCKDB_TREND)
    elif job == "duckdb-cdc":
        frame, seconds = _duckdb(history, DUCKDB_CDC)
    elif job == "pandas-trend":
        frame, seconds, extra = _pandas_trend(history)
    else:
        raise SystemExit(f"unknown job {job!r}")
    frame.to_pickle(rest[0])
    print(json.dumps({"seconds": seconds, "result_rows": len(frame), "peak_rss": _peak_rss(), **extra}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
