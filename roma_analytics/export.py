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

CSV cells are made safe to open in a spreadsheet: a text cell starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return is prefixed with ``'`` (OWASP CSV-injection guidance), so it
is shown as text instead of being evaluated as a formula.  Counts are numeric columns and are
written unchanged; times are UTC ISO-8601 (``2024-05-01T10:00:00Z``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from . import schema
from ._fsio import checked_target, write_output
from .errors import ConfigError
from .openmetrics import write_openmetrics
from .store import HistoryStore, to_arrow, write_parquet

__all__ = ["export_table", "ExportReport", "WRITERS", "csv_safe"]

#: Characters that make a spreadsheet treat a cell as a formula (OWASP CSV injection).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_table` wrote: ``rows`` data rows to ``path``."""

    rows: int
    path: Path | str


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with text cells neutralised and times as ISO-8601 UTC text, ready for CSV."""
    cells = {}
    for name, column in frame.items():
        if isinstance(column.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(column):
            cells[name] = _iso_utc(column)
        elif pd.api.types.is_string_dtype(column) or column.dtype == object:
            text = column.astype(schema.STRING_DTYPE)
            risky = text.str.startswith(FORMULA_TRIGGERS).fillna(False).astype(bool)
            cells[name] = text.mask(risky, "'" + text)
        else:
            cells[name] = column
    return pd.DataFrame(cells, index=frame.index)


def _iso_utc(column: pd.Series) -> pd.Series:
    times = column.dt.tz_localize("UTC") if column.dt.tz is None else column.dt.tz_convert("UTC")
    whole = times.dt.strftime("%Y-%m-%dT%H:%M:%S")
    micros = times.dt.microsecond
    # Sub-second parts are kept when present (nothing is silently rounded), in every cell alike.
    if (micros.fillna(0) != 0).any():
        whole = whole + "." + micros.astype("Int64").astype("string").str.zfill(6)
    return (whole + "Z").astype(schema.STRING_DTYPE)


def _write_csv(frame: pd.DataFrame, table: str, file: BinaryIO) -> None:
    text = csv_safe(frame).to_csv(index=False, lineterminator="\n", na_rep="")
    file.write(text.encode("utf-8"))


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
    """
    writer = WRITERS.get(str(format).lower())
    if writer is None:
        raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(WRITERS)}")
    target = checked_target(out, example=f"{table}.{'prom' if format == 'openmetrics' else format}")
    store = store_or_path if isinstance(store_or_path, HistoryStore) else HistoryStore(store_or_path)
    filters = dict(since=since, until=until, projects=projects, instances=instances, regions=regions)
    load = getattr(writer, "load", None)
    data = load(store, table=table, **filters) if load is not None else store.load(table=table, **filters)
    if labels:
        if writer is not WRITERS["openmetrics"]:
            raise ConfigError("--label applies to --format openmetrics only")
        written = write_output(target, lambda file: writer(data, table, file, labels=labels),
                               what=f"the {table} export")
    else:
        written = write_output(target, lambda file: writer(data, table, file), what=f"the {table} export")
    return ExportReport(rows=len(data), path=written)
