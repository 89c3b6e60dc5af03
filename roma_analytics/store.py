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
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import schema
from .schema import parse_time
from .errors import ConfigError, RomaError

try:  # POSIX advisory locks; without them compaction still never loses a row (see compact()).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["HistoryStore", "CompactReport", "arrow_schema", "to_arrow", "write_parquet", "parse_time"]

TABLE_NAMES = tuple(schema.TABLES)
META_SCHEMA_VERSION = b"roma_analytics.schema_version"
META_TABLE = b"roma_analytics.table"
META_RUNS = b"roma_analytics.runs"
META_REPLACES = b"roma_analytics.replaces"
COMPACTED_PREFIX = "compacted-"
#: Readers hold this lock shared while they list and read; compaction holds it exclusively only
#: while it swaps a day's files, so a reader never sees the swap half done.
READ_LOCK_NAME = ".lock"
#: Serialises compactions (two compactors merging the same day would duplicate it).
COMPACT_LOCK_NAME = ".compact.lock"
#: A temporary file of an append older than this was abandoned by a killed writer.
STALE_TEMP_SECONDS = 15 * 60
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
#: Tables written for every run, even without a row (so that every run is listed); abnormal_tasks
#: for every run that listed tasks (its frame is None otherwise), so an empty file means "none found".
_ALWAYS_WRITTEN = ("stats", "abnormal_tasks")


@dataclass(frozen=True)
class CompactReport:
    """What :meth:`HistoryStore.compact` did: ``days`` merged, original ``files_merged``, ``rows`` written."""

    days: int = 0
    files_merged: int = 0
    rows: int = 0


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
    """The hive-partitioned Parquet history at ``path`` (created on the first :meth:`append`)."""

    def __init__(self, path: str | os.PathLike = "data/history") -> None:
        self.path = Path(path)
        self._check_folder()

    def __repr__(self) -> str:
        return f"HistoryStore({str(self.path)!r})"

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
        targets = {table: self.path / table / f"date={day}" / name for table in frames}
        for table, target in targets.items():
            # Under the read lock, like any reader: a compaction swapping the day could
            # otherwise delete a merged file between listing it and reading its run list.
            with self._reading():
                duplicate = target.exists() or run_id in self._compacted_run_ids(target.parent)
            if duplicate:
                raise ConfigError(
                    f"run {run_id} of {day} is already in the {table} history ({target.parent}); "
                    "run ids must be unique, refusing to overwrite"
                )

        written = []
        with _os_errors(f"cannot write to the history folder {self.path}"):
            self._ensure_layout()
            for table in frames:
                if table not in _ALWAYS_WRITTEN and frames[table].empty:
                    continue
                arrow = to_arrow(frames[table], table, {META_RUNS: runs_meta})
                target = targets[table]
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _atomic_create(target, lambda f, arrow=arrow: write_parquet(arrow, f))
                except FileExistsError:
                    raise ConfigError(
                        f"run {run_id} is already in the {table} history ({target}); "
                        "run ids must be unique, refusing to overwrite"
                    ) from None
                written.append(target)
        return written

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
            files = self._files(table, start, end)
            arrow = self._scan(files, table, read_columns, expression)
        frame = arrow.to_pandas()
        sort_keys = [key for key in _SORT_KEYS[table] if key in frame.columns]
        if len(frame) > 1:
            frame = frame.sort_values(sort_keys, kind="stable")
        return pd.DataFrame(
            {name: frame[name].astype(dtypes[name]).reset_index(drop=True) for name in wanted}
        )

    def runs(self, since=None, until=None) -> pd.DataFrame:
        """One row per stored run: ``run_id, collected_at, stats_rows, error_rows``, oldest first."""
        start, end = parse_time(since, "since"), parse_time(until, "until")
        expression = _row_filter(start, end, {})
        rows, listed = {}, []
        with self._reading():
            for table in TABLE_NAMES:
                files = self._files(table, start, end)
                scanned = self._scan(files, table, ["run_id", "collected_at"], expression)
                rows[table] = scanned.to_pandas()
                listed.extend(run for path in files for run in _file_runs(path))
        # A run without a single row exists only in the files' metadata.
        meta = pd.DataFrame(listed, columns=["run_id", "collected_at"])
        meta["collected_at"] = pd.to_datetime(meta["collected_at"], utc=True, format="ISO8601")
        if start is not None:
            meta = meta[meta["collected_at"] >= start]
        if end is not None:
            meta = meta[meta["collected_at"] < end]
        every_run = pd.concat([rows["stats"], rows["errors"], meta], ignore_index=True)
        every_run["run_id"] = every_run["run_id"].astype(schema.STRING_DTYPE)
        every_run["collected_at"] = every_run["collected_at"].astype(schema.TIMESTAMP_DTYPE)
        runs = every_run.groupby("run_id")["collected_at"].min().to_frame()
        runs["stats_rows"] = rows["stats"].groupby("run_id").size()
        runs["error_rows"] = rows["errors"].groupby("run_id").size()
        runs = runs.reset_index()
        out = pd.DataFrame({
            "run_id": runs["run_id"].astype(schema.STRING_DTYPE),
            "collected_at": runs["collected_at"].astype(schema.TIMESTAMP_DTYPE),
            "stats_rows": runs["stats_rows"].fillna(0).astype("int64"),
            "error_rows": runs["error_rows"].fillna(0).astype("int64"),
        })
        return out.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    def files(self, table: str = "stats", since=None, until=None) -> list[Path]:
        """The Parquet files a reader of ``table`` in ``[since, until)`` must read (each row once).

        For external engines: during the short swap of a running :meth:`compact`, or after a
        compaction was killed, a plain glob of the folder can list a merged file together with
        the originals it replaces; this list never does.
        """
        _table_dtypes(table)
        with self._reading():
            return self._files(table, parse_time(since, "since"), parse_time(until, "until"))

    def listed_runs(self, since=None, until=None) -> pd.DataFrame:
        """Runs that listed abnormal tasks: ``run_id, collected_at``, oldest first.

        A run with abnormal instances but no rows in ``abnormal_tasks`` either found no ERROR
        task or did not look (``--no-task-list``); only this list tells the two apart.
        """
        start, end = parse_time(since, "since"), parse_time(until, "until")
        with self._reading():
            listed = [run for path in self._files("abnormal_tasks", start, end) for run in _file_runs(path)]
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
            files = self._files("stats", parse_time(since, "since"), parse_time(until, "until"))
            return sqlagg.trend(files, freq=freq, by=by, since=since, until=until,
                                projects=projects, instances=instances, regions=regions)

    def cdc_vs_common(self, freq="1D", since=None, until=None, projects=None, instances=None,
                      regions=None) -> pd.DataFrame:
        """``analysis.cdc_vs_common`` of the matching history, aggregated by DuckDB on disk."""
        from . import sqlagg

        self._check_range(since, until)
        with self._reading():
            files = self._files("stats", parse_time(since, "since"), parse_time(until, "until"))
            return sqlagg.cdc_vs_common(files, freq=freq, since=since, until=until,
                                        projects=projects, instances=instances, regions=regions)

    def fleet_state(self, as_of=None, *, staleness=None, tolerance=None, projects=None, instances=None,
                    regions=None):
        """The :class:`roma_analytics.fleet.FleetState` of the history as of ``as_of`` (default now).

        Equal to ``fleet.fleet_state`` on the loaded ``stats``, ``errors`` and ``scopes`` tables,
        but DuckDB reduces the files to the few rows the state needs (the last two snapshots of
        each series, the last two errors of each instance, one row per run and scope), so the
        cost follows the fleet's size rather than the history's length.  Filters as in
        :meth:`load`; ``staleness``/``tolerance`` as in ``fleet.fleet_state``.
        """
        from . import fleet, sqlagg

        as_of, cutoff, staleness = fleet._settings(
            as_of, staleness, fleet.DEFAULT_TOLERANCE if tolerance is None else tolerance)
        with self._reading():
            files = {table: self._files(table, None, None) for table in TABLE_NAMES}
            top_stats, top_errors, inferred, scopes, future = sqlagg.fleet_rows(
                files, cutoff, projects=projects, instances=instances, regions=regions)
        scope_runs = fleet.scope_runs_frame(inferred, scopes)
        return fleet.finish(top_stats, top_errors, scope_runs, fleet._future_frame(future), as_of=as_of,
                            staleness=staleness)

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
                files = self._files(table, cutoff.floor("D"), None)
                frames.append(self._scan(files, table, ["run_id", "collected_at"], expression).to_pandas())
        runs = pd.concat(frames, ignore_index=True).drop_duplicates("run_id")
        return runs.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

    # ---------------------------------------------------------------------------- compaction
    def compact(self, before=None) -> CompactReport:
        """Merge each day strictly before ``before`` (default: today UTC) into one file per table.

        The scheme, and why a reader sees every row exactly once at any moment:

        1. Under ``.compact.lock`` (one compactor at a time), a day's visible files are read,
           merged (sorted by time and series, ``run_id`` kept per row) and written to a
           dot-prefixed temporary file, fsynced.  Readers ignore it: a crash here leaves the day
           unchanged (the next compaction removes the stale temporary file).
        2. The merged file's own metadata (``roma_analytics.replaces``) lists the files it
           replaces; it is created atomically with them, so there is no separate journal to lose.
        3. Holding ``.lock`` exclusively, the merged file is linked to its final name
           ``compacted-<first>-<last>-<hash>.parquet`` (commit point, directory fsynced), then the
           originals are deleted.  Readers hold ``.lock`` shared while listing and reading, so
           they see the day before or after the swap, never in between.
        4. A crash after the commit leaves the merged file next to (some of) its originals.
           Readers skip every file named in a visible compacted file's ``replaces``, so they
           still see each row once; the next ``compact`` deletes those leftovers first.

        A run appended to the day while it is compacted is not in the merged file's list and
        stays as its own file.  Days with a single file are left as they are.
        """
        if before is None:
            cutoff = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d")
        else:
            cutoff = parse_time(before, "before").strftime("%Y-%m-%d")
        if not self.path.is_dir():
            return CompactReport()
        days, files_merged, rows = set(), 0, 0
        with _os_errors(f"cannot compact the history folder {self.path}"), \
                _flock(self.path / COMPACT_LOCK_NAME, exclusive=True, create=True):
            for table in TABLE_NAMES:
                for day, folder in self._day_folders(table, None, None):
                    if day >= cutoff:
                        continue
                    merged_files, merged_rows = self._compact_day(folder, table)
                    if merged_files:
                        days.add(day)
                        files_merged += merged_files
                        rows += merged_rows
        return CompactReport(days=len(days), files_merged=files_merged, rows=rows)

    def _compact_day(self, folder: Path, table: str) -> tuple[int, int]:
        now = time.time()
        for entry in folder.iterdir():
            if ".tmp-" not in entry.name or not entry.name.startswith("."):
                continue
            # A killed compaction's temporaries go at once (compactions are serialised by the
            # lock); a killed append's only once clearly abandoned, since on a finished day a
            # late append could still be writing one.
            if entry.name.startswith("." + COMPACTED_PREFIX) or _age(entry, now) > STALE_TEMP_SECONDS:
                entry.unlink(missing_ok=True)
        self._finish_compactions(folder)
        sources = _visible_files(folder)
        if len(sources) <= 1:
            return 0, 0
        arrow = self._scan(sources, table, list(_table_dtypes(table)), None)
        order = [(key, "ascending") for key in _SORT_KEYS[table]]
        arrow = arrow.sort_by(order)
        runs = sorted(
            {run["run_id"]: run for path in sources for run in _file_runs(path)}.values(),
            key=lambda run: (run["collected_at"], run["run_id"]),
        )
        names = sorted(path.name for path in sources)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        if runs:
            first, last = runs[0]["run_id"][:40], runs[-1]["run_id"][:40]
        else:  # files written by something else: name the merged file after the file names
            first, last = Path(names[0]).stem[:40], Path(names[-1]).stem[:40]
        target = folder / f"{COMPACTED_PREFIX}{first}-{last}-{digest}.parquet"
        arrow = arrow.replace_schema_metadata({
            META_SCHEMA_VERSION: str(schema.SCHEMA_VERSION).encode(),
            META_TABLE: table.encode(),
            META_RUNS: json.dumps(runs).encode(),
            META_REPLACES: json.dumps(names).encode(),
        })
        tmp = _write_temp(target, lambda f: write_parquet(arrow, f))
        try:
            with _flock(self.path / READ_LOCK_NAME, exclusive=True, create=True):
                _link_into_place(tmp, target)
                for source in sources:
                    source.unlink(missing_ok=True)
                _fsync_dir(folder)
        finally:
            tmp.unlink(missing_ok=True)
        return len(sources), arrow.num_rows

    def _finish_compactions(self, folder: Path) -> None:
        """Delete originals that a committed merged file replaces (left by a killed compaction)."""
        leftovers = [folder / name for name in _replaced_names(folder) if (folder / name).exists()]
        if leftovers:
            with _flock(self.path / READ_LOCK_NAME, exclusive=True, create=True):
                for path in leftovers:
                    path.unlink(missing_ok=True)
                _fsync_dir(folder)

    # ---------------------------------------------------------------------------- internals
    def _check_folder(self) -> None:
        where = self.path
        if where.exists() and not where.is_dir():
            raise ConfigError(f"{where} is a file, not a roma-analytics history folder; pass a folder")
        if not where.is_dir():
            return
        try:
            entries = [entry.name for entry in where.iterdir() if not entry.name.startswith(".")]
        except OSError as exc:
            raise ConfigError(f"cannot read the history folder {where}: {exc.strerror}") from exc
        for table in TABLE_NAMES:
            if (where / table).exists() and not (where / table).is_dir():
                raise ConfigError(
                    f"{where} is not a roma-analytics history folder: {where / table} is a file"
                )
        if entries and not any(name in TABLE_NAMES for name in entries):
            raise ConfigError(
                f"{where} is not a roma-analytics history folder (it holds other files and no "
                "stats/ or errors/ folder); pass an empty or new folder, or an existing history"
            )

    def _ensure_layout(self) -> None:
        for table in TABLE_NAMES:
            (self.path / table).mkdir(parents=True, exist_ok=True)
        lock = self.path / READ_LOCK_NAME
        if not lock.exists():
            lock.touch(exist_ok=True)

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
        with _flock(self.path / READ_LOCK_NAME, exclusive=False, create=False):
            yield

    def _day_folders(self, table: str, start, end) -> list[tuple[str, Path]]:
        root = self.path / table
        try:
            entries = list(root.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the history folder {root}: {exc.strerror}") from exc
        first = None if start is None else start.strftime("%Y-%m-%d")
        # until is exclusive: a range ending at midnight does not need that day's folder.
        last = None if end is None else (end - pd.Timedelta(1, "us")).strftime("%Y-%m-%d")
        days = []
        for entry in entries:
            match = _DATE_DIR.fullmatch(entry.name)
            if not match or not entry.is_dir():
                continue
            day = match.group(1)
            if (first is None or day >= first) and (last is None or day <= last):
                days.append((day, entry))
        return sorted(days)

    def _files(self, table: str, start, end) -> list[Path]:
        files = []
        for _, folder in self._day_folders(table, start, end):
            visible = _visible_files(folder)
            if len(visible) > 1:
                replaced = set(_replaced_names(folder, visible))
                visible = [path for path in visible if path.name not in replaced]
            files.extend(visible)
        return files

    def _scan(self, files: list[Path], table: str, columns: list[str], expression) -> pa.Table:
        full = arrow_schema(table)
        if not files:
            return full.empty_table().select(columns)
        # An explicit schema means no file is opened before the scan, which then reads only
        # the listed (already date-pruned) files, with the row filter pushed down.
        dataset = ds.dataset([str(path) for path in files], schema=full, format="parquet")
        try:
            return dataset.to_table(columns=columns, filter=expression)
        except FileNotFoundError as exc:  # only without flock: a compaction swapped the day
            raise RomaError(f"the history changed while it was read ({exc}); try again") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise RomaError(
                f"cannot read the {table} history in {self.path}: {exc}. A file there is not "
                "valid roma-analytics Parquet; move it out of the history folder"
            ) from exc

    def _compacted_run_ids(self, folder: Path) -> set[str]:
        if not folder.is_dir():
            return set()
        return {
            run["run_id"]
            for path in _visible_files(folder) if path.name.startswith(COMPACTED_PREFIX)
            for run in _file_runs(path)
        }


# --------------------------------------------------------------------------------------------
# helpers

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


def _visible_files(folder: Path) -> list[Path]:
    """The day's data files: ``*.parquet`` not hidden by a dot or underscore (temporaries)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(
        folder / name for name in names
        if name.endswith(".parquet") and not name.startswith((".", "_"))
    )


def _replaced_names(folder: Path, visible: list[Path] | None = None) -> list[str]:
    replaced = []
    for path in visible if visible is not None else _visible_files(folder):
        if path.name.startswith(COMPACTED_PREFIX):
            replaced.extend(json.loads(_file_metadata(path).get(META_REPLACES, b"[]")))
    return replaced


def _file_metadata(path: Path) -> dict[bytes, bytes]:
    return pq.read_schema(path).metadata or {}


def _file_runs(path: Path) -> list[dict]:
    return json.loads(_file_metadata(path).get(META_RUNS, b"[]"))


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool, create: bool) -> Iterator[None]:
    """Hold an advisory lock on ``path``; a reader without the lock file simply goes unlocked."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o666)
    except OSError:
        if create:
            raise
        yield  # no lock file (a new or foreign history) or not readable: nothing to wait for
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_temp(target: Path, write) -> Path:
    """Write ``target``'s content to a dot-named temporary file next to it, fsynced; return it."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _link_into_place(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` atomically, failing (FileExistsError) if it exists."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        # Filesystems without hard links: check, then rename (a tiny window instead of none).
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def _atomic_create(target: Path, write) -> None:
    tmp = _write_temp(target, write)
    try:
        _link_into_place(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Turn permission/read-only/space errors into messages that say what to do."""
    try:
        yield
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc} ({exc.filename}); choose a writable folder") from exc
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ConfigError(f"{what}: read-only file system; choose a writable folder") from exc
        if isinstance(exc, FileExistsError):
            raise
        raise RomaError(f"{what}: {exc.strerror or exc} ({exc.filename})") from exc
