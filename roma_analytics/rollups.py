"""Rollups: per day, the history reduced to what the readers show, so that they cost what they show.

A year of 5-minute runs of 100 instances is 21 M stats rows; a chart of it shows a few hundred
points.  For every finished day the store keeps three small derived tables next to the raw ones::

    HISTORY/rollup_1h/date=YYYY-MM-DD/rollup-<key>.parquet    per UTC hour and series, its last snapshot
    HISTORY/rollup_1d/date=YYYY-MM-DD/rollup-<key>.parquet    per UTC day and series, its last snapshot
    HISTORY/rollup_runs/date=YYYY-MM-DD/rollup-<key>.parquet  per run and scope: what it covered and how it went

**Gauge semantics stay exact.**  A ``rollup_1h``/``rollup_1d`` row *is* a stats row (same columns,
same types): the last snapshot of its series in the bucket, by ``analysis.GAUGE_ORDER`` -- never
a sum.  The last snapshot in any coarser bucket (6 h, a day, a week) is the last of the rollup
rows inside it, so ``trend``/``cdc_vs_common`` at a resolution that is a whole number of hours
(or days) read the rollup of those days instead of the raw runs and give the same answer, row
for row.  ``rollup_runs`` holds one row per (run, scope) with the columns of
:data:`RUN_DTYPES`: the scope runs of :mod:`roma_analytics.fleet` (``discovery``: recorded, or
inferred from the rows for histories without a ``scopes`` table) and the run's outcome in that
scope (``stats_rows``, instances ``collected``, instances ``failed``), which is what the fleet
state, the collection-health chart and the run count need.

**Never stale.**  ``<key>`` is a digest of the names and sizes of the day's raw data files
(stats, errors and scopes).  A reader lists the day (a directory listing, no file is opened),
computes the key, and uses the rollup only when a file of that key exists; a run appended to a
rolled day later (a late collector, another writer) changes the key, and the day is read raw
again until its rollup is rebuilt.  A rollup is only a cache: deleting the ``rollup_*`` folders
loses nothing, and a damaged rollup file is skipped with a warning (the day is then read raw).

**When they are built.**  ``HistoryStore.compact`` builds the rollup of every finished day that
lacks a current one (also for histories written before rollups existed, or by other writers:
plain hive Parquet files of the documented schema).  ``HistoryStore.append`` builds the rollups
of the finished days before the run's day that lack one (normally just yesterday, once), so a
collector that never compacts still keeps its readers fast.  The day of "now" is never rolled up.
"""
from __future__ import annotations

import hashlib

import pandas as pd

from roma_analytics import analysis, schema

__all__ = ["SNAPSHOT_ROLLUPS", "RUNS_TABLE", "TABLES", "RUN_DTYPES", "source_key", "file_name",
           "rollup_for", "last_per_bucket", "run_rows"]

#: Snapshot rollups: folder name -> bucket width.
SNAPSHOT_ROLLUPS = {"rollup_1h": "1h", "rollup_1d": "1D"}
#: The per-run rollup.
RUNS_TABLE = "rollup_runs"
#: Every rollup folder, in the order they are written (the runs rollup last).
TABLES = (*SNAPSHOT_ROLLUPS, RUNS_TABLE)
#: The raw tables a day's rollup is computed from (its key covers their files).
SOURCE_TABLES = ("stats", "errors", "scopes")
PREFIX = "rollup-"
#: Key-value metadata of a rollup file: which rollup it is and the key of the files it came from.
META_ROLLUP = b"roma_analytics.rollup"
META_KEY = b"roma_analytics.rollup_key"

RUN_DTYPES = {
    "collected_at": schema.TIMESTAMP_DTYPE, "run_id": schema.STRING_DTYPE, "region": schema.STRING_DTYPE,
    "project_id": schema.STRING_DTYPE, "discovery": schema.STRING_DTYPE,
    "stats_rows": "int64", "collected": "int64", "failed": "int64",
}
_US = {name: analysis.bucket_step(freq)[0] for name, freq in SNAPSHOT_ROLLUPS.items()}


def source_key(listing) -> str:
    """The key of a day: ``listing`` is an iterable of ``(table, file name, size)``."""
    text = "\n".join(f"{table}/{name}/{size}" for table, name, size in sorted(listing))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_name(key: str) -> str:
    return f"{PREFIX}{key}.parquet"


def rollup_for(freq) -> str | None:
    """The coarsest snapshot rollup whose buckets nest in ``freq``'s (None: raw runs only).

    ``freq``'s buckets (``analysis.bucket_step``) must be whole multiples of the rollup's and
    start on its boundaries: true for whole hours and days from the epoch, and for weeks from
    Monday 1970-01-05."""
    step, origin = analysis.bucket_step(freq)
    for name in ("rollup_1d", "rollup_1h"):
        if step % _US[name] == 0 and origin % _US[name] == 0:
            return name
    return None


def step_us(table: str) -> int:
    """The bucket width of the snapshot rollup ``table`` in microseconds."""
    return _US[table]


def last_per_bucket(stats: pd.DataFrame, step: int) -> pd.DataFrame:
    """Per ``step``-microsecond bucket (from the epoch) and series, the last snapshot of
    ``stats`` (a stats frame) in ``analysis.GAUGE_ORDER``: real stats rows, sorted by time and series."""
    if stats.empty:
        return schema.conform(stats, "stats")
    micros = stats["collected_at"].dt.tz_convert("UTC").dt.tz_localize(None) \
        .to_numpy(dtype="datetime64[us]").view("int64")
    last = analysis._last_snapshots(stats.assign(_bucket=micros - micros % step), ["_bucket", *schema.SERIES_KEY])
    out = last.drop(columns="_bucket").sort_values(["collected_at", *schema.SERIES_KEY, "run_id"], kind="stable")
    return schema.conform(out.reset_index(drop=True), "stats")


def run_rows(stats: pd.DataFrame, errors: pd.DataFrame, scopes: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, scope) of the given rows (``RUN_DTYPES``): the scope runs of
    ``fleet.scope_runs_frame`` plus ``stats_rows``, instances ``collected`` (with stats rows)
    and instances ``failed`` (an errors row and no stats row in the run; the project-level
    ``*`` row of a failed discovery is not an instance)."""
    from roma_analytics import fleet

    run_scope = ["collected_at", "run_id", *schema.SCOPE_KEY]
    inferred = pd.concat([
        stats[run_scope].assign(_discovery_failed=False),
        errors[run_scope].assign(_discovery_failed=(errors["instance_id"] == fleet.DISCOVERY_INSTANCE_ID).to_numpy()),
    ], ignore_index=True)
    inferred = inferred.groupby(run_scope, sort=False, dropna=False)["_discovery_failed"].any().reset_index()
    runs = fleet.scope_runs_frame(inferred, scopes)
    key = ["run_id", *schema.SCOPE_KEY]
    instance = ["run_id", "region", "project_id", "instance_id"]
    rows = stats.groupby(key, dropna=False).size().rename("stats_rows")
    collected_instances = stats[instance].drop_duplicates()
    collected = collected_instances.groupby(key, dropna=False).size().rename("collected")
    # As analysis.collection_health counts them: the "*" row of a failed discovery is one
    # attempt that failed (the project's instance list).
    tried = errors[instance].drop_duplicates()
    tried = tried.merge(collected_instances.assign(_ok=True), on=instance, how="left")
    failed = tried[tried["_ok"].isna()].groupby(key, dropna=False).size().rename("failed")
    runs = runs.join(pd.concat([rows, collected, failed], axis=1), on=key)
    for name in ("stats_rows", "collected", "failed"):
        runs[name] = runs[name].fillna(0)
    return pd.DataFrame({name: runs[name].astype(dtype).to_numpy() if dtype == "int64"
                         else runs[name].astype(dtype) for name, dtype in RUN_DTYPES.items()})


def empty_runs() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in RUN_DTYPES.items()})


def collection_health(runs: pd.DataFrame) -> pd.DataFrame:
    """``analysis.collection_health`` from ``rollup_runs`` rows: per run the instances
    ``attempted``, ``collected``, ``failed`` and ``success_ratio``, oldest first."""
    grouped = runs.groupby("run_id", sort=False).agg(
        collected_at=("collected_at", "min"), collected=("collected", "sum"), failed=("failed", "sum"))
    grouped = grouped.reset_index()
    out = pd.DataFrame({
        "run_id": grouped["run_id"].astype(schema.STRING_DTYPE),
        "collected_at": grouped["collected_at"].astype(schema.TIMESTAMP_DTYPE),
        "attempted": (grouped["collected"] + grouped["failed"]).astype("int64"),
        "collected": grouped["collected"].astype("int64"),
    })
    out["failed"] = out["attempted"] - out["collected"]
    out["success_ratio"] = analysis._pooled(out["collected"], out["attempted"])
    out = out[out["attempted"] > 0]
    return out.sort_values(["collected_at", "run_id"], kind="stable").reset_index(drop=True)

