"""export_table: CSV and Parquet exports of the history, filters, CSV-injection safety, atomicity."""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from unprivileged import as_unprivileged

from roma_analytics import schema
from roma_analytics.collect import Collection
from roma_analytics.errors import ConfigError, NothingMatched, RomaError
from roma_analytics.export import WRITERS, ExportReport, export_table
from roma_analytics.store import HistoryStore


def stats_rows(run_id, at, rows):
    """rows: (project, instance, instance_name, task_type, running, abnormal, terminated, completed)."""
    frame = pd.DataFrame(rows, columns=["project_id", "instance_id", "instance_name", "task_type",
                                        "running", "abnormal", "terminated", "completed"])
    frame["total"] = frame[["running", "abnormal", "terminated", "completed"]].sum(axis=1)
    frame["collected_at"] = pd.Timestamp(at)
    frame["run_id"] = run_id
    frame["region"] = "cn-north-4"
    return schema.conform(frame, "stats")


@pytest.fixture
def store(history_dir):
    store = HistoryStore(history_dir)
    store.append(Collection(
        stats_rows("r1", "2024-05-01T10:00:00Z", [
            ("p1", "i1", "=1+1", "common", 5, 1, 0, 4),
            ("p1", "i1", "=1+1", "cdc", 2, 0, 1, 0),
            ("p2", "i2", "@SUM(A1:A9)", "common", 0, 0, 0, 0),
        ]),
        schema.conform(pd.DataFrame({
            "collected_at": [pd.Timestamp("2024-05-01T10:00:00Z")] * 2, "run_id": ["r1", "r1"],
            "region": ["cn-north-4"] * 2, "project_id": ["p1", "p2"], "instance_id": ["i3", "i4"],
            "http_status": [404, None], "error_code": ["FDI.3081", "TIMEOUT"],
            "error_msg": ["-2+3 does not exist", "\tread timed out"], "request_id": ["req-9", None],
            "attempts": [1, 4],
        }), "errors"),
        "r1", pd.Timestamp("2024-05-01T10:00:00Z")))
    store.append(Collection(
        stats_rows("r2", "2024-05-02T08:30:00Z", [
            ("p1", "i1", "+cmd|' /C calc'!A0", "common", 6, 2, 0, 4),
            ("p2", "i2", "plain name", "cdc", 1, 1, 1, 1),
            ("p2", "i5", None, "common", 7, 0, 0, 0),
        ]),
        schema.empty_errors(), "r2", pd.Timestamp("2024-05-02T08:30:00Z")))
    return store


def read_csv_cells(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


def test_csv_header_times_and_numbers(store, tmp_path):
    out = tmp_path / "stats.csv"
    report = export_table(store, out)
    assert report == ExportReport(rows=6, path=out)
    cells = read_csv_cells(out)
    assert cells[0] == list(schema.STATS_COLUMNS)
    assert len(cells) == 1 + 6
    first = dict(zip(cells[0], cells[1]))
    assert first["collected_at"] == "2024-05-01T10:00:00Z"
    # sorted by time then series: p1/i1 cdc comes before p1/i1 common
    assert (first["instance_id"], first["task_type"]) == ("i1", "cdc")
    # counts are plain numbers: running 2 + abnormal 0 + terminated 1 + completed 0 = 3
    assert [first[c] for c in ("running", "abnormal", "terminated", "completed", "total")] == ["2", "0", "1", "0", "3"]
    back = pd.read_csv(out)
    for column in (*schema.COUNT_COLUMNS, "total"):
        assert back[column].dtype == "int64"
    assert back["total"].tolist() == [3, 10, 0, 12, 4, 7]


def test_csv_neutralises_formula_cells(store, tmp_path):
    out = tmp_path / "stats.csv"
    export_table(store, out)
    names = [row[5] for row in read_csv_cells(out)[1:]]
    assert names == ["'=1+1", "'=1+1", "'@SUM(A1:A9)", "'+cmd|' /C calc'!A0", "plain name", ""]
    errors_out = tmp_path / "errors.csv"
    assert export_table(store, errors_out, table="errors").rows == 2
    cells = read_csv_cells(errors_out)
    rows = [dict(zip(cells[0], row)) for row in cells[1:]]
    assert [r["error_msg"] for r in rows] == ["'-2+3 does not exist", "'\tread timed out"]
    assert [r["http_status"] for r in rows] == ["404", ""]  # nullable int: a number or empty
    assert [r["attempts"] for r in rows] == ["1", "4"]
    assert [r["request_id"] for r in rows] == ["req-9", ""]


def test_csv_keeps_sub_second_times(history_dir, tmp_path):
    store = HistoryStore(history_dir)
    at = pd.Timestamp("2024-05-01T10:00:00.25Z")
    store.append(Collection(stats_rows("r1", at, [("p1", "i1", "n", "cdc", 1, 0, 0, 0)]),
                                schema.empty_errors(), "r1", at))
    export_table(store, tmp_path / "s.csv")
    assert read_csv_cells(tmp_path / "s.csv")[1][0] == "2024-05-01T10:00:00.250000Z"


def test_export_filters(store, tmp_path):
    out = tmp_path / "x.csv"
    assert export_table(store, out, since="2024-05-02").rows == 3
    assert export_table(store, out, until="2024-05-02").rows == 3
    assert export_table(store, out, since="2024-05-01T10:00:00", until="2024-05-01T10:00:01").rows == 3
    assert export_table(store, out, projects=["p2"]).rows == 3
    report = export_table(store, out, projects="p1", instances=["i1"], since="2024-05-02")
    assert report.rows == 1
    rows = read_csv_cells(out)
    assert len(rows) == 2 and rows[1][1] == "r2" and rows[1][4] == "i1"
    with pytest.raises(NothingMatched, match="instance nope"):
        export_table(store, out, instances=["nope"])
    assert read_csv_cells(out) == rows  # nothing matched: the previous export is left as it was
    # p1's errors on May 2nd: none, but p1 has stats rows then, so a valid header-only file
    assert export_table(store, out, table="errors", projects=["p1"], since="2024-05-02").rows == 0
    assert read_csv_cells(out) == [list(schema.ERRORS_COLUMNS)]


def test_parquet_export_keeps_schema_and_metadata(store, tmp_path):
    out = tmp_path / "stats.parquet"
    report = export_table(str(store.path), out, format="parquet", projects=["p2"])
    assert report.rows == 3
    file_schema = pq.read_schema(out)
    assert file_schema.names == list(schema.STATS_COLUMNS)
    assert file_schema.metadata[b"roma_analytics.schema_version"] == str(schema.SCHEMA_VERSION).encode()
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(schema.conform(back), store.load(projects=["p2"]))
    assert back["instance_name"].isna().tolist() == [False, False, True]
    errors_out = tmp_path / "errors.parquet"
    export_table(store, errors_out, format="parquet", table="errors")
    errors = schema.conform(pd.read_parquet(errors_out), "errors")
    assert errors["http_status"].tolist()[0] == 404 and errors["http_status"].isna().tolist() == [False, True]


def test_export_of_an_empty_history(tmp_path):
    out = tmp_path / "empty.parquet"
    with pytest.raises(NothingMatched, match="has no row"):  # an empty export is not a success
        export_table(tmp_path / "no-history", out, format="parquet")
    assert not out.exists()


def test_bad_targets_are_clear_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        export_table(store, tmp_path / "missing" / "x.csv")
    with pytest.raises(ConfigError, match="is a directory"):
        export_table(store, tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        export_table(store, a_file / "x.csv")
    with pytest.raises(ConfigError, match="unknown export format"):
        export_table(store, tmp_path / "x.xlsx", format="xlsx")
    with pytest.raises(ConfigError, match="unknown table"):
        export_table(store, tmp_path / "x.csv", table="metrics")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "history"]


@pytest.fixture
def shared_dir():
    """A folder every user may traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="roma-export-"))
    path.chmod(0o755)
    yield path
    for folder in path.rglob("*"):
        if folder.is_dir():
            folder.chmod(0o755)
    shutil.rmtree(path)


def test_read_only_directory_is_a_clear_error_and_leaves_nothing(store, shared_dir):
    history = shared_dir / "history"
    shutil.copytree(store.path, history)
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    error, message = as_unprivileged(lambda: export_table(history, locked / "stats.csv"))
    assert error == "ConfigError" and "permission denied" in message, message
    assert list(locked.iterdir()) == []
    # the same user can export to a writable place: the failure was the directory, not the history
    writable = shared_dir / "open"
    writable.mkdir()
    writable.chmod(0o777)
    assert as_unprivileged(lambda: export_table(history, writable / "stats.csv")) == (None, "")
    assert len(read_csv_cells(writable / "stats.csv")) == 7


def test_failure_while_writing_leaves_the_old_file_and_no_temp(store, tmp_path, monkeypatch):
    out = tmp_path / "out" / "stats.csv"
    out.parent.mkdir()
    export_table(store, out)
    before = out.read_bytes()

    def broken_writer(frame, table, file):
        file.write(b"collected_at,run_id\n2024-05-01")  # half a file, then the disk "fails"
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(WRITERS, "broken", broken_writer)
    with pytest.raises(RomaError, match="No space left"):
        export_table(store, out, format="broken")
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["stats.csv"]


def test_export_replaces_an_existing_file_completely(store, tmp_path):
    out = tmp_path / "stats.csv"
    out.write_text("old content that is much longer than nothing\n" * 100)
    export_table(store, out, projects=["p1"])
    text = out.read_text()
    assert "old content" not in text
    assert len(list(csv.reader(io.StringIO(text)))) == 1 + 3
