"""The dashboard on the histories a new user starts with: one run, two runs, a run arriving while
the page is open.  Real collections from the simulator on loopback, driven with AppTest."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from roma_analytics.collect import collect
from roma_analytics.simulator import Simulator
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import APP_PATH
from roma_analytics.targets import Target

APP = str(APP_PATH)
FIRST_RUN = pd.Timestamp("2026-11-20T09:00:00Z")


def append_run(history: Path, sim: Simulator, at: pd.Timestamp) -> None:
    targets = [Target(project_id=project, endpoint=sim.base_url, region="cn-north-4") for project in sim.project_ids]
    HistoryStore(history).append(collect(targets, retries=0, now=at.to_pydatetime()))


@pytest.fixture
def sim():
    with Simulator(projects=2, instances=4, seed=5) as simulator:
        yield simulator


@pytest.fixture
def one_run(tmp_path, sim) -> Path:
    history = tmp_path / "history"
    append_run(history, sim, FIRST_RUN)
    return history


def open_app(monkeypatch, history: Path) -> AppTest:
    monkeypatch.setenv("ROMA_HISTORY", str(history))
    for name in ("ROMA_AUTH_TOKEN", "ROMA_AK", "ROMA_SK", "ROMA_IAM_USER", "ROMA_DASHBOARD_REFRESH"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at) -> str:
    """Every caption, info, warning, markdown and error text on the page."""
    parts = []
    for kind in ("caption", "info", "warning", "markdown", "error", "success"):
        parts.extend(element.value for element in getattr(at, kind))
    return "\n".join(str(part) for part in parts)


def test_the_page_says_how_fresh_the_data_is(monkeypatch, one_run):
    at = open_app(monkeypatch, one_run)
    caption = at.caption[0].value
    assert "data as of the last run, 2026-11-20 09:00 UTC" in caption
    assert "ago" in caption
    assert "checked for new runs" in caption and "every 30 s" in caption


def test_a_run_appended_while_the_page_is_open_is_shown(monkeypatch, one_run, sim):
    at = open_app(monkeypatch, one_run)
    assert "2026-11-20 09:00 UTC" in at.caption[0].value
    append_run(one_run, sim, FIRST_RUN + pd.Timedelta(hours=1))
    at.run()  # what the page's timer does: the freshness check sees the new files and reloads
    assert not at.exception, at.exception
    assert "2026-11-20 10:00 UTC" in at.caption[0].value


def chart_specs(at) -> list[dict]:
    import json

    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def open_view(at, view: str) -> None:
    at.session_state["view"] = view
    at.run()
    assert not at.exception, at.exception


@pytest.mark.parametrize("view", ["Trends", "Heatmap", "Collection health"])
def test_one_run_says_what_a_trend_needs(monkeypatch, one_run, view):
    at = open_app(monkeypatch, one_run)
    open_view(at, view)
    assert at.get("plotly_chart"), "the view still draws its charts"
    assert any("at least two buckets" in info.value for info in at.info), [i.value for i in at.info]


def test_one_run_drill_down_says_what_a_trend_needs(monkeypatch, one_run):
    at = open_app(monkeypatch, one_run)
    open_view(at, "Instance drill-down")
    instance = HistoryStore(one_run).load()["instance_id"].iloc[0]
    at.selectbox(key="drill").set_value(instance).run()
    assert not at.exception, at.exception
    # The counts over time, and the timeline of its abnormal tasks when the run listed some.
    listed = instance in set(HistoryStore(one_run).load(table="abnormal_tasks")["instance_id"])
    assert len(at.get("plotly_chart")) == 1 + listed
    assert any("at least two buckets" in info.value for info in at.info)


def test_one_run_has_no_previous_run_to_compare_with(monkeypatch, one_run):
    at = open_app(monkeypatch, one_run)
    assert any("No previous run to compare with" in info.value for info in at.info)
    # The changes table ("No changes since the previous run") is not shown: the worst instances only.
    assert len(at.get("plotly_chart")) == 1
    assert [("highest abnormal ratio" in t.proto.body, "Changes since" in t.proto.body) for t in at.get("html")] \
        == [(True, False)]
    assert next(m for m in at.metric if m.label == "Abnormal ratio").delta in (None, "")


def test_two_runs_show_their_changes(monkeypatch, one_run, sim):
    append_run(one_run, sim, FIRST_RUN + pd.Timedelta(hours=1))
    at = open_app(monkeypatch, one_run)
    assert not any("No previous run" in info.value for info in at.info)
    assert len(at.get("plotly_chart")) == 1
    assert ["Changes since the previous run" in t.proto.body for t in at.get("html")] == [False, True]


def test_anomaly_caption_says_why_nothing_could_be_judged(monkeypatch, one_run):
    at = open_app(monkeypatch, one_run)
    open_view(at, "Trends")
    caption = " ".join(c.value for c in at.caption)
    # One run is one bucket at every resolution: the caption counts it once (not once per task
    # type) and does not suggest a finer resolution, which cannot help.
    assert "None could be judged" in caption and "holds one" in caption and "of 1 bucket " in caption
    assert "finer resolution" not in caption


def test_anomaly_caption_on_a_few_runs_suggests_a_finer_resolution(monkeypatch, one_run, sim):
    # Two runs a day apart at 1D: two buckets, too few for a baseline; 1h would give more.
    append_run(one_run, sim, FIRST_RUN + pd.Timedelta(days=1))
    at = open_app(monkeypatch, one_run)
    at.sidebar.selectbox(key="resolution").set_value("1D").run()
    open_view(at, "Trends")
    caption = " ".join(c.value for c in at.caption)
    assert "None could be judged" in caption and "of 2 buckets " in caption and "finer resolution" in caption


def test_failed_instances_are_named_and_project_failures_spelled_out():
    from roma_analytics import dashboard

    health = pd.DataFrame({"region": ["r", "r", "r"], "project_id": ["p1", "p1", "p2"],
                           "instance_id": ["i1", "i2", "*"], "collected": [3, 4, 0], "failed": [1, 0, 2]})
    table = dashboard.failed_instances(health, {"i1": "orders"})
    assert table["instance"].tolist() == ["orders (i1)", "whole project (instance discovery failed)"]
    assert "*" not in table.to_string()


def test_the_same_instances_under_a_second_region_open_every_view(monkeypatch, one_run, sim):
    # The collector's endpoint (or its region setting) changed: the same project and instance
    # ids are now stored under a second region.  The Overview showed a traceback ("cannot
    # reindex on an axis with duplicate labels").
    targets = [Target(project_id=project, endpoint=sim.base_url, region="cn-north-9") for project in sim.project_ids]
    HistoryStore(one_run).append(collect(targets, retries=0, now=(FIRST_RUN + pd.Timedelta(hours=1)).to_pydatetime()))
    at = open_app(monkeypatch, one_run)
    import json

    breakdown = json.loads(at.get("plotly_chart")[0].proto.spec)
    labels = breakdown["data"][0]["y"]
    assert len(labels) == len(set(labels)) and any(label.startswith("cn-north-9/") for label in labels)
    for view in ("Trends", "Heatmap", "Collection health", "Data"):
        open_view(at, view)
