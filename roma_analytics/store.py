"""The Parquet history of collection runs: append a run, load with filters, compact finished days.

Layout (DESIGN.md, "history on disk")::

    HISTORY/stats/date=YYYY-MM-DD/<run_id>.parquet       one file per run (written even when empty)
    HISTORY/errors/date=YYYY-MM-DD/<run_id>.parquet      only for runs that had errors
    HISTORY/scopes/date=YYYY-MM-DD/<run_id>.parquet      what the run covered (region, project)
    HISTORY/abnormal_tasks/date=YYYY-MM-DD/<run_id>.parquet   for runs that listed abnormal tasks
                                                         (written even when empty: the run listed)
    HISTORY/<table>/date=YYYY-MM-DD/compacted-<first>-<last>-<hash>.parquet   after ``compact``

``date`` is the UTC day of the run's ``collected_at``.  It lives in the directory names only (hive
partitioning), never inside the files, so pyarrow, DuckDB, Polars, Spark and Dask read the tree
as is.  Every file carries the key-value metadata ``roma_analytics.schema_version``,
``roma_analytics.table`` and ``roma_analytics.runs`` (JSON list of the runs it holds, so that a
run without a single row is still listed by :meth:`HistoryStore.runs`).

Writes never expose a partial file: data goes to a dot-prefixed temporary name in the target
directory (``.<name>.tmp-<pid>-<random>``, which every reader ignores), is fsynced, then
hard-linked to its final name (a link never replaces an existing file, so a run id cannot be
overwritten and concurrent appenders cannot clobber each other) and the directory is fsynced.

Compaction is crash-safe and never shows a row twice or not at all; see :meth:`HistoryStore.compact`.

Every read path lists its files through :mod:`roma_analytics.history_files`: a damaged, foreign or
newer file is skipped with one :class:`~roma_analytics.errors.HistoryWarning` per file and store
(never a crash of every command), each run is read once whatever its files are called, and files
of other writers are cast to the contract's types.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import history_files, rollups, schema
from .schema import parse_time
from .errors import ConfigError, HistoryWarning, RomaError
from .history_backend import REPLACED_GRACE_SECONDS, ObjectStoreSettings, backend_for
# Where the folder backend's lock files and temporary-file cutoff live (kept importable from here).
from .history_backend import COMPACT_LOCK_NAME, READ_LOCK_NAME, STALE_TEMP_SECONDS  # noqa: F401

__all__ = ["HistoryStore", "CompactReport", "arrow_schema", "to_arrow", "write_parquet", "parse_time"]

TABLE_NAMES = tuple(schema.TABLES)
#: Arrow -> pandas types of the contract, converted once (strings straight to the string dtype).
_PANDAS_TYPES = {pa.string(): schema.STRING_DTYPE, pa.timestamp("us", tz="UTC"): schema.TIMESTAMP_DTYPE}
META_SCHEMA_VERSION = b"roma_analytics.schema_version"
META_TABLE = b"roma_analytics.table"
META_RUNS = b"roma_analytics.runs"
META_REPLACES = b"roma_analytics.replaces"
COMPACTED_PREFIX = "compacted-"
#: Rows per Parquet row group: big enough for good compression and few footers, small enough
#: that a time filter on a compacted day skips most of it (files are sorted by collected_at).
ROW_GROUP_ROWS = 128 * 1024
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DATE_DIR = re.compile(r"date=(\d{4}-\d{2}-\d{2})")
_SORT_KEYS = {
    "stats": ("collected_at", *schema.SERIES_KEY, "run_id"),
    "errors": ("collected_at", "region", "project_id", "instance_id", "run_id"),
    "scopes": ("collected_at", "region", "project_id", "run_id"),
    "abnormal_tasks": ("collected_at", *schema.TASK_KEY, "run_id"),
}
#: What makes a row unique in a table: a run's row of one series (used when files share a run).
_ROW_KEYS = {
    "stats": ("run_id", *schema.SERIES_KEY),
    "errors": ("run_id", "region", "project_id", "instance_id"),
    "scopes": ("run_id", *schema.SCOPE_KEY),
    "abnormal_tasks": ("run_id", *schema.TASK_KEY),
}
#: Inspections remembered per store (keyed by path and size/time): bounded for long-running readers.
_INSPECTED_MAX = 100_000
#: Tables written for every run, even without a row (so that every run is listed); abnormal_tasks
#: for every run that listed tasks (its frame is None otherwise), so an empty file means "none found".
_ALWAYS_WRITTEN = ("stats", "abnormal_tasks")


@dataclass(frozen=True)
class CompactReport:
    """What :meth:`HistoryStore.compact` did: ``days`` merged, original ``files_merged``, ``rows`` written,
    and the files ``left_in_place`` (one message each: damaged, foreign, newer, a copy, misplaced, or
    not mergeable without loss; each was also issued as a :class:`HistoryWarning`)."""

    days: int = 0
    files_merged: int = 0
    rows: int = 0
    left_in_place: tuple[str, ...] = ()
    #: Days whose rollups (:mod:`roma_analytics.rollups`) were built or rebuilt.
    rollups: int = 0


# --------------------------------------------------------------------------------------------
# Arrow conversion and atomic Parquet writing (shared with export.py)

def arrow_schema(table: str = "stats") -> pa.Schema:
    """The Arrow schema of ``table`` as stored in Parquet (no ``date`` column)."""
    fields = []
    for name, dtype in _table_dtypes(table).items():
        if dtype is schema.TIMESTAMP_DTYPE:
            arrow_type = pa.timestamp("us", tz="UTC")
        elif dtype is schema.STRING_DTYPE:
            arrow_type = pa.string()
        else:  # int64 and the nullable Int64
            arrow_type = pa.int64()
        fields.append(pa.field(name, arrow_type))
    return pa.schema(fields)


def to_arrow(frame: pd.DataFrame, table: str = "stats", metadata: dict | None = None) -> pa.Table:
    """``frame`` conformed to ``table`` as an Arrow table carrying the schema-version metadata."""
    conformed = _conform(frame, table)
    arrow = pa.Table.from_pandas(conformed, schema=arrow_schema(table), preserve_index=False)
    meta = {META_SCHEMA_VERSION: str(schema.SCHEMA_VERSION).encode(), META_TABLE: table.encode()}
    for key, value in (metadata or {}).items():
        meta[key if isinstance(key, bytes) else key.encode()] = (
            value if isinstance(value, bytes) else str(value).encode()
        )
    # Replacing (not merging) drops pandas' own metadata: the files are for any reader.
    return arrow.replace_schema_metadata(meta)


def write_parquet(arrow: pa.Table, file) -> None:
    """Write ``arrow`` to the open binary ``file``: zstd, row groups, column statistics."""
    pq.write_table(
        arrow,
        file,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        write_statistics=True,
    )


# --------------------------------------------------------------------------------------------

class HistoryStore:
    """The hive-partitioned Parquet history at ``path`` (created on the first :meth:`append`).

    ``path`` is a folder, or an object-store URI ``s3://bucket/prefix`` (AWS S3, Huawei Cloud
    OBS, MinIO...) reached with ``storage`` (:class:`ObjectStoreSettings`; default: from the
    standard AWS environment variables).  The layout and the guarantees are the same; see
    :meth:`compact` for how many writers share an object store without locks.
    """

    def __init__(self, path: str | os.PathLike = "data/history", *,
                 storage: ObjectStoreSettings | None = None) -> None:
        self._backend = backend_for(path, storage)
        #: The folder (a Path) or the URI (a str) of the history.
        self.path = self._backend.public(self._backend.root)
        self._backend.check_root(TABLE_NAMES)
        self._inspected: dict[tuple, history_files.FileInfo] = {}
        self._warned: dict[str, None] = {}
        self._keys: dict[str, str] | None = None
        self._rollups_checked: dict = {}
        self._root_text: str | None = None

    @property
    def problems(self) -> list[str]:
        """The warnings this store issued so far (one per damaged, foreign or misplaced file), in order."""
        return list(self._warned)

    def __repr__(self) -> str:
        return f"HistoryStore({str(self.path)!r})"

    def exists(self) -> bool:
        """True when the history's folder (or object prefix) exists."""
        return self._backend.exists()

    def fingerprint(self) -> tuple[int, int]:
        """``(data files, newest modification time in ns)`` over every table: changes when a run
        is appended or a day compacted (what a cache of the history is keyed on)."""
        times = []
        with self._reading():
            for table in TABLE_NAMES:
                for _, folder in self._day_folders(table, None, None):
                    times.extend(self._backend.modified_ns(folder))
        return len(times), max(times, default=0)

    # ---------------------------------------------------------------------------- writing
    def append(self, collection) -> list[Path]:
        """Store one collection run; return the files written (stats, then errors if any).

        Uses ``collection.stats``, ``.errors``, ``.run_id``, ``.collected_at`` and, when it has
        one, ``.scopes`` (what the run covered; see :mod:`roma_analytics.fleet`) and
        ``.abnormal_tasks`` (None: the run did not list tasks).  The stats file is written even for
        a run without rows, so every run is listed by :meth:`runs`; an abnormal_tasks file
        whenever the run listed abnormal tasks (even none found), so :meth:`listed_runs` knows
        which runs looked; an errors or scopes file only when it has rows.  A run id already in
        the history is a :class:`ConfigError`: nothing is ever overwritten.
        """
        run_id = str(collection.run_id)
        if not _RUN_ID.fullmatch(run_id) or run_id.startswith(COMPACTED_PREFIX):
            raise ConfigError(
                f"run id {run_id!r} cannot name a history file: use 1-128 letters, digits, '.', "
                f"'_' or '-', starting with a letter or digit (and not {COMPACTED_PREFIX!r})"
            )
        collected_at = parse_time(collection.collected_at, "collected_at").floor("us")
        day = collected_at.strftime("%Y-%m-%d")
        frames = {
            "stats": self._run_rows(collection.stats, "stats", run_id, day),
            "errors": self._run_rows(collection.errors, "errors", run_id, day),
            "scopes": self._run_rows(getattr(collection, "scopes", None), "scopes", run_id, day),
        }
        tasks = getattr(collection, "abnormal_tasks", None)
        if tasks is not None:
            frames["abnormal_tasks"] = self._run_rows(tasks, "abnormal_tasks", run_id, day)
        runs_meta = json.dumps([{"run_id": run_id, "collected_at": collected_at.isoformat()}])
        name = f"{run_id}.parquet"
        fs = self._backend
        folders = {table: fs.child(fs.root, table, f"date={day}") for table in frames}
        targets = {table: fs.child(folder, name) for table, folder in folders.items()}
        with fs.errors(f"cannot write to {fs.describe()}"):
            for table, target in targets.items():
                # Under the read lock, like any reader: a compaction swapping the day could
                # otherwise delete a merged file between listing it and reading its run list.
                with self._reading():
                    duplicate = fs.file_exists(target) or run_id in self._compacted_run_ids(folders[table], table)
                if duplicate:
                    raise ConfigError(
                        f"run {run_id} of {day} is already in the {table} history "
                        f"({fs.public(folders[table])}); run ids must be unique, refusing to overwrite"
                    )

            written = {}
            fs.ensure_layout(TABLE_NAMES)
            # stats last: a run is listed once its stats file exists, and by then its other
            # tables are complete (a writer killed earlier leaves an unlisted, unacknowledged run).
            for table in (*(t for t in frames if t != "stats"), "stats"):
                if table not in _ALWAYS_WRITTEN and frames[table].empty:
                    continue
                arrow = to_arrow(frames[table], table, {META_RUNS: runs_meta})
                try:
                    fs.create(targets[table], lambda file, arrow=arrow: write_parquet(arrow, file))
                except FileExistsError:
                    raise ConfigError(
                        f"run {run_id} is already in the {table} history ({fs.public(targets[table])}); "
                        "run ids must be unique, refusing to overwrite"
                    ) from None
                written[table] = fs.public(targets[table])
        self._roll_before(day)
        return [written[table] for table in TABLE_NAMES if table in written]

    # ---------------------------------------------------------------------------- rollups
    def rollup(self, before=None) -> int:
        """Build the rollups (:mod:`roma_analytics.rollups`) of every day strictly before
        ``before`` (default: today UTC) that lacks a current one; return how many days were built.

        Days holding a file with rows of another day are left raw (their readers stay exact).
        Safe to run beside collectors and readers: a rollup is created whole under a new name,
        and a day that changes while it is rolled up is left for next time.
        """
        return self._rollup(before)

    def _rollup(self, before, clean: bool = False) -> int:
        cutoff = (pd.Timestamp.now(tz="UTC") if before is None else parse_time(before, "before")).strftime("%Y-%m-%d")
        fs = self._backend
        built = 0
        with fs.errors(f"cannot write the rollups of {fs.describe()}"):
            if not fs.exists():
                return 0
            for day in self._source_days(None, None):
                if day >= cutoff:
                    continue
                if clean:
                    # Under the compaction lock: a rollup temporary left by a killed writer goes
                    # now (a collector writing one meanwhile just leaves its day raw).
                    for table in rollups.TABLES:
                        with contextlib.suppress(FileNotFoundError):
                            fs.remove_abandoned_temporaries(fs.child(fs.root, table, f"date={day}"),
                                                            time.time(), rollups.PREFIX)
                if self._roll_day(day):
                    built += 1
        return built

    def _roll_before(self, day: str, days: int = 3) -> None:
        """After an append to ``day``: roll up the finished days just before it that lack a
        current rollup (normally yesterday, once a day).  A failure here never fails the append:
        the run is stored, and readers read the day raw."""
        try:
            recent = [d for d in self._source_days(None, None) if d < day][-days:]
            for earlier in recent:
                self._roll_day(earlier)
        except FileNotFoundError:
            return  # a compaction swapped the day (or cleaned our temporary) meanwhile: next time
        except (RomaError, OSError, pa.ArrowException, ValueError) as exc:
            self._issue(f"could not roll up the days before {day} ({exc}); readers read them raw "
                        "until `roma-analytics compact` builds them")

    def _source_days(self, start, end) -> list[str]:
        """The days (``YYYY-MM-DD``) of ``[start, end)`` with a folder in a table rollups come from."""
        return sorted({day for table in rollups.SOURCE_TABLES for day, _ in self._day_folders(table, start, end)})

    def _day_key(self, day: str, cached: bool = True) -> str:
        """The rollup key of ``day``'s raw files; ``cached``: as listed once per read (see
        :meth:`_reading`), else listed now (what a rollup's writer checks)."""
        if cached and self._keys is not None and day in self._keys:
            return self._keys[day]
        key = rollups.source_key(
            (table, name, stamp) for table in rollups.SOURCE_TABLES
            for name, stamp in self._backend.file_stamps(self._day_path(table, day)))
        if cached and self._keys is not None:
            self._keys[day] = key
        return key

    def _current_rollup(self, table: str, day: str, key: str):
        """The rollup file of ``table`` for ``day`` built from the files of ``key``, or None."""
        fs = self._backend
        path = self._day_path(table, day, rollups.file_name(key))
        return path if fs.file_exists(path) else None

    def _day_path(self, table: str, day: str, name: str | None = None):
        """``HISTORY/<table>/date=<day>[/<name>]``: a plain string for a folder (the rollup
        lookups make thousands of these per read of a year; pathlib would cost more than the
        file-system calls), the backend's own path otherwise."""
        parts = (table, f"date={day}", *((name,) if name else ()))
        if isinstance(self._backend.root, Path):
            if self._root_text is None:
                self._root_text = str(self._backend.root)
            return os.path.join(self._root_text, *parts)
        return self._backend.child(self._backend.root, *parts)

    def _roll_day(self, day: str) -> bool:
        """Build ``day``'s rollups if it lacks current ones; True when it built them."""
        fs = self._backend
        key = self._day_key(day, cached=False)
        if all(self._current_rollup(table, day, key) is not None for table in rollups.TABLES):
            return False
        start = pd.Timestamp(day, tz="UTC")
        end = start + pd.Timedelta(days=1)
        frames = {}
        with self._reading(), warnings.catch_warnings():
            warnings.simplefilter("ignore", HistoryWarning)
            for table in rollups.SOURCE_TABLES:
                selection = self._selection(table, start, end)
                if selection.skipped or selection.misplaced or any(info.other_days for info in selection.files):
                    # A damaged, foreign or misplaced file: the day stays raw, so that every
                    # reader still warns about the file and its rows stay out exactly as now.
                    return False
                arrow = self._scan(selection.files, table, list(_table_dtypes(table)), None,
                                   dedup=selection.overlap, excluded_runs=selection.excluded_runs)
                frames[table] = _conform(arrow.to_pandas(), table)
        if self._day_key(day, cached=False) != key:
            return False  # a run arrived (or a compaction swapped the day) meanwhile: next time
        hourly = rollups.last_per_bucket(frames["stats"], rollups.step_us("rollup_1h"))
        outputs = {
            "rollup_1h": to_arrow(hourly, "stats"),
            "rollup_1d": to_arrow(rollups.last_per_bucket(hourly, rollups.step_us("rollup_1d")), "stats"),
            rollups.RUNS_TABLE: pa.Table.from_pandas(
                rollups.run_rows(frames["stats"], frames["errors"], frames["scopes"]),
                schema=_runs_arrow_schema(), preserve_index=False),
        }
        for table, arrow in outputs.items():
            arrow = arrow.replace_schema_metadata({
                **(arrow.schema.metadata or {}),
                META_SCHEMA_VERSION: str(schema.SCHEMA_VERSION).encode(),
                rollups.META_ROLLUP: table.encode(), rollups.META_KEY: key.encode()})
            folder = fs.child(fs.root, table, f"date={day}")
            target = fs.child(folder, rollups.file_name(key))
            try:
                fs.create(target, lambda file, arrow=arrow: write_parquet(arrow, file))
            except FileExistsError:
                pass  # another process built the same rollup: identical by construction
            # Rollups of earlier versions of the day are never read again.
            fs.delete([path for path in fs.data_files(folder)
                       if fs.name(path) != fs.name(target) and fs.name(path).startswith(rollups.PREFIX)])
        return True

    def _rolled(self, table: str, start, end) -> dict[str, history_files.FileInfo]:
        """Per day of ``[start, end)``, the current rollup file of ``table`` that a reader of the
        range may read instead of the day's raw rows: the day has one, and it lies wholly inside
        the range or the range's bound on that day falls on a bucket boundary of the rollup."""
        step = rollups.step_us(table) if table in rollups.SNAPSHOT_ROLLUPS else rollups.step_us("rollup_1d")

        def aligned(stamp) -> bool:
            return (stamp.value // 1000) % step == 0

        rolled = {}
        for day in self._source_days(start, end):
            first = pd.Timestamp(day, tz="UTC")
            if start is not None and start > first and not aligned(start):
                continue
            if end is not None and end < first + pd.Timedelta(days=1) and not aligned(end):
                continue
            key = self._day_key(day)
            path = self._current_rollup(table, day, key)
            if path is None:
                continue
            # The name is a digest of the day's current files, which nothing but this store
            # writes: the file is trusted without opening it.  One that turns out unreadable is
            # remembered (see _aggregated) and its day read raw from then on.
            problem = self._rollups_checked.get(path)
            if problem is not None:
                self._issue(f"skipped the rollup file {self._backend.public(path)}: it {problem}; its day "
                            "is read raw (delete the file: `roma-analytics compact` builds it again)")
                continue
            rolled[day] = history_files.FileInfo(path=path, table="stats")
        return rolled

    def _rollup_problem(self, path) -> str | None:
        """What is wrong with the rollup file ``path`` (None: a rollup this version can read).
        Reads its footer's metadata only."""
        try:
            metadata = self._backend.schema_metadata(path)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException, ValueError) as exc:
            return f"is not a readable Parquet file ({history_files.short_error(exc)})"
        if metadata.get(rollups.META_ROLLUP) is None:
            return "was not written by roma-analytics as a rollup"
        try:
            version = int(metadata.get(META_SCHEMA_VERSION, b"0").decode())
        except (UnicodeDecodeError, ValueError):
            return "has an unreadable schema_version"
        if version > schema.SCHEMA_VERSION:
            return f"was written by a newer roma-analytics (schema version {version})"
        return None

    def _tiered(self, rollup_table: str, start, end) -> tuple[history_files.Selection, set[str]]:
        """The stats files a reader of ``[start, end)`` at a resolution of whole ``rollup_table``
        buckets reads: the current rollups of the days that have one, the raw files of the rest."""
        rolled = self._rolled(rollup_table, start, end)
        raw = self._selection("stats", start, end, skip_days=set(rolled), warn=False)
        # A raw file holding rows of a rolled day (a run copied or moved into another day's
        # folder): that day is read raw too, so the file is judged (copy or misplaced) as always.
        touched = {day for info in (*raw.files, *raw.skipped) for day in info.other_days} & set(rolled)
        if touched:
            rolled = {day: info for day, info in rolled.items() if day not in touched}
            raw = self._selection("stats", start, end, skip_days=set(rolled), warn=False)
        self._warn_selection(raw)
        return dataclasses.replace(raw, files=(*rolled.values(), *raw.files)), set(rolled)

    def _run_rollups(self, start, end, recent: int | None = None, projects=None,
                     regions=None, exclude=frozenset()) -> tuple[pd.DataFrame, set[str]]:
        """``rollup_runs`` rows of the days of ``[start, end)`` that have a current one (whole
        days only, ``exclude`` days left out) and of the scopes asked for, and those days.

        ``recent``: per scope only its last ``recent`` runs and its last complete one (discovery
        not failed) at or before ``end``, plus the runs after ``end``, and in ``_hidden_runs``
        how many of its runs up to ``end`` were left out (what the fleet state needs: its cost
        then follows the number of scopes, not of runs).  An unreadable rollup file is warned
        about once and its day left to the raw runs."""
        rolled = {day: info for day, info in self._rolled(rollups.RUNS_TABLE, start, end).items()
                  if day not in exclude}
        if not rolled:
            return _empty_run_rows(), set()
        paths = [info.path for info in rolled.values()]
        try:
            dataset = self._backend.dataset(paths, _runs_arrow_schema())
            if recent is not None:
                from . import sqlagg

                source = paths if self._backend.deletes_replaced_at_once else dataset
                frame = sqlagg.recent_runs(source, end, int(recent), projects=projects, regions=regions)
            else:
                frame = dataset.to_table().to_pandas(types_mapper={pa.string(): schema.STRING_DTYPE}.get)
                frame = frame[_scope_mask(frame, {"project_id": projects, "region": regions}, None, None)]
            hidden = frame["_hidden_runs"].astype("int64").to_numpy() if "_hidden_runs" in frame else 0
            frame = pd.DataFrame({name: frame[name].astype(dtype) for name, dtype in rollups.RUN_DTYPES.items()})
        except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) + _duckdb_errors():
            # Find the unreadable files (each warned about and remembered), read again without them.
            if any([self._rollup_unreadable(info) for info in rolled.values()]):
                return self._run_rollups(start, end, recent, projects, regions, exclude)
            raise
        frame["_hidden_runs"] = hidden
        return frame.reset_index(drop=True), set(rolled)

    def _raw_beside(self, tables, start, end, rolled: set[str], runs=None) -> tuple[dict, set[str]]:
        """The selections of ``tables`` over the days of ``[start, end)`` not in ``rolled``, and the
        rolled days that may stay rolled: a raw file holding rows of a rolled day (a run copied or
        moved into another day's folder) makes that day raw too, so the file is judged (copy or
        misplaced) as every reader judges it.  Warnings are issued once, for the final selections."""
        rolled = set(rolled)
        while True:
            selections = {table: self._selection(table, start, end, skip_days=rolled, warn=False) for table in tables}
            touched = {day for selection in selections.values()
                       for info in (*selection.files, *selection.skipped) for day in info.other_days} & rolled
            if not touched:
                break
            rolled -= touched
        for selection in selections.values():
            self._warn_selection(selection)
        return selections, rolled

    # ---------------------------------------------------------------------------- reading
    def load(
        self,
        since=None,
        until=None,
        projects=None,
        instances=None,
        regions=None,
        task_types=None,
        table: str = "stats",
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Rows of ``table`` in ``[since, until)`` matching the filters, sorted by time and series.

        ``since``/``until``: ISO strings, dates or datetimes (naive = UTC).  ``projects``,
        ``instances``, ``regions``, ``task_types``: one value or a collection (an empty collection
        matches nothing; ``None`` does not filter).  Only the day folders inside the time range
        are opened, and the row filters are pushed down to the Parquet scan.  A missing or empty
        history gives an empty frame with the schema's dtypes.
        """
        dtypes = _table_dtypes(table)
        wanted = list(dtypes) if columns is None else _checked_columns(columns, dtypes, table)
        start, end = parse_time(since, "since"), parse_time(until, "until")
        filters = {"project_id": projects, "instance_id": instances, "region": regions,
                   "task_type": task_types}
        for column in ("instance_id", "task_type"):
            if column not in dtypes:
                if filters.pop(column) is not None:
                    raise ConfigError(f"the {table} table has no {column} column to filter on")
        expression = _row_filter(start, end, filters)
        # Sort keys are read even when not asked for, so the order is the same either way.
        read_columns = list(dict.fromkeys([*wanted, *(k for k in _SORT_KEYS[table] if k in dtypes)]))
        with self._reading():
            selection = self._selection(table, start, end)
            arrow = self._scan(selection.files, table, read_columns, expression, dedup=selection.overlap,
                               excluded_runs=selection.excluded_runs)
        sort_keys = [key for key in _SORT_KEYS[table] if key in arrow.column_names]
        if arrow.num_rows > 1:
            # Arrow's sort (stable) of the already date-ordered files: several times faster than
            # sorting the pandas frame, whose string keys would be compared as Python objects.
            arrow = arrow.take(pc.sort_indices(arrow, [(key, "ascending") for key in sort_keys]))
        frame = arrow.select(wanted).to_pandas(types_mapper=_PANDAS_TYPES.get)
        return pd.DataFrame({name: frame[name].astype(dtypes[name]) for name in wanted})

    def runs(self, since=None, until=None) -> pd.DataFrame:
        """One row per stored run: ``run_id, collected_at, stats_rows, error_rows``, oldest first."""
        start, end = parse_time(since, "since"), parse_time(until, "until")
        expression = _row_filter(start, end, {})
        per_table, listed = {}, []
        with self._reading():
            for table in TABLE_NAMES:
                selection = self._selection(table, start, end)
                scanned = self._scan(selection.files, table, ["run_id", "collected_at"], expression,
                                     dedup=selection.overlap, excluded_runs=selection.excluded_runs)
                # Reduced per run in Arrow: one row per run reaches pandas, however many rows it has.
                per_table[table] = scanned.group_by("run_id").aggregate(
                    [("collected_at", "min"), ("collected_at", "count")]).to_pandas()
                listed.extend(run for info in selection.files for run in info.runs_meta
                              if run[0] not in selection.excluded_runs)
        # A run without a single row exists only in the files' metadata.
        meta = pd.DataFrame(listed, columns=["run_id", "collected_at_min"]).drop_duplicates("run_id")
        meta["collected_at_min"] = pd.to_datetime(meta["collected_at_min"], utc=True, format="ISO8601") \
            .astype(schema.TIMESTAMP_DTYPE)
        if start is not None:
            meta = meta[meta["collected_at_min"] >= start]
        if end is not None:
            meta = meta[meta["collected_at_min"] < end]
        times = pd.concat([frame[["run_id", "collected_at_min"]].astype(
            {"run_id": schema.STRING_DTYPE, "collected_at_min": schema.TIMESTAMP_DTYPE})
            for frame in (*per_table.values(), meta)], ignore_index=True)
        runs = times.groupby("run_id")["collected_at_min"].min().to_frame("collected_at")
        for table, column in (("stats", "stats_rows"), ("errors", "error_rows")):
            counts = per_table[table].astype({"run_id": schema.STRING_DTYPE}).set_index("run_id")["collected_at_count"]
            runs[column] = counts.reindex(runs.index)
        runs = runs.reset_index()
        out = pd.DataFrame({
            "run_id": runs["run_id"].astype(schema.STRING_DTYPE),
            "collected_at": runs["collected_at"].astype(schema.TIMESTAMP_DTYPE),
            "stats_rows": runs["stats_rows"].fillna(0).astype("int64"),
            "error_rows": runs["error_rows"].fillna(0).astype("int64"),
        })
        return out.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    def files(self, table: str = "stats", since=None, until=None) -> list:
        """The Parquet files a reader of ``table`` in ``[since, until)`` must read (each row once).

        For external engines: during the short swap of a running :meth:`compact`, or after a
        compaction was killed, a plain glob of the folder can list a merged file together with
        the originals it replaces; this list never does.  Paths for a folder, ``s3://`` URIs
        for an object store.
        """
        _table_dtypes(table)
        with self._reading():
            selection = self._selection(table, parse_time(since, "since"), parse_time(until, "until"))
        return [self._backend.public(path) for path in selection.paths]

    def listed_runs(self, since=None, until=None) -> pd.DataFrame:
        """Runs that listed abnormal tasks: ``run_id, collected_at``, oldest first.

        A run with abnormal instances but no rows in ``abnormal_tasks`` either found no ERROR
        task or did not look (``--no-task-list``); only this list tells the two apart.
        """
        start, end = parse_time(since, "since"), parse_time(until, "until")
        with self._reading():
            listed = [run for info in self._selection("abnormal_tasks", start, end).files for run in info.runs_meta]
        runs = pd.DataFrame(listed, columns=["run_id", "collected_at"]).drop_duplicates("run_id")
        runs["run_id"] = runs["run_id"].astype(schema.STRING_DTYPE)
        runs["collected_at"] = pd.to_datetime(runs["collected_at"], utc=True, format="ISO8601").astype(
            schema.TIMESTAMP_DTYPE)
        if start is not None:
            runs = runs[runs["collected_at"] >= start]
        if end is not None:
            runs = runs[runs["collected_at"] < end]
        return runs.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    # ---------------------------------------------------------------------------- analysis
    def trend(self, freq="1D", by=("task_type",), since=None, until=None, projects=None,
              instances=None, regions=None) -> pd.DataFrame:
        """``analysis.trend`` of the matching history, aggregated by DuckDB over the Parquet files."""
        from . import sqlagg  # DuckDB is imported only by those who aggregate on disk

        self._check_range(since, until)
        # Under the read lock, on the exact file list: a compaction swapping a day meanwhile
        # can never make a row count twice.
        with self._reading():
            def selections():
                return {"stats": self._stats_at(freq, since, until)}

            return self._aggregated(selections(), lambda sources: sqlagg.trend(
                sources["stats"], freq=freq, by=by, since=since, until=until,
                projects=projects, instances=instances, regions=regions), reselect=selections)

    def snapshots(self, freq="1h", since=None, until=None, projects=None, instances=None, regions=None,
                  task_types=None) -> pd.DataFrame:
        """Per ``freq`` bucket and series, the last snapshot in ``[since, until)``: stats rows
        (the schema's columns and dtypes) sorted by time and series.

        ``analysis.trend``, ``cdc_vs_common`` and ``anomalies`` at ``freq`` (or any whole
        multiple of it) give on this frame what they give on every raw row of the range, so it
        is what a chart reads.  Computed by DuckDB from the rollups where the resolution allows
        (whole hours or days) and the raw runs elsewhere; filters as in :meth:`load`."""
        from . import sqlagg

        self._check_range(since, until)
        with self._reading():
            def selections():
                return {"stats": self._stats_at(freq, since, until)}

            frame = self._aggregated(selections(), lambda sources: sqlagg.snapshots(
                sources["stats"], freq=freq, since=since, until=until, projects=projects,
                instances=instances, regions=regions, task_types=task_types), reselect=selections)
        return schema.conform(frame, "stats")

    def collection_health(self, since=None, until=None, projects=None, regions=None) -> pd.DataFrame:
        """``analysis.collection_health`` of ``[since, until)`` (per run: instances ``attempted``,
        ``collected``, ``failed``, ``success_ratio``), from the per-run rollups where a day has
        them and the raw stats and errors elsewhere; scope filters only (``projects``,
        ``regions``): a run's outcome is kept per scope, not per instance."""
        from . import analysis

        start, end = parse_time(since, "since"), parse_time(until, "until")
        self._check_range(since, until)
        filters = {"project_id": projects, "region": regions}
        columns = ["collected_at", "run_id", "region", "project_id", "instance_id"]
        with self._reading():
            rolled = set(self._rolled(rollups.RUNS_TABLE, start, end))
            # Only the days without a rollup are read raw (normally today).
            raw, keep = self._raw_beside(("stats", "errors"), start, end, rolled)
            rolled_runs, rolled = self._run_rollups(start, end, projects=projects, regions=regions,
                                                    exclude=rolled - keep)
            if rolled != keep:  # a rollup turned out unreadable meanwhile: read its day raw too
                raw, _ = self._raw_beside(("stats", "errors"), start, end, rolled)
            expression = _row_filter(start, end, filters)
            frames = [self._scan(raw[table].files, table, columns, expression, dedup=raw[table].overlap,
                                 excluded_runs=raw[table].excluded_runs).to_pandas(types_mapper=_PANDAS_TYPES.get)
                      for table in ("stats", "errors")]
        health = analysis.collection_health(frames[1], frames[0])
        rolled_part = rollups.collection_health(rolled_runs[_scope_mask(rolled_runs, filters, start, end)])
        both = pd.concat([rolled_part, health], ignore_index=True)
        return both.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    def has_rows(self, table: str = "stats", since=None, until=None, projects=None, instances=None,
                 regions=None) -> bool:
        """Whether :meth:`load` of ``table`` with these filters would return a row.  For stats,
        days with a daily rollup are asked through it (a series has a rollup row for every day
        it has a row), so the answer costs a few small files, not the history."""
        from . import sqlagg

        self._check_range(since, until)
        _table_dtypes(table)
        start, end = parse_time(since, "since"), parse_time(until, "until")
        with self._reading():
            def selections():
                return {table: self._tiered("rollup_1d", start, end)[0] if table == "stats" else
                        self._selection(table, start, end)}

            return bool(self._aggregated(selections(), lambda sources: sqlagg.count(
                sources[table], since=since, until=until, limit=1, projects=projects,
                instances=instances, regions=regions), reselect=selections))

    def count(self, since=None, until=None, projects=None, instances=None, regions=None,
              task_types=None, table: str = "stats", limit: int | None = None) -> int:
        """How many rows :meth:`load` with these arguments would return (at most ``limit``),
        counted by DuckDB on disk: nothing is loaded."""
        from . import sqlagg

        self._check_range(since, until)
        _table_dtypes(table)
        if task_types is not None and table != "stats":
            raise ConfigError(f"the {table} table has no task_type column to filter on")
        start, end = parse_time(since, "since"), parse_time(until, "until")
        with self._reading():
            selection = self._selection(table, start, end)
            return int(self._aggregated({table: selection}, lambda sources: sqlagg.count(
                sources[table], since=since, until=until, limit=limit, projects=projects,
                instances=instances, regions=regions, task_types=task_types)))

    def time_span(self) -> tuple[pd.Timestamp, pd.Timestamp] | None:
        """``(first, last)`` ``collected_at`` of the stats table (None when it is empty); reads
        only the first and the last day."""
        days = [pd.Timestamp(day, tz="UTC") for day, _ in self._day_folders("stats", None, None)]

        def bound(candidates, pick):
            # The footers' column statistics say it (history_files.inspect): no row is read.
            for day in candidates:
                with self._reading():
                    files = self._selection("stats", day, day + pd.Timedelta(days=1)).files
                times = [getattr(info, pick) for info in files if getattr(info, pick) is not None]
                if times:
                    return min(times) if pick == "first" else max(times)
            return None

        first, last = bound(days, "first"), bound(reversed(days), "last")
        if first is None or last is None:
            return None
        return pd.Timestamp(first).tz_convert("UTC"), pd.Timestamp(last).tz_convert("UTC")

    def _stats_at(self, freq, since, until) -> history_files.Selection:
        """The stats files a reader of ``[since, until)`` at resolution ``freq`` reads."""
        start, end = parse_time(since, "since"), parse_time(until, "until")
        rollup = rollups.rollup_for(freq)
        if rollup is None:
            return self._selection("stats", start, end)
        return self._tiered(rollup, start, end)[0]

    def task_episodes(self, since=None, until=None, listed_runs=None) -> pd.DataFrame:
        """``episodes.episodes`` of the matching history, computed by DuckDB over the files of the
        stats, abnormal_tasks and errors tables (``listed_runs``: default :meth:`listed_runs`)."""
        from . import episodes

        self._check_range(since, until)
        start, end = parse_time(since, "since"), parse_time(until, "until")
        if listed_runs is None:
            listed_runs = self.listed_runs(since, until)["run_id"].tolist()
        with self._reading():
            selections = {table: self._selection(table, start, end) for table in ("stats", "abnormal_tasks", "errors")}
            return self._aggregated(selections, lambda sources: episodes.episodes_duckdb(
                sources["stats"], sources["abnormal_tasks"], sources["errors"], listed_runs,
                since=since, until=until))

    def cdc_vs_common(self, freq="1D", since=None, until=None, projects=None, instances=None,
                      regions=None) -> pd.DataFrame:
        """``analysis.cdc_vs_common`` of the matching history, aggregated by DuckDB on disk."""
        from . import sqlagg

        self._check_range(since, until)
        with self._reading():
            def selections():
                return {"stats": self._stats_at(freq, since, until)}

            return self._aggregated(selections(), lambda sources: sqlagg.cdc_vs_common(
                sources["stats"], freq=freq, since=since, until=until,
                projects=projects, instances=instances, regions=regions), reselect=selections)

    def fleet_state(self, as_of=None, *, staleness=None, tolerance=None, projects=None, instances=None,
                    regions=None):
        """The :class:`roma_analytics.fleet.FleetState` of the history as of ``as_of`` (default now).

        Equal to ``fleet.fleet_state`` on the loaded ``stats``, ``errors`` and ``scopes`` tables,
        but DuckDB reduces the files to the few rows the state needs (the last two snapshots of
        each series, the last two errors of each instance, one row per run and scope), so the
        cost follows the fleet's size rather than the history's length.  Filters as in
        :meth:`load`; ``staleness``/``tolerance`` as in ``fleet.fleet_state``.
        """
        from . import fleet

        top_stats, top_errors, scope_runs, future, staleness = self.fleet_rows(
            as_of, staleness=staleness, tolerance=tolerance, projects=projects, instances=instances,
            regions=regions)
        as_of = fleet._settings(as_of, staleness, fleet.DEFAULT_TOLERANCE if tolerance is None else tolerance)[0]
        return fleet.finish(top_stats, top_errors, scope_runs, future, as_of=as_of, staleness=staleness)

    def fleet_rows(self, as_of=None, *, staleness=None, tolerance=None, projects=None, instances=None,
                   regions=None) -> tuple:
        """The rows :func:`roma_analytics.fleet.finish` judges the fleet by, as of ``as_of``:
        ``(top_stats, top_errors, scope_runs, future, staleness)`` -- the last two snapshots of
        each series, the last two errors rows of each instance, one row per run and scope
        (``fleet.SCOPE_RUN_COLUMNS``), the runs stamped later, and the staleness setting.
        Narrowing them by series or scope and then finishing equals :meth:`fleet_state` with
        those filters (what the dashboard does per filter without reading the history again)."""
        from . import fleet, sqlagg

        as_of, cutoff, staleness = fleet._settings(
            as_of, staleness, fleet.DEFAULT_TOLERANCE if tolerance is None else tolerance)
        filters = dict(projects=projects, instances=instances, regions=regions)
        end = cutoff + pd.Timedelta(1, "us")
        with self._reading():
            # Whole days before the cutoff's day are answered by their rollups: the last snapshot
            # of each series per day (rollup_1d) and the runs of each scope (rollup_runs).
            runs_rolled = set(self._rolled(rollups.RUNS_TABLE, None, end))
            raw_scope, keep = self._raw_beside(("stats", "errors", "scopes"), None, None, runs_rolled)
            run_rows, runs_rolled = self._run_rollups(None, end, recent=int(fleet.INTERVAL_RUNS) + 1,
                                                      projects=projects, regions=regions, exclude=runs_rolled - keep)
            if runs_rolled != keep:  # a rollup turned out unreadable meanwhile: read its day raw too
                raw_scope, _ = self._raw_beside(("stats", "errors", "scopes"), None, None, runs_rolled)
            rolled: set[str] = set()

            def selections():
                stats, days = self._tiered("rollup_1d", None, end)
                rolled.clear()
                rolled.update(days)
                return {
                    "stats": stats, "errors": self._selection("errors", None, None),
                    "scopes": raw_scope["scopes"], "stats@scope": raw_scope["stats"],
                    "errors@scope": raw_scope["errors"],
                }

            top_stats, top_errors, inferred, scopes, future = self._aggregated(
                selections(), lambda sources: sqlagg.fleet_rows(sources, cutoff, **filters), reselect=selections)
            top_stats = self._exact_top(top_stats, rolled, cutoff, filters)
        # Rolled days give each scope's recent runs and its last complete one, plus how many
        # runs they left out (fleet: "_hidden_runs"); the raw days give all of theirs.
        recorded = run_rows[run_rows["collected_at"] <= cutoff]
        raw_runs = fleet.scope_runs_frame(inferred, scopes).assign(_hidden_runs=0)
        scope_runs = pd.concat([recorded[[*fleet.SCOPE_RUN_COLUMNS, "_hidden_runs"]], raw_runs], ignore_index=True)
        # A run copied into another day's folder is in both parts: once is enough.
        scope_runs = scope_runs.drop_duplicates(["run_id", *schema.SCOPE_KEY])
        scope_runs = scope_runs.sort_values([*schema.SCOPE_KEY, "collected_at", "run_id"], kind="stable")
        later = run_rows.loc[run_rows["collected_at"] > cutoff, ["run_id", "collected_at", *schema.SCOPE_KEY]]
        future = pd.concat([future, later], ignore_index=True) if len(later) else future
        return top_stats, top_errors, scope_runs.reset_index(drop=True), fleet._future_frame(future), staleness

    def _exact_top(self, top_stats: pd.DataFrame, rolled: set[str], cutoff, filters: dict) -> pd.DataFrame:
        """``top_stats`` (the last two snapshots per series, from daily rollups and raw days)
        made exact: a series whose latest snapshot comes from a day's rollup may have its
        previous snapshot earlier that day, which the rollup does not hold, so those days are
        read raw for them.  Normally no day (every live series was seen today)."""
        from . import fleet, sqlagg

        if top_stats.empty or not rolled:
            return top_stats
        ordered = top_stats.sort_values([*schema.SERIES_KEY, "collected_at", "run_id"], kind="stable")
        latest = ordered.drop_duplicates(list(schema.SERIES_KEY), keep="last")
        days = set(latest["collected_at"].dt.strftime("%Y-%m-%d")) & rolled
        if not days:
            return top_stats
        extra = self._selection("stats", None, None, skip_days=set(self._source_days(None, None)) - days)
        more = self._aggregated({"stats": extra}, lambda sources: sqlagg.fleet_rows(
            {"stats": sources["stats"]}, cutoff, **filters))[0]
        both = pd.concat([top_stats, more], ignore_index=True).drop_duplicates([*schema.SERIES_KEY, "run_id"])
        both = both.sort_values([*schema.SERIES_KEY, "collected_at", "run_id"], kind="stable")
        return both.groupby(list(schema.SERIES_KEY), sort=False, dropna=False).tail(int(fleet.SNAPSHOTS_KEPT)) \
            .reset_index(drop=True)

    def future_runs(self, now=None, tolerance=None) -> pd.DataFrame:
        """Runs stamped later than ``now`` (default: the present) plus ``tolerance`` (default
        ``fleet.DEFAULT_TOLERANCE``): ``run_id, collected_at``, oldest first.  Cheap: only the
        day folders from ``now``'s day on are opened."""
        from .fleet import DEFAULT_TOLERANCE

        present = parse_time(now if now is not None else pd.Timestamp.now(tz="UTC"), "now")
        cutoff = present + (DEFAULT_TOLERANCE if tolerance is None else pd.Timedelta(tolerance))
        expression = _row_filter(cutoff + pd.Timedelta(1, "us"), None, {})
        frames = []
        with self._reading():
            for table in ("stats", "errors"):
                selection = self._selection(table, cutoff.floor("D"), None)
                frames.append(self._scan(selection.files, table, ["run_id", "collected_at"], expression,
                                         dedup=selection.overlap,
                                         excluded_runs=selection.excluded_runs).to_pandas())
        runs = pd.concat(frames, ignore_index=True).drop_duplicates("run_id")
        return runs.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    # ---------------------------------------------------------------------------- compaction
    def compact(self, before=None, *, grace: float | None = None) -> CompactReport:
        """Merge each day strictly before ``before`` (default: today UTC) into one file per table.

        A merged file is named ``compacted-<first>-<last>-<hash>.parquet``: ``<first>`` and
        ``<last>`` are its first and last run ids by time (the first and last file names, without
        ``.parquet``, for files that list no runs), each cut to 40 characters to keep the name
        within file-system limits; ``<hash>`` is the first 12 hex digits of the SHA-256 of the
        sorted names of the files it replaces, joined by newlines, so two compactors that saw the
        same files choose the same name.  Its own metadata lists the runs it holds
        (``roma_analytics.runs``) and every file it replaces (``roma_analytics.replaces``,
        transitively: a merge of merged files names their originals too), so there is no separate
        journal to lose.  Readers never read a file that a visible merged file replaces, and of
        several files holding the same run id they read one (the merged file holding the most
        runs, then the first by name).  Hence at any instant, and after a crash anywhere, every row
        is read exactly once.

        **Folder**: under ``.compact.lock`` (one compactor at a time) the day's files are merged
        into a dot-named temporary file, fsynced; readers ignore it, and a crash there leaves the
        day unchanged (the next compaction removes the temporary).  Holding ``.lock``
        exclusively, the merged file is linked to its final name (the commit point, folder
        fsynced) and the originals are deleted; readers hold ``.lock`` shared, so they see the
        day before or after the swap, never in between.  Originals left by a crash after the
        commit are skipped by readers and deleted by the next compaction.

        **Object store** (no locks, no rename): the merged object is created in one PUT with
        ``If-None-Match: *``; it is visible whole or not at all.  The originals stay until the
        merged object is older than ``grace`` seconds (default one hour), so a reader that listed
        the day just before the merged object appeared still finds every object it listed; a
        later compaction deletes them.  Two compactors of the same day at once produce two
        merged objects holding the same runs; readers read one of them, and the next compaction
        merges them and, after the grace period, deletes both.  Writers never wait.

        A run appended to the day while it is compacted is not in the merged file's list and
        stays as its own file.  Days with a single file are left as they are.  ``grace`` applies
        to object stores only (folders delete at the commit, under the lock).

        Then every finished day lacking current rollups gets them (:meth:`rollup`), counted in
        ``CompactReport.rollups``.

        A file is merged only when that loses nothing: damaged, foreign or newer files, copies of
        runs already merged, files holding rows of another day, with columns this version does not
        know, or with times finer than microseconds are left in place, each named in
        ``CompactReport.left_in_place`` and issued as a :class:`HistoryWarning`.
        """
        if before is None:
            cutoff = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d")
        else:
            cutoff = parse_time(before, "before").strftime("%Y-%m-%d")
        grace = REPLACED_GRACE_SECONDS if grace is None else float(grace)
        fs = self._backend
        days, files_merged, rows, left = set(), 0, 0, []
        with fs.errors(f"cannot compact {fs.describe()}"):
            if not fs.exists():
                return CompactReport()
            with fs.compacting():
                for table in TABLE_NAMES:
                    for day, folder in self._day_folders(table, None, None):
                        if day >= cutoff:
                            continue
                        merged_files, merged_rows, left_here = self._compact_day(folder, table, grace)
                        left.extend(left_here)
                        files_merged += merged_files
                        rows += merged_rows
                        if merged_files:
                            days.add(day)
            # After the merge: a merged day has new file names, hence a new rollup key.
            with fs.compacting():
                rolled = self._rollup(cutoff, clean=True)
        return CompactReport(days=len(days), files_merged=files_merged, rows=rows, left_in_place=tuple(left),
                             rollups=rolled)

    def _compact_day(self, folder, table: str, grace: float) -> tuple[int, int, list[str]]:
        fs = self._backend
        now = time.time()
        fs.remove_abandoned_temporaries(folder, now, COMPACTED_PREFIX)
        self._remove_replaced(folder, now, grace)
        visible = self._unreplaced(fs.data_files(folder))
        if not visible:
            return 0, 0, []
        selection = history_files.select(self._inspect(path, table) for path in visible)
        left = [self._warn(info) for info in selection.skipped]
        candidates = []
        for info in selection.files:
            mergeable, why = info.mergeable
            if len(visible) == 1 and not info.other_days:
                continue  # alone in its day and readable: nothing to merge it with, nothing to say
            if mergeable:
                candidates.append(info)
            else:
                left.append(self._warn_left(info, why))
        if len(candidates) + len(selection.superseded) <= 1:
            return 0, 0, left
        parts, merged = [], []
        for info in candidates:
            part, problem = self._scan_one(info, table, list(_table_dtypes(table)), None, lossless=True)
            if part is None:  # damaged data, or times that would be cut: stays as it is
                left.append(problem)
                continue
            parts.append(part)
            merged.append(info)
        merged_runs = set().union(*(info.run_ids for info in merged))
        # Merged files whose runs the merge holds anyway (two compactions at once) go with it.
        replaced = merged + [info for info in selection.superseded if info.run_ids <= merged_runs]
        if not merged or len(replaced) <= 1:
            return 0, 0, left
        arrow = pa.concat_tables(parts)
        if any(a.run_ids & b.run_ids for i, a in enumerate(merged) for b in merged[i + 1:]):
            arrow = _first_per_key(arrow, _ROW_KEYS[table])
        order = [(key, "ascending") for key in _SORT_KEYS[table]]
        arrow = arrow.sort_by(order)
        runs = sorted(
            {run_id: {"run_id": run_id, "collected_at": at}
             for info in merged for run_id, at in info.runs_meta}.values(),
            key=lambda run: (run["collected_at"], run["run_id"]),
        )
        candidates = [info.path for info in replaced]
        names = sorted(fs.name(path) for path in candidates)
        replaces = sorted(set(names) | set(self._replaced_names(candidates)))
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        if runs:
            first, last = runs[0]["run_id"][:40], runs[-1]["run_id"][:40]
        else:  # files written by something else: name the merged file after the file names
            first, last = Path(names[0]).stem[:40], Path(names[-1]).stem[:40]
        target = fs.child(folder, f"{COMPACTED_PREFIX}{first}-{last}-{digest}.parquet")
        arrow = arrow.replace_schema_metadata({
            META_SCHEMA_VERSION: str(schema.SCHEMA_VERSION).encode(),
            META_TABLE: table.encode(),
            META_RUNS: json.dumps(runs).encode(),
            META_REPLACES: json.dumps(replaces).encode(),
        })
        fs.replace_files(target, lambda file: write_parquet(arrow, file), candidates)
        return len(candidates), arrow.num_rows, left

    def _remove_replaced(self, folder, now: float, grace: float) -> None:
        """Delete the files that a committed merged file replaces: in a folder at once (left by a
        killed compaction), on an object store once the merged file is older than ``grace``."""
        fs = self._backend
        visible = fs.data_files(folder)
        doomed = set()
        for path in visible:
            if fs.name(path).startswith(COMPACTED_PREFIX) and (
                    fs.deletes_replaced_at_once or fs.age(path, now) >= grace):
                doomed.update(self._replaced_names([path]))
        leftovers = [path for path in visible if fs.name(path) in doomed]
        if leftovers:
            with fs.swapping():
                fs.delete(leftovers)

    # ---------------------------------------------------------------------------- internals
    def _check_range(self, since, until) -> None:
        start, end = parse_time(since, "since"), parse_time(until, "until")
        if start is not None and end is not None and end < start:
            raise ConfigError(f"until ({end.isoformat()}) is before since ({start.isoformat()})")

    def _run_rows(self, frame, table: str, run_id: str, day: str) -> pd.DataFrame:
        if frame is None:
            return _empty(table)
        try:
            rows = _conform(frame, table)
        except ConfigError as exc:
            raise ConfigError(f"cannot store run {run_id}: {exc}") from exc
        if not rows.empty:
            if (rows["run_id"] != run_id).any():
                raise ConfigError(f"cannot store run {run_id}: its {table} rows carry another run_id")
            if (rows["collected_at"].dt.strftime("%Y-%m-%d") != day).any():
                raise ConfigError(
                    f"cannot store run {run_id}: {table} rows have collected_at outside {day}, "
                    "the UTC day of the run's collected_at"
                )
        return rows

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        # While a read holds the lock, each day's rollup key is listed once (a reader that asks
        # several questions -- the fleet state -- lists the history once, not per question).
        outermost = self._keys is None
        if outermost:
            self._keys = {}
        try:
            with self._backend.reading():
                yield
        finally:
            if outermost:
                self._keys = None

    def _day_folders(self, table: str, start, end, skip_days=frozenset()) -> list[tuple[str, object]]:
        fs = self._backend
        first = None if start is None else start.strftime("%Y-%m-%d")
        # until is exclusive: a range ending at midnight does not need that day's folder.
        last = None if end is None else (end - pd.Timedelta(1, "us")).strftime("%Y-%m-%d")
        days = []
        for entry in fs.subfolders(fs.child(fs.root, table)):
            match = _DATE_DIR.fullmatch(fs.name(entry))
            if not match:
                continue
            day = match.group(1)
            if (first is None or day >= first) and (last is None or day <= last) and day not in skip_days:
                days.append((day, entry))
        return sorted(days)

    def _selection(self, table: str, start, end, skip_days=frozenset(), warn: bool = True) -> history_files.Selection:
        """The files of ``table`` a reader of ``[start, end)`` reads: one copy of each run, no file
        a committed compaction replaced, no damaged or foreign file (each warned about once).
        ``skip_days``: days not to read (a rollup answers for them)."""
        infos = []
        for _, folder in self._day_folders(table, start, end, skip_days):
            visible = self._backend.data_files(folder)
            if len(visible) > 1:
                visible = self._unreplaced(visible)
            infos.extend(self._inspect(path, table) for path in visible)
        selection = history_files.select(infos)
        if warn:
            self._warn_selection(selection)
        if table != "stats":
            read_days = {day for day, _ in self._day_folders(table, start, end, skip_days)}
            lost = self._lost_runs(start, end, read_days)
            if lost:  # the stats file's warning said it; these rows go with it, silently
                kept = tuple(info for info in selection.files if not (info.run_ids and info.run_ids <= lost))
                selection = dataclasses.replace(selection, files=kept, excluded_runs=lost)
        return selection

    def _warn_selection(self, selection: history_files.Selection) -> None:
        for info in (*selection.skipped, *selection.misplaced):
            self._warn(info)

    def _lost_runs(self, start, end, days=None) -> frozenset:
        """Runs of ``[start, end)`` (of ``days`` only, when given) whose stats rows cannot be read
        (their stats file was skipped)."""
        skip = frozenset() if days is None else \
            frozenset(day for day, _ in self._day_folders("stats", start, end)) - set(days)
        stats = self._selection("stats", start, end, skip)
        readable = set().union(*(info.run_ids for info in stats.files))
        return frozenset(set().union(*(info.run_ids for info in stats.skipped)) - readable)

    def _unreplaced(self, visible: list) -> list:
        """``visible`` without the files that a merged file among them replaces."""
        replaced = set(self._replaced_names(visible))
        return [path for path in visible if self._backend.name(path) not in replaced]

    def _inspect(self, path, table: str) -> history_files.FileInfo:
        """``history_files.inspect`` of ``path``, remembered while the file keeps its size and time."""
        fs = self._backend
        if isinstance(path, Path):
            try:
                stat = path.stat()
            except FileNotFoundError as exc:  # only without flock: a compaction swapped the day
                raise RomaError(f"the history changed while it was read ({exc}); try again") from exc
            stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        else:
            # Objects are created once (conditional PUT) and never rewritten in place: the name is
            # enough, and no HEAD request per object slows a lock-free reader past the grace period.
            stamp = None
        key = (str(path), table, stamp)
        info = self._inspected.get(key)
        if info is None:
            try:
                info = history_files.inspect(path, table, opener=fs.open)
            except FileNotFoundError as exc:  # only without flock: a compaction swapped the day
                raise RomaError(f"the history changed while it was read ({exc}); try again") from exc
            if len(self._inspected) >= _INSPECTED_MAX:
                self._inspected.clear()
            self._inspected[key] = info
        return info

    def _warn(self, info: history_files.FileInfo) -> str:
        return self._issue(info.warning(self.path, self._backend.public))

    def _warn_left(self, info: history_files.FileInfo, why: str) -> str:
        return self._issue(f"left the history file {self._backend.public(info.path)} as it is (not merged): it {why}")

    def _issue(self, message: str) -> str:
        """Issue ``message`` as a HistoryWarning, once per store (a dashboard or ``collect --every``
        reads the history again and again: the user is told once)."""
        if message not in self._warned:
            self._warned[message] = None
            warnings.warn(message, HistoryWarning, stacklevel=4)
        return message

    def _aggregation_source(self, table: str, paths: list):
        """What :mod:`sqlagg` reads: the file list for a folder, an Arrow dataset for an object
        store (DuckDB reads no object store by itself here: its httpfs extension is not bundled)."""
        fs = self._backend
        if fs.deletes_replaced_at_once:
            return paths
        table = table.split("@")[0]  # "stats@scope": stats files read for another purpose
        # Rollup files live in their own folders: one dataset per folder, united.
        folders: dict = {}
        for path in paths:
            parts = str(path).split("/")
            folder = next((part for part in reversed(parts) if part in (table, *rollups.TABLES)), table)
            folders.setdefault(folder, []).append(path)
        datasets = [fs.dataset(files, arrow_schema(table), table_folder=fs.child(fs.root, folder))
                    for folder, files in folders.items()] or [
            fs.dataset([], arrow_schema(table), table_folder=fs.child(fs.root, table))]
        return datasets[0] if len(datasets) == 1 else ds.dataset(datasets)

    def _aggregated(self, selections: dict, aggregate, reselect=None):
        """``aggregate({table: source})`` over the selected files; when DuckDB fails on a file whose
        footer looked fine (a damaged data page), find the damaged files by reading them, warn,
        and aggregate without them."""
        import duckdb

        def sources(paths: dict) -> dict:
            return {table: self._aggregation_source(table, files) for table, files in paths.items()}

        try:
            return aggregate(sources({table: selection.paths for table, selection in selections.items()}))
        except (duckdb.Error, pa.ArrowInvalid, OSError):
            # An unreadable rollup: its day is read raw instead (the selections are made again,
            # and _rolled skips what _rollup_unreadable remembered).
            bad = [info for selection in selections.values() for info in selection.files
                   if _is_rollup(info.path) and self._rollup_unreadable(info)]
            if bad and reselect is not None:
                return self._aggregated(reselect(), aggregate, reselect)
            good = {table: [info.path for info in selection.files
                            if self._scan_one(info, table.split("@")[0],
                                              list(_table_dtypes(table.split("@")[0])), None)[0] is not None]
                    for table, selection in selections.items()}
            if sum(map(len, good.values())) == sum(len(s.files) for s in selections.values()):
                raise
        return aggregate(sources(good))

    def _scan(self, files, table: str, columns: list[str], expression, dedup: bool = False,
              excluded_runs=frozenset()) -> pa.Table:
        """Rows of the inspected ``files`` as the contract's Arrow types.  ``dedup``: files share
        runs, keep each run's row of a series once; rows of ``excluded_runs`` are left out."""
        full = arrow_schema(table)
        if excluded_runs:
            keep = ~ds.field("run_id").isin(pa.array(sorted(excluded_runs), type=pa.string()))
            expression = keep if expression is None else expression & keep
        read_columns = list(dict.fromkeys([*columns, *(_ROW_KEYS[table] if dedup else ())]))
        if not files:
            return full.empty_table().select(columns)
        # An explicit schema means no file is opened before the scan, which then reads only
        # the listed (already date-pruned) files, with the row filter pushed down.
        dataset = self._backend.dataset([info.path for info in files], full)
        try:
            arrow = dataset.to_table(columns=read_columns, filter=expression)
        except FileNotFoundError as exc:  # only without flock: a compaction swapped the day
            raise RomaError(f"the history changed while it was read ({exc}); try again") from exc
        except (pa.ArrowInvalid, OSError):
            # A damaged data page, or a file of another writer that needs a cast the dataset
            # refuses (nanoseconds): read file by file, so one bad file costs only its own rows.
            parts = [self._scan_one(info, table, read_columns, expression)[0] for info in files]
            parts = [part for part in parts if part is not None]
            arrow = pa.concat_tables(parts) if parts else full.empty_table().select(read_columns)
        if dedup:
            arrow = _first_per_key(arrow, _ROW_KEYS[table])
        return arrow.select(columns)

    def _scan_one(self, info, table: str, columns: list[str], expression, lossless: bool = False):
        """``(rows, None)`` of one file, or ``(None, warning)`` when it cannot be read (it is then
        marked damaged and warned about).  ``lossless``: refuse a cast that cuts sub-microsecond
        times (for compaction)."""
        full = arrow_schema(table)
        try:
            return self._backend.dataset([info.path], full).to_table(columns=columns, filter=expression), None
        except FileNotFoundError as exc:
            raise RomaError(f"the history changed while it was read ({exc}); try again") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            first_error = exc
        try:
            with self._backend.open(info.path) as file:
                arrow = history_files.cast_to_contract(pq.read_table(file), table)
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            return None, self._mark_damaged(info, exc)
        if lossless:
            return None, self._issue(
                f"left the history file {self._backend.public(info.path)} as it is (not merged): its rows "
                f"cannot be merged without loss ({history_files.short_error(first_error)})")
        arrow = arrow.select(columns)
        return (arrow if expression is None else arrow.filter(expression)), None

    def _rollup_unreadable(self, info) -> bool:
        """Whether the rollup file of ``info`` cannot be read; if so it is remembered (never read
        again by this store) and warned about once."""
        problem = self._rollup_problem(info.path)
        if problem is None:
            try:
                with self._backend.open(info.path) as file:
                    pq.read_table(file)
            except FileNotFoundError:
                raise
            except (OSError, pa.ArrowException, ValueError) as exc:
                problem = f"cannot be read ({history_files.short_error(exc)})"
        if problem is None:
            return False
        self._rollups_checked[info.path] = problem
        self._issue(f"skipped the rollup file {self._backend.public(info.path)}: it {problem}; its day "
                    "is read raw (delete the file: `roma-analytics compact` builds it again)")
        return True

    def _mark_damaged(self, info, exc) -> str:
        bad = history_files.damaged(info, exc)
        for key, cached in list(self._inspected.items()):
            if cached.path == info.path:
                self._inspected[key] = bad
        return self._warn(bad)

    def _compacted_run_ids(self, folder, table: str) -> set[str]:
        run_ids = set()
        for path in self._backend.data_files(folder):
            if self._backend.name(path).startswith(COMPACTED_PREFIX):
                info = self._inspect(path, table)
                if info.problem:  # cannot tell what it holds: say so, but keep collecting
                    self._warn(info)
                run_ids |= info.run_ids
        return run_ids

    def _replaced_names(self, files: list) -> list[str]:
        replaced = []
        for path in files:
            if self._backend.name(path).startswith(COMPACTED_PREFIX):
                try:
                    replaced.extend(json.loads(self._backend.schema_metadata(path).get(META_REPLACES, b"[]")))
                except FileNotFoundError:
                    raise
                except (OSError, pa.ArrowException, ValueError, TypeError):
                    pass  # an unreadable merged file: skipped (and warned about) as damaged
        return replaced


# --------------------------------------------------------------------------------------------
# helpers

def _empty_run_rows() -> pd.DataFrame:
    return rollups.empty_runs().assign(_hidden_runs=pd.Series(dtype="int64"))


def _duckdb_errors() -> tuple:
    import duckdb

    return (duckdb.Error,)


def _is_rollup(path) -> bool:
    parts = str(path).replace("\\", "/").split("/")
    return len(parts) >= 3 and parts[-3] in rollups.TABLES and parts[-1].startswith(rollups.PREFIX)


def _scope_mask(frame: pd.DataFrame, filters: dict, start, end) -> np.ndarray:
    mask = np.ones(len(frame), dtype=bool)
    for column, values in filters.items():
        if values is not None:
            values = [values] if isinstance(values, str) else list(values)
            mask &= frame[column].isin(values).to_numpy(dtype=bool, na_value=False)
    if start is not None:
        mask &= (frame["collected_at"] >= start).to_numpy()
    if end is not None:
        mask &= (frame["collected_at"] < end).to_numpy()
    return mask


def _runs_arrow_schema() -> pa.Schema:
    """The Arrow schema of ``rollup_runs`` files."""
    types = {schema.TIMESTAMP_DTYPE: pa.timestamp("us", tz="UTC"), schema.STRING_DTYPE: pa.string()}
    return pa.schema([pa.field(name, types.get(dtype, pa.int64())) for name, dtype in rollups.RUN_DTYPES.items()])


def _table_dtypes(table: str) -> dict[str, object]:
    try:
        return schema.TABLES[table]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown table {table!r}; use one of {', '.join(TABLE_NAMES)}") from None


def _empty(table: str) -> pd.DataFrame:
    return schema.empty(table)


def _conform(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    try:
        return schema.conform(frame, table)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _checked_columns(columns, dtypes, table) -> list[str]:
    wanted = [columns] if isinstance(columns, str) else list(columns)
    unknown = [name for name in wanted if name not in dtypes]
    if unknown:
        raise ConfigError(
            f"unknown {table} column(s) {', '.join(map(str, unknown))}; use {', '.join(dtypes)}"
        )
    return list(dict.fromkeys(wanted))


def _row_filter(start, end, filters: dict):
    conditions = []
    if start is not None:
        conditions.append(ds.field("collected_at") >= pa.scalar(start.to_pydatetime(), pa.timestamp("us", tz="UTC")))
    if end is not None:
        conditions.append(ds.field("collected_at") < pa.scalar(end.to_pydatetime(), pa.timestamp("us", tz="UTC")))
    for column, values in filters.items():
        if values is None:
            continue
        values = [values] if isinstance(values, str) else [str(value) for value in values]
        conditions.append(ds.field(column).isin(pa.array(values, type=pa.string())))
    expression = None
    for condition in conditions:
        expression = condition if expression is None else expression & condition
    return expression


def _first_per_key(arrow: pa.Table, keys) -> pa.Table:
    """The first row of each ``keys`` combination, in the original order (rows of one run read
    from two files count once)."""
    if arrow.num_rows < 2:
        return arrow
    numbered = arrow.append_column("__row", pa.array(np.arange(arrow.num_rows)))
    firsts = numbered.group_by(list(keys), use_threads=False).aggregate([("__row", "min")])["__row_min"]
    return arrow.take(pa.array(np.sort(firsts.to_numpy())))
