"""HistoryStore: the Parquet layout on disk, loads with filters, compaction and concurrency."""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from unprivileged import as_unprivileged

from roma_analytics import analysis, rollups, schema
from roma_analytics.collect import Collection
from roma_analytics.errors import ConfigError, HistoryWarning, RomaError
from roma_analytics.store import STALE_TEMP_SECONDS, CompactReport, HistoryStore, arrow_schema

FORK = multiprocessing.get_context("fork")


def make_run(run_id, at, instances=("i1", "i2"), project="p1", region="cn-north-4", errors=()):
    """A run with one common and one cdc row per instance; counts derived from the position."""
    at = pd.Timestamp(at)
    rows = []
    for n, instance in enumerate(instances):
        for task_type in ("common", "cdc"):
            running, abnormal, terminated, completed = n + 1, n, 2, 3
            rows.append({
                "collected_at": at, "run_id": run_id, "region": region, "project_id": project,
                "instance_id": instance, "instance_name": None if n % 2 else f"name-{instance}",
                "task_type": task_type, "running": running, "abnormal": abnormal,
                "terminated": terminated, "completed": completed,
                "total": running + abnormal + terminated + completed,
            })
    stats = schema.conform(pd.DataFrame(rows, columns=list(schema.STATS_DTYPES)), "stats")
    error_rows = [{
        "collected_at": at, "run_id": run_id, "region": region, "project_id": project,
        "instance_id": instance, "http_status": status, "error_code": "FDI.3081" if status else "TIMEOUT",
        "error_msg": "gone", "request_id": "req-1" if status else None, "attempts": 3,
    } for instance, status in errors]
    errors_frame = schema.conform(pd.DataFrame(error_rows, columns=list(schema.ERRORS_DTYPES)), "errors")
    return Collection(stats, errors_frame, run_id, at)


def sorted_rows(frame, table="stats"):
    keys = ["collected_at", "run_id", "region", "project_id", "instance_id"]
    keys += ["task_type"] if table == "stats" else []
    return frame.sort_values(keys).reset_index(drop=True)


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ layout

def test_layout_metadata_and_no_date_column(history_dir):
    store = HistoryStore(history_dir)
    written = store.append(make_run("20240501T100000Z-aa", "2024-05-01T10:00:00Z", errors=[("i9", 404)]))
    assert [p.relative_to(history_dir).as_posix() for p in written] == [
        "stats/date=2024-05-01/20240501T100000Z-aa.parquet",
        "errors/date=2024-05-01/20240501T100000Z-aa.parquet",
    ]
    visible = [f for f in files_under(history_dir) if not f.startswith(".")]
    assert visible == [
        "errors/date=2024-05-01/20240501T100000Z-aa.parquet",
        "stats/date=2024-05-01/20240501T100000Z-aa.parquet",
    ]
    for table, path in zip(("stats", "errors"), written):
        meta = pq.read_metadata(path)
        file_schema = pq.read_schema(path)
        assert "date" not in file_schema.names
        assert file_schema.names == list(schema.TABLES[table])
        assert file_schema.metadata[b"roma_analytics.schema_version"] == str(schema.SCHEMA_VERSION).encode()
        assert file_schema.metadata[b"roma_analytics.table"] == table.encode()
        column = meta.row_group(0).column(0)
        assert column.compression == "ZSTD"
        assert column.statistics is not None and column.statistics.has_min_max


def test_utc_day_decides_the_partition(history_dir):
    store = HistoryStore(history_dir)
    # 01:30 in UTC+8 is 17:30 UTC the day before.
    written = store.append(make_run("r-tz", pd.Timestamp("2024-05-02T01:30:00+08:00")))
    assert written[0].parent.name == "date=2024-05-01"
    assert store.load()["collected_at"].iloc[0] == pd.Timestamp("2024-05-01T17:30:00Z")


def test_empty_run_is_listed_and_writes_no_errors_file(history_dir):
    store = HistoryStore(history_dir)
    empty = Collection(schema.empty_stats(), schema.empty_errors(), "r-empty",
                           pd.Timestamp("2024-05-01T10:00Z"))
    written = store.append(empty)
    assert [p.relative_to(history_dir).as_posix() for p in written] == ["stats/date=2024-05-01/r-empty.parquet"]
    assert not (history_dir / "errors" / "date=2024-05-01").exists()
    runs = store.runs()
    assert runs.to_dict("records") == [{
        "run_id": "r-empty", "collected_at": pd.Timestamp("2024-05-01T10:00Z"), "stats_rows": 0, "error_rows": 0,
    }]


def test_readable_by_plain_pyarrow_and_duckdb(history_dir):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    store.append(make_run("r2", "2024-05-02T10:00Z", instances=("i1", "i2", "i3")))
    table = ds.dataset(history_dir / "stats", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 4 + 6
    by_date = table.to_pandas().groupby(table.column("date").to_pandas().astype(str)).size().to_dict()
    assert by_date == {"2024-05-01": 4, "2024-05-02": 6}
    glob = str(history_dir / "stats" / "*" / "*.parquet")
    rows = duckdb.sql(
        f"SELECT CAST(date AS VARCHAR) AS d, count(*) AS n, sum(total) AS t "
        f"FROM read_parquet('{glob}', hive_partitioning=true) GROUP BY 1 ORDER BY 1"
    ).fetchall()
    # total per instance: i1 = 1+0+2+3 = 6, i2 = 2+1+2+3 = 8, i3 = 3+2+2+3 = 10; two task types each
    assert rows == [("2024-05-01", 4, 2 * (6 + 8)), ("2024-05-02", 6, 2 * (6 + 8 + 10))]


# ------------------------------------------------------------------------------------ round trip

def test_round_trip_dtypes_and_nulls(history_dir):
    store = HistoryStore(history_dir)
    run = make_run("r1", "2024-05-01T10:00:00.123456Z", errors=[("i8", 404), ("i9", None)])
    store.append(run)
    stats = store.load()
    pd.testing.assert_frame_equal(stats, sorted_rows(run.stats))
    assert stats["instance_name"].isna().sum() == 2  # i2's rows have no name
    errors = store.load(table="errors")
    pd.testing.assert_frame_equal(errors, sorted_rows(run.errors, "errors"))
    assert errors["http_status"].tolist()[0] == 404 and errors["http_status"].isna().tolist() == [False, True]
    assert dict(errors.dtypes) == schema.ERRORS_DTYPES


def test_empty_and_missing_history_give_typed_empty_frames(tmp_path):
    missing = HistoryStore(tmp_path / "nowhere")
    pd.testing.assert_frame_equal(missing.load(), schema.empty_stats())
    pd.testing.assert_frame_equal(missing.load(table="errors"), schema.empty_errors())
    assert list(missing.runs().columns) == ["run_id", "collected_at", "stats_rows", "error_rows"]
    assert missing.runs().empty
    store = HistoryStore(tmp_path / "h")
    store.append(Collection(schema.empty_stats(), schema.empty_errors(), "r0", pd.Timestamp("2024-05-01")))
    pd.testing.assert_frame_equal(store.load(), schema.empty_stats())
    assert not (tmp_path / "nowhere").exists()  # reading never creates anything


# ------------------------------------------------------------------------------------ filters

@pytest.fixture
def three_runs(history_dir):
    store = HistoryStore(history_dir)
    store.append(make_run("r10", "2024-05-01T10:00Z", instances=("i1", "i2")))
    store.append(make_run("r11", "2024-05-01T11:00Z", instances=("i1",), project="p2", region="ap-southeast-1"))
    store.append(make_run("r12", "2024-05-02T00:00Z", instances=("i2", "i3")))
    return store


def test_load_time_filters_are_inclusive_exclusive(three_runs):
    assert set(three_runs.load(since="2024-05-01T11:00Z")["run_id"]) == {"r11", "r12"}
    assert set(three_runs.load(until="2024-05-01T11:00Z")["run_id"]) == {"r10"}
    # naive = UTC; an aware time in another zone is converted
    assert set(three_runs.load(since="2024-05-01T10:00", until="2024-05-02")["run_id"]) == {"r10", "r11"}
    assert set(three_runs.load(since=pd.Timestamp("2024-05-02T08:00+08:00"))["run_id"]) == {"r12"}
    assert three_runs.load(since="2024-05-03").empty
    with pytest.raises(ConfigError, match="since"):
        three_runs.load(since="not a time")


def test_load_value_filters_and_columns(three_runs):
    frame = three_runs.load(projects="p2")
    assert set(frame["run_id"]) == {"r11"} and len(frame) == 2
    assert set(three_runs.load(instances=["i3"])["run_id"]) == {"r12"}
    assert set(three_runs.load(regions=["ap-southeast-1"])["project_id"]) == {"p2"}
    cdc = three_runs.load(task_types="cdc")
    assert set(cdc["task_type"]) == {"cdc"} and len(cdc) == 5
    assert three_runs.load(projects=[]).empty
    slim = three_runs.load(columns=["instance_id", "total"], instances=["i1"])
    assert list(slim.columns) == ["instance_id", "total"] and slim["total"].tolist() == [6, 6, 6, 6]
    with pytest.raises(ConfigError, match="unknown stats column"):
        three_runs.load(columns=["nope"])
    with pytest.raises(ConfigError, match="unknown table"):
        three_runs.load(table="metrics")


def test_load_sorted_by_time_then_series(three_runs):
    frame = three_runs.load()
    assert frame["run_id"].tolist() == ["r10"] * 4 + ["r11"] * 2 + ["r12"] * 4
    first = frame[frame["run_id"] == "r10"]
    assert list(zip(first["instance_id"], first["task_type"])) == [
        ("i1", "cdc"), ("i1", "common"), ("i2", "cdc"), ("i2", "common")]
    assert frame.index.tolist() == list(range(10))


def test_one_day_load_opens_only_that_day(three_runs, history_dir):
    # Corrupt the other day's file: a load of 2024-05-01 must not even open it.
    other = next((history_dir / "stats" / "date=2024-05-02").glob("*.parquet"))
    other.write_bytes(b"this is not parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one warning: the damaged file is never opened
        frame = three_runs.load(since="2024-05-01", until="2024-05-02")
    assert set(frame["run_id"]) == {"r10", "r11"}
    with pytest.warns(HistoryWarning, match="r12.parquet"):
        assert set(three_runs.load()["run_id"]) == {"r10", "r11"}


def test_temp_and_hidden_files_are_ignored(three_runs, history_dir):
    day = history_dir / "stats" / "date=2024-05-01"
    (day / ".r99.parquet.tmp-123-abcd").write_bytes(b"half written")
    (day / "_SUCCESS").write_bytes(b"")
    (day / "_r98.parquet").write_bytes(b"junk")
    (history_dir / "stats" / ".date=2024-05-01.old").mkdir()
    assert len(three_runs.load()) == 10
    assert three_runs.runs()["run_id"].tolist() == ["r10", "r11", "r12"]


def test_runs_counts_rows_of_both_tables(history_dir):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z", errors=[("i8", 500)]))
    store.append(make_run("r2", "2024-05-01T12:00Z", instances=("i1",), errors=[("i8", 500), ("i9", None)]))
    runs = store.runs()
    assert runs[["run_id", "stats_rows", "error_rows"]].values.tolist() == [["r1", 4, 1], ["r2", 2, 2]]
    assert store.runs(since="2024-05-01T11:00")["run_id"].tolist() == ["r2"]


# ------------------------------------------------------------------------------------ append errors

def test_same_run_id_twice_is_refused(history_dir):
    store = HistoryStore(history_dir)
    run = make_run("r1", "2024-05-01T10:00Z")
    store.append(run)
    before = files_under(history_dir)
    with pytest.raises(ConfigError, match="already in the stats history"):
        store.append(run)
    assert files_under(history_dir) == before
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    store.compact(before="2024-05-02")
    with pytest.raises(ConfigError, match="already"):  # also once merged into a compacted file
        store.append(make_run("r2", "2024-05-01T11:00Z"))
    assert len(store.load()) == 8


@pytest.mark.parametrize("run_id", ["../evil", ".hidden", "a/b", "", "compacted-x", "x" * 200])
def test_run_ids_that_cannot_name_a_file_are_refused(history_dir, run_id):
    with pytest.raises(ConfigError, match="run id"):
        HistoryStore(history_dir).append(make_run(run_id, "2024-05-01T10:00Z"))
    assert not history_dir.exists()


def test_rows_must_belong_to_the_run(history_dir):
    run = make_run("r1", "2024-05-01T10:00Z")
    run.run_id = "r2"
    with pytest.raises(ConfigError, match="another run_id"):
        HistoryStore(history_dir).append(run)
    late = make_run("r3", "2024-05-01T23:59Z")
    late.collected_at = pd.Timestamp("2024-05-02T00:01Z")
    with pytest.raises(ConfigError, match="outside 2024-05-02"):
        HistoryStore(history_dir).append(late)
    broken = make_run("r4", "2024-05-01T10:00Z")
    broken.stats = broken.stats.drop(columns=["total"])
    with pytest.raises(ConfigError, match="total"):
        HistoryStore(history_dir).append(broken)


def test_bad_history_paths(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(ConfigError, match="is a file"):
        HistoryStore(a_file)
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "README.md").write_text("x")
    with pytest.raises(ConfigError, match="not a roma-analytics history folder"):
        HistoryStore(foreign)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "stats").write_text("x")
    with pytest.raises(ConfigError, match="not a roma-analytics history folder"):
        HistoryStore(odd)
    hidden_only = tmp_path / "fresh"
    hidden_only.mkdir()
    (hidden_only / ".gitkeep").write_text("")
    HistoryStore(hidden_only).append(make_run("r1", "2024-05-01T10:00Z"))  # an empty folder is fine


def test_read_only_location_is_a_clear_error():
    shared = Path(tempfile.mkdtemp(prefix="roma-store-"))  # pytest's tmp_path is private to root
    try:
        shared.chmod(0o755)
        locked = shared / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        run = make_run("r1", "2024-05-01T10:00Z")
        error, message = as_unprivileged(lambda: HistoryStore(locked / "history").append(run))
        assert error == "ConfigError" and "writable" in message, message
        # an existing history of another user: readable, but not writable
        history = shared / "history"
        HistoryStore(history).append(run)
        assert as_unprivileged(lambda: HistoryStore(history).load()) == (None, "")
        error, message = as_unprivileged(lambda: HistoryStore(history).append(make_run("r2", "2024-05-01T11:00Z")))
        assert error == "ConfigError" and "writable" in message, message
        assert message.startswith(f"cannot write to the history folder {history}: Permission denied"), message
        assert HistoryStore(history).compact(before="2024-05-02").files_merged == 0   # its owner can
        error, message = as_unprivileged(lambda: HistoryStore(history).compact(before="2024-05-02"))
        assert error == "ConfigError" and "writable" in message, message
        assert message.startswith(f"cannot compact the history folder {history}: Permission denied"), message
        assert [p.name for p in (history / "stats" / "date=2024-05-01").iterdir()] == ["r1.parquet"]
    finally:
        locked.chmod(0o755)
        shutil.rmtree(shared)


def test_unwritable_location_is_a_clear_error_even_for_root(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    # The history folder itself is fine; its parent path goes through a file.
    with pytest.raises(ConfigError, match=f"^cannot write to the history folder {blocker / 'history'}: Not a directory"):
        HistoryStore(blocker / "history").append(make_run("r1", "2024-05-01T10:00Z"))


def test_a_stray_file_where_the_history_keeps_a_folder_is_named_with_what_to_do(tmp_path):
    # A file named like one of the history's folders: a table's (append) or a rollup's (compact).
    # The folder is writable: "choose a writable folder" would send the user the wrong way.
    history = tmp_path / "history"
    HistoryStore(history).append(make_run("r1", "2024-05-01T10:00Z"))
    (history / "stats" / "date=2024-05-02").write_text("not a folder")
    (history / "rollup_1h").write_text("not a folder")
    for action, stray in ((lambda: HistoryStore(history).append(make_run("r2", "2024-05-02T10:00Z")),
                           "stats/date=2024-05-02"),
                          (lambda: HistoryStore(history).compact(), "rollup_1h")):
        with pytest.raises(ConfigError) as raised:
            action()
        message = str(raised.value)
        assert f"{history / stray} is a file where the history keeps a folder" in message, message
        assert "move that file out of the history folder" in message and "writable" not in message


# ------------------------------------------------------------------------------------ compact

def build_days(store, days=3, runs_per_day=3):
    expected = []
    for d in range(days):
        for r in range(runs_per_day):
            run = make_run(f"r{d}{r}", pd.Timestamp("2024-05-01T00:00Z") + pd.Timedelta(days=d, hours=r + 1),
                           errors=[("i9", 500)] if r == 0 else ())
            store.append(run)
            expected.append(run)
    empty = Collection(schema.empty_stats(), schema.empty_errors(), "r-empty", pd.Timestamp("2024-05-01T23:00Z"))
    store.append(empty)
    stats = sorted_rows(pd.concat([run.stats for run in expected], ignore_index=True))
    errors = sorted_rows(pd.concat([run.errors for run in expected], ignore_index=True), "errors")
    return stats, errors


def test_compact_merges_without_losing_or_duplicating(history_dir):
    store = HistoryStore(history_dir)
    stats, errors = build_days(store)
    runs_before = store.runs()
    report = store.compact(before="2024-05-03")  # days 05-01 and 05-02; 05-03 untouched
    # stats: 05-01 has 3 runs + the empty run = 4 files, 05-02 has 3; errors: one file per day (left alone)
    # both merged days get new file names, hence their rollups are built again
    assert report == CompactReport(days=2, files_merged=7, rows=2 * 3 * 4, rollups=2)
    for day, count in (("2024-05-01", 1), ("2024-05-02", 1), ("2024-05-03", 3)):
        names = [p.name for p in (history_dir / "stats" / f"date={day}").iterdir()]
        assert len(names) == count
    merged = next((history_dir / "stats" / "date=2024-05-01").glob("compacted-*.parquet"))
    assert merged.name.startswith("compacted-r00-r-empty-")
    assert "date" not in pq.read_schema(merged).names
    assert pq.read_schema(merged).metadata[b"roma_analytics.schema_version"] == b"1"
    pd.testing.assert_frame_equal(store.load(), stats)
    pd.testing.assert_frame_equal(store.load(table="errors"), errors)
    pd.testing.assert_frame_equal(store.runs(), runs_before)
    assert "r-empty" in set(store.runs()["run_id"])
    layout = files_under(history_dir)
    assert store.compact(before="2024-05-03") == CompactReport()
    assert files_under(history_dir) == layout


def test_compact_default_leaves_today_alone(history_dir):
    store = HistoryStore(history_dir)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    store.append(make_run("t1", now.floor("D") + pd.Timedelta(seconds=1)))
    store.append(make_run("t2", now.floor("D") + pd.Timedelta(seconds=2)))
    assert store.compact() == CompactReport()
    assert store.compact(before=now.floor("D") + pd.Timedelta(days=1)).files_merged == 2


def test_compact_again_after_new_files_arrive(history_dir):
    store = HistoryStore(history_dir)
    stats, _ = build_days(store, days=1)
    store.compact(before="2024-05-02")
    late = make_run("r-late", "2024-05-01T22:00Z")
    store.append(late)
    assert store.compact(before="2024-05-02").files_merged == 2
    expected = sorted_rows(pd.concat([stats, late.stats], ignore_index=True))
    pd.testing.assert_frame_equal(store.load(), expected)
    assert len(list((history_dir / "stats" / "date=2024-05-01").iterdir())) == 1


def test_crash_after_commit_is_read_once_and_finished(history_dir, tmp_path):
    store = HistoryStore(history_dir)
    stats, _ = build_days(store, days=1)
    day = history_dir / "stats" / "date=2024-05-01"
    saved = tmp_path / "saved"
    shutil.copytree(day, saved)
    store.compact(before="2024-05-02")
    # Put the originals back: the state a compaction killed right after its commit leaves.
    for original in saved.iterdir():
        shutil.copy2(original, day / original.name)
    assert len(list(day.iterdir())) == 5
    pd.testing.assert_frame_equal(store.load(), stats)
    # The pushed-down aggregation reads the same files: nothing counted twice.
    pd.testing.assert_frame_equal(store.trend(freq="1h", by=("instance_id",)),
                                  analysis.trend(stats, freq="1h", by=("instance_id",)))
    report = store.compact(before="2024-05-02")
    assert report == CompactReport()
    assert len(list(day.iterdir())) == 1
    pd.testing.assert_frame_equal(store.load(), stats)


def _compact_child(path, ready):
    store = HistoryStore(path)
    ready.set()
    store.compact(before="2030-01-01")
    os._exit(0)


def test_compact_killed_at_random_points_keeps_history_complete(tmp_path):
    template = tmp_path / "template"
    store = HistoryStore(template)
    stats, errors = build_days(store, days=6, runs_per_day=3)
    runs = store.runs()
    # How long a whole compaction takes here, to spread the kills over it.
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    ready = FORK.Event()
    child = FORK.Process(target=_compact_child, args=(probe, ready), daemon=True)
    child.start()
    ready.wait(60)
    started = time.monotonic()
    child.join(120)
    duration = time.monotonic() - started
    assert child.exitcode == 0

    rng = random.Random(1234)
    kills = 0
    for iteration in range(12):
        history = tmp_path / f"h{iteration}"
        shutil.copytree(template, history)
        ready = FORK.Event()
        child = FORK.Process(target=_compact_child, args=(history, ready), daemon=True)
        child.start()
        ready.wait(60)
        time.sleep(rng.uniform(0, duration * 1.1))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join(60)
        if os.environ.get("ROMA_DEBUG_KILLS"):
            print(iteration, child.exitcode, files_under(history / "stats"))
        killed = HistoryStore(history)
        pd.testing.assert_frame_equal(killed.load(), stats)
        pd.testing.assert_frame_equal(killed.load(table="errors"), errors)
        pd.testing.assert_frame_equal(killed.runs(), runs)
        killed.compact(before="2030-01-01")  # finishes whatever the kill interrupted
        pd.testing.assert_frame_equal(killed.load(), stats)
        pd.testing.assert_frame_equal(killed.runs(), runs)
        leftovers = [f for f in files_under(history) if "/" in f and ("/." in f or f.count(".parquet") != 1)]
        assert leftovers == []
        for day in (history / "stats").iterdir():
            assert len(list(day.iterdir())) == 1
    assert kills > 0, "no kill landed while the compaction ran; the test proved nothing"


# ------------------------------------------------------------------------------------ concurrency

ROWS_PER_RUN = 4  # make_run with two instances


def _append_child(path, prefix, count):
    store = HistoryStore(path)
    for n in range(count):
        # Spread over two days so that compaction of the first day races with appends to it.
        at = pd.Timestamp("2024-05-01T00:00Z") + pd.Timedelta(hours=n % 2 * 24, seconds=n)
        store.append(make_run(f"{prefix}-{n:03d}", at))
    os._exit(0)


def _compact_loop_child(path, stop):
    store = HistoryStore(path)
    while not stop.is_set():
        store.compact(before="2030-01-01")
    os._exit(0)


def test_concurrent_appenders_compactor_and_reader(history_dir):
    count = 15
    HistoryStore(history_dir).append(make_run("seed", "2024-05-01T00:00Z"))
    stop = FORK.Event()
    writers = [FORK.Process(target=_append_child, args=(history_dir, prefix, count), daemon=True)
               for prefix in ("a", "b")]
    compactor = FORK.Process(target=_compact_loop_child, args=(history_dir, stop), daemon=True)
    for process in [*writers, compactor]:
        process.start()
    reader = HistoryStore(history_dir)
    seen: set[str] = set()
    loads = 0
    try:
        while any(w.is_alive() for w in writers) or loads < 3:
            frame = reader.load()
            sizes = frame.groupby("run_id").size()
            # every run seen whole and exactly once; a run once seen never disappears
            assert (sizes == ROWS_PER_RUN).all(), sizes[sizes != ROWS_PER_RUN]
            assert seen <= set(sizes.index)
            seen = set(sizes.index)
            loads += 1
    finally:
        stop.set()
        for process in [*writers, compactor]:
            process.join(60)
            if process.is_alive():
                process.kill()
    assert [w.exitcode for w in writers] == [0, 0] and compactor.exitcode == 0
    final = reader.load()
    expected = {"seed"} | {f"{p}-{n:03d}" for p in "ab" for n in range(count)}
    assert set(final["run_id"]) == expected and len(final) == ROWS_PER_RUN * len(expected)
    assert set(reader.runs()["run_id"]) == expected


# ------------------------------------------------------------------------------------ analysis

def test_trend_and_cdc_vs_common_match_analysis_on_load(history_dir):
    from roma_analytics import analysis, sqlagg
    store = HistoryStore(history_dir)
    build_days(store, days=3)
    store.append(make_run("rx", "2024-05-02T05:00Z", instances=("i1", "i5"), project="p2"))
    cases = [
        dict(freq="1D", by=("task_type",)),
        dict(freq="6h", by=("project_id", "task_type"), since="2024-05-01T06:00", until="2024-05-03"),
        dict(freq="1W", by=()),
        dict(freq="1h", by=("instance_id",), projects=["p1"], instances=["i1", "i2"]),
    ]
    for case in cases:
        filters = {k: case.get(k) for k in ("since", "until", "projects", "instances")}
        expected = analysis.trend(store.load(**filters), freq=case["freq"], by=case["by"])
        pd.testing.assert_frame_equal(store.trend(**case), expected)
    expected = analysis.cdc_vs_common(store.load(since="2024-05-02"), freq="12h")
    pd.testing.assert_frame_equal(store.cdc_vs_common(freq="12h", since="2024-05-02"), expected)
    with pytest.raises(ConfigError):
        store.trend(since="2024-05-03", until="2024-05-01")


def test_compact_removes_abandoned_append_temporaries_but_not_fresh_ones(history_dir):
    store = HistoryStore(history_dir)
    build_days(store, days=1)
    day = history_dir / "stats" / "date=2024-05-01"
    abandoned = day / ".20240501T000000Z-deadbeef.parquet.tmp-99999-abcd1234"
    fresh = day / ".20240501T010000Z-deadbeef.parquet.tmp-99998-abcd1234"
    abandoned.write_bytes(b"half a parquet file")
    fresh.write_bytes(b"being written right now")
    old = time.time() - 16 * 60
    os.utime(abandoned, (old, old))
    store.compact(before="2024-05-02")
    assert not abandoned.exists()
    assert fresh.exists()


# ------------------------------------------------------------------------------------ the commit, step by step

class FileSystemTrace:
    """Records the history's file-system steps (fsync of a file or folder, link, rename, unlink)
    in order, while the real calls run: what a power cut at any point would leave is decided by
    this order, which no test can otherwise see."""

    def __init__(self, monkeypatch, root: Path):
        self.steps: list[tuple] = []
        self.root = root
        real = {name: getattr(os, name) for name in ("fsync", "link", "replace", "unlink")}

        def fsync(fd):
            self.steps.append(("fsync", self._short(os.readlink(f"/proc/self/fd/{fd}"))))
            return real["fsync"](fd)

        def link(src, dst, *args, **kwargs):
            self.steps.append(("link", self._short(src), self._short(dst)))
            return real["link"](src, dst, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            self.steps.append(("replace", self._short(src), self._short(dst)))
            return real["replace"](src, dst, *args, **kwargs)

        def unlink(path, *args, **kwargs):
            self.steps.append(("unlink", self._short(path)))
            return real["unlink"](path, *args, **kwargs)

        for name, function in (("fsync", fsync), ("link", link), ("replace", replace), ("unlink", unlink)):
            monkeypatch.setattr(os, name, function)

    def of(self, *tables: str) -> list[tuple]:
        """The steps on the files and folders of ``tables`` (and on the history root)."""
        return [step for step in self.steps if all(p == "." or p.split("/")[0] in tables for p in step[1:])]

    def _short(self, path) -> str:
        """The path below the history root, with a temporary file's random suffix cut off."""
        text = os.path.relpath(str(path), self.root)
        return text.split(".tmp-")[0] + ".tmp" if ".tmp-" in text else text


def test_an_appended_file_is_fsynced_before_it_gets_its_name_and_its_folder_after(history_dir, monkeypatch):
    store = HistoryStore(history_dir)
    store.append(make_run("r0", "2024-05-01T09:00Z"))   # the folders exist: only the commit is traced
    trace = FileSystemTrace(monkeypatch, history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z", errors=[("i8", 500)]))
    day = "date=2024-05-01"
    steps = []
    for table in ("errors", "stats"):   # stats last: a run is listed once its stats file exists
        steps += [("fsync", f"{table}/{day}/.r1.parquet.tmp"),
                  ("link", f"{table}/{day}/.r1.parquet.tmp", f"{table}/{day}/r1.parquet"),
                  ("fsync", f"{table}/{day}"),
                  ("unlink", f"{table}/{day}/.r1.parquet.tmp")]
    assert trace.of("stats", "errors") == steps
    assert files_under(history_dir / "stats") == [f"{day}/r0.parquet", f"{day}/r1.parquet"]


def test_a_merged_file_is_committed_before_the_originals_go(history_dir, monkeypatch):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    trace = FileSystemTrace(monkeypatch, history_dir)
    store.compact(before="2024-05-02")
    day = "stats/date=2024-05-01"
    merged = [name for name in files_under(history_dir / "stats")]
    assert len(merged) == 1 and merged[0].startswith("date=2024-05-01/compacted-r1-r2-")
    merged = f"stats/{merged[0]}"
    temporary = f"{day}/.{merged.rsplit('/', 1)[1]}.tmp"
    # Written and fsynced under a hidden name; linked to its name (the commit point, the folder
    # fsynced), the originals deleted and the folder fsynced again -- all under the exclusive
    # lock -- then the history root.
    assert trace.of("stats") == [("fsync", temporary), ("link", temporary, merged), ("fsync", day),
                           ("unlink", f"{day}/r1.parquet"), ("unlink", f"{day}/r2.parquet"), ("fsync", day),
                           ("fsync", "."), ("unlink", temporary)]
    assert len(store.load()) == 8


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK])
def test_without_hard_links_a_file_is_renamed_into_place_and_never_over_another(history_dir, monkeypatch, code):
    """File systems without hard links (some network and FAT mounts) refuse os.link: the
    temporary is renamed instead, after checking that the name is free."""
    from roma_analytics.history_backend import LocalBackend

    def no_links(src, dst, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr(os, "link", no_links)
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    assert files_under(history_dir / "stats") == ["date=2024-05-01/r1.parquet", "date=2024-05-01/r2.parquet"]
    assert store.load()["run_id"].unique().tolist() == ["r1", "r2"]
    taken = history_dir / "stats" / "date=2024-05-01" / "r1.parquet"
    before = taken.read_bytes()
    with pytest.raises(FileExistsError) as raised:
        LocalBackend(history_dir).create(taken, lambda file: file.write(b"other"))
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.EEXIST, "file exists", str(taken))
    assert taken.read_bytes() == before
    assert files_under(history_dir / "stats") == ["date=2024-05-01/r1.parquet", "date=2024-05-01/r2.parquet"]
    store.compact(before="2024-05-02")
    assert len(files_under(history_dir / "stats")) == 1 and len(store.load()) == 8


def test_a_link_failing_for_another_reason_stores_nothing(history_dir, monkeypatch):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    before = files_under(history_dir)

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "link", full)
    with pytest.raises(RomaError, match="No space left on device") as raised:
        store.append(make_run("r2", "2024-05-01T11:00Z"))
    assert not isinstance(raised.value, ConfigError)
    assert files_under(history_dir) == before
    monkeypatch.undo()
    assert store.runs()["run_id"].tolist() == ["r1"]


def test_a_write_failing_midway_leaves_no_temporary(history_dir):
    from roma_analytics.history_backend import LocalBackend

    backend = LocalBackend(history_dir)
    target = history_dir / "stats" / "date=2024-05-01" / "r1.parquet"

    def half(file):
        file.write(b"PAR1 half")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        backend.create(target, half)
    assert list(target.parent.iterdir()) == []   # the day's folder was made; nothing is in it


def test_compact_removes_an_appends_temporary_only_when_older_than_the_cutoff(history_dir, monkeypatch):
    store = HistoryStore(history_dir)
    build_days(store, days=1)
    day = history_dir / "stats" / "date=2024-05-01"
    now = 1_900_000_000
    monkeypatch.setattr(time, "time", lambda: float(now))
    temporaries = {age: day / f".r{age}.parquet.tmp-1-abcd" for age in (STALE_TEMP_SECONDS, STALE_TEMP_SECONDS + 1)}
    not_ours = [day / "r-x.parquet.tmp-1-abcd", day / ".notes", day / "_r-y.tmp-1"]
    for age, path in temporaries.items():
        path.write_bytes(b"half")
        os.utime(path, ns=((now - age) * 10**9,) * 2)
    for path in not_ours:
        path.write_bytes(b"not a temporary of an append")
        os.utime(path, ns=((now - 3600) * 10**9,) * 2)
    store.compact(before="2024-05-02")
    # Exactly at the cutoff it stays ("more than 15 minutes old"); a second later it goes.
    assert temporaries[STALE_TEMP_SECONDS].exists() and not temporaries[STALE_TEMP_SECONDS + 1].exists()
    assert all(path.exists() for path in not_ours)


def test_a_killed_compactions_temporary_goes_at_once_and_a_missing_file_has_no_age(history_dir):
    from roma_analytics.history_backend import LocalBackend

    store = HistoryStore(history_dir)
    build_days(store, days=1)
    day = history_dir / "stats" / "date=2024-05-01"
    leftover = day / ".compacted-r1-r2-0123456789ab.parquet.tmp-1-abcd"
    leftover.write_bytes(b"half a merge")
    store.compact(before="2024-05-02")
    assert not leftover.exists()
    assert LocalBackend(history_dir).age(day / "gone.parquet", 123.0) == 0.0
    assert LocalBackend(history_dir).age(history_dir / ".lock", os.stat(history_dir / ".lock").st_mtime + 5) == 5


def test_the_data_files_of_a_folder(history_dir):
    from roma_analytics.history_backend import LocalBackend

    backend = LocalBackend(history_dir)
    assert backend.data_files(history_dir / "stats" / "date=2024-05-01") == []   # no folder yet
    folder = history_dir / "stats" / "date=2024-05-01"
    folder.mkdir(parents=True)
    for name in ("b.parquet", "a.parquet", ".c.parquet", "_d.parquet", "e.parquet.tmp-1-ab", "f.csv"):
        (folder / name).write_bytes(b"")
    assert backend.data_files(folder) == [folder / "a.parquet", folder / "b.parquet"]
    backend.ensure_layout(("stats", "errors"))
    assert (history_dir / "errors").is_dir() and (history_dir / ".lock").is_file()
    backend.ensure_layout(("stats", "errors"))   # again: nothing to do, no error
    backend.delete([folder / "a.parquet", folder / "missing.parquet"])
    assert backend.data_files(folder) == [folder / "b.parquet"]


def test_history_files_get_the_usual_permissions(history_dir):
    """Readable by everyone the umask allows, executable by no one (like any file a program creates)."""
    import stat as stat_module

    old = os.umask(0o022)
    try:
        HistoryStore(history_dir).append(make_run("r1", "2024-05-01T10:00Z"))
    finally:
        os.umask(old)
    stored = history_dir / "stats" / "date=2024-05-01" / "r1.parquet"
    assert stat_module.S_IMODE(stored.stat().st_mode) == 0o644


def test_a_failed_write_reports_its_own_error_even_if_its_temporary_is_gone(history_dir):
    """A write stalled past the 15-minute cutoff may see its temporary removed by a compaction;
    when it then fails, its own error is what the caller gets."""
    from roma_analytics.history_backend import LocalBackend

    target = history_dir / "stats" / "date=2024-05-01" / "r1.parquet"

    def stalled_then_failing(file):
        for leftover in target.parent.glob(".r1.parquet.tmp-*"):
            leftover.unlink()          # what the compaction did meanwhile
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error") as raised:
        LocalBackend(history_dir).create(target, stalled_then_failing)
    assert raised.value.errno == errno.EIO
    assert list(target.parent.iterdir()) == []


def test_two_first_appends_at_once_both_create_the_lock_file(history_dir, monkeypatch):
    """Two writers of a new history may both find the lock file missing and both create it."""
    from roma_analytics.history_backend import LocalBackend

    lock = history_dir / ".lock"
    real_exists = Path.exists

    def created_meanwhile(path, *args, **kwargs):
        if path == lock:
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.touch()               # the other writer, between the check and the touch
            return False
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", created_meanwhile)
    LocalBackend(history_dir).ensure_layout(("stats", "errors"))
    monkeypatch.undo()
    assert lock.is_file() and (history_dir / "stats").is_dir()


def test_a_temporary_removed_while_compaction_cleans_up_is_no_error(history_dir, monkeypatch):
    """An abandoned temporary can vanish between compaction listing it and removing it (its
    writer finished after all): compaction goes on."""
    from roma_analytics.history_backend import LocalBackend

    store = HistoryStore(history_dir)
    build_days(store, days=1)
    day = history_dir / "stats" / "date=2024-05-01"
    stale = day / ".r9.parquet.tmp-1-abcd"
    stale.write_bytes(b"half")
    real_age = LocalBackend.age

    def finished_meanwhile(self, path, now):
        age = real_age(self, path, now)
        if Path(path) == stale:
            stale.unlink()             # its writer removed it right after the check
            return STALE_TEMP_SECONDS + 60
        return age

    monkeypatch.setattr(LocalBackend, "age", finished_meanwhile)
    report = store.compact(before="2024-05-02")
    assert report.files_merged > 0 and not stale.exists()


# UTC+14 and UTC-11: at any hour, one of them is on another calendar day than UTC.
@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_compact_default_leaves_todays_utc_day_alone_in_any_time_zone(history_dir, monkeypatch, zone):
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        store = HistoryStore(history_dir)
        today = pd.Timestamp.now(tz="UTC").floor("D")
        yesterday = today - pd.Timedelta(days=1)
        for run, at in (("y1", yesterday), ("y2", yesterday + pd.Timedelta(hours=1)),
                        ("t1", today), ("t2", today + pd.Timedelta(seconds=1))):
            store.append(make_run(run, at))
        assert store.compact().files_merged == 2   # yesterday's two files; today's stay apart
        assert len(files_under(history_dir / "stats" / f"date={today:%Y-%m-%d}")) == 2
    finally:
        monkeypatch.undo()
        time.tzset()


def test_compact_names_a_bad_before(history_dir):
    with pytest.raises(ConfigError, match=r"^before='soon' is not a date or time"):
        HistoryStore(history_dir).compact(before="soon")


# ------------------------------------------------------------------------------------ append: every table

DAY = "date=2024-05-01"


def scope_rows(run_id, at, projects=("p1",)):
    return schema.conform(pd.DataFrame([{
        "collected_at": pd.Timestamp(at), "run_id": run_id, "region": "cn-north-4", "project_id": project,
        "discovery": "listed", "instances": 2, "collected": 2, "failed": 0} for project in projects]), "scopes")


def task_rows(run_id, at, tasks=("t1",)):
    return schema.conform(pd.DataFrame([{
        "collected_at": pd.Timestamp(at), "run_id": run_id, "region": "cn-north-4", "project_id": "p1",
        "instance_id": "i1", "task_type": "cdc", "task_id": task, "task_name": f"job {task}",
        "api_task_type": "REALTIME", "execute_status": "ERROR", "status": 3, "task_tag": None,
        "created_date": pd.Timestamp("2024-04-01T00:00Z"), "last_modified_time": pd.Timestamp(at)}
        for task in tasks], columns=list(schema.ABNORMAL_TASKS_DTYPES)), "abnormal_tasks")


def test_a_runs_scopes_and_abnormal_tasks_are_stored_and_read_back(history_dir):
    store = HistoryStore(history_dir)
    at = "2024-05-01T10:00Z"
    run = make_run("r1", at)
    run.scopes = scope_rows("r1", at, projects=("p1", "p2"))
    run.abnormal_tasks = task_rows("r1", at, tasks=("t1", "t2"))
    written = store.append(run)
    assert [p.relative_to(history_dir).as_posix() for p in written] == [
        f"{table}/{DAY}/r1.parquet" for table in ("stats", "scopes", "abnormal_tasks")]
    pd.testing.assert_frame_equal(store.load(table="scopes"), run.scopes)
    pd.testing.assert_frame_equal(store.load(table="abnormal_tasks"), run.abnormal_tasks)
    # A run that listed tasks and found none still gets its (empty) file: it looked.
    looked = make_run("r2", "2024-05-01T11:00Z")
    looked.abnormal_tasks = schema.empty_abnormal_tasks()
    assert store.append(looked)[-1] == history_dir / "abnormal_tasks" / DAY / "r2.parquet"
    assert pq.read_metadata(history_dir / "abnormal_tasks" / DAY / "r2.parquet").num_rows == 0
    assert store.listed_runs()["run_id"].tolist() == ["r1", "r2"]


def test_a_collection_without_scopes_or_tasks_is_stored(history_dir):
    """Any object with stats, errors, run_id and collected_at is a collection (scopes and
    abnormal_tasks are optional)."""
    import types

    run = make_run("r1", "2024-05-01T10:00Z")
    bare = types.SimpleNamespace(stats=run.stats, errors=run.errors, run_id="r1", collected_at=run.collected_at)
    written = HistoryStore(history_dir).append(bare)
    assert written == [history_dir / "stats" / DAY / "r1.parquet"]
    assert files_under(history_dir / "scopes") == [] and files_under(history_dir / "abnormal_tasks") == []
    pd.testing.assert_frame_equal(HistoryStore(history_dir).load(), sorted_rows(run.stats))


@pytest.mark.parametrize("table", ["errors", "scopes", "abnormal_tasks"])
def test_rows_of_every_table_must_belong_to_the_run_and_its_day(history_dir, table):
    def run_with(rows_run_id, rows_at):
        run = make_run("r1", "2024-05-01T10:00Z")
        if table == "errors":
            run.errors = make_run(rows_run_id, rows_at, errors=[("i9", 500)]).errors
        elif table == "scopes":
            run.scopes = scope_rows(rows_run_id, rows_at)
        else:
            run.abnormal_tasks = task_rows(rows_run_id, rows_at)
        return run

    store = HistoryStore(history_dir)
    with pytest.raises(ConfigError, match=f"^cannot store run r1: its {table} rows carry another run_id"):
        store.append(run_with("r2", "2024-05-01T10:00Z"))
    with pytest.raises(ConfigError, match=(
            f"^cannot store run r1: {table} rows have collected_at outside 2024-05-01, "
            "the UTC day of the run's collected_at")):
        store.append(run_with("r1", "2024-05-02T10:00Z"))
    assert [f for f in files_under(history_dir) if f.endswith(".parquet")] == []   # nothing half-stored
    store.append(run_with("r1", "2024-05-01T10:00Z"))   # the same rows of the right run and day are fine
    assert store.load(table=table)["run_id"].tolist() == ["r1"]


def test_a_bad_collected_at_is_named(history_dir):
    run = make_run("r1", "2024-05-01T10:00Z")
    run.collected_at = "not a time"
    with pytest.raises(ConfigError, match=r"^collected_at='not a time' is not a date or time"):
        HistoryStore(history_dir).append(run)


def test_appending_to_a_compacted_day_checks_every_merged_file_and_says_nothing(history_dir):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    store.compact(before="2024-05-02")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a healthy history: not one warning
        store.append(make_run("r3", "2024-05-01T12:00:00.1234567Z"))
        assert HistoryStore(history_dir).load()["run_id"].unique().tolist() == ["r1", "r2", "r3"]
        with pytest.raises(ConfigError, match="^run r1 of 2024-05-01 is already in the stats history"):
            HistoryStore(history_dir).append(make_run("r1", "2024-05-01T10:00Z"))


def test_appending_beside_a_damaged_merged_file_says_so_and_stores_the_run(history_dir):
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    damaged = history_dir / "stats" / DAY / "compacted-r7-r8-0123456789ab.parquet"
    damaged.write_bytes(b"PAR1 not really")
    with pytest.warns(HistoryWarning, match=f"skipped the history file {damaged}"):
        store.append(make_run("r2", "2024-05-01T11:00Z"))
    assert (history_dir / "stats" / DAY / "r2.parquet").exists()


def test_a_run_id_taken_between_the_check_and_the_write_is_refused(history_dir, monkeypatch):
    """Two writers of one run id at once: the second finds the name free, then the first links
    its file; the second's link fails and nothing is overwritten."""
    from roma_analytics.history_backend import LocalBackend

    target = history_dir / "stats" / DAY / "r1.parquet"
    real_exists = LocalBackend.file_exists
    other = HistoryStore(history_dir)
    raced = []

    def first_writer_wins(self, path):
        found = real_exists(self, path)
        if Path(path) == target and not raced:
            raced.append(path)
            other.append(make_run("r1", "2024-05-01T10:00Z", instances=("i7",)))   # just after the check
        return found

    HistoryStore(history_dir).append(make_run("r0", "2024-05-01T09:00Z"))
    monkeypatch.setattr(LocalBackend, "file_exists", first_writer_wins)
    with pytest.raises(ConfigError) as raised:
        HistoryStore(history_dir).append(make_run("r1", "2024-05-01T10:00Z"))
    assert str(raised.value) == (f"run r1 is already in the stats history ({target}); "
                                 "run ids must be unique, refusing to overwrite")
    monkeypatch.undo()
    assert set(HistoryStore(history_dir).load(instances=["i7"])["run_id"]) == {"r1"}   # the first writer's
    assert HistoryStore(history_dir).load(instances=["i1"])["run_id"].unique().tolist() == ["r0"]


# ------------------------------------------------------------------------------------ compact: what is merged, what is left

def run_with_rows(run_id, at, rows):
    """make_run's run with only its first ``rows`` stats rows (0 to 4)."""
    run = make_run(run_id, at)
    run.stats = run.stats.iloc[:rows].reset_index(drop=True)
    return run


def merge_aside(store, history_dir, runs, aside):
    """Append ``runs`` (of 2024-05-01), compact the day and move its merged stats file into the
    folder ``aside``; return the moved file's path."""
    for run in runs:
        store.append(run)
    store.compact(before="2024-05-02")
    (merged,) = (history_dir / "stats" / DAY).glob("compacted-*.parquet")
    aside.mkdir(exist_ok=True)
    return Path(shutil.move(merged, aside / merged.name))


@pytest.mark.parametrize("sizes", [(4, 4, 4), (0, 1, 0)])
def test_merged_files_sharing_a_run_merge_into_one_with_its_rows_once(history_dir, tmp_path, sizes):
    """Two merged files of one day that share a run (r2), as compactions that listed the day at
    different moments leave them on an object store: appends check both, and the next
    compaction writes each row once."""
    store = HistoryStore(history_dir)
    runs = [run_with_rows(f"r{n}", f"2024-05-01T1{n}:00Z", rows) for n, rows in enumerate(sizes, start=1)]
    merged = [merge_aside(store, history_dir, runs[:2], tmp_path / "aside"),
              merge_aside(store, history_dir, runs[1:], tmp_path / "aside")]
    day = history_dir / "stats" / DAY
    for path in merged:
        shutil.move(path, day / path.name)
    with pytest.raises(ConfigError, match="^run r1 of 2024-05-01 is already"):   # in the first file only
        store.append(runs[0])
    expected = sorted_rows(pd.concat([run.stats for run in runs], ignore_index=True))
    report = store.compact(before="2024-05-02")
    assert (report.days, report.files_merged, report.rows, report.left_in_place) == (1, 2, sum(sizes), ())
    (merged,) = day.iterdir()
    on_disk = schema.conform(pq.read_table(merged).to_pandas(), "stats")
    pd.testing.assert_frame_equal(sorted_rows(on_disk), expected)
    pd.testing.assert_frame_equal(store.load(), expected)
    assert store.runs()["run_id"].tolist() == ["r1", "r2", "r3"]


def test_a_row_held_twice_by_one_run_stays_twice_through_compaction(history_dir):
    """Only copies of a run read from two files count once; compaction never drops a row of a
    single file (what the run stored is what is read, before and after)."""
    store = HistoryStore(history_dir)
    twice = make_run("r1", "2024-05-01T10:00Z")
    twice.stats = pd.concat([twice.stats, twice.stats.iloc[:1]], ignore_index=True)
    store.append(twice)
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    before = store.load()
    assert len(before) == 5 + 4
    assert store.compact(before="2024-05-02").rows == 5 + 4
    pd.testing.assert_frame_equal(store.load(), before)


def test_two_merged_files_with_the_same_runs_become_one(history_dir):
    """Two compactions of one day at once (object store) leave two merged files holding the same
    runs; the next compaction replaces both by one, without a row twice."""
    store = HistoryStore(history_dir)
    store.append(make_run("r1", "2024-05-01T10:00Z"))
    store.append(make_run("r2", "2024-05-01T11:00Z"))
    store.compact(before="2024-05-02")
    day = history_dir / "stats" / DAY
    (merged,) = day.iterdir()
    shutil.copy(merged, day / "compacted-copy.parquet")
    before = store.load()
    report = store.compact(before="2024-05-02")
    assert (report.days, report.files_merged, report.rows, report.left_in_place) == (1, 2, 8, ())
    assert len(list(day.iterdir())) == 1
    pd.testing.assert_frame_equal(store.load(), before)


def write_nanosecond_file(path, run_id, at):
    """make_run's stats rows as another writer may store them: times in nanoseconds (789 ns past
    ``at``), finer than the microseconds of the contract."""
    rows = make_run(run_id, at).stats
    arrow = pa.Table.from_pandas(rows, preserve_index=False)
    stamp = (pd.Timestamp(at) + pd.Timedelta(nanoseconds=789)).value
    arrow = arrow.set_column(0, "collected_at", pa.array([stamp] * len(rows), pa.timestamp("ns", tz="UTC")))
    pq.write_table(arrow, path, version="2.6")


def test_compact_leaves_files_it_cannot_merge_without_loss_and_names_them(history_dir):
    store = HistoryStore(history_dir)
    days = {n: history_dir / "stats" / f"date=2024-05-0{n}" for n in (1, 2, 3)}
    # 05-01: a file with nanosecond times (the first by name) beside two runs that merge
    for n in (1, 2):
        store.append(make_run(f"r{n}", f"2024-05-01T1{n}:00Z"))
    write_nanosecond_file(days[1] / "r0.parquet", "r0", "2024-05-01T09:00Z")
    # 05-02: one run and a file with nanosecond times: nothing to merge the run with
    store.append(make_run("r3", "2024-05-02T10:00Z"))
    write_nanosecond_file(days[2] / "r4.parquet", "r4", "2024-05-02T11:00Z")
    # 05-03: a damaged file and one with nanosecond times: nothing to merge the second one with
    days[3].mkdir()
    (days[3] / "r5.parquet").write_bytes(b"not a parquet file")
    write_nanosecond_file(days[3] / "r6.parquet", "r6", "2024-05-03T10:00Z")
    kept = {path: path.read_bytes() for path in (days[1] / "r0.parquet", *days[2].iterdir(), *days[3].iterdir())}
    with pytest.warns(HistoryWarning):
        report = store.compact(before="2024-05-04")
    assert (report.days, report.files_merged, report.rows) == (1, 2, 8)
    named = {path.name: [m for m in report.left_in_place if str(path) in m] for path in kept}
    assert [len(named[name]) for name in ("r0.parquet", "r3.parquet", "r4.parquet", "r5.parquet", "r6.parquet")] \
        == [1, 0, 1, 1, 0]
    for name in ("r0.parquet", "r4.parquet"):
        assert "not merged" in named[name][0] and "cannot be merged without loss" in named[name][0]
    assert "not a readable Parquet file" in named["r5.parquet"][0]
    assert len(report.left_in_place) == 3
    assert {path: path.read_bytes() for path in kept} == kept   # each left exactly as it was
    assert [p.name.startswith("compacted-r1-r2-") for p in sorted(days[1].iterdir())] == [True, False]


def test_compact_leaves_files_holding_another_days_rows_and_names_them(history_dir):
    store = HistoryStore(history_dir)
    for n in (1, 2):
        store.append(make_run(f"r{n}", f"2024-05-01T1{n}:00Z"))
    store.append(make_run("r8", "2024-05-04T10:00Z"))
    store.append(make_run("r9", "2024-05-02T10:00Z"))
    stats = history_dir / "stats"
    (stats / "date=2024-05-03").mkdir()
    # Moved by hand into the wrong day's folder: one among other files, one alone (their own
    # folders are left empty).
    among = Path(shutil.move(stats / "date=2024-05-02" / "r9.parquet", stats / DAY / "r9.parquet"))
    alone = Path(shutil.move(stats / "date=2024-05-04" / "r8.parquet", stats / "date=2024-05-03" / "r8.parquet"))
    with pytest.warns(HistoryWarning):
        report = store.compact(before="2024-05-05")
    assert (report.days, report.files_merged, report.rows) == (1, 2, 8)
    assert len(report.left_in_place) == 2
    for path, day in ((among, "2024-05-02"), (alone, "2024-05-04")):
        (message,) = [m for m in report.left_in_place if str(path) in m]
        assert "not merged" in message and f"holds rows of {day}, not of its folder's day" in message
        assert path.exists()


def test_a_merged_files_name_gives_its_first_and_last_run_and_a_hash_of_what_it_replaces(history_dir):
    """compacted-<first>-<last>-<hash>.parquet (HistoryStore.compact): run ids cut to 40
    characters, the hash the first 12 hex digits of the SHA-256 of the replaced files' names."""
    store = HistoryStore(history_dir)
    longest = ["20240501T100000Z-" + "a" * 111, "20240501T110000Z-" + "b" * 111]   # 128 characters, the most
    for run_id, at in ((longest[1], "2024-05-01T11:00Z"), ("r-mid", "2024-05-01T10:30Z"),
                       (longest[0], "2024-05-01T10:00Z")):
        store.append(make_run(run_id, at))
    store.compact(before="2024-05-02")
    replaced = "\n".join(sorted(f"{run_id}.parquet" for run_id in (*longest, "r-mid")))
    digest = hashlib.sha256(replaced.encode()).hexdigest()[:12]
    assert [p.name for p in (history_dir / "stats" / DAY).iterdir()] == [
        f"compacted-{longest[0][:40]}-{longest[1][:40]}-{digest}.parquet"]
    assert store.runs()["run_id"].tolist() == [longest[0], "r-mid", longest[1]]


def test_files_listing_no_runs_are_merged_under_their_file_names(history_dir):
    """Files another tool wrote into a day (Spark's part files, say) list no runs in their
    metadata: the merged file is named after the first and last of their names."""
    store = HistoryStore(history_dir)
    store.append(make_run("r-other-day", "2024-05-02T10:00Z"))
    day = history_dir / "stats" / DAY
    day.mkdir()
    names = [f"part-0000{n}-5f2b7a0e-1c2d-4e5f-8a9b-0c1d2e3f4a5b-c000.snappy.parquet" for n in range(3)]
    runs = [make_run(f"r{n}", f"2024-05-01T1{n}:00Z") for n in range(3)]
    for name, run in zip(names, runs):
        pq.write_table(pa.Table.from_pandas(run.stats, schema=arrow_schema("stats"), preserve_index=False),
                       day / name)
    report = store.compact(before="2024-05-02")
    assert (report.files_merged, report.rows) == (3, 12)
    stems = [name[: -len(".parquet")] for name in names]
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    assert [p.name for p in day.iterdir()] == [f"compacted-{stems[0][:40]}-{stems[2][:40]}-{digest}.parquet"]
    pd.testing.assert_frame_equal(store.load(until="2024-05-02"),
                                  sorted_rows(pd.concat([run.stats for run in runs], ignore_index=True)))


def test_compact_removes_the_temporaries_of_killed_rollup_writers(history_dir):
    store = HistoryStore(history_dir)
    build_days(store, days=1)
    leftovers = []
    for table in rollups.TABLES:
        folder = history_dir / table / DAY
        folder.mkdir(parents=True, exist_ok=True)
        leftovers.append(folder / f".{rollups.PREFIX}0123456789ab.parquet.tmp-1-abcd")
        leftovers[-1].write_bytes(b"half a rollup")
    store.compact(before="2024-05-02")
    assert [path.exists() for path in leftovers] == [False] * len(leftovers)
