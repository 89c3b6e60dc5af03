"""The Streamlit dashboard (app.py) driven with streamlit.testing.v1.AppTest, no browser."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from roma_analytics import analysis, dashboard
from roma_analytics.samples import SAMPLE_HISTORY
from roma_analytics.simulator import Simulator
from roma_analytics.streamlit_app import APP_PATH
from roma_analytics.store import HistoryStore

APP = str(APP_PATH)
FIXED_CLOCK = pd.Timestamp("2026-12-01T10:00:00Z").timestamp()

# The sample history ships inside the package: a missing one is a failure, not a reason to skip.


@pytest.fixture(params=["loaded whole", "read by query"])
def app(monkeypatch, request):
    # A history folder is loaded whole when small (the sample is) and read by query otherwise
    # (dashboard.prepare_folder): every test here holds for both ways.
    if request.param == "read by query":
        monkeypatch.setattr(dashboard, "SMALL_HISTORY_BYTES", 0)
    monkeypatch.delenv("ROMA_HISTORY", raising=False)
    for name in ("ROMA_AUTH_TOKEN", "ROMA_AK", "ROMA_SK", "ROMA_IAM_USER"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def rendered(markdown: str) -> str:
    """The text Markdown shows for ``markdown`` whose only syntax is backslash escapes and bold."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown.replace("**", ""))


def metrics(at) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


def expected_metrics(stats: pd.DataFrame, errors: pd.DataFrame) -> dict[str, str]:
    kpis = analysis.kpis(stats, errors)
    return {
        "Instances": f"{kpis['instances']:,}",
        "Running tasks": f"{kpis['running']:,}",
        "Abnormal tasks": f"{kpis['abnormal']:,}",
        "Terminated tasks": f"{kpis['terminated']:,}",
        "Completed tasks": f"{kpis['completed']:,}",
        "Abnormal ratio": f"{kpis['abnormal_ratio']:.1%}",
        "Not collected": f"{kpis['failed_collections']:,}",
    }


def test_default_run_shows_the_sample_kpis(app):
    store = HistoryStore(SAMPLE_HISTORY)
    assert metrics(app) == expected_metrics(store.load(), store.load(table="errors"))
    ratio = next(m for m in app.metric if m.label == "Abnormal ratio")
    kpis = analysis.kpis(store.load(), store.load(table="errors"))
    # The change in percentage points, with the sign of the hand-computed difference.
    points = round(kpis["abnormal_ratio_delta"] * 100, 1)
    assert ratio.delta == (f"{points:+.1f} pts".replace("-", "\u2212") if points else "±0.0 pts")
    assert "UTC" in app.caption[0].value
    # The state breakdown is a chart; the worst instances and the changes are HTML tables.
    assert len(app.get("plotly_chart")) == 1
    tables = [element.proto.body for element in app.get("html")]
    assert len(tables) == 2
    assert "Instances with the highest abnormal ratio" in tables[0] and "Changes since the previous run" in tables[1]
    # Every ranked instance up to 20, each in its own row.
    instances = store.load().drop_duplicates("instance_id")["instance_id"].nunique()
    assert tables[0].count("<tr style=") == min(instances, 20)


@pytest.mark.parametrize("view, charts", [("Trends", 2), ("Heatmap", 1), ("Collection health", 1), ("Data", 0)])
def test_every_view_renders(app, view, charts):
    app.session_state["view"] = view
    app.run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == charts
    if view == "Data":
        assert [b.label for b in app.get("download_button")] == [
            "Stats as CSV", "Stats as Parquet", "Errors as CSV", "Errors as Parquet"]


def test_project_filter(app):
    store = HistoryStore(SAMPLE_HISTORY)
    project = app.sidebar.multiselect(key="projects").options[1]
    app.sidebar.multiselect(key="projects").set_value([project]).run()
    assert not app.exception
    expected = expected_metrics(store.load(projects=[project]), store.load(projects=[project], table="errors"))
    assert metrics(app) == expected
    assert int(expected["Instances"]) < 30


def test_region_instance_and_task_type_filters(app):
    store = HistoryStore(SAMPLE_HISTORY)
    app.sidebar.multiselect(key="regions").set_value(["ap-southeast-1"]).run()
    assert metrics(app) == expected_metrics(store.load(regions=["ap-southeast-1"]),
                                            store.load(regions=["ap-southeast-1"], table="errors"))
    app.sidebar.multiselect(key="regions").set_value([])
    app.sidebar.multiselect(key="task_types").set_value(["cdc"]).run()
    cdc = store.load(task_types=["cdc"])
    expected = expected_metrics(cdc, store.load(table="errors"))
    # Filtered to CDC, an instance counts when its last CDC snapshot holds CDC tasks.
    last_cdc = cdc.sort_values("collected_at").groupby("instance_id").tail(1)
    expected["Instances"] = f"{int((last_cdc['total'] > 0).sum()):,}"
    assert metrics(app) == expected
    assert int(expected["Instances"]) < 30  # the sample has instances without CDC tasks
    chosen = app.sidebar.multiselect(key="instances").options[:2]
    ids = [option.rsplit("(", 1)[-1].rstrip(")") for option in chosen]
    app.sidebar.multiselect(key="task_types").set_value([])
    app.sidebar.multiselect(key="instances").set_value(ids).run()
    assert metrics(app)["Instances"] == "2"


def test_time_range_filter(app):
    store = HistoryStore(SAMPLE_HISTORY)
    app.sidebar.date_input(key="days").set_value((pd.Timestamp("2026-11-03").date(), pd.Timestamp("2026-11-04").date())).run()
    assert not app.exception
    since, until = "2026-11-03", "2026-11-05"
    assert metrics(app) == expected_metrics(store.load(since=since, until=until),
                                            store.load(since=since, until=until, table="errors"))
    assert "2026-11-04 23:00 UTC" in app.caption[0].value


def test_auto_resolution_follows_the_chosen_time_range(app):
    """Grafana-style: the sample's two weeks are drawn hourly; two chosen days get 15-minute
    buckets (the documented rule: at most 2 days -> 15min), read for that range only, and the
    whole range again hourly."""
    def resolution():
        return re.search(r"resolution (\S+)", app.caption[0].value).group(1)

    assert resolution() == "1h"
    app.sidebar.date_input(key="days").set_value((pd.Timestamp("2026-11-03").date(),
                                                  pd.Timestamp("2026-11-04").date())).run()
    assert not app.exception
    assert resolution() == "15min"
    app.sidebar.date_input(key="days").set_value((pd.Timestamp("2026-11-01").date(),
                                                  pd.Timestamp("2026-11-14").date())).run()
    assert resolution() == "1h"


def test_threshold_changes_the_flagged_count(app):
    def flagged():
        return next(m.value for m in app.markdown if "Wilson interval" in m.value)
    ranking = analysis.abnormal_ranking(HistoryStore(SAMPLE_HISTORY).load(), n=None)
    assert flagged().startswith(f"**{int((ranking['wilson_low'] > 0.05).sum()):,}**")
    app.sidebar.slider(key="threshold").set_value(0.0).run()
    assert flagged().startswith(f"**{int((ranking['wilson_low'] > 0).sum()):,}**")


def test_bad_upload_shows_an_error_not_a_traceback(app):
    app.sidebar.radio(key="source").set_value("Uploaded export").run()
    app.sidebar.get("file_uploader")[0].set_value(("stats.csv", b"this,is\nnot,an export\n", "text/csv"))
    app.run()
    assert not app.exception
    # A random CSV is neither table's export: the message names both, not "errors".
    assert any("not a roma-analytics stats or errors export" in error.value.replace("\\", "") for error in app.error)
    # The error says what to do; no generic "choose a data source" under it.
    assert not any("Choose a data source" in info.value for info in app.info)


def test_good_upload_is_shown(app):
    store = HistoryStore(SAMPLE_HISTORY)
    stats = store.load(since="2026-11-10")
    app.sidebar.radio(key="source").set_value("Uploaded export").run()
    app.sidebar.get("file_uploader")[0].set_value(("stats.csv", dashboard.csv_bytes(stats), "text/csv"))
    app.run()
    assert not app.exception
    expected = expected_metrics(stats, None)
    assert metrics(app) == expected


def test_history_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROMA_HISTORY", str(SAMPLE_HISTORY))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert at.sidebar.radio(key="source").value == "History folder"
    monkeypatch.setenv("ROMA_HISTORY", str(tmp_path / "nowhere"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert any("no history" in error.value for error in at.error)


def test_live_collection_against_the_simulator(app, tmp_path, monkeypatch):
    with Simulator(projects=1, instances=4, seed=11, clock=lambda: FIXED_CLOCK) as sim:
        monkeypatch.setenv(dashboard.ENDPOINTS_ENV, sim.base_url)
        project = sim.project_ids[0]
        running = [i["id"] for i in sim.instances(project) if i["status"] == "RUNNING"]
        expected = [sim.expected_counts(project, instance) for instance in running]
        app.sidebar.radio(key="source").set_value("Live collection").run()
        app.sidebar.text_input(key="live_endpoint").set_value(sim.base_url)
        app.sidebar.text_input(key="live_projects").set_value(project)
        app.sidebar.checkbox(key="live_append").check()
        app.sidebar.text_input(key="live_history").set_value(str(tmp_path / "history"))
        app.sidebar.button[0].click().run()
        assert not app.exception, app.exception
        assert any("Collected" in s.value for s in app.success)
        shown = metrics(app)
        assert shown["Instances"] == str(len(running))
        assert shown["Abnormal tasks"] == f"{sum(c['common']['abnormal'] + c['cdc']['abnormal'] for c in expected):,}"
        assert shown["Running tasks"] == f"{sum(c['common']['running'] + c['cdc']['running'] for c in expected):,}"
        assert len(HistoryStore(tmp_path / "history").load()) == 2 * len(running)

        # Drill-down: the instance's tasks in ERROR come from the task-list API.
        worst = max(running, key=lambda i: sum(c["abnormal"] for c in sim.expected_counts(project, i).values()))
        app.session_state["view"] = "Instance drill-down"
        app.run()
        app.selectbox(key="drill").set_value(worst).run()
        assert not app.exception, app.exception
        abnormal = sum(c["abnormal"] for c in sim.expected_counts(project, worst).values())
        table = app.dataframe[0].value
        assert len(table) == abnormal and set(table["execute_status"]) == {"ERROR"}


def test_unreachable_endpoint_is_a_message(app, monkeypatch):
    monkeypatch.setenv(dashboard.ENDPOINTS_ENV, "http://127.0.0.1:9")
    app.sidebar.radio(key="source").set_value("Live collection").run()
    app.sidebar.text_input(key="live_endpoint").set_value("http://127.0.0.1:9")
    app.sidebar.text_input(key="live_projects").set_value("p1")
    app.sidebar.button[0].click().run()
    assert not app.exception
    message = next(error.value for error in app.error if "Nothing was collected" in error.value).replace("\\", "")
    # No credentials is said in words, not as "the credentials (none)".
    assert "(none)" not in message and "none were found" in message


def test_live_form_errors_are_messages(app):
    app.sidebar.radio(key="source").set_value("Live collection").run()
    app.sidebar.button[0].click().run()
    assert not app.exception
    assert any("endpoint URL or a region" in error.value for error in app.error)


# ------------------------------------------------------------------------------ credentials stay home

def test_a_url_typed_into_the_form_never_receives_the_server_credentials(app, recorder, monkeypatch):
    url = recorder.url
    token = "server-token-must-stay-home-7c1e"
    monkeypatch.setenv("ROMA_AUTH_TOKEN", token)
    monkeypatch.delenv(dashboard.ENDPOINTS_ENV, raising=False)
    app.sidebar.radio(key="source").set_value("Live collection").run()
    app.sidebar.text_input(key="live_endpoint").set_value(url)
    app.sidebar.text_input(key="live_projects").set_value("p1")
    app.sidebar.button[0].click().run()
    assert not app.exception, app.exception
    assert recorder.requests == []
    assert any("not among the endpoints" in rendered(error.value) and dashboard.ENDPOINTS_ENV in rendered(error.value)
               for error in app.error)

    # Once whoever runs the server allows the endpoint, the same form reaches it, with the token.
    monkeypatch.setenv(dashboard.ENDPOINTS_ENV, url)
    app.sidebar.button[0].click().run()
    assert not app.exception, app.exception
    assert recorder.requests and all(r["headers"].get("X-Auth-Token") == token for r in recorder.requests)
    assert token not in "".join(error.value for error in app.error)


def test_a_server_message_is_shown_as_text_not_rendered_as_markdown(app, recorder, monkeypatch):
    from markdown_it import MarkdownIt

    hostile = ("![x](http://evil.example/p.png) [click](http://evil.example/) <http://evil.example/> "
               "*loud* $x^2$ :red[alert] \u202eevil")
    recorder.answer = (400, {"error_code": "FDI.3002", "error_msg": hostile})
    monkeypatch.setenv(dashboard.ENDPOINTS_ENV, recorder.url)
    app.sidebar.radio(key="source").set_value("Live collection").run()
    app.sidebar.text_input(key="live_endpoint").set_value(recorder.url)
    app.sidebar.text_input(key="live_projects").set_value("p1")
    app.sidebar.button[0].click().run()
    assert not app.exception, app.exception
    shown = [error.value for error in app.error if "Nothing was collected" in error.value]
    assert shown and recorder.requests
    page = MarkdownIt("commonmark").render(shown[0])
    assert "<a " not in page and "<img" not in page and "<em>" not in page
    # Every character of the message is still there for the reader, the bidi override as "\u202e".
    assert hostile.replace("\u202e", "\\u202e") in rendered(shown[0])
    assert "\u202e" not in shown[0]


def test_the_abnormal_tasks_tab_follows_the_sidebar(app):
    # It showed the whole history's longest-broken tasks whatever the sidebar chose.
    def shown():
        app.session_state["view"] = "Abnormal tasks"
        app.run()
        assert not app.exception, app.exception
        return app.dataframe[0].value

    everything = shown()
    assert len(everything) > 0
    project = everything["project_id"].iloc[0]
    other = next(p for p in app.sidebar.multiselect(key="projects").options if p != project)
    app.sidebar.multiselect(key="projects").set_value([other])
    narrowed = shown()
    assert project not in set(narrowed["project_id"]) and set(narrowed["project_id"]) <= {other}
    # Days before every episode of the sample: none was abnormal then.
    app.sidebar.multiselect(key="projects").set_value([])
    first_day = app.sidebar.date_input(key="days").min
    app.sidebar.date_input(key="days").set_value((first_day, first_day))
    early = shown()
    episodes = dashboard.folder_episodes(str(SAMPLE_HISTORY))
    day_end = pd.Timestamp(first_day, tz="UTC") + pd.Timedelta(days=1)
    assert len(early) == min(20, int((episodes["first_seen"] < day_end).sum()))


def test_filter_episodes_keeps_what_was_abnormal_in_the_chosen_days():
    t = pd.Timestamp("2026-11-10T00:00:00Z")
    frame = pd.DataFrame({
        "region": ["r1", "r1", "r2", "r1"], "project_id": ["p1", "p2", "p1", "p1"],
        "instance_id": ["i1", "i2", "i3", "i4"], "task_type": ["common", "cdc", "common", "common"],
        "first_seen": [t - pd.Timedelta(days=3), t + pd.Timedelta(hours=5), t - pd.Timedelta(days=1), t + pd.Timedelta(days=2)],
        # i1 ended before the range; i2 inside it; i3 began before and is still abnormal; i4 after it.
        "end": [t - pd.Timedelta(days=2), t + pd.Timedelta(hours=9), pd.NaT, t + pd.Timedelta(days=3)],
    })
    day = dashboard.Filters(since=t, until=t + pd.Timedelta(days=1))
    assert list(dashboard.filter_episodes(frame, day)["instance_id"]) == ["i2", "i3"]
    assert list(dashboard.filter_episodes(frame, dashboard.Filters())["instance_id"]) == ["i1", "i2", "i3", "i4"]
    assert list(dashboard.filter_episodes(frame, dashboard.Filters(regions=["r1"], projects=["p1"]))["instance_id"]) \
        == ["i1", "i4"]
    assert list(dashboard.filter_episodes(frame, dashboard.Filters(task_types=["cdc"], since=t))["instance_id"]) == ["i2"]
    # An episode that ended exactly when the range starts was not abnormal in it.
    assert list(dashboard.filter_episodes(frame.assign(end=[t, *frame["end"][1:]]), day)["instance_id"]) == ["i2", "i3"]
