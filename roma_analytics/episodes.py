"""Abnormal-task episodes: how long each task stays in ERROR, which fail most, time to recovery.

An *observation* is one run's view of one instance (region, project_id, instance_id).  It is
*known* when the run tells which of the instance's tasks were in ERROR: its counts show no
abnormal task (then none was), or the run listed its ERROR tasks (the run is in
``HistoryStore.listed_runs()`` and has no ``errors`` row for the instance: no failed or
budget-skipped listing).  Observations that are not known (counts only, listing failed, not
listed) neither extend nor end an episode: they are skipped.

An *episode* of a task is a maximal stretch of consecutive known observations of its instance
in which the task is listed:

* ``first_seen``/``last_seen``: ``collected_at`` of its first and last listing in the stretch;
* ``end``: the ``collected_at`` of the next known observation of the instance (the task was no
  longer in ERROR: ``ended`` = ``recovered``), or, when the instance is absent from every later
  run of its project (neither stats nor errors rows) while that project was collected again, the
  first such run (``ended`` = ``disappeared``); otherwise the episode is ``still_open`` and
  ``end`` is NaT;
* ``duration``: ``end - first_seen``, or ``last_seen - first_seen`` while still open;
* ``runs_seen``: how many listings showed it.

With 5-minute runs, ``first_seen`` is the first run at or after the task went into ERROR and
``end`` the first run at or after it left ERROR.  The ERROR-only listing cannot tell a task that
recovered from one deleted while in ERROR: both are ``recovered`` (the instance went on).

Two paths give identical frames: :func:`episodes` (pandas, on loaded tables) and
:func:`episodes_duckdb` (DuckDB over the Parquet files, for long histories);
:func:`from_history` picks one.  The summaries (:func:`failing_tasks`,
:func:`recovery_times`, :func:`listing_share`) take the episodes / tables and are shared.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from roma_analytics.schema import STRING_DTYPE, TIMESTAMP_DTYPE

__all__ = ["EPISODE_COLUMNS", "episodes", "episodes_duckdb", "failing_tasks", "from_history",
           "listing_share", "observations", "recovery_times"]

INSTANCE_KEY = ("region", "project_id", "instance_id")
TASK_KEY = (*INSTANCE_KEY, "task_id")
#: Columns of an episodes frame, in order.
EPISODE_COLUMNS = (*TASK_KEY, "task_name", "task_type", "first_seen", "last_seen", "end",
                   "duration", "still_open", "ended", "runs_seen")
_DURATION_DTYPE = "timedelta64[us]"


# --------------------------------------------------------------------------------------------
# pandas

def observations(stats: pd.DataFrame, errors: pd.DataFrame, listed_runs: Iterable[str]) -> pd.DataFrame:
    """One row per (run, instance) with stats: ``region, project_id, instance_id, run_id,
    collected_at, abnormal`` (both task types), ``known`` (see the module docstring)."""
    key = [*INSTANCE_KEY, "run_id"]
    per_run = (stats.groupby(key, observed=True, sort=False)
               .agg(collected_at=("collected_at", "min"), abnormal=("abnormal", "sum")).reset_index())
    failed = pd.MultiIndex.from_frame(errors[key].astype(object))
    has_error = pd.MultiIndex.from_frame(per_run[key].astype(object)).isin(failed)
    listed = per_run["run_id"].astype(object).isin(set(map(str, listed_runs)))
    per_run["known"] = (per_run["abnormal"] == 0) | (listed & ~has_error)
    return per_run.sort_values([*INSTANCE_KEY, "collected_at", "run_id"], kind="stable").reset_index(drop=True)


def episodes(stats: pd.DataFrame, tasks: pd.DataFrame, errors: pd.DataFrame,
             listed_runs: Iterable[str]) -> pd.DataFrame:
    """The episodes of every listed task (``EPISODE_COLUMNS``), from the three history tables.

    ``listed_runs``: the run ids that listed abnormal tasks (``HistoryStore.listed_runs()``).
    Sorted by ``first_seen`` then the task key.
    """
    obs = observations(stats, errors, listed_runs)
    known = obs[obs["known"]].copy()
    known["seq"] = known.groupby(list(INSTANCE_KEY), observed=True, sort=False).cumcount()
    seen = tasks.merge(known[[*INSTANCE_KEY, "run_id", "seq"]], on=[*INSTANCE_KEY, "run_id"], how="inner")
    if seen.empty:
        return _empty_episodes()
    seen = seen.sort_values([*TASK_KEY, "seq"], kind="stable")
    seen["island"] = seen["seq"] - seen.groupby(list(TASK_KEY), observed=True, sort=False).cumcount()
    grouped = seen.groupby([*TASK_KEY, "island"], observed=True, sort=False)
    found = grouped.agg(task_name=("task_name", "last"), task_type=("task_type", "last"),
                        first_seen=("collected_at", "min"), last_seen=("collected_at", "max"),
                        last_seq=("seq", "max"), runs_seen=("seq", "size")).reset_index()
    following = known[[*INSTANCE_KEY, "seq", "collected_at"]].rename(
        columns={"seq": "last_seq", "collected_at": "recovered_at"})
    following["last_seq"] -= 1
    found = found.merge(following, on=[*INSTANCE_KEY, "last_seq"], how="left")
    found["gone_at"] = _disappeared_at(found, stats, errors)
    return _finish(found)


def _disappeared_at(found: pd.DataFrame, stats: pd.DataFrame, errors: pd.DataFrame) -> pd.Series:
    """Per episode: the first later run of its project lacking the instance entirely, else NaT."""
    rows = pd.concat([stats[[*INSTANCE_KEY, "collected_at"]], errors[[*INSTANCE_KEY, "collected_at"]]])
    instance_last = rows.groupby(list(INSTANCE_KEY), observed=True)["collected_at"].max().rename("instance_last")
    out = found[[*INSTANCE_KEY, "last_seen"]].join(instance_last, on=list(INSTANCE_KEY))
    runs = stats[["region", "project_id", "collected_at"]].drop_duplicates().sort_values("collected_at")
    gone = pd.Series(pd.NaT, index=found.index, dtype=TIMESTAMP_DTYPE)
    for (region, project), group in out[out["instance_last"] <= out["last_seen"]].groupby(
            ["region", "project_id"], observed=True):
        times = runs.loc[(runs["region"] == region) & (runs["project_id"] == project), "collected_at"].to_numpy()
        positions = np.searchsorted(times, group["last_seen"].to_numpy(), side="right")
        later = positions < len(times)
        gone.loc[group.index[later]] = times[positions[later]]
    return gone


def _finish(found: pd.DataFrame) -> pd.DataFrame:
    """Shared by both paths: ``found`` has the task key, task_name, task_type, first_seen,
    last_seen, runs_seen, recovered_at and gone_at."""
    recovered_at = pd.to_datetime(found["recovered_at"], utc=True)
    gone_at = pd.to_datetime(found["gone_at"], utc=True)
    end = recovered_at.fillna(gone_at)
    ended = np.where(recovered_at.notna(), "recovered", np.where(gone_at.notna(), "disappeared", None))
    first_seen = pd.to_datetime(found["first_seen"], utc=True).astype(TIMESTAMP_DTYPE)
    last_seen = pd.to_datetime(found["last_seen"], utc=True).astype(TIMESTAMP_DTYPE)
    end = end.astype(TIMESTAMP_DTYPE)
    out = pd.DataFrame({
        **{name: found[name].astype(STRING_DTYPE) for name in (*TASK_KEY, "task_name", "task_type")},
        "first_seen": first_seen,
        "last_seen": last_seen,
        "end": end,
        "duration": (end.fillna(last_seen) - first_seen).astype(_DURATION_DTYPE),
        "still_open": end.isna().astype(bool),
        "ended": pd.array(ended, dtype=STRING_DTYPE),
        "runs_seen": found["runs_seen"].astype("int64"),
    })
    return out.sort_values(["first_seen", *TASK_KEY], kind="stable").reset_index(drop=True)


def _empty_episodes() -> pd.DataFrame:
    return _finish(pd.DataFrame({
        **{name: pd.Series(dtype=STRING_DTYPE) for name in (*TASK_KEY, "task_name", "task_type")},
        **{name: pd.Series(dtype=TIMESTAMP_DTYPE) for name in ("first_seen", "last_seen", "recovered_at", "gone_at")},
        "runs_seen": pd.Series(dtype="int64"),
    }))


# --------------------------------------------------------------------------------------------
# DuckDB

def episodes_duckdb(stats_files, tasks_files, errors_files, listed_runs: Iterable[str], since=None,
                    until=None) -> pd.DataFrame:
    """:func:`episodes` computed by DuckDB over each table's Parquet files (``HistoryStore.files``,
    a list of paths) or a ``pyarrow.dataset.Dataset`` of them (an object-store history).

    ``since``/``until`` bound ``collected_at`` of every table read, as ``HistoryStore.load``.
    """
    import pyarrow.dataset as ds

    from roma_analytics import sqlagg
    from roma_analytics.schema import parse_time

    def empty(source) -> bool:
        return not source if not isinstance(source, ds.Dataset) else not source.files

    if empty(stats_files) or empty(tasks_files):
        return _empty_episodes()
    start, end = parse_time(since, "since"), parse_time(until, "until")
    bounds = []
    if start is not None:
        bounds.append("collected_at >= $since")
    if end is not None:
        bounds.append("collected_at < $until")
    where = ("WHERE " + " AND ".join(bounds)) if bounds else ""

    datasets = {}

    def table(files) -> str:
        if isinstance(files, ds.Dataset):
            if not files.files:
                files = []
            else:
                name = f"source_{len(datasets)}"
                datasets[name] = files
                return f"(SELECT * FROM {name} {where})"
        if not files:
            return "(SELECT NULL::VARCHAR AS region, NULL::VARCHAR AS project_id, NULL::VARCHAR AS instance_id, " \
                   "NULL::VARCHAR AS run_id, NULL::TIMESTAMPTZ AS collected_at WHERE false)"
        listed = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
        return f"(SELECT * FROM read_parquet([{listed}], hive_partitioning = false) {where})"

    key = ", ".join(INSTANCE_KEY)
    sql = f"""
    WITH stats AS {table(stats_files)},
    errs AS {table(errors_files)},
    tasks AS {table(tasks_files)},
    listed AS (SELECT unnest($listed::VARCHAR[]) AS run_id),
    per_run AS (
        SELECT {key}, run_id, min(collected_at) AS collected_at, sum(abnormal) AS abnormal
        FROM stats GROUP BY {key}, run_id),
    known AS (
        SELECT p.*, row_number() OVER (PARTITION BY {key} ORDER BY collected_at, run_id) - 1 AS seq
        FROM per_run p
        WHERE abnormal = 0 OR (run_id IN (SELECT run_id FROM listed) AND NOT EXISTS (
            SELECT 1 FROM errs e WHERE e.run_id = p.run_id AND e.region = p.region
              AND e.project_id = p.project_id AND e.instance_id = p.instance_id))),
    seen AS (
        SELECT t.region, t.project_id, t.instance_id, t.task_id, t.task_name, t.task_type,
               t.collected_at, k.seq,
               k.seq - row_number() OVER (PARTITION BY t.region, t.project_id, t.instance_id, t.task_id
                                          ORDER BY k.seq) AS island
        FROM tasks t JOIN known k USING ({key}, run_id)),
    found AS (
        SELECT {key}, task_id, arg_max(task_name, seq) AS task_name, arg_max(task_type, seq) AS task_type,
               min(collected_at) AS first_seen, max(collected_at) AS last_seen, max(seq) AS last_seq,
               count(*) AS runs_seen
        FROM seen GROUP BY {key}, task_id, island),
    instance_last AS (
        SELECT {key}, max(collected_at) AS instance_last
        FROM (SELECT {key}, collected_at FROM stats UNION ALL SELECT {key}, collected_at FROM errs)
        GROUP BY {key}),
    project_runs AS (SELECT DISTINCT region, project_id, collected_at FROM stats)
    SELECT f.region, f.project_id, f.instance_id, f.task_id, f.task_name, f.task_type,
           f.first_seen, f.last_seen, f.runs_seen, k.collected_at AS recovered_at,
           CASE WHEN il.instance_last <= f.last_seen THEN (
               SELECT min(r.collected_at) FROM project_runs r
               WHERE r.region = f.region AND r.project_id = f.project_id AND r.collected_at > f.last_seen)
           END AS gone_at
    FROM found f
    LEFT JOIN known k ON k.region = f.region AND k.project_id = f.project_id
         AND k.instance_id = f.instance_id AND k.seq = f.last_seq + 1
    LEFT JOIN instance_last il ON il.region = f.region AND il.project_id = f.project_id
         AND il.instance_id = f.instance_id
    """
    params = {"listed": [str(run) for run in listed_runs]}
    if start is not None:
        params["since"] = start.to_pydatetime()
    if end is not None:
        params["until"] = end.to_pydatetime()
    # The process's shared DuckDB database (sqlagg: UTC, no progress bar, closed before a fork).
    connection = sqlagg._connection()
    for name, dataset in datasets.items():
        connection.register(name, dataset)
    try:
        with sqlagg.interruptible():
            found = connection.execute(sql, params).df()
    finally:
        for name in datasets:
            connection.unregister(name)
    if found.empty:
        return _empty_episodes()
    return _finish(found)


# --------------------------------------------------------------------------------------------
# from a history, and the summaries

def from_history(store, since=None, until=None, engine: str = "duckdb") -> pd.DataFrame:
    """The episodes of ``store`` (a HistoryStore) in ``[since, until)``; ``engine`` ``duckdb``
    (over the files, without loading the tables) or ``pandas``: the same frame either way."""
    listed = store.listed_runs(since=since, until=until)["run_id"].tolist()
    if engine == "pandas":
        return episodes(store.load(since=since, until=until), store.load(since=since, until=until, table="abnormal_tasks"),
                        store.load(since=since, until=until, table="errors"), listed)
    if engine != "duckdb":
        raise ValueError(f"engine must be 'duckdb' or 'pandas', got {engine!r}")
    return store.task_episodes(since=since, until=until, listed_runs=listed)


def failing_tasks(episodes_frame: pd.DataFrame, top: int | None = 10) -> pd.DataFrame:
    """The tasks that fail most often: one row per task with ``episodes``, ``total_duration``,
    ``longest``, ``last_seen`` and ``still_open``; most episodes first (then longest in total)."""
    if episodes_frame.empty:
        columns = [*TASK_KEY, "task_name", "task_type", "episodes", "total_duration", "longest",
                   "last_seen", "still_open"]
        return episodes_frame.reindex(columns=columns).astype({"episodes": "int64"})
    grouped = episodes_frame.groupby(list(TASK_KEY), observed=True, sort=False)
    out = grouped.agg(task_name=("task_name", "last"), task_type=("task_type", "last"),
                      episodes=("first_seen", "size"), total_duration=("duration", "sum"),
                      longest=("duration", "max"), last_seen=("last_seen", "max"),
                      still_open=("still_open", "any")).reset_index()
    out = out.sort_values(["episodes", "total_duration", *TASK_KEY], ascending=[False, False, True, True, True, True],
                          kind="stable").reset_index(drop=True)
    return out if top is None else out.head(top)


def recovery_times(episodes_frame: pd.DataFrame, by: Sequence[str] | str = ("project_id",)) -> pd.DataFrame:
    """Time to recovery of the recovered episodes per group: ``recovered`` (count), ``median``
    and ``p90`` (Timedelta; linear interpolation between episodes), ``longest``."""
    by = [by] if isinstance(by, str) else list(by)
    done = episodes_frame[episodes_frame["ended"] == "recovered"]
    seconds = done["duration"].dt.total_seconds()
    grouped = seconds.groupby([done[name] for name in by], observed=True)
    out = pd.DataFrame({
        "recovered": grouped.size().astype("int64"),
        "median": pd.to_timedelta(grouped.median(), unit="s"),
        "p90": pd.to_timedelta(grouped.quantile(0.9), unit="s"),
        "longest": pd.to_timedelta(grouped.max(), unit="s"),
    })
    return out.reset_index().sort_values(by, kind="stable").reset_index(drop=True)


def listing_share(stats: pd.DataFrame, tasks: pd.DataFrame, errors: pd.DataFrame,
                  listed_runs: Iterable[str]) -> pd.DataFrame:
    """How much of each instance's abnormal count the listing explains, over the runs that
    listed it: ``runs``, ``abnormal`` and ``listed`` (sums), ``share`` = listed / abnormal
    (pooled).  Below 1, tasks were counted abnormal but not listed in ERROR."""
    obs = observations(stats, errors, listed_runs)
    listed = obs[obs["known"] & (obs["abnormal"] > 0)]
    found = tasks.groupby([*INSTANCE_KEY, "run_id"], observed=True).size().rename("listed")
    listed = listed.join(found, on=[*INSTANCE_KEY, "run_id"])
    listed["listed"] = listed["listed"].fillna(0).astype("int64")
    out = listed.groupby(list(INSTANCE_KEY), observed=True).agg(
        runs=("run_id", "size"), abnormal=("abnormal", "sum"), listed=("listed", "sum")).reset_index()
    out["share"] = out["listed"] / out["abnormal"]
    return out
