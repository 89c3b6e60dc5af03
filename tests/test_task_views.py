"""Where people look at abnormal tasks: the episode timeline, the fleet's longest-broken tasks,
and both in the dashboard on the bundled sample history."""
from __future__ import annotations

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from roma_analytics import charts, dashboard
from roma_analytics import episodes as ep
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.store import HistoryStore
from roma_analytics.streamlit_app import APP_PATH

T = pd.Timestamp("2026-11-01T00:00:00Z")


def episode(task_id, name, start_h, hours, *, still_open=False, ended="recovered", instance="i1"):
    first = T + pd.Timedelta(hours=start_h)
    end = pd.NaT if still_open else first + pd.Timedelta(hours=hours)
    return dict(region="r", project_id="p", instance_id=instance, task_id=task_id, task_name=name,
                task_type="common", first_seen=first,
                last_seen=first + pd.Timedelta(hours=hours if still_open else max(hours - 1, 0)),
                end=end, duration=pd.Timedelta(hours=hours), still_open=still_open,
                ended=None if still_open else ended, runs_seen=1)


@pytest.fixture
def frame():
    return pd.DataFrame([
        episode("t-short", "short", 0, 1),
        episode("t-html", "<a href='https://evil.example'>click</a>", 2, 5, still_open=True),
        episode("t-gone", "gone", 1, 3, ended="disappeared", instance="i2"),
        episode("t-short", "short", 10, 2),
    ])


def test_timeline_draws_one_bar_per_episode_coloured_by_its_end(frame):
    fig = charts.episode_timeline(frame)
    by_name = {trace.name: trace for trace in fig.data}
    assert set(by_name) == {"still abnormal", "recovered", "disappeared"}
    assert len(by_name["recovered"].x) == 2 and len(by_name["still abnormal"].x) == 1
    assert by_name["still abnormal"].marker.color == charts.EPISODE_COLORS["still abnormal"]
    # The longest in total on top: t-html (5 h) above t-gone (3 h) above t-short (3 h in two).
    order = list(fig.layout.yaxis.categoryarray)
    assert "click" in order[-1] and order[0].startswith("short")
    # Server text never reaches plotly as markup.
    assert all("<a" not in label for label in order)
    # A bar spans the episode: 5 hours from its first sighting.
    assert by_name["still abnormal"].x[0] == 5 * 3600 * 1000


def test_timeline_of_nothing_says_so():
    fig = charts.episode_timeline(pd.DataFrame(columns=ep.EPISODE_COLUMNS))
    assert not fig.data and "No abnormal task" in fig.layout.annotations[0].text


def test_longest_broken_puts_open_episodes_first_then_the_longest(frame):
    table = dashboard.longest_broken(frame, {"i1": "orders (i1)"})
    assert list(table["task_id"]) == ["t-html", "t-gone", "t-short", "t-short"]
    assert list(table["hours"]) == [5.0, 3.0, 2.0, 1.0]
    assert table["still_abnormal"].tolist() == [True, False, False, False]
    assert table["instance"].tolist()[:2] == ["orders (i1)", "i2"]
    assert dashboard.longest_broken(frame.iloc[:0]).empty


# ------------------------------------------------------------------------------------ the app

@pytest.fixture
def app(monkeypatch):
    monkeypatch.delenv("ROMA_HISTORY", raising=False)
    at = AppTest.from_file(str(APP_PATH), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_sample_history_has_abnormal_tasks_that_agree_with_its_counts():
    store = HistoryStore(SAMPLE_HISTORY)
    stats, tasks = store.load(), store.load(table="abnormal_tasks")
    listed = store.listed_runs()["run_id"]
    assert len(listed) == stats["run_id"].nunique()
    share = ep.listing_share(stats, tasks, store.load(table="errors"), listed)
    assert (share["share"] == 1.0).all() and len(share) >= 20


def test_the_abnormal_tasks_view_lists_the_longest_broken_tasks(app):
    app.session_state["view"] = "Abnormal tasks"
    app.run()
    assert not app.exception, app.exception
    shown = app.dataframe[0].value
    assert 0 < len(shown) <= 20
    still = shown[shown["still_abnormal"]]
    assert list(still["hours"]) == sorted(still["hours"], reverse=True)
    # Ground truth from the history by the other engine: the longest open episode leads.
    episodes = ep.from_history(HistoryStore(SAMPLE_HISTORY), engine="pandas")
    longest = episodes[episodes["still_open"]].sort_values("duration", ascending=False).iloc[0]
    assert shown.iloc[0]["task_id"] == longest["task_id"]


def test_the_drill_down_shows_the_instance_episodes_from_the_history(app):
    episodes = ep.from_history(HistoryStore(SAMPLE_HISTORY), engine="pandas")
    busiest = episodes["instance_id"].value_counts().index[0]
    app.session_state["view"] = "Instance drill-down"
    app.session_state["drill"] = busiest
    app.run()
    assert not app.exception, app.exception
    figures = app.get("plotly_chart")
    assert len(figures) == 2
    timeline = figures[1].proto.spec
    assert "Abnormal tasks over time" in timeline
