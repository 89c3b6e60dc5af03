"""Details of the dashboard on the bundled sample, driven with AppTest: filters, captions, tables."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import APP_PATH

@pytest.fixture
def app(monkeypatch):
    for name in ("ROMA_HISTORY", "ROMA_AUTH_TOKEN", "ROMA_AK", "ROMA_SK", "ROMA_IAM_USER", "ROMA_DASHBOARD_REFRESH"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(str(APP_PATH), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def specs(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def annotations(spec: dict) -> list[str]:
    return [a.get("text", "") for a in spec["layout"].get("annotations", [])]


def open_view(at, view: str) -> None:
    at.session_state["view"] = view
    at.run()
    assert not at.exception, at.exception


def test_cdc_filter_leaves_no_empty_common_panel_and_no_meaningless_share(app):
    app.sidebar.multiselect(key="task_types").set_value(["cdc"]).run()
    breakdown = specs(app)[0]
    assert "Common tasks" not in annotations(breakdown) and "CDC tasks" in annotations(breakdown)
    open_view(app, "Trends")
    # The abnormal-ratio trend only: a CDC share of a CDC-only selection is 100 % by definition.
    assert len(app.get("plotly_chart")) == 1
    assert any("CDC share compares" in info.value for info in app.info)
    ratio_axis = specs(app)[0]["layout"]["yaxis"]
    assert ratio_axis.get("tickformat", "").endswith("%")


def test_instance_list_is_narrowed_by_region_and_project(app):
    stats = HistoryStore(SAMPLE_HISTORY).load()
    everything = app.sidebar.multiselect(key="instances").options
    app.sidebar.multiselect(key="regions").set_value(["ap-southeast-1"]).run()
    narrowed = app.sidebar.multiselect(key="instances").options
    in_region = stats.loc[stats["region"] == "ap-southeast-1", "instance_id"].nunique()
    assert len(narrowed) == in_region < len(everything)
    project = app.sidebar.multiselect(key="projects").options[0]
    app.sidebar.multiselect(key="regions").set_value([])
    app.sidebar.multiselect(key="projects").set_value([project]).run()
    assert len(app.sidebar.multiselect(key="instances").options) == \
        stats.loc[stats["project_id"] == project, "instance_id"].nunique()


def test_anomalies_are_judged_at_one_day_resolution(app):
    app.sidebar.selectbox(key="resolution").set_value("1D").run()
    open_view(app, "Trends")
    caption = next(c.value for c in app.caption if "Rings mark anomalies" in c.value)
    # 14 days, a 7-day baseline needing 3 earlier days: 11 of the 14 daily buckets judged (each
    # bucket counted once, though both task types are judged in it; 24 buckets at 1 h could not
    # be judged at all, and said nothing).
    assert "in the 11 of 14 buckets" in caption


def test_failed_instances_table_names_the_instances(app):
    open_view(app, "Collection health")
    table = app.dataframe[0].value
    assert list(table.columns)[0] == "instance"
    names = HistoryStore(SAMPLE_HISTORY).load().drop_duplicates("instance_id").set_index("instance_id")["instance_name"]
    first = table["instance"].iloc[0]
    instance_id = first.rsplit("(", 1)[-1].rstrip(")")
    assert first == f"{names[instance_id]} ({instance_id})"


def test_credentials_caption_keeps_its_stars(app):
    app.sidebar.radio(key="source").set_value("Live collection").run()
    caption = next(c.value for c in app.sidebar.caption if "Credentials come from" in c.value)
    # In code spans, Markdown does not read the two `*` as emphasis.
    assert "`iam_*`" in caption and "`ROMA_IAM_*`" in caption

