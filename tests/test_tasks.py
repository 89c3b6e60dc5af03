"""Collecting the abnormal tasks behind the counts: listing, paging, the request budget, failures.

Requests are counted on the simulator's side (``sim.requests("/tasks?")``), never taken from the
collector's own bookkeeping.
"""
from __future__ import annotations

import pandas as pd
import pytest

from roma_analytics import HistoryStore, Target, collect
from roma_analytics.schema import ABNORMAL_TASKS_DTYPES, conform
from roma_analytics.simulator import Simulator
from roma_analytics.tasks import NOT_LISTED, TaskListBudget, task_rows

#: 2025-11-30T00:00:00Z; the simulated clock starts here.
T0 = 1_764_460_800


def running(sim: Simulator, project_id: str) -> list[str]:
    return [i["id"] for i in sim.instances(project_id) if i["status"] == "RUNNING"]


def abnormal_total(sim: Simulator, project_id: str, instance_id: str, at: float) -> int:
    counts = sim.expected_counts(project_id, instance_id, at=at)
    return counts["common"]["abnormal"] + counts["cdc"]["abnormal"]


def task_list_requests(sim: Simulator, instance_id: str | None = None) -> int:
    # "/tasks?" (with the query) never matches ".../statistics/tasks".
    return sim.requests(f"{instance_id}/tasks?" if instance_id else "/tasks?")


@pytest.fixture
def clocked_sim():
    """8 instances, seed 0, its clock at T0 + 2 h: one RUNNING instance has no abnormal task."""
    now = [T0 + 2 * 3600]
    with Simulator(projects=1, instances=8, seed=0, clock=lambda: now[0]) as sim:
        sim.now = now
        yield sim


def targets_of(sim: Simulator) -> list[Target]:
    return [Target(project_id=sim.project_ids[0], endpoint=sim.base_url)]


def test_listing_matches_the_counts_and_pages(clocked_sim):
    sim = clocked_sim
    project = sim.project_ids[0]
    collection = collect(targets_of(sim), task_page_limit=4, now=pd.Timestamp(sim.now[0], unit="s", tz="UTC"))
    tasks = collection.abnormal_tasks
    assert list(tasks.columns) == list(ABNORMAL_TASKS_DTYPES)
    pd.testing.assert_frame_equal(tasks, conform(tasks, "abnormal_tasks"))
    expected_pages = 0
    for instance in running(sim, project):
        counts = sim.expected_counts(project, instance, at=sim.now[0])
        listed = tasks[tasks["instance_id"] == instance]
        for task_type in ("common", "cdc"):
            assert (listed["task_type"] == task_type).sum() == counts[task_type]["abnormal"], (instance, task_type)
        total = counts["common"]["abnormal"] + counts["cdc"]["abnormal"]
        assert set(listed["task_id"]) == set(sim._fleet[project][instance].error_task_ids(sim.now[0]))
        expected_pages += -(-total // 4)
    assert (tasks["execute_status"] == "ERROR").all()
    assert tasks["task_id"].is_unique
    assert task_list_requests(sim) == expected_pages == collection.task_list_requests
    assert expected_pages > len(running(sim, project)), "some instance needed more than one page"
    assert collection.exit_status == 0 and collection.errors.empty


def test_instances_without_abnormal_tasks_cost_no_request(clocked_sim):
    sim = clocked_sim
    project = sim.project_ids[0]
    quiet = [i for i in running(sim, project) if abnormal_total(sim, project, i, sim.now[0]) == 0]
    assert quiet, "the fixture's time has an instance without abnormal tasks"
    collect(targets_of(sim))
    for instance in running(sim, project):
        assert (task_list_requests(sim, instance) == 0) == (instance in quiet)


def test_opting_out_makes_no_task_list_request_and_stores_no_table(clocked_sim, tmp_path):
    sim = clocked_sim
    collection = collect(targets_of(sim), task_list=False)
    assert task_list_requests(sim) == 0
    assert collection.abnormal_tasks is None
    store = HistoryStore(tmp_path / "h")
    store.append(collection)
    assert store.listed_runs().empty
    assert store.load(table="abnormal_tasks").empty
    assert len(store.load()) == len(collection.stats)


@pytest.mark.parametrize("budget", [0, 3, 7])
def test_the_budget_holds_on_the_server_and_the_rest_is_recorded(clocked_sim, budget):
    sim = clocked_sim
    project = sim.project_ids[0]
    collection = collect(targets_of(sim), task_page_limit=4, task_list_budget=budget)
    assert task_list_requests(sim) <= budget
    assert collection.task_list_requests == task_list_requests(sim)
    listed = set(collection.abnormal_tasks["instance_id"])
    not_listed = collection.errors[collection.errors["error_code"] == NOT_LISTED]
    for instance in running(sim, project):
        if abnormal_total(sim, project, instance, sim.now[0]) == 0:
            continue
        # Every instance with abnormal tasks is either listed or recorded as not listed.
        assert (instance in listed) != (instance in set(not_listed["instance_id"])), instance
        if instance not in listed:
            assert task_list_requests(sim, instance) == 0
    assert len(not_listed) == collection.not_listed > 0
    assert not_listed["error_msg"].str.startswith("task list: ").all()
    # The counts of every instance are there; not listing is no failure of the run.
    assert collection.collected == len(running(sim, project))
    assert collection.failed == 0 and collection.exit_status == 0


def test_retries_of_a_listing_are_charged_to_the_budget(clocked_sim):
    sim = clocked_sim
    project = sim.project_ids[0]
    noisy = [i for i in running(sim, project) if abnormal_total(sim, project, i, sim.now[0]) > 0]
    for instance in noisy:
        sim.set_fault(instance, "http_500", api="tasks")
    collection = collect(targets_of(sim), retries=3, task_list_budget=6)
    # Without the budget each failing listing would take 4 requests (1 + 3 retries).
    assert task_list_requests(sim) <= 6
    assert collection.task_list_requests == task_list_requests(sim)
    assert set(collection.errors["instance_id"]) == set(noisy)


def test_a_failed_listing_keeps_the_counts_and_gets_an_errors_row(clocked_sim, tmp_path):
    sim = clocked_sim
    project = sim.project_ids[0]
    broken = next(i for i in running(sim, project) if abnormal_total(sim, project, i, sim.now[0]) > 0)
    sim.set_fault(broken, "http_500", api="tasks")
    collection = collect(targets_of(sim), retries=0)
    assert collection.exit_status == 0 and collection.failed == 0 and collection.not_listed == 1
    store = HistoryStore(tmp_path / "h")
    store.append(collection)
    stats, errors = store.load(), store.load(table="errors")
    counts = sim.expected_counts(project, broken, at=sim.now[0])
    mine = stats[stats["instance_id"] == broken].set_index("task_type")
    assert mine.loc["common", "abnormal"] == counts["common"]["abnormal"]
    assert mine.loc["cdc", "abnormal"] == counts["cdc"]["abnormal"]
    row = errors.iloc[0]
    assert len(errors) == 1 and row["instance_id"] == broken
    assert row["error_code"] == "FDI.9999" and row["http_status"] == 500
    assert row["error_msg"].startswith("task list: ")
    tasks = store.load(table="abnormal_tasks")
    assert broken not in set(tasks["instance_id"]) and len(tasks) > 0


def test_abnormal_tasks_history_round_trip_compaction_and_export(clocked_sim, tmp_path):
    from roma_analytics.export import export_table

    sim = clocked_sim
    store = HistoryStore(tmp_path / "h")
    runs = []
    for step in range(3):
        sim.now[0] = T0 + 2 * 3600 + step * 300
        collection = collect(targets_of(sim), now=pd.Timestamp(sim.now[0], unit="s", tz="UTC"))
        store.append(collection)
        runs.append(collection)
    written = pd.concat([c.abnormal_tasks for c in runs], ignore_index=True)
    before = store.load(table="abnormal_tasks")
    assert len(before) == len(written) > 0
    assert list(store.listed_runs()["run_id"]) == [c.run_id for c in runs]
    report = store.compact(before="2099-01-01")
    assert report.files_merged >= 3 * 2
    after = store.load(table="abnormal_tasks")
    pd.testing.assert_frame_equal(before, after)
    assert len(list((tmp_path / "h" / "abnormal_tasks").glob("date=*/*.parquet"))) == 1
    assert list(store.listed_runs()["run_id"]) == [c.run_id for c in runs]
    out = tmp_path / "tasks.csv"
    exported = export_table(tmp_path / "h", out, format="csv", table="abnormal_tasks")
    assert exported.rows == len(written)
    back = pd.read_csv(out)
    assert set(back["task_id"]) == set(written["task_id"])


def test_task_rows_null_what_the_api_did_not_give():
    rows = task_rows([("x", "p", "i", [{"task_id": "t1", "task_type": "timing", "ext_type": "CDC",
                                        "status": True, "last_modified_time": "yesterday"}])],
                     collected_at=pd.Timestamp("2025-01-01", tz="UTC"), run_id="r")
    row = rows.iloc[0]
    assert row["task_type"] == "cdc" and row["api_task_type"] == "TIMING"
    assert pd.isna(row["status"]) and pd.isna(row["last_modified_time"]) and pd.isna(row["task_name"])


def test_budget_refuses_what_is_not_a_request_count():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            TaskListBudget(bad)
    assert TaskListBudget(None).reserve(10**6) is not None


def test_collect_command_budget_and_opt_out_flags(clocked_sim, tmp_path, capsys):
    import json

    from roma_analytics.cli import main

    sim = clocked_sim
    project = sim.project_ids[0]
    history = tmp_path / "h"
    common = ["collect", "--endpoint", sim.base_url, "--project-id", project, "--history", str(history), "--json"]
    assert main([*common, "--task-list-budget", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task_list_requests"] <= 2 and summary["not_listed"] > 0
    assert task_list_requests(sim) == summary["task_list_requests"]
    sim.reset_counters()
    assert main([*common, "--no-task-list"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["abnormal_task_rows"] is None and task_list_requests(sim) == 0
    store = HistoryStore(history)
    assert len(store.listed_runs()) == 1 and len(store.runs()) == 2
    assert main([*common, "--no-task-list", "--task-list-budget", "3"]) == 2   # they exclude each other
