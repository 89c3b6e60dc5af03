"""sqlagg (DuckDB over real Parquet files) must return exactly what analysis returns."""
from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from roma_analytics import analysis, sqlagg
from roma_analytics.errors import ConfigError, RomaError
from roma_analytics.schema import empty_stats
from roma_analytics.store import HistoryStore

from test_analysis import make_stats, snapshot, stats_frames


def write_history(stats: pd.DataFrame, root: Path, per_day: bool = False) -> Path:
    """Write stats in the hive layout stats/date=YYYY-MM-DD/<run_id>.parquet (or one file per
    day, like a compacted history); returns the stats directory."""
    stats_dir = root / "stats"
    days = stats["collected_at"].dt.strftime("%Y-%m-%d")
    groups = stats.groupby(days if per_day else [days, stats["run_id"]], sort=False)
    for key, rows in groups:
        day, name = (key, "compacted") if per_day else key
        folder = stats_dir / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
        assert table.schema.field("collected_at").type == pa.timestamp("us", tz="UTC")
        pq.write_table(table, folder / f"{name}.parquet")
    return stats_dir


def select(stats, since=None, until=None, projects=None, instances=None, regions=None, task_types=None):
    """The equivalently filtered frame, written independently of sqlagg."""
    keep = pd.Series(True, index=stats.index)
    if since is not None:
        keep &= stats["collected_at"] >= pd.Timestamp(since, tz="UTC")
    if until is not None:
        keep &= stats["collected_at"] < pd.Timestamp(until, tz="UTC")
    for column, values in (("project_id", projects), ("instance_id", instances),
                           ("region", regions), ("task_type", task_types)):
        if values is not None:
            keep &= stats[column].isin(values)
    return stats[keep]


FLEET = make_stats(
    # two snapshots of i1 in one hour, and a tie on collected_at broken by run_id
    snapshot("2024-05-01T10:00Z", "r1", "i1", "common", 2, 2, 6, 8),
    snapshot("2024-05-01T10:00Z", "r1", "i1", "cdc", 1, 0, 6, 0),
    snapshot("2024-05-01T10:00Z", "r1", "i2", "common", 0, 0, 0, 0, project="p2"),
    snapshot("2024-05-01T10:30Z", "r2", "i1", "common", 3, 1, 6, 8),
    # r3 wins the tie on run_id although its first count is smaller
    snapshot("2024-05-01T10:30Z", "r3", "i1", "common", 1, 5, 0, 4),
    snapshot("2024-05-01T23:50Z", "r4", "i2", "cdc", 1, 1, 0, 0, project="p2", region="ap-southeast-1"),
    snapshot("2024-05-02T00:10Z", "r5", "i1", "common", 0, 0, 0, 0),
    snapshot("2024-05-07T12:00Z", "r6", "i3", "cdc", 5, 5, 5, 5, project="p2"),
)


@pytest.mark.parametrize("per_day", [False, True], ids=["file-per-run", "file-per-day"])
@pytest.mark.parametrize("freq", ["5min", "1h", "6h", "1D", "1W"])
@pytest.mark.parametrize("by", [(), ("task_type",), ("region", "project_id"), ("instance_id", "task_type")])
def test_trend_equals_analysis(tmp_path, per_day, freq, by):
    source = write_history(FLEET, tmp_path, per_day)
    assert_frame_equal(sqlagg.trend(source, freq, by=by), analysis.trend(FLEET, freq, by=by))


@pytest.mark.parametrize("freq", ["15min", "1h", "1D", "2W"])
def test_cdc_vs_common_equals_analysis(tmp_path, freq):
    source = write_history(FLEET, tmp_path)
    assert_frame_equal(sqlagg.cdc_vs_common(source, freq), analysis.cdc_vs_common(FLEET, freq))


def test_reference_values_through_duckdb(tmp_path):
    # Independent of analysis: the hand-computed figures of the reference example, with the
    # gauge rule (r3 replaces r1/r2 of i1 common in the 10:00 hour) checked on hourly buckets.
    source = write_history(FLEET, tmp_path)
    hourly = sqlagg.trend(source, "1h", by=("task_type",), until="2024-05-01T11:00")
    assert hourly[["task_type", "abnormal", "total"]].values.tolist() == [["cdc", 0, 7], ["common", 5, 10]]
    first = sqlagg.cdc_vs_common(source, "1D", projects=["p1"], until="2024-05-02").iloc[0]
    assert (first["common_total"], first["cdc_total"]) == (10, 7)
    assert first["cdc_share"] == pytest.approx(7 / 17)
    zero = sqlagg.trend(source, "1D", by=(), since="2024-05-02", until="2024-05-03")
    assert zero["total"].tolist() == [0] and zero["abnormal_ratio"].isna().all()


@pytest.mark.parametrize("filters", [
    {"since": "2024-05-01T10:30"},
    {"until": "2024-05-01T10:30"},
    {"since": "2024-05-01T10:00", "until": "2024-05-02T00:10"},
    {"since": "2024-05-01T23:50", "until": "2024-05-01T23:51"},
    {"projects": ["p2"]},
    {"projects": "p1", "task_types": ["cdc"]},
    {"instances": ["i1", "i3"], "regions": ["cn-north-4"]},
    {"regions": ["ap-southeast-1"], "since": "2024-05-01"},
    {"since": "2024-06-01"},
    {"projects": []},
])
def test_filters_equal_filtering_the_frame(tmp_path, filters):
    source = write_history(FLEET, tmp_path)
    projects = filters.get("projects")
    expected_rows = select(FLEET, **{**filters, "projects": [projects] if isinstance(projects, str) else projects})
    for freq, by in [("1h", ("task_type",)), ("1D", ("project_id", "instance_id"))]:
        assert_frame_equal(sqlagg.trend(source, freq, by=by, **filters), analysis.trend(expected_rows, freq, by=by))
    assert_frame_equal(sqlagg.cdc_vs_common(source, "6h", **filters), analysis.cdc_vs_common(expected_rows, "6h"))


def test_buckets_before_1970_round_down(tmp_path):
    old = make_stats(snapshot("1969-12-31T12:00Z", "r0", "i1", "common", 1, 1, 0, 0),
                     snapshot("1969-12-29T12:00Z", "r-1", "i1", "cdc", 0, 1, 0, 0))
    source = write_history(old, tmp_path)
    got = sqlagg.trend(source, "1D")
    assert got["bucket"].tolist() == [pd.Timestamp("1969-12-29", tz="UTC"), pd.Timestamp("1969-12-31", tz="UTC")]
    assert_frame_equal(got, analysis.trend(old, "1D"))
    weekly = sqlagg.trend(source, "1W", by=())
    assert weekly["bucket"].tolist() == [pd.Timestamp("1969-12-29", tz="UTC")]  # a Monday
    assert_frame_equal(weekly, analysis.trend(old, "1W", by=()))


def test_since_and_until_in_other_time_zones(tmp_path):
    source = write_history(FLEET, tmp_path)
    # 18:30 in Shanghai is 10:30 UTC; 08:00 on 2 May in Shanghai is 00:00 UTC
    got = sqlagg.trend(source, "1h", since=pd.Timestamp("2024-05-01T18:30", tz="Asia/Shanghai"),
                       until=pd.Timestamp("2024-05-02T08:00", tz="Asia/Shanghai"))
    expected = analysis.trend(select(FLEET, since="2024-05-01T10:30", until="2024-05-02T00:00"), "1h")
    assert_frame_equal(got, expected)


def test_partitions_outside_the_range_are_not_read(tmp_path):
    source = write_history(FLEET, tmp_path)
    junk = source / "date=2030-01-01"
    junk.mkdir()
    (junk / "not-parquet.parquet").write_bytes(b"this is not a parquet file")
    # The broken file is only opened when its partition is in range.  (DuckDB takes the
    # schema from the first file of the glob, so the junk sorts last.)
    got = sqlagg.trend(source, "1D", until="2029-12-31T23:59")
    assert_frame_equal(got, analysis.trend(FLEET, "1D"))
    # In range, the broken file is read and named (by DuckDB, or by a check of ours before it).
    with pytest.raises((duckdb.Error, RomaError), match=r"not-parquet\.parquet"):
        sqlagg.trend(source, "1D")


def test_user_values_are_parameters_not_sql(tmp_path):
    source = write_history(FLEET, tmp_path)
    got = sqlagg.trend(source, "1D", projects=["p1' OR '1'='1"], instances=["x') OR (1=1"])
    assert got.empty
    assert_frame_equal(got, analysis.trend(empty_stats(), "1D"))


def test_missing_or_empty_directory_gives_the_empty_result(tmp_path):
    for source in (tmp_path / "nowhere", tmp_path):
        assert_frame_equal(sqlagg.trend(source, "1h", by=("region",)), analysis.trend(empty_stats(), "1h", by=("region",)))
        assert_frame_equal(sqlagg.cdc_vs_common(source), analysis.cdc_vs_common(empty_stats()))


def test_bad_parameters_are_config_errors(tmp_path):
    source = write_history(FLEET, tmp_path)
    with pytest.raises(ConfigError, match="freq"):
        sqlagg.trend(source, "1M")
    with pytest.raises(ConfigError, match="'instance_name'"):
        sqlagg.trend(source, by=("instance_name",))
    with pytest.raises(ConfigError, match="since"):
        sqlagg.trend(source, since="yesterday-ish")
    with pytest.raises(ConfigError, match="before"):
        sqlagg.cdc_vs_common(source, since="2024-05-02", until="2024-05-01")
    with pytest.raises(ConfigError, match="projects"):
        sqlagg.trend(source, projects=[1, 2])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stats_frames(),
    st.sampled_from(["15min", "1h", "1D", "1W"]),
    st.sampled_from([(), ("task_type",), ("region", "instance_id"), ("project_id", "task_type")]),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 3 * 24 * 60)),
)
def test_generated_histories_agree(stats, freq, by, per_day, since_minutes):
    since = None if since_minutes is None else pd.Timestamp("2024-05-01") + pd.Timedelta(minutes=since_minutes)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_history(stats, Path(tmp), per_day) if len(stats) else Path(tmp)
        expected_rows = select(stats, since=since)
        assert_frame_equal(sqlagg.trend(source, freq, by=by, since=since), analysis.trend(expected_rows, freq, by=by))
        assert_frame_equal(sqlagg.cdc_vs_common(source, freq, since=since), analysis.cdc_vs_common(expected_rows, freq))


def _trend_rows(path, queue):
    queue.put(len(HistoryStore(path).trend("1h")))


def test_a_forked_child_can_aggregate_after_its_parent_did(tmp_path):
    """DuckDB does not survive a fork: a child that aggregates after its parent did (the
    multiprocessing default on Linux) hung forever while the parent's cached connection was open."""
    import multiprocessing

    from test_store import make_run

    store = HistoryStore(tmp_path / "history")
    store.append(make_run("r1", "2026-03-02T10:00Z"))
    expected = len(store.trend("1h"))  # the parent's connection is now open
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_trend_rows, args=(store.path, queue))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "the forked child hung in DuckDB"
    assert queue.get(timeout=5) == expected


def test_a_thread_per_query_does_not_grow_memory(tmp_path):
    """The dashboard runs every rerun in a new thread: a DuckDB database made per thread (and kept
    for the thread's cursor) grew a long-running server by about 5 MiB a rerun."""
    import threading

    import psutil

    from test_store import make_run

    store = HistoryStore(tmp_path / "history")
    store.append(make_run("r1", "2026-03-02T10:00Z"))
    expected = store.trend("1h")
    process = psutil.Process()
    answers = []

    def one_rerun():
        answers.append(store.trend("1h"))

    for _ in range(5):  # the first threads may allocate what every later one reuses
        thread = threading.Thread(target=one_rerun)
        thread.start()
        thread.join()
    before = process.memory_info().rss
    for _ in range(40):
        thread = threading.Thread(target=one_rerun)
        thread.start()
        thread.join()
    grown = process.memory_info().rss - before
    assert len(answers) == 45
    for answer in answers:
        assert_frame_equal(answer, expected)
    # 40 databases were about 200 MiB; 40 cursors on one database are next to nothing.
    assert grown < 60 * 2**20, f"memory grew by {grown / 2**20:.0f} MiB over 40 threads"


def test_snapshots_come_sorted_whatever_order_duckdb_hands_the_batches_back_in(monkeypatch):
    # With preserve_insertion_order off, DuckDB (1.5 through the relation API, 2.0 through an
    # executed result) now and then returns an ORDER BY query's Arrow batches out of order; the
    # dashboard then took a middle row of the snapshots for the newest run (its last_day, its
    # fleet state).  Here every answer comes back reversed, the worst such order.
    from roma_analytics import sqlagg
    from roma_analytics.samples import SAMPLE_HISTORY
    from roma_analytics.store import HistoryStore

    class Reversed:
        def __init__(self, connection):
            self.connection = connection

        def sql(self, *args, **kwargs):
            relation = self.connection.sql(*args, **kwargs)
            return type("Answer", (), {"to_arrow_table": lambda _: relation.to_arrow_table()[::-1]})()

        def __getattr__(self, name):
            return getattr(self.connection, name)

    connection = sqlagg._connection
    monkeypatch.setattr(sqlagg, "_connection", lambda: Reversed(connection()))
    snapshots = HistoryStore(SAMPLE_HISTORY).snapshots("1h")
    keys = ["collected_at", "region", "project_id", "instance_id", "task_type", "run_id"]
    assert len(snapshots) > 1000
    pd.testing.assert_frame_equal(snapshots, snapshots.sort_values(keys, kind="stable").reset_index(drop=True))


# ------------------------------------------------------------------ Ctrl-C during a DuckDB query

# DuckDB stops a query on Ctrl-C and raises RuntimeError("Query interrupted") (InterruptException
# when the query is interrupted otherwise), not KeyboardInterrupt: the CLI printed a traceback and
# exited 1, the dashboard server called it a failed warm-up and went on starting.  Here every query
# of the package runs a minutes-long query first, which DuckDB's own interrupt stops after 0.3 s
# (a signal's timing against DuckDB's checks is not reproducible; the interrupt is).
_SLOW_CONNECTION = """
import sys, threading
from roma_analytics import sqlagg

real = sqlagg._connection
SLOW = "SELECT sum(a * b) FROM range(100000000000) t(a), (SELECT 1 b)"   # minutes

class Slow:
    def __init__(self, cursor):
        self.cursor = cursor
    def _slow(self):
        threading.Timer(0.3, self.cursor.interrupt).start()
        self.cursor.sql(SLOW).to_arrow_table()
    def sql(self, *args, **kwargs):
        self._slow()
        return self.cursor.sql(*args, **kwargs)
    def execute(self, *args, **kwargs):
        self._slow()
        return self.cursor.execute(*args, **kwargs)
    def __getattr__(self, name):
        return getattr(self.cursor, name)

sqlagg._connection = lambda: Slow(real())
"""

_CALLERS = {
    "report": "from roma_analytics import cli\nsys.exit(cli.main(['report', '--history', SAMPLE, '--since', '2000-01-01', "
              "'--out', OUT]))",
    "task_episodes": "from roma_analytics.store import HistoryStore\nHistoryStore(SAMPLE).task_episodes()",
    "dashboard warm-up": "from roma_analytics.streamlit_app import serve\nserve.preload()",
}


@pytest.mark.parametrize("caller", list(_CALLERS))
def test_an_interrupted_query_is_a_keyboard_interrupt_wherever_it_runs(caller, tmp_path):
    import signal
    import subprocess
    import sys

    from roma_analytics.samples import SAMPLE_HISTORY

    script = (_SLOW_CONNECTION + f"SAMPLE, OUT = {str(SAMPLE_HISTORY)!r}, {str(tmp_path / 'r.html')!r}\n"
              + _CALLERS[caller] + "\nprint('FINISHED', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "FINISHED" not in done.stdout
    if caller == "report":
        assert done.returncode == 130 and done.stderr == "roma-analytics: interrupted\n", done.stderr[-2000:]
    else:
        # Nothing of ours catches it there: Python's own report of an uncaught Ctrl-C.
        assert done.returncode in (1, -signal.SIGINT), done.stderr[-2000:]
        assert done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr[-2000:]
        assert "warming up on the sample failed" not in done.stderr
    assert not (tmp_path / "r.html").exists()


def test_what_duckdb_raises_on_ctrl_c_is_an_interrupt_and_nothing_else_is():
    # The text DuckDB 1.5 and 2.0 raise when Ctrl-C reaches a running query (seen on both).
    with pytest.raises(KeyboardInterrupt):
        with sqlagg.interruptible():
            raise RuntimeError("Query interrupted")
    with pytest.raises(duckdb.Error, match="nothing_here"):
        with sqlagg.interruptible():
            sqlagg._connection().sql("SELECT * FROM nothing_here").fetchall()
    for other in (RuntimeError("Query interrupted, or not"), ValueError("Query interrupted")):
        with pytest.raises(type(other), match="^Query interrupted"):
            with sqlagg.interruptible():
                raise other
