"""The trend aggregations of :mod:`roma_analytics.analysis`, pushed down to DuckDB over Parquet.

A year of 5-minute history is tens of millions of rows; loading it into pandas to draw one
daily chart would not fit.  Here DuckDB reads the hive-partitioned files of
``HISTORY/stats/date=YYYY-MM-DD/<run_id>.parquet`` directly: the ``date`` partitions outside
``since``/``until`` are never opened, the other filters are pushed into the Parquet scan, and
the gauge selection and the sums stream through hash aggregates, so only the (small) result
reaches pandas.

The semantics are those of docs/architecture.md and must equal ``analysis.trend`` and
``analysis.cdc_vs_common`` on the equivalently filtered frame, frame for frame: the bucket is
the same integer-microsecond arithmetic, the gauge order is the same (``collected_at``,
``run_id``, then the counts), and the final columns, dtypes, order and ratios are produced by
the very functions the pandas path uses.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from roma_analytics import analysis
from roma_analytics.errors import ConfigError
from roma_analytics.schema import parse_time

#: Buckets shorter than this (microseconds) hold few snapshots per series: see gauges_cte.
_FINE_BUCKET_US = 3_600_000_000
#: How the SQL below names the files it reads; a pyarrow Dataset source replaces it with a view.
PARQUET_SOURCE = "read_parquet(?, hive_partitioning = true, hive_types = {'date': DATE})"
_DATASET_VIEW = "history_dataset"
#: The rows of the source.  Other writers store timestamp[ns|ms] with or without a zone: one type
#: for every file (naive = UTC, the session's zone; nanoseconds cut to microseconds), and the
#: filters on collected_at are still pushed into the Parquet scan.
_SOURCE = f"(SELECT * REPLACE (CAST(collected_at AS TIMESTAMPTZ) AS collected_at) FROM {PARQUET_SOURCE})"
#: Filter keyword -> stats column.
_FILTER_COLUMNS = {
    "projects": "project_id",
    "instances": "instance_id",
    "regions": "region",
    "task_types": "task_type",
}


def trend(
    source: str | os.PathLike,
    freq: str = "1D",
    by: Iterable[str] | str = ("task_type",),
    since=None,
    until=None,
    projects: Iterable[str] | str | None = None,
    instances: Iterable[str] | str | None = None,
    regions: Iterable[str] | str | None = None,
    task_types: Iterable[str] | str | None = None,
) -> pd.DataFrame:
    """``analysis.trend`` computed by DuckDB from the stats Parquet files under ``source``.

    ``source`` is the ``stats`` directory of a history (holding ``date=YYYY-MM-DD/`` folders), or
    the list of its files to read (``HistoryStore.files()``, which never lists a compacted file
    together with the originals it replaces), or a ``pyarrow.dataset.Dataset`` of those files
    with the ``date`` partition column (how an object-store history is read).
    ``since`` (inclusive) and ``until`` (exclusive) bound ``collected_at``; naive times mean
    UTC.  ``projects``, ``instances``, ``regions`` and ``task_types`` keep only rows whose
    column is one of the given values (a single string is one value; None keeps all; an empty
    collection keeps nothing).  A missing or empty directory gives the empty result.
    """
    by = analysis._group_columns(by)
    step, origin = analysis.bucket_step(freq)
    scan = _Scan(source, since, until, projects=projects, instances=instances,
                 regions=regions, task_types=task_types)
    if scan.empty:
        sums = pd.DataFrame(columns=["bucket", *by, *analysis.TOTAL_COLUMNS])
        return analysis._finish_trend(sums, by)
    group = ", ".join(["bucket", *(_quote(c) for c in by)])
    totals = ", ".join(f"sum(last.{c})::BIGINT AS {c}" for c in analysis.TOTAL_COLUMNS)
    sql = f"""
        {scan.gauges_cte(step, origin)}
        SELECT {group}, {totals}
        FROM gauges
        GROUP BY {group}
    """
    return analysis._finish_trend(scan.fetch(sql), by)


def cdc_vs_common(
    source: str | os.PathLike,
    freq: str = "1D",
    since=None,
    until=None,
    projects: Iterable[str] | str | None = None,
    instances: Iterable[str] | str | None = None,
    regions: Iterable[str] | str | None = None,
    task_types: Iterable[str] | str | None = None,
) -> pd.DataFrame:
    """``analysis.cdc_vs_common`` computed by DuckDB from the stats Parquet files under
    ``source``; the parameters are those of :func:`trend`."""
    step, origin = analysis.bucket_step(freq)
    scan = _Scan(source, since, until, projects=projects, instances=instances,
                 regions=regions, task_types=task_types)
    columns = ["bucket", "common_total", "cdc_total", "common_abnormal", "cdc_abnormal"]
    if scan.empty:
        return analysis._finish_cdc_vs_common(pd.DataFrame(columns=columns))
    # A bucket with rows of only one task type still appears: the other one counts as 0.
    sums = ", ".join(
        f"coalesce(sum(last.{count}) FILTER (WHERE task_type = '{task_type}'), 0)::BIGINT"
        f" AS {task_type}_{count}"
        for task_type, count in (("common", "total"), ("cdc", "total"), ("common", "abnormal"), ("cdc", "abnormal"))
    )
    sql = f"""
        {scan.gauges_cte(step, origin)}
        SELECT bucket, {sums}
        FROM gauges
        GROUP BY bucket
    """
    return analysis._finish_cdc_vs_common(scan.fetch(sql))


def snapshots(
    source,
    freq: str = "1h",
    since=None,
    until=None,
    projects: Iterable[str] | str | None = None,
    instances: Iterable[str] | str | None = None,
    regions: Iterable[str] | str | None = None,
    task_types: Iterable[str] | str | None = None,
) -> pd.DataFrame:
    """Per ``freq`` bucket and series, the last snapshot (the stats row itself), computed by
    DuckDB from ``source`` (as for :func:`trend`); sorted by time and series."""
    from roma_analytics import schema

    step, origin = analysis.bucket_step(freq)
    scan = _Scan(source, since, until, projects=projects, instances=instances,
                 regions=regions, task_types=task_types)
    if scan.empty:
        return schema._empty(schema.TABLES["stats"])
    names = ", ".join(_quote(c) for c in schema.TABLES["stats"])
    counts = ", ".join(analysis.TOTAL_COLUMNS)
    condition, _ = scan.where()
    bucket = f"t - (((t - {int(origin)}) % {int(step)}) + {int(step)}) % {int(step)}"
    series = ", ".join(schema.SERIES_KEY)
    # The whole row rides along in the struct the greatest (time, run, counts) key picks.
    sql = f"""
        WITH rows AS (
            SELECT epoch_us(collected_at) AS t, * FROM {_SOURCE} WHERE {condition}
        )
        SELECT * FROM (
            SELECT unnest(last, recursive := true) FROM (
                SELECT max_by(struct_pack({names}), struct_pack(t, run_id, {counts})) AS last
                FROM rows GROUP BY {bucket}, {series}))
        ORDER BY collected_at, {series}, run_id
    """
    # The same order again on the fetched Arrow table: with preserve_insertion_order off, DuckDB
    # hands an ordered query's Arrow batches back out of order now and then (1.5 through the
    # relation API, 2.0 through an executed result: the dashboard then read a middle row as the
    # newest run).  A sort of already sorted rows costs little.
    return scan.fetch(sql, order_by=["collected_at", *schema.SERIES_KEY, "run_id"])


def count(source, since=None, until=None, limit: int | None = None, **filters) -> int:
    """How many rows of ``source`` match (parameters as for :func:`trend`); with ``limit``, at
    most that many (the scan stops there: "is there any" costs one row group)."""
    scan = _Scan(source, since, until, **filters)
    if scan.empty:
        return 0
    condition, _ = scan.where()
    rows = f"SELECT 1 FROM {_SOURCE} WHERE {condition}" + (f" LIMIT {int(limit)}" if limit is not None else "")
    return int(scan.fetch(f"SELECT count(*) AS n FROM ({rows})")["n"].iloc[0])


def recent_runs(source, end, recent: int, projects=None, regions=None) -> pd.DataFrame:
    """From ``rollup_runs`` files: per scope its last ``recent`` runs before ``end`` and its last
    complete one (discovery not failed), with ``_hidden_runs`` (how many of its runs before
    ``end`` are left out), plus every run at or after ``end``.  Columns of ``rollups.RUN_DTYPES``."""
    from roma_analytics import rollups

    scan = _Scan(source, None, None, projects=projects, regions=regions)
    columns = list(rollups.RUN_DTYPES)
    if scan.empty:
        return rollups.empty_runs().assign(_hidden_runs=pd.Series(dtype="int64"))
    condition, params = scan.where()
    row = f"struct_pack({', '.join(columns)})"
    order = "struct_pack(collected_at, run_id)"
    cut = end.to_pydatetime() if end is not None else None
    # Streaming aggregates (one pass, memory per scope), not window functions over every run.
    # One scan: per scope and side of ``end`` (a run after it is kept whole: "later" groups hold
    # few runs, stamped in the future).
    summary = scan.fetch_params(f"""
        WITH source AS (SELECT * FROM {_SOURCE} WHERE {condition}),
        tagged AS (SELECT *, (?::TIMESTAMPTZ IS NOT NULL AND collected_at >= ?) AS _later FROM source)
        SELECT _later, count(*) AS _runs,
               max_by({row}, {order}, {int(recent)}) AS recent,
               max_by({row}, {order}) FILTER (WHERE discovery <> 'failed') AS complete,
               list({row}) FILTER (WHERE _later) AS every
        FROM tagged GROUP BY region, project_id, _later""", [*params, cut, cut])
    parts = []
    for later, runs, newest, complete, every in summary[["_later", "_runs", "recent", "complete", "every"]] \
            .itertuples(index=False):
        if later:
            parts.append(pd.DataFrame(list(every), columns=columns).assign(_hidden_runs=0))
            continue
        rows = list(newest) + ([complete] if isinstance(complete, dict) else [])
        kept = pd.DataFrame(rows, columns=columns).drop_duplicates("run_id")
        parts.append(kept.assign(_hidden_runs=int(runs) - len(kept)))
    if not parts:
        return rollups.empty_runs().assign(_hidden_runs=pd.Series(dtype="int64"))
    return pd.concat(parts, ignore_index=True)


class _Scan:
    """The filtered read of the stats files of one call: SQL text plus its ``?`` parameters."""

    def __init__(self, source, since, until, **filters) -> None:
        # A list of files (what HistoryStore.files() says to read, each row once) or a stats
        # directory to glob (fine for histories that no compaction is touching).
        self.paths: list[str] | str | None
        self.dataset = None
        # Only a globbed directory is pruned by the date= partition here: a file list or dataset
        # is already pruned by day, and a row's day is its own time, not its folder's name.
        self.globbed = not isinstance(source, (ds.Dataset, list, tuple))
        if isinstance(source, ds.Dataset):
            self.dataset, self.paths = source, None
            has_files = bool(getattr(source, "files", True))
        elif isinstance(source, (list, tuple)):
            self.paths = [path if isinstance(path, str) else Path(path).as_posix() for path in source]
            has_files = bool(self.paths)
        else:
            root = Path(source)
            self.paths = (root / "date=*" / "*.parquet").as_posix()
            has_files = root.is_dir() and next(root.glob("date=*/*.parquet"), None) is not None
        self.since = parse_time(since, "since")
        self.until = parse_time(until, "until")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigError(f"since ({self.since.isoformat()}) must be before until ({self.until.isoformat()})")
        self.filters = {name: _values(value, name) for name, value in filters.items()}
        self.empty = (
            not has_files
            or any(values == [] for values in self.filters.values())
        )

    def where(self) -> tuple[str, list]:
        conditions = ["collected_at IS NOT NULL"]
        params: list = []
        # Conditions on the partition column let DuckDB skip whole date= folders of a globbed
        # directory; the exact bounds on collected_at then trim the first and last day.
        pruned = self.globbed
        if self.since is not None:
            conditions += ["date >= ?"] * pruned + ["collected_at >= ?"]
            params += [self.since.date()] * pruned + [self.since.to_pydatetime()]
        if self.until is not None:
            conditions += ["date <= ?"] * pruned + ["collected_at < ?"]
            params += [(self.until - pd.Timedelta(microseconds=1)).date()] * pruned + [self.until.to_pydatetime()]
        for name, values in self.filters.items():
            if values is not None:
                placeholders = ", ".join("?" * len(values))
                conditions.append(f"{_FILTER_COLUMNS[name]} IN ({placeholders})")
                params += values
        return " AND ".join(conditions), params

    def gauges_cte(self, step: int, origin: int) -> str:
        """``WITH ... gauges``: per bucket and series, the last snapshot as the struct ``last``.

        Both forms pick the greatest (collected_at, run_id, counts), exactly as analysis'
        sort-and-keep-last does.  ``max`` over a struct compares field by field, so one
        streaming aggregate does it: measured ~5x faster than ``QUALIFY row_number()`` when a
        bucket holds many snapshots of a series.  When buckets are about as fine as the
        collection interval (nearly one snapshot per group) the hash table would hold every
        row, and the window form is faster and needs less than half the memory.
        """
        step, origin = int(step), int(origin)  # integers we computed: safe to inline
        counts = ", ".join(analysis.TOTAL_COLUMNS)
        condition, _ = self.where()
        # floor to the bucket in integers: DuckDB's % keeps the dividend's sign
        bucket = f"t - (((t - {origin}) % {step}) + {step}) % {step}"
        if step < _FINE_BUCKET_US:
            descending = ", ".join(f"{c} DESC" for c in ("t", "run_id", *analysis.TOTAL_COLUMNS))
            gauges = f"""
            SELECT bucket, region, project_id, instance_id, task_type,
                   struct_pack({counts}) AS last
            FROM (SELECT {bucket} AS bucket, * FROM snapshots)
            QUALIFY row_number() OVER (
                PARTITION BY bucket, region, project_id, instance_id, task_type
                ORDER BY {descending}) = 1"""
        else:
            gauges = f"""
            SELECT {bucket} AS bucket, region, project_id, instance_id, task_type,
                   max(struct_pack(t, run_id, {counts})) AS last
            FROM snapshots
            GROUP BY ALL"""
        return f"""
        WITH snapshots AS (
            SELECT epoch_us(collected_at) AS t, run_id, region, project_id, instance_id,
                   task_type, {counts}
            FROM {_SOURCE}
            WHERE {condition}
        ), gauges AS ({gauges}
        )"""

    def fetch(self, sql: str, order_by: list[str] | None = None) -> pd.DataFrame:
        return self.fetch_params(sql, self.where()[1], order_by)

    def fetch_params(self, sql: str, params: list, order_by: list[str] | None = None) -> pd.DataFrame:
        """Run ``sql`` whose first parameter is the file list, then ``params``; with
        ``order_by``, the rows are sorted by those columns (ascending, stable) after the fetch,
        whatever order DuckDB handed them back in."""
        connection = _connection()
        if self.dataset is None:
            with interruptible():
                table = connection.sql(sql, params=[self.paths, *params]).to_arrow_table()
        else:
            # DuckDB scans the Arrow dataset with the filters pushed down to it.
            connection.register(_DATASET_VIEW, self.dataset)
            try:
                with interruptible():
                    table = connection.sql(sql.replace(PARQUET_SOURCE, _DATASET_VIEW), params=params).to_arrow_table()
            finally:
                connection.unregister(_DATASET_VIEW)
        if order_by and table.num_rows > 1:
            import pyarrow.compute as pc

            table = table.take(pc.sort_indices(table, [(name, "ascending") for name in order_by]))
        return _to_pandas(table)


def _to_pandas(table) -> pd.DataFrame:
    """A query's Arrow result as pandas: strings straight to the schema's Arrow-backed string
    dtype and zoned timestamps in UTC.  Half the cost of DuckDB's own ``.df()``, which builds a
    Python object per string (0.1 s per 100 000 snapshot rows)."""
    import pyarrow as pa

    from roma_analytics.schema import STRING_DTYPE

    def mapped(kind):
        return STRING_DTYPE if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None

    frame = table.to_pandas(types_mapper=mapped)
    for name, kind in zip(table.column_names, table.schema.types):
        if pa.types.is_timestamp(kind) and kind.tz is not None:
            frame[name] = frame[name].dt.tz_convert("UTC")
    return frame


#: One in-memory DuckDB database per process, and a cursor on it per thread that asked: a
#: cursor costs a tenth of a millisecond, a database tens of milliseconds and a few MiB, and the
#: dashboard runs every rerun of every visitor in a new thread.  Cursors of finished threads are
#: closed when the next thread asks.  DuckDB does not survive a fork (a child that touches DuckDB
#: after its parent used it hangs), so everything is closed just before the process forks and
#: made again when next needed.
_DATABASE: list = []
_CURSORS: dict = {}
_OPEN_LOCK = threading.Lock()


def _close_all() -> None:
    with _OPEN_LOCK:
        for connection in [*_CURSORS.values(), *_DATABASE]:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - a connection that cannot close is dropped anyway
                pass
        _CURSORS.clear()
        _DATABASE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_all)


def _database():
    """The process's DuckDB database (a connection to it), made once; call with _OPEN_LOCK held."""
    if not _DATABASE:
        import duckdb  # only the DuckDB paths pay its import

        database = duckdb.connect(config={"threads": _cores(), "preserve_insertion_order": False})
        try:
            # No progress bar: it would draw on the terminal of a command line or in a server log.
            database.execute("SET GLOBAL enable_progress_bar = false")
        except duckdb.Error:
            pass  # in Jupyter without ipywidgets DuckDB refuses to touch the setting (and draws none)
        try:
            # Files written without a time zone must read as UTC, whatever the host's zone.
            database.execute("SET GLOBAL TimeZone = 'UTC'")
        except duckdb.Error:
            pass  # no ICU extension: DuckDB then knows only UTC anyway
        _DATABASE.append(database)
    return _DATABASE[0]


#: What DuckDB raises when Ctrl-C interrupts a query it runs: a plain RuntimeError with this text
#: (DuckDB 1.5 and 2.0, through the Python client's signal check); ``InterruptException`` where a
#: release raises its own type.
_INTERRUPTED_MESSAGE = "Query interrupted"


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Around a DuckDB query: Ctrl-C during it raises ``KeyboardInterrupt`` (chained to DuckDB's
    error), as it would anywhere else in Python.

    DuckDB catches SIGINT while it runs a query, stops the query and raises
    ``RuntimeError("Query interrupted")`` instead, which the CLI's Ctrl-C handling (exit 130,
    "interrupted") and the dashboard server's start-up did not recognise: a Ctrl-C that landed
    in a query printed a traceback and exited 1, or was reported as a failed warm-up while the
    server went on starting.  Every query of the package runs inside this."""
    try:
        yield
    except Exception as exc:
        if _is_interrupt(exc):
            raise KeyboardInterrupt from exc
        raise


def _is_interrupt(exc: BaseException) -> bool:
    import duckdb

    interrupt = getattr(duckdb, "InterruptException", None)
    return (interrupt is not None and isinstance(exc, interrupt)) or (
        type(exc) is RuntimeError and str(exc) == _INTERRUPTED_MESSAGE)


def _connection():
    """This thread's cursor on the process's DuckDB database (see ``_DATABASE``).  A page asks a
    dozen questions: a new database each time cost more than some of the answers, and one kept
    per thread grew the dashboard's memory by a few MiB a rerun."""
    thread = threading.current_thread()
    with _OPEN_LOCK:
        cursor = _CURSORS.get(thread)
        if cursor is None:
            for finished in [other for other in _CURSORS if not other.is_alive()]:
                try:
                    _CURSORS.pop(finished).close()
                except Exception:  # noqa: BLE001 - closing only frees memory early
                    pass
            cursor = _CURSORS[thread] = _database().cursor()
    return cursor


def _values(value, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{name} must be strings, got {bad[0]!r}")
    return values


def _quote(column: str) -> str:
    # Only validated GROUP_COLUMNS reach here; quoting is belt and braces.
    return '"' + column.replace('"', '""') + '"'


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fleet_rows(files: dict[str, list], cutoff: pd.Timestamp, projects=None, instances=None, regions=None):
    """The DuckDB twin of :func:`roma_analytics.fleet.reduce_history`, over Parquet files.

    ``files`` maps ``stats``, ``errors`` and ``scopes`` to the files to read (each row once, as
    ``HistoryStore.files`` lists them); ``stats@scope`` and ``errors@scope``, when given, are the
    files the scope runs and future runs are inferred from (default: ``stats`` and ``errors``).  Returns ``(top_stats, top_errors, inferred, scopes,
    future)``: the last ``fleet.SNAPSHOTS_KEPT`` snapshots of each series and errors rows of each
    instance at or before ``cutoff``; one row per (run, scope) found in stats or errors with
    ``_discovery_failed``; the recorded scope rows at or before ``cutoff``; and the (run, scope)
    pairs stamped after it.  Only these rows reach pandas, whatever the history's length.
    """
    from roma_analytics import fleet, schema

    kept = int(fleet.SNAPSHOTS_KEPT)
    filters = dict(projects=projects, instances=instances, regions=regions)
    scope_filters = dict(projects=projects, regions=regions)
    cut = cutoff.to_pydatetime()

    def frame(table, sql_of, with_filters, extra_params=()):
        scan = _Scan(files.get(table, []), None, None, **with_filters)
        if scan.empty:
            return None
        condition, params = scan.where()
        return scan.fetch_params(sql_of(condition), [*params, *extra_params])

    def columns(table):
        return ", ".join(_quote(name) for name in schema.TABLES[table])

    source = _SOURCE
    series = ", ".join(schema.SERIES_KEY)
    instance = "region, project_id, instance_id"
    # The last rows of each group by (collected_at, run_id): max_by(row, key, n) is one streaming
    # hash aggregate, measured ~5x faster than QUALIFY row_number() on 1 M rows.
    def last_rows(table, key):
        return lambda where: f"""
        SELECT unnest(last_rows, recursive := true) FROM (
            SELECT max_by(struct_pack({columns(table)}), struct_pack(collected_at, run_id), {kept}) AS last_rows
            FROM {source} WHERE {where} AND collected_at <= ? GROUP BY {key})"""

    top_stats = frame("stats", last_rows("stats", series), filters, [cut])
    top_errors = frame("errors", last_rows("errors", instance), filters, [cut])
    # Scope runs are judged over every instance of the scope: an instance filter must not make
    # a later run of its project look like it never happened.
    # The scope runs and future runs come from the raw files of the days without a per-run
    # rollup ("stats@scope", ...; default: the same files as the snapshots).
    for table in ("stats", "errors"):
        files.setdefault(f"{table}@scope", files.get(table, []))
    inferred_stats = frame("stats@scope", lambda where: f"""
        SELECT DISTINCT collected_at, run_id, region, project_id, false AS _discovery_failed
        FROM {source} WHERE {where} AND collected_at <= ?""", scope_filters, [cut])
    inferred_errors = frame("errors@scope", lambda where: f"""
        SELECT collected_at, run_id, region, project_id, bool_or(instance_id = '*') AS _discovery_failed
        FROM {source} WHERE {where} AND collected_at <= ? GROUP BY ALL""", scope_filters, [cut])
    scopes = frame("scopes", lambda where: f"""
        SELECT {columns('scopes')} FROM {source} WHERE {where} AND collected_at <= ?""", scope_filters, [cut])
    future = [frame(table, lambda where: f"""
        SELECT DISTINCT run_id, collected_at, region, project_id FROM {source}
        WHERE {where} AND date >= ? AND collected_at > ?""", scope_filters, [cutoff.date(), cut])
        for table in ("stats@scope", "errors@scope", "scopes")]

    def conformed(result, table):
        return schema._empty(schema.TABLES[table]) if result is None else schema.conform(result, table)

    inferred = pd.concat([part for part in (inferred_stats, inferred_errors) if part is not None]
                         or [pd.DataFrame(columns=["collected_at", "run_id", "region", "project_id",
                                                   "_discovery_failed"])], ignore_index=True)
    if len(inferred):
        inferred = inferred.groupby(["collected_at", "run_id", "region", "project_id"], sort=False,
                                    dropna=False)["_discovery_failed"].any().reset_index()
    future = pd.concat([part for part in future if part is not None]
                       or [pd.DataFrame(columns=["run_id", "collected_at", "region", "project_id"])],
                       ignore_index=True)
    return (conformed(top_stats, "stats"), conformed(top_errors, "errors"), inferred,
            conformed(scopes, "scopes"), future)
