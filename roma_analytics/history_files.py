"""Which files of a history may be read, and what to tell the user about the others.

A history is data the product must not lose, also when another program wrote part of it, a disk
damaged a file or someone copied a file to the wrong place.  Every read path of
:class:`~roma_analytics.store.HistoryStore` (``load``, ``runs``, ``files``, ``trend``,
``cdc_vs_common``, ``compact`` and the duplicate check of ``append``) lists its Parquet files
and passes them through :func:`inspect` and :func:`select`; exports, reports, ``check``,
OpenMetrics and the dashboard read through those paths, so one rule holds everywhere:

* **Skipped, with one warning** (:class:`~roma_analytics.errors.HistoryWarning`) naming the file
  and what to do: a file that is not readable Parquet, that a newer roma-analytics wrote (its
  ``roma_analytics.schema_version`` is greater than :data:`~roma_analytics.schema.SCHEMA_VERSION`),
  that holds the other table, that lacks a column of its table, holds a column of a type that
  cannot be read as the contract's (e.g. counts as floating point or text), or has nulls where the
  contract has none.  Its rows are not read (nothing is invented) and the file is left untouched
  (nothing is lost): the user moves it out of the history (``HISTORY/.quarantine/`` is ignored by
  every reader) or upgrades roma-analytics.
* **Read, cast to the contract**: files of other writers with the same columns in other physical
  types -- ``timestamp[ns|ms|s]`` with or without a time zone (naive = UTC; nanoseconds are cut to
  the contract's microseconds), 8/16/32-bit integers, large or dictionary-encoded strings -- and
  with extra columns (which readers ignore, and which ``compact`` never drops: such a file is not
  merged).
* **One row per run, whatever the file names**: the run ids a file holds come from its
  ``roma_analytics.runs`` metadata (or, for other writers, its ``run_id`` column).  A file whose
  runs all come from files already read is a copy: it is skipped with a warning.  Files that share
  only some runs are all read and the shared rows kept once (:attr:`Selection.overlap`; the
  store then deduplicates rows by run id and series).  Preferred, in this order: files in their
  own ``date=`` folder, compacted files, files named after their run (``<run_id>.parquet``), then
  the rest in name order.
* **A run is read whole or not at all**: when a run's ``stats`` file is skipped, its rows of the
  other tables (errors, scopes, abnormal tasks) are not read either -- else a run whose stats are
  unreadable would look like a run that found no instance, and every instance would seem gone.
  Its runs come from the file's run list, or for an unreadable file from its name.
* **A row's day is its own ``collected_at``**, not its folder's name: rows are always filtered by
  their time, never by the ``date`` partition value.  A file whose rows belong to another day
  than its folder is read with one warning saying where it belongs (the folder still decides
  which files a time-bounded read opens, so until it is moved a range that does not include its
  folder's day does not see it), and ``compact`` does not merge it into the wrong day.

:func:`inspect` reads only the Parquet footer of a well-formed roma-analytics file (schema,
key-value metadata, row-group statistics); it reads columns only for files of other writers that
carry no run list or no statistics.  Nothing here writes or moves a file.
"""
from __future__ import annotations

import json
from datetime import timedelta
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema

__all__ = ["FileInfo", "Selection", "inspect", "select", "QUARANTINE"]

META_SCHEMA_VERSION = b"roma_analytics.schema_version"
META_TABLE = b"roma_analytics.table"
META_RUNS = b"roma_analytics.runs"
COMPACTED_PREFIX = "compacted-"
#: Where the warnings suggest moving a file: a dot-folder of the history, which no reader lists.
QUARANTINE = ".quarantine"

_ADVICE_DAMAGED = "move it out of the history (e.g. into {quarantine}/) and restore it from a backup if you have one"
_ADVICE_FOREIGN = ("it was not written by roma-analytics for the {table} table: convert it to the "
                   "{table} schema (docs/architecture.md) or move it out of the history (e.g. into {quarantine}/)")
_ADVICE_NEWER = "upgrade roma-analytics to read it (the file is left untouched)"
_ADVICE_COPY = "it is a copy: delete it or move it out of the history (e.g. into {quarantine}/)"


@dataclass(frozen=True)
class FileInfo:
    """What :func:`inspect` learnt about one history file.

    ``problem`` is ``None`` for a readable file, else why its rows cannot be read (and ``advice``
    says what to do).  ``run_ids`` are the runs it holds; ``runs_meta`` the run list of its
    metadata (``run_id``, ``collected_at`` ISO text: it lists runs without rows too).
    ``first``/``last`` bound its rows' ``collected_at`` (UTC; ``None`` without rows);
    ``other_days`` the UTC days of its rows that are not its folder's.  ``extra_columns`` are
    columns the contract does not have; ``exact`` is true when its physical schema is exactly the
    contract's (readable without any cast).
    """

    path: object            # a Path (folder history) or a "bucket/key" string (object store)
    table: str
    problem: str | None = None
    advice: str = ""
    schema_version: int | None = None
    run_ids: frozenset = frozenset()
    runs_meta: tuple = ()
    rows: int = 0
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    other_days: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()
    exact: bool = False

    @property
    def name(self) -> str:
        return _name(self.path)

    @property
    def compacted(self) -> bool:
        return self.name.startswith(COMPACTED_PREFIX)

    @property
    def mergeable(self) -> tuple[bool, str]:
        """Whether ``compact`` may rewrite this file into a merged one without losing anything,
        and if not, why (for the message that says it was left in place)."""
        if self.problem:
            return False, self.problem
        if self.extra_columns:
            return False, (f"has column(s) {', '.join(self.extra_columns)} that roma-analytics "
                           f"{schema.SCHEMA_VERSION} does not know (merging would drop them)")
        if self.other_days:
            return False, f"holds rows of {', '.join(self.other_days)}, not of its folder's day"
        return True, ""

    def warning(self, history, shown: Callable = str) -> str:
        """The one message for a skipped or misplaced file: which file, what is wrong, what to do.
        ``history`` is the history's folder or URI; ``shown(path)`` how a path is shown."""
        quarantine = f"{str(history).rstrip('/')}/{QUARANTINE}"
        advice = self.advice.format(quarantine=quarantine, table=self.table)
        if self.problem:
            return (f"skipped the history file {shown(self.path)}: it {self.problem}; its rows are not read. "
                    f"To fix: {advice}")
        table_folder = str(self.path).rstrip("/").rsplit("/", 2)[0]
        target = shown(f"{table_folder}/date={self.other_days[0]}")
        return (f"the history file {shown(self.path)} holds rows of {', '.join(self.other_days)}, not of its "
                f"folder's day: they are read only when that folder's day is in the range read. To fix: move it "
                f"into {target}/")


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select`: the ``files`` to read (in path order), the ``skipped`` ones
    (each with a ``problem``, to warn about), the ``superseded`` merged files (all of whose runs a
    fuller merged file holds: what two compactions of one day at once leave on an object store,
    not worth a warning), the read files that are ``misplaced``, and whether two read files share
    a run (``overlap``: rows must then be deduplicated by run id and series)."""

    files: tuple[FileInfo, ...] = ()
    skipped: tuple[FileInfo, ...] = ()
    overlap: bool = False
    misplaced: tuple[FileInfo, ...] = ()
    superseded: tuple[FileInfo, ...] = ()
    #: Runs whose stats file was skipped: their rows of the other tables are not read either.
    excluded_runs: frozenset = frozenset()

    @property
    def paths(self) -> list:
        return [info.path for info in self.files]


def inspect(path, table: str, opener: Callable = lambda path: open(path, "rb")) -> FileInfo:
    """Look at the history file ``path`` of ``table`` (a key of ``schema.TABLES``) without reading
    its data when the footer says enough.  Never raises for a bad file: the problem is in
    :attr:`FileInfo.problem`.  ``opener(path)`` opens it for binary reading (a backend's open)."""
    info = FileInfo(path=path, table=table)
    try:
        with opener(path) as handle:
            parquet = pq.ParquetFile(handle)
            return _checked(parquet, info)
    except FileNotFoundError:
        raise  # gone meanwhile (a compaction's swap): the caller's business, not a damaged file
    except (OSError, pa.ArrowException, ValueError) as exc:
        # Its runs can only be told by its name (<run_id>.parquet, as roma-analytics writes them).
        named = info.name[: -len(".parquet")] if info.name.endswith(".parquet") and not info.compacted else ""
        return replace(info, problem=f"is not a readable Parquet file ({short_error(exc)})", advice=_ADVICE_DAMAGED,
                       run_ids=frozenset([named]) if named else frozenset())


def damaged(info: FileInfo, exc: BaseException) -> FileInfo:
    """``info`` marked unreadable after reading its data failed with ``exc``."""
    return replace(info, problem=f"cannot be read ({short_error(exc)})", advice=_ADVICE_DAMAGED)


def select(infos: Iterable[FileInfo]) -> Selection:
    """Split inspected files into those to read and those to skip; one file per run (see the
    module docstring for the order of preference)."""
    infos = list(infos)
    readable = [info for info in infos if info.problem is None]
    skipped = [info for info in infos if info.problem is not None]
    preferred = sorted(readable, key=lambda info: (
        bool(info.other_days), not info.compacted, -len(info.run_ids) if info.compacted else 0,
        info.name[: -len(".parquet")] not in info.run_ids, str(info.path)))
    chosen, seen, first_holder, overlap, superseded = [], set(), {}, False, []
    for info in preferred:
        if info.run_ids and info.run_ids <= seen:
            holders = {first_holder[run] for run in info.run_ids}
            if info.compacted and all(holder.compacted for holder in holders):
                superseded.append(info)
                continue
            skipped.append(replace(
                info, advice=_ADVICE_COPY,
                problem=f"holds only run(s) already read from {', '.join(sorted(str(h.path) for h in holders))}",
            ))
            continue
        overlap = overlap or bool(info.run_ids & seen)
        for run in info.run_ids - seen:
            first_holder[run] = info
        seen |= info.run_ids
        chosen.append(info)
    chosen.sort(key=lambda info: str(info.path))
    return Selection(files=tuple(chosen), skipped=tuple(skipped), overlap=overlap,
                     misplaced=tuple(info for info in chosen if info.other_days), superseded=tuple(superseded))


def cast_to_contract(arrow: pa.Table, table: str) -> pa.Table:
    """``arrow`` (any readable layout) as the contract's Arrow types, only the contract's columns.

    Naive times are UTC; finer than microsecond times are cut to microseconds, as DuckDB does.
    """
    from .store import arrow_schema  # the store owns the physical schema

    target = arrow_schema(table)
    columns = []
    for wanted in target:
        column = arrow.column(wanted.name)
        if pa.types.is_timestamp(column.type) and column.type.tz is None:
            column = column.cast(pa.timestamp(column.type.unit, tz="UTC"))
        columns.append(column.cast(wanted.type, safe=not pa.types.is_timestamp(column.type)))
    return pa.table(columns, schema=target)


# --------------------------------------------------------------------------------------------

def _checked(parquet: pq.ParquetFile, info: FileInfo) -> FileInfo:
    table = info.table
    metadata = parquet.schema_arrow.metadata or {}
    found = parquet.schema_arrow
    info = replace(info, rows=parquet.metadata.num_rows, **_listed_runs(metadata))

    version = metadata.get(META_SCHEMA_VERSION)
    if version is not None:
        try:
            info = replace(info, schema_version=int(version.decode()))
        except (UnicodeDecodeError, ValueError):
            return replace(info, problem=f"has an unreadable schema_version {version[:20]!r}", advice=_ADVICE_FOREIGN)
        if info.schema_version > schema.SCHEMA_VERSION:
            return replace(info, advice=_ADVICE_NEWER, problem=(
                f"was written by a newer roma-analytics (schema version {info.schema_version}; this "
                f"version reads up to {schema.SCHEMA_VERSION})"))
    stored_table = metadata.get(META_TABLE, b"").decode("utf-8", "replace")
    if stored_table and stored_table != table and stored_table in schema.TABLES:
        return replace(info, problem=f"holds the {stored_table} table, not {table}", advice=(
            f"move it into the history's {stored_table}/ folder (same date= folder)"))

    dtypes = schema.TABLES[table]
    missing = [name for name in dtypes if name not in found.names]
    if missing:
        return replace(info, advice=_ADVICE_FOREIGN, problem=(
            f"lacks the {table} column(s) {', '.join(missing)}"))
    from .store import arrow_schema

    contract = arrow_schema(table)
    exact = [found.field(wanted.name).type == wanted.type for wanted in contract]
    wrong = [f"{wanted.name} is {found.field(wanted.name).type}" for wanted, same in zip(contract, exact)
             if not same and not _readable_as(found.field(wanted.name).type, dtypes[wanted.name])]
    if wrong:
        return replace(info, advice=_ADVICE_FOREIGN, problem=(
            f"has column(s) of the wrong type ({'; '.join(wrong)})"))
    info = replace(
        info,
        extra_columns=tuple(name for name in found.names if name not in dtypes),
        exact=all(exact),
    )
    statistics = _column_statistics(parquet, ["collected_at", *_required(table)])
    null_columns = [name for name in _required(table) if statistics[name]["nulls"]]
    if null_columns:
        return replace(info, advice=_ADVICE_FOREIGN, problem=(
            f"has empty (null) values in column(s) {', '.join(null_columns)}, which the {table} table always fills"))
    if not info.run_ids and info.rows:
        run_ids = pc.unique(parquet.read(columns=["run_id"]).column(0).combine_chunks()).to_pylist()
        info = replace(info, run_ids=frozenset(str(run) for run in run_ids if run is not None))
    first, last = statistics["collected_at"]["min"], statistics["collected_at"]["max"]
    if info.rows and first is not None:
        info = replace(info, first=first, last=last, other_days=_other_days(info.path, first, last))
    return info


def _readable_as(arrow_type: pa.DataType, dtype) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if dtype is schema.TIMESTAMP_DTYPE:
        return pa.types.is_timestamp(arrow_type)
    if dtype is schema.STRING_DTYPE:
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
            hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))
    # int64 / Int64: any integer that fits in int64 (not uint64), or an all-null column
    return (pa.types.is_integer(arrow_type) and arrow_type != pa.uint64()) or pa.types.is_null(arrow_type)


def _required(table: str) -> list[str]:
    """Columns the contract always fills: time, run id and the non-nullable integers."""
    return ["collected_at", "run_id", *(name for name, dtype in schema.TABLES[table].items() if dtype == "int64")]


def _column_statistics(parquet: pq.ParquetFile, names: list[str]) -> dict[str, dict]:
    """Per column: null count and, for collected_at, min/max -- from the row-group statistics when
    every row group has them, else from the column itself."""
    names = list(dict.fromkeys(names))
    meta = parquet.metadata
    index = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
    out = {}
    for name in names:
        stats = [meta.row_group(g).column(index[name]).statistics for g in range(meta.num_row_groups)]
        usable = all(s is not None and s.has_null_count for s in stats)
        if name == "collected_at":  # a row group of only nulls has no min/max
            usable = usable and all(s.has_min_max or s.num_values == 0 for s in stats)
        if usable:
            bounds = [(s.min, s.max) for s in stats if s.has_min_max] if name == "collected_at" else []
            out[name] = {
                "nulls": sum(s.null_count for s in stats),
                "min": _utc(min(b[0] for b in bounds)) if bounds else None,
                "max": _utc(max(b[1] for b in bounds)) if bounds else None,
            }
            continue
        column = parquet.read(columns=[name]).column(0)
        minmax = pc.min_max(column) if name == "collected_at" and len(column) else None
        out[name] = {
            "nulls": column.null_count,
            "min": _utc(minmax["min"].as_py()) if minmax is not None and minmax["min"].is_valid else None,
            "max": _utc(minmax["max"].as_py()) if minmax is not None and minmax["max"].is_valid else None,
        }
    return out


def _listed_runs(metadata: dict) -> dict:
    """``runs_meta`` and ``run_ids`` from the file's ``roma_analytics.runs`` (empty without one)."""
    raw = metadata.get(META_RUNS)
    if raw is None:
        return {}
    try:
        runs_meta = tuple((str(run["run_id"]), str(run["collected_at"])) for run in json.loads(raw))
    except (ValueError, TypeError, KeyError):
        return {}  # an unreadable run list: the rows still say which runs the file holds
    return {"runs_meta": runs_meta, "run_ids": frozenset(run for run, _ in runs_meta)}


def _utc(value) -> pd.Timestamp | None:
    if value is None:
        return None
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _other_days(path, first: pd.Timestamp, last: pd.Timestamp) -> tuple[str, ...]:
    parts = str(path).rstrip("/").rsplit("/", 2)
    folder = parts[-2] if len(parts) > 1 else ""
    if not folder.startswith("date="):
        return ()
    day = folder[len("date="):]
    first_day, last_day = first.date(), last.date()
    if first_day == last_day:  # every run file: one time
        return () if first_day.isoformat() == day else (first_day.isoformat(),)
    days = (first_day + timedelta(days=n) for n in range((last_day - first_day).days + 1))
    return tuple(d.isoformat() for d in days if d.isoformat() != day)


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
