"""Plotly figure builders shared by the Streamlit dashboard, the notebooks and the HTML report.

Every builder takes the *output* of a ``roma_analytics.analysis`` function (or of the matching
``HistoryStore`` method), returns a ``plotly.graph_objects.Figure`` and does nothing else: no
``show()``, no streamlit, no I/O.  The contract of each builder is the columns it reads, listed in
its docstring; a frame without them is a ``ValueError`` naming the missing columns, because a
silently empty chart would hide a wiring mistake.  A frame with no rows (or ``None``) is not an
error: it gives an empty-state figure saying "No data for the selected filters", since an empty
selection is an ordinary thing for a dashboard user to make.

One look everywhere: the palettes below (Okabe-Ito colours, distinguishable with the common
forms of colour blindness), the ``plotly_white`` template, UTC named on every time axis, counts
hovered with thousands separators and ratios as percentages with one decimal.  Ratios are
plotted as fractions (0.25) with a percent tick format, so the plotted values are the analysis
values unchanged.

Figures stay light enough for a static HTML report: long lists are cut to the worst N, and only
plain ``go.Scatter`` is used (``Scattergl`` needs WebGL, which static exports and headless
browsers often lack).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from roma_analytics import analysis, display
from roma_analytics.schema import COUNT_COLUMNS, GROUP_COLUMNS, TASK_TYPES

__all__ = [
    "STATE_COLORS",
    "STATE_LABELS",
    "TASK_TYPE_COLORS",
    "TASK_TYPE_LABELS",
    "ERROR_CODE_COLORS",
    "ANOMALY_COLOR",
    "HIGHLIGHT_COLORS",
    "EMPTY_MESSAGE",
    "percent_text",
    "points_text",
    "PERCENT_TICKFORMAT",
    "TIME_AXIS_TITLE",
    "apply_layout",
    "empty_figure",
    "state_breakdown",
    "abnormal_ratio_trend",
    "cdc_share_trend",
    "abnormal_heatmap",
    "Table",
    "worst_instances_table",
    "worst_instances_rows",
    "changes_table",
    "changes_rows",
    "collection_health_chart",
    "instance_history",
    "kpi_figure",
]

# Okabe-Ito: the reds/greens people confuse are replaced by vermillion/bluish green, which
# differ in lightness as well as hue.
STATE_COLORS: dict[str, str] = {
    "running": "#009E73",  # bluish green
    "abnormal": "#D55E00",  # vermillion
    "terminated": "#999999",  # grey
    "completed": "#0072B2",  # blue
}
STATE_LABELS: dict[str, str] = {
    "running": "Running",
    "abnormal": "Abnormal",
    "terminated": "Terminated",
    "completed": "Completed",
}
TASK_TYPE_COLORS: dict[str, str] = {
    "common": "#56B4E9",  # sky blue
    "cdc": "#E69F00",  # orange
}
TASK_TYPE_LABELS: dict[str, str] = {"common": "Common", "cdc": "CDC"}
#: The line of a trend over the whole fleet (``trend(..., by=())``), which has no task type.
ALL_TASKS_COLOR = "#555555"
#: Error codes take these in order of how often they occur (Okabe-Ito without the state colours
#: first, so a code is not mistaken for a task state).
ERROR_CODE_COLORS: tuple[str, ...] = (
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#D55E00",  # vermillion
    "#0072B2",  # blue
    "#009E73",  # bluish green
    "#000000",  # black
    "#999999",  # grey (also "other codes")
)
ANOMALY_COLOR = "#000000"
#: Row fills of the tables: ``above`` = the whole Wilson interval is above the threshold,
#: ``maybe`` = the point estimate is above it but the interval reaches below, ``worse``/``better``
#: = the abnormal count went up/down since the previous run.
HIGHLIGHT_COLORS: dict[str, str] = {
    "above": "#F4B183",
    "maybe": "#FCE4D6",
    "worse": "#FCE4D6",
    "better": "#D9F2E6",
    "none": "#FFFFFF",
    "header": "#E7E9EE",
}

EMPTY_MESSAGE = "No data for the selected filters"
#: ``~`` drops insignificant zeros: ticks read 0.5 %, 1 %, 1.5 % rather than 1 %, 1 %, 2 %.
PERCENT_TICKFORMAT = ".1~%"
PERCENT_HOVER = ".1%"
TIME_AXIS_TITLE = "Time (UTC)"
#: The trace types drawn here: the only ones whose defaults the template needs (see _template).
_TRACE_TYPES = ("bar", "heatmap", "indicator", "scatter", "table")
MARGINS = {"l": 60, "r": 30, "t": 70, "b": 100}

_INSTANCE_KEY = ("region", "project_id", "instance_id")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
@functools.cache
def _template() -> go.layout.Template:
    """The look of every figure: plotly's ``plotly_white`` with the trace defaults of only the
    trace types drawn here.  Each figure validates and copies its template, and the full one
    carries defaults for every trace type plotly knows: half of a small figure's build time."""
    import plotly.io as pio

    white = pio.templates["plotly_white"]
    return go.layout.Template(layout=white.layout, data={
        kind: getattr(white.data, kind) for kind in _TRACE_TYPES if getattr(white.data, kind, None)})


def apply_layout(
    fig: go.Figure,
    title: str | None = None,
    *,
    x_title: str | None = None,
    y_title: str | None = None,
    percent_y: bool = False,
    height: int | None = None,
) -> go.Figure:
    """Give ``fig`` the project's look: template, title, margins, axis titles, separators.

    ``x_title``/``y_title`` go on every x/y axis; ``percent_y`` formats the y axes as percentages
    of fractions.  Returns ``fig``.
    """
    fig.update_layout(
        template=_template(),
        # Titles can hold an instance label: plotly would read HTML (links) in it.
        title={"text": display.plotly(title or "", limit=None), "x": 0.0, "xanchor": "left"},
        margin=MARGINS,
        # Plotly's default thousands separator is a thin space; users read "12,345".
        separators=".,",
        # Below the plot, in container coordinates: above it, legends collide with subplot titles.
        legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "x": 0.5, "xanchor": "center"},
    )
    if height is not None:
        fig.update_layout(height=height)
    # Axis titles of figures with subplots are set per panel by their builder.
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    if percent_y:
        fig.update_yaxes(tickformat=PERCENT_TICKFORMAT)
    return fig


def empty_figure(message: str = EMPTY_MESSAGE, title: str | None = None) -> go.Figure:
    """A figure with no traces and ``message`` centred in it (what builders return for no rows)."""
    fig = go.Figure()
    apply_layout(fig, title)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.add_annotation(
        text=message,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        xanchor="center",
        yanchor="middle",
        showarrow=False,
        font={"size": 16, "color": "#666666"},
    )
    return fig


def _checked(
    frame: pd.DataFrame | None, required: Iterable[str], builder: str, source: str
) -> pd.DataFrame | None:
    """``frame`` with a fresh index if it has rows, ``None`` if it has none.

    Raises ValueError naming the missing columns; a frame without rows is never an error, so the
    dashboard can pass whatever an empty selection produced.
    """
    if frame is None or len(frame) == 0:
        return None
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{builder}() needs a pandas DataFrame ({source}), got {type(frame).__name__}")
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise ValueError(
            f"{builder}() needs column(s) {', '.join(missing)} but the frame has only "
            f"{', '.join(map(str, frame.columns)) or 'no columns'}; pass the output of {source}"
        )
    return frame.reset_index(drop=True)


def _utc_naive(values: pd.Series) -> pd.Series:
    """Times as naive UTC: plotly.js ignores offsets, so aware times would be shown unconverted."""
    if not pd.api.types.is_datetime64_any_dtype(values):
        values = pd.to_datetime(values, utc=True, format="ISO8601")
    if values.dt.tz is not None:
        values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    return values


def _fit_single_time(fig: go.Figure, times: Iterable, half_width: pd.Timedelta = pd.Timedelta(hours=1), **where) -> None:
    """With one distinct time, plotly zooms the x axis to a millisecond around it (ticks such as
    02:29:59.9995): show an hour either side instead, with whole-minute ticks."""
    distinct = pd.Series(list(times)).dropna().unique()
    if len(distinct) != 1:
        return
    at = pd.Timestamp(distinct[0])
    fig.update_xaxes(range=[at - half_width, at + half_width], tickformat="%H:%M<br>%Y-%m-%d", **where)


def _floats(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _reject_duplicates(frame: pd.DataFrame, key: list[str], builder: str, expected: str) -> None:
    duplicated = frame.duplicated(key, keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, key].iloc[0].to_dict()
        raise ValueError(
            f"{builder}() needs one row per {expected}, but {int(duplicated.sum())} rows share "
            f"their {', '.join(key)} (e.g. {example}); aggregate first with the analysis function "
            f"named in the docstring"
        )


def _task_types_in(frame: pd.DataFrame) -> list[str]:
    """Task types present, the known ones first in their usual order (common, then CDC)."""
    present = frame["task_type"].astype("string").dropna().unique().tolist()
    return [t for t in TASK_TYPES if t in present] + sorted(t for t in present if t not in TASK_TYPES)


def _instance_labels(frame: pd.DataFrame) -> pd.Series:
    """One display label per row: the instance name, else its id; ids added where names clash.

    The last non-empty name of an instance wins, so a renamed instance keeps one label.  Names
    and ids are shown through ``display.visible`` (capped, hidden characters escaped) before
    clashes are looked for, so two instances never share a label on screen.  The labels are
    plain text: each plotly sink escapes them (``display.plotly``).
    """
    key = [c for c in _INSTANCE_KEY if c in frame.columns]
    ids = _visible(frame["instance_id"])
    if "instance_name" in frame.columns:
        names = _visible(frame["instance_name"], display.LABEL_LIMIT).str.strip().replace("", pd.NA)
        names = names.groupby([frame[c] for c in key], dropna=False).transform("last")
        labels = names.fillna(ids)
    else:
        labels = ids
    # Two instances with one name (or one id in two projects, or one project and id under two
    # regions: a collector whose endpoint, stored as the region, changed) must not merge into
    # one bar/row.
    for suffix_from in ("instance_id", "project_id", "region"):
        clashes = frame[key].groupby(labels, dropna=False).transform("nunique").gt(1).any(axis=1)
        if not clashes.any():
            break
        if suffix_from == "instance_id":
            labels = labels.where(~clashes, labels.where(labels == ids, labels + " (" + ids + ")"))
        elif suffix_from in frame.columns:
            labels = labels.where(~clashes, _visible(frame[suffix_from]).fillna("–") + "/" + labels)
    return labels.astype(object)


def _visible(values: pd.Series, limit: int | None = display.LIMIT) -> pd.Series:
    """``display.visible`` of each value (missing values stay missing), computed once per distinct value."""
    text = values.astype("string")
    shown = {value: display.visible(value, limit) for value in text.dropna().unique()}
    return text.map(shown, na_action="ignore").astype("string")


def percent_text(value) -> str:
    """A fraction as "12.3%" (one decimal, no space: the form plotly's ``.1%`` prints beside it),
    "–" when undefined.  Every percentage the dashboard and the report write goes through here."""
    return "–" if value is None or pd.isna(value) else f"{value:.1%}"


def points_text(change) -> str:
    """A change of a fraction in percentage points, one decimal: "+2.0 pts", "−0.4 pts" (a real
    minus sign), and "±0.0 pts" when it rounds to zero (neither a rise nor a fall); "–" when
    undefined."""
    if change is None or pd.isna(change):
        return "–"
    points = round(float(change) * 100, 1)
    if points == 0:
        return "±0.0 pts"
    return f"{points:+.1f} pts".replace("-", "\u2212")


def _percent(values: pd.Series) -> pd.Series:
    """Fractions as "12.3%" strings, "–" where undefined (table cells)."""
    return values.map(percent_text)


def _count(values: pd.Series) -> pd.Series:
    return values.map(lambda v: "–" if pd.isna(v) else f"{int(v):,}")


def _signed(values: pd.Series) -> pd.Series:
    return values.map(lambda v: "–" if pd.isna(v) else f"{int(v):+,}")


def _task_type_labels(values: pd.Series) -> pd.Series:
    """"Common"/"CDC" for the table cells; a missing task type is a row over both ("All")."""
    return values.astype("string").map(lambda t: "All" if pd.isna(t) else TASK_TYPE_LABELS.get(t, t)).astype(object)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def state_breakdown(latest_stats: pd.DataFrame | None, top: int = 30) -> go.Figure:
    """Stacked horizontal bars of the four task states per instance, common and CDC side by side.

    Input: the latest snapshot per instance and task type, ``analysis.latest(stats)``.
    Columns read: ``instance_id, task_type, running, abnormal, terminated, completed``;
    ``instance_name`` (label, else the id) and ``region``/``project_id`` (to tell instances
    apart) when present.  One row per instance and task type is required: several snapshots of
    one instance must not be stacked (the counts are gauges).

    Instances are sorted by abnormal tasks (both types together), worst at the top, and cut to
    the ``top`` worst.  Traces: for each task type present (common in the left panel, CDC in the
    right; a frame of one task type, e.g. filtered to CDC, has one panel, not an empty second one)
    one bar trace per state, named by ``STATE_LABELS`` and coloured by ``STATE_COLORS``.
    """
    builder = "state_breakdown"
    title = "Task states per instance (latest snapshot)"
    frame = _checked(
        latest_stats, ("instance_id", "task_type", *COUNT_COLUMNS), builder, "analysis.latest(stats)"
    )
    if frame is None:
        return empty_figure(title=title)
    key = [c for c in _INSTANCE_KEY if c in frame.columns]
    _reject_duplicates(frame, key + ["task_type"], builder, "instance and task type")

    frame = frame.assign(instance_label=_instance_labels(frame), task_type=frame["task_type"].astype(object))
    counts = frame[list(COUNT_COLUMNS)].apply(pd.to_numeric)
    frame[list(COUNT_COLUMNS)] = counts
    per_instance = (
        frame.assign(total_tasks=counts.sum(axis=1))
        .groupby("instance_label", sort=False)[["abnormal", "total_tasks"]]
        .sum()
        .reset_index()
        .sort_values(["abnormal", "total_tasks", "instance_label"], ascending=[False, False, True])
    )
    shown = per_instance["instance_label"].head(top).tolist()
    if len(per_instance) > len(shown):
        title += f": the {len(shown)} with most abnormal tasks of {len(per_instance)}"
    # Each bar carries its instance_id, so a click opens that instance (labels are for people).
    ids = frame.drop_duplicates("instance_label").set_index("instance_label")["instance_id"].astype(str)
    shown_ids = ids.reindex(shown).tolist()
    categories = [display.plotly(label, limit=None) for label in shown]

    panels = [t for t in TASK_TYPES if t in set(frame["task_type"].dropna())] or list(TASK_TYPES)
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        horizontal_spacing=0.03,
        subplot_titles=[f"{TASK_TYPE_LABELS[t]} tasks" for t in panels],
    )
    for column, task_type in enumerate(panels, start=1):
        # NaN (no bar) where an instance has no row of this type: "not reported" is not "0 tasks".
        of_type = frame[frame["task_type"] == task_type].set_index("instance_label").reindex(shown)
        for state in COUNT_COLUMNS:
            fig.add_trace(
                go.Bar(
                    x=_floats(of_type[state]),
                    y=categories,
                    customdata=shown_ids,
                    orientation="h",
                    name=STATE_LABELS[state],
                    legendgroup=state,
                    showlegend=column == 1,
                    marker_color=STATE_COLORS[state],
                    meta=task_type,
                    hovertemplate=(
                        f"%{{y}}<br>{TASK_TYPE_LABELS[task_type]} {state}: %{{x:,}}<extra></extra>"
                    ),
                ),
                row=1,
                col=column,
            )
    apply_layout(fig, title, height=max(320, 110 + 22 * len(shown)))
    fig.update_layout(barmode="stack", bargap=0.25)
    fig.update_xaxes(title_text="Tasks", tickformat=",d", rangemode="tozero")
    fig.update_yaxes(categoryorder="array", categoryarray=categories, autorange="reversed")
    fig.update_yaxes(title_text="Instance", row=1, col=1)
    return fig


def abnormal_ratio_trend(
    trend_frame: pd.DataFrame | None, anomalies: pd.DataFrame | None = None
) -> go.Figure:
    """The abnormal ratio over time, one line per task type, anomalies ringed when given.

    Input: ``analysis.trend(stats, freq, by=("task_type",))`` (or ``HistoryStore.trend``).
    Columns read: ``bucket, abnormal_ratio``; ``task_type`` gives one line per type (without it:
    one "All tasks" line, as from ``by=()``); ``abnormal`` and ``total`` are added to the hover
    when present.  One row per bucket (and task type) is required.

    ``anomalies``: ``analysis.anomalies(stats, freq, by=...)`` with the same ``by`` as the trend
    (so each anomaly belongs to one line; anomalies per instance on a per-type trend are a
    ValueError).  Columns read: ``bucket, is_anomaly`` and the group columns; ``robust_z`` is
    hovered when present.  The markers sit on the trend line at the flagged buckets.  The
    "Anomaly" trace is added only when at least one bucket is flagged.

    Missing ratios (no tasks in a bucket) are gaps in the line, not zeros.
    """
    builder = "abnormal_ratio_trend"
    title = "Abnormal ratio over time"
    frame = _checked(trend_frame, ("bucket", "abnormal_ratio"), builder, "analysis.trend(stats)")
    if frame is None:
        return empty_figure(title=title)
    by_type = "task_type" in frame.columns
    _reject_duplicates(frame, ["bucket"] + (["task_type"] if by_type else []), builder, "bucket and task type")
    frame = frame.assign(bucket=_utc_naive(frame["bucket"])).sort_values("bucket", kind="stable")
    if by_type:
        frame["task_type"] = frame["task_type"].astype("string")
    with_counts = {"abnormal", "total"} <= set(frame.columns)

    fig = go.Figure()
    groups = _task_types_in(frame) if by_type else [None]
    for task_type in groups:
        line = frame if task_type is None else frame[frame["task_type"] == task_type]
        # An unknown task type (a foreign history) is data: escaped like any label.
        name = "All tasks" if task_type is None else TASK_TYPE_LABELS.get(task_type) or display.plotly(task_type)
        color = ALL_TASKS_COLOR if task_type is None else TASK_TYPE_COLORS.get(task_type, "#777777")
        detail = "<br>%{customdata[0]:,} abnormal of %{customdata[1]:,} tasks" if with_counts else ""
        fig.add_trace(
            go.Scatter(
                x=line["bucket"],
                y=_floats(line["abnormal_ratio"]),
                mode="lines+markers",
                name=name,
                line={"color": color, "width": 2},
                marker={"color": color, "size": 5},
                connectgaps=False,
                customdata=line[["abnormal", "total"]].to_numpy(dtype="float64") if with_counts else None,
                hovertemplate=f"%{{fullData.name}}: %{{y:{PERCENT_HOVER}}}{detail}<extra></extra>",
            )
        )

    if anomalies is not None:
        marks = _anomaly_marks(anomalies, frame, builder)
        if len(marks):
            fig.add_trace(
                go.Scatter(
                    x=marks["bucket"],
                    y=_floats(marks["abnormal_ratio"]),
                    mode="markers",
                    name="Anomaly",
                    marker={
                        "symbol": "circle-open",
                        "size": 14,
                        "color": ANOMALY_COLOR,
                        "line": {"width": 2, "color": ANOMALY_COLOR},
                    },
                    customdata=_floats(marks["robust_z"]) if "robust_z" in marks.columns else None,
                    hovertemplate=(
                        "Anomaly: %{y:" + PERCENT_HOVER + "}"
                        + ("<br>robust z = %{customdata:.1f}" if "robust_z" in marks.columns else "")
                        + "<extra></extra>"
                    ),
                )
            )
    apply_layout(fig, title, x_title=TIME_AXIS_TITLE, y_title="Abnormal ratio", percent_y=True)
    fig.update_layout(hovermode="x unified")
    fig.update_yaxes(rangemode="tozero")
    _fit_single_time(fig, frame["bucket"])
    return fig


def _anomaly_marks(anomalies: pd.DataFrame, trend: pd.DataFrame, builder: str) -> pd.DataFrame:
    """The flagged rows of ``anomalies`` with the trend's ratio at their bucket and group."""
    flagged = _checked(anomalies, ("bucket", "is_anomaly"), builder, "analysis.anomalies(stats, by=...)")
    if flagged is None:
        return pd.DataFrame(columns=["bucket", "abnormal_ratio"])
    groups = [c for c in GROUP_COLUMNS if c in trend.columns]
    anomaly_groups = [c for c in GROUP_COLUMNS if c in flagged.columns]
    if groups != anomaly_groups:
        raise ValueError(
            f"{builder}() got anomalies grouped by ({', '.join(anomaly_groups)}) for a trend grouped "
            f"by ({', '.join(groups)}); compute them with the same by, e.g. "
            f"analysis.anomalies(stats, freq, by={tuple(groups)!r})"
        )
    # eq(True): a missing flag is False, whatever the column's dtype (object, bool, boolean),
    # without pandas 2's warning about fillna downcasting an object column.
    flagged = flagged[flagged["is_anomaly"].eq(True).fillna(False).astype(bool)]
    flagged = flagged.drop(columns=[c for c in ("abnormal_ratio",) if c in flagged.columns])
    flagged = flagged.assign(bucket=_utc_naive(flagged["bucket"]))
    for name in groups:
        flagged[name] = flagged[name].astype("string")
    return flagged.merge(trend[["bucket", *groups, "abnormal_ratio"]], on=["bucket", *groups], how="inner")


def cdc_share_trend(cdc_vs_common_frame: pd.DataFrame | None, show_gap: bool = True) -> go.Figure:
    """The CDC share of all tasks over time and, below it, the abnormal-ratio gap (CDC − common).

    Input: ``analysis.cdc_vs_common(stats, freq)`` (or ``HistoryStore.cdc_vs_common``).
    Columns read: ``bucket, cdc_share``, and ``abnormal_ratio_gap`` when ``show_gap``;
    ``common_total, cdc_total`` are hovered when present.

    Traces: "CDC share" (a line, percent axis fixed at 0–100%) and, with ``show_gap``, the
    abnormal-ratio gap as bars in percentage points (``abnormal_ratio_gap * 100``, ticks "+2 pts"):
    "CDC worse (gap > 0)" in the CDC colour and "Common worse (gap < 0)" in the common colour, one
    trace each so the legend shows each colour.
    """
    builder = "cdc_share_trend"
    title = "CDC share of tasks over time"
    required = ("bucket", "cdc_share") + (("abnormal_ratio_gap",) if show_gap else ())
    frame = _checked(cdc_vs_common_frame, required, builder, "analysis.cdc_vs_common(stats)")
    if frame is None:
        return empty_figure(title=title)
    _reject_duplicates(frame, ["bucket"], builder, "bucket")
    frame = frame.assign(bucket=_utc_naive(frame["bucket"])).sort_values("bucket", kind="stable")
    with_totals = {"common_total", "cdc_total"} <= set(frame.columns)

    if show_gap:
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4])
    else:
        fig = go.Figure()
    detail = "<br>%{customdata[1]:,} CDC of %{customdata[0]:,} common + CDC" if with_totals else ""
    customdata = None
    if with_totals:
        common = _floats(frame["common_total"])
        customdata = np.column_stack([common + _floats(frame["cdc_total"]), _floats(frame["cdc_total"])])
    share = go.Scatter(
        x=frame["bucket"],
        y=_floats(frame["cdc_share"]),
        mode="lines+markers",
        name="CDC share",
        line={"color": TASK_TYPE_COLORS["cdc"], "width": 2},
        marker={"color": TASK_TYPE_COLORS["cdc"], "size": 5},
        connectgaps=False,
        customdata=customdata,
        hovertemplate=f"CDC share: %{{y:{PERCENT_HOVER}}}{detail}<extra></extra>",
    )
    if not show_gap:
        fig.add_trace(share)
        apply_layout(fig, title, x_title=TIME_AXIS_TITLE, y_title="CDC share", percent_y=True)
        fig.update_yaxes(range=[0, 1])
        _fit_single_time(fig, frame["bucket"])
        return fig

    # The gap is a difference of two percentages: percentage points, drawn as such (a "%" tick
    # on it would read as a share).  One trace per sign, so each legend swatch has its bars' colour.
    gap_points = _floats(frame["abnormal_ratio_gap"]) * 100
    fig.add_trace(share, row=1, col=1)
    for worse, label in (("cdc", "CDC worse (gap > 0)"), ("common", "Common worse (gap < 0)")):
        shown = np.where(gap_points > 0, gap_points, np.nan) if worse == "cdc" else np.where(gap_points < 0, gap_points, np.nan)
        fig.add_trace(
            go.Bar(
                x=frame["bucket"],
                y=shown,
                name=label,
                marker_color=TASK_TYPE_COLORS[worse],
                hovertemplate="Abnormal-ratio gap: %{y:+.1f} pts<extra></extra>",
            ),
            row=2,
            col=1,
        )
    apply_layout(fig, title + " and abnormal-ratio gap", height=520)
    fig.update_yaxes(title_text="CDC share", range=[0, 1], tickformat=PERCENT_TICKFORMAT, row=1, col=1)
    fig.update_yaxes(title_text="Gap, CDC − common (pts)", ticksuffix=" pts", tickformat="+.1~f",
                     zeroline=True, zerolinecolor="#444444", row=2, col=1)
    fig.update_xaxes(title_text=TIME_AXIS_TITLE, row=2, col=1)
    fig.update_layout(hovermode="x unified", barmode="relative")
    _fit_single_time(fig, frame["bucket"])
    return fig


def abnormal_heatmap(
    trend_by_instance: pd.DataFrame | None,
    top: int = 40,
    instance_names: Mapping[str, str] | pd.Series | None = None,
) -> go.Figure:
    """Instance × time heatmap of the abnormal ratio, the ``top`` worst instances, worst on top.

    Input: ``analysis.trend(stats, freq, by=("instance_id",))`` (``region``/``project_id``/
    ``task_type`` may be among the by-columns too).  Columns read: ``bucket, instance_id,
    abnormal_ratio``.  Rows are labelled by ``instance_names`` (instance_id -> name, e.g.
    ``latest(stats).set_index("instance_id")["instance_name"]``; trend output has no names), else
    by an ``instance_name`` column, else by the id.  With several rows per instance
    and bucket (``task_type`` in ``by``) the task types are pooled, which needs ``abnormal`` and
    ``total`` (``sum(abnormal) / sum(total)``).

    "Worst" = highest mean abnormal ratio over the buckets shown (each bucket counts once; ties:
    highest peak).  The colour scale runs from 0 to the highest ratio shown rounded up (10% for
    ratios up to 9.5%, 100% at most), so differences among small ratios stay visible; a bucket
    without data (or without tasks) is a gap, never 0%.  A single bucket is a labelled category
    on the x axis.
    """
    builder = "abnormal_heatmap"
    title = "Abnormal ratio per instance"
    frame = _checked(
        trend_by_instance, ("bucket", "instance_id", "abnormal_ratio"), builder,
        'analysis.trend(stats, by=("instance_id",))',
    )
    if frame is None:
        return empty_figure(title=title)
    if instance_names is not None:
        names = pd.Series(instance_names, dtype="string")
        names = names[~names.index.duplicated(keep="last")]
        frame = frame.assign(instance_name=frame["instance_id"].astype("string").map(names))
    frame = frame.assign(bucket=_utc_naive(frame["bucket"]), instance_label=_instance_labels(frame))
    if frame.duplicated(["instance_label", "bucket"]).any():
        missing = [c for c in ("abnormal", "total") if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{builder}() got several rows per instance and bucket; pooling them needs "
                f"column(s) {', '.join(missing)} (or pass trend(stats, by=('instance_id',)))"
            )
        pooled = frame.groupby(["instance_label", "bucket"], as_index=False)[["abnormal", "total"]].sum()
        total = _floats(pooled["total"])
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled["abnormal_ratio"] = np.where(total > 0, _floats(pooled["abnormal"]) / total, np.nan)
        frame = pooled

    grid = frame.pivot(index="instance_label", columns="bucket", values="abnormal_ratio")
    grid = grid.astype("float64").sort_index(axis=1)
    ranking = pd.DataFrame({"mean": grid.mean(axis=1), "peak": grid.max(axis=1)})
    ranking = ranking.reset_index().sort_values(
        ["mean", "peak", "instance_label"], ascending=[False, False, True], na_position="last"
    )
    shown = ranking["instance_label"].head(top).tolist()
    if len(ranking) > len(shown):
        title += f": the {len(shown)} worst of {len(ranking)}"
    grid = grid.loc[shown]
    values = grid.to_numpy()
    # One bucket: a date axis would draw a brick one millisecond wide, so the lone bucket is a
    # labelled category instead.
    one_bucket = grid.shape[1] == 1
    x = [f"{grid.columns[0]:%Y-%m-%d %H:%M}"] if one_bucket else list(grid.columns)
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=x,
            y=[display.plotly(label, limit=None) for label in shown],
            zmin=0.0,
            zmax=_colour_scale_top(values),
            colorscale="YlOrRd",
            hoverongaps=False,
            colorbar={"title": {"text": "Abnormal"}, "tickformat": PERCENT_TICKFORMAT},
            hovertemplate=(f"%{{y}}<br>%{{x{'' if one_bucket else '|%Y-%m-%d %H:%M'}}} UTC<br>"
                           f"abnormal ratio %{{z:{PERCENT_HOVER}}}<extra></extra>"),
            name="Abnormal ratio",
        )
    )
    apply_layout(fig, title, x_title=TIME_AXIS_TITLE, y_title="Instance", height=max(320, 140 + 20 * len(shown)))
    fig.update_yaxes(autorange="reversed", type="category")
    if one_bucket:
        fig.update_xaxes(type="category")
    return fig


def _colour_scale_top(values: np.ndarray) -> float:
    """The top of a 0-based colour scale for ratios: the highest value rounded up to 1, 2, 2.5 or
    5 times a power of ten (10 % for values up to 9.5 %), so the colours spread over the values
    shown instead of one pale shade on a 0-100 % scale; 100 % at most, 1 % at least."""
    finite = values[np.isfinite(values)] if values.size else values
    highest = float(finite.max()) if finite.size else 0.0
    if highest <= 0.01:
        return 0.01
    if highest >= 1.0:
        return 1.0
    power = 10.0 ** np.floor(np.log10(highest))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if highest <= step * power * (1 + 1e-9):
            return float(min(1.0, step * power))
    return 1.0


def worst_instances_table(
    ranking: pd.DataFrame | None, threshold: float | None = None, top: int = 50
) -> go.Figure:
    """:func:`worst_instances_rows` drawn as a plotly table (``go.Table``), for notebooks and the
    report; the arguments, columns read and errors raised are those of :func:`worst_instances_rows`."""
    return worst_instances_rows(ranking, threshold, top).figure()


def worst_instances_rows(
    ranking: pd.DataFrame | None, threshold: float | None = None, top: int = 50
) -> Table:
    """A table of the worst groups with their Wilson intervals; rows over ``threshold`` shaded.

    Input: ``analysis.abnormal_ranking(stats, n, by=...)``, in its order (the first ``top``
    rows).  Columns read: ``abnormal, total, abnormal_ratio, wilson_low, wilson_high`` and the
    group columns present (``region``, ``project_id``, ``instance_id``, ``task_type``, at least
    one); with ``instance_id`` the "Instance" column shows ``instance_name`` when known.

    ``threshold`` is a fraction (0.05 = 5 %).  A row whose whole interval is above it
    (``wilson_low > threshold``) gets ``HIGHLIGHT_COLORS["above"]``; a row whose ratio is above
    it but whose interval reaches below (could be chance on few tasks) gets ``"maybe"``.

    Returns a :class:`Table` (cells as formatted text: counts with thousands separators, ratios
    as percentages); no rows (or ``None``) gives a table with no rows and
    :data:`EMPTY_MESSAGE`.  Raises ``ValueError`` for missing columns, no group column or a
    ``threshold`` outside 0..1.
    """
    builder = "worst_instances_table"
    title = "Highest abnormal ratios"
    frame = _checked(
        ranking, ("abnormal", "total", "abnormal_ratio", "wilson_low", "wilson_high"),
        builder, "analysis.abnormal_ranking(stats)",
    )
    if frame is None:
        return Table(title, {}, [], range(0), EMPTY_MESSAGE)
    groups = [c for c in GROUP_COLUMNS if c in frame.columns]
    if not groups:
        raise ValueError(
            f"{builder}() needs at least one group column ({', '.join(GROUP_COLUMNS)}) to name the "
            "rows; pass the output of analysis.abnormal_ranking(stats)"
        )
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a fraction between 0 and 1 (0.05 = 5 %), got {threshold!r}")
    total = len(frame)
    frame = frame.head(top)

    columns: dict[str, pd.Series] = {}
    for group, header in (("region", "Region"), ("project_id", "Project")):
        if group in groups:
            columns[header] = frame[group].astype("string").fillna("–")
    if "instance_id" in groups:
        title = "Instances with the highest abnormal ratio"
        columns["Instance"] = _instance_labels(frame)
    if "task_type" in groups:
        columns["Task type"] = _task_type_labels(frame["task_type"])
    first_numeric = len(columns)
    columns["Abnormal"] = _count(frame["abnormal"])
    columns["Total"] = _count(frame["total"])
    columns["Abnormal ratio"] = _percent(frame["abnormal_ratio"])
    columns[f"{analysis.confidence_text()} Wilson interval"] = _percent(frame["wilson_low"]) + " – " + _percent(frame["wilson_high"])

    fill = pd.Series(HIGHLIGHT_COLORS["none"], index=frame.index)
    confidence = analysis.confidence_text()
    legend = (f"Ranked by the low end of the {confidence} Wilson interval, so that a few tasks cannot "
              "outrank hundreds.")
    if threshold is not None:
        ratio, low = _floats(frame["abnormal_ratio"]), _floats(frame["wilson_low"])
        fill = fill.mask(ratio > threshold, HIGHLIGHT_COLORS["maybe"])
        fill = fill.mask(low > threshold, HIGHLIGHT_COLORS["above"])
        title += f" (shaded: above {threshold:.1%})"
        legend += (f" Dark: the whole interval is above {threshold:.1%}; light: the ratio is above it, but "
                   "the interval reaches below (it may be chance).")
    return Table(title, columns, fill.tolist(), range(first_numeric, len(columns)), legend=legend,
                 of=total if total > len(frame) else None,
                 what="instances" if "instance_id" in groups and "task_type" not in groups else "rows")


def changes_table(
    changes: pd.DataFrame | None,
    top: int = 100,
    *,
    latest_run_only: bool = True,
    include_unchanged: bool = False,
    deltas: Sequence[str] | None = ("abnormal",),
) -> go.Figure:
    """:func:`changes_rows` drawn as a plotly table (``go.Table``), for notebooks and the report;
    the arguments, columns read and errors raised are those of :func:`changes_rows`."""
    return changes_rows(changes, top, latest_run_only=latest_run_only,
                        include_unchanged=include_unchanged, deltas=deltas).figure()


def changes_rows(
    changes: pd.DataFrame | None,
    top: int = 100,
    *,
    latest_run_only: bool = True,
    include_unchanged: bool = False,
    deltas: Sequence[str] | None = ("abnormal",),
) -> Table:
    """What changed between the last run and the one before, the largest abnormal change first.

    Input: ``analysis.changes(stats)``.  Columns read: ``instance_id, status, summary`` (e.g.
    "abnormal +3 since the previous run"); ``run_id``/``collected_at`` to keep only the latest
    run (``latest_run_only``); ``instance_name``, ``project_id``, ``task_type`` and the
    ``<name>_delta`` columns named by ``deltas`` are shown when present (signed: "+3"; the
    summary already spells out every change, so by default only the abnormal one gets a
    column; ``deltas=None`` shows every ``*_delta`` column).  Rows with status
    ``unchanged`` are left out unless ``include_unchanged``.  Sorted by ``abnormal_delta``
    (the largest change either way first, a rise before a fall of the same size; an appeared
    series counts its ``abnormal`` tasks as its change) when present, else in the given order;
    the first ``top`` rows shown, and the table says how many there were.  With
    ``abnormal_delta``, rows where the abnormal count rose (or that appeared with abnormal
    tasks) are shaded ``HIGHLIGHT_COLORS["worse"]``, rows where it fell ``"better"``.

    Returns a :class:`Table`; with nothing to show, a table with no rows saying "No changes
    since the previous run".  Raises ``ValueError`` for missing columns.
    """
    builder = "changes_table"
    title = "Changes since the previous run"
    no_changes = "No changes since the previous run"
    frame = _checked(changes, ("instance_id", "status", "summary"), builder, "analysis.changes(stats)")
    if frame is None:
        return Table(title, {}, [], range(0), no_changes)
    if latest_run_only and "collected_at" in frame.columns:
        # changes() covers every run of the history; the table answers "what just happened".
        times = _utc_naive(frame["collected_at"])
        last = times == times.max()
        if "run_id" in frame.columns:
            last &= frame["run_id"] == frame.loc[last, "run_id"].max()
        frame = frame[last]
        title += f" ({times.max():%Y-%m-%d %H:%M} UTC)"
    if not include_unchanged:
        frame = frame[frame["status"].astype("string").fillna("") != "unchanged"]
    if len(frame) == 0:
        return Table(title, {}, [], range(0), no_changes)
    if "abnormal_delta" in frame.columns:
        # The largest changes of the abnormal count either way come first (a rise before a fall
        # of the same size); an appeared series counts its abnormal tasks as its change.  A table
        # cut to its first rows then still shows the biggest falls and arrivals.
        rise = _floats(frame["abnormal_delta"])
        if "abnormal" in frame.columns:
            rise = np.where(np.isnan(rise) & (frame["status"].astype("string") == "appeared").to_numpy(dtype=bool),
                            _floats(frame["abnormal"]), rise)
        frame = frame.assign(_size=np.abs(rise), _rise=rise)
        frame = frame.sort_values(["_size", "_rise"], ascending=False, kind="stable", na_position="last")
    total = len(frame)
    frame = frame.head(top).reset_index(drop=True)

    columns: dict[str, pd.Series] = {"Instance": _instance_labels(frame)}
    if "project_id" in frame.columns and frame["project_id"].nunique(dropna=True) > 1:
        columns = {"Project": frame["project_id"].astype("string").fillna("–"), **columns}
    if "task_type" in frame.columns:
        columns["Task type"] = _task_type_labels(frame["task_type"])
    columns["Status"] = frame["status"].astype("string").fillna("–")
    present = [str(c) for c in frame.columns if str(c).endswith("_delta")]
    if deltas is None:
        # The four states in their usual order, then the total, then any other delta.
        usual = [f"{name}_delta" for name in (*COUNT_COLUMNS, "total")]
        shown = [c for c in usual if c in present] + [c for c in present if c not in usual]
    else:
        shown = [f"{name}_delta" for name in deltas if f"{name}_delta" in present]
    first_numeric = len(columns)
    for delta in shown:
        header = delta.removesuffix("_delta").replace("_", " ").capitalize() + " Δ"
        if "ratio" in delta or "share" in delta:
            columns[header] = frame[delta].map(points_text)
        else:
            columns[header] = _signed(frame[delta])
    columns["Summary"] = frame["summary"].astype("string").fillna("")

    fill = pd.Series(HIGHLIGHT_COLORS["none"], index=frame.index)
    if "abnormal_delta" in frame.columns:
        rise = frame["_rise"].to_numpy(dtype="float64")
        fill = fill.mask(rise > 0, HIGHLIGHT_COLORS["worse"]).mask(rise < 0, HIGHLIGHT_COLORS["better"])
    return Table(title, columns, fill.tolist(), range(first_numeric, first_numeric + len(shown)),
                 of=total if total > len(frame) else None, what="changes")


#: Table text: near-black on white (Streamlit's chart theme would otherwise grey it out).
TABLE_TEXT_COLOR = "#1F2933"
#: The lines between rows of an HTML table.
TABLE_RULE_COLOR = "#D5D9E0"


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
    """The rows of a table the builders compute once and draw two ways: :meth:`figure` (a plotly
    ``go.Table``, for notebooks and the report) and :meth:`html` (a plain HTML table, for the
    dashboard, where a browser lays it out at once and plotly's table trace would cost its
    drawing time and a fixed-height frame).

    ``title``: the table's title.  ``columns``: header -> cells, already formatted as text, one
    per row.  ``fills``: one background colour per row (:data:`HIGHLIGHT_COLORS`).  ``numeric``:
    the positions of the columns aligned right (counts, ratios, deltas).  ``empty``: what to say
    when there are no rows.
    """

    title: str
    columns: Mapping[str, pd.Series]
    fills: Sequence[str]
    numeric: range
    empty: str | None = None
    #: How many rows there were before the table was cut to its first ones (None: not cut), and
    #: what they are, for the note "the first 20 of 51 changes".
    of: int | None = None
    what: str = "rows"
    #: How the rows are ordered and what their shading means, when the title cannot say it.
    legend: str | None = None

    def cut_note(self) -> str | None:
        """"Showing the first 20 of 51 changes." when the table was cut, else None."""
        return None if self.of is None else f"Showing the first {len(self):,} of {self.of:,} {self.what}."

    def note(self) -> str | None:
        """What the HTML table says under its rows: the legend, then :meth:`cut_note`; None when
        there is neither.  (A figure's title has room for the cut note only.)"""
        parts = [part for part in (self.legend, self.cut_note()) if part]
        return " ".join(parts) if parts else None

    def __len__(self) -> int:
        """The number of rows."""
        return len(self.fills)

    def figure(self) -> go.Figure:
        """A ``go.Table`` with a height that has room for every row (nothing scrolls inside it);
        with no rows, :func:`empty_figure` saying :attr:`empty`."""
        if not len(self):
            return empty_figure(self.empty or EMPTY_MESSAGE, title=self.title)
        fig = _table(self.columns, list(self.fills), numeric_from=self.numeric.start, numeric_until=self.numeric.stop)
        _table_layout(fig, self.title, len(self))
        note = self.cut_note()
        if note is not None:
            # A smaller second line (plotly's markup, added after apply_layout escaped the title).
            fig.update_layout(title_text=f"{fig.layout.title.text}<br><sup>{display.plotly(note, limit=None)}</sup>")
        return fig

    def html(self) -> str:
        """The table as one self-contained HTML fragment (inline styles only, no script), every
        cell and the title escaped (``display.html``), so a name is shown as the text it is.

        Every row is shown, in :data:`TABLE_TEXT_COLOR` on its row's fill; text wraps at spaces,
        and a word too long for the page (a name or id without a space) wraps anywhere rather
        than being cut; numbers keep one line.  A table still wider than the page (numbers
        alone) scrolls sideways in its own frame.  With no rows: the title and :attr:`empty`.
        """
        title = (f'<div style="font-weight:600;font-size:1rem;margin:0 0 0.5rem 0;color:{TABLE_TEXT_COLOR}">'
                 f"{display.html(self.title, limit=None)}</div>")
        if not len(self):
            message = display.html(self.empty or EMPTY_MESSAGE, limit=None)
            return f'<div class="roma-table">{title}<p style="color:{TABLE_TEXT_COLOR}">{message}</p></div>'
        cell = f"padding:0.3rem 0.6rem;border-bottom:1px solid {TABLE_RULE_COLOR};vertical-align:top;"
        aligns = ["right" if i in self.numeric else "left" for i in range(len(self.columns))]
        # Numbers keep one line and line up digit under digit.  Text wraps at spaces, and a word
        # too long for the page (a name or id without a space) wraps anywhere, shown whole,
        # instead of making the table wider than the page.
        number = "white-space:nowrap;font-variant-numeric:tabular-nums;"
        text = "overflow-wrap:anywhere;"
        styles = [f'{cell}text-align:{align};{number if align == "right" else text}' for align in aligns]
        head = "".join(
            f'<th style="{style}font-weight:600;background:{HIGHLIGHT_COLORS["header"]}">{display.html(name, limit=None)}</th>'
            for name, style in zip(self.columns, styles))
        texts = [[display.html(value, limit=None) for value in series.astype(object)] for series in self.columns.values()]
        body = "".join(
            f'<tr style="background:{fill}">'
            + "".join(f'<td style="{styles[c]}">{texts[c][row]}</td>' for c in range(len(texts)))
            + "</tr>"
            for row, fill in enumerate(self.fills))
        note = self.note()
        note = "" if note is None else f'<div style="font-size:0.8rem;margin:0.3rem 0 0 0;color:{TABLE_TEXT_COLOR}">{display.html(note, limit=None)}</div>'
        return (f'<div class="roma-table">{title}<div style="overflow-x:auto">'
                f'<table style="border-collapse:collapse;width:100%;font-size:0.875rem;color:{TABLE_TEXT_COLOR}">'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}</div>")

_TABLE_CELL_HEIGHT = 26
_TABLE_LINE_HEIGHT = 18
#: The narrowest plot area a table is laid out for (a 1280 px window beside the sidebar).
_TABLE_MIN_WIDTH_PX = 860
_CHAR_PX = 7.5


def _table(
    columns: Mapping[str, pd.Series],
    row_fill: Sequence[str],
    numeric_from: int,
    numeric_until: int | None = None,
    widths: Sequence[float] | None = None,
) -> go.Figure:
    """A go.Table whose every column shares one fill per row (the row's highlight).

    Column widths follow their longest text (header or cell; ``widths`` multiplies them), so ids,
    which plotly cannot wrap, are not cut; the figure's height (see :func:`_table_layout`) has
    room for the rows that wrap.
    """
    numeric_until = len(columns) if numeric_until is None else numeric_until
    align = ["right" if numeric_from <= i < numeric_until else "left" for i in range(len(columns))]
    texts = [series.astype(object).tolist() for series in columns.values()]
    weights = [_column_weight(name, values) * (1.0 if widths is None else widths[i])
               for i, (name, values) in enumerate(zip(columns, texts))]
    fig = go.Figure(
        go.Table(
            header={
                "values": [f"<b>{name}</b>" for name in columns],
                "fill_color": HIGHLIGHT_COLORS["header"],
                "font": {"color": TABLE_TEXT_COLOR, "size": 13},
                "align": align,
            },
            cells={
                # Cells show project ids, instance labels, statuses: text, never plotly's HTML.
                "values": [[display.plotly(value, limit=None) for value in series.astype(object)]
                           for series in columns.values()],
                "fill_color": [list(row_fill)] * len(columns),
                "font": {"color": TABLE_TEXT_COLOR, "size": 13},
                "align": align,
                "height": _TABLE_CELL_HEIGHT,
            },
            columnwidth=weights,
        )
    )
    return fig


def _column_weight(name: str, values: Sequence) -> float:
    """A column's share of a table's width, in characters: plotly wraps text at spaces only, so a
    column gets its longest unbreakable word (an id) in full, and text that can wrap gets at
    most 16 characters a line."""
    texts = [str(name), *(str(v) for v in values)]
    longest = max(len(text) for text in texts)
    longest_word = max((len(word) for text in texts for word in text.split()), default=0)
    return float(min(max(longest_word, min(longest, 16), 4), 60))


def _table_layout(fig: go.Figure, title: str, rows: int) -> None:
    """The shared layout, with room for every row, wrapped ones included (text wraps at spaces
    in columns as narrow as at a 1280 px window), and no legend: the table does not scroll
    inside its frame."""
    apply_layout(fig, title)
    margin = {**MARGINS, "b": 20}
    table = fig.data[0]
    texts, weights = table.cells.values, list(table.columnwidth)
    total = sum(weights)
    room = [max(1.0, (_TABLE_MIN_WIDTH_PX * w / total - 12) / _CHAR_PX) for w in weights]
    body = 0
    for row in range(min(rows, 100)):
        lines = max(int(np.ceil(len(str(values[row])) / room[c])) for c, values in enumerate(texts))
        body += _TABLE_CELL_HEIGHT + _TABLE_LINE_HEIGHT * (max(lines, 1) - 1)
    fig.update_layout(margin=margin, height=margin["t"] + margin["b"] + 40 + body + 10)


def collection_health_chart(
    errors_by_code: pd.DataFrame | None,
    health: pd.DataFrame | None = None,
    max_codes: int = 8,
    freq: str | pd.Timedelta | None = None,
) -> go.Figure:
    """Stacked bars of failed collections over time, one colour per error code.

    Input: ``analysis.errors_by_code(errors, freq)``; columns read ``bucket, error_code,
    errors``.  Codes are ordered by how often they occur; beyond ``max_codes`` the rarest are
    summed into "Other codes".  A code absent from a bucket is 0 there.

    ``health``: optionally ``analysis.collection_health(errors, stats)`` (columns read
    ``collected_at, success_ratio``), drawn as a "Success ratio" line on a right-hand percent
    axis, so a quiet error chart can be told from an idle collector.  That axis is zoomed to the
    ratios shown (a dip from 100% to 97% is visible) with its own ticks, never ones borrowed from
    the counts axis.

    ``freq``: the bucket width of ``errors_by_code``; each bar is 80 % of it wide (without it, of
    the smallest gap between buckets, else one hour), so a lone bar on a long or one-run axis is
    still visible.  With ``freq`` and more runs than buckets, the line has one point per bucket,
    at the bucket's start like its bars: the ratio of the bucket's worst run (so a run that
    missed 3 of 100 instances still shows as a dip to 97 %), hovered with the pooled ratio of
    all its runs (``collected / attempted`` when ``health`` has those columns).  A year of
    5-minute runs is then 365 daily points, not 105,000 that a browser takes seconds to draw.
    """
    builder = "collection_health_chart"
    title = "Collection errors by code"
    frame = _checked(errors_by_code, ("bucket", "error_code", "errors"), builder, "analysis.errors_by_code(errors)")
    runs = _checked(health, ("collected_at", "success_ratio"), builder, "analysis.collection_health(errors, stats)")
    if frame is None and runs is None:
        return empty_figure("No collection errors for the selected filters", title=title)

    fig = go.Figure()
    highest_stack = 0.0
    if frame is not None:
        frame = frame.assign(
            bucket=_utc_naive(frame["bucket"]),
            error_code=frame["error_code"].astype("string").fillna("UNKNOWN"),
            errors=_floats(frame["errors"]),
        )
        by_code = frame.groupby("error_code")["errors"].sum().reset_index()
        by_code = by_code.sort_values(["errors", "error_code"], ascending=[False, True])["error_code"].tolist()
        if len(by_code) > max_codes:
            kept = by_code[: max_codes - 1]
            frame["error_code"] = frame["error_code"].where(frame["error_code"].isin(kept), "Other codes")
            by_code = kept + ["Other codes"]
        grid = frame.pivot_table(index="bucket", columns="error_code", values="errors", aggfunc="sum")
        # No error row for a code in a bucket means no such error: 0, so stacks and hovers add up.
        grid = grid.reindex(columns=by_code).sort_index().fillna(0.0)
        highest_stack = float(grid.sum(axis=1).max())
        code_colors = ERROR_CODE_COLORS[:-1]  # the last (grey) is kept for "Other codes"
        width_ms = _bar_width_ms(grid.index, freq)
        for position, code in enumerate(by_code):
            fig.add_trace(
                go.Bar(
                    x=list(grid.index),
                    y=grid[code].to_numpy(dtype="float64"),
                    width=width_ms,
                    # Error codes come from the server: escaped, and kept out of the template.
                    name=display.plotly(code, limit=64),
                    marker_color=ERROR_CODE_COLORS[-1] if code == "Other codes" else code_colors[position % len(code_colors)],
                    hovertemplate="%{fullData.name}: %{y:,}<extra></extra>",
                )
            )
    if runs is not None:
        runs = runs.assign(collected_at=_utc_naive(runs["collected_at"])).sort_values("collected_at", kind="stable")
        line = _success_line(runs, freq)
        fig.add_trace(
            go.Scatter(
                x=line["x"],
                y=line["y"],
                customdata=line.get("customdata"),
                # Markers where they can be told apart; a long line is drawn as a line.
                mode="lines+markers" if len(line["y"]) <= _MARKER_LIMIT else "lines",
                name=line["name"],
                yaxis="y2",
                line={"color": STATE_COLORS["running"], "width": 2},
                marker={"color": STATE_COLORS["running"], "size": 5},
                hovertemplate=line["hover"],
            )
        )
        fig.update_layout(
            yaxis2={
                "title": {"text": "Success ratio"},
                "overlaying": "y",
                "side": "right",
                "range": _success_range(line["y"]),
                # Plotly syncs an overlaying axis's ticks to the counts axis (0 %, 48.5 %, 96.9 %).
                "tickmode": "auto",
                "nticks": 6,
                "tickformat": PERCENT_TICKFORMAT,
                "showgrid": False,
            }
        )
    apply_layout(fig, title, x_title=TIME_AXIS_TITLE)
    _fit_single_time(fig, [*(runs["collected_at"] if runs is not None else []),
                           *(frame["bucket"] if frame is not None else [])])
    counts_axis = {"title": {"text": "Failed collections"}, "tickformat": ",d", "rangemode": "tozero"}
    if highest_stack < 8:
        # Left to itself plotly puts ticks at 0.5 steps, which ",d" prints as "0, 1, 1, 2".
        counts_axis["dtick"] = 1
    fig.update_layout(barmode="stack", hovermode="x unified", yaxis=counts_axis)
    return fig


def _bar_width_ms(buckets: pd.Index, freq) -> float:
    """80 % of the bucket width in milliseconds (a date axis measures bar widths in ms)."""
    if freq is not None:
        step = pd.to_timedelta(freq)
    else:
        gaps = pd.Series(pd.DatetimeIndex(buckets).sort_values()).diff().dropna()
        gaps = gaps[gaps > pd.Timedelta(0)]
        step = gaps.min() if len(gaps) else pd.Timedelta(hours=1)
    return 0.8 * step / pd.Timedelta(milliseconds=1)


#: Points of a line beyond which it is drawn without markers.
_MARKER_LIMIT = 400


def _success_line(runs: pd.DataFrame, freq) -> dict:
    """The success-ratio line of :func:`collection_health_chart`: per run, or per bucket of
    ``freq`` (its worst run, hovered with the pooled ratio of its runs) when there are more runs
    than buckets.  Keys ``x``, ``y`` (float array), ``name``, ``hover`` and, per bucket,
    ``customdata`` (pooled ratio, runs)."""
    ratios = _floats(runs["success_ratio"])
    per_run = {"x": runs["collected_at"], "y": ratios, "name": "Success ratio",
               "hover": f"Success ratio: %{{y:{PERCENT_HOVER}}}<extra></extra>"}
    if freq is None or len(runs) < 2:
        return per_run
    buckets = analysis.bucket_of(runs["collected_at"], freq)
    if buckets.nunique() >= len(runs):
        return per_run
    frame = pd.DataFrame({"bucket": _utc_naive(buckets).to_numpy(), "ratio": ratios})
    if {"collected", "attempted"} <= set(runs.columns):
        frame["collected"] = _floats(runs["collected"])
        frame["attempted"] = _floats(runs["attempted"])
    else:   # without the counts, every run weighs the same
        frame["collected"], frame["attempted"] = ratios, np.where(np.isfinite(ratios), 1.0, np.nan)
    grouped = frame.groupby("bucket", sort=True)
    worst = grouped["ratio"].min()
    sums = grouped[["collected", "attempted"]].sum(min_count=1)
    pooled = (sums["collected"] / sums["attempted"]).to_numpy(dtype="float64")
    return {"x": list(worst.index), "y": worst.to_numpy(dtype="float64"),
            "customdata": np.column_stack([pooled, grouped.size().to_numpy()]),
            "name": "Success ratio (worst run per bucket)",
            "hover": (f"Worst run: %{{y:{PERCENT_HOVER}}}<br>All runs of the bucket (%{{customdata[1]:,}}): "
                      f"%{{customdata[0]:{PERCENT_HOVER}}}<extra></extra>")}


def _success_range(ratios: np.ndarray) -> list[float]:
    """A success-ratio axis from a little below the lowest ratio to just above 100 %, the bottom
    on a whole percent (0 % when the ratios go below 50 %)."""
    finite = ratios[np.isfinite(ratios)]
    lowest = float(finite.min()) if finite.size else 1.0
    if lowest < 0.5:
        return [0.0, 1.02]
    bottom = np.floor((lowest - max(0.01, (1.0 - lowest) * 0.2)) * 100) / 100
    return [max(0.0, float(bottom)), 1.0 + (1.0 - max(0.0, float(bottom))) * 0.04]


def instance_history(stats_of_one_instance: pd.DataFrame | None) -> go.Figure:
    """The four task counts of one instance over time: common above, CDC below.

    Input: ``stats`` rows of one instance (``store.load(instances=[id])``), or
    ``analysis.trend(stats, by=("instance_id", "task_type"))`` filtered to one instance.
    Columns read: ``collected_at`` (or ``bucket``), ``task_type``, ``running, abnormal,
    terminated, completed``; ``instance_id``/``instance_name`` for the title.  Several snapshots
    at one time keep the last (greatest ``run_id``), as the aggregation does.

    Traces: per task type one line per state, named by ``STATE_LABELS``, coloured by
    ``STATE_COLORS``.  For long histories pass a coarser trend: every point is drawn.
    """
    builder = "instance_history"
    title = "Task counts over time"
    time_column = "collected_at"
    if stats_of_one_instance is not None and "collected_at" not in stats_of_one_instance.columns \
            and "bucket" in stats_of_one_instance.columns:
        time_column = "bucket"
    frame = _checked(
        stats_of_one_instance, (time_column, "task_type", *COUNT_COLUMNS), builder,
        "store.load(instances=[instance_id]) for one instance",
    )
    if frame is None:
        return empty_figure(title=title)
    if "instance_id" in frame.columns:
        instances = frame["instance_id"].dropna().unique()
        if len(instances) > 1:
            raise ValueError(
                f"{builder}() draws one instance, got {len(instances)} "
                f"({', '.join(map(str, instances[:3]))}{', ...' if len(instances) > 3 else ''}); "
                "filter the stats to one instance_id first"
            )
        label = _instance_labels(frame).iloc[0]
        title = f"Task counts over time: {label}"
    order = [time_column] + (["run_id"] if "run_id" in frame.columns else [])
    frame = (
        frame.assign(time=_utc_naive(frame[time_column]), task_type=frame["task_type"].astype("string"))
        .sort_values(order, kind="stable")
        .drop_duplicates(["time", "task_type"], keep="last")
    )

    panels = [t for t in TASK_TYPES if t in set(frame["task_type"].dropna())] or list(TASK_TYPES)
    fig = make_subplots(
        rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.1,
        subplot_titles=[f"{TASK_TYPE_LABELS[t]} tasks" for t in panels],
    )
    for row, task_type in enumerate(panels, start=1):
        of_type = frame[frame["task_type"] == task_type]
        for state in COUNT_COLUMNS:
            fig.add_trace(
                go.Scatter(
                    x=of_type["time"],
                    y=_floats(of_type[state]),
                    mode="lines+markers",
                    name=STATE_LABELS[state],
                    legendgroup=state,
                    showlegend=row == 1,
                    meta=task_type,
                    line={"color": STATE_COLORS[state], "width": 2},
                    marker={"color": STATE_COLORS[state], "size": 4},
                    hovertemplate=f"{TASK_TYPE_LABELS[task_type]} {state}: %{{y:,}}<extra></extra>",
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(title_text="Tasks", tickformat=",d", rangemode="tozero", row=row, col=1)
    apply_layout(fig, title, height=560)
    fig.update_xaxes(title_text=TIME_AXIS_TITLE, row=len(panels), col=1)
    fig.update_layout(hovermode="x unified")
    _fit_single_time(fig, frame["time"])
    return fig


def kpi_figure(kpis: Mapping[str, object] | pd.Series | pd.DataFrame | None, per_row: int = 4) -> go.Figure:
    """Indicator tiles for the headline numbers, mainly for the HTML report.

    Input: ``analysis.kpis(stats, errors)``: a mapping (or a one-row frame / a Series) of
    name -> value.  Every numeric value becomes a tile, in the given order, titled by its name
    ("abnormal_ratio" -> "Abnormal ratio"); names containing ``ratio`` or ``share`` are shown
    as percentages (their tiles hold ``100 * value`` with a "%" suffix, so a change reads in
    percentage points, "▲1.0 pts"), the others as counts.  A value ``X`` with a ``previous_X``
    beside it shows the change against it (a rise in red for abnormal/failed numbers, green
    otherwise; grey when it rounds to zero), and
    ``previous_X`` / ``X_delta`` get no tile of their own.  Non-numeric values (the last run's
    time and id) go into the title; NaN tiles show "–".
    """
    title = "Fleet at a glance"
    if isinstance(kpis, pd.DataFrame):
        if len(kpis) > 1:
            raise ValueError(f"kpi_figure() needs one row of KPIs (analysis.kpis(...)), got {len(kpis)} rows")
        kpis = kpis.iloc[0] if len(kpis) else None
    if kpis is None or len(kpis) == 0:
        return empty_figure(title=title)
    items = {str(k): v for k, v in dict(kpis.items()).items()}
    numeric = {
        k: v for k, v in items.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    }
    compared = {k for k in numeric if f"previous_{k}" in numeric}
    hidden = {f"previous_{k}" for k in compared} | {f"{k}_delta" for k in compared}
    tiles = {k: v for k, v in numeric.items() if k not in hidden}
    others = {k: v for k, v in items.items() if k not in numeric and v is not None and not _is_missing(v)}
    if not tiles:
        return empty_figure(title=title)
    if others:
        title += " (" + ", ".join(f"{_kpi_label(k).lower()} {_kpi_text(v)}" for k, v in others.items()) + ")"

    rows = -(-len(tiles) // per_row)
    fig = go.Figure()
    for position, (name, value) in enumerate(tiles.items()):
        # Ratios in percent units, so their change reads in percentage points ("▼2.0 pts"), as
        # everywhere else, rather than plotly's "−2.0%".
        is_ratio = "ratio" in name or "share" in name
        scale = 100.0 if is_ratio else 1.0
        missing = _is_missing(value)
        indicator = {
            "mode": "number",
            "value": None if missing else float(value) * scale,
            "title": {"text": _kpi_label(name)},
            "number": {"valueformat": ".1f", "suffix": "%"} if is_ratio else {"valueformat": ",.0f"},
            "domain": {"row": position // per_row, "column": position % per_row},
            "name": name,
        }
        if missing:
            indicator["number"]["suffix"] = "–"
        reference = numeric.get(f"previous_{name}")
        if name in compared and not missing and not _is_missing(reference):
            rise_is_bad = "abnormal" in name or "failed" in name
            bad, good = STATE_COLORS["abnormal"], STATE_COLORS["running"]
            reference = float(reference) * scale
            if round(float(value) * scale - reference, 1) == 0:
                # A change that rounds to zero is neither a rise nor a fall: no colour.
                reference, bad, good = float(value) * scale, STATE_COLORS["terminated"], STATE_COLORS["terminated"]
            indicator["mode"] = "number+delta"
            indicator["delta"] = {
                "reference": reference,
                "valueformat": ".1f" if is_ratio else ",.0f",
                "suffix": " pts" if is_ratio else "",
                "increasing": {"color": bad if rise_is_bad else good},
                "decreasing": {"color": good if rise_is_bad else bad},
            }
        fig.add_trace(go.Indicator(**indicator))
    apply_layout(fig, title, height=90 + 160 * rows)
    fig.update_layout(margin={**MARGINS, "t": 90, "b": 20})
    fig.update_layout(grid={"rows": rows, "columns": min(per_row, len(tiles)), "pattern": "independent"})
    return fig


def _is_missing(value: object) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _kpi_label(name: str) -> str:
    return str(name).replace("_", " ").capitalize().replace("Cdc", "CDC")


def _kpi_text(value: object) -> str:
    if isinstance(value, pd.Timestamp):
        stamp = value.tz_convert("UTC") if value.tzinfo else value
        return stamp.strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


#: Colours of the episode timeline by how an episode ended.
EPISODE_COLORS = {"still abnormal": "#D62728", "recovered": "#2CA02C", "disappeared": "#7F7F7F"}


def episode_timeline(episodes: pd.DataFrame | None, title: str = "Abnormal tasks over time",
                     max_tasks: int = 40) -> go.Figure:
    """One row per task, one bar per abnormal episode, from ``first_seen`` to ``end`` (or to
    ``last_seen`` while still abnormal), coloured by how it ended (``EPISODE_COLORS``).

    Input: ``episodes.episodes(...)`` / ``episodes.from_history(...)`` rows (usually of one
    instance).  Columns read: ``task_id, task_name, first_seen, last_seen, end, still_open,
    ended, duration``.  The ``max_tasks`` tasks abnormal longest in total are drawn, the
    longest on top; task names are server text, shown through ``display``.
    """
    builder = "episode_timeline"
    frame = _checked(episodes, ("task_id", "task_name", "first_seen", "last_seen", "end", "still_open",
                                "ended", "duration"), builder, "episodes.from_history(store)")
    if frame is None:
        return empty_figure("No abnormal task was listed in this selection.", title=title)
    totals = frame.groupby("task_id")["duration"].sum().sort_values(ascending=False, kind="stable")
    kept = list(totals.index[:max_tasks])
    frame = frame[frame["task_id"].isin(kept)]
    names = frame.drop_duplicates("task_id", keep="last").set_index("task_id")["task_name"]
    labels = {task: display.plotly(f"{display.visible(names.get(task) or task, display.LABEL_LIMIT)} "
                                   f"({str(task)[:8]})", limit=None) for task in kept}
    start = _utc_naive(frame["first_seen"])
    stop = _utc_naive(frame["end"].fillna(frame["last_seen"]))
    state = np.where(frame["still_open"], "still abnormal", frame["ended"].astype(object).fillna("recovered"))
    fig = go.Figure()
    for name, color in EPISODE_COLORS.items():
        chosen = state == name
        if not chosen.any():
            continue
        # A bar from `base` (start) of length stop - start (ms): plotly's own Gantt encoding.
        length = (stop[chosen] - start[chosen]).dt.total_seconds() * 1000
        hours = frame.loc[chosen, "duration"].dt.total_seconds() / 3600
        fig.add_trace(go.Bar(
            name=name, orientation="h", base=start[chosen], x=length.clip(lower=60_000),
            y=[labels[task] for task in frame.loc[chosen, "task_id"]], marker_color=color,
            customdata=list(zip(hours.tolist(), frame.loc[chosen, "task_id"].astype(str))),
            hovertemplate="%{y}<br>%{base|%Y-%m-%d %H:%M} UTC, %{customdata[0]:.1f} h<extra>" + name + "</extra>",
        ))
    apply_layout(fig, title, x_title="time (UTC)", height=max(300, 60 + 24 * len(kept)))
    fig.update_xaxes(type="date")
    fig.update_yaxes(categoryorder="array", categoryarray=[labels[task] for task in reversed(kept)],
                     title_text=None)
    fig.update_layout(barmode="overlay")
    return fig
