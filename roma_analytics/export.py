"""Exports of the history to files other tools read: CSV for spreadsheets, Parquet for engines.

One entry point, :func:`export_table`, loads the filtered rows from a :class:`HistoryStore` and
hands them to a writer chosen from :data:`WRITERS` (format name -> function writing a frame to a
binary file), so a new format is one more entry there.  A writer with a ``load`` attribute loads
its own data (``load(store, since=, until=, projects=, instances=, regions=, table=)``, anything
with ``len()``): OpenMetrics, for example, exports only the latest run.

Every export is written by :func:`roma_analytics._fsio.write_output`: atomically to a file (a
failure never leaves a half-written export nor the temporary file behind, and an existing export
is replaced only by a complete one), streamed to standard output for ``-``, and in place to a
device or FIFO such as ``/dev/stdout``, which is never replaced.

CSV is written by one function, :func:`csv_text` (``export --format csv`` and the dashboard's
downloads both use it), so that a cell can never become a formula or a new row, whatever a
server put into an instance name or an error message and whatever separator the spreadsheet
assumes (``,``, or ``;`` in locales with a decimal comma):

* a text cell holding any of :data:`SEPARATORS` (``,`` ``;`` tab ``|`` CR LF) or ``"`` is quoted,
  so no reader splits it into two cells or two rows;
* a formula trigger (:data:`FORMULA_TRIGGERS`: ``=`` ``+`` ``-`` ``@`` tab CR, and their
  full-width forms) at the start of a cell *or right after a separator* gets a ``'`` in front
  (OWASP CSV-injection guidance): even a reader that ignores the quotes and splits on ``;``
  never sees a cell starting with ``=``.  ``'`` s already there are doubled the same way, so
  :func:`csv_restore` gives back the exact text (the dashboard's upload uses it).

Counts are numeric columns and are written unchanged; times are UTC ISO-8601
(``2024-05-01T10:00:00Z``).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from . import schema
from ._fsio import checked_target, write_output
from .errors import ConfigError, NothingMatched
from .openmetrics import write_openmetrics
from .schema import parse_time
from .store import HistoryStore, to_arrow, write_parquet

__all__ = ["export_table", "ExportReport", "WRITERS", "csv_safe", "csv_text", "csv_restore"]

#: Characters that make a spreadsheet treat a cell as a formula (OWASP CSV injection), with the
#: full-width forms some spreadsheets also accept.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
#: Characters that end a cell for one reader or another: the two locales' separators, tab,
#: pipe, and the line ends.
SEPARATORS = (",", ";", "\t", "|", "\r", "\n")
_TRIGGERS = "".join(re.escape(c) for c in FORMULA_TRIGGERS)
_SEPARATORS = "".join(re.escape(c) for c in SEPARATORS)
#: A formula trigger (after any ' already there) at the start of a cell or after a separator.
_FORMULA_START = re.compile(f"(^|[{_SEPARATORS}])('*[{_TRIGGERS}])")
_NEUTRALISED = re.compile(f"(^|[{_SEPARATORS}])'('*[{_TRIGGERS}])")
_NEEDS_QUOTES = re.compile(f'[{_SEPARATORS}"]')


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_table` wrote: ``rows`` data rows to ``path``."""

    rows: int
    path: Path | str


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with text cells neutralised (see the module docstring) and times as ISO-8601
    UTC text, ready for CSV; numeric columns unchanged."""
    cells = {}
    for name, column in frame.items():
        if isinstance(column.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(column):
            cells[name] = _iso_utc(column)
        elif pd.api.types.is_string_dtype(column) or column.dtype == object:
            cells[name] = column.astype(schema.STRING_DTYPE).str.replace(_FORMULA_START, r"\1'\2", regex=True)
        else:
            cells[name] = column
    return pd.DataFrame(cells, index=frame.index)


def csv_text(frame: pd.DataFrame) -> str:
    """``frame`` as CSV text: a header, one ``\\n``-terminated line per row, ``,``-separated.

    Text cells are neutralised (:func:`csv_safe`) and quoted when they hold a separator of either
    locale, a line end or ``"`` (``"`` doubled inside).  Missing values are empty cells.  Readable
    by the csv module, pandas and spreadsheets alike; :func:`csv_restore` undoes the neutralising.
    """
    safe = csv_safe(frame)
    cells = [_csv_cells(column) for _, column in safe.items()]
    header = ",".join(_csv_quoted(str(name)) for name in safe.columns)
    if not cells or safe.empty:
        return header + "\n"
    lines = cells[0].str.cat(cells[1:], sep=",") if len(cells) > 1 else cells[0]
    return header + "\n" + "\n".join(lines.tolist()) + "\n"


def csv_restore(column: pd.Series) -> pd.Series:
    """The text :func:`csv_safe` neutralised, as it was (for CSV exports read back)."""
    return column.astype(schema.STRING_DTYPE).str.replace(_NEUTRALISED, r"\1\2", regex=True)


def _csv_cells(column: pd.Series) -> pd.Series:
    if pd.api.types.is_string_dtype(column) or column.dtype == object:
        text = column.astype(schema.STRING_DTYPE)
        quoted = '"' + text.str.replace('"', '""', regex=False) + '"'
        text = text.mask(text.str.contains(_NEEDS_QUOTES).fillna(False).astype(bool), quoted)
    else:
        text = column.astype("string")
    return text.fillna("").astype(object)


def _csv_quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if _NEEDS_QUOTES.search(text) else text


def _iso_utc(column: pd.Series) -> pd.Series:
    times = column.dt.tz_localize("UTC") if column.dt.tz is None else column.dt.tz_convert("UTC")
    whole = times.dt.strftime("%Y-%m-%dT%H:%M:%S")
    micros = times.dt.microsecond
    # Sub-second parts are kept when present (nothing is silently rounded), in every cell alike.
    if (micros.fillna(0) != 0).any():
        whole = whole + "." + micros.astype("Int64").astype("string").str.zfill(6)
    return (whole + "Z").astype(schema.STRING_DTYPE)


def _write_csv(frame: pd.DataFrame, table: str, file: BinaryIO) -> None:
    file.write(csv_text(frame).encode("utf-8"))


def _write_parquet(frame: pd.DataFrame, table: str, file: BinaryIO) -> None:
    write_parquet(to_arrow(frame, table), file)


#: Format name -> writer(frame conformed to ``table``, table name, binary file).
WRITERS: dict[str, Callable[[pd.DataFrame, str, BinaryIO], None]] = {
    "csv": _write_csv,
    "parquet": _write_parquet,
    "openmetrics": write_openmetrics,
}


def export_table(
    store_or_path,
    out,
    format: str = "csv",
    table: str = "stats",
    since=None,
    until=None,
    projects=None,
    instances=None,
    regions=None,
    labels: dict[str, str] | None = None,
) -> ExportReport:
    """Write the ``table`` rows of the history matching the filters to ``out`` in ``format``.

    ``store_or_path`` is a :class:`HistoryStore` or a history folder.  Filters are those of
    :meth:`HistoryStore.load` (``since`` inclusive, ``until`` exclusive, naive times = UTC).
    ``out`` is a file path in an existing, writable directory (replaced atomically), ``"-"`` for
    standard output, or a device/FIFO written in place.  ``ExportReport.path`` is ``"-"`` or the
    Path written.
    ``labels``: static labels added to every OpenMetrics sample (that format only).

    When no row of the history -- of either table -- matches the filters (a mistyped id, a
    period without runs), :class:`NothingMatched` is raised and ``out`` is left as it was: a
    nightly export must not quietly turn into empty files.  An empty export of a table whose
    filters match rows of the other one (an errors export of a period without errors) is a
    valid, header-only file.
    """
    writer = WRITERS.get(str(format).lower())
    if writer is None:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(WRITERS)}")
    target = checked_target(out, example=f"{table}.{'prom' if format == 'openmetrics' else format}")
    store = store_or_path if isinstance(store_or_path, HistoryStore) else HistoryStore(store_or_path)
    filters = dict(since=since, until=until, projects=projects, instances=instances, regions=regions)
    load = getattr(writer, "load", None)
    data = load(store, table=table, **filters) if load is not None else store.load(table=table, **filters)
    if len(data) == 0:
        _check_something_matches(store, filters, target)
    if labels:
        if writer is not WRITERS["openmetrics"]:
            raise ConfigError("--label applies to --format openmetrics only")
        written = write_output(target, lambda file: writer(data, table, file, labels=labels),
                               what=f"the {table} export")
    else:
        written = write_output(target, lambda file: writer(data, table, file), what=f"the {table} export")
    return ExportReport(rows=len(data), path=written)


def _check_something_matches(store: HistoryStore, filters: dict, target: Path) -> None:
    """Raise :class:`NothingMatched` (saying what the history does hold) when no row of any
    table matches ``filters``."""
    # Cheap on any history: DuckDB stops at the first matching row.
    if any(store.has_rows(table, **filters) for table in ("stats", "errors")):
        return
    what, hint = no_match(store, filters)
    raise NothingMatched(f"{what}: {target} was not written. {hint}")


def no_match(store: HistoryStore, filters: dict) -> tuple[str, str]:
    """``(what, hint)`` for a selection of ``store`` that matches no row: what was asked for
    (the projects, instances and regions of ``filters``, and its ``since``/``until``) and what the
    history holds instead (its instances and projects in that period, from the daily snapshots),
    for the message of a :class:`NothingMatched` that ``export`` and ``report`` raise."""
    wanted = [f"{name} {', '.join(map(str, [values] if isinstance(values, str) else values))}"
              for name, values in (("project", filters.get("projects")), ("instance", filters.get("instances")),
                                   ("region", filters.get("regions"))) if values is not None]
    period = "".join(f" {word} {parse_time(filters[key], key).isoformat()}"
                     for word, key in (("since", "since"), ("until", "until")) if filters.get(key) is not None)
    # What the period holds, from the daily snapshots (one row per series and day).
    held = store.snapshots("1D", since=filters.get("since"), until=filters.get("until"))
    if held.empty or not wanted:
        return (f"the history {store.path} has no row{period}",
                "Check --since/--until, and that collection still runs")
    projects = sorted(held["project_id"].unique())
    return (f"no row of the history {store.path} matches {' and '.join(wanted)}{period}",
            f"{'In that period the' if period else 'The'} history holds {held['instance_id'].nunique()} "
            f"instance(s) of project(s) {', '.join(projects[:10])}{' ...' if len(projects) > 10 else ''}; "
            "check the ids")
