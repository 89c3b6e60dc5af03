"""The dashboard's pure helpers: upload parsing (incl. a fuzz test), filtering, downloads, live form."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roma_analytics import analysis, dashboard, fleet, schema
from roma_analytics.errors import ConfigError


def stats_frame(rows) -> pd.DataFrame:
    """rows: (time, run, region, project, instance, name, task_type, running, abnormal, terminated, completed)."""
    frame = pd.DataFrame(rows, columns=["collected_at", "run_id", "region", "project_id", "instance_id",
                                        "instance_name", "task_type", "running", "abnormal", "terminated", "completed"])
    frame["collected_at"] = pd.to_datetime(frame["collected_at"], utc=True)
    frame["total"] = frame[list(schema.COUNT_COLUMNS)].sum(axis=1)
    return schema.conform(frame, "stats")


# Two instances in two projects, three runs over two days; run r3 misses instance b.
SMALL = stats_frame([
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "a", "orders", "common", 5, 1, 0, 4),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "a", "orders", "cdc", 2, 0, 0, 0),
    ("2026-11-01T00:00Z", "r1", "ap-southeast-1", "p2", "b", "=billing", "common", 1, 3, 0, 0),
    ("2026-11-01T00:00Z", "r1", "ap-southeast-1", "p2", "b", "=billing", "cdc", 0, 0, 0, 0),
    ("2026-11-01T00:30Z", "r2", "cn-north-4", "p1", "a", "orders", "common", 5, 2, 0, 3),
    ("2026-11-01T00:30Z", "r2", "cn-north-4", "p1", "a", "orders", "cdc", 2, 0, 0, 0),
    ("2026-11-01T00:30Z", "r2", "ap-southeast-1", "p2", "b", "=billing", "common", 2, 2, 0, 0),
    ("2026-11-01T00:30Z", "r2", "ap-southeast-1", "p2", "b", "=billing", "cdc", 0, 0, 0, 0),
    ("2026-11-02T09:00Z", "r3", "cn-north-4", "p1", "a", "orders", "common", 6, 0, 0, 4),
    ("2026-11-02T09:00Z", "r3", "cn-north-4", "p1", "a", "orders", "cdc", 1, 1, 0, 0),
])
ERRORS = schema.conform(pd.DataFrame({
    "collected_at": pd.to_datetime(["2026-11-02T09:00Z"], utc=True), "run_id": ["r3"],
    "region": ["ap-southeast-1"], "project_id": ["p2"], "instance_id": ["b"], "http_status": [500],
    "error_code": ["FDI.9999"], "error_msg": ["Network error."], "request_id": [None], "attempts": [1],
}), "errors")


# ------------------------------------------------------------------------------ filtering

def test_kpis_of_a_selection_are_the_hand_computed_numbers():
    selection = dashboard.apply_filters(dashboard.prepare(SMALL, ERRORS, "1h"), dashboard.Filters())
    kpis = selection.fleet.kpis()
    assert kpis == analysis.kpis(SMALL, ERRORS, as_of=SMALL["collected_at"].max())
    # Latest: a from r3 (common 6/0/0/4, cdc 1/1/0/0), b from r2 (common 2/2/0/0, cdc 0).
    assert kpis["instances"] == 2
    assert (kpis["running"], kpis["abnormal"], kpis["total"]) == (9, 3, 16)
    assert kpis["abnormal_ratio"] == pytest.approx(3 / 16)
    # Before r3 the latest were r2's: abnormal 2 + 2 of 10 + 2 + 4 = 16 tasks.
    assert kpis["previous_abnormal_ratio"] == pytest.approx(4 / 16)
    assert kpis["last_run_id"] == "r3" and kpis["failed_collections"] == 1


def test_filters_select_what_they_name():
    prepared = dashboard.prepare(SMALL, ERRORS, "1h")
    only_p1 = dashboard.apply_filters(prepared, dashboard.Filters(projects=["p1"]))
    assert set(only_p1.latest["instance_id"]) == {"a"} and only_p1.errors.empty
    first_day = dashboard.apply_filters(prepared, dashboard.Filters(
        since=pd.Timestamp("2026-11-01", tz="UTC"), until=pd.Timestamp("2026-11-02", tz="UTC")))
    assert set(first_day.latest["run_id"]) == {"r2"}
    cdc = dashboard.apply_filters(prepared, dashboard.Filters(task_types=["cdc"], regions=["cn-north-4"]))
    assert cdc.fleet.kpis()["abnormal"] == 1


@pytest.mark.parametrize("freq", ["15min", "1h", "6h", "1D"])
@pytest.mark.parametrize("filters", [
    dashboard.Filters(),
    dashboard.Filters(instances=["a"]),
    dashboard.Filters(since=pd.Timestamp("2026-11-02", tz="UTC")),
    dashboard.Filters(task_types=["common"], projects=["p2", "p1"]),
])
def test_reduced_selection_gives_the_same_analysis_as_the_raw_rows(freq, filters):
    """The dashboard's fast path must not change a number: compare with analysis on the raw rows."""
    raw = SMALL
    if filters.since is not None:
        raw = raw[raw["collected_at"] >= filters.since]
    for column, values in (("instance_id", filters.instances), ("task_type", filters.task_types),
                           ("project_id", filters.projects)):
        if values:
            raw = raw[raw[column].isin(values)]
    selection = dashboard.apply_filters(dashboard.prepare(SMALL, ERRORS, freq), filters)
    pd.testing.assert_frame_equal(analysis.trend(selection.snapshots, freq), analysis.trend(raw, freq))
    pd.testing.assert_frame_equal(analysis.cdc_vs_common(selection.snapshots, freq), analysis.cdc_vs_common(raw, freq))
    # The fleet state is judged at the end of the range over every earlier row (a series' latest
    # snapshot may be older than the range's start), on the selected series.
    everything = SMALL
    for column, values in (("instance_id", filters.instances), ("task_type", filters.task_types),
                           ("project_id", filters.projects)):
        if values:
            everything = everything[everything["collected_at"].notna() & everything[column].isin(values)]
    errors = ERRORS[ERRORS["project_id"].isin(filters.projects or ERRORS["project_id"])
                    & ERRORS["instance_id"].isin(filters.instances or ERRORS["instance_id"])]
    expected = fleet.fleet_state(everything, errors, as_of=SMALL["collected_at"].max())
    pd.testing.assert_frame_equal(selection.latest, expected.latest_stats())
    pd.testing.assert_frame_equal(selection.fleet.series, expected.series)
    pd.testing.assert_frame_equal(selection.fleet.changes, expected.changes)
    assert selection.fleet.kpis() == expected.kpis() or str(selection.fleet.kpis()) == str(expected.kpis())
    pd.testing.assert_frame_equal(selection.raw_stats(), raw.sort_values(
        ["collected_at", *schema.SERIES_KEY, "run_id"]).reset_index(drop=True))


def test_filters_refuse_partial_days_and_reversed_ranges():
    with pytest.raises(ConfigError, match="whole UTC day"):
        dashboard.Filters(since=pd.Timestamp("2026-11-01T05:00Z"))
    with pytest.raises(ConfigError, match="ends before"):
        dashboard.Filters(since=pd.Timestamp("2026-11-02", tz="UTC"), until=pd.Timestamp("2026-11-01", tz="UTC"))
    with pytest.raises(ConfigError, match="divide a day"):
        dashboard.prepare(SMALL, ERRORS, "7h")


# Names a label cannot tell apart: a "/" (read as project/name), surrounding spaces (stripped), a
# name equal to another instance's id, and two instances of one name in two projects.
CONFUSING = stats_frame([
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-1", "ops/orders", "common", 1, 1, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-2", "  spaced  ", "common", 1, 2, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-3", "i-4", "common", 1, 3, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-4", "billing", "common", 1, 4, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-5", "twin", "common", 1, 5, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p2", "i-5", "twin", "common", 1, 6, 0, 0),
    ("2026-11-01T00:00Z", "r1", "cn-north-4", "p1", "i-7", "<a href='http://x'>x</a>", "common", 1, 7, 0, 0),
])


def test_a_click_on_a_bar_gives_the_id_the_bar_carries_never_a_parsed_label():
    from roma_analytics import charts

    latest = analysis.latest(CONFUSING)
    figure = charts.state_breakdown(latest)
    abnormal = next(t for t in figure.data if t.name == "Abnormal" and t.meta == "common")
    # Each instance's abnormal count is unique, so the bar's own length names the instance.
    by_count = {int(row.abnormal): row.instance_id for row in latest.itertuples()}
    opened = {}
    for x, y, carried in zip(abnormal.x, abnormal.y, abnormal.customdata):
        # What Streamlit's selection event hands the app for a click on this bar.
        point = {"x": x, "y": y, "customdata": carried, "curve_number": 0, "point_index": 0}
        opened[int(x)] = dashboard.instance_from_point(point, latest)
    assert opened == by_count
    assert dashboard.instance_from_point({"y": "billing"}, latest) is None       # no id carried
    assert dashboard.instance_from_point({"customdata": "gone"}, latest) is None  # not selected
    assert dashboard.instance_from_point({"customdata": ["i-4"]}, latest) == "i-4"


def test_instance_picker_labels_are_safe_to_show():
    latest = analysis.latest(SMALL)
    assert dashboard.instance_options(latest) == {"b": "=billing (b)", "a": "orders (a)"}
    hostile = SMALL.assign(instance_name="\u202eevil\x1b[2J" + "x" * 5000)
    labels = dashboard.instance_options(analysis.latest(hostile))
    assert all("\u202e" not in label and "\x1b" not in label and len(label) < 200 for label in labels.values())
    assert all(label.startswith("\\u202eevil\\x1b[2J") for label in labels.values())


# ------------------------------------------------------------------------------ downloads and uploads

def test_csv_download_neutralises_formulas_and_reads_back_unchanged():
    data = dashboard.csv_bytes(SMALL)
    assert b"'=billing" in data and b",=billing" not in data
    table, back = dashboard.read_upload(data, "stats.csv")
    assert table == "stats"
    pd.testing.assert_frame_equal(back, SMALL)


def test_parquet_download_reads_back_unchanged():
    table, back = dashboard.read_upload(dashboard.parquet_bytes(ERRORS, "errors"), "errors.parquet")
    assert table == "errors"
    pd.testing.assert_frame_equal(back, ERRORS)


def test_read_uploads_needs_a_stats_file():
    stats, errors = dashboard.read_uploads([("s.csv", dashboard.csv_bytes(SMALL)),
                                            ("e.csv", dashboard.csv_bytes(ERRORS))])
    assert len(stats) == len(SMALL) and len(errors) == 1
    with pytest.raises(ConfigError, match="no stats table"):
        dashboard.read_uploads([("e.csv", dashboard.csv_bytes(ERRORS))])


def _csv_with(**changes) -> bytes:
    frame = SMALL.astype({"running": object, "total": object, "task_type": object})
    for column, value in changes.items():
        frame.loc[0, column] = value
    return dashboard.csv_bytes(frame)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "neither Parquet nor UTF-8"),
    (b"a,b\n1,2\n", "not a roma-analytics stats or errors export"),
    (dashboard.csv_bytes(SMALL.drop(columns=["completed"])), "not a complete roma-analytics stats export.*completed"),
    (dashboard.csv_bytes(ERRORS.drop(columns=["attempts"])), "not a complete roma-analytics errors export.*attempts"),
    (_csv_with(running="2.5"), "whole numbers"),
    (_csv_with(running="-1", total=9), "whole numbers"),
    (_csv_with(total=99), "total is not running"),
    (_csv_with(task_type="batch"), "unknown task_type"),
    (dashboard.csv_bytes(SMALL).replace(b"2026-11-01T00:00:00Z", b"yesterday", 1), "ISO-8601"),
    (b"PAR1 not really parquet", "not a readable Parquet"),
])
def test_bad_uploads_are_one_clear_config_error(content, message):
    with pytest.raises(ConfigError, match=message):
        dashboard.read_upload(content, "upload.csv")


COLUMN_NAMES = st.sampled_from([*schema.STATS_COLUMNS, *schema.ERRORS_COLUMNS, "date", "x", ""])
CELLS = st.one_of(st.text(max_size=12), st.integers(-5, 10**20).map(str), st.sampled_from(
    ["2026-11-01T00:00:00Z", "common", "cdc", "1.5", "nan", "'=1", "", "NaT", "1e3"]))


def _parquet(columns: dict) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


ARROW_COLUMNS = st.one_of(
    st.lists(st.integers(-2**63, 2**63 - 1), min_size=2, max_size=2).map(lambda v: pa.array(v, pa.int64())),
    st.lists(st.floats(allow_nan=True), min_size=2, max_size=2).map(pa.array),
    st.lists(st.text(max_size=5), min_size=2, max_size=2).map(pa.array),
    st.lists(st.booleans(), min_size=2, max_size=2).map(pa.array),
    st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=2, max_size=2).map(pa.array),
    st.lists(st.integers(-10**12, 10**12), min_size=2, max_size=2).map(lambda v: pa.array(v, pa.timestamp("s"))),
    st.just(pa.array([None, None], pa.string())),
)


def _accepts_or_refuses_cleanly(content: bytes) -> None:
    try:
        table, frame = dashboard.read_upload(content, "fuzz")
    except ConfigError:
        return
    assert table in schema.TABLES
    assert list(frame.columns) == list(schema.TABLES[table])
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == \
        {name: str(dtype) for name, dtype in schema.TABLES[table].items()}
    if table == "stats":
        assert (frame[list(schema.COUNT_COLUMNS)].sum(axis=1) == frame["total"]).all()
        assert (frame[list(schema.COUNT_COLUMNS)] >= 0).all().all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda tail: b"PAR1" + tail),
    st.lists(st.lists(CELLS, min_size=1, max_size=14), min_size=1, max_size=4).flatmap(
        lambda rows: st.lists(COLUMN_NAMES, min_size=1, max_size=14).map(
            lambda header: (",".join(header) + "\n" + "\n".join(",".join(r) for r in rows)).encode())),
    st.lists(CELLS, min_size=len(schema.STATS_COLUMNS), max_size=len(schema.STATS_COLUMNS)).map(
        lambda row: (",".join(schema.STATS_COLUMNS) + "\n" + ",".join(row) + "\n").encode()),
    st.dictionaries(COLUMN_NAMES.filter(bool), ARROW_COLUMNS, min_size=1, max_size=13).map(_parquet),
))
def test_fuzzed_uploads_give_a_valid_frame_or_a_config_error(content):
    _accepts_or_refuses_cleanly(content)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(schema.STATS_COLUMNS)), ARROW_COLUMNS)
def test_a_stats_parquet_with_one_wrong_column_is_refused_or_valid(column, values):
    columns = {name: pa.array([SMALL[name].iloc[i] for i in range(2)]) for name in schema.STATS_COLUMNS}
    columns[column] = values
    _accepts_or_refuses_cleanly(_parquet(columns))


# ------------------------------------------------------------------------------ live form and credentials

def test_form_targets_need_an_endpoint_or_region_and_projects():
    targets = dashboard.form_targets("http://127.0.0.1:9", "", "p1, p2", "", allowed={"http://127.0.0.1:9"})
    assert [(t.project_id, t.instance_id, t.endpoint) for t in targets] == [
        ("p1", None, "http://127.0.0.1:9"), ("p2", None, "http://127.0.0.1:9")]
    assert len(dashboard.form_targets("", "cn-north-4", "p1", "i1 i2")) == 2
    with pytest.raises(ConfigError, match="endpoint URL or a region"):
        dashboard.form_targets("", "", "p1")
    with pytest.raises(ConfigError, match="project id"):
        dashboard.form_targets("", "cn-north-4", " , ")
    with pytest.raises(ConfigError, match="http"):
        dashboard.form_targets("ftp://x", "", "p1")


def test_the_form_reaches_only_endpoints_whoever_runs_the_server_allowed():
    environ = {dashboard.ENDPOINTS_ENV: "https://roma.example.com, http://127.0.0.1:8080/base"}
    secrets = {"roma": {"allowed_endpoints": ["https://ROMA.internal:8443"]}}
    allowed = dashboard.allowed_endpoints(secrets, environ)
    assert allowed == {"https://roma.example.com:443", "http://127.0.0.1:8080", "https://roma.internal:8443"}
    for endpoint in ("https://roma.example.com", "https://roma.example.com:443/v2", "http://127.0.0.1:8080",
                     "https://roma.internal:8443/"):
        assert dashboard.form_targets(endpoint, "", "p1", allowed=allowed)[0].endpoint == endpoint
    # Another host, port or scheme, a look-alike host, or userinfo tricks: refused before any request.
    for endpoint in ("https://evil.example", "http://roma.example.com", "https://roma.example.com:444",
                     "https://roma.example.com.evil.io", "https://roma.example.com@evil.io",
                     "http://127.0.0.1:8081"):
        with pytest.raises(ConfigError, match="ROMA_DASHBOARD_ENDPOINTS"):
            dashboard.form_targets(endpoint, "", "p1", allowed=allowed)
    # Nothing configured: endpoint URLs are refused, regions (official endpoints) still work.
    assert dashboard.allowed_endpoints({}, {}) == frozenset()
    with pytest.raises(ConfigError, match="not among the endpoints"):
        dashboard.form_targets("http://127.0.0.1:9", "", "p1")
    assert dashboard.form_targets("", "cn-north-4", "p1")[0].region == "cn-north-4"
    with pytest.raises(ConfigError, match="not an http"):
        dashboard.allowed_endpoints({"roma": {"allowed_endpoints": "roma.example.com"}}, {})


def test_credentials_come_from_secrets_then_environment_and_are_never_described():
    secret = "tok-s3cr3t-value"
    auth, where = dashboard.auth_from_settings({"roma": {"token": secret}}, environ={})
    assert where == "token from st.secrets" and secret not in repr(auth) + where
    auth, where = dashboard.auth_from_settings({}, environ={"ROMA_AK": "ak-1", "ROMA_SK": "sk-" + secret})
    assert "AK/SK" in where and secret not in repr(auth) + where
    auth, where = dashboard.auth_from_settings(None, environ={"ROMA_AUTH_TOKEN": secret})
    assert "ROMA_AUTH_TOKEN" in where and secret not in repr(auth)
    assert dashboard.auth_from_settings({}, environ={}) == (None, "none")


def test_history_folder_comes_from_the_environment(tmp_path):
    assert dashboard.history_from_env({"ROMA_HISTORY": str(tmp_path)}) == tmp_path
    assert dashboard.history_from_env({"ROMA_HISTORY": "  "}) is None
    with pytest.raises(ConfigError, match="does not exist"):
        dashboard.load_history(tmp_path / "missing")


def test_ratio_change_colours_an_abnormal_rise_red_and_a_rounded_zero_grey():
    assert dashboard.ratio_change(0.0004) == {"delta": "±0.0 pts", "delta_color": "off", "delta_arrow": "off"}
    assert dashboard.ratio_change(0.02) == {"delta": "+2.0 pts", "delta_color": "red", "delta_arrow": "up"}
    assert dashboard.ratio_change(-0.02)["delta_color"] == "green"
    assert dashboard.ratio_change(-0.02, rise_is_bad=False)["delta_color"] == "red"
    assert dashboard.ratio_change(float("nan")) == {"delta": None}


def test_number_formats():
    assert dashboard.ratio_text(0.02859) == "2.9%"
    assert dashboard.count_text(12345) == "12,345"
    assert dashboard.delta_points_text(-0.0199) == "\u22122.0 pts"  # a real minus sign
    assert dashboard.delta_points_text(0.0004) == "±0.0 pts"
    assert dashboard.ratio_text(np.nan) == "–" and dashboard.delta_points_text(np.nan) is None


def test_tables_on_screen_show_text_visibly_and_keep_the_data():
    frame = pd.DataFrame({"instance_id": ["i-\u202e1", None], "error_msg": ["bad\x1b[2J" + "x" * 1000, "ok"],
                          "failed": [3, 1]})
    shown = dashboard.for_display(frame)
    assert shown["instance_id"].iloc[0] == "i-\\u202e1" and pd.isna(shown["instance_id"].iloc[1])
    assert shown["error_msg"].iloc[0].startswith("bad\\x1b[2J") and len(shown["error_msg"].iloc[0]) <= 310
    assert shown["failed"].tolist() == [3, 1]
    assert frame["instance_id"].iloc[0] == "i-\u202e1"        # the data itself is unchanged


def test_an_instance_filter_never_hides_its_projects_later_runs(tmp_path):
    """History without a scopes table: run r1 collects i1 and i2, run r2 (same project) only i1.
    Filtered to i2, the project's later run still counts, so i2 has disappeared -- loaded whole
    and read by query alike (the loaded path used to judge the project by i2's rows only, and
    called i2 merely stale)."""
    from test_store import make_run

    from roma_analytics.store import HistoryStore

    store = HistoryStore(tmp_path / "history")
    for run in (make_run("r1", "2026-03-02T10:00Z", instances=("i1", "i2")),
                make_run("r2", "2026-03-02T10:05Z", instances=("i1",))):
        store.append(run)
    as_of = pd.Timestamp("2026-03-02T10:06Z")
    only_i2 = dashboard.Filters(instances=("i2",))
    loaded = dashboard.prepare(store.load(), store.load(table="errors"), "1h", as_of=as_of)
    by_query = dashboard.prepare_store(store, "1h", as_of=as_of)
    for prepared in (loaded, by_query):
        series = dashboard.apply_filters(prepared, only_i2).fleet.series
        assert series["instance_id"].tolist() == ["i2", "i2"]
        assert series["status"].tolist() == ["disappeared", "disappeared"]


@pytest.mark.parametrize("read", ["loaded whole", "read by query"])
def test_the_health_line_of_a_long_range_has_a_point_per_bucket_not_per_run(read):
    # The sample's 336 hourly runs at a day's resolution: 14 points, each day's worst run.
    from roma_analytics.samples import SAMPLE_HISTORY
    from roma_analytics.store import HistoryStore
    from roma_analytics.streamlit_app import views

    prepared = (dashboard.prepare_folder(SAMPLE_HISTORY, "1D") if read == "loaded whole"
                else dashboard.prepare_store(dashboard.open_history(SAMPLE_HISTORY), "1D"))
    everything = dashboard.Filters(since=prepared.first_day, until=prepared.last_day + pd.Timedelta(days=1))
    line = views.health_views(prepared, everything)[0].data[-1]
    store = HistoryStore(SAMPLE_HISTORY)
    runs = analysis.collection_health(store.load(table="errors"), store.load())
    worst = runs.groupby(runs["collected_at"].dt.floor("1D"))["success_ratio"].min()
    assert len(runs) > len(worst)
    assert len(line.y) == len(worst)
    assert np.allclose(np.asarray(line.y, dtype=float), worst.to_numpy(dtype=float))
