"""Tests of roma_analytics.charts on small hand-written analysis outputs.

The frames below are written by hand in the shapes docs/architecture.md gives the analysis
functions, so these tests pin the charts' side of that interface without running analysis.py.
Expected values are read off the hand-written inputs, never off the charts' own output.
"""
from __future__ import annotations

import base64
import html
import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from roma_analytics import charts
from roma_analytics.charts import (
    EMPTY_MESSAGE,
    HIGHLIGHT_COLORS,
    PERCENT_TICKFORMAT,
    STATE_COLORS,
    TASK_TYPE_COLORS,
)

STATES = ["running", "abnormal", "terminated", "completed"]
STATE_NAMES = ["Running", "Abnormal", "Terminated", "Completed"]
T0, T1, T2 = pd.to_datetime(["2024-03-01 00:00", "2024-03-01 01:00", "2024-03-01 02:00"], utc=True)


def naive(*stamps) -> list[pd.Timestamp]:
    """The UTC wall-clock times plotly should receive (plotly.js ignores offsets)."""
    return [pd.Timestamp(s).tz_convert("UTC").tz_localize(None) for s in stamps]


def xs(trace) -> list[pd.Timestamp]:
    return list(pd.to_datetime(np.asarray(trace.x)))


def floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype="float64")]


def same(actual, expected) -> bool:
    """Equality of float lists where NaN equals NaN."""
    return np.array_equal(np.asarray(actual, dtype="float64"), np.asarray(expected, dtype="float64"), equal_nan=True)


# --- hand-written analysis outputs ------------------------------------------------------------
def latest_frame() -> pd.DataFrame:
    """analysis.latest(stats): i1 has 1 abnormal task, i2 has 5, i3 has 4 (both types together)."""
    return pd.DataFrame(
        {
            "region": ["r"] * 6,
            "project_id": ["p"] * 6,
            "instance_id": ["i1", "i1", "i2", "i2", "i3", "i3"],
            "instance_name": ["alpha", "alpha", "beta", "beta", None, None],
            "task_type": ["common", "cdc"] * 3,
            "running": [10, 20, 30, 40, 50, 60],
            "abnormal": [0, 1, 5, 0, 2, 2],
            "terminated": [1, 2, 3, 4, 5, 6],
            "completed": [1000, 7, 8, 9, 10, 11],
            "total": [1011, 30, 46, 53, 67, 79],
        }
    ).astype({"instance_id": "string", "instance_name": "string", "task_type": "string"})


def trend_frame() -> pd.DataFrame:
    """analysis.trend(stats, "1h", by=("task_type",)); the CDC bucket at T2 had no tasks (NaN)."""
    return pd.DataFrame(
        {
            "bucket": [T0, T0, T1, T1, T2, T2],
            "task_type": pd.array(["cdc", "common"] * 3, dtype="string"),
            "running": [9, 90, 8, 80, 0, 70],
            "abnormal": [1, 10, 2, 20, 0, 30],
            "terminated": [0, 0, 0, 0, 0, 0],
            "completed": [0, 0, 0, 0, 0, 0],
            "total": [10, 100, 10, 100, 0, 100],
            "abnormal_ratio": [0.1, 0.1, 0.2, 0.2, np.nan, 0.3],
        }
    )


def anomalies_frame() -> pd.DataFrame:
    """analysis.anomalies(stats, by="task_type"): CDC flagged at T1, common at T2."""
    return trend_frame().assign(
        robust_z=[0.1, -0.5, 3.2, 0.2, np.nan, 4.5],
        is_anomaly=[False, False, True, False, False, True],
    )


def cdc_vs_common_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "bucket": [T0, T1, T2],
            "common_total": [75, 50, 0],
            "cdc_total": [25, 50, 0],
            "common_abnormal": [3, 10, 0],
            "cdc_abnormal": [2, 5, 0],
            "common_abnormal_ratio": [0.04, 0.2, np.nan],
            "cdc_abnormal_ratio": [0.08, 0.1, np.nan],
            "abnormal_ratio_gap": [0.04, -0.1, np.nan],
            "cdc_share": [0.25, 0.5, np.nan],
        }
    )


def trend_by_instance_frame() -> pd.DataFrame:
    """trend(stats, by=("instance_id",)): mean ratios i1 0.15, i2 0.5, i3 0.05; i1 missing at T1."""
    return pd.DataFrame(
        {
            "bucket": [T0, T2, T0, T1, T2, T0, T1, T2],
            "instance_id": pd.array(["i1", "i1", "i2", "i2", "i2", "i3", "i3", "i3"], dtype="string"),
            "abnormal": [1, 2, 5, 5, 5, 0, 1, 0],
            "total": [10, 10, 10, 10, 10, 10, 10, 0],
            "abnormal_ratio": [0.1, 0.2, 0.5, 0.5, 0.5, 0.0, 0.1, np.nan],
        }
    )


def ranking_frame() -> pd.DataFrame:
    """abnormal_ranking: i1 clearly above 10 %, i2 above 10 % only by chance, i3 below."""
    return pd.DataFrame(
        {
            "instance_id": ["i1", "i2", "i3"],
            "instance_name": ["alpha", "beta", "gamma"],
            "abnormal": [300, 1, 5],
            "total": [1000, 2, 1000],
            "abnormal_ratio": [0.3, 0.5, 0.005],
            "wilson_low": [0.2722, 0.0945, 0.0021],
            "wilson_high": [0.3294, 0.9055, 0.0116],
        }
    )


def changes_frame() -> pd.DataFrame:
    """analysis.changes(stats) over runs r1 -> r2 -> r3; only the r3 rows are "what just happened"."""
    na = pd.NA
    return pd.DataFrame(
        {
            "run_id": ["r2", "r3", "r3", "r3", "r3"],
            "collected_at": [T1, T2, T2, T2, T2],
            "instance_id": ["i1", "i1", "i2", "i3", "i4"],
            "instance_name": ["alpha", "alpha", "beta", "gamma", "delta"],
            "task_type": ["cdc", "common", "cdc", "cdc", "common"],
            "status": ["changed", "changed", "changed", "unchanged", "appeared"],
            "summary": [
                "abnormal +9 since the previous run",
                "running +1, abnormal -1, completed +1,200 since the previous run",
                "running -3, abnormal +3 since the previous run",
                "no change since the previous run",
                "appeared since the previous run (abnormal 0 of 5 tasks)",
            ],
            "running_delta": pd.array([0, 1, -3, 0, na], dtype="Int64"),
            "abnormal_delta": pd.array([9, -1, 3, 0, na], dtype="Int64"),
            "terminated_delta": pd.array([0, 0, 0, 0, na], dtype="Int64"),
            "completed_delta": pd.array([0, 1200, 0, 0, na], dtype="Int64"),
            "total_delta": pd.array([9, 1200, 0, 0, na], dtype="Int64"),
        }
    )


def errors_by_code_frame() -> pd.DataFrame:
    """errors_by_code: TIMEOUT 2+4 = 6 errors, FDI.3081 1, INVALID_RESPONSE 3."""
    return pd.DataFrame(
        {
            "bucket": [T0, T0, T1, T1],
            "error_code": ["TIMEOUT", "FDI.3081", "TIMEOUT", "INVALID_RESPONSE"],
            "errors": [2, 1, 4, 3],
        }
    )


def instance_stats_frame() -> pd.DataFrame:
    """Raw stats of one instance over two runs (T1 listed first: input order must not matter)."""
    return pd.DataFrame(
        {
            "collected_at": [T1, T1, T0, T0],
            "run_id": ["r2", "r2", "r1", "r1"],
            "region": "r",
            "project_id": "p",
            "instance_id": "i1",
            "instance_name": "alpha",
            "task_type": ["common", "cdc", "common", "cdc"],
            "running": [11, 21, 10, 20],
            "abnormal": [1, 3, 0, 2],
            "terminated": [4, 6, 4, 5],
            "completed": [1500, 9, 1400, 8],
        }
    )


KPIS = {  # analysis.kpis(stats, errors)
    "instances": 12,
    "total": 12345,
    "abnormal_ratio": 0.0421,
    "previous_abnormal_ratio": 0.0321,
    "abnormal_ratio_delta": 0.01,
    "cdc_share": 0.3,
    "last_run_id": "r9",
    "last_collected_at": pd.Timestamp("2024-03-01 02:00", tz="UTC"),
}

# builder, a valid input, the columns it must refuse to go without
CASES = [
    (charts.state_breakdown, latest_frame, ["instance_id", "abnormal"]),
    (charts.abnormal_ratio_trend, trend_frame, ["abnormal_ratio"]),
    (charts.cdc_share_trend, cdc_vs_common_frame, ["cdc_share", "abnormal_ratio_gap"]),
    (charts.abnormal_heatmap, trend_by_instance_frame, ["instance_id"]),
    (charts.worst_instances_table, ranking_frame, ["wilson_low", "wilson_high"]),
    (charts.changes_table, changes_frame, ["summary", "status"]),
    (charts.collection_health_chart, errors_by_code_frame, ["error_code"]),
    (charts.instance_history, instance_stats_frame, ["task_type", "running"]),
]
IDS = [case[0].__name__ for case in CASES]


# --- shared behaviour -------------------------------------------------------------------------
def test_palette_is_complete_and_distinct():
    assert list(STATE_COLORS) == STATES
    assert list(TASK_TYPE_COLORS) == ["common", "cdc"]
    assert len(set(STATE_COLORS.values())) == 4
    assert len(set(TASK_TYPE_COLORS.values())) == 2


def assert_empty_state(fig: go.Figure, message: str = EMPTY_MESSAGE) -> None:
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 0
    texts = [a.text for a in fig.layout.annotations]
    assert texts == [message]
    note = fig.layout.annotations[0]
    assert (note.x, note.y, note.xref, note.yref) == (0.5, 0.5, "paper", "paper")


def test_empty_figure():
    assert_empty_state(charts.empty_figure())
    assert_empty_state(charts.empty_figure("nothing here"), "nothing here")


@pytest.mark.parametrize(("builder", "make", "needed"), CASES, ids=IDS)
def test_no_rows_gives_the_empty_state(builder, make, needed):
    for empty in (make().iloc[0:0], pd.DataFrame(), None):
        fig = builder(empty)
        assert len(fig.data) == 0
        assert len(fig.layout.annotations) == 1
        assert "No " in fig.layout.annotations[0].text


def test_empty_state_message_is_the_shared_one():
    assert_empty_state(charts.state_breakdown(latest_frame().iloc[0:0]))
    assert_empty_state(charts.abnormal_ratio_trend(None))
    assert_empty_state(charts.kpi_figure({}))


@pytest.mark.parametrize(("builder", "make", "needed"), CASES, ids=IDS)
def test_missing_columns_raise_naming_them(builder, make, needed):
    with pytest.raises(ValueError) as raised:
        builder(make().drop(columns=needed))
    for column in needed:
        assert column in str(raised.value)


@pytest.mark.parametrize(("builder", "make", "needed"), CASES, ids=IDS)
def test_every_trace_drawn_gets_the_plotly_white_defaults(builder, make, needed):
    # The figures carry a trimmed plotly_white (only the trace types drawn here): a builder that
    # starts drawing another type must have that type's defaults too, or its look would change.
    fig = builder(make())
    white = pio.templates["plotly_white"]
    template = fig.layout.template
    assert template.layout.to_plotly_json() == white.layout.to_plotly_json()
    for trace in fig.data:
        expected = getattr(white.data, trace.type, ())
        assert [t.to_plotly_json() for t in getattr(template.data, trace.type, ())] == \
            [t.to_plotly_json() for t in expected], trace.type


@pytest.mark.parametrize(("builder", "make", "needed"), CASES, ids=IDS)
def test_figures_serialise(builder, make, needed):
    fig = builder(make())
    assert isinstance(fig, go.Figure)
    assert fig.layout.template.layout.paper_bgcolor is not None  # the plotly_white template
    fig.to_json()
    html = pio.to_html(fig, include_plotlyjs=False)
    assert "Plotly.newPlot" in html


def test_extra_figures_serialise():
    figures = [
        charts.abnormal_ratio_trend(trend_frame(), anomalies_frame()),
        charts.cdc_share_trend(cdc_vs_common_frame(), show_gap=False),
        charts.worst_instances_table(ranking_frame(), threshold=0.1),
        charts.kpi_figure(KPIS),
        charts.empty_figure(),
    ]
    for fig in figures:
        # What a browser gets (the JSON, the HTML) holds the figure's traces and plotted values.
        sent = json.loads(fig.to_json())
        assert [(t["type"], t.get("name")) for t in sent["data"]] == [(t.type, t.name) for t in fig.data]
        for received, built in zip(sent["data"], fig.data):
            if "y" in built and built.y is not None:
                np.testing.assert_array_equal(_plotly_array(received["y"]), np.asarray(built.y, dtype="float64"))
        html = pio.to_html(fig, include_plotlyjs=False)
        assert "Plotly.newPlot" in html and len(html) > len(fig.to_json())


def _plotly_array(value) -> np.ndarray:
    """A trace array as plotly.js reads it: a list, or a typed array (base64 ``bdata``)."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype("float64")
    return np.asarray(value, dtype="float64")


def test_no_streamlit_import():
    source = open(charts.__file__, encoding="utf-8").read()
    assert "import streamlit" not in source and "Scattergl" not in source.replace("``Scattergl``", "")


# --- state_breakdown --------------------------------------------------------------------------
def test_state_breakdown_traces_values_and_order():
    fig = charts.state_breakdown(latest_frame())
    assert len(fig.data) == 8
    assert [t.name for t in fig.data] == STATE_NAMES * 2
    assert all(isinstance(t, go.Bar) and t.orientation == "h" for t in fig.data)
    # common in the left panel, CDC in the right one
    assert {t.xaxis for t in fig.data[:4]} == {"x"} and {t.xaxis for t in fig.data[4:]} == {"x2"}
    assert [t.marker.color for t in fig.data[:4]] == [STATE_COLORS[s] for s in STATES]
    assert [t.showlegend for t in fig.data] == [True] * 4 + [False] * 4
    # abnormal totals: beta 5, i3 4, alpha 1 (i3 has no name: its id is the label)
    expected_order = ["beta", "i3", "alpha"]
    assert all(list(t.y) == expected_order for t in fig.data)
    assert fig.layout.yaxis.autorange == "reversed"
    assert list(fig.layout.yaxis.categoryarray) == expected_order
    running_common, abnormal_cdc = fig.data[0], fig.data[5]
    assert floats(running_common.x) == [30, 50, 10]
    assert floats(abnormal_cdc.x) == [0, 2, 1]
    assert floats(fig.data[3].x) == [8, 10, 1000]
    assert fig.layout.barmode == "stack"
    assert fig.layout.xaxis.title.text == "Tasks" and fig.layout.yaxis.title.text == "Instance"
    assert [a.text for a in fig.layout.annotations] == ["Common tasks", "CDC tasks"]


def test_state_breakdown_top_keeps_the_worst():
    fig = charts.state_breakdown(latest_frame(), top=2)
    assert list(fig.data[0].y) == ["beta", "i3"]
    assert "2" in fig.layout.title.text and "3" in fig.layout.title.text


def test_state_breakdown_missing_task_type_row_is_no_bar():
    frame = latest_frame().iloc[:-1]  # i3 has no CDC row
    fig = charts.state_breakdown(frame)
    assert same(fig.data[4].x, [40, np.nan, 20])


def test_state_breakdown_refuses_several_snapshots_of_one_instance():
    frame = latest_frame()
    with pytest.raises(ValueError, match="one row per instance and task type"):
        charts.state_breakdown(pd.concat([frame, frame.iloc[:1]]))


def test_state_breakdown_tells_apart_instances_sharing_a_name():
    frame = latest_frame().assign(instance_name="same")
    fig = charts.state_breakdown(frame)
    assert list(fig.data[0].y) == ["same (i2)", "same (i3)", "same (i1)"]


# --- abnormal_ratio_trend ---------------------------------------------------------------------
def test_abnormal_ratio_trend_lines():
    fig = charts.abnormal_ratio_trend(trend_frame())
    assert [t.name for t in fig.data] == ["Common", "CDC"]
    common, cdc = fig.data
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    assert xs(common) == naive(T0, T1, T2)
    assert floats(common.y) == [0.1, 0.2, 0.3]
    assert same(cdc.y, [0.1, 0.2, np.nan])  # no tasks: a gap, not 0 %
    assert cdc.connectgaps is False
    assert common.line.color == TASK_TYPE_COLORS["common"]
    assert cdc.line.color == TASK_TYPE_COLORS["cdc"]
    assert fig.layout.yaxis.tickformat == PERCENT_TICKFORMAT
    assert "%" in PERCENT_TICKFORMAT
    assert "UTC" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text == "Abnormal ratio"
    assert fig.layout.template.layout.paper_bgcolor == pio.templates["plotly_white"].layout.paper_bgcolor
    # hover: ratios with one decimal, counts with thousands separators
    assert ":.1%" in common.hovertemplate and ":,}" in common.hovertemplate
    assert floats(np.asarray(common.customdata)[:, 1]) == [100, 100, 100]


def test_abnormal_ratio_trend_converts_times_to_utc_and_sorts():
    frame = trend_frame().iloc[::-1]
    frame["bucket"] = frame["bucket"].dt.tz_convert("Asia/Shanghai")
    common = charts.abnormal_ratio_trend(frame).data[0]
    assert xs(common) == naive(T0, T1, T2)
    assert floats(common.y) == [0.1, 0.2, 0.3]


def test_abnormal_ratio_trend_marks_anomalies_at_their_buckets():
    fig = charts.abnormal_ratio_trend(trend_frame(), anomalies_frame())
    assert [t.name for t in fig.data] == ["Common", "CDC", "Anomaly"]
    marks = fig.data[2]
    assert marks.mode == "markers"
    points = sorted(zip(xs(marks), floats(marks.y)))
    assert points == [(naive(T1)[0], 0.2), (naive(T2)[0], 0.3)]  # CDC at T1, common at T2
    assert sorted(floats(marks.customdata)) == [3.2, 4.5]


def test_anomalies_of_other_groups_are_refused():
    per_instance = anomalies_frame().drop(columns="task_type").assign(instance_id="i1")
    with pytest.raises(ValueError, match="same by"):
        charts.abnormal_ratio_trend(trend_frame(), per_instance)


def test_anomalies_without_ratio_are_placed_on_their_task_type_line():
    anomalies = anomalies_frame()[["bucket", "task_type", "is_anomaly"]]
    marks = charts.abnormal_ratio_trend(trend_frame(), anomalies).data[2]
    assert sorted(zip(xs(marks), floats(marks.y))) == [(naive(T1)[0], 0.2), (naive(T2)[0], 0.3)]


@pytest.mark.parametrize("flags", [[False, None, True, np.nan, False, True],                        # object
                                   pd.array([False, None, True, None, False, True], dtype="boolean")])
def test_a_missing_anomaly_flag_is_no_anomaly_without_a_warning(flags):
    # A frame read back from a CSV or built by hand: an object or nullable flag column with gaps.
    # pandas 2 warned that fillna would stop downcasting an object column.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        marks = charts.abnormal_ratio_trend(trend_frame(), anomalies_frame().assign(is_anomaly=flags)).data[2]
    assert sorted(floats(marks.customdata)) == [3.2, 4.5]


def test_no_flagged_anomaly_adds_no_marker_trace():
    anomalies = anomalies_frame().assign(is_anomaly=False)
    assert len(charts.abnormal_ratio_trend(trend_frame(), anomalies).data) == 2


def test_anomalies_missing_flag_column_raise():
    with pytest.raises(ValueError, match="is_anomaly"):
        charts.abnormal_ratio_trend(trend_frame(), anomalies_frame().drop(columns="is_anomaly"))


def test_fleet_wide_trend_is_one_line():
    fleet = pd.DataFrame({"bucket": [T0, T1], "abnormal_ratio": [0.25, 0.5]})
    fig = charts.abnormal_ratio_trend(fleet)
    assert [t.name for t in fig.data] == ["All tasks"]
    assert floats(fig.data[0].y) == [0.25, 0.5]


def test_trend_by_instance_is_refused():
    frame = pd.concat([trend_frame(), trend_frame()])
    with pytest.raises(ValueError, match="one row per bucket"):
        charts.abnormal_ratio_trend(frame)


# --- cdc_share_trend --------------------------------------------------------------------------
def test_cdc_share_trend_with_gap():
    fig = charts.cdc_share_trend(cdc_vs_common_frame())
    assert [t.name for t in fig.data] == ["CDC share", "CDC worse (gap > 0)", "Common worse (gap < 0)"]
    share, cdc_worse, common_worse = fig.data
    assert xs(share) == naive(T0, T1, T2)
    assert same(share.y, [0.25, 0.5, np.nan])
    # The gap in percentage points, split by sign: each legend swatch is the colour of its bars.
    assert same(cdc_worse.y, [4.0, np.nan, np.nan])
    assert same(common_worse.y, [np.nan, -10.0, np.nan])
    assert share.line.color == TASK_TYPE_COLORS["cdc"]
    assert cdc_worse.marker.color == TASK_TYPE_COLORS["cdc"]
    assert common_worse.marker.color == TASK_TYPE_COLORS["common"]
    assert fig.layout.yaxis.tickformat == PERCENT_TICKFORMAT
    # Points, not percent: the axis and its ticks say "pts".
    assert "%" not in fig.layout.yaxis2.tickformat and fig.layout.yaxis2.ticksuffix == " pts"
    assert "pts" in fig.layout.yaxis2.title.text
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    assert "UTC" in fig.layout.xaxis2.title.text
    assert fig.layout.yaxis.title.text == "CDC share"
    # hover: 25 CDC of 100 tasks at T0
    assert floats(np.asarray(share.customdata)[0]) == [100, 25]


def test_cdc_share_trend_without_gap_needs_no_gap_column():
    fig = charts.cdc_share_trend(cdc_vs_common_frame().drop(columns="abnormal_ratio_gap"), show_gap=False)
    assert [t.name for t in fig.data] == ["CDC share"]
    assert "UTC" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.tickformat == PERCENT_TICKFORMAT


# --- abnormal_heatmap -------------------------------------------------------------------------
def test_abnormal_heatmap_grid():
    fig = charts.abnormal_heatmap(trend_by_instance_frame())
    assert len(fig.data) == 1
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap)
    assert list(heat.y) == ["i2", "i1", "i3"]  # mean ratios 0.5, 0.15, 0.05
    assert xs(heat) == naive(T0, T1, T2)
    expected = [[0.5, 0.5, 0.5], [0.1, np.nan, 0.2], [0.0, 0.1, np.nan]]
    assert same(heat.z, expected)
    assert (heat.zmin, heat.zmax) == (0.0, 0.5)  # the scale ends at the highest ratio, 50%
    assert "%" in heat.colorbar.tickformat
    assert heat.hoverongaps is False
    assert "UTC" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text == "Instance"


def test_abnormal_heatmap_top_and_names():
    frame = trend_by_instance_frame().assign(
        instance_name=lambda f: f["instance_id"].map({"i1": "alpha", "i2": "beta", "i3": "gamma"})
    )
    heat = charts.abnormal_heatmap(frame, top=2).data[0]
    assert list(heat.y) == ["beta", "alpha"]
    assert len(heat.z) == 2


def test_abnormal_heatmap_names_from_a_mapping():
    names = pd.Series({"i1": "alpha", "i2": "beta"})  # i3 unknown: keeps its id
    heat = charts.abnormal_heatmap(trend_by_instance_frame(), instance_names=names).data[0]
    assert list(heat.y) == ["beta", "alpha", "i3"]


def test_abnormal_heatmap_pools_task_types():
    frame = pd.DataFrame(
        {
            "bucket": [T0, T0, T1, T1],
            "instance_id": ["i1"] * 4,
            "task_type": ["common", "cdc"] * 2,
            "abnormal": [1, 3, 0, 0],
            "total": [10, 10, 0, 0],
            "abnormal_ratio": [0.1, 0.3, np.nan, np.nan],
        }
    )
    heat = charts.abnormal_heatmap(frame).data[0]
    assert same(heat.z, [[0.2, np.nan]])  # (1 + 3) / (10 + 10); no tasks at T1
    with pytest.raises(ValueError, match="abnormal, total"):
        charts.abnormal_heatmap(frame.drop(columns=["abnormal", "total"]))


# --- worst_instances_table --------------------------------------------------------------------
def test_worst_instances_table_cells():
    fig = charts.worst_instances_table(ranking_frame())
    table = fig.data[0]
    assert isinstance(table, go.Table)
    assert list(table.header.values) == [
        "<b>Instance</b>", "<b>Abnormal</b>", "<b>Total</b>", "<b>Abnormal ratio</b>", "<b>99% Wilson interval</b>"
    ]
    instance, abnormal, total, ratio, interval = (list(column) for column in table.cells.values)
    assert instance == ["alpha", "beta", "gamma"]
    assert abnormal == ["300", "1", "5"]
    assert total == ["1,000", "2", "1,000"]
    assert ratio == ["30.0%", "50.0%", "0.5%"]
    assert interval[0] == "27.2% – 32.9%"
    assert all(fill == [HIGHLIGHT_COLORS["none"]] * 3 for fill in table.cells.fill.color)


def test_worst_instances_table_highlights_rows_above_threshold():
    table = charts.worst_instances_table(ranking_frame(), threshold=0.1).data[0]
    expected = [HIGHLIGHT_COLORS["above"], HIGHLIGHT_COLORS["maybe"], HIGHLIGHT_COLORS["none"]]
    assert len(table.cells.fill.color) == 5
    assert all(list(fill) == expected for fill in table.cells.fill.color)
    assert len(set(expected)) == 3


def test_worst_instances_table_rejects_a_percent_threshold():
    with pytest.raises(ValueError, match="fraction"):
        charts.worst_instances_table(ranking_frame(), threshold=10)


def test_worst_instances_table_top_and_task_type():
    frame = ranking_frame().assign(task_type=["cdc", "common", "cdc"])
    table = charts.worst_instances_table(frame, top=2).data[0]
    assert "<b>Task type</b>" in list(table.header.values)
    assert [list(column) for column in table.cells.values][1] == ["CDC", "Common"]


def test_worst_table_ranked_by_project():
    frame = ranking_frame().drop(columns=["instance_id", "instance_name"]).assign(project_id=["p1", "p2", "p3"])
    table = charts.worst_instances_table(frame).data[0]
    assert list(table.header.values)[0] == "<b>Project</b>"
    assert list(table.cells.values[0]) == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match="group column"):
        charts.worst_instances_table(frame.drop(columns="project_id"))


# --- changes_table ----------------------------------------------------------------------------
def test_changes_table_shows_the_last_run_worst_first():
    fig = charts.changes_table(changes_frame(), deltas=None)
    table = fig.data[0]
    headers = [h.removeprefix("<b>").removesuffix("</b>") for h in table.header.values]
    assert headers == [
        "Instance", "Task type", "Status", "Running Δ", "Abnormal Δ", "Terminated Δ", "Completed Δ",
        "Total Δ", "Summary",
    ]
    columns = [list(column) for column in table.cells.values]
    # r3 only, "unchanged" gamma left out, abnormal +3 before -1 before unknown
    assert columns[0] == ["beta", "alpha", "delta"]
    assert columns[1] == ["CDC", "Common", "Common"]
    assert columns[2] == ["changed", "changed", "appeared"]
    assert columns[4] == ["+3", "-1", "–"]
    assert columns[6] == ["+0", "+1,200", "–"]
    assert columns[8][0] == "running -3, abnormal +3 since the previous run"
    expected_fill = [HIGHLIGHT_COLORS["worse"], HIGHLIGHT_COLORS["better"], HIGHLIGHT_COLORS["none"]]
    assert all(list(fill) == expected_fill for fill in table.cells.fill.color)
    assert "2024-03-01 02:00 UTC" in fig.layout.title.text


def test_changes_table_shows_the_abnormal_delta_by_default():
    table = charts.changes_table(changes_frame()).data[0]
    assert [h.removeprefix("<b>").removesuffix("</b>") for h in table.header.values] == [
        "Instance", "Task type", "Status", "Abnormal Δ", "Summary"
    ]
    assert list(table.cells.values[3]) == ["+3", "-1", "–"]
    assert list(table.columnwidth)[-1] > list(table.columnwidth)[0]


def test_changes_table_every_run_and_unchanged_on_request():
    table = charts.changes_table(changes_frame(), latest_run_only=False, include_unchanged=True).data[0]
    # The largest change either way first: +9, +3, -1, 0, then the appeared one without counts.
    assert list(table.cells.values[0]) == ["alpha", "beta", "alpha", "gamma", "delta"]


def test_a_cut_changes_table_keeps_the_biggest_falls_and_arrivals_and_says_it_was_cut():
    # The bundled sample has 51 changes in its last run: cut to the 20 largest rises, the table
    # showed only +1 and +0 rows, never its -99 fall nor an instance that appeared with abnormal tasks.
    frame = pd.DataFrame({
        "instance_id": [f"i{n}" for n in range(6)], "instance_name": list("abcdef"),
        "status": ["changed", "changed", "changed", "appeared", "disappeared", "changed"],
        "summary": ["s"] * 6,
        "abnormal": pd.array([5, 1, 0, 11, pd.NA, 3], dtype="Int64"),
        "abnormal_delta": pd.array([1, 1, -99, pd.NA, pd.NA, 0], dtype="Int64"),
    })
    rows = charts.changes_rows(frame, top=3)
    assert list(rows.columns["Instance"]) == ["c", "d", "a"]          # -99, appeared with 11, +1
    assert list(rows.fills) == [HIGHLIGHT_COLORS["better"], HIGHLIGHT_COLORS["worse"], HIGHLIGHT_COLORS["worse"]]
    assert rows.note() == rows.cut_note() == "Showing the first 3 of 6 changes."
    assert "Showing the first 3 of 6 changes." in rows.html()
    # In the figure, a second title line in plotly's markup (not escaped into visible "<br>").
    assert rows.figure().layout.title.text.endswith("<br><sup>Showing the first 3 of 6 changes.</sup>")
    assert charts.changes_rows(frame).note() is None and "Showing" not in charts.changes_rows(frame).html()
    # Every row, and in order: the largest change either way, a rise before a fall of one size.
    assert list(charts.changes_rows(frame.assign(abnormal_delta=pd.array([2, -2, 0, pd.NA, pd.NA, 1], dtype="Int64")))
                .columns["Instance"]) == ["d", "a", "b", "f", "c", "e"]


def test_a_cut_ranking_says_how_many_it_ranked():
    rows = charts.worst_instances_rows(ranking_frame(), top=2)
    assert rows.cut_note() == "Showing the first 2 of 3 instances." and len(rows) == 2
    assert charts.worst_instances_rows(ranking_frame()).cut_note() is None
    # The HTML says how the rows are ranked and, with a threshold, what the two shades mean.
    shaded = charts.worst_instances_rows(ranking_frame(), threshold=0.1)
    assert shaded.note().startswith("Ranked by the low end of the 99% Wilson interval")
    assert "Dark: the whole interval is above 10.0%; light: the ratio is above it" in shaded.html()
    assert "Dark:" not in charts.worst_instances_rows(ranking_frame()).html()


def test_changes_table_empty_says_no_changes():
    assert_empty_state(charts.changes_table(changes_frame().iloc[0:0]), "No changes since the previous run")
    only_unchanged = changes_frame().assign(status="unchanged")
    assert_empty_state(charts.changes_table(only_unchanged), "No changes since the previous run")


def test_one_instance_under_two_regions_is_two_bars_and_two_rows():
    # A collector whose endpoint (stored as the region) changed: the same project and instance
    # ids under two regions.  The Overview raised "cannot reindex on an axis with duplicate labels".
    latest = pd.concat([latest_frame(), latest_frame().assign(region="127.0.0.1:9999")], ignore_index=True)
    fig = charts.state_breakdown(latest)
    labels = list(fig.data[0].y)
    assert len(labels) == len(set(labels)) == 6
    assert {"r/p/alpha (i1)", "127.0.0.1:9999/p/alpha (i1)"} <= set(labels)
    ranking = pd.DataFrame({"region": ["r", "q"], "project_id": ["p", "p"], "instance_id": ["i1", "i1"],
                            "instance_name": ["alpha", "alpha"], "abnormal": [1, 2], "total": [10, 10],
                            "abnormal_ratio": [0.1, 0.2], "wilson_low": [0.01, 0.02], "wilson_high": [0.4, 0.5]})
    rows = charts.worst_instances_rows(ranking)
    assert list(rows.columns["Instance"]) == ["r/p/alpha (i1)", "q/p/alpha (i1)"]


# --- the tables as HTML (the dashboard's Overview) ---------------------------------------------
def html_table(markup: str) -> dict:
    """What a browser builds from ``Table.html()``: the title, the header cells, and per row its
    background and its cells' text and alignment.  ElementTree refuses markup that is not well
    formed, so an unescaped ``<`` in a name fails here too."""
    root = ET.fromstring(markup)
    table = root.find(".//table")
    styles = lambda element: dict(part.split(":", 1) for part in element.get("style", "").split(";") if part)
    rows = [] if table is None else table.findall("./tbody/tr")
    return {
        "root": root,
        "title": "".join(root[0].itertext()),
        "headers": [] if table is None else ["".join(th.itertext()) for th in table.findall("./thead/tr/th")],
        "align": [] if table is None else [styles(th)["text-align"] for th in table.findall("./thead/tr/th")],
        "fills": [styles(tr)["background"] for tr in rows],
        "cells": [["".join(td.itertext()) for td in tr.findall("td")] for tr in rows],
        "cell_align": [[styles(td)["text-align"] for td in tr.findall("td")] for tr in rows],
        "table_style": {} if table is None else styles(table),
    }


@pytest.mark.parametrize("rows, figure", [
    (lambda: charts.worst_instances_rows(ranking_frame(), threshold=0.1),
     lambda: charts.worst_instances_table(ranking_frame(), threshold=0.1)),
    (lambda: charts.changes_rows(changes_frame(), deltas=None), lambda: charts.changes_table(changes_frame(), deltas=None)),
], ids=["worst instances", "changes"])
def test_a_table_as_html_shows_what_its_figure_shows(rows, figure):
    shown, drawn = html_table(rows().html()), figure()
    table = drawn.data[0]
    assert shown["title"] == html.unescape(drawn.layout.title.text)
    assert shown["headers"] == [h.removeprefix("<b>").removesuffix("</b>") for h in table.header.values]
    assert shown["cells"] == [[html.unescape(column[row]) for column in table.cells.values]
                              for row in range(len(table.cells.values[0]))]
    assert shown["fills"] == list(table.cells.fill.color[0])
    assert shown["align"] == list(table.header.align)
    assert all(row == list(table.cells.align) for row in shown["cell_align"])
    # Dark text, as the figure's: never Streamlit's light grey.
    assert shown["table_style"]["color"] == charts.TABLE_TEXT_COLOR == table.cells.font.color


def test_a_table_as_html_has_every_row_whole_ids_and_names_as_text():
    ids = [f"{n:08x}-7d2a-4c1e-9b3f-5a6e7d8c9b0a" for n in range(20)]   # 36 characters, no space
    names = [None] * 19 + ["<img src=x onerror=alert(1)>&amp;"]   # no name: the id is the label
    ratio = np.linspace(0.2, 0.01, 20)
    ranking = pd.DataFrame({"instance_id": ids, "instance_name": names, "abnormal": (ratio * 100).round(),
                            "total": 100, "abnormal_ratio": ratio, "wilson_low": ratio / 2, "wilson_high": ratio * 2})
    shown = html_table(charts.worst_instances_rows(ranking, 0.05, top=20).html())
    assert len(shown["cells"]) == 20
    # Every id whole in its row; the name with markup shown as the characters it is, no element made.
    labels = [cells[0] for cells in shown["cells"]]
    assert labels[:19] == ids[:19]
    assert "<img src=x onerror=alert(1)>&amp;" in " ".join(labels)
    assert shown["root"].find(".//img") is None
    # Nothing caps the height: no row is hidden behind a scroll.
    markup = charts.worst_instances_rows(ranking, 0.05, top=20).html()
    assert "max-height" not in markup and "overflow-y" not in markup and "height:" not in markup


def test_an_empty_table_as_html_says_why():
    for rows, message in ((charts.changes_rows(changes_frame().iloc[0:0]), "No changes since the previous run"),
                          (charts.changes_rows(changes_frame().assign(status="unchanged")), "No changes since the previous run"),
                          (charts.worst_instances_rows(None), EMPTY_MESSAGE)):
        shown = html_table(rows.html())
        assert len(rows) == 0 and shown["cells"] == [] and shown["root"].find(".//table") is None
        assert "".join(shown["root"].itertext()).endswith(message)


# --- collection_health_chart ------------------------------------------------------------------
def test_collection_health_chart():
    fig = charts.collection_health_chart(errors_by_code_frame())
    assert [t.name for t in fig.data] == ["TIMEOUT", "INVALID_RESPONSE", "FDI.3081"]  # 6, 3, 1 errors
    assert all(isinstance(t, go.Bar) for t in fig.data)
    timeout, invalid, not_found = fig.data
    assert xs(timeout) == naive(T0, T1)
    assert floats(timeout.y) == [2, 4]
    assert floats(invalid.y) == [0, 3]
    assert floats(not_found.y) == [1, 0]
    assert fig.layout.barmode == "stack"
    assert [t.marker.color for t in fig.data] == list(charts.ERROR_CODE_COLORS[:3])
    assert "UTC" in fig.layout.xaxis.title.text
    assert fig.layout.yaxis.title.text == "Failed collections"


def test_collection_health_chart_folds_rare_codes():
    fig = charts.collection_health_chart(errors_by_code_frame(), max_codes=2)
    assert [t.name for t in fig.data] == ["TIMEOUT", "Other codes"]
    assert floats(fig.data[1].y) == [1, 3]
    assert fig.data[1].marker.color == charts.ERROR_CODE_COLORS[-1]


def test_collection_health_chart_with_success_ratio():
    health = pd.DataFrame(
        {
            "run_id": ["r2", "r1"],
            "collected_at": [T1, T0],
            "attempted": [10, 10],
            "collected": [6, 7],
            "failed": [4, 3],
            "success_ratio": [0.6, 0.7],
        }
    )
    fig = charts.collection_health_chart(errors_by_code_frame(), health)
    line = fig.data[-1]
    assert line.name == "Success ratio" and line.yaxis == "y2"
    assert xs(line) == naive(T0, T1)
    assert floats(line.y) == [0.7, 0.6]
    assert fig.layout.yaxis2.tickformat == PERCENT_TICKFORMAT
    assert fig.layout.yaxis.title.text == "Failed collections"
    # no errors at all but runs happened: the success line alone, not the empty state
    alone = charts.collection_health_chart(errors_by_code_frame().iloc[0:0], health)
    assert [t.name for t in alone.data] == ["Success ratio"]


def test_collection_health_line_has_one_point_per_bucket_the_worst_run():
    # Five runs in two hours: 10:00 has a run that missed 3 of 100 instances, 11:00 none.
    times = pd.to_datetime(["2024-03-01 10:00", "2024-03-01 10:20", "2024-03-01 10:40",
                            "2024-03-01 11:00", "2024-03-01 11:30"], utc=True)
    attempted = np.array([100, 100, 100, 50, 50])
    collected = np.array([100, 97, 100, 50, 50])
    health = pd.DataFrame({"run_id": [f"r{n}" for n in range(5)], "collected_at": times, "attempted": attempted,
                           "collected": collected, "failed": attempted - collected,
                           "success_ratio": collected / attempted})
    line = charts.collection_health_chart(None, health, freq="1h").data[-1]
    assert xs(line) == naive(pd.Timestamp("2024-03-01 10:00", tz="UTC"), pd.Timestamp("2024-03-01 11:00", tz="UTC"))
    # The dip survives (97 %, the worst run), the hover pools every run: 297 of 300, 100 of 100.
    assert floats(line.y) == [0.97, 1.0]
    assert [list(row) for row in line.customdata] == [[297 / 300, 3], [1.0, 2]]
    assert "worst run" in line.name and "customdata[0]" in line.hovertemplate
    assert fig_range(charts.collection_health_chart(None, health, freq="1h"))[0] < 0.97
    # One run per bucket, or no freq: a point per run as before.
    assert floats(charts.collection_health_chart(None, health).data[-1].y) == list(collected / attempted)
    assert len(charts.collection_health_chart(None, health, freq="10min").data[-1].y) == 5


def test_a_long_success_line_is_drawn_without_markers():
    times = pd.date_range("2024-01-01", periods=1000, freq="5min", tz="UTC")
    health = pd.DataFrame({"collected_at": times, "success_ratio": np.linspace(0.9, 1.0, 1000)})
    assert charts.collection_health_chart(None, health).data[-1].mode == "lines"
    assert charts.collection_health_chart(None, health.head(50)).data[-1].mode == "lines+markers"
    # At a day's resolution it is four points (the worst run of each day), with markers.
    daily = charts.collection_health_chart(None, health, freq="1D").data[-1]
    assert daily.mode == "lines+markers" and len(daily.y) == 4 and floats(daily.y)[0] == 0.9


def fig_range(fig) -> list[float]:
    return list(fig.layout.yaxis2.range)


def test_collection_health_chart_empty_message():
    assert_empty_state(
        charts.collection_health_chart(errors_by_code_frame().iloc[0:0]),
        "No collection errors for the selected filters",
    )


# --- instance_history -------------------------------------------------------------------------
def test_instance_history():
    fig = charts.instance_history(instance_stats_frame())
    assert len(fig.data) == 8
    assert [t.name for t in fig.data] == STATE_NAMES * 2
    assert [t.meta for t in fig.data] == ["common"] * 4 + ["cdc"] * 4
    assert {t.yaxis for t in fig.data[:4]} == {"y"} and {t.yaxis for t in fig.data[4:]} == {"y2"}
    assert [t.line.color for t in fig.data[4:]] == [STATE_COLORS[s] for s in STATES]
    common_completed, cdc_abnormal = fig.data[3], fig.data[5]
    assert xs(common_completed) == naive(T0, T1)
    assert floats(common_completed.y) == [1400, 1500]
    assert floats(cdc_abnormal.y) == [2, 3]
    assert "alpha" in fig.layout.title.text
    assert "UTC" in fig.layout.xaxis2.title.text
    assert ",}" in common_completed.hovertemplate


def test_instance_history_keeps_the_last_run_of_a_time():
    frame = instance_stats_frame()
    rerun = frame[frame["run_id"] == "r2"].assign(run_id="r3", abnormal=[7, 8])
    fig = charts.instance_history(pd.concat([rerun, frame]))
    assert floats(fig.data[1].y) == [0, 7]
    assert floats(fig.data[5].y) == [2, 8]


def test_instance_history_refuses_several_instances():
    frame = pd.concat([instance_stats_frame(), instance_stats_frame().assign(instance_id="i2")])
    with pytest.raises(ValueError, match="one instance"):
        charts.instance_history(frame)


# --- kpi_figure -------------------------------------------------------------------------------
def test_kpi_figure():
    fig = charts.kpi_figure(KPIS)
    # previous_abnormal_ratio and abnormal_ratio_delta become the abnormal ratio's delta
    assert [t.name for t in fig.data] == ["instances", "total", "abnormal_ratio", "cdc_share"]
    assert all(isinstance(t, go.Indicator) for t in fig.data)
    # Ratios in percent units, so their change is in percentage points, as in the dashboard.
    assert [t.value for t in fig.data] == pytest.approx([12, 12345, 4.21, 30.0])
    assert [t.number.valueformat for t in fig.data] == [",.0f", ",.0f", ".1f", ".1f"]
    assert [t.number.suffix for t in fig.data][2:] == ["%", "%"]
    ratio = fig.data[2]
    assert ratio.mode == "number+delta" and ratio.delta.reference == pytest.approx(3.21)
    assert ratio.delta.suffix == " pts" and ratio.delta.valueformat == ".1f"
    assert ratio.delta.increasing.color == STATE_COLORS["abnormal"]  # more abnormal is bad
    assert fig.data[3].title.text == "CDC share"
    assert "2024-03-01 02:00 UTC" in fig.layout.title.text and "r9" in fig.layout.title.text
    # a one-row frame is the same thing
    from_frame = charts.kpi_figure(pd.DataFrame([KPIS]))
    assert [t.value for t in from_frame.data] == pytest.approx([12, 12345, 4.21, 30.0])


def test_kpi_figure_change_rounding_to_zero_is_neutral():
    fig = charts.kpi_figure({**KPIS, "abnormal_ratio": 0.04213, "previous_abnormal_ratio": 0.04209})
    delta = fig.data[2].delta
    assert delta.increasing.color == delta.decreasing.color == STATE_COLORS["terminated"]


def test_kpi_figure_without_previous_run():
    fig = charts.kpi_figure({**KPIS, "previous_abnormal_ratio": float("nan"), "abnormal_ratio_delta": float("nan")})
    assert [t.name for t in fig.data] == ["instances", "total", "abnormal_ratio", "cdc_share"]
    assert fig.data[2].mode == "number"
    fig.to_json()


# --- against the real analysis functions ------------------------------------------------------
# The frames above pin the column contract by hand; these check that analysis.py's actual
# output fits it, on a fleet small enough to compute every plotted number by hand.
def fleet_stats() -> pd.DataFrame:
    """Two runs (T0, T1) of alpha (i1) and beta (i2); beta has no CDC tasks."""
    rows = [
        # run, time, instance, name, type, running, abnormal, terminated, completed
        ("r1", T0, "i1", "alpha", "common", 8, 2, 0, 0),
        ("r1", T0, "i1", "alpha", "cdc", 5, 0, 0, 5),
        ("r1", T0, "i2", "beta", "common", 10, 0, 0, 0),
        ("r1", T0, "i2", "beta", "cdc", 0, 0, 0, 0),
        ("r2", T1, "i1", "alpha", "common", 7, 3, 0, 0),
        ("r2", T1, "i1", "alpha", "cdc", 5, 5, 0, 0),
        ("r2", T1, "i2", "beta", "common", 9, 1, 0, 0),
        ("r2", T1, "i2", "beta", "cdc", 0, 0, 0, 0),
    ]
    frame = pd.DataFrame(
        rows, columns=["run_id", "collected_at", "instance_id", "instance_name", "task_type", *STATES]
    ).assign(region="r", project_id="p")
    frame["total"] = frame[STATES].sum(axis=1)
    from roma_analytics.schema import conform

    return conform(frame, "stats")


@pytest.fixture
def analysis():
    from roma_analytics import analysis

    return analysis


def test_real_trend_and_cdc_vs_common(analysis):
    stats = fleet_stats()
    fig = charts.abnormal_ratio_trend(analysis.trend(stats, "1h"))
    common, cdc = fig.data
    assert floats(common.y) == [0.1, 0.2]  # 2/20, 4/20
    assert floats(cdc.y) == [0.0, 0.5]  # 0/10, 5/10
    assert xs(cdc) == naive(T0, T1)
    share = charts.cdc_share_trend(analysis.cdc_vs_common(stats, "1h")).data[0]
    assert np.allclose(floats(share.y), [10 / 30, 10 / 30])


def test_real_latest_ranking_and_heatmap(analysis):
    stats = fleet_stats()
    bars = charts.state_breakdown(analysis.latest(stats))
    assert list(bars.data[0].y) == ["alpha", "beta"]  # 8 abnormal vs 1
    assert floats(bars.data[5].x)[0] == 5  # alpha's CDC abnormal at r2
    table = charts.worst_instances_table(analysis.abnormal_ranking(stats), threshold=0.2).data[0]
    assert list(table.cells.values[0]) == ["alpha", "beta"]
    assert list(table.cells.values[3]) == ["40.0%", "10.0%"]  # 8/20, 1/10
    assert list(table.cells.fill.color[0])[1] == HIGHLIGHT_COLORS["none"]
    heat = charts.abnormal_heatmap(analysis.trend(stats, "1h", by=("instance_id",))).data[0]
    assert list(heat.y) == ["i1", "i2"]
    assert np.allclose(heat.z, [[0.1, 0.4], [0.0, 0.1]])


def test_real_changes_errors_and_kpis(analysis):
    stats = fleet_stats()
    changes = charts.changes_table(analysis.changes(stats))
    table = changes.data[0]
    columns = {h.removeprefix("<b>").removesuffix("</b>"): list(v) for h, v in zip(table.header.values, table.cells.values)}
    assert columns["Instance"] == ["alpha", "alpha", "beta"]  # beta's CDC did not change
    assert columns["Task type"] == ["CDC", "Common", "Common"]
    assert columns["Abnormal Δ"] == ["+5", "+1", "+1"]
    errors = pd.DataFrame(
        {
            "collected_at": [T1], "run_id": ["r2"], "region": ["r"], "project_id": ["p"],
            "instance_id": ["i3"], "http_status": [None], "error_code": ["TIMEOUT"],
            "error_msg": ["read timed out"], "request_id": [None], "attempts": [4],
        }
    )
    from roma_analytics.schema import conform

    errors = conform(errors, "errors")
    health = charts.collection_health_chart(
        analysis.errors_by_code(errors, "1h"), analysis.collection_health(errors, stats)
    )
    assert [t.name for t in health.data] == ["TIMEOUT", "Success ratio"]
    assert floats(health.data[0].y) == [1]
    assert np.allclose(floats(health.data[1].y), [1.0, 2 / 3])
    kpis = charts.kpi_figure(analysis.kpis(stats, errors))
    tiles = {t.name: t for t in kpis.data}
    assert tiles["abnormal_ratio"].value == pytest.approx(100 * 9 / 30)
    assert tiles["abnormal_ratio"].delta.reference == pytest.approx(100 * 2 / 30)
    assert tiles["failed_collections"].value == 1
    history = charts.instance_history(stats[stats["instance_id"] == "i1"])
    assert floats(history.data[5].y) == [0, 5]
    for fig in (changes, health, kpis, history):
        pio.to_html(fig, include_plotlyjs=False)


def test_collection_health_counts_axis_ticks_whole_numbers_when_counts_are_small():
    few = pd.DataFrame({
        "bucket": pd.to_datetime(["2024-05-01T00:00Z", "2024-05-01T01:00Z"]),
        "error_code": ["FDI.9999", "TIMEOUT"],
        "errors": [1, 2],
    })
    fig = charts.collection_health_chart(few)
    assert fig.layout.yaxis.dtick == 1
    many = few.assign(errors=[40, 70])
    assert charts.collection_health_chart(many).layout.yaxis.dtick is None
