"""One fleet, many collectors: the fleet state per series (fleet.py), through the real CLI.

Two collectors -- one per project -- append to one history in turns, as teams deploy them.  Every
reader (check, the OpenMetrics export, the dashboard, the pandas and the DuckDB paths) must see
one fleet: no project looks "disappeared" because the other project's collector ran last, a
dropped instance is named exactly once, and a run stamped in the future is nobody's latest.
The expected numbers come from the simulator (what the API answered), not from the code.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from streamlit.testing.v1 import AppTest

from roma_analytics import fleet
from roma_analytics.cli import main
from roma_analytics.collect import collect
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import APP_PATH
from roma_analytics.targets import Target

REGION = "cn-north-4"


@pytest.fixture
def sim():
    with Simulator(projects=2, instances=4, seed=7) as simulator:
        yield simulator


def running(sim, project):
    return sorted(i["id"] for i in sim.instances(project) if i["status"] == "RUNNING")


def collect_cli(sim, history, *projects, instances=()):
    argv = ["collect", "--endpoint", sim.base_url, "--region", REGION, "--history", str(history),
            "--retries", "0", "--project-id", *projects]
    if instances:
        argv += ["--instance-id", *instances]
    return main(argv)


def check_json(history, capsys, *rules):
    capsys.readouterr()
    code = main(["check", "--history", str(history), "--json", "--state", str(history.parent / "state.json"),
                 *rules])
    return code, json.loads(capsys.readouterr().out)


def openmetrics(history, tmp_path, *extra):
    out = tmp_path / "roma.prom"
    assert main(["export", "--format", "openmetrics", "--history", str(history), "--out", str(out), *extra]) == 0
    return {family.name: family for family in text_string_to_metric_families(out.read_text())}


@pytest.fixture
def two_collectors(sim, tmp_path, monkeypatch):
    """Project A's and project B's collectors, interleaved: A, B, A, B, into one history."""
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)
    history = tmp_path / "history"
    a, b = sim.project_ids
    for _ in range(2):
        assert collect_cli(sim, history, a, instances=running(sim, a)) == 0
        assert collect_cli(sim, history, b) == 0
    return history, a, b


def test_collect_takes_several_project_ids_in_one_run(sim, tmp_path, monkeypatch):
    monkeypatch.delenv("ROMA_AUTH_TOKEN", raising=False)
    history = tmp_path / "history"
    a, b = sim.project_ids
    assert collect_cli(sim, history, a, b) == 0
    store = HistoryStore(history)
    stats = store.load()
    assert stats["run_id"].nunique() == 1
    assert {project: sorted(set(group["instance_id"])) for project, group in stats.groupby("project_id")} == {
        a: running(sim, a), b: running(sim, b)}
    scopes = store.load(table="scopes")
    assert sorted(scopes["project_id"]) == sorted([a, b])
    assert set(scopes["discovery"]) == {"listed"}
    assert scopes.set_index("project_id")["collected"].to_dict() == {a: len(running(sim, a)), b: len(running(sim, b))}


def test_interleaved_collectors_are_one_fleet(sim, two_collectors, tmp_path, capsys):
    history, a, b = two_collectors
    code, result = check_json(history, capsys, "--disappeared")
    assert code == 0 and result["firing"] == []

    # Project A's next run no longer lists one of its instances: exactly one finding, naming it.
    dropped, *kept = running(sim, a)
    assert collect_cli(sim, history, a, instances=kept) == 0
    code, result = check_json(history, capsys, "--disappeared")
    assert [f["instance_id"] for f in result["firing"]] == [dropped]
    assert result["firing"][0]["project_id"] == a
    # B's collector runs after A's: the same finding (not new), and nothing about B.
    assert collect_cli(sim, history, b) == 0
    code, result = check_json(history, capsys, "--disappeared")
    assert [(f["instance_id"], f["new"]) for f in result["firing"]] == [(dropped, False)]
    # A's next run still lacks it: gone since before, not newly gone; the finding resolves.
    assert collect_cli(sim, history, a, instances=kept) == 0
    code, result = check_json(history, capsys, "--disappeared")
    assert result["firing"] == [] and [r["rule"] for r in result["resolved"]] == ["disappeared"]

    # The OpenMetrics file: every live series of both projects, one timestamp per project.
    parsed = openmetrics(history, tmp_path, "--label", "env=prod")
    live = {(a, i) for i in kept} | {(b, i) for i in running(sim, b)}
    tasks = {(s.labels["project_id"], s.labels["instance_id"]) for s in parsed["roma_fdi_tasks"].samples}
    assert tasks == live
    stamps = parsed["roma_fdi_collection_timestamp_seconds"].samples
    assert sorted(s.labels["project_id"] for s in stamps) == sorted([a, b])
    assert all(s.labels["env"] == "prod" for family in parsed.values() for s in family.samples)
    store = HistoryStore(history)
    last_runs = store.load(table="scopes").sort_values("collected_at").groupby("project_id").tail(1)
    assert {s.labels["project_id"]: s.value for s in stamps} == {
        row.project_id: row.collected_at.timestamp() for row in last_runs.itertuples()}
    # The counts are what the simulator answered for each instance's latest snapshot.
    stats = store.load()
    latest = stats.sort_values("collected_at").groupby(["instance_id", "task_type"]).tail(1)
    for sample in parsed["roma_fdi_tasks"].samples:
        row = latest[(latest["instance_id"] == sample.labels["instance_id"])
                     & (latest["task_type"] == sample.labels["task_type"])].iloc[0]
        assert sample.value == row[sample.labels["state"]]

    # The dashboard on the same history: KPIs, breakdown and changes agree with check and the export.
    at = AppTest.from_file(str(APP_PATH), default_timeout=120)
    at.session_state["source"] = "History folder"
    at.session_state["folder"] = str(history)
    at.run()
    assert not at.exception, at.exception
    tiles = {metric.label: metric.value for metric in at.metric}
    assert tiles["Instances"] == f"{len(live):,}"
    expected_total = sum(int(latest.loc[(latest["instance_id"] == i), "abnormal"].sum()) for _, i in live)
    assert tiles["Abnormal tasks"] == f"{expected_total:,}"
    # The latest breakdown: one bar group per live instance; the changes table: A's and B's
    # latest runs against their own previous runs, so nobody appeared or disappeared.
    figures = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    breakdown = next(f for f in figures if f["data"] and f["data"][0].get("type") == "bar")
    shown = {label for trace in breakdown["data"] for label in trace.get("y", [])}
    assert len(shown) == len(live)
    # The Overview's tables are HTML (charts.Table.html): the ranking, then the changes.
    changes = [t.proto.body for t in at.get("html") if "Changes since the previous run" in t.proto.body]
    assert len(changes) == 1
    assert "appeared" not in changes[0] and "disappeared" not in changes[0] and "missing" not in changes[0]
    caption = " ".join(str(c.value) for c in at.caption)
    assert "1 instance(s) no longer found" in caption  # the dropped one, left out of the KPIs


def test_pandas_and_duckdb_fleet_states_are_identical(sim, two_collectors):
    history, a, b = two_collectors
    dropped, *kept = running(sim, a)
    assert collect_cli(sim, history, a, instances=kept) == 0
    sim.set_fault(running(sim, b)[0], "http_500")
    assert collect_cli(sim, history, b) == 3
    store = HistoryStore(history)
    for as_of in (None, store.load()["collected_at"].max()):
        on_disk = store.fleet_state(as_of=as_of or pd.Timestamp.now(tz="UTC"))
        in_memory = fleet.fleet_state(store.load(), store.load(table="errors"), store.load(table="scopes"),
                                      as_of=on_disk.as_of)
        for name in ("series", "scopes", "changes", "future", "previous", "unseen"):
            pd.testing.assert_frame_equal(getattr(on_disk, name), getattr(in_memory, name), obj=name)
    state = store.fleet_state()
    statuses = state.series.groupby("instance_id")["status"].first().to_dict()
    assert statuses[dropped] == "disappeared"
    assert statuses[running(sim, b)[0]] == "failed"
    assert set(state.changes.loc[state.changes["instance_id"] == running(sim, b)[0], "status"]) == {"failed"}


def test_a_run_stamped_in_the_future_is_nobodys_latest(sim, two_collectors, tmp_path, capsys):
    history, a, b = two_collectors
    store = HistoryStore(history)
    before = store.fleet_state()
    ahead = pd.Timestamp.now(tz="UTC").floor("s") + pd.Timedelta(days=400)
    target = Target(project_id=a, endpoint=sim.base_url, region=REGION)
    store.append(collect([target], now=ahead, retries=0))

    state = store.fleet_state()
    assert list(state.future["collected_at"].unique()) == [ahead]
    pd.testing.assert_frame_equal(state.series, before.series.assign(age=state.series["age"]))
    assert state.kpis()["last_collected_at"] < ahead

    code, result = check_json(history, capsys, "--disappeared")
    rules = [f["rule"] for f in result["firing"]]
    assert rules == ["clock_skew"] and str(ahead.year) in result["firing"][0]["message"]
    assert result["firing"][0]["value"] == pytest.approx(400 * 86400, abs=3600)
    parsed = openmetrics(history, tmp_path)
    assert max(s.value for s in parsed["roma_fdi_collection_timestamp_seconds"].samples) < ahead.timestamp()
    # The next ordinary run warns about it.
    capsys.readouterr()
    assert collect_cli(sim, history, b) == 0
    assert "stamped after" in capsys.readouterr().err

    at = AppTest.from_file(str(APP_PATH), default_timeout=120)
    at.session_state["source"] = "History folder"
    at.session_state["folder"] = str(history)
    at.run()
    assert not at.exception, at.exception
    assert any("clock is wrong" in str(warning.value) for warning in at.warning)
    caption = " ".join(str(c.value) for c in at.caption)
    assert str(ahead.year) not in caption


def test_a_failed_instance_keeps_its_last_good_snapshot_and_a_stopped_collector_goes_stale(sim, tmp_path):
    a = sim.project_ids[0]
    ids = running(sim, a)
    targets = [Target(project_id=a, instance_id=i, endpoint=sim.base_url, region=REGION) for i in ids]
    store = HistoryStore(tmp_path / "history")
    t0 = pd.Timestamp("2026-01-05T10:00Z")
    for step in range(3):
        if step == 2:
            sim.set_fault(ids[0], "http_500")
        store.append(collect(targets, now=t0 + step * pd.Timedelta(minutes=5), retries=0))
    first_snapshot = store.load(instances=[ids[0]]).sort_values("collected_at").groupby("task_type").tail(1)
    state = store.fleet_state(as_of=t0 + pd.Timedelta(minutes=11))
    row = state.series[state.series["instance_id"] == ids[0]]
    assert set(row["status"]) == {"failed"} and set(row["failed"]) == {True}
    assert set(row["last_error_code"]) == {"FDI.9999"}   # what the simulator's HTTP 500 answers
    assert sorted(row["abnormal"]) == sorted(first_snapshot["abnormal"])
    assert state.kpis()["failed_collections"] == 1
    # Three usual intervals (15 min) after the last run, every series is stale, none dropped.
    later = store.fleet_state(as_of=t0 + pd.Timedelta(minutes=10) + pd.Timedelta(minutes=16))
    assert later.series["stale"].all() and len(later.current) == 2 * len(ids)
    assert later.scopes["stale"].tolist() == [True] and later.scopes["interval"].tolist() == [pd.Timedelta(minutes=5)]
    assert len(later) == 0  # the OpenMetrics export shows no stale gauge
    assert store.fleet_state(as_of=t0 + pd.Timedelta(minutes=24)).scopes["stale"].tolist() == [False]


def test_a_failed_task_listing_is_not_a_failed_collection(tmp_path):
    """An errors row beside the instance's stats in the same run is about its task list."""
    with Simulator(projects=1, instances=8, seed=0) as sim:
        project = sim.project_ids[0]
        targets = [Target(project_id=project, endpoint=sim.base_url, region=REGION)]
        store = HistoryStore(tmp_path / "history")
        store.append(collect(targets, retries=0))
        abnormal = store.load().groupby("instance_id")["abnormal"].sum()
        broken = abnormal[abnormal > 0].index[0]
        sim.set_fault(broken, "http_500", api="tasks")
        store.append(collect(targets, retries=0))
    errors = store.load(table="errors")
    assert list(errors["instance_id"]) == [broken] and errors["error_msg"].iloc[0].startswith("task list: ")
    state = store.fleet_state()
    assert not state.series["failed"].any() and state.kpis()["failed_collections"] == 0
    assert state.scopes["success"].tolist() == [True] and state.scopes["failed"].tolist() == [0]
    assert state.scopes["collected"].tolist() == [len(abnormal)]
