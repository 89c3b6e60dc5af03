"""Figure-level details a user sees: one-run histories, colour scales, axes, legends, tables.

Frames written by hand; the expected numbers are worked out in the comments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from roma_analytics import charts

T0 = pd.Timestamp("2026-11-20T09:00:00Z")
HOUR = pd.Timedelta(hours=1)


def one_bucket_trend() -> pd.DataFrame:
    return pd.DataFrame({"bucket": [T0, T0], "task_type": ["common", "cdc"], "abnormal_ratio": [0.02, 0.05],
                         "abnormal": [2, 5], "total": [100, 100]})


def span_ms(axis) -> float:
    low, high = (pd.Timestamp(v) for v in axis.range)
    return (high - low) / pd.Timedelta(milliseconds=1)


# --- one run: no millisecond axes ---------------------------------------------------------------
def test_one_run_trend_spans_hours_not_milliseconds():
    fig = charts.abnormal_ratio_trend(one_bucket_trend())
    assert span_ms(fig.layout.xaxis) == 2 * HOUR / pd.Timedelta(milliseconds=1)
    assert "%H:%M" in fig.layout.xaxis.tickformat and "%S" not in fig.layout.xaxis.tickformat


def test_one_run_cdc_share_health_and_instance_history_span_hours():
    share = charts.cdc_share_trend(pd.DataFrame({"bucket": [T0], "cdc_share": [0.5], "abnormal_ratio_gap": [0.03]}))
    health = charts.collection_health_chart(
        pd.DataFrame({"bucket": [T0], "error_code": ["TIMEOUT"], "errors": [1]}),
        pd.DataFrame({"collected_at": [T0], "success_ratio": [0.9]}))
    history = charts.instance_history(pd.DataFrame({
        "collected_at": [T0, T0], "task_type": ["common", "cdc"], "running": [1, 2], "abnormal": [0, 1],
        "terminated": [0, 0], "completed": [0, 0], "instance_id": ["i1", "i1"]}))
    for fig in (share, health, history):
        assert span_ms(fig.layout.xaxis) >= HOUR / pd.Timedelta(milliseconds=1)


def test_one_run_heatmap_is_a_labelled_column():
    trend = pd.DataFrame({"bucket": [T0, T0], "instance_id": ["i1", "i2"], "abnormal_ratio": [0.02, 0.04]})
    fig = charts.abnormal_heatmap(trend)
    assert list(fig.data[0].x) == ["2026-11-20 09:00"]
    assert fig.layout.xaxis.type == "category"


def test_one_error_bar_is_as_wide_as_its_bucket():
    # A lone error at one-hour resolution: 80 % of an hour wide, not plotly's 1 ms.
    fig = charts.collection_health_chart(
        pd.DataFrame({"bucket": [T0], "error_code": ["TIMEOUT"], "errors": [1]}), freq="1h")
    assert fig.data[0].width == pytest.approx(0.8 * 3_600_000)
    # Without freq: the smallest gap between buckets (here 6 h).
    far = charts.collection_health_chart(pd.DataFrame({
        "bucket": [T0, T0 + 6 * HOUR, T0 + 48 * HOUR], "error_code": ["A", "A", "B"], "errors": [1, 2, 1]}))
    assert far.data[0].width == pytest.approx(0.8 * 6 * 3_600_000)


# --- heatmap colour scale -----------------------------------------------------------------------
def test_heatmap_colour_scale_fits_small_ratios():
    trend = pd.DataFrame({"bucket": [T0, T0 + HOUR] * 2, "instance_id": ["i1", "i1", "i2", "i2"],
                          "abnormal_ratio": [0.01, 0.03, 0.06, 0.094]})
    heat = charts.abnormal_heatmap(trend).data[0]
    # The highest ratio, 9.4 %, rounded up to 10 %: the colours spread over 1–10 %.
    assert (heat.zmin, heat.zmax) == (0.0, 0.1)


@pytest.mark.parametrize("highest, top", [(0.003, 0.01), (0.011, 0.02), (0.024, 0.025), (0.3, 0.5), (0.97, 1.0)])
def test_heatmap_colour_scale_tops(highest, top):
    trend = pd.DataFrame({"bucket": [T0, T0], "instance_id": ["i1", "i2"], "abnormal_ratio": [0.0, highest]})
    assert charts.abnormal_heatmap(trend).data[0].zmax == pytest.approx(top)


# --- collection health: its own success axis ----------------------------------------------------
def test_success_axis_shows_dips_between_97_and_100_percent():
    runs = pd.DataFrame({"collected_at": [T0 + k * HOUR for k in range(4)], "success_ratio": [1.0, 0.97, 1.0, 0.99]})
    errors = pd.DataFrame({"bucket": [T0 + HOUR, T0 + 3 * HOUR], "error_code": ["TIMEOUT", "TIMEOUT"], "errors": [2, 1]})
    axis = charts.collection_health_chart(errors, runs, freq="1h").layout.yaxis2
    low, high = axis.range
    # 97 % minus max(1 pt, 20 % of the 3-pt dip) = 96 %, floored to a whole percent.
    assert low == pytest.approx(0.96) and 1.0 < high < 1.01
    # Ticks of its own, not synchronised with the error counts' (0 %, 48.5 %, 96.9 %).
    assert axis.tickmode == "auto"


# --- CDC share: legend and units ----------------------------------------------------------------
def test_gap_legend_swatches_have_their_bars_colours():
    frame = pd.DataFrame({"bucket": [T0, T0 + HOUR], "cdc_share": [0.4, 0.4], "abnormal_ratio_gap": [-0.01, 0.02]})
    fig = charts.cdc_share_trend(frame)
    bars = [trace for trace in fig.data if trace.type == "bar"]
    assert all(isinstance(trace.marker.color, str) for trace in bars)  # one colour per trace
    by_colour = {trace.marker.color: [v for v in trace.y if not np.isnan(v)] for trace in bars}
    assert by_colour[charts.TASK_TYPE_COLORS["cdc"]] == [pytest.approx(2.0)]
    assert by_colour[charts.TASK_TYPE_COLORS["common"]] == [pytest.approx(-1.0)]
    assert fig.layout.yaxis2.ticksuffix == " pts"


# --- tables ---------------------------------------------------------------------------------------
def ranking(rows: int) -> pd.DataFrame:
    return pd.DataFrame({
        "project_id": ["0a1b2c3d4e5f60718293a4b5c6d7e8f9"] * rows,
        "instance_id": [f"{k:08d}-aaaa-bbbb-cccc-0123456789ab" for k in range(rows)],
        "abnormal": [5] * rows, "total": [100] * rows, "abnormal_ratio": [0.05] * rows,
        "wilson_low": [0.02] * rows, "wilson_high": [0.11] * rows})


def contrast(hex_colour: str) -> float:
    """WCAG contrast ratio of a colour against white."""
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return 1.05 / (luminance + 0.05)


def test_table_text_is_dark_and_every_row_has_room():
    fig = charts.worst_instances_table(ranking(20), top=20)
    table = fig.data[0]
    assert contrast(table.cells.font.color) >= 7 and contrast(table.header.font.color) >= 7
    # 20 one-line rows of 26 px, the header and the margins fit in the figure: no hidden scroll.
    needed = fig.layout.margin.t + fig.layout.margin.b + 28 + 20 * table.cells.height
    assert fig.layout.height >= needed


def test_table_id_columns_are_wide_enough_for_their_ids():
    table = charts.worst_instances_table(ranking(3)).data[0]
    widths = list(table.columnwidth)
    headers = [h.replace("<b>", "").replace("</b>", "") for h in table.header.values]
    share = widths[headers.index("Instance")] / sum(widths)
    # At the narrowest width (860 px at 7.5 px a character) the 36-character id fits unwrapped.
    assert share * 860 >= 36 * 7.5


def test_wrapped_change_summaries_get_their_lines():
    summary = "abnormal +3, running −2, terminated +1 since the previous run; " * 3
    changes = pd.DataFrame({"instance_id": [f"i{k}" for k in range(10)], "status": ["changed"] * 10,
                            "summary": [summary] * 10, "abnormal_delta": [3] * 10})
    fig = charts.changes_table(changes, latest_run_only=False)
    assert fig.layout.height > fig.layout.margin.t + fig.layout.margin.b + 10 * 26 * 2


# --- numbers in text ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, text", [(0.0004, "±0.0 pts"), (-0.0004, "±0.0 pts"), (0.02, "+2.0 pts"),
                                          (-0.0123, "−1.2 pts"), (float("nan"), "–")])
def test_points_text(change, text):
    assert charts.points_text(change) == text


def test_percent_text_matches_plotly_percent_format():
    assert charts.percent_text(0.387) == "38.7%" and charts.percent_text(0.068) == "6.8%"
