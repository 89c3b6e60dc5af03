"""The fleet-state rules of fleet.py, one rule at a time, on small histories written out by hand.

tests/test_fleet.py runs whole collectors against the simulator; here every history is a few
rows typed in below, and every expected value is worked out from the rule as the module
docstring (and docs/architecture.md, "Fleet state") states it -- latest per series, future
runs, disappeared, failed, stale, changes and the KPIs -- so that a change to any rule fails a
test that names it.  These tests are also what ``scripts/mutation fleet`` runs.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from roma_analytics import fleet
from roma_analytics.errors import ConfigError

T0 = pd.Timestamp("2026-01-05T10:00:00Z")
MIN = pd.Timedelta(minutes=1)


def at(minutes: float) -> pd.Timestamp:
    return T0 + minutes * MIN


def snap(minutes, run, instance, task_type="common", running=0, abnormal=0, terminated=0, completed=0,
         project="p1", region="r1", name=None):
    return {"collected_at": at(minutes), "run_id": run, "region": region, "project_id": project,
            "instance_id": instance, "instance_name": name or f"name-{instance}", "task_type": task_type,
            "running": running, "abnormal": abnormal, "terminated": terminated, "completed": completed,
            "total": running + abnormal + terminated + completed}


def err(minutes, run, instance, code="FDI.9999", msg="HTTP 500", project="p1", region="r1"):
    return {"collected_at": at(minutes), "run_id": run, "region": region, "project_id": project,
            "instance_id": instance, "http_status": 500, "error_code": code, "error_msg": msg,
            "request_id": "req", "attempts": 1}


def scope(minutes, run, discovery="listed", project="p1", region="r1"):
    return {"collected_at": at(minutes), "run_id": run, "region": region, "project_id": project,
            "discovery": discovery, "instances": 0, "collected": 0, "failed": 0}


def state(stats, errors=None, scopes=None, *, as_of, **options):
    stats = pd.DataFrame(stats) if stats else pd.DataFrame([snap(0, "x", "x")]).iloc[:0]
    errors = None if errors is None else (pd.DataFrame(errors) if errors else pd.DataFrame([err(0, "x", "x")]).iloc[:0])
    scopes = None if scopes is None else pd.DataFrame(scopes)
    return fleet.fleet_state(stats, errors, scopes, as_of=as_of, **options)


def by_series(frame, column):
    """{(instance_id, task_type): value} of one column of ``series`` or ``changes``."""
    return {(row.instance_id, row.task_type): getattr(row, column) for row in frame.itertuples()}


# ------------------------------------------------------------------------------------ one scope, three runs

@pytest.fixture
def three_runs():
    """One listed scope, runs r1, r2, r3 five minutes apart; as of two minutes after r3.

    i1/common stays the same, i1/cdc changes in r3, i2 is no longer listed in r3, i3 is new in
    r3, i4's collection fails in r3 (an errors row, no stats)."""
    stats = [
        snap(0, "r1", "i1", running=5, abnormal=1, completed=2),
        snap(5, "r2", "i1", running=5, abnormal=1, completed=2),
        snap(10, "r3", "i1", running=5, abnormal=1, completed=2),
        snap(0, "r1", "i1", "cdc", running=1),
        snap(5, "r2", "i1", "cdc", running=2, abnormal=1),
        snap(10, "r3", "i1", "cdc", running=2, abnormal=3, terminated=1),
        snap(0, "r1", "i2", running=3),
        snap(5, "r2", "i2", running=3, abnormal=2),
        snap(10, "r3", "i3", abnormal=4),
        snap(0, "r1", "i4", running=1, abnormal=1),
        snap(5, "r2", "i4", running=2, abnormal=1),
    ]
    errors = [err(10, "r3", "i4", code="FDI.0500", msg="server error")]
    scopes = [scope(0, "r1"), scope(5, "r2"), scope(10, "r3")]
    return state(stats, errors, scopes, as_of=at(12))


def test_each_series_shows_its_latest_snapshot_and_status(three_runs):
    series = three_runs.series
    assert list(zip(series["instance_id"], series["task_type"])) == [
        ("i1", "cdc"), ("i1", "common"), ("i2", "common"), ("i3", "common"), ("i4", "common")]
    assert by_series(series, "status") == {("i1", "cdc"): "ok", ("i1", "common"): "ok",
                                           ("i2", "common"): "disappeared", ("i3", "common"): "ok",
                                           ("i4", "common"): "failed"}
    assert by_series(series, "run_id") == {("i1", "cdc"): "r3", ("i1", "common"): "r3", ("i2", "common"): "r2",
                                           ("i3", "common"): "r3", ("i4", "common"): "r2"}
    assert series["abnormal"].tolist() == [3, 1, 2, 4, 1]
    assert series["total"].tolist() == [6, 8, 5, 4, 3]
    assert series["abnormal_ratio"].tolist() == [3 / 6, 1 / 8, 2 / 5, 4 / 4, 1 / 3]
    assert series["failed"].tolist() == [False, False, False, False, True]
    assert series["disappeared"].tolist() == [False, False, True, False, False]
    assert series["stale"].tolist() == [False] * 5
    assert series["age"].tolist() == [2 * MIN, 2 * MIN, 7 * MIN, 2 * MIN, 7 * MIN]
    # The failed instance's last attempt is its errors row; the others' their snapshot.
    assert series["last_attempt_at"].tolist() == [at(10), at(10), at(5), at(10), at(10)]
    assert series["last_error_code"].tolist()[:4] == [pd.NA] * 4
    assert series["last_error_code"].iloc[4] == "FDI.0500" and series["last_error_msg"].iloc[4] == "server error"
    assert series["scope_run_id"].tolist() == ["r3"] * 5
    assert series["instance_name"].tolist() == ["name-i1", "name-i1", "name-i2", "name-i3", "name-i4"]


def test_the_current_and_fresh_views_leave_out_what_is_gone(three_runs):
    assert sorted(three_runs.current["instance_id"]) == ["i1", "i1", "i3", "i4"]
    assert sorted(three_runs.fresh["instance_id"]) == ["i1", "i1", "i3", "i4"]
    assert len(three_runs) == 4
    latest = three_runs.latest_stats()
    assert list(latest.columns) == list(fleet.schema.STATS_COLUMNS)
    assert sorted(latest["instance_id"]) == ["i1", "i1", "i3", "i4"]


def test_the_scope_table_describes_the_last_run(three_runs):
    scopes = three_runs.scopes
    assert len(scopes) == 1
    row = scopes.iloc[0]
    assert (row["region"], row["project_id"]) == ("r1", "p1")
    assert (row["last_run_id"], row["last_collected_at"], row["last_discovery"]) == ("r3", at(10), "listed")
    assert (row["previous_run_id"], row["previous_collected_at"]) == ("r2", at(5))
    assert row["runs_seen"] == 3
    assert row["interval"] == 5 * MIN and row["stale_after"] == 15 * MIN
    assert row["age"] == 2 * MIN and not row["stale"]
    # r3 collected i1 and i3 (i1 counts once for its two task types) and failed on i4.
    assert (row["instances"], row["collected"], row["failed"]) == (3, 2, 1)
    assert not row["success"]
    assert list(scopes.columns) == [
        "region", "project_id", "last_run_id", "last_collected_at", "last_discovery", "previous_run_id",
        "previous_collected_at", "runs_seen", "interval", "stale_after", "age", "stale", "instances",
        "collected", "failed", "success"]


def test_changes_compare_the_latest_run_with_each_series_previous_snapshot(three_runs):
    changes = three_runs.changes
    assert by_series(changes, "status") == {("i1", "cdc"): "changed", ("i1", "common"): "unchanged",
                                            ("i2", "common"): "disappeared", ("i3", "common"): "appeared",
                                            ("i4", "common"): "failed"}
    assert set(changes["run_id"]) == {"r3"} and set(changes["previous_run_id"]) == {"r2"}
    assert set(changes["collected_at"]) == {at(10)} and set(changes["previous_collected_at"]) == {at(5)}
    cdc = changes[(changes["instance_id"] == "i1") & (changes["task_type"] == "cdc")].iloc[0]
    assert (cdc["abnormal"], cdc["previous_abnormal"], cdc["abnormal_delta"]) == (3, 1, 2)
    assert (cdc["terminated"], cdc["previous_terminated"], cdc["terminated_delta"]) == (1, 0, 1)
    assert (cdc["running"], cdc["previous_running"], cdc["running_delta"]) == (2, 2, 0)
    assert (cdc["total"], cdc["previous_total"], cdc["total_delta"]) == (6, 3, 3)
    assert cdc["summary"] == "abnormal +2, terminated +1 since the previous run"
    assert by_series(changes, "summary")[("i1", "common")] == "no change since the previous run"
    # Appeared: nothing before; the latest values now.
    new = changes[changes["instance_id"] == "i3"].iloc[0]
    assert new["abnormal"] == 4 and new["previous_abnormal"] is pd.NA and new["abnormal_delta"] is pd.NA
    assert new["summary"] == "appeared since the previous run (abnormal 4 of 4 tasks)"
    # Gone and failed: nothing now; what the series had when last seen.
    gone = changes[changes["instance_id"] == "i2"].iloc[0]
    assert gone["abnormal"] is pd.NA and (gone["previous_abnormal"], gone["previous_total"]) == (2, 5)
    assert gone["summary"] == "missing since the previous run (had abnormal 2 of 5 tasks)"
    failed = changes[changes["instance_id"] == "i4"].iloc[0]
    assert failed["abnormal"] is pd.NA and (failed["previous_running"], failed["previous_total"]) == (2, 3)
    assert failed["summary"] == "collection failed in the latest run; last good snapshot kept"
    assert list(changes["instance_id"]) == ["i1", "i1", "i2", "i3", "i4"]
    assert list(changes["instance_name"]) == ["name-i1", "name-i1", "name-i2", "name-i3", "name-i4"]
    assert list(changes.columns[:10]) == ["run_id", "collected_at", "previous_run_id", "previous_collected_at",
                                          "region", "project_id", "instance_id", "task_type", "instance_name",
                                          "status"]


def test_kpis_add_up_the_current_series(three_runs):
    kpis = three_runs.kpis()
    # Current: i1/cdc (2, 3, 1, 0), i1/common (5, 1, 0, 2), i3 (0, 4, 0, 0), i4 as of r2 (2, 1, 0, 0).
    assert {k: kpis[k] for k in ("instances", "running", "abnormal", "terminated", "completed", "total")} == {
        "instances": 3, "running": 9, "abnormal": 9, "terminated": 1, "completed": 2, "total": 21}
    assert kpis["abnormal_ratio"] == 9 / 21
    # Before r3: i1/cdc and i1/common as of r2 (1 of 3, 1 of 8), i4 unchanged (1 of 3) and the
    # gone i2 as of r2 (2 of 5); the new i3 was not there.
    assert kpis["previous_abnormal_ratio"] == 5 / 19
    assert kpis["abnormal_ratio_delta"] == 9 / 21 - 5 / 19
    assert (kpis["last_run_id"], kpis["last_collected_at"]) == ("r3", at(10))
    assert kpis["failed_collections"] == 1
    assert (kpis["stale_series"], kpis["stale_instances"], kpis["disappeared_instances"], kpis["future_runs"]) == (
        0, 0, 1, 0)
    previous = three_runs.previous
    assert list(previous.columns) == [*fleet.SERIES_KEY, *fleet.TOTAL_COLUMNS]
    assert list(previous.index) == list(range(len(previous)))
    assert list(zip(previous["instance_id"], previous["task_type"], previous["abnormal"], previous["total"])) == [
        ("i1", "cdc", 1, 3), ("i1", "common", 1, 8), ("i2", "common", 2, 5), ("i4", "common", 1, 3)]
    assert isinstance(kpis["instances"], int) and isinstance(kpis["total"], int)


def test_an_empty_history_has_empty_kpis():
    kpis = state([], [], as_of=at(0)).kpis()
    assert kpis["instances"] == 0 and kpis["total"] == 0 and math.isnan(kpis["abnormal_ratio"])
    assert math.isnan(kpis["previous_abnormal_ratio"]) and math.isnan(kpis["abnormal_ratio_delta"])
    assert kpis["last_run_id"] is None and kpis["last_collected_at"] is None
    assert kpis["failed_collections"] == 0 and kpis["future_runs"] == 0


# ------------------------------------------------------------------------------------ latest

def test_equal_times_are_ordered_by_run_id():
    stats = [snap(0, "rb", "i1", abnormal=2), snap(0, "ra", "i1", abnormal=1)]
    series = state(stats, as_of=at(1)).series
    assert series["run_id"].tolist() == ["rb"] and series["abnormal"].tolist() == [2]
    # An errors row at the same time fails the series only if its run sorts later.
    later = state(stats, [err(0, "rc", "i1")], as_of=at(1)).series
    assert later["failed"].tolist() == [True] and later["status"].tolist() == ["failed"]
    earlier = state(stats, [err(0, "r0", "i1")], as_of=at(1)).series
    assert earlier["failed"].tolist() == [False] and earlier["status"].tolist() == ["ok"]


def test_an_errors_row_beside_stats_of_the_same_run_is_not_a_failed_collection():
    """collect.py writes the task-list error of an instance it collected in the same run."""
    stats = [snap(0, "r1", "i1", abnormal=1), snap(5, "r2", "i1", abnormal=2)]
    result = state(stats, [err(5, "r2", "i1", msg="task list: HTTP 500")], [scope(0, "r1"), scope(5, "r2")],
                   as_of=at(6))
    assert result.series["failed"].tolist() == [False]
    assert result.kpis()["failed_collections"] == 0
    row = result.scopes.iloc[0]
    assert (row["collected"], row["failed"], row["instances"], row["success"]) == (1, 0, 1, True)


def test_series_of_several_scopes_are_judged_by_their_own_scope():
    """Project p2's collector runs after p1's: p1's series are not gone, and each scope's
    changes compare its own two runs."""
    stats = [snap(0, "a1", "i1", project="p1", abnormal=1), snap(1, "b1", "j1", project="p2", abnormal=5),
             snap(10, "a2", "i1", project="p1", abnormal=2), snap(11, "b2", "j1", project="p2", abnormal=5)]
    result = state(stats, as_of=at(12))
    assert result.series["status"].tolist() == ["ok", "ok"]
    assert result.series["scope_run_id"].tolist() == ["a2", "b2"]
    changes = result.changes
    assert changes[["project_id", "run_id", "previous_run_id", "status"]].values.tolist() == [
        ["p1", "a2", "a1", "changed"], ["p2", "b2", "b1", "unchanged"]]
    kpis = result.kpis()
    assert (kpis["last_run_id"], kpis["last_collected_at"]) == ("b2", at(11))
    assert kpis["previous_abnormal_ratio"] == 6 / 6 and kpis["abnormal_ratio"] == 7 / 7
    assert result.scopes["project_id"].tolist() == ["p1", "p2"]
    assert result.scopes["last_discovery"].tolist() == ["inferred", "inferred"]


def test_the_newest_scope_run_breaks_time_ties_by_run_id():
    stats = [snap(0, "b", "i1", project="p1"), snap(0, "a", "j1", project="p2")]
    assert state(stats, as_of=at(1)).kpis()["last_run_id"] == "b"
    stats = [snap(0, "a", "i1", project="p1"), snap(0, "b", "j1", project="p2")]
    assert state(stats, as_of=at(1)).kpis()["last_run_id"] == "b"


# ------------------------------------------------------------------------------------ future runs

def test_a_run_stamped_after_as_of_plus_tolerance_is_ignored_and_reported():
    stats = [snap(0, "r1", "i1", abnormal=1), snap(16, "r2", "i1", abnormal=9)]
    errors = [err(17, "r3", "i1")]
    scopes = [scope(0, "r1"), scope(16, "r2"), scope(17, "r3")]
    result = state(stats, errors, scopes, as_of=at(10))   # the default tolerance: 5 minutes
    assert result.series["run_id"].tolist() == ["r1"] and result.series["status"].tolist() == ["ok"]
    assert result.future[["run_id", "collected_at", "region", "project_id"]].values.tolist() == [
        ["r2", at(16), "r1", "p1"], ["r3", at(17), "r1", "p1"]]
    assert result.kpis()["future_runs"] == 2 and result.kpis()["last_run_id"] == "r1"
    assert result.future_note() == (
        f"2 run(s) are stamped after {at(10).isoformat()} (e.g. run r2 at {at(16).isoformat()}): a collector's "
        "clock is wrong; they are ignored until their time comes. Fix the clock (NTP) and move or delete "
        "those runs.")
    # Within the tolerance a run counts: at exactly as_of + tolerance, and with a wider tolerance.
    assert state(stats, as_of=at(11)).series["run_id"].tolist() == ["r2"]
    assert state(stats, as_of=at(10), tolerance="6min").series["run_id"].tolist() == ["r2"]
    assert state(stats, as_of=at(16), tolerance=0).series["run_id"].tolist() == ["r2"]
    assert state(stats, as_of=at(16) - pd.Timedelta(microseconds=1), tolerance=0).future["run_id"].tolist() == ["r2"]
    assert state(stats, as_of=at(20)).future_note() is None


def test_future_runs_are_listed_once_per_run_and_scope():
    stats = [snap(0, "r1", "i1"), snap(30, "rf", "i1"), snap(30, "rf", "i1", "cdc"), snap(30, "rf", "j1", project="p2")]
    future = state(stats, [err(30, "rf", "i2")], as_of=at(1)).future
    assert future[["run_id", "project_id"]].values.tolist() == [["rf", "p1"], ["rf", "p2"]]
    assert state(stats, as_of=at(1)).kpis()["future_runs"] == 1


# ------------------------------------------------------------------------------------ disappeared

def test_only_a_complete_run_makes_a_series_disappear():
    stats = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(10, "r3", "i1")]
    # r2's discovery failed: i2's absence from it proves nothing; r3 listed the project again.
    errors = [err(5, "r2", "*", code="FDI.LIST")]
    scopes = [scope(0, "r1"), scope(5, "r2", "failed")]
    result = state(stats[:2], errors, scopes, as_of=at(6))
    assert result.series["status"].tolist() == ["ok", "ok"]
    assert result.scopes["last_discovery"].tolist() == ["failed"] and result.scopes["success"].tolist() == [False]
    assert result.kpis()["failed_collections"] == 1   # the scope whose discovery failed
    assert (result.scopes["collected"].tolist(), result.scopes["failed"].tolist()) == ([0], [0])
    # Not tried because the instance list failed: reported as such, not as gone.
    changes = result.changes
    assert changes["status"].tolist() == ["failed", "failed"]
    assert set(changes["summary"]) == {"not collected: the project's instance list failed"}
    assert changes["previous_abnormal"].tolist() == [0, 0]
    # Nothing collected now: the counts are missing, still as whole numbers (Int64).
    assert changes["abnormal"].isna().all() and changes["abnormal"].dtype == "Int64"
    assert changes["abnormal_delta"].dtype == "Int64"

    result = state(stats, errors, scopes + [scope(10, "r3")], as_of=at(11))
    assert by_series(result.series, "status") == {("i1", "common"): "ok", ("i2", "common"): "disappeared"}
    assert result.series["failed"].tolist() == [False, False]
    assert result.kpis()["disappeared_instances"] == 1 and result.kpis()["instances"] == 1
    # r3 against r2 (whose discovery failed): i2 was last tried in r1, before r2 -- not news now.
    assert result.changes[["instance_id", "status"]].values.tolist() == [["i1", "unchanged"]]


def test_a_failed_instance_that_a_later_complete_run_no_longer_tries_is_gone():
    stats = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(10, "r3", "i1")]
    errors = [err(5, "r2", "i2")]
    scopes = [scope(0, "r1"), scope(5, "r2"), scope(10, "r3")]
    before = state(stats[:2], errors, scopes[:2], as_of=at(6))
    assert by_series(before.series, "status")[("i2", "common")] == "failed"
    result = state(stats, errors, scopes, as_of=at(11))
    row = result.series[result.series["instance_id"] == "i2"].iloc[0]
    assert (row["status"], row["failed"], row["disappeared"]) == ("disappeared", False, True)
    assert row["last_attempt_at"] == at(5)
    # It was tried (and failed) in r2, the previous run, and not in r3: gone now.
    assert by_series(result.changes, "status") == {("i1", "common"): "unchanged", ("i2", "common"): "disappeared"}
    assert result.kpis()["failed_collections"] == 0


def test_a_complete_run_at_the_same_time_disappears_a_series_only_when_it_sorts_later():
    stats = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(5, "r2b", "i1")]
    gone = state(stats, scopes=[scope(0, "r1"), scope(5, "r2b")], as_of=at(6)).series
    assert by_series(gone, "disappeared")[("i2", "common")]
    stats = [snap(5, "r2", "i1"), snap(5, "r2", "i2"), snap(5, "r2b", "i1")]
    assert by_series(state(stats, as_of=at(6)).series, "status")[("i2", "common")] == "disappeared"
    stats = [snap(5, "r2b", "i1"), snap(5, "r2b", "i2"), snap(5, "r2", "i1")]
    assert by_series(state(stats, as_of=at(6)).series, "status")[("i2", "common")] == "ok"


def test_instances_that_never_had_a_snapshot_are_unseen_until_they_are_gone():
    stats = [snap(0, "r1", "i1"), snap(5, "r2", "i1")]
    errors = [err(0, "r1", "i9", code="FDI.A"), err(5, "r2", "i9", code="FDI.B", msg="still down")]
    result = state(stats, errors, [scope(0, "r1"), scope(5, "r2")], as_of=at(6))
    assert result.unseen.values.tolist() == [["r1", "p1", "i9", at(5), "r2", "FDI.B", "still down"]]
    assert result.kpis()["failed_collections"] == 1
    assert result.scopes["failed"].tolist() == [1] and result.scopes["instances"].tolist() == [2]
    # r3 lists the project and no longer tries i9: it is gone, not failing.
    later = state(stats + [snap(10, "r3", "i1")], errors, [scope(0, "r1"), scope(5, "r2"), scope(10, "r3")],
                  as_of=at(11))
    assert later.unseen.empty and later.kpis()["failed_collections"] == 0
    assert list(later.unseen.columns) == ["region", "project_id", "instance_id", "collected_at", "run_id",
                                          "error_code", "error_msg"]


# ------------------------------------------------------------------------------------ scopes

def test_scopes_are_inferred_from_rows_when_no_scopes_table_exists():
    stats = [snap(0, "r1", "i1"), snap(5, "r2", "i1")]
    errors = [err(10, "r3", "*", code="FDI.LIST")]
    result = state(stats, errors, as_of=at(11))
    row = result.scopes.iloc[0]
    assert (row["last_run_id"], row["last_discovery"], row["previous_run_id"], row["runs_seen"]) == (
        "r3", "failed", "r2", 3)
    assert result.series["status"].tolist() == ["ok"]
    inferred = state(stats, [], as_of=at(6)).scopes.iloc[0]
    assert (inferred["last_run_id"], inferred["last_discovery"], inferred["success"]) == ("r2", "inferred", True)


def test_recorded_scope_runs_win_over_inferred_ones():
    """A run the scopes table knows is taken from it; runs it does not know are inferred."""
    stats = [snap(0, "r1", "i1"), snap(5, "r2", "i1"), snap(10, "r3", "i1")]
    result = state(stats, [], [scope(5, "r2", "explicit")], as_of=at(6), tolerance=0)
    assert result.scopes[["last_run_id", "last_discovery", "previous_run_id", "runs_seen"]].values.tolist() == [
        ["r2", "explicit", "r1", 2]]
    later = state(stats, [], [scope(5, "r2", "explicit")], as_of=at(11)).scopes
    assert later[["last_run_id", "last_discovery", "previous_run_id"]].values.tolist() == [["r3", "inferred", "r2"]]


def test_a_scope_with_rows_without_a_time_is_judged_by_its_timed_rows():
    stats = pd.DataFrame([snap(0, "r1", "i1", abnormal=1), snap(5, "r2", "i1", abnormal=2)])
    stats.loc[1, "collected_at"] = pd.NaT
    result = fleet.fleet_state(stats, as_of=at(6))
    assert result.series["run_id"].tolist() == ["r1"] and result.scopes["runs_seen"].tolist() == [1]


# ------------------------------------------------------------------------------------ staleness

def test_staleness_is_three_usual_intervals():
    stats = [snap(5 * step, f"r{step}", "i1") for step in range(3)]     # every 5 minutes, last at 10
    exactly = state(stats, as_of=at(25))   # 15 minutes: not yet
    assert exactly.series["stale"].tolist() == [False] and exactly.scopes["stale"].tolist() == [False]
    result = state(stats, as_of=at(25) + pd.Timedelta(microseconds=1))
    assert result.series["stale"].tolist() == [True] and result.series["status"].tolist() == ["stale"]
    assert result.scopes["stale"].tolist() == [True]
    assert len(result) == 0 and result.fresh.empty and len(result.current) == 1
    kpis = result.kpis()
    assert (kpis["stale_series"], kpis["stale_instances"]) == (1, 1)


def test_stale_counts_series_and_instances_apart():
    stats = [snap(5 * step, f"r{step}", "i1", task_type) for step in range(2) for task_type in ("common", "cdc")]
    kpis = state(stats, as_of=at(60)).kpis()
    assert (kpis["stale_series"], kpis["stale_instances"]) == (2, 1)


def test_the_usual_interval_is_the_median_of_the_last_ten_gaps():
    # Six gaps of an hour, then five of two minutes: the last ten gaps are five of each.
    times = [60 * step for step in range(7)] + [360 + 2 * step for step in range(1, 6)]
    stats = [snap(minutes, f"r{n:02d}", "i1") for n, minutes in enumerate(times)]
    result = state(stats, as_of=at(times[-1]))
    assert result.scopes["interval"].tolist() == [31 * MIN] and result.scopes["stale_after"].tolist() == [93 * MIN]
    assert result.scopes["runs_seen"].tolist() == [12]


def test_the_staleness_window_has_a_floor_and_a_default():
    bursts = [snap(0, "r1", "i1"), snap(1, "r2", "i1")]          # a minute apart: at least 5 minutes
    assert state(bursts, as_of=at(1)).scopes["stale_after"].tolist() == [5 * MIN]
    assert state(bursts, as_of=at(6)).series["stale"].tolist() == [False]
    assert state(bursts, as_of=at(6) + pd.Timedelta(seconds=1)).series["stale"].tolist() == [True]
    once = [snap(0, "r1", "i1")]                                   # one run: a day
    result = state(once, as_of=at(0))
    assert result.scopes["stale_after"].tolist() == [pd.Timedelta(days=1)]
    assert result.scopes["interval"].isna().all()
    assert state(once, as_of=T0 + pd.Timedelta(days=1)).series["stale"].tolist() == [False]
    assert state(once, as_of=T0 + pd.Timedelta(days=1, seconds=1)).series["stale"].tolist() == [True]


def test_a_fixed_staleness_window_applies_to_every_scope():
    stats = [snap(0, "r1", "i1"), snap(1, "r2", "i1"), snap(0, "s1", "j1", project="p2")]
    result = state(stats, as_of=at(31), staleness="30min")
    assert result.scopes["stale_after"].tolist() == [30 * MIN, 30 * MIN]
    assert by_series(result.series, "stale") == {("i1", "common"): False, ("j1", "common"): True}


def test_a_disappeared_series_is_never_stale():
    stats = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(5, "r2", "i1")]
    series = state(stats, [], [scope(0, "r1"), scope(5, "r2")], as_of=at(100)).series
    assert by_series(series, "stale") == {("i1", "common"): True, ("i2", "common"): False}
    assert by_series(series, "status") == {("i1", "common"): "stale", ("i2", "common"): "disappeared"}


def test_a_stale_failed_series_is_shown_stale():
    stats = [snap(0, "r1", "i1"), snap(5, "r2", "i1")]
    row = state(stats, [err(10, "r3", "i1")], as_of=at(100)).series.iloc[0]
    assert (row["failed"], row["stale"], row["status"]) == (True, True, "stale")


# ------------------------------------------------------------------------------------ settings

def test_as_of_accepts_an_iso_string_and_a_naive_time_is_utc():
    stats = [snap(0, "r1", "i1")]
    assert state(stats, as_of="2026-01-05T10:03:00").as_of == at(3)
    assert state(stats, as_of=pd.Timestamp("2026-01-05T11:03:00+01:00")).as_of == at(3)
    now = state(stats, as_of=None).as_of
    assert abs(now - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(minutes=1)


@pytest.mark.parametrize("options, words", [
    ({"staleness": "soon"}, "durations such as '15min'"),
    ({"tolerance": "later"}, "durations such as '15min'"),
    ({"staleness": 0}, "staleness must be positive"),
    ({"staleness": "-1min"}, "staleness must be positive"),
    ({"tolerance": "-1s"}, "^staleness must be positive and tolerance not negative$"),
    ({"as_of": "yesterday-ish"}, "as_of="),
])
def test_bad_settings_are_config_errors(options, words):
    options = {"as_of": at(1), **options}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        state([snap(0, "r1", "i1")], **options)


def test_a_zero_tolerance_and_a_timedelta_staleness_are_accepted():
    result = state([snap(0, "r1", "i1")], as_of=at(0), tolerance=pd.Timedelta(0), staleness=pd.Timedelta("1min"))
    assert result.scopes["stale_after"].tolist() == [MIN]
    # Positive means positive: the shortest window pandas can express is accepted too.
    assert len(state([snap(0, "r1", "i1")], as_of=at(0), staleness=pd.Timedelta(nanoseconds=1)).series) == 1


def test_the_default_as_of_is_now_in_utc_whatever_the_machines_time_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Asia/Shanghai")   # UTC+8, no daylight saving
    time.tzset()
    try:
        now = state([snap(0, "r1", "i1")], as_of=None).as_of
    finally:
        monkeypatch.undo()
        time.tzset()
    assert abs(now - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(minutes=1)


def test_a_row_without_a_run_id_is_a_config_error():
    """Rows from elsewhere may lack a run id; it orders snapshots of one time and ties a series to
    its scope's runs, so such a frame is refused with a message, not a crash."""
    stats = pd.DataFrame([snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(5, "r2", "i1")]).astype({"run_id": "string"})
    errors = pd.DataFrame([err(0, "r2", "i1"), err(5, "r2", "i2")]).astype({"run_id": "string"})
    with pytest.raises(ConfigError, match=r"^stats data has 1 row\(s\) without a run_id; every row needs the id of "
                                          r"the run that collected it \(as in a roma-analytics history or export\)$"):
        fleet.fleet_state(stats.assign(run_id=stats["run_id"].where(stats.index != 0)), errors, as_of=at(6))
    with pytest.raises(ConfigError, match=r"^errors data has 2 row\(s\) without a run_id"):
        fleet.fleet_state(stats, errors.assign(run_id=pd.NA), as_of=at(6))
    # A row without a time is left out before: its missing run id does not matter.
    timeless = stats.assign(run_id=stats["run_id"].where(stats.index != 0),
                            collected_at=stats["collected_at"].where(stats.index != 0))
    series = fleet.fleet_state(timeless, as_of=at(6)).series
    assert series[["instance_id", "run_id"]].values.tolist() == [["i1", "r2"], ["i2", "r1"]]


def test_frames_without_names_or_totals_are_completed_and_a_missing_column_is_named():
    stats = pd.DataFrame([snap(0, "r1", "i1", running=2, abnormal=3), snap(0, "r1", "i2", completed=4)]
                         ).drop(columns=["instance_name", "total"])
    series = fleet.fleet_state(stats, as_of=at(1)).series
    assert series["total"].tolist() == [5, 4] and series["instance_name"].isna().all()
    # A given total is kept as it is, even when it is not the sum of the four counts.
    given = pd.DataFrame([{**snap(0, "r1", "i1", running=2), "total": 7}])
    assert fleet.fleet_state(given, as_of=at(1)).series["total"].tolist() == [7]
    with pytest.raises(ConfigError, match="missing column.*abnormal"):
        fleet.fleet_state(stats.drop(columns=["abnormal"]), as_of=at(1))
    with pytest.raises(ConfigError, match="errors data is missing column.*error_code"):
        fleet.fleet_state(pd.DataFrame([snap(0, "r1", "i1")]), pd.DataFrame([err(0, "r1", "i1")]).drop(
            columns=["error_code"]), as_of=at(1))


# ------------------------------------------------------------------------------------ age_text

@pytest.mark.parametrize("seconds, text", [
    (0, "0 s"), (59, "59 s"), (60, "1 min"), (119, "1 min"), (12 * 60, "12 min"), (3599, "59 min"),
    (3600, "1 h"), (3600 + 5 * 60, "1 h 5 min"), (23 * 3600 + 59 * 60, "23 h 59 min"),
    (86400, "1 d"), (86400 + 3600 + 60, "1 d 1 h"), (4 * 86400 + 2 * 3600, "4 d 2 h"), (2 * 86400 + 59 * 60, "2 d"),
])
def test_age_text(seconds, text):
    assert fleet.age_text(pd.Timedelta(seconds=seconds)) == text


# ------------------------------------------------------------------------------------ edges of the rules

def test_rows_stamped_exactly_at_the_cutoff_count():
    """The cutoff (as_of + tolerance) is inclusive for every table."""
    stats = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(5, "r2", "i1")]
    result = state(stats, [err(5, "r2", "i2")], [scope(0, "r1"), scope(5, "r2", "explicit")],
                   as_of=at(5), tolerance=0)
    assert result.future.empty and result.kpis()["future_runs"] == 0
    assert by_series(result.series, "status") == {("i1", "common"): "ok", ("i2", "common"): "failed"}
    assert result.scopes[["last_run_id", "last_discovery"]].values.tolist() == [["r2", "explicit"]]


def test_latest_stats_leaves_out_stale_series_on_request():
    stats = [snap(0, "r1", "i1"), snap(0, "s1", "j1", project="p2"), snap(50, "s2", "j1", project="p2")]
    result = state(stats, as_of=at(51), staleness="30min")
    assert sorted(result.latest_stats()["instance_id"]) == ["i1", "j1"]
    assert result.latest_stats(include_stale=False)["instance_id"].tolist() == ["j1"]


def test_a_history_of_one_run_has_no_previous_ratio():
    result = state([snap(0, "r1", "i1", running=3, abnormal=1)], as_of=at(1))
    kpis = result.kpis()
    assert result.changes.empty and kpis["abnormal_ratio"] == 1 / 4
    assert math.isnan(kpis["previous_abnormal_ratio"]) and math.isnan(kpis["abnormal_ratio_delta"])


def test_kpis_of_a_state_without_unseen_instances():
    """``unseen`` defaults to None (a FleetState built without it): nothing is added for it."""
    import dataclasses

    stats = [snap(0, "r1", "i1"), snap(5, "r2", "i1")]
    errors = [err(5, "r2", "i9"), err(5, "r2", "i1")]
    result = state(stats, errors, as_of=at(6))
    assert len(result.unseen) == 1 and result.kpis()["failed_collections"] == 1
    assert dataclasses.replace(result, unseen=None).kpis()["failed_collections"] == 0


def test_the_future_note_counts_runs_not_scopes():
    stats = [snap(0, "r1", "i1"), snap(30, "rf", "i1"), snap(30, "rf", "j1", project="p2")]
    note = state(stats, as_of=at(1)).future_note()
    assert note.startswith(f"1 run(s) are stamped after {at(1).isoformat()} (e.g. run rf at ")


def test_rows_without_a_region_form_their_own_scope():
    """A history from elsewhere may have no region: its rows are still one scope, judged like any."""
    rows = [snap(0, "r1", "i1"), snap(0, "r1", "i2"), snap(5, "r2", "i1")]
    stats = pd.DataFrame(rows).astype({"region": "string"})
    stats["region"] = pd.NA
    errors = pd.DataFrame([err(10, "r3", "*")]).astype({"region": "string"})
    errors["region"] = pd.NA
    result = fleet.fleet_state(stats, errors, as_of=at(11))
    row = result.scopes.iloc[0]
    assert len(result.scopes) == 1 and row["region"] is pd.NA
    assert (row["last_run_id"], row["last_discovery"], row["previous_run_id"], row["runs_seen"]) == (
        "r3", "failed", "r2", 3)
    assert (row["interval"], row["stale_after"]) == (5 * MIN, 15 * MIN)
    # r2 was complete and no longer listed i2; r3's discovery failed and proves nothing.
    assert result.series["status"].tolist() == ["ok", "disappeared"]
    assert result.series["scope_run_id"].tolist() == ["r3", "r3"]
    assert result.kpis()["failed_collections"] == 1


def test_reduce_history_keeps_the_last_two_of_each_and_one_row_per_run_and_scope():
    stats = pd.DataFrame([snap(minutes, f"r{n}", "i1", abnormal=n) for n, minutes in enumerate((0, 5, 10))]
                         + [snap(10, "r2", "j1", project="p2"), snap(60, "rf", "i1")])
    errors = pd.DataFrame([err(0, "r0", "i2"), err(5, "r1", "i2"), err(10, "r2", "i2"), err(10, "r2", "*")])
    scopes = pd.DataFrame([scope(5, "r1", "explicit")])
    top_stats, top_errors, scope_runs, future = fleet.reduce_history(
        fleet.schema.conform(stats, "stats"), fleet.schema.conform(errors, "errors"),
        fleet.schema.conform(scopes, "scopes"), at(10))
    assert top_stats[["project_id", "instance_id", "run_id"]].values.tolist() == [
        ["p1", "i1", "r1"], ["p1", "i1", "r2"], ["p2", "j1", "r2"]]
    assert list(top_stats.index) == [0, 1, 2] and list(top_stats.columns) == list(fleet.schema.STATS_COLUMNS)
    assert list(top_errors.columns) == list(fleet.schema.ERRORS_COLUMNS)
    assert top_errors[["instance_id", "run_id"]].values.tolist() == [["*", "r2"], ["i2", "r1"], ["i2", "r2"]]
    assert list(scope_runs.columns) == list(fleet.SCOPE_RUN_COLUMNS)
    assert dict(scope_runs.dtypes) == fleet.SCOPE_RUN_COLUMNS
    assert list(scope_runs.index) == list(range(len(scope_runs)))
    assert scope_runs[["project_id", "run_id", "collected_at", "discovery"]].values.tolist() == [
        ["p1", "r0", at(0), "inferred"], ["p1", "r1", at(5), "explicit"], ["p1", "r2", at(10), "failed"],
        ["p2", "r2", at(10), "inferred"]]
    assert future.values.tolist() == [["rf", at(60), "r1", "p1"]]


def test_an_instance_failing_run_after_run_is_one_series_with_its_latest_error():
    stats = [snap(0, "r1", "i1", abnormal=1), snap(0, "r1", "i1", "cdc", abnormal=2)]
    errors = [err(5, "r2", "i1", code="FDI.A"), err(10, "r3", "i1", code="FDI.B", msg="down again")]
    series = state(stats, errors, as_of=at(11)).series
    assert list(zip(series["task_type"], series["status"], series["last_error_code"], series["last_error_msg"])) == [
        ("cdc", "failed", "FDI.B", "down again"), ("common", "failed", "FDI.B", "down again")]
    assert series["last_attempt_at"].tolist() == [at(10), at(10)]


def test_the_state_frames_have_their_documented_columns_and_dtypes(three_runs):
    string, stamp = fleet.STRING_DTYPE, fleet.TIMESTAMP_DTYPE
    series = three_runs.series
    assert list(series.columns) == [*fleet.schema.STATS_COLUMNS, "abnormal_ratio", "age", "stale", "failed",
                                    "disappeared", "status", "last_attempt_at", "last_error_code",
                                    "last_error_msg", "scope_run_id"]
    assert list(series.index) == list(range(len(series)))
    assert {name: series[name].dtype for name in ("status", "scope_run_id", "last_error_code", "last_error_msg",
                                                   "instance_name")} == dict.fromkeys(
        ("status", "scope_run_id", "last_error_code", "last_error_msg", "instance_name"), string)
    assert series["last_attempt_at"].dtype == stamp and series["collected_at"].dtype == stamp
    assert series["stale"].dtype == bool and series["failed"].dtype == bool and series["disappeared"].dtype == bool
    changes = three_runs.changes
    assert changes["status"].dtype == string and changes["summary"].dtype == string
    assert changes["abnormal"].dtype == "Int64" and changes["previous_total"].dtype == "Int64"
    assert list(changes.index) == list(range(len(changes)))
    scopes = three_runs.scopes
    assert {name: scopes[name].dtype for name in ("region", "project_id", "last_run_id", "last_discovery",
                                                  "previous_run_id")} == dict.fromkeys(
        ("region", "project_id", "last_run_id", "last_discovery", "previous_run_id"), string)
    assert scopes["last_collected_at"].dtype == stamp and scopes["previous_collected_at"].dtype == stamp
    assert scopes["stale_after"].dtype == "timedelta64[us]" and scopes["interval"].dtype == "timedelta64[us]"
    assert {name: scopes[name].dtype for name in ("runs_seen", "instances", "collected", "failed")} == dict.fromkeys(
        ("runs_seen", "instances", "collected", "failed"), "int64")
    future = state([snap(0, "r1", "i1"), snap(60, "rf", "i1")], as_of=at(1)).future
    assert dict(future.dtypes) == {"run_id": string, "collected_at": stamp, "region": string, "project_id": string}


def test_counts_moving_between_states_at_the_same_total_are_a_change():
    stats = [snap(0, "r1", "i1", running=2, completed=1), snap(5, "r2", "i1", running=1, abnormal=1, completed=1)]
    changes = state(stats, as_of=at(6)).changes
    assert changes[["status", "total_delta", "summary"]].values.tolist() == [
        ["changed", 0, "running -1, abnormal +1 since the previous run"]]


def test_a_reduction_that_left_runs_out_still_counts_them():
    """HistoryStore's reduction (fleet_rows) may pass only a scope's recent runs, with
    ``_hidden_runs`` saying how many older ones it left out: runs_seen counts those too."""
    stats = fleet.schema.conform(pd.DataFrame([snap(5 * n, f"r{n}", "i1") for n in range(3)]
                                              + [snap(1, "s1", "j1", project="p2")]), "stats")
    top_stats, top_errors, scope_runs, future = fleet.reduce_history(
        stats, fleet.schema.empty_errors(), fleet.schema.empty_scopes(), at(20))
    hidden = scope_runs.assign(_hidden_runs=(scope_runs["project_id"] == "p1").map({True: 7, False: pd.NA}))
    scopes = fleet.finish(top_stats, top_errors, hidden, future, as_of=at(20), staleness=None).scopes
    assert scopes[["project_id", "runs_seen"]].values.tolist() == [["p1", 3 + 7], ["p2", 1]]
    assert scopes["runs_seen"].dtype == "int64"
    plain = fleet.finish(top_stats, top_errors, scope_runs, future, as_of=at(20), staleness=None).scopes
    assert plain["runs_seen"].tolist() == [3, 1]
