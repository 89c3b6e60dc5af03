"""What the Streamlit dashboard (``app.py``) computes, as plain functions that never import streamlit.

``app.py`` is widgets and calls; everything it shows comes from here, from
:mod:`roma_analytics.analysis` and from :mod:`roma_analytics.charts`, so it can be tested without a
browser or a Streamlit runtime:

* **sources**: the bundled sample history, a history folder (``ROMA_HISTORY``), uploaded CSV or
  Parquet exports (:func:`read_uploads`, strict: a bad file is one :class:`ConfigError` saying what
  is wrong), and live collection (:func:`form_targets`, :func:`auth_from_settings`);
* **filters**: :class:`Filters`, applied to a :class:`PreparedHistory` by :func:`apply_filters`;
* **downloads**: :func:`csv_bytes` (the CLI export's formula neutralisation) and
  :func:`parquet_bytes`.

Why a :class:`PreparedHistory`: the dashboard must stay interactive on a million rows.  Once per
source and resolution it keeps, per time bucket and series, only the last snapshot (the gauge the
aggregation semantics would pick anyway), sorted, with integer codes for the filter columns.
Because the time filter is whole UTC days and every resolution divides a day, each analysis run on
those rows returns exactly what it returns on the filtered raw history — but on a twelfth of the
rows for 5-minute collection at hourly resolution, and without re-sorting strings per filter.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from roma_analytics import analysis, fleet, schema, settings
from roma_analytics.display import LABEL_LIMIT, visible
from roma_analytics.errors import ConfigError, HistoryWarning
from roma_analytics.export import csv_restore, csv_text
from roma_analytics.fleet import age_text
from roma_analytics.history_backend import is_object_store_uri
from roma_analytics.store import HistoryStore, to_arrow, write_parquet

__all__ = [
    "HISTORY_ENV",
    "REFRESH_ENV",
    "app_path",
    "refresh_seconds",
    "freshness_text",
    "RESOLUTIONS",
    "Filters",
    "PreparedHistory",
    "FilteredHistory",
    "history_from_env",
    "load_history",
    "history_fingerprint",
    "read_upload",
    "read_uploads",
    "prepare",
    "apply_filters",
    "auto_resolution",
    "instance_options",
    "instance_from_point",
    "ENDPOINTS_ENV",
    "allowed_endpoints",
    "check_endpoint",
    "auth_from_settings",
    "form_targets",
    "error_tasks",
    "csv_bytes",
    "for_display",
    "parquet_bytes",
    "ratio_text",
    "age_text",
    "load_scopes",
    "count_text",
    "delta_points_text",
    "ratio_change",
]

#: The environment variable naming the history folder the dashboard opens.
HISTORY_ENV = settings.HISTORY_ENV
#: The environment variable giving how often (seconds) an open dashboard checks for new runs.
REFRESH_ENV = "ROMA_DASHBOARD_REFRESH"
DEFAULT_REFRESH_SECONDS = 30.0
#: Time resolutions offered; each divides a day, so whole-day time filters cut at bucket edges.
RESOLUTIONS: tuple[str, ...] = ("5min", "15min", "1h", "6h", "1D")
_US_PER_DAY = 86_400_000_000
#: Uploads larger than this are refused before parsing (a history export, not a data lake).
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
_STRING_COLUMNS = {name for name, dtype in schema.STATS_DTYPES.items() if dtype is schema.STRING_DTYPE} | {
    name for name, dtype in schema.ERRORS_DTYPES.items() if dtype is schema.STRING_DTYPE
}
_INTEGER_COLUMNS = (*analysis.TOTAL_COLUMNS, "attempts")


# --------------------------------------------------------------------------------------------
# Sources


def app_path() -> Path:
    """The Streamlit script of the dashboard, shipped inside the package
    (``roma_analytics/streamlit_app/app.py``).  ConfigError when it is missing."""
    from roma_analytics.streamlit_app import APP_PATH

    if not APP_PATH.is_file():
        raise ConfigError(f"the dashboard script {APP_PATH} is missing; reinstall roma-analytics")
    return APP_PATH


def refresh_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How often an open dashboard looks for new runs: ``ROMA_DASHBOARD_REFRESH`` seconds (at
    least 1), else 30.  ConfigError on a value that is not a positive number."""
    value = (os.environ if environ is None else environ).get(REFRESH_ENV, "").strip()
    if not value:
        return DEFAULT_REFRESH_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{REFRESH_ENV}={value!r} is not a number of seconds; use e.g. 30")
    return max(seconds, 1.0)


def freshness_text(then, now) -> str:
    """How long before ``now`` ``then`` was, for the freshness caption: "just now", "12 min ago",
    "3 h 5 min ago", "16 d ago" (:func:`roma_analytics.fleet.age_text`); "in the future (clock
    skew?)" for a time more than a minute after ``now``."""
    age = pd.Timestamp(now) - pd.Timestamp(then)
    if age < -pd.Timedelta(minutes=1):
        return "in the future (clock skew?)"
    if age < pd.Timedelta(minutes=1):
        return "just now"
    return f"{fleet.age_text(age)} ago"


def history_from_env(environ: Mapping[str, str] | None = None) -> Path | str | None:
    """The history folder (a Path) or ``s3://`` URI (a str) named by ``ROMA_HISTORY`` (``None``
    when unset or blank)."""
    value = (os.environ if environ is None else environ).get(HISTORY_ENV, "").strip()
    if is_object_store_uri(value):
        return value
    return Path(value).expanduser() if value else None


def load_history(path: str | os.PathLike, problems: list | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(stats, errors)`` of the history folder or ``s3://`` URI ``path``; ConfigError when there is none.

    A damaged or foreign file is skipped (the rest of the history still loads); ``problems``, when
    given, receives one message per such file, naming it and what to do, for the page to show.
    """
    if is_object_store_uri(path):
        if not HistoryStore(path).exists():
            raise ConfigError(f"history {path} does not exist (nothing under that prefix); give the URI "
                              "`roma-analytics collect --history` writes to")
        stats, errors = _read_tables(path, ("stats", "errors"), problems)
        return stats, errors
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"history folder {folder} does not exist; give the folder `roma-analytics collect "
            "--history` writes to (it holds stats/ and errors/)"
        )
    HistoryStore(folder)  # a folder of other things: its ConfigError before anything else
    if not (folder / "stats").is_dir():
        raise ConfigError(f"{folder} holds no stats/ folder yet; collect a run into it first")
    stats, errors = _read_tables(folder, ("stats", "errors"), problems)
    return stats, errors


def open_history(path: str | os.PathLike) -> HistoryStore:
    """The :class:`HistoryStore` of the history folder or ``s3://`` URI ``path``; ConfigError, saying
    what to do, when there is none (the checks of :func:`load_history`, nothing read)."""
    if is_object_store_uri(path):
        store = HistoryStore(path)
        if not store.exists():
            raise ConfigError(f"history {path} does not exist (nothing under that prefix); give the URI "
                              "`roma-analytics collect --history` writes to")
        return store
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"history folder {folder} does not exist; give the folder `roma-analytics collect "
            "--history` writes to (it holds stats/ and errors/)"
        )
    store = HistoryStore(folder)  # a folder of other things: its ConfigError before anything else
    if not (folder / "stats").is_dir():
        raise ConfigError(f"{folder} holds no stats/ folder yet; collect a run into it first")
    return store


def store_resolution(store: HistoryStore) -> str:
    """:func:`auto_resolution` of a history on disk, from its first and last day only."""
    span = store.time_span()
    if span is None:
        return "1h"
    return auto_resolution(pd.DataFrame({"collected_at": list(span)}))


def load_scopes(path: str | os.PathLike, problems: list | None = None) -> pd.DataFrame:
    """The ``scopes`` table of the history folder ``path`` (empty for histories without one);
    ``problems`` as in :func:`load_history`."""
    (scopes,) = _read_tables(path if is_object_store_uri(path) else Path(path).expanduser(), ("scopes",), problems)
    return scopes


def _read_tables(folder, tables, problems: list | None) -> list[pd.DataFrame]:
    store = HistoryStore(folder)
    with warnings.catch_warnings():
        # With a list to fill, the page shows the warnings; else Python's default shows them.
        warnings.simplefilter("ignore" if problems is not None else "default", HistoryWarning)
        frames = [store.load(table=table) for table in tables]
    if problems is not None:  # one message per file, however many tables were read
        problems.extend(problem for problem in store.problems if problem not in problems)
    return frames


def history_fingerprint(path: str | os.PathLike) -> tuple[int, int]:
    """``(files, newest mtime in ns)`` of a history's Parquet files: changes when a run is appended
    or a day compacted, so a cache keyed on it reloads exactly then."""
    if is_object_store_uri(path):
        return HistoryStore(path).fingerprint()
    newest, count = 0, 0
    for table in schema.TABLES:
        for file in Path(path).expanduser().glob(f"{table}/date=*/*.parquet"):
            try:
                newest = max(newest, file.stat().st_mtime_ns)
            except OSError:  # swapped by a compaction between listing and stat
                continue
            count += 1
    return count, newest


def read_uploads(files: Iterable[tuple[str, bytes]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(stats, errors)`` from uploaded exports ``(file name, content)``, each a stats or errors
    table (told apart by its columns).  ConfigError naming the file on any problem; uploading no
    stats file at all is one too, since there would be nothing to show."""
    stats, errors = [], []
    for name, content in files:
        table, frame = read_upload(content, name)
        (stats if table == "stats" else errors).append(frame)
    if not stats:
        raise ConfigError(
            "no stats table among the uploaded files; upload the output of "
            "`roma-analytics export --table stats` (CSV or Parquet), with the errors export beside it if you like"
        )
    return (
        pd.concat(stats, ignore_index=True) if len(stats) > 1 else stats[0],
        pd.concat(errors, ignore_index=True) if len(errors) > 1 else errors[0] if errors else schema.empty_errors(),
    )


def read_upload(content: bytes, file_name: str = "upload") -> tuple[str, pd.DataFrame]:
    """Parse one uploaded export into ``(table, frame)`` with ``table`` ``"stats"`` or ``"errors"``.

    Parquet is recognised by its magic bytes, anything else is read as UTF-8 CSV (as written by
    ``roma-analytics export``: the ``'`` that neutralised a formula-like cell is removed again).
    The frame has exactly the schema's columns and dtypes; extra columns are dropped.  Missing
    columns, unparseable times, counts that are not non-negative integers, a ``total`` that is not
    the sum of the four counts, or an unknown task type are a :class:`ConfigError` naming the file
    and the problem; no other exception escapes.
    """
    label = Path(str(file_name)).name or "upload"
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise ConfigError(f"{label}: expected the file's bytes, got {type(content).__name__}")
    content = bytes(content)
    if len(content) > MAX_UPLOAD_BYTES:
        raise ConfigError(f"{label} is larger than {MAX_UPLOAD_BYTES // 2**20} MB; export a shorter time range")
    if not content.strip():
        raise ConfigError(f"{label} is empty; upload a CSV or Parquet export of the history")
    raw = _read_parquet(content, label) if content[:4] == b"PAR1" else _read_csv(content, label)
    raw.columns = [str(name).strip() for name in raw.columns]
    if raw.columns.duplicated().any():
        duplicated = sorted(set(raw.columns[raw.columns.duplicated()]))
        raise ConfigError(f"{label} has the column(s) {', '.join(duplicated)} more than once")
    table = _table_of(raw, label)
    return table, _validated(raw, table, label)


def _read_parquet(content: bytes, label: str) -> pd.DataFrame:
    try:
        arrow = pq.read_table(io.BytesIO(content))
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ConfigError(f"{label} is not a readable Parquet file ({_short(exc)}); upload a roma-analytics export") from None
    # Unknown Parquet types (lists, structs, dictionaries of them) are refused column by column in
    # _validated; converting to pandas first keeps everything in one place.
    try:
        return arrow.to_pandas(types_mapper=_string_mapper, ignore_metadata=True)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{label}: cannot convert the Parquet columns ({_short(exc)})") from None


def _string_mapper(arrow_type):
    return pd.StringDtype() if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else None


def _read_csv(content: bytes, label: str) -> pd.DataFrame:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{label} is neither Parquet nor UTF-8 text (byte {exc.start} is not UTF-8); "
            "upload a CSV or Parquet export"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{label} contains NUL bytes: not a CSV export; upload a CSV or Parquet export")
    try:
        # Everything as text first: the counts are checked to be integers below rather than
        # silently turned into floats, and ids such as "007" keep their zeros.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""],
                            skipinitialspace=False, engine="c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeError, OverflowError) as exc:
        raise ConfigError(f"{label} is not a readable CSV file ({_short(exc)})") from None
    for name in frame.columns:
        frame[name] = csv_restore(frame[name])  # "'=x" was "=x" in the history
    return frame


#: The tables an upload can be: the exports of `roma-analytics export --table stats|errors`.
_UPLOAD_TABLES = ("stats", "errors")


def _table_of(frame: pd.DataFrame, label: str) -> str:
    columns = set(frame.columns)
    wanted = {table: list(schema.TABLES[table]) for table in _UPLOAD_TABLES}
    missing = {table: [c for c in names if c not in columns] for table, names in wanted.items()}
    for table in _UPLOAD_TABLES:
        if not missing[table]:
            return table
    # Name a table only when the file has columns of it that the other table lacks: a file that
    # is nearly an export of one table is told what that table misses; anything else is told it
    # is neither (a random CSV is no more an "errors" export than a "stats" one).
    own = {table: columns & (set(wanted[table]) - set(wanted[other]))
           for table, other in zip(_UPLOAD_TABLES, reversed(_UPLOAD_TABLES))}
    if bool(own["stats"]) != bool(own["errors"]):
        table = "stats" if own["stats"] else "errors"
        raise ConfigError(
            f"{label} is not a complete roma-analytics {table} export: it lacks the column(s) "
            f"{', '.join(missing[table])}; export it with `roma-analytics export --table {table}`"
        )
    shown = ", ".join(sorted(map(str, columns))[:8]) + (", …" if len(columns) > 8 else "")
    raise ConfigError(
        f"{label} is not a roma-analytics stats or errors export (its columns are {shown or 'none'}); "
        "upload the CSV or Parquet written by `roma-analytics export --table stats` "
        "(and `--table errors` beside it if you like)"
    )


def _validated(raw: pd.DataFrame, table: str, label: str) -> pd.DataFrame:
    dtypes = schema.TABLES[table]
    columns: dict[str, pd.Series] = {}
    for name, dtype in dtypes.items():
        column = raw[name].reset_index(drop=True)
        if column.dtype == object and column.map(lambda v: isinstance(v, (list, dict, bytes, np.ndarray))).any():
            raise ConfigError(f"{label}: column {name} holds nested values; expected {dtype}")
        if dtype is schema.TIMESTAMP_DTYPE:
            columns[name] = _times(column, name, label)
        elif name in _INTEGER_COLUMNS:
            columns[name] = _whole_numbers(column, name, label)
        elif name == "http_status":
            columns[name] = _whole_numbers(column, name, label, nullable=True)
        else:
            columns[name] = _text(column, name, label, required=name not in ("instance_name", "request_id", "error_msg", "http_status"))
    frame = pd.DataFrame(columns)
    if table == "stats":
        counted = frame[list(schema.COUNT_COLUMNS)].sum(axis=1)
        wrong = counted != frame["total"]
        if wrong.any():
            row = int(np.flatnonzero(wrong.to_numpy())[0])
            raise ConfigError(
                f"{label}: total is not running + abnormal + terminated + completed in {int(wrong.sum())} "
                f"row(s), first at data row {row + 1}; the file was edited or is not an export"
            )
        unknown = sorted(set(frame["task_type"].dropna()) - set(schema.TASK_TYPES))
        if unknown:
            raise ConfigError(f"{label}: unknown task_type {', '.join(map(repr, unknown[:3]))}; expected common or cdc")
    try:
        return schema.conform(frame, table)
    except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:  # defensive: checked above
        raise ConfigError(f"{label}: {_short(exc)}") from None


def _times(column: pd.Series, name: str, label: str) -> pd.Series:
    try:
        if pd.api.types.is_datetime64_any_dtype(column):
            times = column.dt.tz_localize("UTC") if column.dt.tz is None else column.dt.tz_convert("UTC")
        else:
            times = pd.to_datetime(column.astype(schema.STRING_DTYPE), utc=True, format="ISO8601")
        times = times.astype(schema.TIMESTAMP_DTYPE)
    except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:
        raise ConfigError(f"{label}: column {name} holds a value that is not an ISO-8601 time ({_short(exc)})") from None
    if times.isna().any():
        raise ConfigError(f"{label}: column {name} is empty in {int(times.isna().sum())} row(s)")
    return times


def _whole_numbers(column: pd.Series, name: str, label: str, nullable: bool = False) -> pd.Series:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        raise ConfigError(f"{label}: column {name} must hold whole numbers, not {column.dtype}")
    try:
        numbers = pd.to_numeric(column.astype(object) if column.dtype == object else column, errors="coerce")
        values = numbers.astype("Float64") if not pd.api.types.is_integer_dtype(numbers) else numbers.astype("Int64")
    except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:
        raise ConfigError(f"{label}: column {name} must hold whole numbers ({_short(exc)})") from None
    given = column.notna() if not pd.api.types.is_string_dtype(column) else column.fillna("").astype(str).str.strip().ne("")
    bad = given.to_numpy(dtype=bool) & values.isna().to_numpy(dtype=bool)
    if not nullable:
        bad |= values.isna().to_numpy(dtype=bool)
    finite = values.fillna(0)
    bad |= ~(finite.astype("float64").map(float.is_integer).to_numpy(dtype=bool)) if values.dtype == "Float64" else False
    bad |= (finite < 0).to_numpy(dtype=bool)
    bad |= (finite.astype("float64") > 2.0**62).to_numpy(dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"{label}: column {name} must hold whole numbers >= 0, but data row {row + 1} holds "
            f"{_cell(column.iloc[row])}"
        )
    return values.astype("Int64") if nullable else values.astype("int64")


def _text(column: pd.Series, name: str, label: str, required: bool) -> pd.Series:
    try:
        text = column.astype(schema.STRING_DTYPE)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise ConfigError(f"{label}: column {name} must hold text ({_short(exc)})") from None
    if required and text.isna().any():
        raise ConfigError(f"{label}: column {name} is empty in {int(text.isna().sum())} row(s)")
    return text


def _cell(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# Preparing and filtering


@dataclass(frozen=True)
class Filters:
    """What the sidebar selected.  ``since``/``until``: UTC days (``until`` exclusive, ``None`` =
    open); the collections: values to keep (``None`` or empty = all)."""

    since: pd.Timestamp | None = None
    until: pd.Timestamp | None = None
    regions: tuple[str, ...] | None = None
    projects: tuple[str, ...] | None = None
    instances: tuple[str, ...] | None = None
    task_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                stamp = pd.Timestamp(value)
                stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
                if stamp != stamp.floor("D"):
                    raise ConfigError(f"{name} must be a whole UTC day (midnight), got {stamp.isoformat()}")
                object.__setattr__(self, name, stamp)
        for name in ("regions", "projects", "instances", "task_types"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(str(v) for v in value) if value else None)
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ConfigError("the time range ends before it starts; pick an end date on or after the start date")


@dataclass(frozen=True, eq=False)
class PreparedHistory:
    """A history ready for instant filtering (see the module docstring).  Read-only.

    ``stats``/``errors``: the full tables, stats sorted by ``analysis.GAUGE_ORDER``;
    ``snapshots``: per ``freq`` bucket and series the last snapshot (real stats rows), sorted by
    bucket; ``snapshot_bucket`` its bucket (int64 µs).
    """

    stats: pd.DataFrame
    errors: pd.DataFrame
    freq: str
    snapshots: pd.DataFrame
    snapshot_bucket: np.ndarray
    stats_time: np.ndarray = field(repr=False)
    #: What the runs covered (``scopes`` table; empty: inferred from the rows).
    scopes: pd.DataFrame = field(default_factory=schema.empty_scopes, repr=False)
    #: The time the fleet state is judged at (see fleet.py); runs stamped later are in ``future``.
    as_of: pd.Timestamp | None = None
    #: Runs stamped after ``as_of`` (a collector's clock is wrong): left out of every view.
    future: pd.DataFrame = field(default_factory=lambda: fleet._future_frame(
        pd.DataFrame(columns=["run_id", "collected_at", "region", "project_id"])), repr=False)
    #: A history read by query (:func:`prepare_store`): ``stats`` is then empty and every view
    #: asks the store for what it shows (the snapshots are kept, the raw rows stay on disk).
    store: HistoryStore | None = field(default=None, repr=False)
    #: The fleet's reduced rows per ``as_of`` (store-backed only; see :func:`_fleet_of`).
    _fleet_rows: dict = field(default_factory=dict, repr=False)
    #: Warnings about damaged, foreign or misplaced files met while reading (shown on the page).
    problems: tuple[str, ...] = ()

    @property
    def _times(self) -> pd.Series:
        return self.snapshots["collected_at"] if self.store is not None else self.stats["collected_at"]

    @property
    def empty(self) -> bool:
        """True when the history holds no stats row."""
        return self._times.empty

    @property
    def first_day(self) -> pd.Timestamp | None:
        return None if self.empty else self._times.iloc[0].floor("D")

    @property
    def last_day(self) -> pd.Timestamp | None:
        return None if self.empty else self._times.iloc[-1].floor("D")

    def values(self, column: str) -> list[str]:
        """The distinct values of a filter column, sorted (for the multiselects)."""
        return sorted(self.snapshots[column].dropna().unique().tolist())


def auto_resolution(stats: pd.DataFrame) -> str:
    """A resolution giving a few hundred points over the history's time span."""
    if stats.empty:
        return "1h"
    span = stats["collected_at"].max() - stats["collected_at"].min()
    if span <= pd.Timedelta(days=2):
        return "15min"
    if span <= pd.Timedelta(days=45):
        return "1h"
    if span <= pd.Timedelta(days=180):
        return "6h"
    return "1D"


def prepare(stats: pd.DataFrame, errors: pd.DataFrame | None, freq: str = "1h",
            scopes: pd.DataFrame | None = None, as_of=None) -> PreparedHistory:
    """Sort ``stats`` once and reduce it to the last snapshot per ``freq`` bucket and series.

    ``as_of``: the present for a live history (rows stamped later than it plus
    ``fleet.DEFAULT_TOLERANCE`` are set aside in ``future`` and shown nowhere); ``None`` for a
    fixed data set (sample, uploads), judged as of its newest row.
    """
    step, _ = analysis.bucket_step(freq)
    if _US_PER_DAY % step:
        raise ConfigError(f"resolution {freq!r} must divide a day; use one of {', '.join(RESOLUTIONS)}")
    stats = schema.conform(stats, "stats")
    errors = schema.empty_errors() if errors is None else schema.conform(errors, "errors")
    scopes = schema.empty_scopes() if scopes is None else schema.conform(scopes, "scopes")
    future = fleet._future_frame(pd.DataFrame(columns=["run_id", "collected_at", "region", "project_id"]))
    if as_of is not None:
        as_of = schema.parse_time(as_of, "as_of")
        cutoff = as_of + fleet.DEFAULT_TOLERANCE
        *_, future = fleet.reduce_history(stats, errors, scopes, cutoff)
        stats = stats[stats["collected_at"] <= cutoff]
        errors = errors[errors["collected_at"] <= cutoff]
        scopes = scopes[scopes["collected_at"] <= cutoff]
    else:
        newest = [frame["collected_at"].max() for frame in (stats, errors) if len(frame)]
        as_of = max(newest) if newest else pd.Timestamp.now(tz="UTC")
    stats = stats.sort_values(list(analysis.GAUGE_ORDER), kind="stable").reset_index(drop=True)
    micros = _micros(stats["collected_at"])
    bucket = micros - micros % step
    series = stats.groupby(list(schema.SERIES_KEY), sort=False, dropna=False).ngroup().to_numpy(dtype="int64")
    # Rows are in gauge order, so the last row of each (bucket, series) is its gauge.
    span = int(series.max()) + 1 if len(series) else 1
    key = (bucket // step) * span + series
    last = np.ones(len(key), dtype=bool)
    if len(key):
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        keep = np.r_[ordered[1:] != ordered[:-1], True]
        last = np.zeros(len(key), dtype=bool)
        last[order[keep]] = True
    rows = np.flatnonzero(last)
    rows = rows[np.argsort(bucket[rows], kind="stable")]
    snapshots = stats.take(rows).reset_index(drop=True)
    errors = errors.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)
    return PreparedHistory(stats=stats, errors=errors, freq=freq, snapshots=snapshots,
                           snapshot_bucket=bucket[rows], stats_time=micros,
                           scopes=scopes.reset_index(drop=True), as_of=as_of, future=future)


#: A history folder whose stats files are smaller than this is loaded whole (``prepare``):
#: DuckDB's per-query cost would then outweigh reading a few hundred thousand rows at most.
SMALL_HISTORY_BYTES = 1 << 20


def stats_bytes(path: str | os.PathLike) -> int | None:
    """The size of a history folder's stats files in bytes (None for an object store)."""
    if is_object_store_uri(path):
        return None
    total = 0
    for folder in Path(path).expanduser().glob("stats/date=*"):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".parquet") and not entry.name.startswith((".", "_")):
                try:
                    total += entry.stat().st_size
                except OSError:  # swapped by a compaction meanwhile
                    continue
    return total


def prepare_folder(path: str | os.PathLike, freq: str = "1h", as_of=None, since=None, until=None) -> PreparedHistory:
    """A history folder or ``s3://`` URI ready for filtering, the cheaper way for its size: a small
    one (stats files under :data:`SMALL_HISTORY_BYTES`) loaded whole (:func:`prepare`, any
    ``since``/``until`` ignored: the whole history is at hand), any other read by query
    (:func:`prepare_store`).  Both give the same views; ``problems`` lists the files skipped."""
    store = open_history(path)
    size = stats_bytes(path)
    if size is not None and size < SMALL_HISTORY_BYTES:
        problems: list[str] = []
        stats, errors = load_history(path, problems)
        scopes = load_scopes(path, problems)
        prepared = prepare(stats, errors, freq, scopes=scopes, as_of=as_of)
        return replace(prepared, problems=tuple(problems))
    prepared = prepare_store(store, freq, as_of=as_of, since=since, until=until)
    return replace(prepared, problems=tuple(store.problems))


def range_resolution(since: pd.Timestamp, until: pd.Timestamp, prepared: PreparedHistory) -> str:
    """:func:`auto_resolution` of the chosen days ``[since, until)``, clipped to the history's
    own span (a range reaching past its last day is no longer than the history)."""
    first = max(since, prepared.snapshots["collected_at"].iloc[0].floor("D")) if len(prepared.snapshots) else since
    last = min(until, prepared.as_of) if prepared.as_of is not None else until
    finer = auto_resolution(pd.DataFrame({"collected_at": [first, max(first, last)]}))
    # Never coarser than the whole history's resolution: a range only ever zooms in.
    order = list(RESOLUTIONS)
    if finer in order and prepared.freq in order and order.index(finer) > order.index(prepared.freq):
        return prepared.freq
    return finer


def prepare_store(store: HistoryStore, freq: str = "1h", as_of=None, since=None, until=None) -> PreparedHistory:
    """A history folder or object store ready for filtering, read by query: its cost follows
    what the page shows, not the history's length.

    Reads the per-bucket snapshots at ``freq`` (``HistoryStore.snapshots``: from the rollups
    where the resolution allows) and the errors table; the fleet state comes from
    ``HistoryStore.fleet_rows`` per filter, raw rows only when a download or the Data tab asks
    for them.  ``as_of`` as in :func:`prepare`.  Views equal those of :func:`prepare` on the
    loaded tables.
    """
    step, _ = analysis.bucket_step(freq)
    if _US_PER_DAY % step:
        raise ConfigError(f"resolution {freq!r} must divide a day; use one of {', '.join(RESOLUTIONS)}")
    horizon = None
    if as_of is not None:
        as_of = schema.parse_time(as_of, "as_of")
        horizon = as_of + fleet.DEFAULT_TOLERANCE + pd.Timedelta(1, "us")
    end = horizon if until is None else (until if horizon is None else min(until, horizon))
    fleet_rows = {}
    if as_of is not None and not is_object_store_uri(str(store.path)):
        # The fleet state the first view shows (its rows as of as_of, see _fleet_of) is read
        # while the snapshots are: two DuckDB queries at once, through a second store object on
        # the folder (a HistoryStore is not shared between threads).
        # A pool per call, shut down at once: its one thread ends with the task (nothing is left
        # behind to break in a forked child).
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="roma-fleet-rows")
        fleet_rows[(as_of, False)] = pool.submit(_quiet_fleet_rows, HistoryStore(store.path), as_of)
        pool.shutdown(wait=False)
    with warnings.catch_warnings():
        # Damaged or foreign files are in store.problems, which the page shows.
        warnings.simplefilter("ignore", HistoryWarning)
        snapshots = store.snapshots(freq, since=since, until=end)
        errors = store.load(table="errors", until=horizon)
    if as_of is None:
        newest = [frame["collected_at"].max() for frame in (snapshots, errors) if len(frame)]
        as_of = max(newest) if newest else pd.Timestamp.now(tz="UTC")
    # snapshots arrive sorted by time and series: the bucket order prepare() gives.
    micros = _micros(snapshots["collected_at"])
    bucket = micros - micros % step
    errors = errors.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)
    return PreparedHistory(stats=schema.empty_stats(), errors=errors, freq=freq, snapshots=snapshots,
                           snapshot_bucket=bucket, stats_time=np.empty(0, dtype="int64"),
                           as_of=as_of, store=store, _fleet_rows=fleet_rows)


def _quiet_fleet_rows(store: HistoryStore, as_of) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)  # the same files' problems are on the page
        return store.fleet_rows(as_of=as_of)


def _micros(times: pd.Series) -> np.ndarray:
    return times.dt.tz_localize(None).to_numpy(dtype="datetime64[us]").view("int64")


def _mask(frame: pd.DataFrame, filters: Filters, with_task_type: bool = True) -> np.ndarray:
    mask = np.ones(len(frame), dtype=bool)
    wanted = {"region": filters.regions, "project_id": filters.projects, "instance_id": filters.instances}
    if with_task_type:
        wanted["task_type"] = filters.task_types
    for column, values in wanted.items():
        if values is not None:
            mask &= frame[column].isin(values).to_numpy(dtype=bool, na_value=False)
    return mask


def _time_range(times: np.ndarray, filters: Filters) -> slice:
    start = 0 if filters.since is None else int(np.searchsorted(times, filters.since.value // 1000, "left"))
    stop = len(times) if filters.until is None else int(np.searchsorted(times, filters.until.value // 1000, "left"))
    return slice(start, stop)


@dataclass(frozen=True, eq=False)
class FilteredHistory:
    """The selection, as small frames every analysis function accepts.

    ``snapshots``: per bucket and series the last snapshot (``analysis.trend``, ``cdc_vs_common``,
    ``anomalies`` on it equal their result on the selected raw rows); ``fleet``: the fleet's
    state at the end of the selected range (:mod:`roma_analytics.fleet`: KPIs, changes, stale
    and disappeared series) over the selected regions, projects, instances and task types;
    ``latest``: its current series as stats rows (``abnormal_ranking``, the breakdown);
    ``errors``: the selected errors rows.
    """

    filters: Filters
    freq: str
    snapshots: pd.DataFrame
    latest: pd.DataFrame
    fleet: fleet.FleetState
    errors: pd.DataFrame
    prepared: PreparedHistory = field(repr=False)

    def raw_stats(self) -> pd.DataFrame:
        """Every selected stats row (for downloads and collection health: the costly path)."""
        if self.prepared.store is not None:
            return self.prepared.store.load(**self._load_filters())
        stats = self.prepared.stats.iloc[_time_range(self.prepared.stats_time, self.filters)]
        return stats[_mask(stats, self.filters)].sort_values(
            ["collected_at", *schema.SERIES_KEY, "run_id"], kind="stable").reset_index(drop=True)

    def _load_filters(self) -> dict:
        f = self.filters
        until = f.until
        if self.prepared.store is not None and self.prepared.as_of is not None:
            horizon = self.prepared.as_of + fleet.DEFAULT_TOLERANCE + pd.Timedelta(1, "us")
            until = horizon if until is None else min(until, horizon)
        return dict(since=f.since, until=until, regions=f.regions, projects=f.projects,
                    instances=f.instances, task_types=f.task_types)

    def stats_count(self) -> int:
        """How many stats rows the selection holds (counted on disk for a store-backed history)."""
        if self.prepared.store is not None:
            return self.prepared.store.count(**self._load_filters())
        return len(self.raw_stats())

    def last_stats(self, n: int = 1000) -> pd.DataFrame:
        """The selection's last ``n`` stats rows (a store-backed history reads back day by day)."""
        if self.prepared.store is None:
            return self.raw_stats().tail(n)
        filters = self._load_filters()
        end = filters.pop("until") or (self.prepared.last_day + pd.Timedelta(days=1))
        start = filters.pop("since")
        parts, found, day_end = [], 0, end
        while found < n and (start is None or day_end > start) and day_end > self.prepared.first_day:
            day_start = (day_end - pd.Timedelta(1, "us")).floor("D")
            if start is not None:
                day_start = max(day_start, start)
            part = self.prepared.store.load(since=day_start, until=day_end, **filters)
            parts.insert(0, part)
            found += len(part)
            day_end = day_start
        frame = pd.concat(parts, ignore_index=True) if parts else schema.empty_stats()
        return frame.tail(n).reset_index(drop=True)

    def health(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(analysis.collection_health, analysis.instance_health)`` of the selection.  A
        store-backed history answers the first from its per-run rollups (unless instances or task
        types are chosen) and reads raw rows only of the instances that failed."""
        store = self.prepared.store
        if store is None:
            stats = self.raw_stats()
            return analysis.collection_health(self.errors, stats), analysis.instance_health(self.errors, stats)
        filters = self._load_filters()
        columns = ["collected_at", "run_id", "region", "project_id", "instance_id"]
        if self.filters.instances or self.filters.task_types:
            stats = store.load(columns=columns, **filters)
            return analysis.collection_health(self.errors, stats), analysis.instance_health(self.errors, stats)
        runs = store.collection_health(since=filters["since"], until=filters["until"],
                                       projects=filters["projects"], regions=filters["regions"])
        failed = sorted(set(self.errors["instance_id"].dropna()) - {fleet.DISCOVERY_INSTANCE_ID})
        stats = store.load(columns=columns, **{**filters, "instances": failed}) if failed else \
            schema.empty_stats()[columns]
        return runs, analysis.instance_health(self.errors, stats)

    def instance_stats(self, instance_id: str) -> pd.DataFrame:
        """The selected snapshots of one instance (its history at the chosen resolution)."""
        rows = self.snapshots[self.snapshots["instance_id"] == instance_id]
        return rows.reset_index(drop=True)


def apply_filters(prepared: PreparedHistory, filters: Filters) -> FilteredHistory:
    """Select ``filters`` from ``prepared``; costs a pass over the bucket snapshots, not the history."""
    window = _time_range(prepared.snapshot_bucket, filters)
    snapshots_all = prepared.snapshots.iloc[window]
    keep = _mask(snapshots_all, filters)
    snapshots = snapshots_all[keep].reset_index(drop=True)

    state = _fleet_of(prepared, filters)
    latest = state.latest_stats()
    errors = prepared.errors
    if filters.since is not None:
        errors = errors[errors["collected_at"] >= filters.since]
    if filters.until is not None:
        errors = errors[errors["collected_at"] < filters.until]
    errors = errors[_mask(errors, filters, with_task_type=False)].reset_index(drop=True)
    return FilteredHistory(filters=filters, freq=prepared.freq, snapshots=snapshots, latest=latest,
                           fleet=state, errors=errors, prepared=prepared)


def _fleet_of(prepared: PreparedHistory, filters: Filters) -> fleet.FleetState:
    """The fleet state at the end of the selected range, over the selected series.

    The start of the range does not matter: a series' latest snapshot may be older than it."""
    as_of = prepared.as_of
    if prepared.store is not None:
        # The reduced rows (two snapshots per series, the scopes' runs) are read once per end of
        # range; a filter then only narrows them: series by all four keys, scopes by theirs.
        cut = filters.until is not None and filters.until <= as_of + fleet.DEFAULT_TOLERANCE
        if cut:  # the range ends before the newest rows: the state of its last instant, exactly
            as_of = min(as_of, filters.until)
        if (as_of, cut) not in prepared._fleet_rows:
            prepared._fleet_rows[(as_of, cut)] = (
                prepared.store.fleet_rows(as_of=filters.until - pd.Timedelta(1, "us"), tolerance=pd.Timedelta(0))
                if cut else prepared.store.fleet_rows(as_of=as_of))
        rows = prepared._fleet_rows[(as_of, cut)]
        if isinstance(rows, concurrent.futures.Future):  # read beside the snapshots (prepare_store)
            rows = prepared._fleet_rows[(as_of, cut)] = rows.result()
        top_stats, top_errors, scope_runs, future, staleness = rows
        if cut:  # rows after the range are not in the future: they are outside the selection
            future = future.iloc[:0]
        scope_filter = Filters(regions=filters.regions, projects=filters.projects)
        return fleet.finish(top_stats[_mask(top_stats, filters)].reset_index(drop=True),
                            top_errors[_mask(top_errors, filters, with_task_type=False)].reset_index(drop=True),
                            scope_runs[_mask(scope_runs, scope_filter, with_task_type=False)].reset_index(drop=True),
                            future, as_of=as_of, staleness=staleness)
    stats, errors, scopes = prepared.stats, prepared.errors, prepared.scopes
    if filters.until is not None:
        stop = int(np.searchsorted(prepared.stats_time, filters.until.value // 1000, "left"))
        stats = stats.iloc[:stop]
        errors = errors[errors["collected_at"] < filters.until]
        scopes = scopes[scopes["collected_at"] < filters.until]
        as_of = min(as_of, filters.until)
    # As for a store-backed history (HistoryStore.fleet_rows): a project's runs are judged over
    # all of its instances, so an instance filter never makes a later run of the project look
    # like it never happened; the series and errors are then narrowed to the selection.
    scope_filter = Filters(regions=filters.regions, projects=filters.projects)
    as_of, cutoff, staleness = fleet._settings(as_of, None, fleet.DEFAULT_TOLERANCE)
    top_stats, top_errors, scope_runs, future = fleet.reduce_history(
        fleet._conformed(stats[_mask(stats, scope_filter, with_task_type=False)], "stats"),
        fleet._conformed(errors[_mask(errors, scope_filter, with_task_type=False)], "errors"),
        fleet._conformed(scopes[_mask(scopes, scope_filter, with_task_type=False)], "scopes"), cutoff)
    return fleet.finish(top_stats[_mask(top_stats, filters)].reset_index(drop=True),
                        top_errors[_mask(top_errors, filters, with_task_type=False)].reset_index(drop=True),
                        scope_runs, future, as_of=as_of, staleness=staleness)


#: Anomaly baselines per resolution, in buckets: a day at hourly and finer resolutions (the
#: daily cycle of a fleet), a week at 6 h and 1 day, so every resolution judges its buckets
#: against a comparable stretch of time and a two-week history has buckets to judge at 1 day.
ANOMALY_WINDOWS = {"5min": 288, "15min": 96, "1h": 24, "6h": 28, "1D": 7}


def anomaly_window(freq: str) -> int:
    """The anomaly baseline (``analysis.anomalies(window=...)``) for resolution ``freq``."""
    return ANOMALY_WINDOWS.get(freq, 24)


def anomaly_note(flagged: pd.DataFrame, freq: str, window: int) -> str:
    """What the anomaly rings of the trend mean and, when few or no buckets could be judged, why:
    ``flagged`` is ``analysis.anomalies(..., window=window)`` (a row per bucket and task type;
    buckets are counted once, rings once per line)."""
    span = pd.to_timedelta(freq) * window
    span_text = f"{span.days} days" if span >= pd.Timedelta(days=2) else f"{span / pd.Timedelta(hours=1):g} h"
    needed = min(window, max(3, window // 2))
    buckets = int(flagged["bucket"].nunique()) if len(flagged) else 0
    judged = int(flagged.loc[flagged["robust_z"].notna(), "bucket"].nunique()) if len(flagged) else 0
    found = int(flagged["is_anomaly"].eq(True).sum()) if len(flagged) else 0
    text = (f"Rings mark anomalies: a {freq} bucket more than 3 robust standard deviations from the median "
            f"of the {window} buckets ({span_text}) before it. {found:,} found in the {judged:,} of "
            f"{buckets:,} bucket{'' if buckets == 1 else 's'} that had at least {needed} earlier buckets "
            f"to compare with.")
    if judged == 0 and buckets < 2:
        # One run (or all runs in one bucket): no resolution gives a bucket earlier buckets.
        text += (f" None could be judged: the selection holds {'no' if buckets == 0 else 'one'} {freq} bucket, "
                 f"and a bucket is judged against at least {needed} earlier ones; collect more runs "
                 f"or widen the time range.")
    elif judged == 0:
        text += (f" None could be judged: the selection is shorter than the {needed} buckets a baseline "
                 f"needs at {freq}; choose a finer resolution or a longer time range.")
    return text


def bucket_count(snapshots: pd.DataFrame, freq: str) -> int:
    """How many ``freq`` buckets the selected snapshots fall in (a trend needs two)."""
    if snapshots.empty:
        return 0
    return int(analysis.bucket_of(snapshots["collected_at"], freq).nunique())


def single_bucket_note(snapshots: pd.DataFrame, freq: str) -> str | None:
    """``None`` when the selection spans at least two ``freq`` buckets, else what a trend needs."""
    if bucket_count(snapshots, freq) >= 2:
        return None
    if snapshots.empty:
        return "No run in the selection."
    at = snapshots["collected_at"].max()
    return (f"The selection holds one {freq} bucket (runs at {at:%Y-%m-%d %H:%M} UTC): a trend needs runs "
            f"in at least two buckets. Collect again later (e.g. `roma-analytics collect --every 1h`), "
            f"choose a finer resolution, or widen the time range.")


def instances_with_tasks(latest: pd.DataFrame) -> int:
    """Instances whose latest selected snapshots hold at least one task (with a task-type filter,
    an instance without tasks of that type is not counted)."""
    if latest.empty:
        return 0
    totals = latest.groupby([*analysis.INSTANCE_KEY], dropna=False)["total"].sum()
    return int((totals > 0).sum())


def instance_scopes(snapshots: pd.DataFrame) -> pd.DataFrame:
    """instance_id, region, project_id of every instance in ``snapshots`` (one row per triple)."""
    return snapshots[["instance_id", "region", "project_id"]].drop_duplicates().astype(object).reset_index(drop=True)


def narrow_instances(options: Mapping[str, str], scopes: pd.DataFrame, regions: Sequence[str] | None,
                     projects: Sequence[str] | None) -> dict[str, str]:
    """The instance picker's ``options`` (id -> label) limited to instances in the chosen regions
    and projects (an empty choice is "all")."""
    keep = scopes
    if regions:
        keep = keep[keep["region"].isin(list(regions))]
    if projects:
        keep = keep[keep["project_id"].isin(list(projects))]
    allowed = set(keep["instance_id"])
    return {instance: label for instance, label in options.items() if instance in allowed}


#: How the failed-instances table names a project-level failure (collect's instance id ``*``).
WHOLE_PROJECT = "whole project (instance discovery failed)"


def failed_instances(health: pd.DataFrame, names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The failed rows of ``analysis.instance_health`` for display: an ``instance`` column first
    with "name (id)" where the name is known, and :data:`WHOLE_PROJECT` for a project whose
    instance list could not be read (instance id ``*``)."""
    failed = health[health["failed"] > 0].reset_index(drop=True)
    names = dict(names or {})

    def label(instance_id) -> str:
        if instance_id == "*":
            return WHOLE_PROJECT
        name = names.get(instance_id)
        return f"{name} ({instance_id})" if isinstance(name, str) and name else str(instance_id)

    shown = failed.drop(columns=["instance_id"])
    shown.insert(0, "instance", failed["instance_id"].map(label).astype(object))
    return shown


def instance_options(latest: pd.DataFrame) -> dict[str, str]:
    """instance_id -> "name (id)" labels for the instance pickers, sorted by label.  Labels are
    for display (:func:`roma_analytics.display.visible`: capped, hidden characters shown)."""
    if latest.empty:
        return {}
    pairs = latest.drop_duplicates("instance_id", keep="last")[["instance_id", "instance_name"]]
    labels = {
        str(row.instance_id): (f"{visible(row.instance_name, LABEL_LIMIT)} ({visible(row.instance_id)})"
                               if isinstance(row.instance_name, str) and row.instance_name
                               else visible(row.instance_id))
        for row in pairs.itertuples(index=False)
    }
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def instance_from_point(point: Mapping | None, latest: pd.DataFrame) -> str | None:
    """The instance_id of a clicked bar of ``charts.state_breakdown``: the id the figure carries in
    the point's ``customdata`` (never parsed from a label), or ``None`` when the point carries
    none or names no instance of ``latest``."""
    if not point or latest.empty:
        return None
    carried = point.get("customdata")
    if isinstance(carried, (list, tuple)):
        carried = carried[0] if carried else None
    if not isinstance(carried, str):
        return None
    return carried if (latest["instance_id"].astype(str) == carried).any() else None


# --------------------------------------------------------------------------------------------
# Live collection




def auth_from_settings(secrets: Mapping | None = None, environ: Mapping[str, str] | None = None,
                       region: str | None = None, project_id: str | None = None):
    """``(auth, where)``: credentials for live collection and a description of their source.

    First ``secrets["roma"]`` (Streamlit's ``st.secrets``): ``token``; or ``ak`` and ``sk``
    (optional ``security_token``); or ``iam_user``, ``iam_password``, ``iam_domain`` (optional
    ``iam_endpoint``).  Then the environment: ``ROMA_AUTH_TOKEN``; ``ROMA_AK``/``ROMA_SK``;
    ``ROMA_IAM_USER``/``ROMA_IAM_PASSWORD``/``ROMA_IAM_DOMAIN``.  ``(None, "none")`` when nothing
    is set (fine for the local simulator).  ``where`` never contains a secret value.
    """
    from roma_analytics.auth import AkSkAuth, IamPasswordAuth, TokenAuth

    section = {}
    if secrets:
        roma = secrets.get("roma", {})
        section = dict(roma) if isinstance(roma, Mapping) else {}
    def value(key):
        item = section.get(key)
        return str(item).strip() if item is not None and str(item).strip() else None
    if value("token"):
        return TokenAuth(value("token")), "token from st.secrets"
    if value("ak") and value("sk"):
        return AkSkAuth(value("ak"), value("sk"), project_id=project_id,
                        security_token=value("security_token")), "AK/SK from st.secrets"
    if value("iam_user") and value("iam_password") and value("iam_domain"):
        return IamPasswordAuth(value("iam_user"), value("iam_password"), value("iam_domain"),
                               project_id=project_id, region=region,
                               iam_endpoint=value("iam_endpoint")), "IAM password from st.secrets"
    return settings.auth_from_env(environ, region=region, project_id=project_id)


#: The environment variable listing the endpoint URLs the live form may collect from (comma or
#: space separated), set by whoever runs the dashboard server; ``[roma] allowed_endpoints`` in
#: ``.streamlit/secrets.toml`` adds to it.
ENDPOINTS_ENV = "ROMA_DASHBOARD_ENDPOINTS"


def _origin(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL (host lower-cased, default port written out)."""
    try:
        parts = urlsplit(str(url).strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    return f"{scheme}://{parts.hostname.lower()}:{port or (443 if scheme == 'https' else 80)}"


def allowed_endpoints(secrets: Mapping | None = None, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The origins (``scheme://host:port``) the live form may send requests and credentials to:
    those listed in ``$ROMA_DASHBOARD_ENDPOINTS`` and in ``secrets["roma"]["allowed_endpoints"]``
    (a list, or one comma/space separated string).  Empty when neither is set: the form then
    collects by region only (the official ``https://roma.<region>.myhuaweicloud.com``).
    ConfigError naming an entry that is not an http(s) URL."""
    environ = os.environ if environ is None else environ
    listed = re.split(r"[\s,]+", environ.get(ENDPOINTS_ENV, "") or "")
    roma = (secrets or {}).get("roma", {})
    extra = roma.get("allowed_endpoints", ()) if isinstance(roma, Mapping) else ()
    listed += re.split(r"[\s,]+", extra) if isinstance(extra, str) else [str(item) for item in extra or ()]
    origins = set()
    for entry in filter(None, (item.strip() for item in listed)):
        origin = _origin(entry)
        if origin is None:
            raise ConfigError(f"the dashboard's endpoint allow-list ({ENDPOINTS_ENV} or [roma] allowed_endpoints) "
                              f"holds {visible(entry)!r}, which is not an http(s) URL; list URLs such as "
                              "https://roma.example.com")
        origins.add(origin)
    return frozenset(origins)


def check_endpoint(endpoint: str, allowed: Iterable[str]) -> None:
    """ConfigError unless the endpoint URL's origin is among ``allowed`` (see
    :func:`allowed_endpoints`): a URL typed into the page never receives the server's credentials."""
    if _origin(endpoint) in set(allowed):
        return
    raise ConfigError(
        f"endpoint {visible(endpoint)!r} is not among the endpoints this dashboard may collect from; "
        f"choose a region instead, or ask whoever runs the dashboard to add it to ${ENDPOINTS_ENV} "
        "or to [roma] allowed_endpoints in .streamlit/secrets.toml")


def form_targets(endpoint: str = "", region: str = "", project_ids: str = "", instance_ids: str = "",
                 auth=None, allowed: Iterable[str] = ()) -> list:
    """Targets from the live form: an endpoint URL or a region, comma/space separated project ids
    and optional instance ids (none: discover each project's RUNNING instances).  An endpoint URL
    must be among ``allowed`` origins (:func:`allowed_endpoints`; by default none is), else a
    ConfigError before any request is sent."""
    from roma_analytics.targets import Target

    endpoint, region = (endpoint or "").strip(), (region or "").strip()
    if not endpoint and not region:
        raise ConfigError("give an endpoint URL or a region to collect from")
    if endpoint and not re.match(r"^https?://[^\s/]+", endpoint):
        raise ConfigError(f"endpoint {visible(endpoint)!r} must be an http(s) URL such as https://roma.cn-north-4.myhuaweicloud.com")
    if endpoint:
        check_endpoint(endpoint, allowed)
    projects = [p for p in re.split(r"[\s,;]+", project_ids or "") if p]
    if not projects:
        raise ConfigError("give at least one project id")
    instances = [i for i in re.split(r"[\s,;]+", instance_ids or "") if i]
    where = dict(endpoint=endpoint or None, region=region or None, auth=auth)
    if not instances:
        return [Target(project_id=p, **where) for p in dict.fromkeys(projects)]
    return [Target(project_id=p, instance_id=i, **where) for p in dict.fromkeys(projects) for i in dict.fromkeys(instances)]


def folder_episodes(path: str | os.PathLike) -> pd.DataFrame:
    """The abnormal-task episodes of a history folder (``episodes.from_history``, DuckDB over
    its files); an empty frame when the history has no ``abnormal_tasks`` table yet."""
    from roma_analytics import episodes

    return episodes.from_history(HistoryStore(Path(path).expanduser()))


def filter_episodes(episodes_frame: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """The episodes (``episodes.EPISODE_COLUMNS``) the sidebar's ``filters`` select: of the chosen
    regions, projects, instances and task types, and abnormal at some time in the chosen days
    (begun before ``until`` and, unless still abnormal, ended after ``since``: an episode that
    began before the range and lasted into it is in it)."""
    if episodes_frame.empty:
        return episodes_frame
    keep = np.ones(len(episodes_frame), dtype=bool)
    for column, chosen in (("region", filters.regions), ("project_id", filters.projects),
                           ("instance_id", filters.instances), ("task_type", filters.task_types)):
        if chosen:
            keep &= episodes_frame[column].astype(object).isin(chosen).to_numpy()
    # Timestamp comparisons are False where a time is missing (NaT): plain bool, no NA to fill.
    if filters.until is not None:
        keep &= (episodes_frame["first_seen"] < filters.until).to_numpy()
    if filters.since is not None:
        ends = episodes_frame["end"]
        keep &= (ends.isna() | (ends > filters.since)).to_numpy()
    return episodes_frame[keep]


def longest_broken(episodes_frame: pd.DataFrame, labels: Mapping | None = None, n: int = 20) -> pd.DataFrame:
    """The fleet's longest-broken tasks: episodes still abnormal first, longest first, then the
    longest that ended.  Columns: task, task_id, instance, project_id, since (UTC), hours,
    still_abnormal, ended; ``labels`` (instance id -> label, as :func:`instance_options` makes)
    name the instances."""
    columns = ["task", "task_id", "instance", "project_id", "since", "hours", "still_abnormal", "ended"]
    if episodes_frame.empty:
        return pd.DataFrame(columns=columns)
    order = episodes_frame.sort_values(["still_open", "duration", "first_seen"], ascending=[False, False, True],
                                       kind="stable").head(n)
    labels = labels or {}
    instance = [labels.get(i) or visible(i, LABEL_LIMIT) for i in order["instance_id"].astype(str)]
    return pd.DataFrame({
        "task": [visible(name if isinstance(name, str) else task, LABEL_LIMIT)
                 for name, task in zip(order["task_name"].astype(object), order["task_id"].astype(str))],
        "task_id": order["task_id"].astype(str).to_numpy(),
        "instance": instance,
        "project_id": order["project_id"].astype(str).to_numpy(),
        "since": order["first_seen"].to_numpy(),
        "hours": (order["duration"].dt.total_seconds() / 3600).round(2).to_numpy(),
        "still_abnormal": order["still_open"].to_numpy(),
        "ended": order["ended"].astype(object).to_numpy(),
    })


#: Columns of the ERROR task list shown in the drill-down, when the API returns them.
TASK_COLUMNS = ("task_name", "task_id", "task_type", "execute_status", "task_tag", "last_modified_time", "created_date")


def error_tasks(targets: Sequence, region: str, project_id: str, instance_id: str, timeout=(3.05, 10.0)) -> pd.DataFrame:
    """The instance's tasks whose ``execute_status`` is ERROR (task-list API, every page), via the
    endpoint and credentials of the live target that covers its project.  RomaError on failure."""
    from roma_analytics.client import RomaClient

    matching = [t for t in targets if t.project_id == project_id]
    target = next((t for t in matching if (t.region or "") == region), matching[0] if matching else None)
    if target is None:
        raise ConfigError(f"project {project_id} is not among the live targets; collect it first")
    where = dict(endpoint=target.endpoint) if target.endpoint else dict(region=target.region)
    with RomaClient(**where, auth=target.auth, timeout=timeout, retries=1) as client:
        tasks = client.list_tasks(project_id, instance_id, execute_status="ERROR")
    frame = pd.DataFrame(tasks)
    if frame.empty:
        return pd.DataFrame(columns=list(TASK_COLUMNS))
    if "last_modified_time" in frame:
        frame["last_modified_time"] = pd.to_datetime(pd.to_numeric(frame["last_modified_time"], errors="coerce"),
                                                     unit="ms", utc=True)
    shown = [c for c in TASK_COLUMNS if c in frame.columns]
    return frame[shown + [c for c in frame.columns if c not in shown]]


# --------------------------------------------------------------------------------------------
# Downloads and number formats


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as UTF-8 CSV, exactly as ``roma-analytics export --format csv`` writes it."""
    return csv_text(frame).encode("utf-8")


def parquet_bytes(frame: pd.DataFrame, table: str = "stats") -> bytes:
    """``frame`` (a stats or errors table) as Parquet bytes, with the history's own schema."""
    sink = io.BytesIO()
    write_parquet(to_arrow(frame, table), sink)
    return sink.getvalue()


def for_display(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` for a table on screen: each text cell as
    :func:`roma_analytics.display.visible` shows it (capped, hidden characters escaped), so an id
    cannot be disguised.  Only for display: downloads use the frame itself."""
    shown = frame.copy()
    for name in shown.columns:
        column = shown[name]
        if pd.api.types.is_string_dtype(column) or column.dtype == object:
            values = {value: visible(value) for value in column.dropna().unique() if isinstance(value, str)}
            shown[name] = column.map(lambda value: values.get(value, value) if isinstance(value, str) else value)
    return shown


def ratio_text(value) -> str:
    """A ratio as "2.9%" ("–" when undefined): :func:`roma_analytics.charts.percent_text`."""
    from roma_analytics.charts import percent_text

    return percent_text(value)


def count_text(value) -> str:
    """A count with thousands separators ("–" when undefined)."""
    return "–" if value is None or pd.isna(value) else f"{int(value):,}"


def delta_points_text(value) -> str | None:
    """A change of a ratio in percentage points ("+2.0 pts", "−2.0 pts", "±0.0 pts" when it
    rounds to zero), ``None`` when undefined: :func:`roma_analytics.charts.points_text`."""
    from roma_analytics.charts import points_text

    return None if value is None or pd.isna(value) else points_text(value)


def ratio_change(change, rise_is_bad: bool = True) -> dict[str, object]:
    """The delta of a ratio's ``st.metric`` tile as keyword arguments: ``delta`` in percentage
    points (:func:`delta_points_text`), with colour and arrow given explicitly rather than guessed
    by Streamlit from a leading "-": a change that rounds to zero is grey with no arrow, a rise is
    red when ``rise_is_bad`` (an abnormal ratio) and green otherwise.  ``{"delta": None}`` when
    undefined (no previous run)."""
    text = delta_points_text(change)
    if text is None:
        return {"delta": None}
    if text.startswith("±"):
        return {"delta": text, "delta_color": "off", "delta_arrow": "off"}
    rise = float(change) > 0
    return {"delta": text, "delta_color": "red" if rise == rise_is_bad else "green",
            "delta_arrow": "up" if rise else "down"}
