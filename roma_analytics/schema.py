"""The tables every part of roma-analytics shares: ``stats``, ``errors``, ``scopes`` and
``abnormal_tasks``.

DESIGN.md fixes their columns and meaning; this module fixes their pandas dtypes, so that
``collect``, the history, the exports and the analysis all agree on one shape, also when a
frame is empty.  Times are UTC with microsecond resolution: that is what Parquet, DuckDB and
CSV exports carry without loss.
"""
from __future__ import annotations

import pandas as pd

from roma_analytics.errors import ConfigError

#: Bump when the stored columns change; written into every Parquet file's metadata.
SCHEMA_VERSION = 1

TIMESTAMP_DTYPE = pd.DatetimeTZDtype(unit="us", tz="UTC")
STRING_DTYPE = pd.StringDtype()

COUNT_COLUMNS: tuple[str, ...] = ("running", "abnormal", "terminated", "completed")
TASK_TYPES: tuple[str, ...] = ("common", "cdc")
#: What identifies one gauge series: one instance's counts of one task type.
SERIES_KEY: tuple[str, ...] = ("region", "project_id", "instance_id", "task_type")
#: Columns an analysis may group by.
GROUP_COLUMNS: tuple[str, ...] = ("region", "project_id", "instance_id", "task_type")

STATS_DTYPES: dict[str, object] = {
    "collected_at": TIMESTAMP_DTYPE,
    "run_id": STRING_DTYPE,
    "region": STRING_DTYPE,
    "project_id": STRING_DTYPE,
    "instance_id": STRING_DTYPE,
    "instance_name": STRING_DTYPE,
    "task_type": STRING_DTYPE,
    "running": "int64",
    "abnormal": "int64",
    "terminated": "int64",
    "completed": "int64",
    "total": "int64",
}

ERRORS_DTYPES: dict[str, object] = {
    "collected_at": TIMESTAMP_DTYPE,
    "run_id": STRING_DTYPE,
    "region": STRING_DTYPE,
    "project_id": STRING_DTYPE,
    "instance_id": STRING_DTYPE,
    "http_status": "Int64",
    "error_code": STRING_DTYPE,
    "error_msg": STRING_DTYPE,
    "request_id": STRING_DTYPE,
    "attempts": "int64",
}

#: What a run covered, one row per scope (region, project_id): so that "absent from the run"
#: can be told from "not collected".  ``discovery`` is ``listed`` (the project's RUNNING
#: instances were listed), ``explicit`` (only instances named in the targets), or ``failed``
#: (the instance list could not be read: absence proves nothing).  ``instances`` is how many
#: instances the run tried in the scope, ``collected`` and ``failed`` how that went.
SCOPES_DTYPES: dict[str, object] = {
    "collected_at": TIMESTAMP_DTYPE,
    "run_id": STRING_DTYPE,
    "region": STRING_DTYPE,
    "project_id": STRING_DTYPE,
    "discovery": STRING_DTYPE,
    "instances": "int64",
    "collected": "int64",
    "failed": "int64",
}
#: ``scopes.discovery`` values.  A run of a scope is *complete* (absence in it means gone) unless
#: its discovery failed.
DISCOVERY_VALUES: tuple[str, ...] = ("listed", "explicit", "failed")
#: What identifies a scope: what one run covers for one project.
SCOPE_KEY: tuple[str, ...] = ("region", "project_id")

#: One row per task that the task-list API reported in ``execute_status`` ERROR, per run, for
#: the instances whose statistics showed abnormal tasks.  ``task_type`` is ``common`` or ``cdc``
#: as in ``stats`` (``cdc`` when the API's ``ext_type`` is CDC); ``api_task_type`` is the API's
#: own ``task_type`` (``REALTIME`` / ``TIMING``).  ``last_modified_time`` is the API's epoch
#: milliseconds as a UTC time.
ABNORMAL_TASKS_DTYPES: dict[str, object] = {
    "collected_at": TIMESTAMP_DTYPE,
    "run_id": STRING_DTYPE,
    "region": STRING_DTYPE,
    "project_id": STRING_DTYPE,
    "instance_id": STRING_DTYPE,
    "task_type": STRING_DTYPE,
    "task_id": STRING_DTYPE,
    "task_name": STRING_DTYPE,
    "api_task_type": STRING_DTYPE,
    "execute_status": STRING_DTYPE,
    "status": "Int64",
    "task_tag": STRING_DTYPE,
    "created_date": TIMESTAMP_DTYPE,
    "last_modified_time": TIMESTAMP_DTYPE,
}

STATS_COLUMNS: tuple[str, ...] = tuple(STATS_DTYPES)
ERRORS_COLUMNS: tuple[str, ...] = tuple(ERRORS_DTYPES)
ABNORMAL_TASKS_COLUMNS: tuple[str, ...] = tuple(ABNORMAL_TASKS_DTYPES)
#: What identifies one task through time.
TASK_KEY: tuple[str, ...] = ("region", "project_id", "instance_id", "task_id")

TABLES: dict[str, dict[str, object]] = {"stats": STATS_DTYPES, "errors": ERRORS_DTYPES,
                                        "scopes": SCOPES_DTYPES, "abnormal_tasks": ABNORMAL_TASKS_DTYPES}


def empty_stats() -> pd.DataFrame:
    """An empty ``stats`` frame with the contract's columns and dtypes."""
    return _empty(STATS_DTYPES)


def empty_errors() -> pd.DataFrame:
    """An empty ``errors`` frame with the contract's columns and dtypes."""
    return _empty(ERRORS_DTYPES)


def empty_scopes() -> pd.DataFrame:
    """An empty ``scopes`` frame with its columns and dtypes."""
    return _empty(SCOPES_DTYPES)


def empty_abnormal_tasks() -> pd.DataFrame:
    """An empty ``abnormal_tasks`` frame with the table's columns and dtypes."""
    return _empty(ABNORMAL_TASKS_DTYPES)


def empty(table: str) -> pd.DataFrame:
    """An empty frame of ``table`` (a key of ``TABLES``) with its columns and dtypes."""
    return _empty(TABLES[table])


def _empty(dtypes: dict[str, object]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def conform(frame: pd.DataFrame, table: str = "stats") -> pd.DataFrame:
    """Return ``frame`` with exactly the columns of ``table``, in order, cast to their dtypes.

    Naive timestamps are taken as UTC; aware ones are converted to UTC.  A missing column is
    a ``ValueError`` naming it (a frame from elsewhere, e.g. an uploaded export, must not be
    silently padded with zeros).
    """
    dtypes = TABLES[table]
    missing = [name for name in dtypes if name not in frame.columns]
    if missing:
        raise ValueError(
            f"{table} data is missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(dtypes)}"
        )
    out = {}
    for name, dtype in dtypes.items():
        column = frame[name]
        if dtype is TIMESTAMP_DTYPE:
            if not pd.api.types.is_datetime64_any_dtype(column):
                column = pd.to_datetime(column, utc=True, format="ISO8601")
            elif column.dt.tz is None:
                column = column.dt.tz_localize("UTC")
            column = column.astype(TIMESTAMP_DTYPE)
        else:
            column = column.astype(dtype)
        out[name] = column.reset_index(drop=True)
    return pd.DataFrame(out)


def parse_time(value, name: str = "time") -> pd.Timestamp | None:
    """``value`` (ISO string, date, datetime, Timestamp or None) as a UTC Timestamp; naive = UTC.

    The one reading of user-given time bounds (``since``, ``until``, ``before``) for the store,
    the DuckDB aggregation, exports and reports, so they all agree on an instant.  Floored to the
    microsecond, the resolution of ``collected_at``.
    """
    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{name}={value!r} is not a date or time; use ISO-8601 such as 2024-05-01 or "
            "2024-05-01T10:00:00Z"
        ) from exc
    if pd.isna(stamp):
        raise ConfigError(f"{name} must be a date or time, not {value!r}")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.as_unit("us").floor("us")
