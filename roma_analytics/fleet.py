"""The fleet's state as of a time: the one owner of "latest", "stale", "disappeared" and "changed".

Several collectors (one per project, region or host, each on its own schedule) may append to one
history.  The fleet's current state therefore cannot be "the latest run": it is the latest state
of each *series*, as Prometheus keeps per-series staleness.  Every view -- the dashboard's KPIs,
breakdown and changes, ``check``, the OpenMetrics export and the HTML report -- asks this module.

Terms (docs/architecture.md, "Fleet state"):

* A **series** is (region, project_id, instance_id, task_type): one gauge.  A **scope** is
  (region, project_id): what one run covers for one project.  A run records the scopes it
  covered in the ``scopes`` table -- also a scope whose discovery found nothing or failed.
  Histories written before that table existed (or by other writers) get their scopes inferred:
  a run covered the scopes it has stats or errors rows for, and its discovery failed where an
  errors row has ``instance_id = "*"``.
* **Latest state as of T**: each series' last snapshot at or before T (greatest ``collected_at``,
  then ``run_id``).  A snapshot later than T plus ``tolerance`` (a collector with a wrong clock)
  is never the latest: it is listed in :attr:`FleetState.future` instead.
* **Disappeared**: the series' scope had a *complete* run (discovery did not fail) after the
  series' last attempt (its last snapshot or errors row), and that run did not try it.
* **Failed**: the instance's last attempt is an errors row later than its last snapshot; the
  series keeps its last good snapshot, marked failed.
* **Stale**: the series' snapshot is older than its scope's staleness window: ``staleness`` if
  given, else ``STALENESS_FACTOR`` times the scope's usual interval (median gap of its last
  ``INTERVAL_RUNS`` runs) but at least ``MIN_STALENESS``, else ``DEFAULT_STALENESS`` for a
  scope seen only once.  Stale series
  are kept and shown with their ``age``; readers that must not show old values as current (the
  OpenMetrics export) leave them out.
* **Changes** compare each series' latest snapshot with its own previous snapshot, at its scope's
  latest run and against its scope's previous run, so interleaved collectors never produce
  appeared/disappeared noise.

Two paths give the same :class:`FleetState`: :func:`fleet_state` on frames in memory, and
``HistoryStore.fleet_state`` which lets DuckDB reduce the history to the few rows the state needs
(the last two snapshots of each series, the last two errors of each instance, the recent runs of
each scope) and then finishes with the same code as the pandas path.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from roma_analytics import schema
from roma_analytics.analysis import _change_summary, _pooled
from roma_analytics.errors import ConfigError
from roma_analytics.schema import (
    COUNT_COLUMNS, SCOPE_KEY, SERIES_KEY, STRING_DTYPE, TIMESTAMP_DTYPE, parse_time,
)

__all__ = [
    "FleetState", "fleet_state", "reduce_history", "finish", "DEFAULT_TOLERANCE", "DEFAULT_STALENESS",
    "STALENESS_FACTOR", "INTERVAL_RUNS", "SNAPSHOTS_KEPT", "DISCOVERY_INSTANCE_ID", "age_text",
]

#: How far past "now" a snapshot may be stamped and still count (clocks are never exact).
DEFAULT_TOLERANCE = pd.Timedelta(minutes=5)
#: A series is stale after this many of its scope's usual intervals without a new snapshot.
STALENESS_FACTOR = 3
#: The shortest staleness window: collectors seconds apart (tests, bursts) must not flap.
MIN_STALENESS = pd.Timedelta(minutes=5)
#: The staleness window of a scope with a single run (no interval to judge by yet).
DEFAULT_STALENESS = pd.Timedelta(days=1)
#: How many recent gaps between a scope's runs estimate its usual interval (their median).
INTERVAL_RUNS = 10
#: Snapshots per series (and errors rows per instance) the state needs: the latest and the one
#: before it (for changes and the previous fleet ratio).
SNAPSHOTS_KEPT = 2
#: ``instance_id`` of an errors row about a project's instance list (collect.DISCOVERY_INSTANCE_ID).
DISCOVERY_INSTANCE_ID = "*"
#: ``scopes.discovery`` of a run inferred from its rows (a history without a scopes table).
INFERRED = "inferred"

INSTANCE_KEY = ("region", "project_id", "instance_id")
TOTAL_COLUMNS = (*COUNT_COLUMNS, "total")
_RUN_ORDER = ["collected_at", "run_id"]
#: Columns of one row per (run, scope) -- the scope runs the state is judged by.
SCOPE_RUN_COLUMNS = {"collected_at": TIMESTAMP_DTYPE, "run_id": STRING_DTYPE, "region": STRING_DTYPE,
                     "project_id": STRING_DTYPE, "discovery": STRING_DTYPE}
STATUSES = ("ok", "failed", "stale", "disappeared")


@dataclass(frozen=True)
class FleetState:
    """The fleet as of :attr:`as_of` (see the module docstring for every term).

    ``series``: one row per series ever seen (up to ``as_of``), sorted by the series key, with
    the stats columns of its latest snapshot (``collected_at``, ``run_id``, ``instance_name``,
    the four counts, ``total``) plus ``abnormal_ratio`` (NaN at 0 tasks), ``age`` (as_of minus the
    snapshot's time), ``stale``, ``failed``, ``disappeared`` (bool), ``status`` (``disappeared``,
    ``stale``, ``failed`` or ``ok``, in that priority), ``last_attempt_at``, ``last_error_code``,
    ``last_error_msg`` (nullable) and ``scope_run_id`` (its scope's latest run).

    ``scopes``: one row per scope: ``region, project_id, last_run_id, last_collected_at,
    last_discovery, previous_run_id, previous_collected_at, runs_seen, interval, stale_after,
    age, stale, instances, collected, failed, success`` (``success``: the scope's last run found
    its instances and collected every one of them).

    ``changes``: one row per series that its scope's latest run collected, failed, or no longer
    tried, compared with the series' previous snapshot (columns as :func:`analysis.changes`, with
    ``status`` ``appeared``, ``changed``, ``unchanged``, ``failed`` or ``disappeared``).  Scopes
    with a single run have no changes.

    ``future``: runs stamped later than ``as_of + tolerance``, one row per run and scope:
    ``run_id, collected_at, region, project_id`` -- ignored everywhere, reported instead.
    """

    as_of: pd.Timestamp
    series: pd.DataFrame
    scopes: pd.DataFrame
    changes: pd.DataFrame
    future: pd.DataFrame
    previous: pd.DataFrame
    #: Instances that failed and never had a snapshot (``region, project_id, instance_id,
    #: collected_at, run_id, error_code, error_msg`` of their last error), unless gone.
    unseen: pd.DataFrame = None

    def __len__(self) -> int:
        """How many series are current and fresh (what an export of the state shows)."""
        return int((~self.series["disappeared"] & ~self.series["stale"]).sum())

    @property
    def current(self) -> pd.DataFrame:
        """The series that are part of the fleet now (not disappeared), stale ones included."""
        return self.series[~self.series["disappeared"]].reset_index(drop=True)

    @property
    def fresh(self) -> pd.DataFrame:
        """The current series whose snapshot is within its scope's staleness window."""
        return self.series[~self.series["disappeared"] & ~self.series["stale"]].reset_index(drop=True)

    def latest_stats(self, include_stale: bool = True) -> pd.DataFrame:
        """The current series' latest snapshots as a ``stats`` frame (schema columns and dtypes)."""
        rows = self.current if include_stale else self.fresh
        return schema.conform(rows, "stats")

    def kpis(self) -> dict[str, object]:
        """Headline numbers as plain Python values.

        ``instances`` (distinct region/project/instance among the current series), the summed
        ``running, abnormal, terminated, completed, total`` and the pooled ``abnormal_ratio``
        (NaN at 0 tasks); ``previous_abnormal_ratio``: the ratio before each scope's latest run,
        ``abnormal_ratio_delta``; ``last_run_id`` and ``last_collected_at`` (the newest scope run
        not in the future); ``failed_collections`` (current instances whose last collection
        failed, plus scopes whose last discovery failed); ``stale_series``,
        ``stale_instances``, ``disappeared_instances``, ``future_runs`` (distinct run ids).
        """
        current = self.current
        result: dict[str, object] = {"instances": int(len(current[list(INSTANCE_KEY)].drop_duplicates()))}
        for name in TOTAL_COLUMNS:
            result[name] = int(current[name].sum())
        result["abnormal_ratio"] = _ratio(result["abnormal"], result["total"])
        previous = self.previous
        result["previous_abnormal_ratio"] = (_ratio(int(previous["abnormal"].sum()), int(previous["total"].sum()))
                                             if len(self.changes) else float("nan"))
        result["abnormal_ratio_delta"] = result["abnormal_ratio"] - result["previous_abnormal_ratio"]
        if len(self.scopes):
            newest = self.scopes.sort_values(["last_collected_at", "last_run_id"], kind="stable").iloc[-1]
            result["last_run_id"] = str(newest["last_run_id"])
            result["last_collected_at"] = pd.Timestamp(newest["last_collected_at"])
        else:
            result["last_run_id"] = None
            result["last_collected_at"] = None
        failed_instances = current.loc[current["failed"], list(INSTANCE_KEY)].drop_duplicates()
        failed_scopes = int((self.scopes["last_discovery"] == "failed").sum()) if len(self.scopes) else 0
        unseen = 0 if self.unseen is None else len(self.unseen)
        result["failed_collections"] = int(len(failed_instances)) + unseen + failed_scopes
        stale = current[current["stale"]]
        result["stale_series"] = int(len(stale))
        result["stale_instances"] = int(len(stale[list(INSTANCE_KEY)].drop_duplicates()))
        gone = self.series[self.series["disappeared"]]
        result["disappeared_instances"] = int(len(gone[list(INSTANCE_KEY)].drop_duplicates()))
        result["future_runs"] = int(self.future["run_id"].nunique())
        return result

    def future_note(self) -> str | None:
        """One sentence about runs stamped in the future, or None when there are none."""
        return future_note(self.future, self.as_of)


def future_note(future: pd.DataFrame, as_of: pd.Timestamp) -> str | None:
    """One sentence about the runs of ``future`` (``FleetState.future`` rows), or None."""
    if future.empty:
        return None
    runs = future.drop_duplicates("run_id").sort_values(_RUN_ORDER, kind="stable")
    first = runs.iloc[0]
    return (f"{len(runs)} run(s) are stamped after {as_of.isoformat()} (e.g. run {first['run_id']} at "
            f"{pd.Timestamp(first['collected_at']).isoformat()}): a collector's clock is wrong; they are "
            "ignored until their time comes. Fix the clock (NTP) and move or delete those runs.")


# ------------------------------------------------------------------------------------ entry points

def fleet_state(stats: pd.DataFrame, errors: pd.DataFrame | None = None, scopes: pd.DataFrame | None = None,
                *, as_of=None, staleness=None, tolerance=DEFAULT_TOLERANCE) -> FleetState:
    """The :class:`FleetState` of ``stats``/``errors``/``scopes`` frames (schema tables) as of ``as_of``.

    ``as_of``: ISO string, datetime or Timestamp (naive = UTC); default now.  ``staleness``: a
    fixed staleness window for every scope (Timedelta or a string such as ``"15min"``); default
    ``STALENESS_FACTOR`` times each scope's usual interval.  ``tolerance``: how far past
    ``as_of`` a snapshot may be stamped and still count.  ``errors`` and ``scopes`` may be None
    (then nothing failed, and scopes are inferred from the rows).  Rows without ``collected_at``
    are left out.  Raises ``ConfigError`` for a frame missing a column, a row without a
    ``run_id``, or a bad time or window.
    """
    as_of, cutoff, staleness = _settings(as_of, staleness, tolerance)
    stats = _conformed(stats, "stats")
    errors = schema.empty_errors() if errors is None else _conformed(errors, "errors")
    scopes = schema.empty_scopes() if scopes is None else _conformed(scopes, "scopes")
    reduced = reduce_history(stats, errors, scopes, cutoff)
    return finish(*reduced, as_of=as_of, staleness=staleness)


def reduce_history(stats: pd.DataFrame, errors: pd.DataFrame, scopes: pd.DataFrame, cutoff: pd.Timestamp):
    """The few rows the state needs (the pandas twin of the DuckDB reduction in sqlagg).

    Returns ``(top_stats, top_errors, scope_runs, future)``: the last ``SNAPSHOTS_KEPT`` snapshots
    of each series and errors rows of each instance at or before ``cutoff``, one row per (run,
    scope) for every run at or before it (``SCOPE_RUN_COLUMNS``), and the runs after it.
    """
    future = pd.concat([frame.loc[frame["collected_at"] > cutoff, ["run_id", "collected_at", *SCOPE_KEY]]
                        for frame in (stats, errors, scopes)], ignore_index=True)
    stats = stats[stats["collected_at"] <= cutoff]
    errors = errors[errors["collected_at"] <= cutoff]
    scopes = scopes[scopes["collected_at"] <= cutoff]
    top_stats = _top(stats, SERIES_KEY)
    top_errors = _top(errors, INSTANCE_KEY)
    inferred = pd.concat([stats[[*_RUN_ORDER, *SCOPE_KEY]].assign(_discovery_failed=False),
                          errors[[*_RUN_ORDER, *SCOPE_KEY]].assign(
                              _discovery_failed=(errors["instance_id"] == DISCOVERY_INSTANCE_ID).to_numpy())],
                         ignore_index=True)
    inferred = inferred.groupby([*_RUN_ORDER, *SCOPE_KEY], sort=False, dropna=False)["_discovery_failed"].any()
    scope_runs = scope_runs_frame(inferred.reset_index(), scopes)
    return top_stats, top_errors, scope_runs, _future_frame(future)


def scope_runs_frame(inferred: pd.DataFrame, scopes: pd.DataFrame) -> pd.DataFrame:
    """Recorded scope runs, plus inferred ones (``run_id, collected_at, region, project_id,
    _discovery_failed``) for runs the scopes table does not know."""
    recorded = scopes[list(SCOPE_RUN_COLUMNS)]
    known = set(recorded["run_id"].astype(object))
    inferred = inferred[~inferred["run_id"].astype(object).isin(known)]
    inferred = inferred.assign(discovery=np.where(inferred["_discovery_failed"].astype(bool), "failed", INFERRED))
    # Both in the final dtypes before they meet: pandas 2 warned that concat would stop ignoring
    # an empty or all-missing part when it chooses a column's dtype.
    parts = [pd.DataFrame({name: part[name].astype(dtype) for name, dtype in SCOPE_RUN_COLUMNS.items()})
             for part in (recorded, inferred)]
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values([*SCOPE_KEY, *_RUN_ORDER], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------ the state

def finish(top_stats, top_errors, scope_runs, future, *, as_of: pd.Timestamp, staleness) -> FleetState:
    """The state from reduced rows (see :func:`reduce_history`); shared by both paths."""
    scopes = _scope_table(scope_runs, top_stats, top_errors, as_of, staleness)
    ordered = top_stats.sort_values([*SERIES_KEY, *_RUN_ORDER], kind="stable")
    latest = ordered.drop_duplicates(list(SERIES_KEY), keep="last")
    before = ordered.drop(index=latest.index).drop_duplicates(list(SERIES_KEY), keep="last")
    errors = top_errors[top_errors["instance_id"] != DISCOVERY_INSTANCE_ID]
    last_error = errors.sort_values([*INSTANCE_KEY, *_RUN_ORDER], kind="stable") \
        .drop_duplicates(list(INSTANCE_KEY), keep="last")

    series = latest.merge(
        last_error[[*INSTANCE_KEY, *_RUN_ORDER, "error_code", "error_msg"]].rename(columns={
            "collected_at": "_error_at", "run_id": "_error_run", "error_code": "last_error_code",
            "error_msg": "last_error_msg"}),
        on=list(INSTANCE_KEY), how="left")
    series = series.merge(scopes[[*SCOPE_KEY, "last_run_id", "last_collected_at", "stale_after",
                                  "_complete_at", "_complete_run"]], on=list(SCOPE_KEY), how="left")
    failed = _later(series["_error_at"], series["_error_run"], series["collected_at"], series["run_id"])
    series["failed"] = failed
    attempt_at = series["_error_at"].where(failed, series["collected_at"])
    attempt_run = series["_error_run"].where(failed, series["run_id"])
    series["last_attempt_at"] = attempt_at.astype(TIMESTAMP_DTYPE)
    series["disappeared"] = _later(series["_complete_at"], series["_complete_run"], attempt_at, attempt_run)
    # microseconds whatever the unit of as_of (pandas 2 keeps a nanosecond Timestamp's unit)
    series["age"] = (as_of - series["collected_at"]).astype("timedelta64[us]")
    series["stale"] = ~series["disappeared"] & (series["age"] > series["stale_after"])
    series["failed"] = series["failed"] & ~series["disappeared"]
    series["status"] = pd.array(np.select([series["disappeared"], series["stale"], series["failed"]],
                                          ["disappeared", "stale", "failed"], "ok"), dtype=STRING_DTYPE)
    series["abnormal_ratio"] = _pooled(series["abnormal"], series["total"])
    series = series.rename(columns={"last_run_id": "scope_run_id"})
    columns = [*schema.STATS_COLUMNS, "abnormal_ratio", "age", "stale", "failed", "disappeared", "status",
               "last_attempt_at", "last_error_code", "last_error_msg", "scope_run_id"]
    series = series[columns].sort_values(list(SERIES_KEY), kind="stable").reset_index(drop=True)
    series["scope_run_id"] = series["scope_run_id"].astype(STRING_DTYPE)
    for name in ("last_error_code", "last_error_msg"):
        series[name] = series[name].astype(STRING_DTYPE)

    changes = _changes(series, before, errors, scopes)
    previous = _previous(series, before, changes)
    unseen = _unseen(last_error, series, scopes)
    scopes = scopes.drop(columns=["_complete_at", "_complete_run"])
    return FleetState(as_of=as_of, series=series, scopes=scopes, changes=changes, future=future,
                      previous=previous, unseen=unseen)


def _unseen(last_error, series, scopes) -> pd.DataFrame:
    """Instances whose every attempt failed, still tried by their scope's latest complete run."""
    seen = series[list(INSTANCE_KEY)].drop_duplicates().assign(_seen=True)
    rows = last_error.merge(seen, on=list(INSTANCE_KEY), how="left")
    rows = rows[rows["_seen"].isna()]
    rows = rows.merge(scopes[[*SCOPE_KEY, "_complete_at", "_complete_run"]], on=list(SCOPE_KEY), how="left")
    gone = _later(rows["_complete_at"], rows["_complete_run"], rows["collected_at"], rows["run_id"])
    rows = rows[~gone.to_numpy()]
    columns = [*INSTANCE_KEY, "collected_at", "run_id", "error_code", "error_msg"]
    return rows[columns].sort_values(list(INSTANCE_KEY), kind="stable").reset_index(drop=True)


def _scope_table(scope_runs, top_stats, top_errors, as_of, staleness) -> pd.DataFrame:
    runs = scope_runs.sort_values([*SCOPE_KEY, *_RUN_ORDER], kind="stable")
    grouped = runs.groupby(list(SCOPE_KEY), sort=True, dropna=False)
    last = grouped.tail(1).set_index(list(SCOPE_KEY))
    table = pd.DataFrame({
        "last_run_id": last["run_id"], "last_collected_at": last["collected_at"],
        "last_discovery": last["discovery"],
    })
    previous = grouped.nth(-2).set_index(list(SCOPE_KEY))
    table["previous_run_id"] = previous["run_id"].reindex(table.index).astype(STRING_DTYPE)
    table["previous_collected_at"] = previous["collected_at"].reindex(table.index).astype(TIMESTAMP_DTYPE)
    seen = grouped.size()
    if "_hidden_runs" in runs:  # a reduced frame (HistoryStore.fleet_rows) says how many runs it left out
        # to_numeric: a column that met frames without it is object; its fillna warned in pandas 2.
        seen = seen + pd.to_numeric(grouped["_hidden_runs"].max()).fillna(0).astype("int64")
    table["runs_seen"] = seen.reindex(table.index).astype("int64")
    recent = grouped.tail(INTERVAL_RUNS + 1)
    gaps = recent.groupby(list(SCOPE_KEY), sort=True, dropna=False)["collected_at"].diff()
    # The first run of each scope has no gap (NaT): left out before the median, which pandas 2.2
    # computes wrongly for timedeltas with NaT in a group (the median of 5 x 60 min and 5 x 2 min
    # came out as 2 min).
    known = gaps.notna()
    interval = gaps[known].groupby([recent.loc[known, c] for c in SCOPE_KEY], sort=True, dropna=False).median()
    table["interval"] = interval.reindex(table.index).astype("timedelta64[us]")
    if staleness is not None:
        table["stale_after"] = pd.Series(staleness, index=table.index).astype("timedelta64[us]")
    else:
        window = (table["interval"] * STALENESS_FACTOR).clip(lower=MIN_STALENESS).fillna(DEFAULT_STALENESS)
        table["stale_after"] = window.astype("timedelta64[us]")
    complete = runs[runs["discovery"] != "failed"].groupby(list(SCOPE_KEY), sort=True, dropna=False).tail(1)
    complete = complete.set_index(list(SCOPE_KEY))
    table["_complete_at"] = complete["collected_at"].reindex(table.index).astype(TIMESTAMP_DTYPE)
    table["_complete_run"] = complete["run_id"].reindex(table.index).astype(STRING_DTYPE)
    table["age"] = (as_of - table["last_collected_at"]).astype("timedelta64[us]")
    table["stale"] = table["age"] > table["stale_after"]
    table = table.reset_index()
    # How the last run went: instances whose latest snapshot or error is that run.
    def in_last_run(frame):
        rows = frame.merge(table[[*SCOPE_KEY, "last_run_id"]], on=list(SCOPE_KEY))
        return rows.loc[rows["run_id"] == rows["last_run_id"], list(INSTANCE_KEY)].drop_duplicates()
    collected_rows = in_last_run(top_stats)
    # An errors row of an instance with stats in the same run is about its task list, not a
    # failed collection (collect.py).
    failed_rows = in_last_run(top_errors[top_errors["instance_id"] != DISCOVERY_INSTANCE_ID])
    failed_rows = failed_rows.merge(collected_rows.assign(_collected=True), on=list(INSTANCE_KEY), how="left")
    failed_rows = failed_rows[failed_rows["_collected"].isna()]
    collected = collected_rows.groupby(list(SCOPE_KEY)).size()
    failed = failed_rows.groupby(list(SCOPE_KEY)).size()
    index = pd.MultiIndex.from_frame(table[list(SCOPE_KEY)])
    table["collected"] = collected.reindex(index).fillna(0).astype("int64").to_numpy()
    table["failed"] = failed.reindex(index).fillna(0).astype("int64").to_numpy()
    table["instances"] = table["collected"] + table["failed"]
    table["success"] = (table["last_discovery"] != "failed").to_numpy() & (table["failed"] == 0).to_numpy()
    for name in ("region", "project_id", "last_run_id", "last_discovery"):
        table[name] = table[name].astype(STRING_DTYPE)
    table["last_collected_at"] = table["last_collected_at"].astype(TIMESTAMP_DTYPE)
    order = ["region", "project_id", "last_run_id", "last_collected_at", "last_discovery", "previous_run_id",
             "previous_collected_at", "runs_seen", "interval", "stale_after", "age", "stale", "instances",
             "collected", "failed", "success", "_complete_at", "_complete_run"]
    return table[order]


def _changes(series, before, errors, scopes) -> pd.DataFrame:
    """Per series, its scope's latest run against its own previous snapshot (see FleetState)."""
    two_runs = scopes[scopes["previous_run_id"].notna()][[*SCOPE_KEY, "last_run_id", "last_collected_at",
                                                          "previous_run_id", "previous_collected_at",
                                                          "last_discovery"]]
    rows = series.merge(two_runs, on=list(SCOPE_KEY), how="inner")
    in_last = rows["run_id"] == rows["last_run_id"]
    failed_now = rows["failed"] & ~in_last
    # Tried in the scope's previous run (collected or failed) and not in its latest.
    was_in_previous = (rows["run_id"] == rows["previous_run_id"])
    previous_errors = errors.merge(two_runs[[*SCOPE_KEY, "previous_run_id"]], on=list(SCOPE_KEY))
    previous_errors = previous_errors[previous_errors["run_id"] == previous_errors["previous_run_id"]]
    tried_before = rows.merge(previous_errors[list(INSTANCE_KEY)].drop_duplicates().assign(_tried=True),
                              on=list(INSTANCE_KEY), how="left")["_tried"].eq(True).to_numpy()
    was_in_previous = was_in_previous.to_numpy() | tried_before
    gone = rows["disappeared"].to_numpy() & was_in_previous
    not_tried = ~in_last.to_numpy() & ~failed_now.to_numpy() & ~gone & (rows["last_discovery"] == "failed").to_numpy() \
        & was_in_previous
    keep = in_last.to_numpy() | failed_now.to_numpy() | gone | not_tried
    rows = rows[keep].reset_index(drop=True)
    in_last, failed_now = in_last[keep].to_numpy(), failed_now[keep].to_numpy()
    gone, not_tried = gone[keep], not_tried[keep]

    prior = before.set_index(list(SERIES_KEY))
    key = pd.MultiIndex.from_frame(rows[list(SERIES_KEY)])
    out = pd.DataFrame({
        "run_id": rows["last_run_id"].astype(STRING_DTYPE),
        "collected_at": rows["last_collected_at"].astype(TIMESTAMP_DTYPE),
        "previous_run_id": rows["previous_run_id"].astype(STRING_DTYPE),
        "previous_collected_at": rows["previous_collected_at"].astype(TIMESTAMP_DTYPE),
    })
    for name in SERIES_KEY:
        out[name] = rows[name].astype(STRING_DTYPE)
    out["instance_name"] = rows["instance_name"].astype(STRING_DTYPE)
    has_prior = key.isin(prior.index) if len(prior) else np.zeros(len(rows), dtype=bool)
    differs = np.zeros(len(rows), dtype=bool)
    for name in TOTAL_COLUMNS:
        latest_value = rows[name].astype("Int64")
        prior_value = (prior[name].reindex(key).astype("Int64").to_numpy() if len(prior)
                       else pd.array([pd.NA] * len(rows), dtype="Int64"))
        now = pd.array(np.where(in_last, latest_value.to_numpy(dtype=object, na_value=pd.NA), pd.NA),
                       dtype="Int64")
        # The previous side: the series' own previous snapshot when its latest is from this
        # run, else the latest itself (what it had when last seen).
        then = pd.array(np.where(in_last, np.asarray(prior_value, dtype=object),
                                 latest_value.to_numpy(dtype=object, na_value=pd.NA)), dtype="Int64")
        out[name] = now
        out[f"previous_{name}"] = then
        out[f"{name}_delta"] = out[name] - out[f"previous_{name}"]
        differs |= (out[f"{name}_delta"].fillna(0) != 0).to_numpy()
    appeared = in_last & ~has_prior
    status = np.select([appeared, in_last & differs, in_last, gone, failed_now | not_tried],
                       ["appeared", "changed", "unchanged", "disappeared", "failed"], "failed")
    out.insert(out.columns.get_loc("instance_name") + 1, "status", pd.array(status, dtype=STRING_DTYPE))
    summary = _change_summary(out)
    failed_text = pd.Series("collection failed in the latest run; last good snapshot kept", index=out.index,
                            dtype=STRING_DTYPE)
    failed_text = failed_text.where(~not_tried, "not collected: the project's instance list failed")
    out["summary"] = summary.where(out["status"] != "failed", failed_text).astype(STRING_DTYPE)
    return out.sort_values(["collected_at", "run_id", *SERIES_KEY], kind="stable").reset_index(drop=True)


def _previous(series, before, changes) -> pd.DataFrame:
    """Each series as it stood before its scope's latest run (for the previous fleet ratio)."""
    changed_now = changes[changes["status"].isin(["changed", "unchanged"])]
    gone_now = changes[changes["status"] == "disappeared"]
    key = list(SERIES_KEY)
    in_last = series.merge(changed_now[key], on=key, how="inner")
    replaced = before.merge(in_last[key], on=key, how="inner")
    appeared = changes.loc[changes["status"] == "appeared", key]
    untouched = series[~series["disappeared"]]
    untouched = untouched.merge(pd.concat([changed_now[key], appeared], ignore_index=True).assign(_x=1),
                                on=key, how="left")
    untouched = untouched[untouched["_x"].isna()]
    gone = series.merge(gone_now[key], on=key, how="inner")
    frame = pd.concat([replaced[[*key, *TOTAL_COLUMNS]], untouched[[*key, *TOTAL_COLUMNS]],
                       gone[[*key, *TOTAL_COLUMNS]]], ignore_index=True)
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------ helpers

def age_text(value) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3 h 5 min``, ``4 d 2 h``."""
    seconds = int(pd.Timedelta(value).total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60 % 60, seconds // 3600 % 24, seconds // 86400
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


def _settings(as_of, staleness, tolerance):
    as_of = parse_time(as_of if as_of is not None else datetime.now(timezone.utc), "as_of")
    try:
        tolerance = pd.Timedelta(tolerance)
        staleness = None if staleness is None else pd.Timedelta(staleness)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"staleness and tolerance must be durations such as '15min' or '1h': {exc}") from None
    if tolerance < pd.Timedelta(0) or (staleness is not None and staleness <= pd.Timedelta(0)):
        raise ConfigError("staleness must be positive and tolerance not negative")
    return as_of, as_of + tolerance, staleness


def _conformed(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    if table == "stats" and "instance_name" not in frame.columns:
        frame = frame.assign(instance_name=pd.Series(pd.NA, index=frame.index, dtype=STRING_DTYPE))
    if table == "stats" and "total" not in frame.columns and all(c in frame.columns for c in COUNT_COLUMNS):
        frame = frame.assign(total=frame[list(COUNT_COLUMNS)].sum(axis=1))
    try:
        frame = schema.conform(frame, table)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc
    frame = frame[frame["collected_at"].notna()]
    # The run id orders snapshots of the same time and ties a series to its scope's runs: a row
    # without one cannot be placed (it used to crash the change computation with a TypeError).
    unnamed = int(frame["run_id"].isna().sum())
    if unnamed:
        raise ConfigError(f"{table} data has {unnamed} row(s) without a run_id; every row needs the id of the "
                          "run that collected it (as in a roma-analytics history or export)")
    return frame


def _top(frame: pd.DataFrame, key) -> pd.DataFrame:
    ordered = frame.sort_values([*key, *_RUN_ORDER], kind="stable")
    return ordered.groupby(list(key), sort=False, dropna=False).tail(SNAPSHOTS_KEPT).reset_index(drop=True)


def _future_frame(future: pd.DataFrame) -> pd.DataFrame:
    future = future.drop_duplicates().sort_values([*_RUN_ORDER, *SCOPE_KEY], kind="stable")
    return pd.DataFrame({
        "run_id": future["run_id"].astype(STRING_DTYPE).to_numpy(),
        "collected_at": future["collected_at"].astype(TIMESTAMP_DTYPE).to_numpy(),
        "region": future["region"].astype(STRING_DTYPE).to_numpy(),
        "project_id": future["project_id"].astype(STRING_DTYPE).to_numpy(),
    }).astype({"run_id": STRING_DTYPE, "collected_at": TIMESTAMP_DTYPE, "region": STRING_DTYPE,
               "project_id": STRING_DTYPE})


def _later(at_a, run_a, at_b, run_b) -> pd.Series:
    """Elementwise (at_a, run_a) > (at_b, run_b); False where side a is missing."""
    at_a = pd.Series(at_a).astype(TIMESTAMP_DTYPE)
    at_b = pd.Series(at_b).astype(TIMESTAMP_DTYPE)
    run_a = pd.Series(run_a).astype(STRING_DTYPE)
    run_b = pd.Series(run_b).astype(STRING_DTYPE)
    later = (at_a > at_b) | ((at_a == at_b) & (run_a > run_b))
    return later.fillna(False).astype(bool)


def _ratio(abnormal: int, total: int) -> float:
    return abnormal / total if total else float("nan")


