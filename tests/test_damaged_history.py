"""A history with damaged, foreign, newer, copied or misplaced files: real files on disk.

Every reader (load, runs, files, the DuckDB trend/cdc_vs_common, compact, append's duplicate
check) must go on with the rest of the history, say once which file is wrong and what to do, and
neither lose nor invent a row; compact must never rewrite such a file into a lossy form.  The
expected rows are those of the runs built here (``make_run``), minus the damaged file's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

if __package__:  # `python -m tests.test_damaged_history` (regenerates the docs): find test_store
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_tables import Kind, Row, check_published, regenerate  # noqa: E402
from test_store import make_run, sorted_rows  # noqa: E402

from roma_analytics import analysis, schema
from roma_analytics.errors import HistoryWarning
from roma_analytics.store import HistoryStore

RUNS = {  # run id -> time; r1..r3 on May 1st, r4 on May 2nd
    "r1": "2024-05-01T10:00:00Z",
    "r2": "2024-05-01T11:00:00Z",
    "r3": "2024-05-01T12:00:00Z",
    "r4": "2024-05-02T10:00:00Z",
}


@pytest.fixture
def history(history_dir):
    store = HistoryStore(history_dir)
    for run_id, at in RUNS.items():
        store.append(make_run(run_id, at, errors=[("i9", 404)]))
    return history_dir


def run_file(history_dir: Path, run_id: str, table: str = "stats") -> Path:
    day = RUNS[run_id][:10]
    return history_dir / table / f"date={day}" / f"{run_id}.parquet"


def expected_stats(*run_ids) -> pd.DataFrame:
    frames = [make_run(run_id, RUNS[run_id]).stats for run_id in run_ids]
    return sorted_rows(pd.concat(frames, ignore_index=True))


def rewrite(path: Path, transform=lambda table: table, metadata: dict | None = None, keep_metadata=True) -> None:
    """Rewrite ``path`` as another writer would: ``transform`` the Arrow table, set metadata."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {}) if keep_metadata else {}
    meta.update(metadata or {})
    table = transform(table.replace_schema_metadata(None))
    pq.write_table(table.replace_schema_metadata(meta or None), path)


def with_column(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def damage_data_page(path: Path) -> None:
    """Overwrite the compressed data of one column chunk; the footer stays valid."""
    meta = pq.read_metadata(path)
    column = meta.row_group(0).column(meta.schema.names.index("running"))
    raw = bytearray(path.read_bytes())
    start = column.data_page_offset
    raw[start + 8:start + column.total_compressed_size] = b"\xff" * (column.total_compressed_size - 8)
    path.write_bytes(bytes(raw))


def history_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, HistoryWarning)]


def all_reads(store: HistoryStore) -> dict:
    """What every read path returns (the warnings are collected by the caller)."""
    return {
        "load": store.load(),
        "errors": store.load(table="errors"),
        "runs": store.runs(),
        "files": store.files(),
        "trend": store.trend("1D", by=("instance_id",)),
        "cdc": store.cdc_vs_common("1h"),
    }


def assert_reads_equal_runs(reads: dict, run_ids, error_runs=tuple(RUNS)) -> None:
    """Exactly the stats rows of ``run_ids`` and the errors rows of ``error_runs`` (one each)."""
    stats = expected_stats(*run_ids)
    pd.testing.assert_frame_equal(reads["load"], stats)
    assert sorted(reads["errors"]["run_id"]) == sorted(error_runs)
    listed = sorted(set(run_ids) | set(error_runs), key=lambda r: RUNS[r])
    assert list(reads["runs"]["run_id"]) == listed
    assert reads["runs"]["stats_rows"].tolist() == [4 if r in run_ids else 0 for r in listed]
    assert reads["runs"]["error_rows"].tolist() == [1 if r in error_runs else 0 for r in listed]
    pd.testing.assert_frame_equal(reads["trend"], analysis.trend(stats, "1D", by=("instance_id",)))
    pd.testing.assert_frame_equal(reads["cdc"], analysis.cdc_vs_common(stats, "1h"))


# ------------------------------------------------------------------------------ the matrix

def damage_compacted(history_dir: Path) -> Path:
    HistoryStore(history_dir).compact(before="2024-05-02")
    (compacted,) = (history_dir / "stats" / "date=2024-05-01").glob("compacted-*.parquet")
    compacted.write_bytes(compacted.read_bytes()[:100])
    return compacted


def rewritten(run_id: str, transform=lambda table: table, metadata=None, keep_metadata=True):
    def damage(history_dir: Path) -> Path:
        path = run_file(history_dir, run_id)
        rewrite(path, transform, metadata, keep_metadata)
        return path
    return damage


def bytes_of(run_id: str, change) -> Callable[[Path], Path]:
    def damage(history_dir: Path) -> Path:
        path = run_file(history_dir, run_id)
        path.write_bytes(change(path.read_bytes()) if callable(change) else change)
        return path
    return damage


def copied(run_id: str, name: str, folder: str | None = None, keep_metadata=True, move=False):
    def damage(history_dir: Path) -> Path:
        original = run_file(history_dir, run_id)
        target = (original.parent if folder is None else history_dir / "stats" / folder) / name
        shutil.copy(original, target)
        if move:
            original.unlink()
        if not keep_metadata:
            rewrite(target, keep_metadata=False)
        return target
    return damage


def retimed(run_id: str, unit: str, tz: str | None, extra_ns: int = 0):
    def transform(table):
        values = pa.array([pd.Timestamp(RUNS[run_id]).value + extra_ns] * table.num_rows, pa.int64())
        times = values.cast(pa.timestamp("ns", tz="UTC")).cast(pa.timestamp(unit, tz="UTC"), safe=not extra_ns)
        if tz is None:
            times = times.cast(pa.int64()).cast(pa.timestamp(unit))
        elif tz != "UTC":
            times = times.cast(pa.timestamp(unit, tz=tz))
        if extra_ns:
            times = values.cast(pa.timestamp("ns", tz="UTC"))
        return with_column(table, "collected_at", times)
    return rewritten(run_id, transform, keep_metadata=False)


def stats_file_in_errors_place(history_dir: Path) -> Path:
    target = run_file(history_dir, "r2").with_name("r2-errors.parquet")
    shutil.copy(run_file(history_dir, "r2", "errors"), target)
    return target


@dataclass(frozen=True)
class HistoryFault:
    name: str            # what is wrong with the file
    damage: Callable     # history folder -> the file it damaged, copied or wrote
    readers: str         # "skipped" | "read" | "read once" | "read, misplaced"
    compact: str         # "left in place" | "merged"
    lost: tuple = ()     # runs whose stats rows are no longer readable
    hint: str = ""       # what the warning must say
    runs_known: bool = True  # whether the lost runs can be told (a run file's name or run list)

    @property
    def said(self) -> str:
        return {"skipped": "skipped, one warning naming it and what to do",
                "read": "read, cast to the contract, no warning",
                "read once": "each run read once; one warning: the copy is named",
                "read, misplaced": "read by its rows' own time; one warning says where it belongs"}[self.readers]


FLOAT, TEXT = pa.float64(), pa.string()
HISTORY_FAULTS: tuple[HistoryFault, ...] = (
    HistoryFault("not Parquet at all (text)", bytes_of("r2", b"this is not parquet"), "skipped", "left in place",
                 ("r2",), "not a readable Parquet file"),
    HistoryFault("empty (0 bytes)", bytes_of("r2", b""), "skipped", "left in place", ("r2",), "not a readable"),
    HistoryFault("truncated to half its size", bytes_of("r2", lambda raw: raw[: len(raw) // 2]), "skipped",
                 "left in place", ("r2",), "not a readable"),
    HistoryFault("a damaged data page (the footer is intact)", lambda h: (damage_data_page(run_file(h, "r2")),
                                                                          run_file(h, "r2"))[1],
                 "skipped", "left in place", ("r2",), "cannot be read"),
    HistoryFault("a damaged `compacted-*.parquet`", damage_compacted, "skipped", "left in place", ("r1", "r2", "r3"),
                 "not a readable", runs_known=False),
    HistoryFault("a newer `schema_version` (and a new column)", rewritten(
        "r2", lambda t: t.append_column("pending", pa.array([7] * t.num_rows, pa.int64())),
        {b"roma_analytics.schema_version": str(schema.SCHEMA_VERSION + 1).encode()}),
        "skipped", "left in place", ("r2",), "upgrade roma-analytics"),
    HistoryFault("a column missing", rewritten("r2", lambda t: t.drop_columns(["abnormal"])), "skipped",
                 "left in place", ("r2",), "lacks the stats column(s) abnormal"),
    HistoryFault("a column renamed", rewritten("r2", lambda t: t.rename_columns(
        ["aborted" if n == "abnormal" else n for n in t.column_names])), "skipped", "left in place", ("r2",),
        "lacks the stats column(s) abnormal"),
    HistoryFault("counts as floating point", rewritten("r2", lambda t: with_column(
        t, "total", pc.cast(t.column("total"), FLOAT))), "skipped", "left in place", ("r2",), "total is double"),
    HistoryFault("counts as text", rewritten("r2", lambda t: with_column(
        t, "running", pc.cast(t.column("running"), TEXT))), "skipped", "left in place", ("r2",), "running is string"),
    HistoryFault("null counts", rewritten("r2", lambda t: with_column(
        t, "completed", pa.array([None] * t.num_rows, pa.int64()))), "skipped", "left in place", ("r2",), "null"),
    HistoryFault("the errors table in the stats folder", stats_file_in_errors_place, "skipped", "left in place",
                 (), "holds the errors table"),
    HistoryFault("an extra column (another writer)", rewritten(
        "r2", lambda t: t.append_column("tenant", pa.array(["t1"] * t.num_rows)), keep_metadata=False),
        "read", "left in place"),
    HistoryFault("`timestamp[ns, UTC]` (another writer)", retimed("r1", "ns", "UTC"), "read", "merged"),
    HistoryFault("`timestamp[ms, UTC]`", retimed("r2", "ms", "UTC"), "read", "merged"),
    HistoryFault("naive `timestamp[us]` (read as UTC)", retimed("r1", "us", None), "read", "merged"),
    HistoryFault("naive `timestamp[ns]`", retimed("r2", "ns", None), "read", "merged"),
    HistoryFault("`timestamp[s, +08:00]`", retimed("r1", "s", "+08:00"), "read", "merged"),
    HistoryFault("`timestamp[ns]` finer than a microsecond (cut when read)", retimed("r2", "ns", "UTC", 789),
                 "read", "left in place"),
    HistoryFault("no roma-analytics metadata, the contract's columns", rewritten("r2", keep_metadata=False),
                 "read", "merged"),
    HistoryFault("a run copied under another name", copied("r2", "r2 (copy).parquet"), "read once",
                 "left in place", (), "it is a copy"),
    HistoryFault("a run copied by another writer (no run list)", copied("r3", "part-0000.parquet",
                                                                        keep_metadata=False),
                 "read once", "left in place", (), "it is a copy"),
    HistoryFault("a run copied into another `date=` folder", copied("r2", "r2.parquet", "date=2024-05-02"),
                 "read once", "left in place", (), "it is a copy"),
    HistoryFault("a run moved into another `date=` folder", copied("r4", "r4.parquet", "date=2024-05-01", move=True),
                 "read, misplaced", "left in place", (), "move it into"),
)


@pytest.mark.parametrize("fault", HISTORY_FAULTS, ids=[fault.name for fault in HISTORY_FAULTS])
def test_history_fault_matrix(history, fault):
    path = fault.damage(history)
    content = path.read_bytes()
    readable = [run for run in RUNS if run not in fault.lost]
    # A run is read whole or not at all: its errors rows go with its unreadable stats file
    # (when the file tells which runs it held: a merged file's name does not).
    error_runs = readable if fault.runs_known else list(RUNS)
    store = HistoryStore(history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reads = all_reads(store)
        again = all_reads(store)  # a dashboard or `collect --every` reads again and again
    said = history_warnings(caught)
    for result in (reads, again):
        assert_reads_equal_runs(result, readable, error_runs)
    assert path.read_bytes() == content, "a reader modified the file"
    if fault.readers == "read":
        assert said == []
        assert path in reads["files"]
    else:
        assert len(said) == 1, said
        assert str(path) in said[0] and fault.hint in said[0], said
        assert (path in reads["files"]) == (fault.readers == "read, misplaced")
    if fault.readers == "skipped":
        assert "To fix: " in said[0]
        if fault.lost and "upgrade" not in fault.hint:
            assert f"move it out of the history (e.g. into {history / '.quarantine'}/)" in said[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = HistoryStore(history).compact(before="2024-05-03")
    if fault.compact == "merged":
        assert not path.exists() and report.left_in_place == ()
    else:
        assert path.read_bytes() == content, "compact rewrote a file it cannot merge without loss"
        assert [m for m in report.left_in_place if str(path) in m], report.left_in_place
        assert [m for m in history_warnings(caught) if str(path) in m]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_reads_equal_runs(all_reads(HistoryStore(history)), readable, error_runs)
    for merged in (history / "stats").glob("date=*/compacted-*.parquet"):  # never into the wrong day
        if merged != path:
            days = pq.read_table(merged).column("collected_at").to_pandas().dt.strftime("%Y-%m-%d")
            assert set(days) == {merged.parent.name[len("date="):]}


PREFIX, MODULE = "history", "test_damaged_history"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def published_kinds() -> tuple[Kind, ...]:
    """What docs/reliability.md publishes: one row per fault of the matrix."""
    rows = tuple(Row(
        slug(fault.name), fault.name,
        f"readers: {fault.said}; `compact`: "
        + ("merged without loss" if fault.compact == "merged" else "left in place, named in its report"),
        (f"{MODULE}::test_history_fault_matrix",),
    ) for fault in HISTORY_FAULTS)
    return (Kind("files", rows),)


def test_reliability_page_publishes_the_history_fault_matrix():
    if os.environ.get("ROMA_REGEN_DOCS"):
        regenerate(PREFIX, published_kinds(), MODULE)
    check_published(PREFIX, published_kinds(), MODULE)


# ------------------------------------------------------------------------- details of the rules

def test_append_next_to_a_damaged_compacted_file(history):
    store = HistoryStore(history)
    store.compact(before="2024-05-02")
    (compacted,) = (history / "stats" / "date=2024-05-01").glob("compacted-*.parquet")
    compacted.write_bytes(b"junk")
    store = HistoryStore(history)
    with pytest.warns(HistoryWarning, match=compacted.name):  # it cannot tell whether r5 is in it
        store.append(make_run("r5", "2024-05-01T13:00:00Z"))  # what collect does, run after run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per store
        assert sorted(set(store.load()["run_id"])) == ["r4", "r5"]


def test_compact_merges_the_files_around_a_damaged_one(history):
    bad = run_file(history, "r2")
    bad.write_bytes(b"PAR1 not really")
    with pytest.warns(HistoryWarning, match="r2.parquet"):
        report = HistoryStore(history).compact(before="2024-05-02")
    assert report.files_merged == 2 + 3  # stats of r1, r3; errors of r1, r2, r3
    assert sorted(p.name for p in bad.parent.iterdir() if not p.name.startswith(".")) == sorted([
        "r2.parquet", next(p.name for p in bad.parent.glob("compacted-*"))])
    merged = next(bad.parent.glob("compacted-*"))
    assert set(pq.read_table(merged).column("run_id").to_pylist()) == {"r1", "r3"}
    assert {run["run_id"] for run in json.loads(pq.read_schema(merged).metadata[b"roma_analytics.runs"])} == {
        "r1", "r3"}


@pytest.mark.parametrize("first", ["r1", "r2"])  # the first file DuckDB reads decides its schema
def test_other_writers_timestamps_in_a_time_bounded_duckdb_read(history, first):
    retimed(first, "ns", None)(history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranged = HistoryStore(history).trend("1h", since="2024-05-01T10:30:00Z", until="2024-05-02")
    pd.testing.assert_frame_equal(ranged, analysis.trend(expected_stats("r2", "r3"), "1h"))


def test_a_copy_in_another_folder_is_not_read_by_that_folders_day(history):
    copied("r2", "r2.parquet", "date=2024-05-02")(history)
    with pytest.warns(HistoryWarning):
        one_day = HistoryStore(history).load(since="2024-05-02", until="2024-05-03")
    # The copy's rows are of May 1st: a read of May 2nd does not get them.
    pd.testing.assert_frame_equal(one_day, expected_stats("r4"))


def test_files_sharing_some_runs_keep_each_row_once(history):
    # Another tool merged r2 and r3 into one file, and a second file holds r1 and r4.
    day = history / "stats" / "date=2024-05-01"
    merged = pa.concat_tables([pq.read_table(run_file(history, r)) for r in ("r2", "r3")])
    run_file(history, "r2").unlink()
    pq.write_table(merged.replace_schema_metadata(None), day / "merged-by-spark.parquet")
    both = pa.concat_tables([pq.read_table(run_file(history, r)) for r in ("r1", "r4")])
    pq.write_table(both.replace_schema_metadata(None), day / "r1-and-more.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r4's rows in May 1st's folder: misplaced, warned about
        reads = all_reads(HistoryStore(history))
    assert_reads_equal_runs(reads, list(RUNS))


def test_history_files_lists_each_run_once_for_external_engines(history):
    copied("r2", "r2 (copy).parquet")(history)
    with pytest.warns(HistoryWarning):
        files = HistoryStore(history).files()
    rows = pa.concat_tables([pq.read_table(path) for path in files]).num_rows
    assert rows == 4 * len(RUNS)


# ------------------------------------------------------- the commands and the dashboard, end to end

def cli(capsys, *argv) -> tuple[int, str, str]:
    from roma_analytics.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def warning_lines(err: str) -> list[str]:
    """The warnings about history files (not, e.g., about a missing token)."""
    return [line for line in err.splitlines()
            if line.startswith("roma-analytics: warning:") and "history file" in line]


def quarantined(history_dir: Path, path: Path) -> None:
    """What the warning tells the user to do."""
    (history_dir / ".quarantine").mkdir(exist_ok=True)
    path.rename(history_dir / ".quarantine" / path.name)


def recent_history(history_dir: Path) -> Path:
    """Three hourly runs ending an hour ago (``check`` judges the recent past)."""
    store = HistoryStore(history_dir)
    now = pd.Timestamp.now(tz="UTC").floor("h")
    for hours in (3, 2, 1):
        store.append(make_run(f"recent-{hours}", now - pd.Timedelta(hours=hours), errors=[("i9", 404)]))
    return history_dir


@pytest.mark.parametrize("command", ["export-csv", "export-parquet", "export-openmetrics", "report", "check", "compact"])
def test_each_command_works_on_a_history_with_one_damaged_file(recent_history_dir, tmp_path, capsys, command):
    history = recent_history_dir
    (bad,) = history.glob("stats/date=*/recent-2.parquet")
    bad.write_bytes(b"\x00" * 64)
    out_file = tmp_path / "out" / "file"
    out_file.parent.mkdir()
    argv = {
        "export-csv": ["export", "--format", "csv", "--out", out_file],
        "export-parquet": ["export", "--format", "parquet", "--out", out_file],
        "export-openmetrics": ["export", "--format", "openmetrics", "--out", out_file],
        "report": ["report", "--out", out_file],
        "check": ["check", "--max-abnormal-ratio", "0.1", "--min-tasks", "1", "--state", tmp_path / "state.json"],
        "compact": ["compact", "--before", (pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=2)).date().isoformat()],
    }[command] + ["--history", history]
    code, out, err = cli(capsys, *argv)
    said = warning_lines(err)
    assert len(said) == 1, err
    assert str(bad) in said[0] and "move it out of the history" in said[0]
    assert "Traceback" not in err
    assert bad.read_bytes() == b"\x00" * 64
    # Doing what the warning says gives the same result, without the warning.
    first = out_file.read_bytes() if out_file.exists() and command != "report" else None
    quarantined(history, bad)
    if command == "check":
        (tmp_path / "state.json").unlink()
    code_after, out_after, err_after = cli(capsys, *argv)
    assert warning_lines(err_after) == [] and code_after == code
    if command == "compact":
        assert code == 0 and "1 file(s) left in place" in out
        return
    assert out.replace(str(bad), "") == out_after.replace(str(bad), "") or command == "report"
    if first is not None and command != "export-parquet":
        assert out_file.read_bytes() == first
    if command == "export-csv":
        exported = pd.read_csv(out_file)
        assert sorted(set(exported["run_id"])) == ["recent-1", "recent-3"] and len(exported) == 8
    if command == "check":
        assert code == 1 and "i2" in out  # i2's abnormal ratio is 1/8


@pytest.fixture
def recent_history_dir(history_dir):
    return recent_history(history_dir)


def test_a_damaged_latest_stats_file_never_makes_instances_look_gone(recent_history_dir, tmp_path, capsys):
    """Its run's errors rows are not read either: the run is unreadable, not a run that found nothing."""
    history = recent_history_dir
    (bad,) = history.glob("stats/date=*/recent-1.parquet")
    bad.write_bytes(b"junk")
    with pytest.warns(HistoryWarning, match="recent-1.parquet"):
        store = HistoryStore(history)
        state = store.fleet_state()
        runs = store.runs()
    assert set(state.series["status"]) == {"ok"}, state.series
    assert list(runs["run_id"]) == ["recent-3", "recent-2"]
    code, out, err = cli(capsys, "check", "--disappeared", "--history", history, "--state", tmp_path / "state.json")
    assert code == 0 and "disappeared" not in out.lower(), (out, err)
    assert len(warning_lines(err)) == 1 and str(bad) in err


@pytest.mark.timeout(120)
def test_collect_every_keeps_collecting_next_to_a_damaged_file(simulator, history_dir):
    import signal
    import subprocess
    import sys

    today = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d")
    day = history_dir / "stats" / f"date={today}"
    day.mkdir(parents=True)
    bad = day / "compacted-a-b-0123456789ab.parquet"
    bad.write_bytes(b"PAR1 damaged by a disk")
    project = simulator.project_ids[0]
    env = {k: v for k, v in __import__("os").environ.items() if k != "ROMA_AUTH_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "roma_analytics", "collect", "--endpoint", simulator.base_url, "--project-id",
         project, "--history", str(history_dir), "--every", "1s", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        summaries = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    said = warning_lines(err)
    assert len(said) == 1 and str(bad) in said[0], err
    with pytest.warns(HistoryWarning, match=bad.name):
        stored = HistoryStore(history_dir).runs()
    assert set(stored["run_id"]) == {summary["run_id"] for summary in summaries}
    assert bad.read_bytes() == b"PAR1 damaged by a disk"


def test_dashboard_loads_a_damaged_history_and_says_which_file(history, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from roma_analytics import dashboard
    from roma_analytics.streamlit_app import APP_PATH

    bad = run_file(history, "r3")
    bad.write_bytes(b"not parquet")
    problems = []
    stats, errors = dashboard.load_history(history, problems)
    pd.testing.assert_frame_equal(stats, expected_stats("r1", "r2", "r4"))
    assert len(problems) == 1 and str(bad) in problems[0]

    monkeypatch.setenv("ROMA_HISTORY", str(history))
    for name in ("ROMA_AUTH_TOKEN", "ROMA_AK", "ROMA_SK", "ROMA_IAM_USER"):
        monkeypatch.delenv(name, raising=False)
    app = AppTest.from_file(str(APP_PATH), default_timeout=120)
    app.run()
    assert not app.exception, app.exception
    shown = [re.sub(r"\\(.)", r"\1", warning.value) for warning in app.warning]  # markdown escapes undone
    assert len([text for text in shown if str(bad) in text]) == 1, shown
    instances = next(metric for metric in app.metric if metric.label == "Instances")
    assert instances.value == "2"


if __name__ == "__main__":
    regenerate(PREFIX, published_kinds(), MODULE)
    print("wrote the history fault matrix into docs/reliability.md")
